"""PDMBooth's additions to a training run, set up once before the first step: the subject masks (`--mask_dm`,
`--mask_pdm`; `boothkit.data.masks`) and the PDM targets (`--use_pdm`; `boothkit.train.pdm`), and what each
step asks of them: the instance rows' loss weights and the PDM term of a batch.

The masks the run uses are saved into the output folder (`masks/NN_<photo>.png` and `NN_<photo>_overlay.png`,
the photo with its background dimmed) so a user can check them before trusting a masked run.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from boothkit import seeding
from boothkit.data import masks as mask_sources
from boothkit.data.images import hflip, prepare_image, to_tensor
from boothkit.errors import BoothkitError
from boothkit.families.base import Conditioning, ModelFamily
from boothkit.identity import file_digest, model_identity, value_digest
from boothkit.train import pdm
from boothkit.train.concepts import ConceptImages
from boothkit.train.data import ImageGeometry, ImageOptions, LatentBank
from boothkit.train.losses import mask_weights, pdm_distance, weighted_mean

log = logging.getLogger(__name__)
MASKS_DIR = "masks"


@dataclass
class Regularizers:
    config: object  # TrainConfig (its PdmOptions)
    options: ImageOptions
    masks: list[Image.Image] | None = None  # per instance-bank index
    targets: list[pdm.PdmTargets] | None = None  # per instance-bank index
    layer: str | None = None
    token_weights: list[torch.Tensor | None] | None = None  # per instance-bank index, (tokens,)
    geometries: list[ImageGeometry] | None = None  # of the centre crops the targets were computed from

    def instance_weights(self, index: int, geometry: ImageGeometry, latent_hw: tuple[int, int]) -> torch.Tensor:
        """(1, 1, h, w) loss weights of instance row `index` drawn with `geometry` (the mask follows its crop
        and flip): 1 inside the subject, `--background_loss_weight` outside."""
        offset = geometry.crop_offset or (0.5, 0.5)  # None: the photo has a single crop
        mask = prepare_image(self.masks[index], self.options.resolution, self.options.center_crop, offset).convert("L")
        values = (to_tensor(mask) + 1) / 2
        values = hflip(values) if geometry.flip else values
        small = F.interpolate(values[None], size=latent_hw, mode="area")
        return mask_weights(small, self.config.background_loss_weight)

    def pdm_batch(self, family: ModelFamily, rows: list[tuple[int, int, int]], seed: int, class_prompt,
                  resolution: int, device: torch.device) -> "PdmBatch":
        """The PDM rows of a batch: per row (instance index, concept, position) one of the photo's kept inversion
        steps (drawn by position), fed as the targets were computed — (z_t, t, class prompt) — and its targets."""
        picks = [int(torch.randint(len(self.targets[index].timesteps), (1,),
                                   generator=seeding.generator(seed, "pdm", position)).item())
                 for index, _, position in rows]
        latents = torch.stack([self.targets[i].latents[j] for (i, _, _), j in zip(rows, picks)]).to(device)
        timesteps = torch.stack([self.targets[i].timesteps[j] for (i, _, _), j in zip(rows, picks)]).to(device)
        conditioning = Conditioning.cat([class_prompt(concept) for _, concept, _ in rows])
        conditioning.tensors.update(family.image_conditioning([self.geometries[i] for i, _, _ in rows], resolution,
                                                              device))
        targets = torch.stack([self.targets[i].queries[j] for (i, _, _), j in zip(rows, picks)]).to(device)
        weights = None
        if self.token_weights is not None:
            weights = torch.stack([self.token_weights[i] for i, _, _ in rows]).to(device)
        return PdmBatch(latents.contiguous(), timesteps, conditioning, targets, weights)  # NCHW, as in `pdm.invert`

    def query_module(self, family: ModelFamily) -> torch.nn.Module:
        return pdm.query_module(family.denoiser, self.layer)

    def pdm_term(self, family: ModelFamily, denoiser: torch.nn.Module, rows: list[tuple[int, int, int]],
                 seed: int, class_prompt, resolution: int) -> torch.Tensor:
        """Per row the PDM distance of the trained model's queries to the frozen model's, in a call of its own
        (the trainer puts the PDM rows into its batch instead)."""
        batch = self.pdm_batch(family, rows, seed, class_prompt, resolution, next(denoiser.parameters()).device)
        with pdm.captured_queries(self.query_module(family)) as queries:
            family.predict(batch.latents.to(family.denoiser.dtype), batch.timesteps, batch.conditioning,
                           denoiser=denoiser)
        return batch.distance(queries[0])


@dataclass
class PdmBatch:
    latents: torch.Tensor  # (P, C, h, w) the inverted z_t
    timesteps: torch.Tensor  # (P,)
    conditioning: Conditioning  # the class prompt (and SDXL's time ids of the centre crop)
    targets: torch.Tensor  # (P, tokens, dim) the frozen model's queries, fp16
    weights: torch.Tensor | None  # (P, tokens) with --mask_pdm

    def distance(self, queries: torch.Tensor) -> torch.Tensor:
        """Per row `losses.pdm_distance` of the trained model's queries (P, tokens, dim)."""
        return pdm_distance(queries, self.targets, self.weights)


def per_sample_loss(regularizers: Regularizers | None, prediction: torch.Tensor, target: torch.Tensor,
                    instance_rows: int, drawn: list[tuple[int, ImageGeometry]]) -> torch.Tensor:
    """Each row's mean squared error; with --mask_dm the instance rows' (the first `instance_rows`) weighted by
    their subject mask as drawn (`drawn`: each row's bank index and geometry)."""
    squared = (prediction - target) ** 2
    if regularizers is None or not regularizers.config.mask_dm:
        return squared.flatten(1).mean(1)
    weights = torch.cat([regularizers.instance_weights(index, geometry, tuple(squared.shape[-2:]))
                         for index, geometry in drawn[:instance_rows]]).to(squared.device)
    masked = weighted_mean(squared[:instance_rows], weights)
    return torch.cat([masked, squared[instance_rows:].flatten(1).mean(1)])


def prepare_regularizers(config, family: ModelFamily, images: ConceptImages, options: ImageOptions,
                         folder, device: torch.device) -> Regularizers | None:
    """Masks and PDM targets of the run (None when it uses neither); call before any LoRA or checkpoint
    weights are loaded: the targets are the frozen model's."""
    if not (config.needs_masks or config.use_pdm):
        return None
    regularizers = Regularizers(config, options)
    photos = [path for path, _ in images.all_instance_files]
    if config.needs_masks:
        regularizers.masks = _masks(config, images, photos, device)
        if folder is not None:
            _save_masks(folder, photos, [image for _, image in images.all_instance_files], regularizers.masks)
    if config.use_pdm:
        _prepare_pdm(regularizers, config, family, images, photos, device)
    return regularizers


def _masks(config, images: ConceptImages, photos: list[Path], device: torch.device) -> list[Image.Image]:
    if config.mask_dir:
        masks = mask_sources.masks_from_folder(config.mask_dir, photos)
    else:
        masks = []
        for concept, files in zip(images.concepts, images.instance_files):
            prompt = config.mask_prompt or concept.class_prompt
            if not prompt:
                raise BoothkitError("masks are computed from the class word: give --class_prompt (or --mask_prompt, "
                                    "or masks with --mask_dir)")
            masks += mask_sources.segmentation_masks([path for path, _ in files], prompt, config.mask_model, device)
    log.info("subject masks (fraction of each photo): %s", mask_sources.describe(masks))
    return masks


def _save_masks(folder, photos: list[Path], pictures: list[Image.Image], masks: list[Image.Image]) -> None:
    from boothkit.io import save_image_atomic

    for number, (photo, picture, mask) in enumerate(zip(photos, pictures, masks)):
        stem = f"{MASKS_DIR}/{number:02d}_{photo.stem}"
        mask_path, overlay_path = folder.claim(f"{stem}.png", f"{stem}_overlay.png")
        save_image_atomic(mask, mask_path)
        save_image_atomic(mask_sources.mask_overlay(picture, mask), overlay_path)


def _prepare_pdm(regularizers: Regularizers, config, family: ModelFamily, images: ConceptImages,
                 photos: list[Path], device: torch.device) -> None:
    if not hasattr(family, "timestep_snr"):  # DDPM families (the trainer tests min-SNR the same way)
        raise BoothkitError(f"--use_pdm needs a DDPM model (SD 1.x/2.x, SDXL); {family.name} trains with flow "
                            "matching")
    layer = config.pdm_layer or pdm.default_pdm_layer(family.denoiser)
    pdm.query_module(family.denoiser, layer)  # a wrong --pdm_layer fails before any inversion
    centre = ImageOptions(regularizers.options.resolution, True, False, False)  # encoded only for a cache miss
    bank = LatentBank(family, [image for _, image in images.all_instance_files], centre, "PDM", stream=2)
    model = value_digest([model_identity(config.pretrained_model_name_or_path, config.revision, config.variant),
                          model_identity(config.pretrained_vae_model_name_or_path, config.revision,
                                         config.variant, "config.json")
                          if config.pretrained_vae_model_name_or_path else None])
    started, computed, targets, geometries = time.perf_counter(), 0, [], []
    for index, (photo, concept) in enumerate(zip(photos, images.concept_of)):
        prompt = images.concepts[concept].class_prompt
        if not prompt:
            raise BoothkitError("--use_pdm inverts each photo under the class prompt: give --class_prompt "
                                "(e.g. 'a photo of dog'), or class_prompt in each concept")
        geometry = bank.geometry(index, False, None)
        key = value_digest({"photo": file_digest(photo), "model": model, "prompt": prompt, "layer": layer,
                            "steps": config.pdm_inversion_steps, "keep": config.pdm_timesteps,
                            "resolution": centre.resolution, "dtype": str(family.denoiser.dtype)})

        def compute(index=index, prompt=prompt, geometry=geometry):
            conditioning = family.encode_prompts([prompt], device)
            conditioning.tensors.update(family.image_conditioning([geometry], centre.resolution, device))
            return pdm.invert(family, bank.posterior(index, False, None).mean, conditioning, layer,
                              config.pdm_inversion_steps, config.pdm_timesteps)

        found, cached = pdm.load_or_invert(family, key, compute)
        computed += not cached
        targets.append(found)
        geometries.append(geometry)
    pdm.report(targets, computed, time.perf_counter() - started)
    regularizers.targets, regularizers.layer, regularizers.geometries = targets, layer, geometries
    if config.mask_pdm:
        regularizers.token_weights = [_token_weights(regularizers, mask, found)
                                      for mask, found in zip(regularizers.masks, targets)]


def _token_weights(regularizers: Regularizers, mask: Image.Image, targets: pdm.PdmTargets) -> torch.Tensor:
    """The centre-cropped mask on the layer's token grid, flattened (tokens,) as the queries are."""
    grid = pdm.token_grid(tuple(targets.latents.shape[-2:]), targets.queries.shape[1])
    prepared = prepare_image(mask, regularizers.options.resolution, True).convert("L")
    values = (to_tensor(prepared) + 1) / 2
    return F.interpolate(values[None], size=grid, mode="area").flatten()
