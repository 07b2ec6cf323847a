"""Per-forward metadata for the layers (attention, LoRA), set by the model runner
around one forward, so that model code never imports the engine.

Words follow flash-attn / nano-vllm. A batch is a flat list of N rows grouped
into B *chunks* (one chunk = consecutive new positions of one stream of one
sequence). Running example, block_size 4, two chunks:
  chunk 0: a decode step at position 6        -> q_len 1, context_len 7
  chunk 1: a prefill chunk of positions 0..2  -> q_len 3, context_len 3
  positions    = [6, 0, 1, 2]   (rows: chunk 0's, then chunk 1's)
  cu_seqlens_q = [0, 1, 4]     context_lens = [7, 3]
  block_tables = [[5, 2], [7, -1]]   (-1 pads)
  slot_mapping = [2*4+2, 7*4+0, 7*4+1, 7*4+2] = [10, 28, 29, 30]
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class ForwardContext:
    cu_seqlens_q: torch.Tensor      # [B+1] int64, row offsets of the chunks
    context_lens: torch.Tensor      # [B] int64, keys each chunk attends to (cached + new)
    slot_mapping: torch.Tensor      # [N] int64, KV slot of every row (-1: do not store)
    block_tables: torch.Tensor      # [B, max_blocks] int64, -1 padded
    max_seqlen_q: int
    max_seqlen_k: int
    block_size: int
    # per-row LoRA adapter index (-1: none); read by LoRA hooks in layers.linear
    adapter_ids: torch.Tensor | None = None
    # the kernel backend of this forward (layers.backend):
    # attention, latent injection and multi-LoRA all go through it
    backend: Any = None
    # backend-specific tensors prepared once per forward (e.g. gather indices, masks)
    attn_metadata: Any = None
    # LoRA row grouping, computed once per forward and shared by every layer: adapter
    # count -> kernels.reference.LoraMeta (Triton) or each adapter's rows (torch)
    lora_meta: dict[int, Any] = field(default_factory=dict)

    @property
    def num_chunks(self) -> int:
        return self.context_lens.shape[0]


_CONTEXT: ForwardContext | None = None


def get_context() -> ForwardContext:
    if _CONTEXT is None:
        raise RuntimeError("no forward context is set: model forwards run inside ModelRunner.forward")
    return _CONTEXT


class forward_context:
    """`with forward_context(ctx): model(...)` sets the context for one forward."""

    def __init__(self, ctx: ForwardContext):
        self.ctx = ctx

    def __enter__(self) -> ForwardContext:
        global _CONTEXT
        _CONTEXT = self.ctx
        return self.ctx

    def __exit__(self, *exc) -> None:
        global _CONTEXT
        _CONTEXT = None
