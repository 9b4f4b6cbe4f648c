"""PDMBooth's options of `boothkit train` (docs/pdmbooth.md): masked diffusion loss and the PDM term.

Light on purpose (pydantic only): the CLI builds its parser from these fields without importing torch.
"""

from __future__ import annotations

from pydantic import AliasChoices, Field, model_validator

from boothkit.config import CommandConfig

DEFAULT_PDM_LOSS_WEIGHT = 0.05  # PDMBooth's `--pdm_loss_weight` default (train_pdmbooth*.py)


class PdmOptions(CommandConfig):
    use_inst_loss: bool = Field(True, description="The instance (DreamBooth) loss; --no_use_inst_loss trains with "
                                                  "the other terms only (PDMBooth's --use_inst_loss, on here by "
                                                  "default; its --use_prior_loss is --with_prior_preservation).")
    mask_dm: bool = Field(False, description="Compute the instance loss inside the subject's mask (at latent size).")
    background_loss_weight: float = Field(0.0, ge=0, le=1, description="With --mask_dm: weight of the background "
                                                                       "in the instance loss (0 ignores it).")
    mask_dir: str | None = Field(None, description="Masks, one per photo with the same stem (white = subject); "
                                                   "default: computed with --mask_model from the class word.")
    mask_model: str = Field("CIDAS/clipseg-rd64-refined", description="Text-prompted segmentation model (CLIPSeg) "
                                                                       "for masks not given by --mask_dir.")
    mask_prompt: str | None = Field(None, description="What --mask_model segments (default: the class prompt).")
    use_pdm: bool = Field(False, description="Add PDMBooth's PDM term: self-attention queries of --pdm_layer pulled "
                                             "toward the frozen model's along the DDIM inversion of each photo.",
                          validation_alias=AliasChoices("use_pdm", "use_pdm_loss"))
    pdm_loss_weight: float = Field(DEFAULT_PDM_LOSS_WEIGHT, ge=0, description="Weight of the PDM term (PDMBooth: "
                                                                              "0.05).")
    pdm_layer: str | None = Field(None, description="Self-attention module whose queries are the PDM features "
                                                    "(default: the first transformer block of the last attention "
                                                    "of the last up block that has attention — SD 1.5's "
                                                    "up_blocks.3.attentions.2.transformer_blocks.0.attn1, the "
                                                    "paper's).")
    pdm_timesteps: int = Field(25, ge=1, description="Timesteps of the inversion kept as PDM targets (evenly "
                                                     "spaced; bounds the cache: about 2.6 MB each per 512 px "
                                                     "photo for SD 1.5).")
    pdm_inversion_steps: int = Field(50, ge=1, description="DDIM inversion steps (PDMBooth: 999).")
    mask_pdm: bool = Field(False, description="Compute the PDM term inside the subject's mask.")

    @model_validator(mode="after")
    def _check_pdm(self) -> "PdmOptions":
        if self.mask_pdm and not self.use_pdm:
            raise ValueError("--mask_pdm masks the PDM term: add --use_pdm")
        if self.pdm_timesteps > self.pdm_inversion_steps:
            raise ValueError(f"--pdm_timesteps ({self.pdm_timesteps}) cannot exceed --pdm_inversion_steps "
                             f"({self.pdm_inversion_steps})")
        if not (self.use_inst_loss or self.use_pdm or getattr(self, "with_prior_preservation", False)):
            raise ValueError("--no_use_inst_loss leaves nothing to train: add --use_pdm or --with_prior_preservation")
        if "background_loss_weight" in self.model_fields_set and not self.mask_dm:
            raise ValueError("--background_loss_weight weights the masked instance loss: add --mask_dm")
        return self

    @property
    def needs_masks(self) -> bool:
        return self.mask_dm or self.mask_pdm
