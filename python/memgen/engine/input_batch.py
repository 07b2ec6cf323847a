"""Turn a step's scheduled chunks into the flat tensors of one forward: input
ids (or embeddings), positions, and the ForwardContext (slot mapping, block
tables, context lengths, adapter id per row: layers/context.py has an example).

The integer tensors are assembled natively (`StepCore.assemble`, engine/
runtime.cpp) straight into preallocated host buffers (pinned on CUDA) and
copied to the device from there; the embedding rows (latents, the weaver's
projected tokens) are stacked here, only for chunks that have them, and the
model's first layer merges them with the token embeddings in one pass
(`inject_latents`).
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch

from memgen import _native
from memgen._native import EMBED, StepCore
from memgen.layers.context import ForwardContext


@dataclass
class ModelInput:
    input_ids: torch.Tensor                 # [N] int64 (EMBED rows hold -1)
    positions: torch.Tensor                 # [N] int64
    latents: torch.Tensor | None            # [M, H] the step's embedding rows (latents, projected tokens)
    latent_index: torch.Tensor | None       # [N] row -> index into latents, -1: a token row
    context: ForwardContext
    last_rows: torch.Tensor                 # [B] index of each chunk's last row (host), e.g. [0, 3]


class InputBuffers:
    """Host buffers the native assembly writes into; they grow on demand. On the CPU
    it hands out views, valid until the next assembly; on CUDA, non-blocking copies
    from pinned memory, which the next assembly waits for."""

    def __init__(self, device: torch.device, max_rows: int = 256, max_chunks: int = 64, max_table: int = 4096):
        self.pin = device.type == "cuda" and torch.cuda.is_available()
        self._allocate(max_rows, max_chunks, max_table)

    def _allocate(self, max_rows: int, max_chunks: int, max_table: int) -> None:
        def buf(n: int) -> torch.Tensor:
            return torch.empty(n, dtype=torch.int64, pin_memory=self.pin)

        self.input_ids, self.positions, self.slot_mapping, self.adapter_ids = (buf(max_rows) for _ in range(4))
        self.cu_seqlens_q, self.context_lens, self.last_rows = buf(max_chunks + 1), buf(max_chunks), buf(max_chunks)
        self.block_tables = buf(max_table)
        self.sizes = (max_rows, max_chunks, max_table)
        self._views_key, self._views = None, None
        self._copied = None     # CUDA event after the last host-to-device copies
        self.native = _native.InputBuffers(
            self.input_ids.data_ptr(), self.positions.data_ptr(), self.slot_mapping.data_ptr(),
            self.adapter_ids.data_ptr(), max_rows, self.cu_seqlens_q.data_ptr(), self.context_lens.data_ptr(),
            self.last_rows.data_ptr(), max_chunks, self.block_tables.data_ptr(), max_table)

    def grow(self, res) -> None:
        rows, chunks, table = self.sizes
        self._allocate(max(rows, 2 * res.num_rows), max(chunks, 2 * res.num_chunks),
                       max(table, 2 * res.num_chunks * res.max_blocks))

    def views(self, n: int, b: int, w: int, device: torch.device) -> tuple:
        """The buffers' tensors for n rows, b chunks, w blocks per table, on `device` (last_rows
        stays on the host). On the CPU the views are reused while the sizes repeat (steady
        decode): slicing costs more than the native assembly itself."""
        key = (n, b, w)
        if self._views_key != key or device.type != "cpu":
            v = (self.input_ids[:n], self.positions[:n], self.slot_mapping[:n], self.adapter_ids[:n],
                 self.cu_seqlens_q[:b + 1], self.context_lens[:b], self.block_tables[:b * w].view(b, w),
                 self.last_rows[:b])
            if device.type != "cpu":
                v = tuple(t.to(device, non_blocking=True) for t in v[:-1]) + v[-1:]
                if self.pin:
                    self._copied = torch.cuda.Event()
                    self._copied.record()
                return v
            self._views, self._views_key = v, key
        return self._views

def build_model_input(step: StepCore, pool_index: int, buffers: InputBuffers, block_size: int,
                      device: torch.device, dtype: torch.dtype, backend=None) -> ModelInput:
    """The model input for the step's chunks of one pool (-1: every chunk); its context
    complete with `backend` and the backend's metadata (made here, read-only after)."""
    if buffers._copied is not None:   # the last step's copies still read the pinned buffers
        buffers._copied.synchronize()
        buffers._copied = None
    res = step.assemble(pool_index, block_size, buffers.native)
    if not res.fits:
        buffers.grow(res)
        res = step.assemble(pool_index, block_size, buffers.native)
    n, b, w = res.num_rows, res.num_chunks, res.max_blocks
    if n == 0:
        raise ValueError("build_model_input: no chunks to run")
    input_ids, positions, slot_mapping, adapter_ids, cu_seqlens_q, context_lens, block_tables, last_rows = \
        buffers.views(n, b, w, device)

    latents = latent_index = None
    if res.has_embeds:
        latents, latent_index = _gather_embedding_rows(step, pool_index, buffers.input_ids[:n], device, dtype)

    ctx = ForwardContext(
        cu_seqlens_q=cu_seqlens_q, context_lens=context_lens, slot_mapping=slot_mapping, block_tables=block_tables,
        max_seqlen_q=res.max_seqlen_q, max_seqlen_k=res.max_seqlen_k, block_size=block_size,
        adapter_ids=adapter_ids if res.has_adapters else None, backend=backend)
    ctx.attn_metadata = None if backend is None else backend.prepare(ctx)
    return ModelInput(input_ids, positions, latents, latent_index, ctx, last_rows)


def _gather_embedding_rows(step: StepCore, pool_index: int, host_ids: torch.Tensor, device: torch.device,
                           dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's embedding rows stacked into one [M, H] buffer, and each input
    row's index into it (-1: a token row, embedded by the model). Embedding rows
    are inserted latents, the weaver's scratch queries, and every token row of a
    stream with `token_input` (one call per token_input for all of its rows)."""
    latent_index = torch.full((host_ids.shape[0],), -1, dtype=torch.int64)
    chunks, row = [], 0             # (first row, stream, first position) of this pool's chunks
    for _, stream, start, num_tokens in step.chunk_tuples():
        if pool_index < 0 or stream.pool_index == pool_index:
            chunks.append((row, stream, start, num_tokens))
            row += num_tokens
    is_embed = host_ids == EMBED
    pieces: list[torch.Tensor] = []
    embed_rows = is_embed.nonzero().squeeze(1)
    if embed_rows.numel():          # vectors stored on the streams (latents, scratch queries)
        first_rows = [c[0] for c in chunks]
        vectors = []
        for r in embed_rows.tolist():
            row0, stream, start, _ = chunks[bisect.bisect_right(first_rows, r) - 1]
            vectors.append(stream.embeds[start + r - row0])
        pieces.append(torch.stack(vectors))
        latent_index[embed_rows] = torch.arange(embed_rows.numel())
    count = embed_rows.numel()
    projected: dict = {}            # token_input fn -> ([ids tensors], [row tensors])
    for row0, stream, start, num_tokens in chunks:
        if stream.token_input is not None:
            rows = row0 + (~is_embed[row0:row0 + num_tokens]).nonzero().squeeze(1)
            if rows.numel():
                ids, where = projected.setdefault(stream.token_input, ([], []))
                ids.append(host_ids[rows])
                where.append(rows)
    for token_input, (ids, where) in projected.items():
        rows = torch.cat(where)
        pieces.append(token_input(torch.cat(ids).to(device)))
        latent_index[rows] = torch.arange(count, count + rows.numel())
        count += rows.numel()
    latents = torch.cat([x.to(dtype) for x in pieces])
    return latents, latent_index.to(device, non_blocking=True)
