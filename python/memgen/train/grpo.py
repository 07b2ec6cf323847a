"""Weaver GRPO and trigger GRPO (spec §3.3, §3.4) with rollouts from the engine
and a live weight push after every optimizer step.

One step:
  1. rollouts: `num_generations` samples for each of `prompts_per_step` prompts
     through `LLM.generate` (rollout.py), scored by the task scorers;
  2. trigger GRPO only: the reward-adaptive penalty (below) is subtracted;
  3. advantages per group: A_i = (R_i - mean_group) / (std_group + 1e-4),
     std unbiased, as TRL 0.21 computes it;
  4. clipped surrogate, no KL (beta = 0 in every reference config):
        l_t = -min(r_t A, clip(r_t, 1 - eps_low, 1 + eps_high) A),  r_t = exp(logp_t - old_logp_t)
     aggregated by loss_type: "grpo" (mean per sequence, then over sequences),
     "bnpo" (sum / all valid positions), "dr_grpo" (sum / (N * max_completion_length));
     with num_iterations == 1, old_logp is logp detached (TRL), so r_t = 1;
  5. optimizer step (num_iterations of them), then
     `llm.update_memgen_weights(model.to_checkpoint())` before the next rollouts.

Log-probabilities:
  - weaver: `sft_forward` over prompt + completion (labels -100 on the prompt
    and on "<|im_start|>assistant\\n" runs, as the reference's forward), logits
    / temperature, at every supervised completion token. Like the reference it
    places latents at the first `max_inference_aug_num` delimiters, which are
    the rollout's own points when the trigger is inactive (every reference
    config); with an active trigger the two may differ (the reference's choice).
  - trigger: one trigger forward over prompt + completion, logits / trigger
    temperature (the temperature the decisions were sampled at), at the
    rollout's decision positions: decision j (before completion token j)
    reads position P - 1 + j. The mask is `ids != pad`, the mask the trigger
    saw while deciding (the reference trainer uses the prompt/completion
    masks instead, which differ only where pad == eos).

reference_compat=True reproduces the reference trainers' losses
(docs/training.md has the table of departures and their measured effects):
  - weaver: the reference pads a generation batch's completions to its
    longest with EOS (not pad) after each one's first EOS, builds the mask as
    `ids != pad` over prompt and completion, and uses it as the completion
    mask, the attention mask and the labels: it trains on those EOS copies
    and counts them in the loss's denominator. Here the copies reach the
    longest completion of the step's rollouts (the reference's generation
    batch at its released batch size: one prompt's group). By default the
    completion ends at its first EOS: what follows is no text the policy
    produced, and training it to repeat EOS is wrong.
  - trigger: log-probs from the raw trigger logits (the reference ignores the
    trigger temperature; the same at the released 1.0) under the reference's
    mask: all ones over the prompt and the completion up to its first EOS.
  - the first warm-up step's learning rate is 0, as transformers' schedule;
  - no reward-adaptive penalty (the reference code has none).

The reward-adaptive penalty (paper Eq. 8-9, absent from the reference code,
spec §0.5; on by default for trigger GRPO). The objective is
    max E[ R(tau_i) - lambda * max(0, d_i - p_bar) ]
Our reading, stated so it can be checked:
  - d_i: the insertion rate of rollout i = insertions / decisions taken (every
    entry of its augmentation mask that is not -100, the prompt decision
    included), i.e. the fraction of consulted points where it invoked the weaver;
  - p_bar: the mean insertion rate of the high-reward rollouts of the step,
    H = {i : R_i > 0 and R_i >= mean reward of i's group} (for 0/1 rewards:
    the correct rollouts); when H is empty there is no reference rate and no
    penalty;
  - the penalty is part of the return, so it is subtracted from R_i before the
    group normalisation: a rollout is penalised only for inserting more often
    than rewarded rollouts do, and not at all below that rate.
The paper writes the penalty as a sum over decisions j of max(0, d_ij - p_bar);
with binary d_ij that sum is (#insertions) * (1 - p_bar), which
`penalty_form="per_decision"` computes instead of the rate form.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .common import ROLES, clip_and_step, freeze_for, loss_logits, make_optimizer, make_scheduler
from .data import ASSISTANT_HEADER, IGNORE, encode_prompt, mask_assistant_header
from .fast import check_forward, use_fast
from .rollout import Rollout, RewardFn, sample_groups, score_rollouts, task_reward

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo")
PENALTY_FORMS = ("rate", "per_decision")


@dataclass
class GRPOConfig:
    role: str = "weaver"                 # "weaver" | "trigger"
    num_generations: int = 8             # samples per prompt (the group)
    prompts_per_step: int = 1            # reference: per-device batch 8 = 8 samples of one prompt
    max_completion_length: int = 512
    temperature: float = 1.0             # reasoner sampling temperature in rollouts
    trigger_temperature: float = 1.0     # trigger GRPO: trigger sampling temperature
    learning_rate: float = 1e-5
    epochs: int = 1
    max_steps: int | None = None
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    loss_type: str = "bnpo"
    epsilon: float = 0.2
    epsilon_high: float | None = None    # None -> epsilon
    num_iterations: int = 1              # optimisation passes per batch of rollouts
    advantage_eps: float = 1e-4
    penalty_lambda: float = 0.1          # trigger GRPO; 0 (or reference_compat) turns the penalty off
    penalty_form: str = "rate"
    seed: int = 42
    reference_compat: bool = False       # the reference trainers' losses (module docstring)
    # log-probs: "fast" (memgen.train.fast: the rows of a step in one pass, a group's prompt once,
    # the same numbers) or "step" (one row at a time, the oracle); None: fast, step under reference_compat
    forward: str | None = None

    def validate(self) -> None:
        check_forward(self.forward)
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {self.role!r}")
        for name in ("num_generations", "prompts_per_step", "max_completion_length", "epochs", "num_iterations"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if self.penalty_form not in PENALTY_FORMS:
            raise ValueError(f"penalty_form must be one of {PENALTY_FORMS}, got {self.penalty_form!r}")
        if self.penalty_lambda < 0:
            raise ValueError(f"penalty_lambda must be >= 0, got {self.penalty_lambda}")
        if not self.temperature > 0 or not self.trigger_temperature > 0:
            raise ValueError("GRPO samples: temperature and trigger_temperature must be > 0")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")


# ---------------------------------------------------------------- pure pieces
def group_advantages(rewards: Tensor, group_size: int, eps: float = 1e-4) -> Tensor:
    """(R - group mean) / (group std + eps); rewards grouped consecutively."""
    r = rewards.double().view(-1, group_size)
    std = r.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(r[:, :1])
    return ((r - r.mean(dim=1, keepdim=True)) / (std + eps)).view(-1)


def insertion_rates(augmentations: list[list[int]]) -> Tensor:
    """Per rollout: insertions / decisions taken (0 when it took none)."""
    rates = []
    for aug in augmentations:
        taken = [d for d in aug if d != IGNORE]
        rates.append(sum(1 for d in taken if d == 1) / len(taken) if taken else 0.0)
    return torch.tensor(rates, dtype=torch.float64)


def reference_rate(rewards: Tensor, rates: Tensor, group_size: int) -> float | None:
    """p_bar: the mean insertion rate of the high-reward rollouts (module
    docstring); None when no rollout is high-reward."""
    r = rewards.double()
    group_mean = r.view(-1, group_size).mean(dim=1).repeat_interleave(group_size)
    high = (r > 0) & (r >= group_mean)
    return float(rates[high].mean()) if bool(high.any()) else None


def trigger_penalty(rewards: Tensor, augmentations: list[list[int]], group_size: int, lam: float,
                    form: str = "rate") -> tuple[Tensor, float | None]:
    """(per-rollout penalty to subtract from the reward, p_bar)."""
    rates = insertion_rates(augmentations)
    p_bar = reference_rate(rewards, rates, group_size)
    if p_bar is None or lam == 0:
        return torch.zeros_like(rates), p_bar
    if form == "rate":
        return lam * (rates - p_bar).clamp(min=0), p_bar
    if form == "per_decision":
        counts = torch.tensor([sum(1 for d in a if d == 1) for a in augmentations], dtype=torch.float64)
        return lam * counts * max(0.0, 1.0 - p_bar), p_bar
    raise ValueError(f"penalty form must be one of {PENALTY_FORMS}, got {form!r}")


def surrogate(logp: Tensor, old_logp: Tensor, advantage: float | Tensor, eps_low: float,
              eps_high: float) -> Tensor:
    """Per-position clipped surrogate loss -min(r A, clip(r) A)."""
    ratio = torch.exp(logp - old_logp)
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    return -torch.min(ratio * advantage, clipped * advantage)


def row_weights(lengths: list[int], loss_type: str, max_completion_length: int) -> list[float]:
    """Weight of each row's summed per-position loss in the step's loss."""
    n = len(lengths)
    if loss_type == "grpo":
        return [1.0 / (n * max(l, 1)) for l in lengths]
    if loss_type == "bnpo":
        total = max(sum(lengths), 1)
        return [1.0 / total] * n
    if loss_type == "dr_grpo":
        return [1.0 / (n * max_completion_length)] * n
    raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")


def grpo_loss(logps: list[Tensor], old_logps: list[Tensor], advantages: Tensor, loss_type: str = "bnpo",
              eps_low: float = 0.2, eps_high: float = 0.2, max_completion_length: int = 512) -> Tensor:
    """The step's loss from per-row valid-position log-probs (a reference for
    the row-at-a-time accumulation in GRPOTrainer.step)."""
    weights = row_weights([len(lp) for lp in logps], loss_type, max_completion_length)
    return sum(w * surrogate(lp, old, a, eps_low, eps_high).sum()
               for w, lp, old, a in zip(weights, logps, old_logps, advantages))


# ------------------------------------------------------------- scored rows
@dataclass
class PolicyRow:
    """One rollout as the loss scores it: the ids one forward runs over, its
    attention mask (None: all ones), the prompt length, and per completion
    position the target (the token for the weaver, the decision for the
    trigger; IGNORE where nothing is scored)."""
    input_ids: list[int]
    attention_mask: list[int] | None
    prompt_len: int
    targets: list[int]

    @property
    def num_valid(self) -> int:
        return sum(1 for t in self.targets if t != IGNORE)


def weaver_row(prompt_ids: list[int], completion_ids: list[int], header_ids: list[int] | None = None,
               reference_width: int | None = None, eos: int | None = None, pad: int | None = None) -> PolicyRow:
    """The weaver's scored row. Default: the completion as rolled out (ending
    at its first EOS), every token scored but "<|im_start|>assistant\\n" runs
    (the reference's forward masks them). With reference_width (reference
    compat): the reference's row, EOS after the first EOS up to
    reference_width tokens, mask `ids != pad`, scored where the mask is 1."""
    completion = list(completion_ids)
    mask = None
    if reference_width is not None:
        if eos is None or pad is None:
            raise ValueError("the reference's row needs the eos and pad ids")
        if eos in completion:
            completion = completion[:completion.index(eos) + 1]
            completion += [eos] * (reference_width - len(completion))
        ids = list(prompt_ids) + completion
        mask = [int(t != pad) for t in ids]
        targets = [t if m else IGNORE for t, m in zip(completion, mask[len(prompt_ids):])]
    else:
        ids = list(prompt_ids) + completion
        targets = completion
    labels = [IGNORE] * len(prompt_ids) + targets
    if header_ids:
        labels = mask_assistant_header(ids, labels, header_ids)
    return PolicyRow(ids, mask, len(prompt_ids), labels[len(prompt_ids):])


def trigger_row(prompt_ids: list[int], completion_ids: list[int], augmentation: list[int], pad: int | None,
                reference_mask: bool = False) -> PolicyRow:
    """The trigger's scored row: decisions as targets. Mask `ids != pad` (what
    the trigger saw while deciding), or all ones with reference_mask (the
    reference trainer's prompt mask ++ completion mask up to the first EOS;
    a rollout ends at its first EOS)."""
    ids = list(prompt_ids) + list(completion_ids)
    mask = None if reference_mask or pad is None else [int(t != pad) for t in ids]
    return PolicyRow(ids, mask, len(prompt_ids), list(augmentation))


def _mask_tensor(row: PolicyRow, device) -> Tensor:
    if row.attention_mask is None:
        return torch.ones(len(row.input_ids), dtype=torch.long, device=device)
    return torch.tensor(row.attention_mask, dtype=torch.long, device=device)


def weaver_row_logprobs(model, row: PolicyRow, temperature: float = 1.0) -> Tensor:
    """Log-probs of the row's scored completion tokens under the
    weaver-augmented reasoner (sft_forward), logits / temperature."""
    device = model.device
    p = row.prompt_len
    ids = torch.tensor(row.input_ids, device=device)
    labels = torch.tensor([IGNORE] * p + row.targets, device=device)
    out = model.sft_forward(ids, labels, _mask_tensor(row, device))
    logits = loss_logits(out.logits[p - 1:-1]) / temperature
    logp = torch.log_softmax(logits, dim=-1).gather(-1, ids[p:, None]).squeeze(-1)
    return logp[labels[p:] != IGNORE]


def trigger_row_logprobs(model, row: PolicyRow, temperature: float | None = 1.0) -> Tensor:
    """Log-probs of the row's trigger decisions from one trigger forward over
    prompt + completion: decision j reads position P-1+j. temperature None:
    the raw logits (reference compat)."""
    from memgen.hf import positions_from_mask

    device = model.device
    ids = torch.tensor([row.input_ids], device=device)
    mask = _mask_tensor(row, device)[None]
    hidden = model.trigger(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask),
                           output_hidden_states=True).hidden_states[-1][0]
    p, n = row.prompt_len, len(row.targets)
    logits = loss_logits(model.trigger_head(hidden[p - 1:p - 1 + n]))
    if temperature is not None:
        logits = logits / temperature
    decisions = torch.tensor(row.targets, device=device)
    taken = decisions != IGNORE
    logp = torch.log_softmax(logits, dim=-1)
    return logp[taken].gather(-1, decisions[taken][:, None]).squeeze(-1)


def weaver_logprobs(model, prompt_ids: list[int], completion_ids: list[int], temperature: float = 1.0,
                    header_ids: list[int] | None = None) -> Tensor:
    """Log-probs of the supervised completion tokens under the weaver-augmented
    reasoner (sft_forward), logits / temperature."""
    return weaver_row_logprobs(model, weaver_row(prompt_ids, completion_ids, header_ids), temperature)


def trigger_logprobs(model, prompt_ids: list[int], completion_ids: list[int], augmentation: list[int],
                     temperature: float | None = 1.0, reference_mask: bool = False) -> Tensor:
    """Log-probs of the rollout's trigger decisions (entries != -100), from one
    trigger forward over prompt + completion; decision j reads position P-1+j."""
    row = trigger_row(prompt_ids, completion_ids, augmentation, model.tokenizer.pad_token_id, reference_mask)
    return trigger_row_logprobs(model, row, temperature)


def policy_rows(model, rollouts: list[Rollout], config: GRPOConfig, header_ids: list[int]) -> list[PolicyRow]:
    """The scored rows of a step's rollouts for config.role (and reference_compat)."""
    tok = model.tokenizer
    if config.role == "trigger":
        return [trigger_row(r.prompt_ids, r.completion_ids, r.augmentation, tok.pad_token_id,
                            config.reference_compat) for r in rollouts]
    width = max(len(r.completion_ids) for r in rollouts) if config.reference_compat else None
    return [weaver_row(r.prompt_ids, r.completion_ids, header_ids, width, tok.eos_token_id, tok.pad_token_id)
            for r in rollouts]


def row_logprobs(model, row: PolicyRow, config: GRPOConfig) -> Tensor:
    if config.role == "weaver":
        return weaver_row_logprobs(model, row, config.temperature)
    return trigger_row_logprobs(model, row, None if config.reference_compat else config.trigger_temperature)


def scored_logprobs(model, rows: list[PolicyRow], indices: list[int], config: GRPOConfig) -> dict[int, Tensor]:
    """Row index -> log-probs, for rows[i] with i in indices (config.forward's path)."""
    if use_fast(model, config.forward, config.reference_compat):
        from .fast import policy_logprobs

        return dict(zip(indices, policy_logprobs(model, [rows[i] for i in indices], config)))
    return {i: row_logprobs(model, rows[i], config) for i in indices}


def policy_loss_backward(model, rows: list[PolicyRow], advantages: Tensor, config: GRPOConfig,
                         old: dict[int, Tensor] | None = None) -> float:
    """Back-propagate the step's clipped-surrogate loss (gradients add into
    .grad); returns its value. forward="step": one row at a time; "fast": the
    rows in one pass and one backward. old: row index -> the log-probs the
    rollouts were scored under (default: the current ones detached, so every
    ratio is 1, as TRL with num_iterations == 1)."""
    weights = row_weights([r.num_valid for r in rows], config.loss_type, config.max_completion_length)
    eps_high = config.epsilon if config.epsilon_high is None else config.epsilon_high
    total = 0.0
    if use_fast(model, config.forward, config.reference_compat):
        # a zero advantage (or nothing to score) contributes exactly zero loss and gradient
        active = [i for i, row in enumerate(rows) if float(advantages[i]) != 0.0 and row.num_valid > 0]
        terms = [weights[i] * surrogate(logp, (old or {}).get(i, logp.detach()), float(advantages[i]),
                                        config.epsilon, eps_high).sum()
                 for i, logp in scored_logprobs(model, rows, active, config).items()]
        if not terms:
            return total
        loss = sum(terms)
        loss.backward()
        return float(loss.detach())
    for i, row in enumerate(rows):
        advantage = float(advantages[i])
        if advantage == 0.0 or row.num_valid == 0:   # contributes exactly zero loss and gradient
            continue
        logp = row_logprobs(model, row, config)
        ref = (old or {}).get(i, logp.detach())
        loss = weights[i] * surrogate(logp, ref, advantage, config.epsilon, eps_high).sum()
        loss.backward()
        total += float(loss.detach())
    return total


# ------------------------------------------------------------------ trainer
class GRPOTrainer:
    """GRPO for one role of an `HFMemGenModel`, rolling out with a MemGen `LLM`
    that holds the same weights (it is synced after every optimizer step).

        trainer = GRPOTrainer(model, llm, records, GRPOConfig(role="trigger"))
        history = trainer.train()

    records: eval-style dicts ("messages" or "prompt", plus "answer" / "aliases"
    / "tests", optional "task"); reward_fn(rollout, record) -> float defaults to
    the record's task scorer."""

    def __init__(self, model, llm, records: list[dict], config: GRPOConfig | None = None,
                 reward_fn: RewardFn | None = None, task: str | None = None):
        self.config = config or GRPOConfig()
        self.config.validate()
        if self.config.role == "trigger" and not model.settings.trigger_active:
            raise ValueError("trigger GRPO needs an active trigger (settings.trigger_active); "
                             "an inactive trigger always inserts and has nothing to learn")
        if not records:
            raise ValueError("GRPO needs at least one prompt record")
        self.model, self.llm, self.records = model, llm, list(records)
        self.reward_fn = reward_fn or task_reward(task)
        self.params = freeze_for(model, self.config.role)
        self.optimizer = make_optimizer(self.params, self.config.learning_rate, self.config.weight_decay)
        self.num_steps = self._num_steps()
        self.scheduler = make_scheduler(self.optimizer, self.config.lr_scheduler, self.num_steps,
                                        self.config.warmup_ratio, self.config.reference_compat)
        self.header_ids = list(model.tokenizer(ASSISTANT_HEADER, add_special_tokens=False)["input_ids"])
        self.step_count = 0

    def _num_steps(self) -> int:
        c = self.config
        steps = c.epochs * math.ceil(len(self.records) / c.prompts_per_step)
        return min(steps, c.max_steps) if c.max_steps else steps

    def rollouts(self, records: list[dict]) -> list[Rollout]:
        c = self.config
        prompts = [encode_prompt(self.model.tokenizer, rec) for rec in records]
        seed = c.seed + self.step_count * len(prompts) * c.num_generations
        trigger = c.role == "trigger"
        return sample_groups(self.llm, prompts, c.num_generations, c.max_completion_length, c.temperature,
                             seed=seed, trigger_sample=trigger,
                             trigger_temperature=c.trigger_temperature if trigger else None)

    def step(self, records: list[dict]) -> dict:
        """One GRPO step on `records` (one group each); returns its metrics."""
        c = self.config
        start = time.perf_counter()
        rollouts = self.rollouts(records)
        rollout_s = time.perf_counter() - start
        rewards = torch.tensor(score_rollouts(rollouts, records, self.reward_fn), dtype=torch.float64)
        shaped, p_bar = rewards, None
        penalty = torch.zeros_like(rewards)
        if c.role == "trigger" and c.penalty_lambda > 0 and not c.reference_compat:
            penalty, p_bar = trigger_penalty(rewards, [r.augmentation for r in rollouts], c.num_generations,
                                             c.penalty_lambda, c.penalty_form)
            shaped = rewards - penalty
        advantages = group_advantages(shaped, c.num_generations, c.advantage_eps)

        rows = policy_rows(self.model, rollouts, c, self.header_ids)
        old: dict[int, Tensor] = {}
        if c.num_iterations > 1:
            with torch.no_grad():
                old = scored_logprobs(self.model, rows, [i for i, row in enumerate(rows)
                                                         if float(advantages[i]) != 0.0 and row.num_valid > 0], c)

        lr = self.scheduler.get_last_lr()[0]
        self.model.train()
        losses, norms = [], []
        try:
            for _ in range(c.num_iterations):
                losses.append(policy_loss_backward(self.model, rows, advantages, c, old))
                norms.append(clip_and_step(self.params.values(), self.optimizer, self.scheduler, c.max_grad_norm))
        finally:
            self.model.eval()
        # the live-update path (no engine rebuild): the rollout engine's adapters are copied in place
        sync_start = time.perf_counter()
        self.llm.update_memgen_weights(self.model.to_checkpoint())
        weight_sync_s = time.perf_counter() - sync_start
        self.step_count += 1
        rates = insertion_rates([r.augmentation for r in rollouts])
        return {
            "step": self.step_count, "loss": sum(losses) / len(losses), "grad_norm": norms[-1],
            "lr": lr, "reward_mean": float(rewards.mean()),
            "reward_std": float(rewards.std()) if len(rewards) > 1 else 0.0,
            "shaped_reward_mean": float(shaped.mean()), "penalty_mean": float(penalty.mean()),
            "reference_rate": p_bar, "insertion_rate": float(rates.mean()),
            "completion_length": sum(len(r.completion_ids) for r in rollouts) / len(rollouts),
            "num_rollouts": len(rollouts), "weight_sync_s": weight_sync_s,
            "num_trained_rows": sum(1 for i, r in enumerate(rows) if float(advantages[i]) != 0.0 and r.num_valid > 0),
            "rollout_seconds": rollout_s, "seconds": time.perf_counter() - start,
        }

    def train(self, on_step: Callable[[dict], None] | None = None) -> list[dict]:
        """Epochs over the records, `prompts_per_step` per step, until num_steps."""
        c = self.config
        history: list[dict] = []
        rng = torch.Generator().manual_seed(c.seed)
        while self.step_count < self.num_steps:
            order = torch.randperm(len(self.records), generator=rng).tolist()
            for i in range(0, len(order), c.prompts_per_step):
                if self.step_count >= self.num_steps:
                    break
                record = self.step([self.records[j] for j in order[i:i + c.prompts_per_step]])
                history.append(record)
                if on_step is not None:
                    on_step(record)
        return history
