"""Safe low-level readers and writers shared by both checkpoint layouts: JSON,
tensor pickles (weights_only, nothing in them ever runs), safetensors, and the
PEFT LoRA adapter folder format."""
from __future__ import annotations

import errno
import json
import pickle
import re
from pathlib import Path

import torch
from torch import Tensor

from .schema import LoraWeights

# PEFT's saved key for a LoRA Linear: the adapter name is stripped on save.
_PEFT_KEY = re.compile(r"^base_model\.model\.(?P<path>.+)\.lora_(?P<ab>[AB])\.weight$")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_WEIGHTS_BIN = "adapter_model.bin"


def missing(path: Path, what: str = "missing MemGen checkpoint file") -> FileNotFoundError:
    return FileNotFoundError(errno.ENOENT, what, str(path))


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise missing(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def load_tensor_pickle(path: Path):
    """torch.load with weights_only=True: tensors and plain containers only.
    A pickle that asks for anything else is refused before any of it runs."""
    if not path.is_file():
        raise missing(path)
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower():
            # keep torch's diagnosis (e.g. "Unsupported global: GLOBAL builtins.print"),
            # not its advice to retry with weights_only=False
            why = [ln.strip() for ln in str(e).splitlines() if "Unsupported" in ln or "GLOBAL" in ln]
            raise ValueError(
                f"{path}: refused to load: the pickle holds objects other than tensors and plain "
                f"containers (read with weights_only=True; nothing in it was run). {' '.join(why[:1]).split('. Please')[0]}"
            ) from None
        raise ValueError(f"{path}: not a readable torch checkpoint (UnpicklingError: {e})") from None
    except Exception as e:  # zip/stream errors, truncated files, ...
        raise ValueError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: {e})") from None


def load_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise missing(path)
    try:
        return load_file(str(path), device="cpu")
    except Exception as e:
        raise ValueError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None


def save_safetensors(path: Path, tensors: dict[str, Tensor]) -> None:
    from safetensors.torch import save_file

    # clone: safetensors refuses shared or non-contiguous storage
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, str(path),
              metadata={"format": "pt"})


def get_tensor(d, key: str, path: Path) -> Tensor:
    """d[key] as a Tensor, or a ValueError naming the file and the key."""
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a dict, got {type(d).__name__}")
    if key not in d:
        raise ValueError(f"{path}: missing entry {key!r} (found {sorted(map(str, d))})")
    t = d[key]
    if not isinstance(t, Tensor):
        raise ValueError(f"{path}: entry {key!r} is a {type(t).__name__}, expected a tensor")
    return t


def get_dict(d, key: str, path: Path) -> dict:
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a dict, got {type(d).__name__}")
    if key not in d or not isinstance(d[key], dict):
        raise ValueError(f"{path}: missing dict entry {key!r} (found {sorted(map(str, d))})")
    return d[key]


# ---------------------------------------------------------------- LoRA adapters

# adapter_config fields the engine does not implement; each must be falsy
# (False, None, {} or []) in a supported adapter
_UNSUPPORTED = ("use_dora", "rank_pattern", "alpha_pattern", "layers_to_transform", "modules_to_save")


def lora_from_config(cfg: dict, layers: dict, where: str) -> LoraWeights:
    """LoraWeights from a PEFT LoRA config dict; refuse features the engine
    does not implement (DoRA, per-layer ranks, trained biases, extra modules)."""
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{where}: peft_type {cfg.get('peft_type')!r} is not supported, expected 'LORA'")
    for key in _UNSUPPORTED:
        if cfg.get(key):
            raise ValueError(f"{where}: {key}={cfg[key]!r} is not supported (leave it unset)")
    if cfg.get("bias", "none") != "none":
        raise ValueError(f"{where}: bias={cfg['bias']!r} is not supported (expected 'none')")
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in cfg:
            raise ValueError(f"{where}: missing field {key!r}")
    targets = cfg["target_modules"]
    if not isinstance(targets, str):
        targets = sorted(targets)
    return LoraWeights(r=cfg["r"], alpha=cfg["lora_alpha"], target_modules=targets, layers=layers,
                       use_rslora=bool(cfg.get("use_rslora", False)), config=dict(cfg))


def load_peft_adapter(folder: Path) -> LoraWeights:
    """Read a PEFT adapter folder (adapter_config.json + adapter_model.safetensors,
    or adapter_model.bin) into LoraWeights keyed by base module path."""
    cfg_path = folder / ADAPTER_CONFIG
    cfg = read_json(cfg_path)
    weights_path = folder / ADAPTER_WEIGHTS
    if weights_path.is_file() or not (folder / ADAPTER_WEIGHTS_BIN).is_file():
        tensors = load_safetensors(weights_path)
    else:
        weights_path = folder / ADAPTER_WEIGHTS_BIN
        tensors = load_tensor_pickle(weights_path)
        if not isinstance(tensors, dict):
            raise ValueError(f"{weights_path}: expected a dict of tensors")
    halves: dict[str, dict[str, Tensor]] = {}
    for key, t in tensors.items():
        m = _PEFT_KEY.match(str(key))
        if m is None or not isinstance(t, Tensor):
            raise ValueError(f"{weights_path}: unexpected entry {key!r}; expected only "
                             "'base_model.model.<module>.lora_A.weight' / '.lora_B.weight'")
        halves.setdefault(m["path"], {})[m["ab"]] = t
    layers = {}
    for path, ab in sorted(halves.items()):
        if set(ab) != {"A", "B"}:
            lacking = "B" if "A" in ab else "A"
            raise ValueError(f"{weights_path}: {path} has no lora_{lacking}.weight")
        layers[path] = (ab["A"], ab["B"])
    return lora_from_config(cfg, layers, str(cfg_path))


def adapter_config_for_save(lora: LoraWeights) -> dict:
    """The adapter_config.json to write: the stored config with the fields the
    LoraWeights own made authoritative."""
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "lora_dropout": 0.0, "bias": "none",
           "inference_mode": True}
    cfg.update(lora.config)
    cfg.update(r=lora.r, lora_alpha=lora.alpha, use_rslora=lora.use_rslora,
               target_modules=lora.target_modules if isinstance(lora.target_modules, str)
               else sorted(lora.target_modules))
    return cfg


def save_peft_adapter(lora: LoraWeights, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / ADAPTER_CONFIG, adapter_config_for_save(lora))
    tensors = {}
    for path, (a, b) in lora.layers.items():
        tensors[f"base_model.model.{path}.lora_A.weight"] = a
        tensors[f"base_model.model.{path}.lora_B.weight"] = b
    save_safetensors(folder / ADAPTER_WEIGHTS, tensors)
