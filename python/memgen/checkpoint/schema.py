"""The MemGen checkpoint as plain data: what the engine and the HF oracle read.

No framework objects here: tensors, ints, strings and dicts only. Loaders and
writers for the two on-disk layouts live in `reference.py` and `export.py`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

from torch import Tensor

# The MemGen fields of the reference's config.json (spec §1.2), with the
# MemGenConfig class defaults.
SETTINGS_DEFAULTS = {
    "prompt_latents_len": 0,
    "inference_latents_len": 0,
    "trigger_active": False,
    "max_prompt_aug_num": 1,
    "max_inference_aug_num": 5,
    "weaver_lora_config": None,
    "trigger_lora_config": None,
}

# Keys of the `weaver` tensor dict, flat (the reference nests the LayerNorms).
WEAVER_KEYS = (
    "prompt_query_latents",
    "inference_query_latents",
    "prompt_latent_ln.weight",
    "prompt_latent_ln.bias",
    "inference_latent_ln.weight",
    "inference_latent_ln.bias",
    "prompt_latent_scale",
    "inference_latent_scale",
)
LINEAR_KEYS = ("weight", "bias")


@dataclass
class MemGenSettings:
    """The MemGen fields of config.json (spec §1.2)."""

    prompt_latents_len: int
    inference_latents_len: int
    trigger_active: bool = False
    max_prompt_aug_num: int = 1
    max_inference_aug_num: int = 5
    weaver_lora_config: dict = field(default_factory=dict)
    trigger_lora_config: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class LoraWeights:
    """One LoRA adapter: delta W = B @ A * scaling on each listed base Linear.

    `layers` maps the base module path (e.g. "model.layers.0.self_attn.q_proj")
    to (A [r, in_features], B [out_features, r]). `config` is the adapter's
    PEFT config dict (adapter_config.json), kept for a faithful round trip.
    """

    r: int
    alpha: float
    target_modules: list[str] | str
    layers: dict[str, tuple[Tensor, Tensor]]
    use_rslora: bool = False
    config: dict = field(default_factory=dict)

    @property
    def scaling(self) -> float:
        """PEFT's scale: alpha / r (alpha / sqrt(r) with rsLoRA)."""
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


@dataclass
class MemGenCheckpoint:
    """Every trained MemGen tensor plus the settings needed to run them.

    reasoner_config: the non-MemGen fields of the reference config.json (the
        reasoner's HF config at training time; `model_type` is "memgen" on disk
        and is not kept here).
    reasoner_to_weaver / weaver_to_reasoner: {"weight", "bias"} of nn.Linear.
    weaver: flat dict with the keys of WEAVER_KEYS.
    trigger_head: {"weight" [2, Ht], "bias" [2]}; class 1 = insert.
    weaver_base / trigger_base: base checkpoints recorded by the export layout
        (the reference layout does not record them: None).
    """

    settings: MemGenSettings
    reasoner_config: dict
    reasoner_to_weaver: dict[str, Tensor]
    weaver_to_reasoner: dict[str, Tensor]
    weaver: dict[str, Tensor]
    trigger_head: dict[str, Tensor]
    weaver_lora: LoraWeights
    trigger_lora: LoraWeights
    weaver_base: str | None = None
    trigger_base: str | None = None

    def folded_query_latents(self, kind: str) -> Tensor:
        """LayerNorm(Q) * scale for kind "prompt" or "inference": the K weaver
        input vectors, independent of the input (spec §1.1). Computed in the
        stored dtype, or float32 when that is lower precision."""
        import torch

        q = self.weaver[f"{kind}_query_latents"]
        dtype = torch.promote_types(q.dtype, torch.float32)
        ln = torch.nn.functional.layer_norm(
            q.to(dtype), (q.shape[-1],),
            self.weaver[f"{kind}_latent_ln.weight"].to(dtype),
            self.weaver[f"{kind}_latent_ln.bias"].to(dtype),
            eps=1e-5,
        )
        return ln * self.weaver[f"{kind}_latent_scale"].to(dtype)
