"""Photos → latents for training, with every random choice keyed by the sample's position in the run.

Position p counts training samples over the whole run (across accumulation steps, processes and batch
rows). Its epoch's permutation, flip, crop and VAE-posterior noise are drawn from generators keyed by p,
so resuming at any step reproduces the uninterrupted run without saving RNG state, and caching latents
changes speed, not results. Each drawn sample also says where it came from (`ImageGeometry`: the photo's size
and the crop's position), what SDXL's micro-conditioning records.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image
from tqdm.auto import tqdm

from boothkit import seeding
from boothkit.data.images import crop_is_fixed, crop_top_left, hflip, prepare_image, resized_size, to_tensor
from boothkit.families.base import LatentDistribution, ModelFamily


@dataclass(frozen=True)
class ImageOptions:
    resolution: int
    center_crop: bool
    random_flip: bool
    cache_latents: bool


@dataclass(frozen=True)
class ImageGeometry:
    """Where a training sample came from, as SDXL's micro-conditioning records it (Podell et al. 2023, Sec. 2.2;
    `add_time_ids` of the diffusers SDXL DreamBooth example): the photo's (height, width) before resizing, and
    the (top, left) of the crop in the resized image — in the mirrored image when the sample is flipped, as the
    diffusers example, which flips before it crops, records it."""

    original_size: tuple[int, int]
    crop_top_left: tuple[int, int]
    flip: bool = False  # how the sample was drawn (a subject mask follows the same crop and flip)
    crop_offset: tuple[float, float] | None = None


class LatentBank:
    """Latents of one set of photos (instance or class). Cached posteriors where the crop cannot vary."""

    def __init__(self, family: ModelFamily, images: list[Image.Image], options: ImageOptions, label: str,
                 stream: int):
        self.family = family
        self.stream = stream  # keeps the draws of instance and class images independent
        self.images = images
        self.options = options
        flips = (False, True) if options.random_flip else (False,)
        cacheable = [i for i, image in enumerate(images) if self._crop_is_deterministic(image)]
        self.cache: dict[tuple[int, bool], LatentDistribution] = {}
        if options.cache_latents and cacheable:
            self._fill_cache([(i, flip) for i in cacheable for flip in flips], label)

    def __len__(self) -> int:
        return len(self.images)

    def _crop_is_deterministic(self, image: Image.Image) -> bool:
        return self.options.center_crop or crop_is_fixed(image.size, self.options.resolution)

    def _pixels(self, index: int, flip: bool, crop_offset: tuple[float, float] | None) -> torch.Tensor:
        # Cached images have a single possible crop, so any offset gives it.
        offset = crop_offset if crop_offset is not None else (0.5, 0.5)
        prepared = prepare_image(self.images[index], self.options.resolution, self.options.center_crop, offset)
        pixels = to_tensor(prepared)
        return hflip(pixels) if flip else pixels

    @torch.no_grad()
    def _fill_cache(self, keys: list[tuple[int, bool]], label: str) -> None:
        # One image at a time, as the uncached path encodes (and the diffusers examples, one training batch per
        # step): the encoder's activations for several 1024 px images would set the run's peak memory before
        # training has begun.
        for index, flip in tqdm(keys, desc=f"caching {label} latents", unit="img", leave=False):
            self.cache[(index, flip)] = self.posterior(index, flip, None)

    def geometry(self, index: int, flip: bool, crop_offset: tuple[float, float] | None) -> ImageGeometry:
        """The `ImageGeometry` of image `index` cropped at `crop_offset` (any offset when the crop is fixed)."""
        image, resolution = self.images[index], self.options.resolution
        offset = crop_offset if crop_offset is not None else (0.5, 0.5)
        top, left = crop_top_left(image.size, resolution, self.options.center_crop, offset)
        if flip:  # the crop seen in the mirrored image: it starts where the original crop ends
            left = resized_size(image.size, resolution)[0] - left - resolution
        return ImageGeometry((image.height, image.width), (top, left), flip, crop_offset)

    @torch.no_grad()
    def posterior(self, index: int, flip: bool, crop_offset: tuple[float, float] | None) -> LatentDistribution:
        """The VAE posterior of image `index` (flipped, cropped at `crop_offset`): cached, or encoded now."""
        cached = self.cache.get((index, flip))
        return cached if cached is not None else self.family.encode_pixels(self._pixels(index, flip, crop_offset)[None])

    @torch.no_grad()
    def draw(self, index: int, seed: int, position: int) -> tuple[torch.Tensor, ImageGeometry]:
        """Latents (1, C, h, w) of image `index` as sample `position` of the run sees it, and its geometry."""
        flip = self.options.random_flip and bool(
            torch.randint(0, 2, (1,), generator=seeding.generator(seed, "flip", self.stream, position)).item()
        )
        offset = None
        if (index, flip) not in self.cache:
            offset = tuple(torch.rand(2, generator=seeding.generator(seed, "crop", self.stream, position)).tolist())
        posterior = self.posterior(index, flip, offset)
        noise = torch.randn(posterior.mean.shape, generator=seeding.generator(seed, "latents", self.stream, position))
        return posterior.sample(noise.to(posterior.mean.device)), self.geometry(index, flip, offset)


class SampleOrder:
    """Which photo sample `position` uses: a fresh permutation of the dataset every epoch."""

    def __init__(self, dataset_length: int, seed: int):
        self.length = dataset_length
        self.seed = seed
        self._epoch = -1
        self._permutation: list[int] = []

    def __getitem__(self, position: int) -> int:
        epoch, offset = divmod(position, self.length)
        if epoch != self._epoch:
            generator = seeding.generator(self.seed, "data", epoch)
            self._permutation = torch.randperm(self.length, generator=generator).tolist()
            self._epoch = epoch
        return self._permutation[offset]


def sample_positions(micro_step: int, process_index: int, num_processes: int, batch_size: int) -> range:
    """Global positions of the rows of one micro-batch on one process."""
    first = (micro_step * num_processes + process_index) * batch_size
    return range(first, first + batch_size)
