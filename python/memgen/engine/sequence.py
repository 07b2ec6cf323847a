"""Per-request state: one `Sequence` per request, holding one `Stream` per KV
stream. A plain LLM has only the reasoner stream "R"; MemGen adds "W" (weaver)
and "T" (trigger), each with its own positions, block table and computed count.

The scheduler and block manager change these objects; the model runner only
reads them. A stream's positions are token ids, or embedding vectors (latents)
marked by EMBED in `token_ids` with the vector in `embeds[position]`.
"""
from __future__ import annotations

import hashlib
import itertools
import time
from dataclasses import dataclass, field
from enum import Enum, auto
from typing import Any, Callable

import torch

from memgen.sampling_params import SamplingParams

EMBED = -1          # token_ids entry of an embedding-valued position
REASONER = "R"


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


@dataclass(eq=False)
class Stream:
    """One KV stream of a sequence: the positions it holds and their cache."""
    name: str
    token_ids: list[int]
    pool: str = "base"                 # which model / KV pool this stream runs on
    cache_salt: object = None          # part of prefix-cache keys (adapter, model, ...)
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)   # hashes of its cached full blocks
    num_computed_tokens: int = 0       # positions whose K/V are in the cache
    num_cached_tokens: int = 0         # of those, found by prefix caching at admission
    embeds: dict[int, torch.Tensor] = field(default_factory=dict)       # position -> [H] vector
    embed_keys: dict[int, bytes] = field(default_factory=dict)          # position -> digest
    adapter_id: int = -1               # LoRA adapter of this stream's rows (-1: none)
    # token positions enter the model as token_input(ids) embeddings instead of the
    # model's own embedding table (MemGen's weaver: reasoner_to_weaver(reasoner embedding))
    token_input: Callable[[torch.Tensor], torch.Tensor] | None = None
    num_scratch: int = 0               # trailing positions computed but never cached (weaver queries)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_pending_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    def append_embeds(self, vectors: torch.Tensor, hash_keys: bool = True) -> None:
        """Append K embedding-valued positions ([K, H]); their digests key the prefix cache
        (scratch positions are never cached and need none)."""
        data = vectors.detach().cpu().contiguous() if hash_keys else None
        for i, vector in enumerate(vectors):
            pos = len(self.token_ids)
            self.token_ids.append(EMBED)
            self.embeds[pos] = vector
            if hash_keys:
                self.embed_keys[pos] = hashlib.sha256(data[i].numpy().tobytes()).digest()

    def drop_scratch(self) -> None:
        """Cut the scratch positions off again; their slots are overwritten later."""
        for pos in range(self.num_tokens - self.num_scratch, self.num_tokens):
            self.embeds.pop(pos, None)
            self.embed_keys.pop(pos, None)
        del self.token_ids[self.num_tokens - self.num_scratch:]
        self.num_computed_tokens = min(self.num_computed_tokens, self.num_tokens)
        self.num_scratch = 0

    def block_content(self, index: int, block_size: int) -> tuple:
        """What identifies block `index`'s contents: its ids plus its embeddings' digests."""
        start = index * block_size
        ids = tuple(self.token_ids[start:start + block_size])
        if EMBED not in ids:
            return ids
        return ids + tuple(self.embed_keys[start + i] for i, t in enumerate(ids) if t == EMBED)

    def reset(self) -> None:
        """Forget the cache (after the blocks went back to the pool)."""
        self.block_table, self.block_hashes = [], []
        self.num_computed_tokens = self.num_cached_tokens = 0


class Sequence:
    _ids = itertools.count()

    def __init__(self, prompt_token_ids: list[int], params: SamplingParams, generator: torch.Generator,
                 stop_token_ids: frozenset[int], request_index: int | None = None):
        self.seq_id = next(Sequence._ids)
        self.request_index = self.seq_id if request_index is None else request_index
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.output_logprobs: list[dict[int, float]] = []
        self.params = params
        self.generator = generator
        self.stop_token_ids = stop_token_ids  # eos ids (unless ignore_eos) and the request's stop ids
        self.status = SequenceStatus.WAITING
        self.finish_reason: str | None = None
        self.streams: dict[str, Stream] = {REASONER: Stream(REASONER, list(prompt_token_ids))}
        self.due_streams: set[str] | None = None   # streams to compute now (None: every stream)
        self.memgen: Any = None                    # MemGen state (memory.controller), None for a plain LLM
        self.num_preemptions = 0
        self.num_cached_prompt_tokens = 0     # prompt positions served by the prefix cache
        self.arrival_time = time.perf_counter()
        self.first_token_time: float | None = None
        self.finish_time: float | None = None

    def streams_to_run(self):
        """The streams whose pending positions the scheduler may compute now."""
        if self.due_streams is None:
            return self.streams.values()
        return [s for name, s in self.streams.items() if name in self.due_streams]

    @property
    def reasoner(self) -> Stream:
        return self.streams[REASONER]

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def append_token(self, token_id: int, logprobs: dict[int, float] | None) -> None:
        """A sampled token: an output, and the reasoner's next input position."""
        if self.first_token_time is None:
            self.first_token_time = time.perf_counter()
        self.output_token_ids.append(token_id)
        if logprobs is not None:
            self.output_logprobs.append(logprobs)
        self.reasoner.token_ids.append(token_id)

    def __repr__(self) -> str:
        return (f"Sequence(id={self.seq_id}, status={self.status.name}, prompt={self.num_prompt_tokens}, "
                f"out={self.num_output_tokens}, computed={self.reasoner.num_computed_tokens})")
