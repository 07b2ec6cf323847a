"""All torch reference implementations in one import, for the engine's torch
backend (CPU) and for tests; each has the signature of its Triton wrapper. Also
the one torch-only helper: the weaver's folded query latents.

Importing this module never launches Triton (the kernel modules only decorate).
"""
from __future__ import annotations

import torch

from .kv_store import store_kvcache_ref
from .latent_injection import inject_latents_ref
from .lora import add_lora_ref, lora_expand_ref, lora_metadata, lora_shrink_ref
from .paged_attention import paged_decode_attention_ref, paged_prefill_attention_ref
from .trigger_scoring import trigger_decisions_ref

__all__ = ["store_kvcache_ref", "inject_latents_ref", "add_lora_ref", "lora_shrink_ref", "lora_expand_ref",
           "lora_metadata", "paged_prefill_attention_ref", "paged_decode_attention_ref",
           "trigger_decisions_ref", "fold_query_latents"]


def fold_query_latents(query_latents: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor,
                       scale: torch.Tensor | float, eps: float = 1e-5) -> torch.Tensor:
    """`LayerNorm(query_latents) * scale` (spec §1.1, weaver.py:52-94): input-independent,
    so it is computed once at load instead of a kernel per insertion. Computed in the
    latents' dtype, exactly as the reference module does."""
    if query_latents.dim() != 2:
        raise ValueError(f"query_latents must be [K, H], got shape {tuple(query_latents.shape)}")
    hidden = query_latents.shape[1]
    if ln_weight.shape != (hidden,) or ln_bias.shape != (hidden,):
        raise ValueError(f"LayerNorm weight/bias must be [{hidden}], got {tuple(ln_weight.shape)} "
                         f"and {tuple(ln_bias.shape)}")
    normed = torch.nn.functional.layer_norm(query_latents, (hidden,), ln_weight, ln_bias, eps)
    return normed * scale
