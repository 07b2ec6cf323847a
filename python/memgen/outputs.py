"""What `LLM.generate` returns: one RequestOutput per prompt, in prompt order."""
from __future__ import annotations

from dataclasses import dataclass, field

# the augmentation mask's values (the reference's): the decision taken before a token
NOT_CONSULTED, SKIP, INSERT = -100, 0, 1


@dataclass
class CompletionOutput:
    """One of a prompt's n completions (SamplingParams.n)."""
    index: int
    token_ids: list[int]
    text: str
    augmentation: list[int]
    logprobs: list[dict[int, float]] | None
    finish_reason: str
    metrics: dict = field(default_factory=dict)
    policy_record: list | None = None    # the LatentPolicy's `record` (None without a latent policy)


@dataclass
class RequestOutput:
    """One prompt's result; the top-level completion fields are outputs[0]'s (vLLM's
    shape, kept flat for n=1)."""
    prompt_token_ids: list[int]
    token_ids: list[int]                 # generated ids, up to and including EOS when emitted
    text: str                            # decoded generation, special tokens skipped
    augmentation: list[int]              # per generated token: -100 / 0 / 1 (all -100 for a plain LLM)
    logprobs: list[dict[int, float]] | None
    finish_reason: str                   # "stop" | "length"
    metrics: dict = field(default_factory=dict)
    outputs: list[CompletionOutput] = field(default_factory=list)   # all n completions, by index
    policy_record: list | None = None    # outputs[0]'s: its LatentPolicy's `record` (None without one)
    # time_to_first_token_s, total_s, num_insertions, num_trigger_calls, num_latent_positions,
    # num_cached_prompt_tokens, num_preemptions


@dataclass(slots=True)
class EngineOutput:
    """What one engine step did to one request (vLLM v1's EngineCoreOutput), as plain data:
    `LLMEngine.step()` returns one per request that changed, `LLMEngine.abort()` one per
    request it took out. `finish_reason`, `metrics` and `policy_record` are set only in
    the request's last output."""
    request_id: int                          # what LLMEngine.add_request returned
    new_token_ids: list[int]                 # sampled in this step (at most one)
    new_logprobs: list[dict[int, float]] | None   # theirs (None: the request asked for none)
    new_augmentation: list[int]              # theirs: -100 not consulted, 0 skipped, 1 inserted
    finish_reason: str | None = None         # "stop" | "length" | "abort" once it ended
    metrics: dict | None = None              # the final metrics (RequestOutput.metrics)
    policy_record: list | None = None        # its LatentPolicy's record (None without one)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class _Progress:
    """One request as the builder has seen it so far."""
    __slots__ = ("augmentation", "finish_reason", "index", "logprobs", "metrics", "policy_record",
                 "prompt_token_ids", "stop", "token_ids")

    def __init__(self, prompt_token_ids: list[int], params, index: int):
        self.prompt_token_ids, self.index, self.stop = list(prompt_token_ids), index, params.stop
        self.token_ids: list[int] = []
        self.logprobs: list | None = [] if params.logprobs is not None else None
        self.augmentation: list[int] = []
        self.finish_reason = self.metrics = self.policy_record = None


class OutputBuilder:
    """The one output path: turns the EngineOutputs of the requests it was told about
    (`add`) into CompletionOutput / RequestOutput. `LLM.generate`, `LLM.stream`, the
    server's engine loop and the benchmarks all build their outputs with it; outputs of
    requests it does not know are ignored.

        builder = OutputBuilder(llm.tokenizer)
        rid = builder.add(engine.add_request(ids, params), ids, params)
        while not builder.finished(rid):
            builder.update(engine.step())
        out = builder.request_output([rid])
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._requests: dict[int, _Progress] = {}

    def detokenize(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def add(self, request_id: int, prompt_token_ids: list[int], params, index: int = 0) -> int:
        """Follow a request (`index`: its completion's index among its prompt's n); returns its id."""
        self._requests[request_id] = _Progress(prompt_token_ids, params, index)
        return request_id

    def update(self, outputs: list[EngineOutput]) -> None:
        for out in outputs:
            req = self._requests.get(out.request_id)
            if req is None:
                continue
            req.token_ids += out.new_token_ids
            if req.logprobs is not None and out.new_logprobs is not None:
                req.logprobs += out.new_logprobs
            req.augmentation += out.new_augmentation
            if out.finish_reason is not None:
                req.finish_reason, req.metrics, req.policy_record = out.finish_reason, out.metrics, out.policy_record

    def finished(self, request_id: int) -> bool:
        return self._requests[request_id].finish_reason is not None

    def token_ids(self, request_id: int) -> list[int]:
        """The request's generated token ids so far (the builder's list: do not change it)."""
        return self._requests[request_id].token_ids

    def progress(self, request_id: int) -> tuple[list[int], list | None, list[int]]:
        """(token ids, logprobs or None, augmentation) so far (the builder's lists: read them)."""
        req = self._requests[request_id]
        return req.token_ids, req.logprobs, req.augmentation

    def completion(self, request_id: int) -> CompletionOutput:
        """The finished request's CompletionOutput; the text ends before a stop string."""
        req = self._requests[request_id]
        text = self.detokenize(req.token_ids)
        if req.finish_reason == "stop" and req.stop:
            text = text[:min((i for i in (text.find(s) for s in req.stop) if i >= 0), default=len(text))]
        return CompletionOutput(index=req.index, token_ids=list(req.token_ids), text=text,
                                augmentation=list(req.augmentation),
                                logprobs=None if req.logprobs is None else list(req.logprobs),
                                finish_reason=req.finish_reason, metrics=req.metrics, policy_record=req.policy_record)

    def request_output(self, request_ids: list[int]) -> RequestOutput:
        """One prompt's RequestOutput from its n finished completions (in index order)."""
        completions = [self.completion(r) for r in request_ids]
        first = completions[0]
        return RequestOutput(prompt_token_ids=list(self._requests[request_ids[0]].prompt_token_ids),
                             token_ids=first.token_ids, text=first.text, augmentation=first.augmentation,
                             logprobs=first.logprobs, finish_reason=first.finish_reason, metrics=first.metrics,
                             outputs=completions, policy_record=first.policy_record)

    def forget(self, request_ids) -> None:
        for r in request_ids:
            self._requests.pop(r, None)
