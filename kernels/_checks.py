"""The input checks every kernel wrapper and every torch version runs before it
computes (Triton-free: the torch versions import them on any machine)."""
from __future__ import annotations

import torch

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)   # "float": what the kernels compute in


def check_tensor(name: str, t, *, ndim: int | None = None, dtypes=None,
                 shape: tuple | None = None, last_contiguous: bool = True,
                 contiguous: bool = False) -> None:
    """Raise ValueError unless `t` is a tensor of the given rank, dtype and shape.

    `shape` entries that are None are not checked. `last_contiguous` asks for a unit
    stride in the last dimension (what the kernels' pointer arithmetic assumes).
    """
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if dtypes == "float":
        dtypes = _FLOATS
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"{name} must have dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")
    if shape is not None:
        for i, (want, got) in enumerate(zip(shape, t.shape)):
            if want is not None and want != got:
                raise ValueError(f"{name} has shape {tuple(t.shape)}, expected dim {i} == {want}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (call .contiguous())")
    if last_contiguous and t.dim() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must have unit stride in its last dimension, got strides {t.stride()}")


def check_same_device(**tensors) -> None:
    devices = {name: t.device for name, t in tensors.items() if isinstance(t, torch.Tensor)}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all tensors must be on one device: {listing}")
