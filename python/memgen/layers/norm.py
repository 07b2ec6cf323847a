"""RMSNorm as the HF Qwen2/Qwen3/Llama implementations compute it (in float32,
whatever the model dtype, so that float64 parity runs match HF)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.to(torch.float32)
        if dtype == torch.float64:   # HF's own ops, one by one: float64 parity runs match it bit for bit
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        else:                        # one fused op (the same math in float32, fewer dispatches)
            h = F.rms_norm(h, (h.shape[-1],), eps=self.eps)
        return self.weight * h.to(dtype)
