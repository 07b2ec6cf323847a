"""A MemGen checkpoint with the reference's random initialisation (spec §1.1),
for benchmarks and tests that have no trained checkpoint:
query latents ~ N(0, 1); LayerNorms weight 1 / bias 0; scales 1; projections
and trigger head with nn.Linear's default init; LoRA A Kaiming-uniform and
B zero, as PEFT does (so the adapters start as a no-op)."""
from __future__ import annotations

import math

import torch

from .schema import LoraWeights, MemGenCheckpoint, MemGenSettings
from .validate import _as_dict, base_linear_shapes, matches_target

# The LoRA block shared by every reference YAML config (spec §1.3).
DEFAULT_LORA_CONFIG = {"r": 16, "lora_alpha": 32, "target_modules": ["q_proj", "v_proj"],
                       "lora_dropout": 0.1, "bias": "none", "task_type": "CAUSAL_LM"}


def _linear(in_f: int, out_f: int, g: torch.Generator, dtype) -> dict[str, torch.Tensor]:
    """nn.Linear's default init: weight Kaiming-uniform(a=sqrt(5)), bias U(+-1/sqrt(in))."""
    w = torch.empty(out_f, in_f, dtype=dtype)
    torch.nn.init.kaiming_uniform_(w, a=math.sqrt(5), generator=g)
    bound = 1 / math.sqrt(in_f) if in_f > 0 else 0.0
    b = torch.empty(out_f, dtype=dtype).uniform_(-bound, bound, generator=g)
    return {"weight": w, "bias": b}


def _lora(config: dict, base_config: dict, g: torch.Generator, dtype) -> LoraWeights:
    from .files import lora_from_config

    layers = {}
    for module, (in_f, out_f) in sorted(base_linear_shapes(base_config).items()):
        if matches_target(module, config["target_modules"]):
            a = torch.empty(config["r"], in_f, dtype=dtype)
            torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=g)
            layers[module] = (a, torch.zeros(out_f, config["r"], dtype=dtype))
    return lora_from_config(config, layers, "LoRA config")


def random_checkpoint(settings: MemGenSettings | dict, reasoner_config, weaver_config=None,
                      trigger_config=None, seed: int = 0, dtype: torch.dtype = torch.float32,
                      weaver_base: str | None = None, trigger_base: str | None = None) -> MemGenCheckpoint:
    """Build a freshly initialised checkpoint for these settings and base model
    configs (HF config dicts or PretrainedConfigs; weaver/trigger default to the
    reasoner's). Empty LoRA configs get the reference YAML's (r 16, alpha 32, q/v)."""
    if isinstance(settings, dict):
        settings = MemGenSettings(**settings)
    settings = MemGenSettings(**{**settings.to_dict(),
                                 "weaver_lora_config": dict(settings.weaver_lora_config or DEFAULT_LORA_CONFIG),
                                 "trigger_lora_config": dict(settings.trigger_lora_config or DEFAULT_LORA_CONFIG)})
    reasoner_config = _as_dict(reasoner_config)
    weaver_config = _as_dict(weaver_config) or reasoner_config
    trigger_config = _as_dict(trigger_config) or reasoner_config
    hr, hw, ht = (c["hidden_size"] for c in (reasoner_config, weaver_config, trigger_config))
    g = torch.Generator().manual_seed(seed)
    weaver = {}
    for kind in ("prompt", "inference"):
        k = getattr(settings, f"{kind}_latents_len")
        weaver[f"{kind}_query_latents"] = torch.randn(k, hw, generator=g, dtype=dtype)
        weaver[f"{kind}_latent_ln.weight"] = torch.ones(hw, dtype=dtype)
        weaver[f"{kind}_latent_ln.bias"] = torch.zeros(hw, dtype=dtype)
        weaver[f"{kind}_latent_scale"] = torch.ones(1, dtype=dtype)
    return MemGenCheckpoint(
        settings=settings,
        reasoner_config={k: v for k, v in reasoner_config.items() if k != "model_type"},
        reasoner_to_weaver=_linear(hr, hw, g, dtype),
        weaver_to_reasoner=_linear(hw, hr, g, dtype),
        weaver=weaver,
        trigger_head=_linear(ht, 2, g, dtype),
        weaver_lora=_lora(settings.weaver_lora_config, weaver_config, g, dtype),
        trigger_lora=_lora(settings.trigger_lora_config, trigger_config, g, dtype),
        weaver_base=weaver_base,
        trigger_base=trigger_base,
    )
