"""memgen.LatentPolicy: a per-request hook at the reasoner's token boundaries
that may insert embedding vectors (or forced tokens) into the sequence in the
middle of decoding. docs/latent-policies.md is the guide.

A user subclasses LatentPolicy, overriding its hooks (on_start, on_hidden,
on_token, on_stream), and passes an instance in `SamplingParams(latent_policy=...)`;
the engine runs one copy per request (`new_request`). Whenever the reasoner has
caught up, on_hidden returns the action that comes next: SAMPLE, Insert
(embedding rows), Feed (forced tokens) or WAIT (for the extra streams).

Extra streams (`streams`, StreamSpec) are KV streams beside the reasoner that
the engine mirrors the reasoner's positions into and computes only when asked
(`ctx.streams[name].compute(scratch=rows)`; the states come back in on_stream).
An Insert or Feed of k positions happens only if it fits (the room rule,
`has_room`, `ctx.room_for(k)`); otherwise the request ends with finish_reason
"length". The policy's `record` list comes back as the output's `policy_record`.

This module imports no torch: SamplingParams (and the CLI) import it.
"""
from __future__ import annotations

import copy
import weakref
from collections.abc import Sequence
from typing import Any


class _Marker:
    """A named action without arguments: one instance per subclass (`is` compares it),
    and a copy or a pickle gives that instance back."""
    _instances: dict[type, "_Marker"] = {}
    name = ""

    def __new__(cls):
        if cls not in _Marker._instances:
            _Marker._instances[cls] = super().__new__(cls)
        return _Marker._instances[cls]

    def __repr__(self) -> str:
        return self.name

    def __reduce__(self):
        return (type(self), ())


class _Sample(_Marker):
    """The action SAMPLE: sample the next token from the logits of `hidden`."""
    name = "SAMPLE"


class _Wait(_Marker):
    """The action WAIT: R has caught up, but the streams asked to compute go first;
    on_hidden is called again (with the same hidden state) once they delivered."""
    name = "WAIT"


SAMPLE = _Sample()
WAIT = _Wait()


def has_room(num_positions: int, k: int, max_model_len: int) -> bool:
    """The room rule, the one place it is written: k more positions go in only if they
    and the token they precede fit in max_model_len (which counts every position)."""
    return num_positions + k + 1 <= max_model_len


class StreamSpec:
    """An extra KV stream that every request of a policy holds beside the reasoner.

    name              the key of ctx.streams and of on_stream ("R" is the reasoner's)
    adapter           None (the base weights) or a LoRA adapter on the model it runs on:
                      a `memgen.checkpoint.LoraWeights` (PEFT module paths)
    input_projection  None, or a function [N, H] -> [N, H_stream] applied to the
                      reasoner's input embeddings of the stream's token positions and
                      to the rows it mirrors from Inserts (H_stream: the width of the
                      model it runs on)
    follow            "all": the stream receives every reasoner position (tokens, fed
                      tokens, inserted rows); "tokens": token positions only
    skip_token_ids    token ids the stream never receives (e.g. pad tokens)
    model             None: the reasoner's base; else the name of a model the LLM was
                      built with, `LLM(..., stream_models={name: path})`

    Its rows are batched with every other row on the model it runs on, in the same
    step; the engine pages, prefix-caches and preempts it like the reasoner.
    """
    __slots__ = ("adapter", "follow", "input_projection", "model", "name", "skip_token_ids")

    def __init__(self, name: str, adapter: Any = None, input_projection: Any = None, follow: str = "all",
                 skip_token_ids: Sequence[int] = (), model: str | None = None):
        if not isinstance(name, str) or not name or name == "R":
            raise ValueError(f"StreamSpec: name must be a non-empty str other than 'R' (the reasoner), got {name!r}")
        if follow not in ("all", "tokens"):
            raise ValueError(f"StreamSpec {name!r}: follow must be 'all' or 'tokens', got {follow!r}")
        if input_projection is not None and not callable(input_projection):
            raise TypeError(f"StreamSpec {name!r}: input_projection must be callable or None")
        self.name = name
        self.adapter = adapter
        self.input_projection = input_projection
        self.follow = follow
        if model is not None and (not isinstance(model, str) or not model):
            raise TypeError(f"StreamSpec {name!r}: model must be None (the reasoner's base) or the name of a model "
                            f"given in LLM(stream_models={{name: path}}), got {model!r}")
        self.skip_token_ids = frozenset(int(t) for t in skip_token_ids)
        self.model = model

    def __repr__(self) -> str:
        on = "" if self.model is None else f", model={self.model!r}"
        return f"StreamSpec({self.name!r}, follow={self.follow!r}{on})"


class Insert:
    """Append `embeddings` ([K, H], or [H] for one row) to the reasoner as K
    embedding-valued positions: they enter the model in place of token
    embeddings, produce no output token and count against max_model_len. The
    engine copies them (to the model's dtype and device) when it applies the action."""
    __slots__ = ("embeddings",)

    def __init__(self, embeddings: Any):
        self.embeddings = embeddings

    def __repr__(self) -> str:
        shape = tuple(getattr(self.embeddings, "shape", ()))
        return f"Insert(embeddings of shape {shape})"


class Feed:
    """Append forced input tokens to the reasoner: they are computed as if they
    were part of the prompt (they are not outputs, count against max_model_len
    but not max_tokens, and are never checked against stop ids)."""
    __slots__ = ("token_ids",)

    def __init__(self, token_ids: Sequence[int]):
        if isinstance(token_ids, int) and not isinstance(token_ids, bool):
            token_ids = [token_ids]
        self.token_ids = tuple(token_ids)

    def __repr__(self) -> str:
        return f"Feed({list(self.token_ids)})"


def _of_seq(name: str) -> property:
    """A read-only PolicyContext attribute: the request's (its Sequence's) `name`."""
    return property(lambda ctx: getattr(ctx._seq, name))


def _of_runtime(name: str) -> property:
    """A read-only PolicyContext attribute: the engine's (its latent runtime's) `name`."""
    return property(lambda ctx: getattr(ctx._runtime, name))


class PolicyContext:
    """What a policy sees of its request (one per request, built by the engine).

    Read-only views; `embed` and `logits` run on the reasoner's weights:
      prompt_token_ids, output_token_ids   lists of ints (do not modify them)
      num_positions     the reasoner's positions so far: prompt, fed tokens,
                        inserted rows and sampled tokens
      max_model_len     the most positions a request may hold
      hidden_size, vocab_size, dtype, device
      generator         the request's seeded torch.Generator (also the sampler's)
      request_index     the request's index in the engine (0, 1, ...)
      params            the request's SamplingParams
      finished          True in the on_token of the token that ended the request
      streams           name -> the request's extra streams (StreamSpec), each with
                        compute(scratch=None), follow, num_positions, num_pending,
                        last_hidden (see the guide)
      embed(token_ids)  the reasoner's input embeddings, [K, H] (ids: ints or a 1-D tensor)
      logits(hidden)    the LM head: [H] -> [V], [N, H] -> [N, V]
      room_for(k)       whether k positions and the token they precede still fit (the room rule)
      finish()          end the request before its next token, finish_reason "length"
                        (a policy out of room for what it must insert)
    """

    def __init__(self, seq, runtime):
        self._seq_ref = weakref.ref(seq)   # the sequence holds its policy state: no cycle
        self._runtime = runtime

    @property
    def _seq(self):
        seq = self._seq_ref()
        if seq is None:
            raise RuntimeError("this PolicyContext's request is gone (its outputs were dropped)")
        return seq

    prompt_token_ids = _of_seq("prompt_token_ids")
    output_token_ids = _of_seq("output_token_ids")
    generator = _of_seq("generator")
    request_index = _of_seq("request_index")
    params = _of_seq("params")          # the request's SamplingParams (read them, do not change them)
    finished = _of_seq("is_finished")
    max_model_len = _of_runtime("max_model_len")
    hidden_size = _of_runtime("hidden_size")
    vocab_size = _of_runtime("vocab_size")
    dtype = _of_runtime("dtype")
    device = _of_runtime("device")
    num_positions = property(lambda ctx: ctx._seq.reasoner.num_tokens)
    streams = property(lambda ctx: ctx._seq.latent.handles)    # name -> engine.policy.StreamHandle

    def room_for(self, k: int) -> bool:
        return has_room(self.num_positions, k, self.max_model_len)

    def finish(self) -> None:
        self._runtime.finish(self._seq)

    def embed(self, token_ids):
        return self._runtime.embed(token_ids)

    def logits(self, hidden):
        return self._runtime.logits(hidden)


class LatentPolicy:
    """Subclass it and override the hooks; the defaults make a plain request.

    Per-request state: the engine calls `new_request` once per request (each of
    n completions too) and the hooks on what it returns. The default is a
    shallow copy with a fresh `record` list, so set mutable per-request state in
    `on_start` (or override `new_request`). Both run at the start of the first
    engine step after the request arrived. Hooks run on the engine's thread,
    between forwards; `hidden` is valid during the call (clone it to
    keep it; an Insert of it is copied by the engine). An error raised by any
    of them propagates out of generate(), which takes its requests out.
    """

    record: list   # per-token record: returned as `policy_record` on the outputs
    streams: tuple[StreamSpec, ...] = ()   # extra KV streams of every request (class or instance)
    records_augmentation = False   # True: `record` is the augmentation mask, one entry per output token

    def metrics(self) -> dict:
        """Counts added to the request's output metrics when it ends (MemGen: num_trigger_calls)."""
        return {}

    def new_request(self, prompt_token_ids: list[int]) -> LatentPolicy:
        """The policy object of one request (default: copy.copy(self), fresh record)."""
        policy = copy.copy(self)
        policy.record = []
        return policy

    def on_start(self, ctx: PolicyContext) -> None:
        """Once per request, right after new_request, before the request's first
        forward: streams asked to compute here ride along with the prompt."""

    def on_hidden(self, ctx: PolicyContext, hidden):
        """The reasoner caught up; `hidden` is its last position's post-norm state [H].
        Return SAMPLE, Insert(embeddings), Feed(token_ids), or WAIT (after asking a
        stream to compute)."""
        return SAMPLE

    def on_token(self, ctx: PolicyContext, token_id: int) -> None:
        """A token was sampled (it is already the last of ctx.output_token_ids, and the
        streams that follow the reasoner hold it)."""

    def on_stream(self, ctx: PolicyContext, name: str, hidden) -> None:
        """Stream `name` computed what `ctx.streams[name].compute(...)` asked: `hidden` is
        the post-norm states of the scratch rows ([K, H_stream]) when rows were given,
        else of the stream's last position ([H_stream]). Called before the on_hidden
        that waits for it."""
