"""What the engine asks of a request policy, and the plain LLM's policy.

A step is one order for every model (LLMEngine.step):
    schedule -> forward -> mark computed -> policy.after_forward -> sample
             -> stop checks -> policy.after_tokens (the sequences that go on)
The policy decides which sequences sample now and from which hidden row, and
what happens between tokens (an optional `after_sample` sees every sampled
token, those that end a request included); MemGen's is
`memory.controller.MemGenController` (it also adds streams and inserts latents). A plain LLM's policy is the
trivial case below: a sequence samples when its reasoner chunk completes.
It also runs the requests that carry a `memgen.LatentPolicy`
(SamplingParams.latent_policy): for them it asks the policy what follows each
catch-up (sample, insert embedding rows, feed tokens) and applies the room
rule. Requests without one take the path they always took.
"""
from __future__ import annotations

import copy
from typing import Protocol

import torch

from memgen.latent_policy import SAMPLE, Feed, Insert, LatentPolicy, PolicyContext


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

    # optional: after_sample(seqs, token_ids) -> None, every sampled token (those that
    # end their request too), after they are appended and the stop checks ran


class LatentRuntime:
    """What a LatentPolicy's context reaches of the engine: the reasoner's input
    embeddings and LM head, and the sizes the actions are checked against."""

    def __init__(self, runner, max_model_len: int):
        self.runner = runner
        self.max_model_len = max_model_len
        self.dtype, self.device = runner.dtype, runner.device
        self.hidden_size = int(runner.hf_config.hidden_size)
        self.vocab_size = int(runner.hf_config.vocab_size)
        self._embed_tokens = runner.model.model.embed_tokens

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
            raise ValueError(f"{name}: Insert takes embeddings of shape [K >= 1, {self.hidden_size}], got "
                             f"{tuple(action.embeddings.shape)}")
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


class LatentRequest:
    """The engine's state of one request that carries a LatentPolicy (seq.latent).
    The request's own policy is made (new_request, on_start) just before its first
    on_hidden, inside a step: an error there, as in any hook, ends the generate()
    call, which takes its requests out. When the request finishes, `close()` keeps
    its record and counts as plain data and lets the policy go (the engine's native
    step may still name the sequence)."""
    __slots__ = ("_record", "ctx", "num_fed", "num_inserted", "policy", "template")

    def __init__(self, template: LatentPolicy, ctx: PolicyContext):
        self.template = template              # the user's instance (never run)
        self.policy: LatentPolicy | None = None   # this request's, from template.new_request
        self.ctx = ctx
        self.num_inserted = 0     # embedding positions inserted
        self.num_fed = 0          # forced tokens fed
        self._record: list | None = None      # set by close()

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

    @property
    def record(self) -> list:
        """The policy's record (a copy once the request finished)."""
        if self._record is not None:
            return self._record
        return list(self.policy.record) if self.policy is not None else []

    def close(self) -> None:
        if self._record is None:
            self._record = list(self.policy.record) if self.policy is not None else []
            self.policy = self.ctx = self.template = None


class PlainPolicy:
    """A plain LLM: sample whenever the reasoner has caught up. Requests with a
    LatentPolicy ask it first (`runtime` is needed for them)."""

    def __init__(self, runtime: LatentRuntime | None = None):
        self.runtime = runtime
        # seq_id -> the unfinished requests with a LatentPolicy (the engine calls finish_latent)
        self.latent_requests: dict[int, LatentRequest] = {}
        self._finished: list[tuple[int, LatentRequest]] = []   # finished in this step

    def start(self, seq) -> None:
        template = seq.params.latent_policy
        if template is None:
            return
        if self.runtime is None:
            raise ValueError("this engine's policy was built without a LatentRuntime: it cannot run latent policies")
        state = LatentRequest(template, PolicyContext(seq, self.runtime))
        # the sequence keeps no reference to the user's policy once it finished (close()):
        # plain data only (the native step may name a sequence after it finished)
        params = copy.copy(seq.params)
        params.latent_policy = None
        seq.params = params
        seq.latent = state
        self.latent_requests[seq.seq_id] = state

    def after_forward(self, chunks, hidden: StepHidden) -> tuple[list, torch.Tensor | None, list]:
        due = [i for i, c in enumerate(chunks) if c.completes]
        if not due:
            return [], None, []
        if not self.latent_requests:
            return [chunks[i].seq for i in due], hidden.last_rows(due), []
        return self._latent_after_forward(chunks, hidden, due)

    def after_sample(self, seqs, token_ids: list[int]) -> None:
        """Every sampled token, once appended (the one that ended a request too):
        on_token. Then the requests that finished in this step let their policies go."""
        if not self.latent_requests and not self._finished:
            return
        finished = dict(self._finished)
        for seq, token_id in zip(seqs, token_ids):
            state = self.latent_requests.get(seq.seq_id) or finished.get(seq.seq_id)
            if state is not None and state.policy is not None:
                state.policy.on_token(state.ctx, token_id)
        self.close_finished()

    def after_tokens(self, seqs, token_ids: list[int]) -> list:
        return []

    # ---- requests with a LatentPolicy ----------------------------------------------
    def finish_latent(self, seq) -> None:
        """A request with a LatentPolicy finished (or was aborted): its last on_token
        may still be due in this step (after_sample), then close_finished lets it go."""
        state = self.latent_requests.pop(seq.seq_id, None)
        if state is not None:
            self._finished.append((seq.seq_id, state))

    def close_finished(self) -> None:
        for _, state in self._finished:
            state.close()
        self._finished.clear()

    def _latent_after_forward(self, chunks, hidden: StepHidden, due: list[int]):
        """Ask each due request's policy what follows; SAMPLE rows are returned, Insert
        and Feed are appended to the reasoner (the room rule decides if they fit)."""
        sample, ended = [], []
        runtime = self.runtime
        for i in due:
            seq = chunks[i].seq
            state = self.latent_requests.get(seq.seq_id)
            if state is None:
                sample.append(i)
                continue
            if state.policy is None:
                state.begin()      # new_request + on_start, before the first on_hidden
            action = state.policy.on_hidden(state.ctx, hidden.last(i))
            if action is SAMPLE:
                sample.append(i)
                continue
            if isinstance(action, Insert):
                rows = runtime.embeddings_of(action, state.policy)
                k = rows.shape[0]
            elif isinstance(action, Feed):
                ids = runtime.tokens_of(action, state.policy)
                k = len(ids)
            else:
                raise TypeError(f"{type(state.policy).__name__}.on_hidden must return SAMPLE, Insert(...) or "
                                f"Feed(...), got {action!r}")
            # The room rule (as MemGen's): k positions go in only if they and the token
            # they precede fit in max_model_len; otherwise the request ends here ("length").
            if seq.reasoner.num_tokens + k + 1 > runtime.max_model_len:
                ended.append(seq)
                state.close()     # no more calls: it ends before its next token
            elif isinstance(action, Insert):
                seq.reasoner.append_embeds(rows)
                state.num_inserted += k
            else:
                seq.reasoner.append_tokens(ids)
                state.num_fed += k
        if not sample:
            return [], None, ended
        return [chunks[i].seq for i in sample], hidden.last_rows(sample), ended
