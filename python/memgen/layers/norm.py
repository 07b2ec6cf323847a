"""RMSNorm as the HF Qwen2/Qwen3/Llama implementations compute it (in float32,
whatever the model dtype, so that float64 parity runs match HF), optionally
fused with the residual add before it (vLLM's fused_add_rms_norm)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from memgen.layers import native


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """norm(x); with `residual`, (norm(residual + x), residual + x): the sum is the
        next residual (written into `residual` in place on the native path)."""
        if native.rms_norm_cpu is not None and x.dim() == 2 \
                and native.fused_ok(x, self.weight, *(() if residual is None else (residual,))):
            out = torch.empty_like(x)
            native.rms_norm_cpu(x.data_ptr(), 0 if residual is None else residual.data_ptr(),
                                self.weight.data_ptr(), out.data_ptr(), x.shape[0], x.shape[1], self.eps,
                                native.FUSED_DTYPE_CODES[x.dtype])
            return out if residual is None else (out, residual)
        if residual is None:
            return self._norm(x)
        residual = residual + x
        return self._norm(residual), residual

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.to(torch.float32)
        if dtype == torch.float64:   # HF's own ops, one by one: float64 parity runs match it bit for bit
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        else:                        # one fused op (the same math in float32, fewer dispatches)
            h = F.rms_norm(h, (h.shape[-1],), eps=self.eps)
        return self.weight * h.to(dtype)
