"""Load HF safetensors weights into an engine-native model, packing q/k/v and
gate/up projections into their fused matrices."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from memgen.layers.linear import Linear

# HF sub-projection -> (packed module, part name)
_PACKED = {
    "q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", "gate"), "up_proj": ("gate_up_proj", "up"),
}


def load_weights(model: nn.Module, model_dir: Path) -> None:
    """Copy every tensor of `model_dir/*.safetensors` into `model` (in its dtype).
    Raises FileNotFoundError without weights, ValueError on a garbled file, an
    unknown or misshapen tensor, or a parameter the files do not provide."""
    from safetensors import safe_open
    from safetensors import SafetensorError

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {str(model_dir)!r}")
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    expected = set(params)
    loaded: set[str] = set()
    tied = getattr(model, "tie_word_embeddings", False)
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    if "rotary_emb" in name or (tied and name.startswith("lm_head.")):
                        continue
                    _load_one(name, f.get_tensor(name), params, modules, loaded, file)
        except SafetensorError as e:
            raise ValueError(f"cannot read weights file {file}: {e}") from e
    missing = expected - loaded
    if missing:
        raise ValueError(f"{model_dir}: weights missing for {sorted(missing)[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}: the checkpoint does not match its config.json")


def _load_one(name: str, tensor: torch.Tensor, params, modules, loaded: set, file: Path) -> None:
    module_name, _, kind = name.rpartition(".")             # kind: weight | bias
    parent, _, leaf = module_name.rpartition(".")
    if leaf in _PACKED:
        packed, part = _PACKED[leaf]
        target = f"{parent}.{packed}"
        module = modules.get(target)
        if module is None:
            raise ValueError(f"{file}: tensor {name!r} has no place in this model")
        param_name = f"{target}.{kind}"
        if param_name not in params:
            raise ValueError(f"{file}: tensor {name!r} has no place in this model (no {kind})")
        module.load_part(part, tensor.to(params[param_name].dtype), is_bias=kind == "bias")
        loaded.add(f"{param_name}#{part}")
        if all(f"{param_name}#{p}" in loaded for p in module.output_slices):
            loaded.add(param_name)
        return
    param = params.get(name)
    if param is None:
        raise ValueError(f"{file}: tensor {name!r} has no place in this model")
    module = modules.get(module_name)
    if isinstance(module, Linear):   # its own copy: the weight may be held in CPU panels
        try:
            module.load_part(next(iter(module.output_slices)), tensor.to(param.dtype), is_bias=kind == "bias")
        except ValueError as e:
            raise ValueError(f"{file}: tensor {name!r}: {e}") from e
        loaded.add(name)
        return
    if tuple(param.shape) != tuple(tensor.shape):
        raise ValueError(f"{file}: tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(param.shape)}")
    param.data.copy_(tensor)
    loaded.add(name)
