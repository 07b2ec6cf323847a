"""The runtime of latent requests (`LatentRuntime`): what happens between forwards,
through the hooks of a step (LLMEngine.step), one order for every model:
    before_schedule -> schedule -> forward -> mark computed -> after_forward -> sample
                    -> stop checks -> after_sample -> ended (the requests a policy ended)
`after_forward` decides which sequences sample now and from which hidden row: a
request without a `memgen.LatentPolicy` when its reasoner chunk completes; one with
(SamplingParams.latent_policy, or the engine's default: MemGen's) as its policy says
after each catch-up, its extra streams (StreamSpec) mirrored, computed when asked and
delivered here. Only the engine finishes a request (`finished`); a policy asks (`ended`).
"""
from __future__ import annotations

import torch

from memgen.engine.sequence import REASONER, Stream
from memgen.latent_policy import SAMPLE, WAIT, Feed, Insert, LatentPolicy, PolicyContext


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


class _Ask:
    """One outstanding `compute()` of a stream: how many scratch rows, and their
    hidden states as they come (position after the kept ones -> row)."""
    __slots__ = ("num_scratch", "rows")

    def __init__(self, num_scratch: int):
        self.num_scratch = num_scratch
        self.rows: dict[int, torch.Tensor] = {}


class StreamHandle:
    """`ctx.streams[name]`: one extra stream of a request, as its policy sees it.
    It never exposes a block: the engine pages, caches and preempts the stream."""
    __slots__ = ("_request", "_stream", "name", "spec", "width")

    def __init__(self, request: LatentRequest, stream: Stream, spec, width: int):
        self._request, self._stream = request, stream
        self.name, self.spec, self.width = stream.name, spec, width

    @property
    def num_positions(self) -> int:
        """Positions the stream holds (scratch rows not counted)."""
        return self._stream.num_tokens - self._stream.num_scratch

    @property
    def num_pending(self) -> int:
        """Positions held but not computed yet (scratch rows not counted)."""
        return max(self.num_positions - self._stream.num_computed_tokens, 0)

    @property
    def last_hidden(self) -> torch.Tensor | None:
        """The post-norm state of the last position, [H_stream], when it is computed
        (None while positions are pending, or before the stream first computed)."""
        found = self._request.last_hidden.get(self.name)
        n = self.num_positions
        if found is None or found[0] != n - 1 or self._stream.num_computed_tokens < n:
            return None
        return found[1]

    @property
    def follow(self) -> bool:
        """True: the stream computes its new positions in every step beside the
        reasoner's (decode-shaped steps; on_stream only when asked). False (the
        default): it computes only when asked, catching up in one chunk."""
        return self.name in self._request.following

    @follow.setter
    def follow(self, value: bool) -> None:
        following = self._request.following
        if bool(value) != (self.name in following):
            following.add(self.name) if value else following.discard(self.name)
            self._request.update_due()

    def compute(self, scratch: torch.Tensor | None = None) -> None:
        """Catch the stream up, and run `scratch` ([K, H_stream] input rows at the
        positions after its last one, their K/V never kept) if given. The hidden
        states come back in on_stream(ctx, name, hidden), before the next on_hidden."""
        request, stream = self._request, self._stream
        if self.name in request.asks:
            raise RuntimeError(f"stream {self.name!r} was already asked to compute: wait for its on_stream")
        if scratch is None and self.num_pending == 0:
            raise ValueError(f"stream {self.name!r} has nothing to compute: its last position's state is "
                             "ctx.streams[name].last_hidden")
        if scratch is not None:
            if not isinstance(scratch, torch.Tensor) or scratch.dim() != 2 or scratch.shape[0] == 0 \
                    or scratch.shape[1] != self.width:
                shape = tuple(scratch.shape) if isinstance(scratch, torch.Tensor) else type(scratch).__name__
                raise ValueError(f"stream {self.name!r}: scratch rows must be a tensor of shape "
                                 f"[K >= 1, {self.width}], got {shape}")
            stream.num_scratch = scratch.shape[0]
            stream.append_embeds(scratch.detach(), hash_keys=False)   # never cached: no key
        request.asks[self.name] = _Ask(0 if scratch is None else scratch.shape[0])
        request.update_due()

    def __repr__(self) -> str:
        return f"StreamHandle({self.name!r}, positions={self.num_positions}, pending={self.num_pending})"


class LatentRequest:
    """The engine's state of one request that carries a LatentPolicy (seq.latent); its
    own policy is made in the first step after it arrived (LatentRuntime.before_schedule).
    When the request finishes, `close()` keeps its record and counts as plain data and
    lets the policy go (the engine's native step may still name the sequence)."""
    __slots__ = ("_metrics", "_record", "asks", "ctx", "ending", "followers", "following", "handles", "is_mask",
                 "last_hidden", "num_fed", "num_inserted", "policy", "r_hidden", "template")

    def __init__(self, template: LatentPolicy, ctx: PolicyContext):
        self.template = template              # the user's instance (never run)
        self.policy: LatentPolicy | None = None   # this request's, from template.new_request
        self.ctx = ctx
        self.num_inserted = 0     # embedding positions inserted
        self.num_fed = 0          # forced tokens fed
        self._record: list | None = None      # set by close(), with _metrics
        self._metrics: dict = {}
        self.is_mask = bool(template.records_augmentation)   # its record is the augmentation mask
        self.handles: dict[str, StreamHandle] = {}    # ctx.streams
        self.followers: list[tuple[Stream, object]] = []   # (stream, its binding: spec, checked projection)
        self.asks: dict[str, _Ask] = {}       # stream name -> outstanding compute()
        self.following: set[str] = set()      # streams computing in every step
        self.last_hidden: dict[str, tuple[int, torch.Tensor]] = {}   # stream -> (position, state)
        self.r_hidden: torch.Tensor | None = None   # R caught up, on_hidden waits for the asks
        self.ending = False       # a policy ended it (ctx.finish); the engine finishes it

    def update_due(self) -> None:
        """R may always catch up; a stream when asked or following."""
        self.ctx._seq.set_due_streams({REASONER, *self.asks, *self.following})

    def begin(self) -> None:
        template = self.template
        policy = template.new_request(list(self.ctx.prompt_token_ids))
        if not isinstance(policy, LatentPolicy):
            raise TypeError(f"{type(template).__name__}.new_request must return a LatentPolicy, "
                            f"got {type(policy).__name__}")
        if not isinstance(getattr(policy, "record", None), list):
            policy.record = []
        self.policy = policy
        policy.on_start(self.ctx)

    # ---- the reasoner's positions, mirrored into the streams that follow it --------
    def mirror_tokens(self, token_ids: list[int]) -> None:
        for stream, binding in self.followers:
            skip = binding.spec.skip_token_ids
            ids = [t for t in token_ids if t not in skip] if skip else token_ids
            if ids:
                stream.append_tokens(ids) if len(ids) > 1 else stream.append_token(ids[0])

    def mirror_rows(self, rows: torch.Tensor) -> None:
        for stream, binding in self.followers:
            if binding.spec.follow == "all":
                project = binding.project
                stream.append_embeds(project(rows) if project is not None else rows)

    # ---- a stream's chunk was computed ------------------------------------------------
    def stream_computed(self, chunk, rows: torch.Tensor) -> torch.Tensor | None:
        """Keep the state of the stream's last kept position; returns what an
        outstanding ask delivers once complete (scratch rows are cut off then)."""
        stream = chunk.stream
        name = stream.name
        kept = stream.num_tokens - stream.num_scratch
        if chunk.start < kept <= chunk.end:
            self.last_hidden[name] = (kept - 1, rows[kept - 1 - chunk.start])
        ask = self.asks.get(name)
        if ask is None:
            return None
        for pos in range(max(chunk.start, kept), chunk.end):    # this chunk's scratch rows, if any
            ask.rows[pos - kept] = rows[pos - chunk.start]
        if not chunk.completes or len(ask.rows) < ask.num_scratch:
            return None
        if ask.num_scratch:
            out = torch.stack([ask.rows[j] for j in range(ask.num_scratch)])
            stream.drop_scratch()     # the chunks are marked computed: their slots are reused later
        else:
            out = rows[-1]
        del self.asks[name]
        self.update_due()
        return out

    def _live_record(self) -> list:
        if self._record is not None:
            return self._record
        return self.policy.record if self.policy is not None else []

    @property
    def record(self) -> list:
        """The policy's record (a copy while the policy runs: it keeps appending)."""
        return self._record if self._record is not None else list(self._live_record())

    def augmentation(self, entries: slice) -> list[int] | None:
        """These entries of the augmentation mask, when the policy's record is one (MemGen's)."""
        return self._live_record()[entries] if self.is_mask else None

    def metrics(self) -> dict:
        return self.policy.metrics() if self._record is None and self.policy is not None else self._metrics

    def close(self) -> None:
        if self._record is None:
            self._metrics = self.metrics()
            self._record = list(self.policy.record) if self.policy is not None else []
            self.policy = self.ctx = self.template = None
            self.handles, self.followers, self.asks, self.last_hidden, self.r_hidden = {}, [], {}, {}, None


class LatentRuntime:
    """Drives every request that carries a LatentPolicy (its own, or the one the engine
    picked for it: MemGen's), and is what their contexts reach of the engine: the
    reasoner's input embeddings and LM head, the sizes actions are checked against."""

    def __init__(self, runner, max_model_len: int, binder):
        self.runner = runner
        self.max_model_len = max_model_len
        self.dtype, self.device = runner.dtype, runner.device
        self.hidden_size = int(runner.hf_config.hidden_size)
        self.vocab_size = int(runner.hf_config.vocab_size)
        self._embed_tokens = runner.model.model.embed_tokens
        self.binder = binder          # engine.extra_streams.StreamBinder: where extra streams run
        # seq_id -> the unfinished requests with a LatentPolicy (until `finished`)
        self.latent_requests: dict[int, LatentRequest] = {}
        self._finished: list[tuple[int, LatentRequest]] = []   # finished in this step
        self._unbegun: list[LatentRequest] = []               # new_request/on_start still due
        self._ending: list = []       # sequences a policy ended, not yet handed to the engine

    @torch.inference_mode()
    def embed(self, token_ids) -> torch.Tensor:
        ids = torch.as_tensor(token_ids, dtype=torch.int64, device=self.device).reshape(-1)
        if ids.numel() and not bool(((ids >= 0) & (ids < self.vocab_size)).all()):
            raise ValueError(f"embed: token ids {ids.tolist()} must lie in the vocabulary [0, {self.vocab_size})")
        return self._embed_tokens(ids)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if hidden.dim() == 1:
            return self.runner.compute_logits(hidden.unsqueeze(0))[0]
        return self.runner.compute_logits(hidden)

    def finish(self, seq) -> None:
        """ctx.finish (and the room rule): no more hook calls; the engine finishes it (`ended`)."""
        state = seq.latent
        if state is not None and not state.ending and not seq.is_finished:
            state.ending = True
            self._ending.append(seq)

    def embeddings_of(self, action: Insert, policy) -> torch.Tensor:
        """An Insert's rows, checked, as a fresh [K, H] tensor of the model's dtype and device."""
        rows = action.embeddings
        name = type(policy).__name__
        if not isinstance(rows, torch.Tensor):
            raise TypeError(f"{name}: Insert takes a torch.Tensor of shape [K, {self.hidden_size}], "
                            f"got {type(rows).__name__}")
        if rows.dim() == 1:
            rows = rows.unsqueeze(0)
        if rows.dim() != 2 or rows.shape[0] == 0 or rows.shape[1] != self.hidden_size:
            # the likely slip: a stream on another model hands back states at that model's width
            hint = (f" (the reasoner's hidden size is {self.hidden_size}: project the states of a stream on "
                    "another model back to it first)" if rows.dim() == 2 and rows.shape[0] else "")
            raise ValueError(f"{name}: Insert takes embeddings of shape [K >= 1, {self.hidden_size}], got "
                             f"{tuple(action.embeddings.shape)}{hint}")
        rows = rows.detach().to(device=self.device, dtype=self.dtype, copy=True)
        if not bool(torch.isfinite(rows).all()):
            raise ValueError(f"{name}: Insert got non-finite embeddings")
        return rows

    def tokens_of(self, action: Feed, policy) -> list[int]:
        ids = list(action.token_ids)
        name = type(policy).__name__
        if not ids:
            raise ValueError(f"{name}: Feed needs at least one token id")
        for t in ids:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.vocab_size:
                raise ValueError(f"{name}: Feed token id {t!r} is not an int in the vocabulary "
                                 f"[0, {self.vocab_size})")
        return ids

    # ---- the hooks the engine calls --------------------------------------------------
    def start(self, seq, template: LatentPolicy | None) -> None:
        """A new request (`template`: its SamplingParams.latent_policy, kept out of the
        sequence's params, or the engine's pick), with its policy's extra streams."""
        if template is None:
            return
        state = LatentRequest(template, PolicyContext(seq, self))
        for binding in self.bind_streams(template):
            stream = self.binder.create(binding.spec, seq.prompt_token_ids)
            seq.streams[binding.spec.name] = stream
            state.handles[stream.name] = StreamHandle(state, stream, binding.spec, binding.width)
            state.followers.append((stream, binding))
        seq.latent = state
        seq.set_due_streams({REASONER})
        self.latent_requests[seq.seq_id] = state
        self._unbegun.append(state)

    def bind_streams(self, template: LatentPolicy) -> list:
        """Where each of a policy's streams runs (engine.extra_streams.StreamBinding):
        LLM checks a call's policies with it before any of its requests enters."""
        bindings, names = [], {REASONER}
        for spec in template.streams:
            if getattr(spec, "name", None) in names:
                raise ValueError(f"{type(template).__name__}: two streams are named {spec.name!r}")
            bindings.append(self.binder.binding(spec))
            names.add(spec.name)
        return bindings

    def before_schedule(self) -> None:
        """new_request + on_start of the requests that arrived since the last step, inside the
        step (an error ends the generate() call), before their first forward."""
        unbegun = self._unbegun
        while unbegun:
            state = unbegun.pop(0)
            if state.template is not None:    # not aborted meanwhile
                state.begin()

    def after_forward(self, chunks, hidden: StepHidden) -> tuple[list, torch.Tensor | None, list]:
        """Deliver what the extra streams computed (on_stream), then ask each request
        whose reasoner has caught up, with nothing asked outstanding, what follows
        (on_hidden): SAMPLE rows are returned, Insert and Feed are appended to the
        reasoner and the streams that follow it (the room rule decides if they fit),
        WAIT keeps the reasoner's state until the asked streams delivered. Returns
        (the sequences that sample, their hidden rows, the requests a policy ended)."""
        if not self.latent_requests:
            due = [i for i, c in enumerate(chunks) if c.completes]
            if not due:
                return [], None, []
            return [chunks[i].seq for i in due], hidden.last_rows(due), []
        requests = self.latent_requests
        plain: list[int] = []                      # chunk indices of requests without a policy
        caught_up: list[tuple[LatentRequest, int]] = []
        delivered: list[tuple[LatentRequest, str, torch.Tensor]] = []
        for i, chunk in enumerate(chunks):
            state = requests.get(chunk.seq.seq_id)
            if state is None:
                if chunk.completes:
                    plain.append(i)
            elif chunk.stream.name == REASONER:
                if chunk.completes:
                    caught_up.append((state, i))
            else:
                out = state.stream_computed(chunk, hidden.chunk(i))
                if out is not None:
                    delivered.append((state, chunk.stream.name, out))
        for state, name, out in delivered:
            if state.policy is not None and not state.ending:
                state.policy.on_stream(state.ctx, name, out)
        # those whose reasoner caught up now, then those waiting on what was delivered
        turns: list[tuple[LatentRequest, int | None]] = list(caught_up)
        if delivered:
            now = {id(s) for s, _ in caught_up}
            for state, _, _ in delivered:
                if id(state) not in now and state.r_hidden is not None:
                    now.add(id(state))
                    turns.append((state, None))
        sample: list[tuple] = [(chunks[i].seq, i) for i in plain]
        for state, i in turns:
            if state.policy is None or state.ending:
                continue
            row = hidden.last(i) if i is not None else state.r_hidden
            # on_hidden waits for the streams asked to compute
            action = WAIT if state.asks else state.policy.on_hidden(state.ctx, row)
            if state.ending:                     # the policy ended the request (ctx.finish)
                continue
            if action is SAMPLE:
                state.r_hidden = None
                sample.append((state.ctx._seq, i if i is not None else row))
                continue
            if action is WAIT:
                if not state.asks:
                    raise ValueError(f"{type(state.policy).__name__}.on_hidden returned WAIT but no stream was "
                                     "asked to compute (ctx.streams[name].compute(...))")
                if i is not None:
                    state.r_hidden = row.clone()
                continue
            seq = state.ctx._seq
            if isinstance(action, Insert):
                rows = self.embeddings_of(action, state.policy)
                k = rows.shape[0]
            elif isinstance(action, Feed):
                ids = self.tokens_of(action, state.policy)
                k = len(ids)
            else:
                raise TypeError(f"{type(state.policy).__name__}.on_hidden must return SAMPLE, Insert(...), "
                                f"Feed(...) or WAIT, got {action!r}")
            state.r_hidden = None
            if not state.ctx.room_for(k):     # the room rule: out of room, it ends here ("length")
                self.finish(seq)
            elif isinstance(action, Insert):
                seq.reasoner.append_embeds(rows)
                state.mirror_rows(rows)
                state.num_inserted += k
            else:
                seq.reasoner.append_tokens(ids)
                state.mirror_tokens(ids)
                state.num_fed += k
        ended = self.ended()
        if not sample:
            return [], None, ended
        seqs = [seq for seq, _ in sample]
        where = [w for _, w in sample]
        if all(isinstance(w, int) for w in where):
            return seqs, hidden.last_rows(where), ended
        return seqs, torch.stack([hidden.last(w) if isinstance(w, int) else w for w in where]), ended

    def after_sample(self, seqs, token_ids: list[int]) -> None:
        """Every sampled token, once appended (the one that ended a request too), to the streams
        that follow the reasoner, then on_token; then the requests finished in this step close."""
        if not self.latent_requests and not self._finished:
            return
        finished = dict(self._finished)
        requests = self.latent_requests
        for seq, token_id in zip(seqs, token_ids):
            state = requests.get(seq.seq_id)
            if state is not None:
                state.mirror_tokens((token_id,))
            else:
                state = finished.get(seq.seq_id)
            if state is not None and state.policy is not None:
                state.policy.on_token(state.ctx, token_id)
        self.close_finished()

    def templates_in_use(self) -> set[int]:
        """id() of every policy template an unfinished request runs (a weight owner frees
        an old version's adapters once none of its requests is left)."""
        return {id(state.template) for state in self.latent_requests.values()}

    def ended(self) -> list:
        """The requests a policy ended since the last call (ctx.finish, the room rule): the
        engine finishes them ("length")."""
        ending = [seq for seq in self._ending if not seq.is_finished]
        self._ending.clear()
        return ending

    def finished(self, seq) -> None:
        """The engine finished (or aborted) a request: its last on_token may still be due in
        this step (after_sample), then close_finished lets its policy go."""
        state = self.latent_requests.pop(seq.seq_id, None)
        if state is not None:
            self._finished.append((seq.seq_id, state))

    def close_finished(self) -> None:
        for _, state in self._finished:
            state.close()
        self._finished.clear()
