"""GRPO rollouts through the engine: `num_generations` samples per prompt in one
`LLM.generate` call (each sample its own seed, so a sample does not depend on
its batch), scored with the `memgen eval` task scorers.

Sampling follows the reference trainers (spec §3.3-§3.4): the reasoner samples
at the GRPO temperature (1.0); weaver GRPO keeps the trigger's argmax
(`trigger_do_sample=False`), trigger GRPO samples the trigger decisions at the
trigger temperature.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from memgen.outputs import NOT_CONSULTED
from memgen.sampling_params import SamplingParams


@dataclass
class Rollout:
    group: int                     # index of its prompt in the step
    prompt_ids: list[int]
    completion_ids: list[int]      # up to and including EOS when emitted
    augmentation: list[int]        # per completion token: -100 / 0 / 1 (entry 0 = the prompt decision)
    text: str
    finish_reason: str
    reward: float = 0.0
    details: dict = field(default_factory=dict)

    @property
    def num_decisions(self) -> int:
        return sum(1 for d in self.augmentation if d != NOT_CONSULTED)

    @property
    def num_insertions(self) -> int:
        return sum(1 for d in self.augmentation if d == 1)


def sample_groups(llm, prompts: list[list[int]], num_generations: int, max_tokens: int,
                  temperature: float = 1.0, seed: int = 0, trigger_sample: bool = False,
                  trigger_temperature: float | None = None) -> list[Rollout]:
    """num_generations rollouts per prompt, grouped: rollout g * n + j is
    sample j of prompt g, sampled with seed `seed + g * n + j`."""
    if num_generations < 1:
        raise ValueError(f"num_generations must be >= 1, got {num_generations}")
    n = num_generations
    params = [SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed + g * n + j,
                             trigger_sample=trigger_sample, trigger_temperature=trigger_temperature)
              for g in range(len(prompts)) for j in range(n)]
    outs = llm.generate([p for p in prompts for _ in range(n)], params, use_tqdm=False)
    return [Rollout(group=i // n, prompt_ids=list(o.prompt_token_ids), completion_ids=list(o.token_ids),
                    augmentation=list(o.augmentation), text=o.text, finish_reason=o.finish_reason)
            for i, o in enumerate(outs)]


RewardFn = Callable[[Rollout, dict], float]


def task_reward(task: str | None = None, code_timeout: float = 5.0) -> RewardFn:
    """A reward function from `memgen.eval.tasks`: the record's task (or
    `task`, or the one its fields imply) scored on the rollout's text."""
    from memgen.eval.tasks import infer_task, score

    def reward(rollout: Rollout, record: dict) -> float:
        name = task or record.get("task") or infer_task(record)
        if name is None:
            raise ValueError(f"record {record.get('id')!r} has no reference to score against "
                             "(needs answer, aliases or tests)")
        s = score(name, rollout.text, record, code_timeout=code_timeout)
        rollout.details["extracted"] = s.extracted
        return float(s.value)

    return reward


def score_rollouts(rollouts: list[Rollout], records: list[dict], reward_fn: RewardFn) -> list[float]:
    """Set and return each rollout's reward; records[g] is the record of group g."""
    for r in rollouts:
        r.reward = float(reward_fn(r, records[r.group]))
    return [r.reward for r in rollouts]
