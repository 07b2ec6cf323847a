"""Training losses on the fast forward (memgen.hf.fast_forward): the same
numbers as the step-by-step `sft_forward` path (tests/test_train_fast.py,
float64), for a whole batch of forwards at once.

Forwards are grouped before they run: forwards whose tokens before their first
latent block nest (the turns of one conversation, the completions of one GRPO
prompt) run as one group that computes that shared prefix once; the other
forwards run together as independent rows. The step-by-step path stays
available as the oracle (SFTConfig.forward / GRPOConfig.forward = "step"; the
default under reference_compat: use_fast).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from memgen.hf.fast_forward import (RowPlan, decoder_rows, forward_rows, lm_logits, nested_prefix, plan_row,
                                    supports_fast_forward)

from .data import IGNORE

FORWARDS = ("fast", "step")


def check_forward(name: str | None) -> None:
    if name is not None and name not in FORWARDS:
        raise ValueError(f"forward must be one of {FORWARDS} (or None), got {name!r}")


def use_fast(model, forward: str | None, reference_compat: bool = False) -> bool:
    """Whether to run the fast path on `model`. forward None: "fast", except
    under reference_compat, which runs the reference's own step-by-step order
    of operations (transformers' RMSNorm rounds to float32 even in a float64
    model, so two orders of the same sums agree to ~1e-8 there, not 1e-12).
    "fast" falls back to the step-by-step forward on models it does not cover."""
    check_forward(forward)
    if forward is None:
        forward = "step" if reference_compat else "fast"
    return forward == "fast" and supports_fast_forward(model) is None


def _logits_dtype(logits: Tensor) -> Tensor:
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


def groups(plans: list[RowPlan]) -> list[tuple[list[int], bool]]:
    """(row indices, share their prefix) for one forward_rows call each: runs of
    consecutive rows that nest (nested_prefix) share; the rest run together."""
    runs: list[list[int]] = []
    for i, plan in enumerate(plans):
        if runs and nested_prefix([plans[j] for j in runs[-1]] + [plan]):
            runs[-1].append(i)
        else:
            runs.append([i])
    shared = [(run, True) for run in runs if len(run) > 1]
    alone = [run[0] for run in runs if len(run) == 1]
    return shared + ([(alone, False)] if alone else [])


def supervised_logits(model, rows: Sequence[tuple[list[int], list[int], list[int] | None]]) \
        -> list[tuple[Tensor, Tensor]]:
    """For each (input_ids, labels, attention_mask or None) row: (logits at the
    rows t with labels[t + 1] supervised [n, V], those labels [n]): what
    sft_forward(ids, labels, mask).logits[t] gives there."""
    plans = [plan_row(model, list(ids), list(labels), mask) for ids, labels, mask in rows]
    out: list[tuple[Tensor, Tensor] | None] = [None] * len(plans)
    for members, share in groups(plans):
        hidden = forward_rows(model, [plans[i] for i in members], share_prefix=share)
        for i, h in zip(members, hidden):
            labels = rows[i][1]
            target = torch.tensor([labels[t + 1] for t in plans[i].reads], device=h.device)
            out[i] = (_logits_dtype(lm_logits(model.reasoner, h)), target)
    return out


def loss_sum(model, rows: Sequence[tuple[list[int], list[int]]]) -> Tensor:
    """Summed shifted cross-entropy over every row's supervised tokens (rows:
    (input_ids, labels) of single-turn forwards), with one autograd graph."""
    pairs = supervised_logits(model, [(ids, labels, None) for ids, labels in rows])
    logits = torch.cat([p[0] for p in pairs])
    target = torch.cat([p[1] for p in pairs])
    return torch.nn.functional.cross_entropy(logits, target, reduction="sum")


def token_logprobs(model, rows: Sequence[tuple[list[int], list[int], list[int] | None]],
                   temperature: float = 1.0) -> list[Tensor]:
    """Per row, log p(labels[t + 1]) under logits / temperature at every
    supervised label after the first token: weaver GRPO's log-probabilities."""
    out = []
    for logits, target in supervised_logits(model, rows):
        logp = torch.log_softmax(logits / temperature, dim=-1)
        out.append(logp.gather(-1, target[:, None]).squeeze(-1))
    return out


def trigger_logprobs(model, rows: Sequence[tuple[list[int], list[int] | None, int, list[int]]],
                     temperature: float | None = 1.0) -> list[Tensor]:
    """Per (input_ids, attention_mask or None, prompt length P, decisions) row:
    log p(decision j) for every decision that is not IGNORE, from the trigger's
    hidden state at position P - 1 + j (its LM head is never computed), the
    logits divided by `temperature` (None: raw). Rows of one prompt (same ids
    and mask before P, consecutive) run that prompt once."""
    out: list[Tensor | None] = [None] * len(rows)
    runs: list[list[int]] = []
    for i, (ids, mask, p, _) in enumerate(rows):
        if runs:
            ids0, mask0, p0, _ = rows[runs[-1][0]]
            if p == p0 and ids[:p] == ids0[:p] and (mask or [1] * p)[:p] == (mask0 or [1] * p)[:p]:
                runs[-1].append(i)
                continue
        runs.append([i])
    alone = [r[0] for r in runs if len(r) == 1]
    calls = [(r, rows[r[0]][2]) for r in runs if len(r) > 1] + ([(alone, 0)] if alone else [])
    for members, shared in calls:
        ids = [list(rows[i][0]) for i in members]
        masks = [list(rows[i][1]) if rows[i][1] is not None else [1] * len(rows[i][0]) for i in members]
        reads = [[rows[i][2] - 1 + j for j, d in enumerate(rows[i][3]) if d != IGNORE] for i in members]
        hidden = decoder_rows(model.trigger, ids, masks, reads, shared)
        for i, h in zip(members, hidden):
            logits = _logits_dtype(model.trigger_head(h))
            if temperature is not None:
                logits = logits / temperature
            taken = torch.tensor([d for d in rows[i][3] if d != IGNORE], device=h.device)
            out[i] = torch.log_softmax(logits, dim=-1).gather(-1, taken[:, None]).squeeze(-1)
    return out


def policy_logprobs(model, rows, config) -> list[Tensor]:
    """GRPO's log-probs of scored rows (grpo.PolicyRow: input_ids,
    attention_mask, prompt_len, targets) for config.role, as
    grpo.row_logprobs gives them one row at a time."""
    if config.role == "weaver":
        return token_logprobs(model, [(r.input_ids, [IGNORE] * r.prompt_len + list(r.targets), r.attention_mask)
                                      for r in rows], config.temperature)
    return trigger_logprobs(model, [(r.input_ids, r.attention_mask, r.prompt_len, r.targets) for r in rows],
                            None if config.reference_compat else config.trigger_temperature)
