"""The reference implementation's `save_pretrained` layout (spec §3.5):

    config.json   reasoner config fields + MemGen fields, model_type "memgen"
    projs.bin     {"reasoner_to_weaver": {weight, bias}, "weaver_to_reasoner": {weight, bias}}
    weaver.bin    {"prompt_query_latents", "inference_query_latents",
                   "prompt_latent_ln": {weight, bias}, "inference_latent_ln": {weight, bias},
                   "prompt_latent_scale", "inference_latent_scale"}
    trigger.bin   {"output_layer": {weight, bias}}
    weaver/weaver/   and  trigger/trigger/   PEFT adapters
                  (adapter_config.json + adapter_model.safetensors; README.md one level up)

The .bin files are pickles: read with torch.load(weights_only=True) only.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .files import (get_dict, get_tensor, load_peft_adapter, load_tensor_pickle, read_json,
                    save_peft_adapter, write_json)
from .schema import LINEAR_KEYS, SETTINGS_DEFAULTS, MemGenCheckpoint, MemGenSettings

CONFIG = "config.json"
PROJS = "projs.bin"
WEAVER = "weaver.bin"
TRIGGER = "trigger.bin"
_LN = ("prompt_latent_ln", "inference_latent_ln")
_PLAIN = ("prompt_query_latents", "inference_query_latents", "prompt_latent_scale",
          "inference_latent_scale")


def is_reference_dir(path: Path) -> bool:
    return (path / CONFIG).is_file() and (path / PROJS).exists()


def settings_from_config(config: dict, where: str) -> MemGenSettings:
    values = {}
    for key, default in SETTINGS_DEFAULTS.items():
        value = config.get(key, default)
        if key.endswith("lora_config") and not isinstance(value, dict):
            raise ValueError(f"{where}: {key} must be a LoRA config object, got {value!r}")
        values[key] = value
    return MemGenSettings(**values)


def load_reference(path: Path) -> MemGenCheckpoint:
    config_path = path / CONFIG
    config = read_json(config_path)
    if config.get("model_type") != "memgen":
        raise ValueError(f"{config_path}: model_type is {config.get('model_type')!r}, expected 'memgen' "
                         "(is this a plain model directory rather than a MemGen checkpoint?)")
    settings = settings_from_config(config, str(config_path))
    reasoner_config = {k: v for k, v in config.items() if k not in SETTINGS_DEFAULTS and k != "model_type"}

    projs_path = path / PROJS
    projs = load_tensor_pickle(projs_path)
    proj = {}
    for name in ("reasoner_to_weaver", "weaver_to_reasoner"):
        d = get_dict(projs, name, projs_path)
        proj[name] = {k: get_tensor(d, k, projs_path) for k in LINEAR_KEYS}

    weaver_path = path / WEAVER
    wstate = load_tensor_pickle(weaver_path)
    weaver = {k: get_tensor(wstate, k, weaver_path) for k in _PLAIN}
    for ln in _LN:
        d = get_dict(wstate, ln, weaver_path)
        for k in LINEAR_KEYS:
            weaver[f"{ln}.{k}"] = get_tensor(d, k, weaver_path)

    trigger_path = path / TRIGGER
    tstate = load_tensor_pickle(trigger_path)
    head_d = get_dict(tstate, "output_layer", trigger_path)
    head = {k: get_tensor(head_d, k, trigger_path) for k in LINEAR_KEYS}

    return MemGenCheckpoint(
        settings=settings,
        reasoner_config=reasoner_config,
        reasoner_to_weaver=proj["reasoner_to_weaver"],
        weaver_to_reasoner=proj["weaver_to_reasoner"],
        weaver=weaver,
        trigger_head=head,
        weaver_lora=load_peft_adapter(path / "weaver" / "weaver"),
        trigger_lora=load_peft_adapter(path / "trigger" / "trigger"),
    )


def _t(x: torch.Tensor) -> torch.Tensor:
    return x.detach().cpu().clone()


def save_reference(ckpt: MemGenCheckpoint, path: str | Path) -> Path:
    """Write `ckpt` in the reference layout; the recorded weaver/trigger bases
    are not part of that layout and are dropped (use save_export to keep them)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = dict(ckpt.reasoner_config)
    config.update(ckpt.settings.to_dict())
    config["model_type"] = "memgen"
    write_json(path / CONFIG, config)
    torch.save({name: {k: _t(d[k]) for k in LINEAR_KEYS}
                for name, d in (("reasoner_to_weaver", ckpt.reasoner_to_weaver),
                                ("weaver_to_reasoner", ckpt.weaver_to_reasoner))}, path / PROJS)
    wstate: dict = {k: _t(ckpt.weaver[k]) for k in _PLAIN}
    for ln in _LN:
        wstate[ln] = {k: _t(ckpt.weaver[f"{ln}.{k}"]) for k in LINEAR_KEYS}
    torch.save(wstate, path / WEAVER)
    torch.save({"output_layer": {k: _t(ckpt.trigger_head[k]) for k in LINEAR_KEYS}}, path / TRIGGER)
    for role, lora in (("weaver", ckpt.weaver_lora), ("trigger", ckpt.trigger_lora)):
        save_peft_adapter(lora, path / role / role)
        (path / role / "README.md").write_text(
            f"# MemGen {role} LoRA adapter\n\nPEFT adapter named `{role}`, in `{role}/`.\n", encoding="utf-8")
    return path
