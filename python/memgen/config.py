"""Engine configuration: one dataclass, plus the checks and the resolution of
"auto" dtype/device. Imported by anyone; imports nothing of memgen."""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "float16": torch.float16, "fp32": torch.float32, "fp64": torch.float64,
          "bf16": torch.bfloat16, "fp16": torch.float16, "half": torch.float16, "float": torch.float32,
          "double": torch.float64}


@dataclass(slots=True)
class EngineConfig:
    max_num_seqs: int = 32
    max_model_len: int | None = None          # None -> min(model's max positions, 4096)
    max_num_batched_tokens: int = 4096        # token budget per step (chunked prefill above it)
    block_size: int = 16
    num_kv_blocks: int | None = None          # explicit KV pool size in blocks
    kv_cache_memory_gb: float | None = None   # or a memory budget; None -> max_model_len x max_num_seqs
    enable_prefix_caching: bool = True
    enforce_eager: bool = False               # True: no CUDA graphs (they apply on CUDA + Triton only)
    # MemGen's weaver/trigger streams: True = lazy (catch up in one chunk when needed), False =
    # follow the reasoner step by step while insertions remain (decode-shaped steps for CUDA
    # graphs); None -> lazy on CPU, follow on CUDA. Same outputs either way.
    lazy_memgen_streams: bool | None = None
    attention_backend: str = "auto"          # "auto" (Triton on CUDA, torch SDPA on CPU) | "torch" | "triton"
    seed: int = 0

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in fields(cls)}

    def validate(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size"):
            _check_positive_int(name, getattr(self, name))
        for name in ("max_model_len", "num_kv_blocks"):
            if getattr(self, name) is not None:
                _check_positive_int(name, getattr(self, name))
        if self.kv_cache_memory_gb is not None:
            v = self.kv_cache_memory_gb
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"kv_cache_memory_gb must be a positive number of GiB, got {v!r}")
        if self.attention_backend not in ("auto", "torch", "triton"):
            raise ValueError(f"unknown attention_backend {self.attention_backend!r}: use 'auto', 'torch' or 'triton'")
        if self.lazy_memgen_streams not in (None, True, False):
            raise TypeError(f"lazy_memgen_streams must be None, True or False, got {self.lazy_memgen_streams!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"seed must be an int, got {type(self.seed).__name__}")


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


def resolve_device(device: str | torch.device) -> torch.device:
    """'auto' -> cuda if available else cpu; 'cpu', 'cuda', 'cuda:N'."""
    if isinstance(device, torch.device):
        device = str(device)
    if not isinstance(device, str):
        raise TypeError(f"device must be a string like 'auto', 'cpu', 'cuda' or 'cuda:0', got {type(device).__name__}")
    name = device.strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit()):
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {device!r} was requested but CUDA is not available on this machine; "
                               "use device='cpu' (or 'auto')")
        index = int(name[5:]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} does not exist: this machine has {torch.cuda.device_count()} "
                             "CUDA device(s)")
        return torch.device("cuda", index)
    raise ValueError(f"unknown device {device!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N'")


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """'auto' -> float32 on CPU, bfloat16 on CUDA; or a name from DTYPES."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype {dtype} is not supported: use one of float32, float64, bfloat16, float16")
        return dtype
    if not isinstance(dtype, str):
        raise TypeError(f"dtype must be a string like 'auto' or 'float32', got {type(dtype).__name__}")
    name = dtype.strip().lower().removeprefix("torch.")
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: use 'auto', 'float32', 'float64', 'bfloat16' or 'float16'")
    return DTYPES[name]
