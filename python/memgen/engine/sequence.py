"""Per-request state: one `Sequence` per request, holding one `Stream` per KV
stream. A plain LLM has only the reasoner stream "R"; a LatentPolicy may add
extra streams (MemGen's: "W" weaver, "T" trigger), each with its own positions,
block table and computed count.

The scheduler and block manager change these objects; the model runner only
reads them. A stream's positions are token ids, or embedding vectors (latents)
marked by EMBED (-1) in `token_ids` with the vector in `embeds[position]`.
"""
from __future__ import annotations

import hashlib
import itertools
import time
from enum import Enum, auto
from typing import Any, Callable

import torch

from memgen._native import EMBED, StreamCore  # noqa: F401 (EMBED: re-exported for stream users)
from memgen.sampling_params import SamplingParams

REASONER = "R"


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


_SALT_IDS: dict[object, int] = {None: 0}


def salt_id(salt: object) -> int:
    """A small int per distinct cache salt (equal salts, equal ids): the native
    prefix-cache keys carry it instead of the object."""
    return _SALT_IDS.setdefault(salt, len(_SALT_IDS))


class Stream(StreamCore):
    """One KV stream of a sequence: the positions it holds and their cache.

    The native base (memgen._native.StreamCore) owns the positions (token ids,
    EMBED at embedding positions, whose digests it keeps) and everything the block
    manager and the scheduler change: block_table (a copy), block_hashes,
    num_computed_tokens, num_cached_tokens (prefix-cache hits at admission),
    num_scratch (trailing positions computed but never cached: the weaver's
    queries), adapter_id, pool_index (the pool's index, as everywhere in the engine);
    what only Python uses is kept here."""

    def __init__(self, name: str, token_ids: list[int], pool_index: int = 0, cache_salt: object = None,
                 adapter_id: int = -1, token_input: Callable[[torch.Tensor], torch.Tensor] | None = None):
        super().__init__()
        self.name = name
        self.append_tokens(token_ids)
        self.pool_index = pool_index       # which model / KV pool this stream runs on (0: the reasoner's)
        self.cache_salt = cache_salt       # part of prefix-cache keys (adapter, model, ...)
        self.salt_id = salt_id(cache_salt)
        self.adapter_id = adapter_id       # LoRA adapter of this stream's rows (-1: none)
        self.embeds: dict[int, torch.Tensor] = {}    # position -> [H] vector
        # token positions enter the model as token_input(ids) instead of through the model's own
        # embedding table (MemGen's weaver: reasoner_to_weaver(reasoner embedding))
        self.token_input = token_input
        self.projected = token_input is not None

    def append_embeds(self, vectors: torch.Tensor, hash_keys: bool = True) -> None:
        """Append K embedding-valued positions ([K, H]); their digests key the prefix cache
        (scratch positions are never cached and need none)."""
        # raw bytes (numpy has no bfloat16)
        data = vectors.detach().cpu().contiguous().view(torch.uint8) if hash_keys else None
        for i, vector in enumerate(vectors):
            self.embeds[self.num_tokens] = vector
            self.append_embed(hashlib.sha256(data[i].numpy().tobytes()).digest() if hash_keys else None)

    def drop_scratch(self) -> None:
        """Cut the scratch positions off again; their slots are overwritten later."""
        for pos in range(self.num_tokens - self.num_scratch, self.num_tokens):
            self.embeds.pop(pos, None)
        super().drop_scratch()

    def __repr__(self) -> str:
        return (f"Stream({self.name!r}, pool={self.pool_index}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, blocks={self.block_table})")


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
        # its sampler row, made once when it joins (layers.sampler.SamplingBatch's order, then min_tokens)
        penalties = (float(params.repetition_penalty), float(params.presence_penalty),
                     float(params.frequency_penalty)) if params.has_penalties else None
        self.sampling = (float(params.temperature), params.top_k, float(params.top_p), generator,
                         -1 if params.logprobs is None else params.logprobs, penalties, params.min_tokens)
        self.generator = generator
        self.stop_token_ids = stop_token_ids  # eos ids (unless ignore_eos) and the request's stop ids
        self.status = SequenceStatus.WAITING
        self.finish_reason: str | None = None
        self.streams: dict[str, Stream] = {REASONER: Stream(REASONER, prompt_token_ids)}
        self.latent: Any = None                    # engine/policy.LatentRequest, with a LatentPolicy
        self.num_preemptions = 0
        self.num_cached_prompt_tokens = 0     # prompt positions served by the prefix cache
        self.arrival_time = time.perf_counter()
        self.first_token_time: float | None = None
        self.finish_time: float | None = None

    def set_due_streams(self, names: set[str]) -> None:
        """Which streams the scheduler may compute now (until set: every stream); kept
        on the streams themselves (Stream.due) for the native scheduler."""
        for name, stream in self.streams.items():
            stream.due = name in names

    @property
    def reasoner(self) -> Stream:
        return self.streams[REASONER]

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
        self.reasoner.append_token(token_id)

    def __repr__(self) -> str:
        return (f"Sequence(id={self.seq_id}, status={self.status.name}, prompt={len(self.prompt_token_ids)}, "
                f"out={self.num_output_tokens}, computed={self.reasoner.num_computed_tokens})")
