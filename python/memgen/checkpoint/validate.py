"""Shape and range checks for a MemGenCheckpoint, alone and against the base
models' configs; also the base models' Linear shapes, which LoRA needs."""
from __future__ import annotations

import json
import re
from functools import lru_cache

import torch

from .schema import MemGenCheckpoint

_COUNTS = ("prompt_latents_len", "inference_latents_len", "max_prompt_aug_num", "max_inference_aug_num")


def _as_dict(config) -> dict:
    if config is None or isinstance(config, dict):
        return config
    return config.to_dict()  # a transformers PretrainedConfig


@lru_cache(maxsize=16)
def _linear_shapes(config_json: str) -> dict[str, tuple[int, int]]:
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = json.loads(config_json)
    model_type = cfg.pop("model_type", None)
    if not model_type:
        raise ValueError("base model config has no model_type")
    try:
        config = AutoConfig.for_model(model_type, **cfg)
    except Exception as e:
        raise ValueError(f"cannot interpret a base model config of model_type {model_type!r}: {e}") from None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {name: (m.in_features, m.out_features)
            for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def base_linear_shapes(config) -> dict[str, tuple[int, int]]:
    """Every nn.Linear of the causal LM that `config` describes: module path ->
    (in_features, out_features). Computed from the config for the families
    memgen.model_config reads (no transformers import at startup), else built by
    transformers on the meta device (no memory, no weights)."""
    from memgen.model_config import hf_linear_shapes

    config = _as_dict(config)
    shapes = hf_linear_shapes(config)
    if shapes is not None:
        return shapes
    return dict(_linear_shapes(json.dumps(config, sort_keys=True, default=str)))


def matches_target(module_path: str, target_modules) -> bool:
    """PEFT's rule: a string is a full regex; a list matches a module whose path
    equals an entry or ends with '.' + entry."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, module_path) is not None
    return any(module_path == t or module_path.endswith("." + t) for t in target_modules)


def _shape(t) -> list[int]:
    return list(t.shape)


def _check_internal(ckpt: MemGenCheckpoint, errors: list[str]) -> tuple[int, int, int]:
    """Checks that need no base model; returns (Hr, Hw, Ht) as the tensors imply."""
    s = ckpt.settings
    for name in _COUNTS:
        v = getattr(s, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            errors.append(f"settings.{name} must be an integer >= 0, got {v!r}")
    if not isinstance(s.trigger_active, bool):
        errors.append(f"settings.trigger_active must be true or false, got {s.trigger_active!r}")
    for group in ("reasoner_to_weaver", "weaver_to_reasoner", "trigger_head", "weaver"):
        for k, t in getattr(ckpt, group).items():
            if not t.is_floating_point():
                errors.append(f"{group}.{k} has dtype {t.dtype}, expected a floating dtype")
    w = ckpt.weaver
    hw = w["prompt_latent_ln.weight"].shape[-1] if w["prompt_latent_ln.weight"].dim() else 0
    r2w, w2r, head = ckpt.reasoner_to_weaver, ckpt.weaver_to_reasoner, ckpt.trigger_head
    # Hr: the recorded reasoner config, else the width weaver_to_reasoner outputs
    hr = ckpt.reasoner_config.get("hidden_size") or (w2r["bias"].shape[0] if w2r["bias"].dim() == 1 else 0)
    ht = head["weight"].shape[1] if head["weight"].dim() == 2 else 0
    for kind in ("prompt", "inference"):
        k = getattr(s, f"{kind}_latents_len")
        want = {f"{kind}_query_latents": [k, hw], f"{kind}_latent_ln.weight": [hw],
                f"{kind}_latent_ln.bias": [hw], f"{kind}_latent_scale": [1]}
        for key, shape in want.items():
            if _shape(w[key]) != shape:
                errors.append(f"weaver.{key}: expected shape {shape}, got {_shape(w[key])}"
                              + (f" ({kind}_latents_len={k})" if "query" in key else ""))
    for name, d, out_f, in_f in (("reasoner_to_weaver", r2w, hw, hr), ("weaver_to_reasoner", w2r, hr, hw),
                                 ("trigger_head", head, 2, ht)):
        if _shape(d["weight"]) != [out_f, in_f]:
            errors.append(f"{name}.weight: expected shape {[out_f, in_f]}, got {_shape(d['weight'])}")
        if _shape(d["bias"]) != [out_f]:
            errors.append(f"{name}.bias: expected shape {[out_f]}, got {_shape(d['bias'])}")
    for role in ("weaver", "trigger"):
        lora = getattr(ckpt, f"{role}_lora")
        where = f"{role} LoRA"
        if isinstance(lora.r, bool) or not isinstance(lora.r, int) or lora.r <= 0:
            errors.append(f"{where}: r must be an integer > 0, got {lora.r!r}")
            continue
        for module, (a, b) in lora.layers.items():
            if a.dim() != 2 or b.dim() != 2 or a.shape[0] != lora.r or b.shape[1] != lora.r:
                errors.append(f"{where} {module}: expected A [r={lora.r}, in] and B [out, r={lora.r}], "
                              f"got A {_shape(a)} and B {_shape(b)}")
        declared = getattr(s, f"{role}_lora_config") or {}
        for key, mine in (("r", lora.r), ("lora_alpha", lora.alpha)):
            if key in declared and declared[key] != mine:
                errors.append(f"{where}: config.json {role}_lora_config.{key}={declared[key]!r} but the "
                              f"adapter has {key}={mine!r}")
        if "target_modules" in declared and not isinstance(declared["target_modules"], str) \
                and not isinstance(lora.target_modules, str) \
                and sorted(declared["target_modules"]) != sorted(lora.target_modules):
            errors.append(f"{where}: config.json {role}_lora_config.target_modules="
                          f"{sorted(declared['target_modules'])} but the adapter targets "
                          f"{sorted(lora.target_modules)}")
    return hr, hw, ht


def _check_lora_against_base(lora, base: dict[str, tuple[int, int]], where: str, errors: list[str]) -> None:
    is_regex = isinstance(lora.target_modules, str)
    for t in [lora.target_modules] if is_regex else lora.target_modules:
        if not any(matches_target(p, t if is_regex else [t]) for p in base):
            errors.append(f"{where}: target module {t!r} matches no Linear of the base model")
    expected = {p for p in base if matches_target(p, lora.target_modules)}
    for module, (a, b) in lora.layers.items():
        if module not in base:
            errors.append(f"{where}: {module} is not a Linear of the base model")
            continue
        in_f, out_f = base[module]
        if _shape(a) != [lora.r, in_f] or _shape(b) != [out_f, lora.r]:
            errors.append(f"{where} {module}: expected A {[lora.r, in_f]} and B {[out_f, lora.r]} "
                          f"(base in/out features {in_f}/{out_f}), got A {_shape(a)} and B {_shape(b)}")
    lacking = sorted(expected - set(lora.layers))
    if lacking:
        errors.append(f"{where}: no weights for {len(lacking)} targeted base modules, e.g. {lacking[0]}")


def validate(ckpt: MemGenCheckpoint, reasoner_config=None, weaver_config=None, trigger_config=None) -> None:
    """Raise ValueError listing every problem found. Without base configs only
    the checkpoint's own consistency is checked; each base config given (an HF
    config dict or PretrainedConfig) adds the width and LoRA checks for its role."""
    errors: list[str] = []
    hr, hw, ht = _check_internal(ckpt, errors)
    for role, config, width in (("reasoner", reasoner_config, hr), ("weaver", weaver_config, hw),
                                ("trigger", trigger_config, ht)):
        config = _as_dict(config)
        if config is None:
            continue
        hidden = config.get("hidden_size")
        if hidden != width:
            what = {"reasoner": "reasoner_to_weaver.weight columns / weaver_to_reasoner.weight rows",
                    "weaver": "the weaver tensors' width (query latents, LayerNorm, projections)",
                    "trigger": "trigger_head.weight columns"}[role]
            errors.append(f"{role} base hidden_size is {hidden}, but {what} is {width}")
        if role == "reasoner":
            recorded = ckpt.reasoner_config.get("hidden_size")
            if recorded is not None and recorded != hidden:
                errors.append(f"reasoner base hidden_size is {hidden}, but the checkpoint's config "
                              f"records hidden_size={recorded}")
            continue
        try:
            shapes = base_linear_shapes(config)
        except ValueError as e:
            errors.append(f"{role} base: {e}")
            continue
        _check_lora_against_base(getattr(ckpt, f"{role}_lora"), shapes, f"{role} LoRA", errors)
    if errors:
        raise ValueError("invalid MemGen checkpoint:\n  - " + "\n  - ".join(errors))


__all__ = ["validate", "base_linear_shapes", "matches_target"]
