"""The Triton backend: the kernels of `memgen.kernels` behind the interface of
TorchSDPABackend (layers.attention): KV store + paged attention, latent
injection, multi-LoRA (adapters stacked per layer) and fused trigger scoring.

Picked by `attention_backend="triton"` (the default on CUDA). On a CPU it runs
only under `TRITON_INTERPRET=1` (tests), where it is slow but exact in fp32.
The kernels take fp16 / bf16 / fp32: a float64 engine uses the torch backend.
"""
from __future__ import annotations

import torch

from memgen.layers.context import ForwardContext

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class TritonBackend:
    name = "triton"
    fused_lora = True

    def __init__(self):
        # imported here so that a machine without Triton can still use the torch path
        from memgen.kernels import latent_injection, lora, trigger_scoring
        from memgen.kernels.kv_store import store_kvcache
        from memgen.kernels.paged_attention import paged_decode_attention, paged_prefill_attention

        self._store, self._decode, self._prefill = store_kvcache, paged_decode_attention, paged_prefill_attention
        self.inject_latents = latent_injection.inject_latents
        self.trigger_decisions = trigger_scoring.trigger_decisions
        self._lora = lora

    def prepare(self, ctx: ForwardContext) -> None:
        return None

    def forward(self, q, k, v, k_cache, v_cache, ctx: ForwardContext, scale: float) -> torch.Tensor:
        self._store(k, v, k_cache, v_cache, ctx.slot_mapping)
        q = q.contiguous()
        if ctx.max_seqlen_q == 1:   # every chunk is a single decode row
            return self._decode(q, k_cache, v_cache, ctx.block_tables, ctx.context_lens, scale)
        return self._prefill(q, k_cache, v_cache, ctx.cu_seqlens_q, ctx.context_lens, ctx.block_tables, scale,
                             max_seqlen_q=ctx.max_seqlen_q)

    def add_lora(self, y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                 scaling: torch.Tensor, ctx: ForwardContext) -> None:
        """y += each row's adapter delta, in place (y may be a column slice). The
        rows' grouping by adapter is computed once per forward and shared by all
        layers (device-only ops: CUDA-graph safe)."""
        key = ("lora_meta", lora_a.shape[0])
        meta = ctx.extras.get(key)
        if meta is None:
            meta = ctx.extras[key] = self._lora.lora_metadata(ctx.adapter_ids, lora_a.shape[0])
        self._lora.add_lora(y, x, lora_a, lora_b, scaling, ctx.adapter_ids, meta=meta)


def select_backend(name: str, device: torch.device, dtype: torch.dtype | None = None):
    """'auto' -> Triton on CUDA (torch for float64), torch SDPA on CPU; or 'torch' / 'triton'."""
    from memgen.layers.attention import TorchSDPABackend

    if name == "auto":
        name = "triton" if device.type == "cuda" and dtype in (None, *KERNEL_DTYPES) else "torch"
    if name == "torch":
        return TorchSDPABackend()
    if name == "triton":
        if dtype is not None and dtype not in KERNEL_DTYPES:
            raise ValueError(f"attention_backend='triton' runs float16, bfloat16 or float32, not "
                             f"{str(dtype).replace('torch.', '')}: use attention_backend='torch' for it")
        try:
            return TritonBackend()
        except ImportError as e:
            raise ValueError(f"attention_backend='triton' needs Triton ({e}); use attention_backend='torch'") from e
    raise ValueError(f"unknown attention_backend {name!r}: use 'auto', 'torch' or 'triton'")
