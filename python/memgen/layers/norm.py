"""RMSNorm as the HF Qwen2/Qwen3/Llama implementations compute it (in float32,
whatever the model dtype, so that float64 parity runs match HF), optionally
fused with the residual add before it (vLLM's fused_add_rms_norm)."""
from __future__ import annotations

import torch
from torch import nn

from memgen.layers.backend import layer_ops


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """norm(x), or (norm(residual + x), residual + x): the forward's LayerOps.rms_norm."""
        return layer_ops().rms_norm(x, self.weight, self.eps, residual)
