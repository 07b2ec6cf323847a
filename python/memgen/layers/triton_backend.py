"""The Triton attention backend: the KV-store and paged-attention kernels of
`memgen.kernels` behind the same two-method interface as TorchSDPABackend.

Picked by `attention_backend="triton"` (the default on CUDA). On a CPU it runs
only under `TRITON_INTERPRET=1` (tests), where it is slow but exact.
"""
from __future__ import annotations

import torch

from memgen.layers.context import ForwardContext


class TritonBackend:
    name = "triton"

    def __init__(self):
        # imported here so that a machine without Triton can still use the torch path
        from memgen.kernels.kv_store import store_kvcache
        from memgen.kernels.paged_attention import paged_decode_attention, paged_prefill_attention

        self._store, self._decode, self._prefill = store_kvcache, paged_decode_attention, paged_prefill_attention

    def prepare(self, ctx: ForwardContext) -> None:
        return None

    def forward(self, q, k, v, k_cache, v_cache, ctx: ForwardContext, scale: float) -> torch.Tensor:
        self._store(k, v, k_cache, v_cache, ctx.slot_mapping)
        q = q.contiguous()
        if ctx.max_seqlen_q == 1:   # every chunk is a single decode row
            return self._decode(q, k_cache, v_cache, ctx.block_tables, ctx.context_lens, scale)
        return self._prefill(q, k_cache, v_cache, ctx.cu_seqlens_q, ctx.context_lens, ctx.block_tables, scale,
                             max_seqlen_q=ctx.max_seqlen_q)


def select_backend(name: str, device: torch.device):
    """'auto' -> Triton on CUDA, torch SDPA on CPU; or 'torch' / 'triton'."""
    from memgen.layers.attention import TorchSDPABackend

    if name == "auto":
        name = "triton" if device.type == "cuda" else "torch"
    if name == "torch":
        return TorchSDPABackend()
    if name == "triton":
        try:
            return TritonBackend()
        except ImportError as e:
            raise ValueError(f"attention_backend='triton' needs Triton ({e}); use attention_backend='torch'") from e
    raise ValueError(f"unknown attention_backend {name!r}: use 'auto', 'torch' or 'triton'")
