"""Paged attention: the `Attention` layer stores this forward's K/V into its
paged cache and attends over each chunk's cached context, through the forward's
backend (layers/backend.py)."""
from __future__ import annotations

import torch
from torch import nn

from memgen.layers.context import get_context


class Attention(nn.Module):
    """Causal self-attention over the paged cache. The model runner binds the
    cache tensors and the backend (`bind`) before the first forward."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim, self.scale = num_heads, num_kv_heads, head_dim, scale
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None
        self.backend = None

    def bind(self, k_cache: torch.Tensor, v_cache: torch.Tensor, backend) -> None:
        self.k_cache, self.v_cache, self.backend = k_cache, v_cache, backend

    def fuses_rope(self, x: torch.Tensor) -> bool:
        """Whether the backend rotates q and k itself (forward's `rope`) for inputs like x."""
        fuses = getattr(self.backend, "fuses_rope", None)
        return fuses is not None and fuses(x)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """rope=(cos, sin): q and k are unrotated, the backend rotates them (only where
        fuses_rope(q))."""
        if self.backend is None:
            raise RuntimeError("attention has no KV cache bound: run the model through ModelRunner")
        if rope is not None:
            return self.backend.attend_rotating(q, k, v, self.k_cache, self.v_cache, get_context(), self.scale, *rope)
        return self.backend.forward(q, k, v, self.k_cache, self.v_cache, get_context(), self.scale)
