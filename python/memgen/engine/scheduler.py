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

Admission, the per-step loop over running sequences and the per-chunk work
after the forward run natively (`memgen._native.StepCore`, engine/runtime.cpp),
which holds the running sequences' streams (in admission order) and the step's
chunks (handed to batch assembly without Python objects; `SchedulerOutput.chunks`
is a Python view). The waiting queue and preemption stay in Python.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from memgen._native import StepCore
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


class SchedulerOutput:
    """One step's work: the chunks (kept natively in `core` until the next
    schedule()) and the sequences preempted to make room."""

    def __init__(self, core: StepCore):
        self.core = core
        self.step = core.step
        self.preempted: list[Sequence] = []
        self._chunks: list[ScheduledChunk] | None = None

    @property
    def chunks(self) -> list[ScheduledChunk]:
        if self._chunks is None:
            self._check_current()
            self._chunks = [ScheduledChunk(*t) for t in self.core.chunk_tuples()]
        return self._chunks

    @property
    def num_chunks(self) -> int:
        self._check_current()
        return self.core.num_chunks

    def _check_current(self) -> None:
        if self.core.step != self.step:
            raise RuntimeError("this SchedulerOutput is stale: the scheduler has planned another step since")


class Scheduler:
    def __init__(self, block_managers: list[BlockManager], max_num_seqs: int, max_num_batched_tokens: int):
        self.block_managers = list(block_managers)     # by pool index (Stream.pool_index)
        self.core = StepCore(self.block_managers)
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.num_preemptions = 0

    @property
    def running(self) -> list[Sequence]:
        """The running sequences in admission order (a copy; StepCore holds them)."""
        return self.core.running

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.core.num_running)

    def schedule(self) -> SchedulerOutput:
        core = self.core
        core.begin(self.max_num_batched_tokens)
        out = SchedulerOutput(core)
        i = 0
        while True:
            # natively: each running sequence's due streams catch up, until the budget
            # is spent or a sequence cannot get blocks
            i, failed = core.schedule_running(i)
            if not failed:
                break
            seq = core.running_at(i)
            victim = core.pop_running()     # preempted by recompute: back to the queue's front
            self._free(victim)
            victim.status = SequenceStatus.WAITING
            victim.num_preemptions += 1
            self.num_preemptions += 1
            self.waiting.appendleft(victim)
            out.preempted.append(victim)
            if victim is seq:
                break
        if out.preempted:
            return out
        while self.waiting and core.budget > 0 and core.num_running < self.max_num_seqs:
            seq = self.waiting[0]
            if not self._admit(seq):
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
        return out

    def _admit(self, seq: Sequence) -> bool:
        """Blocks and chunks for a waiting sequence, starting from its cached prefix
        (natively, StepCore.admit). Atomic: every stream gets its blocks and the
        sequence joins the running ones, or none does (False, nothing changed). Every
        stream's prefix hits are pinned before any new block is taken; an error frees
        every stream of the sequence and propagates."""
        if not self.core.admit(seq, tuple(seq.streams.values())):
            return False
        if seq.num_preemptions == 0:   # 0 when R was not admitted now: a fresh stream holds no hits
            seq.num_cached_prompt_tokens = seq.reasoner.num_cached_tokens
        return True

    def _free(self, seq: Sequence) -> None:
        for stream in seq.streams.values():
            self.block_managers[stream.pool_index].free(stream)

    def postprocess(self, out: SchedulerOutput) -> None:
        """After the forward: the scheduled positions are computed and cached."""
        out._check_current()
        self.core.postprocess()

    def abort(self, seqs: list[Sequence]) -> None:
        """Take unfinished sequences out of the queues and free their blocks; the
        step's chunks (which may name them) are dropped too."""
        self.core.begin(0)
        drop = {id(seq) for seq in seqs if seq.status != SequenceStatus.FINISHED}
        self.waiting = deque(s for s in self.waiting if id(s) not in drop)
        for seq in self.core.running:
            if id(seq) in drop:
                self.core.remove_running(seq)
        for seq in seqs:
            if id(seq) in drop:
                self._free(seq)
                seq.status = SequenceStatus.FINISHED
                seq.finish_reason = "abort"

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self.core.remove_running(seq)
        self._free(seq)
