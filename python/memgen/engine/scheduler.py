"""Continuous batching by vLLM v1's one rule: there is no prefill or decode
phase; every stream of every running sequence catches up with its positions
(num_computed_tokens -> num_tokens) under a per-step token budget. Chunked
prefill, decode, mixed batches and (for MemGen) lagging weaver/trigger streams
and latent insertions all follow from it.

Order: running sequences first (admission order), then waiting ones while the
budget, `max_num_seqs` and the KV pool allow. When a running sequence cannot
get blocks, the most recently admitted running sequence is preempted by
recompute (its blocks are freed; it re-enters the queue's front and later
re-prefills, through the prefix cache where it can). Requests are never dropped.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from memgen.engine.block_manager import BlockManager
from memgen.engine.sequence import Sequence, SequenceStatus, Stream


@dataclass
class ScheduledChunk:
    """Positions [start, start + num_tokens) of one stream, computed this step."""
    seq: Sequence
    stream: Stream
    start: int
    num_tokens: int

    @property
    def end(self) -> int:
        return self.start + self.num_tokens

    @property
    def completes(self) -> bool:
        """True when the chunk reaches the stream's last position (its output is due)."""
        return self.end == self.stream.num_tokens


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


class Scheduler:
    def __init__(self, block_managers: dict[str, BlockManager], max_num_seqs: int, max_num_batched_tokens: int):
        self.block_managers = block_managers
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            chunks = self._allocate(seq, budget)
            while chunks is None:
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
                chunks = self._allocate(seq, budget)
            if chunks is None:
                break
            out.chunks += chunks
            budget -= sum(c.num_tokens for c in chunks)
            i += 1
        if out.preempted:
            return out
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            chunks = self._admit(seq, budget)
            if chunks is None:
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.chunks += chunks
            budget -= sum(c.num_tokens for c in chunks)
        return out

    def _allocate(self, seq: Sequence, budget: int) -> list[ScheduledChunk] | None:
        """Blocks and chunks for a running sequence's pending positions, or None."""
        chunks = []
        for stream in seq.streams_to_run():
            n = min(stream.num_pending_tokens, budget)
            if n <= 0:
                continue
            manager = self.block_managers[stream.pool]
            if not manager.can_allocate(stream, n):
                return None
            manager.allocate(stream, n)
            chunks.append(ScheduledChunk(seq, stream, stream.num_computed_tokens, n))
            budget -= n
        return chunks

    def _admit(self, seq: Sequence, budget: int) -> list[ScheduledChunk] | None:
        """Like _allocate for a waiting sequence, starting from its cached prefix."""
        plan = []
        needed: dict[str, int] = {}
        for stream in seq.streams_to_run():
            manager = self.block_managers[stream.pool]
            hits = manager.find_cached_prefix(stream) if not stream.block_table else []
            computed = len(hits) * manager.block_size if hits else stream.num_computed_tokens
            n = min(stream.num_tokens - computed, budget)
            if n <= 0:
                continue
            needed[stream.pool] = needed.get(stream.pool, 0) + manager.num_free_blocks_needed(stream, n, hits)
            plan.append((stream, n, hits))
            budget -= n
        if not plan or any(self.block_managers[p].num_free_blocks < k for p, k in needed.items()):
            return None
        chunks = []
        for stream, n, hits in plan:
            manager = self.block_managers[stream.pool]
            manager.allocate(stream, n, hits)
            manager.record_admission(stream)
            if seq.num_preemptions == 0 and stream is seq.reasoner:
                seq.num_cached_prompt_tokens = stream.num_cached_tokens
            chunks.append(ScheduledChunk(seq, stream, stream.num_computed_tokens, n))
        return chunks

    def _preempt(self, seq: Sequence) -> None:
        self._free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _free(self, seq: Sequence) -> None:
        for stream in seq.streams.values():
            self.block_managers[stream.pool].free(stream)

    def postprocess(self, out: SchedulerOutput) -> None:
        """After the forward: the scheduled positions are computed and cached."""
        for chunk in out.chunks:
            chunk.stream.num_computed_tokens = chunk.end
            self.block_managers[chunk.stream.pool].cache_full_blocks(chunk.stream)

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self.running.remove(seq)
        self._free(seq)
