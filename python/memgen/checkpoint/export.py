"""This project's export layout: every MemGen tensor in one safetensors file plus
a JSON file that also records the weaver and trigger base checkpoints.

    memgen_config.json   {"format": "memgen-export", "format_version": 1,
                          "settings": {...}, "reasoner_config": {...},
                          "weaver_base": str|null, "trigger_base": str|null,
                          "weaver_lora": <adapter config>, "trigger_lora": <adapter config>}
    memgen.safetensors   reasoner_to_weaver.{weight,bias}  weaver_to_reasoner.{weight,bias}
                         weaver.<key> (schema.WEAVER_KEYS)  trigger_head.{weight,bias}
                         weaver_lora.<module path>.lora_{A,B}  trigger_lora.<module path>.lora_{A,B}
"""
from __future__ import annotations

from pathlib import Path

from .files import (adapter_config_for_save, load_safetensors, lora_from_config, read_json,
                    save_safetensors, write_json)
from .schema import LINEAR_KEYS, SETTINGS_DEFAULTS, WEAVER_KEYS, MemGenCheckpoint, MemGenSettings

CONFIG = "memgen_config.json"
TENSORS = "memgen.safetensors"
FORMAT = "memgen-export"
FORMAT_VERSION = 1


def is_export_dir(path: Path) -> bool:
    return (path / CONFIG).is_file()


def save_export(ckpt: MemGenCheckpoint, path: str | Path) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name in ("reasoner_to_weaver", "weaver_to_reasoner", "trigger_head"):
        for k in LINEAR_KEYS:
            tensors[f"{name}.{k}"] = getattr(ckpt, name)[k]
    for k in WEAVER_KEYS:
        tensors[f"weaver.{k}"] = ckpt.weaver[k]
    for role in ("weaver_lora", "trigger_lora"):
        for module, (a, b) in getattr(ckpt, role).layers.items():
            tensors[f"{role}.{module}.lora_A"] = a
            tensors[f"{role}.{module}.lora_B"] = b
    save_safetensors(path / TENSORS, tensors)
    write_json(path / CONFIG, {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "settings": ckpt.settings.to_dict(),
        "reasoner_config": ckpt.reasoner_config,
        "weaver_base": ckpt.weaver_base,
        "trigger_base": ckpt.trigger_base,
        "weaver_lora": adapter_config_for_save(ckpt.weaver_lora),
        "trigger_lora": adapter_config_for_save(ckpt.trigger_lora),
    })
    return path


def load_export(path: Path) -> MemGenCheckpoint:
    config_path = path / CONFIG
    meta = read_json(config_path)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{config_path}: format is {meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{config_path}: format_version {meta.get('format_version')!r} is not supported "
                         f"(this memgen reads {FORMAT_VERSION})")
    for key in ("settings", "reasoner_config", "weaver_lora", "trigger_lora"):
        if not isinstance(meta.get(key), dict):
            raise ValueError(f"{config_path}: missing object {key!r}")
    unknown = set(meta["settings"]) - set(SETTINGS_DEFAULTS)
    if unknown:
        raise ValueError(f"{config_path}: unknown settings {sorted(unknown)}")
    settings = MemGenSettings(**{**SETTINGS_DEFAULTS, **meta["settings"]})

    tensors_path = path / TENSORS
    tensors = dict(load_safetensors(tensors_path))

    def take(key: str):
        if key not in tensors:
            raise ValueError(f"{tensors_path}: missing tensor {key!r}")
        return tensors.pop(key)

    linear = {name: {k: take(f"{name}.{k}") for k in LINEAR_KEYS}
              for name in ("reasoner_to_weaver", "weaver_to_reasoner", "trigger_head")}
    weaver = {k: take(f"weaver.{k}") for k in WEAVER_KEYS}
    loras = {}
    for role in ("weaver_lora", "trigger_lora"):
        prefix = role + "."
        modules = sorted({k[len(prefix):].rsplit(".", 1)[0] for k in tensors if k.startswith(prefix)})
        layers = {m: (take(f"{prefix}{m}.lora_A"), take(f"{prefix}{m}.lora_B")) for m in modules}
        loras[role] = lora_from_config(meta[role], layers, f"{config_path} ({role})")
    if tensors:
        raise ValueError(f"{tensors_path}: unexpected tensors {sorted(tensors)[:5]}")
    return MemGenCheckpoint(
        settings=settings,
        reasoner_config=meta["reasoner_config"],
        reasoner_to_weaver=linear["reasoner_to_weaver"],
        weaver_to_reasoner=linear["weaver_to_reasoner"],
        weaver=weaver,
        trigger_head=linear["trigger_head"],
        weaver_lora=loras["weaver_lora"],
        trigger_lora=loras["trigger_lora"],
        weaver_base=meta.get("weaver_base"),
        trigger_base=meta.get("trigger_base"),
    )
