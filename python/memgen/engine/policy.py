"""What the engine asks of a request policy, and the plain LLM's policy.

A step is one order for every model (LLMEngine.step):
    schedule -> forward -> mark computed -> policy.after_forward -> sample
             -> stop checks -> policy.after_tokens (the sequences that go on)
The policy decides which sequences sample now and from which hidden row, and
what happens between tokens; MemGen's is `memory.controller.MemGenController`
(it also adds streams and inserts latents). A plain LLM's policy is the
trivial case below: a sequence samples when its reasoner chunk completes.
"""
from __future__ import annotations

from typing import Protocol

import torch


class StepHidden:
    """A step's post-norm hidden states: one [rows, H] tensor per pool, and
    where each chunk's rows lie in it (chunk i -> pool tensor, [start, end))."""

    def __init__(self, num_chunks: int):
        self._spans: list[tuple[torch.Tensor, int, int] | None] = [None] * num_chunks

    def add_pool(self, hidden: torch.Tensor, chunk_indices: list[int], ends: list[int]) -> None:
        start = 0
        for i, end in zip(chunk_indices, ends):
            self._spans[i] = (hidden, start, end)
            start = end

    def chunk(self, i: int) -> torch.Tensor:
        hidden, start, end = self._spans[i]
        return hidden[start:end]

    def last(self, i: int) -> torch.Tensor:
        hidden, _, end = self._spans[i]
        return hidden[end - 1]

    def last_rows(self, indices: list[int]) -> torch.Tensor:
        """The last rows of these chunks, [len(indices), H]: one gather when they
        share a pool (always, for a plain LLM)."""
        pools = {id(self._spans[i][0]) for i in indices}
        if len(pools) == 1:
            hidden = self._spans[indices[0]][0]
            rows = torch.tensor([self._spans[i][2] - 1 for i in indices], device=hidden.device)
            return hidden.index_select(0, rows)
        return torch.stack([self.last(i) for i in indices])


class RequestPolicy(Protocol):
    def start(self, seq) -> None:
        """A new request entered the engine (its streams exist)."""

    def after_forward(self, chunks, hidden: StepHidden) -> tuple[list, torch.Tensor | None, list]:
        """After the step's chunks are marked computed: (the sequences that sample
        now, their hidden rows [B, H], the sequences that end here with "length")."""

    def after_tokens(self, seqs, token_ids: list[int]) -> list:
        """After sampling, for the sequences that go on; returns those that end
        here with "length"."""


class PlainPolicy:
    """A plain LLM: sample whenever the reasoner has caught up."""

    def start(self, seq) -> None:
        pass

    def after_forward(self, chunks, hidden: StepHidden) -> tuple[list, torch.Tensor | None, list]:
        due = [i for i, c in enumerate(chunks) if c.completes]
        if not due:
            return [], None, []
        return [chunks[i].seq for i in due], hidden.last_rows(due), []

    def after_tokens(self, seqs, token_ids: list[int]) -> list:
        return []
