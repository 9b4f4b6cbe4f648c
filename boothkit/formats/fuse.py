"""`boothkit merge --into_base`: the base model with LoRAs fused into its weights, saved as a pipeline folder.

W' = W + Σ_i w_i·(α_i/r_i)·up_i·down_i, computed by diffusers' own `fuse_lora` after the LoRAs are loaded as
`boothkit sample` loads them; the folder loads with `DiffusionPipeline.from_pretrained` and needs no LoRA.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from boothkit.formats.config import MergeConfig
from boothkit.formats.models import BaseModel
from boothkit.layout import TMP_PREFIX, OutputFolder, check_output_folder


def fuse_into_base(config: MergeConfig, base: BaseModel, weighted: list[tuple[str, float]]) -> Path:
    from boothkit.families import load_family
    from boothkit.guidance.adapters import load_adapter

    output = check_output_folder(config.output, "merge", overwrite=config.overwrite,
                                 hint="pass --overwrite to replace the model of the earlier merge")
    with OutputFolder(output, "merge") as folder:
        family = load_family(base.source, config.revision)
        names = [f"merge_{index}" for index in range(len(weighted))]
        for name, (path, _) in zip(names, weighted):
            load_adapter(family, path, name, "LoRA")
        pipeline = family.pipeline
        pipeline.set_adapters(names, adapter_weights=[weight for _, weight in weighted])
        pipeline.fuse_lora(adapter_names=names, lora_scale=1.0)
        pipeline.unload_lora_weights()
        folder.clear()
        with tempfile.TemporaryDirectory(dir=output, prefix=TMP_PREFIX) as staging:
            pipeline.save_pretrained(staging, safe_serialization=True)
            files = folder.adopt(Path(staging))
    print(f"fused {len(weighted)} LoRA(s) into {base.describe()}: {len(files)} files in {output}")
    return output
