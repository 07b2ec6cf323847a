"""MemGen checkpoints: a framework-free data container (`MemGenCheckpoint`) and
readers/writers for the reference `save_pretrained` layout and this project's
safetensors export.

    ckpt = load_checkpoint(dir)              # either layout, auto-detected
    validate(ckpt, reasoner_cfg, weaver_cfg, trigger_cfg)
    save_reference(ckpt, out) / save_export(ckpt, out)
    init_checkpoint(out, model_dir, InitOptions(...))   # a fresh one (`memgen init`)

How the engine consumes it: each LoRA adds (x @ A.T @ B.T) * lora.scaling to the
output of the base Linear at `module path` (A [r, in], B [out, r]);
`ckpt.folded_query_latents("prompt"|"inference")` gives the K weaver query
vectors LayerNorm(Q) * scale.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from .export import load_export, save_export
from .files import missing
from .init import InitOptions, init_checkpoint
from .random_init import DEFAULT_LORA_CONFIG, random_checkpoint
from .reference import load_reference, save_reference
from .schema import LoraWeights, MemGenCheckpoint, MemGenSettings
from .validate import base_linear_shapes, matches_target, validate


def drop_lora(ckpt: MemGenCheckpoint) -> MemGenCheckpoint:
    """The reference loader's accident (spec §0.1): every LoRA B is zero, so the
    weaver and trigger run as their base models; everything else is kept."""
    def zero_b(lora: LoraWeights) -> LoraWeights:
        return dataclasses.replace(lora, layers={m: (a, torch.zeros_like(b)) for m, (a, b) in lora.layers.items()})

    return dataclasses.replace(ckpt, weaver_lora=zero_b(ckpt.weaver_lora), trigger_lora=zero_b(ckpt.trigger_lora))


def cast_checkpoint(ckpt: MemGenCheckpoint, dtype: torch.dtype) -> MemGenCheckpoint:
    """Every tensor in `dtype` (e.g. float16 to halve a shipped file; the
    engine casts to its own dtype at load)."""
    def cast(d: dict) -> dict:
        return {k: t.to(dtype) for k, t in d.items()}

    def cast_lora(lora: LoraWeights) -> LoraWeights:
        return dataclasses.replace(lora, layers={m: (a.to(dtype), b.to(dtype)) for m, (a, b) in lora.layers.items()})

    return dataclasses.replace(ckpt, reasoner_to_weaver=cast(ckpt.reasoner_to_weaver),
                               weaver_to_reasoner=cast(ckpt.weaver_to_reasoner), weaver=cast(ckpt.weaver),
                               trigger_head=cast(ckpt.trigger_head), weaver_lora=cast_lora(ckpt.weaver_lora),
                               trigger_lora=cast_lora(ckpt.trigger_lora))


def training_output_checkpoint(path: Path) -> Path:
    """`memgen train --output-dir OUT` writes its checkpoint to OUT/export and/or
    OUT/reference; OUT itself then holds neither layout. Given such a folder,
    the checkpoint inside it (export first), so `--memgen OUT` works; any other
    folder is returned as it is."""
    if (path / "memgen_config.json").is_file() or (path / "config.json").is_file():
        return path
    for inner, marker in (("export", "memgen_config.json"), ("reference", "config.json")):
        if (path / inner / marker).is_file():
            return path / inner
    return path


def load_checkpoint(path: str | Path, reference_compat: bool = False) -> MemGenCheckpoint:
    """Load a MemGen checkpoint directory in either layout (or the output folder
    of `memgen train`, whose export/ or reference/ it reads). Its internal shapes
    are validated (validate() with the base configs checks the rest).
    reference_compat=True reproduces the reference loader, which drops the LoRA
    weights (all lora_B zero); off by default."""
    path = Path(path)
    if not path.exists():
        raise missing(path, "MemGen checkpoint directory not found")
    if not path.is_dir():
        raise ValueError(f"{path}: a MemGen checkpoint is a directory, got a file")
    path = training_output_checkpoint(path)
    if (path / "memgen_config.json").is_file():
        ckpt = load_export(path)
    elif (path / "config.json").is_file():
        ckpt = load_reference(path)
    else:
        raise missing(path / "config.json",
                      f"{path} holds neither memgen_config.json (export layout) nor config.json "
                      "(reference layout), nor a memgen train output's export/ or reference/; missing")
    try:
        validate(ckpt)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return drop_lora(ckpt) if reference_compat else ckpt


__all__ = [
    "MemGenCheckpoint", "MemGenSettings", "LoraWeights", "DEFAULT_LORA_CONFIG",
    "load_checkpoint", "save_reference", "save_export", "validate", "drop_lora", "cast_checkpoint",
    "random_checkpoint", "base_linear_shapes", "matches_target", "InitOptions", "init_checkpoint",
]
