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
