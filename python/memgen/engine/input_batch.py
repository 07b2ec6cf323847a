"""Turn a step's scheduled chunks into the flat tensors of one forward: input
ids (or embeddings), positions, and the ForwardContext (slot mapping, block
tables, context lengths).

Example, block_size 4: chunk A = positions 6..6 of a stream with blocks [5, 2],
chunk B = positions 0..2 of a stream with blocks [7]:
  input rows   [A6, B0, B1, B2]     positions [6, 0, 1, 2]
  cu_seqlens_q [0, 1, 4]            context_lens [7, 3]
  slot_mapping [2*4+2, 7*4+0, 7*4+1, 7*4+2]
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from memgen.engine.scheduler import ScheduledChunk
from memgen.engine.sequence import EMBED
from memgen.layers.context import ForwardContext


@dataclass
class ModelInput:
    input_ids: torch.Tensor                 # [N] int64 (EMBED rows hold -1)
    positions: torch.Tensor                 # [N] int64
    inputs_embeds: torch.Tensor | None      # [N, H] when some rows are embeddings
    is_token: torch.Tensor | None           # [N] bool when some rows are embeddings
    context: ForwardContext
    last_rows: list[int]                    # index of each chunk's last row


def build_model_input(chunks: list[ScheduledChunk], block_size: int, hidden_size: int,
                      device: torch.device, dtype: torch.dtype) -> ModelInput:
    ids: list[int] = []
    starts, q_lens, tables = [], [], []
    has_embeds = False
    for c in chunks:
        ids += c.stream.token_ids[c.start:c.end]
        starts.append(c.start)
        q_lens.append(c.num_tokens)
        tables.append(c.stream.block_table)
        has_embeds = has_embeds or bool(c.stream.embeds)
    max_blocks = max(len(t) for t in tables)
    block_tables = torch.tensor([t + [-1] * (max_blocks - len(t)) for t in tables], dtype=torch.int64)
    q_lens_t = torch.tensor(q_lens, dtype=torch.int64)
    starts_t = torch.tensor(starts, dtype=torch.int64)
    cu_seqlens_q = torch.zeros(len(chunks) + 1, dtype=torch.int64)
    torch.cumsum(q_lens_t, 0, out=cu_seqlens_q[1:])
    context_lens = starts_t + q_lens_t
    num_rows = len(ids)
    # positions: row r of chunk b sits at starts[b] + (r - cu_seqlens_q[b])
    chunk_of_row = torch.repeat_interleave(torch.arange(len(chunks)), q_lens_t)
    positions = torch.arange(num_rows) + (starts_t - cu_seqlens_q[:-1]).repeat_interleave(q_lens_t)
    blocks = block_tables[chunk_of_row, positions // block_size]
    slot_mapping = blocks * block_size + positions % block_size

    input_ids = torch.tensor(ids, dtype=torch.int64)
    inputs_embeds = is_token = None
    projected = [c for c in chunks if c.stream.token_input is not None]
    if has_embeds or projected:
        is_token = input_ids != EMBED
        inputs_embeds = torch.zeros(num_rows, hidden_size, dtype=dtype, device=device)
        row = 0
        for c in chunks:
            stream = c.stream
            if stream.token_input is not None:
                # every row of this chunk is an embedding: project its token rows
                chunk_ids = input_ids[row:row + c.num_tokens]
                token_rows = (chunk_ids != EMBED).nonzero().squeeze(1)
                if token_rows.numel():
                    inputs_embeds[row + token_rows] = stream.token_input(
                        chunk_ids[token_rows].to(device)).to(dtype)
                is_token[row:row + c.num_tokens] = False
            if stream.embeds:
                for p in range(c.start, c.end):
                    if stream.token_ids[p] == EMBED:
                        inputs_embeds[row + p - c.start] = stream.embeds[p]
            row += c.num_tokens
        is_token = is_token.to(device, non_blocking=True)

    adapter_ids = None
    if any(c.stream.adapter_id >= 0 for c in chunks):
        adapter_ids = torch.tensor([c.stream.adapter_id for c in chunks], dtype=torch.int64)
        adapter_ids = adapter_ids.repeat_interleave(q_lens_t).to(device, non_blocking=True)

    def dev(t: torch.Tensor) -> torch.Tensor:
        return t.to(device, non_blocking=True)

    ctx = ForwardContext(
        cu_seqlens_q=dev(cu_seqlens_q), context_lens=dev(context_lens), slot_mapping=dev(slot_mapping),
        block_tables=dev(block_tables), max_seqlen_q=max(q_lens), max_seqlen_k=int(context_lens.max()),
        block_size=block_size, adapter_ids=adapter_ids,
    )
    last_rows = (cu_seqlens_q[1:] - 1).tolist()
    return ModelInput(dev(input_ids), dev(positions), inputs_embeds, is_token, ctx, last_rows)
