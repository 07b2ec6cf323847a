"""The reference's training losses written out plainly, for the float64 tests
of memgen.train (tests/test_train_reference.py). What they compute, as the
reference code and the libraries under it do (spec §3.1-§3.4):

  - sft_step_backward: transformers' Trainer step on `MemGenModel.forward(**kwargs)`:
    each micro-batch right-padded as TRL's collator pads it, its loss one
    token mean (`forward`), and the step's gradient the SUM of the micro-batch
    gradients (the Trainer passes num_items_in_batch and does not divide);
  - forward_loss: `MemGenModel.forward`: the assistant-header mask, the
    instruction / conversation choice from the first row, one row at a time,
    the conversational split with Python's global `random`, shifted CE;
  - weaver_grpo_loss: the rollout batch as the reference's interaction code
    builds it (left-padded prompts, completions cut to the batch's width with
    EOS after the first EOS, masks `ids != pad`) and WeaverGRPOTrainer's
    clipped surrogate (num_iterations 1: ratios 1);
  - trigger_grpo_loss: TriggerGRPOTrainer's per-decision log-probs (one
    trigger forward, logits at [P-1:-1], no temperature) and its loss.

This is the tests' own code, written from the reference's behaviour, not
copied from it. It uses only the components of an HFMemGenModel (reasoner,
PEFT weaver and trigger, projections, query latents, LayerNorms, scales,
trigger head) and shares no code with memgen.train or memgen.hf's forwards.
"""
from __future__ import annotations

import random

import torch
import torch.nn.functional as F

IGNORE = -100
DELIMITERS = (",", ".", "\n")


def positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0).masked_fill(mask == 0, 0)


def mask_headers(tokenizer, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """-100 on every "<|im_start|>assistant\\n" token run of each row."""
    pattern = tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False)
    out = labels.clone()
    for b in range(ids.shape[0]):
        row = ids[b].tolist()
        for i in range(len(row) - len(pattern) + 1):
            if row[i:i + len(pattern)] == pattern:
                out[b, i:i + len(pattern)] = IGNORE
    return out


def is_conversation(tokenizer, row: torch.Tensor) -> bool:
    pattern = tokenizer.encode("<|im_start|>", add_special_tokens=False) + \
        tokenizer.encode("assistant", add_special_tokens=False)
    seq = row.tolist()
    return sum(seq[i:i + len(pattern)] == pattern for i in range(len(seq) - len(pattern) + 1)) > 1


def single_turn_logits(model, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[1, S] ids, mask, labels -> [1, S, V]: the reference's `_forward`."""
    tok, s = model.tokenizer, ids.shape[1]
    prompt_points, inference_points = [], []
    for i in range(1, s):
        here, before = bool(labels[0, i] != IGNORE), bool(labels[0, i - 1] != IGNORE)
        if here and not before:
            prompt_points.append(i)
        elif here and before and tok.batch_decode(ids[:, :i])[0].endswith(DELIMITERS):
            inference_points.append(i)
    assert len(prompt_points) == 1, prompt_points
    points = sorted(prompt_points + inference_points[:model.settings.max_inference_aug_num])

    embeds = model.reasoner.get_input_embeddings()(ids)
    cur, cur_mask, latent_flags, start = embeds[:, :0], mask[:, :0], [], 0
    for point in points:
        cur = torch.cat([cur, embeds[:, start:point]], 1)
        cur_mask = torch.cat([cur_mask, mask[:, start:point]], 1)
        latent_flags += [False] * (point - start)
        kind = "prompt" if point == prompt_points[0] else "inference"
        q = getattr(model, f"{kind}_query_latents")
        q = getattr(model, f"{kind}_latent_ln")(q) * getattr(model, f"{kind}_latent_scale")
        k = q.shape[0]
        pos = positions(cur_mask)
        weaver_in = torch.cat([model.reasoner_to_weaver(cur), q[None]], 1)
        weaver_mask = torch.cat([cur_mask, torch.ones(1, k, dtype=cur_mask.dtype)], 1)
        weaver_pos = torch.cat([pos, pos.max(1).values[:, None] + 1 + torch.arange(k)], 1)
        hidden = model.weaver(inputs_embeds=weaver_in, attention_mask=weaver_mask, position_ids=weaver_pos,
                              output_hidden_states=True).hidden_states[-1][:, -k:]
        cur = torch.cat([cur, model.weaver_to_reasoner(hidden)], 1)
        cur_mask = torch.cat([cur_mask, torch.ones(1, k, dtype=cur_mask.dtype)], 1)
        latent_flags += [True] * k
        start = point
    cur = torch.cat([cur, embeds[:, start:]], 1)
    cur_mask = torch.cat([cur_mask, mask[:, start:]], 1)
    latent_flags += [False] * (s - start)
    logits = model.reasoner(inputs_embeds=cur, attention_mask=cur_mask, position_ids=positions(cur_mask)).logits
    keep = [not (j + 1 < len(latent_flags) and latent_flags[j + 1]) for j in range(len(latent_flags))]
    return logits[:, torch.tensor(keep)]


def conversation_logits(model, ids, mask, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's `_conversational_forward` on one [1, S] row: (logits, labels)."""
    s = ids.shape[1]
    sup = (labels[0] != IGNORE).int()
    diff = torch.diff(torch.cat([torch.zeros(1, dtype=sup.dtype), sup]))
    starts = (diff == 1).nonzero().flatten().tolist()
    ends = (diff == -1).nonzero().flatten().tolist()
    if len(ends) < len(starts):
        ends.append(s)
    triplets, prev = [], 0
    for st, en in zip(starts, ends):
        triplets.append((prev, st, en))
        prev = en
    k = model.settings.max_prompt_aug_num
    chosen = set(range(len(triplets))) if len(triplets) <= k else set(random.sample(range(len(triplets)), k))
    # the reference's buffer is in the default dtype; float64 here (spec §3.2 rule 7)
    all_logits = torch.zeros(1, s, len(model.tokenizer), dtype=model.reasoner.dtype)
    all_labels = torch.full((1, s), IGNORE)
    for t, (prev, st, en) in enumerate(triplets):
        if t not in chosen:
            continue
        turn_labels = torch.full((1, en), IGNORE)
        turn_labels[0, st:en] = labels[0, st:en]
        logits = single_turn_logits(model, ids[:, :en], mask[:, :en], turn_labels)
        all_logits[0, prev:en] = logits[0, prev:en]
        all_labels[0, prev:en] = labels[0, prev:en]
    return all_logits, all_labels


def forward_loss(model, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor,
                 return_all: bool = False):
    """`MemGenModel.forward` on a [B, S] batch: its token-mean loss."""
    labels = mask_headers(model.tokenizer, ids, labels)
    conversation = is_conversation(model.tokenizer, ids[0])
    logits, sup = [], []
    for b in range(ids.shape[0]):
        row = (ids[b:b + 1], mask[b:b + 1], labels[b:b + 1])
        if conversation:
            lg, lb = conversation_logits(model, *row)
        else:
            lg, lb = single_turn_logits(model, *row), row[2]
        logits.append(lg)
        sup.append(lb)
    logits, sup = torch.cat(logits), torch.cat(sup)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), sup[:, 1:].reshape(-1), ignore_index=IGNORE)
    return (loss, logits, sup) if return_all else loss


def collate_right(rows: list[tuple[list[int], list[int]]], pad: int):
    """TRL's collator: right padding, mask 0 and label -100 on the padding."""
    width = max(len(ids) for ids, _ in rows)
    ids = torch.tensor([r + [pad] * (width - len(r)) for r, _ in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r, _ in rows])
    labels = torch.tensor([lb + [IGNORE] * (width - len(lb)) for _, lb in rows])
    return ids, mask, labels


def sft_step_backward(model, micro_batches: list[list[tuple[list[int], list[int]]]]) -> float:
    """The Trainer's step: backward of each micro-batch's forward loss, summed."""
    total = 0.0
    for rows in micro_batches:
        loss = forward_loss(model, *collate_right(rows, model.tokenizer.pad_token_id))
        loss.backward()
        total += float(loss)
    return total


def _left_pad(rows: list[list[int]], pad: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([[pad] * (width - len(r)) + r for r in rows])


def _surrogate_loss(logp, advantages, valid, loss_type, eps=0.2, max_completion_length=None):
    ratio = torch.exp(logp - logp.detach())
    a = advantages[:, None]
    per_token = -torch.min(ratio * a, torch.clamp(ratio, 1 - eps, 1 + eps) * a)
    valid = valid.to(per_token.dtype)
    if loss_type == "grpo":
        return ((per_token * valid).sum(-1) / valid.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "bnpo":
        return (per_token * valid).sum() / valid.sum().clamp(min=1.0)
    return (per_token * valid).sum() / (valid.shape[0] * max_completion_length)


def weaver_grpo_loss(model, prompts: list[list[int]], completions: list[list[int]], advantages: torch.Tensor,
                     temperature: float = 1.0, loss_type: str = "bnpo", eos_copies: bool = True,
                     max_completion_length: int | None = None, filler: int = 5) -> torch.Tensor:
    """WeaverGRPOTrainer's loss on rollouts. The reference's generation runs
    every row to the batch's width (`filler` stands for what a finished row
    emits after its EOS); then everything after the first EOS becomes EOS and
    the masks are `ids != pad`. eos_copies=False: memgen's default instead,
    each completion cut after its first EOS and right-padded with pad."""
    tok = model.tokenizer
    pad, eos = tok.pad_token_id, tok.eos_token_id
    width = max(len(c) for c in completions)
    rows = []
    for c in completions:
        row = list(c) + [filler] * (width - len(c))
        if eos in row:
            first = row.index(eos)
            row = row[:first + 1] + ([eos] if eos_copies else [pad]) * (width - first - 1)
        rows.append(row)
    prompt_ids = _left_pad(prompts, pad)
    completion_ids = torch.tensor(rows)
    prompt_mask, completion_mask = (prompt_ids != pad).long(), (completion_ids != pad).long()
    ids = torch.cat([prompt_ids, completion_ids], 1)
    mask = torch.cat([prompt_mask, completion_mask], 1)
    labels = torch.cat([torch.full(prompt_ids.shape, IGNORE), completion_ids.masked_fill(completion_mask == 0, IGNORE)], 1)
    _, logits, sup = forward_loss(model, ids, mask, labels, return_all=True)
    c = completion_ids.shape[1]
    logits = logits[:, :-1][:, -c:] / temperature
    logp = torch.log_softmax(logits, -1).gather(-1, completion_ids[..., None]).squeeze(-1)
    valid = completion_mask * (sup[:, -c:] != IGNORE).long()
    return _surrogate_loss(logp, advantages, valid, loss_type, max_completion_length=max_completion_length)


def trigger_grpo_loss(model, prompts: list[list[int]], completions: list[list[int]], augmentations: list[list[int]],
                      advantages: torch.Tensor, temperature: float | None = None,
                      loss_type: str = "bnpo") -> torch.Tensor:
    """TriggerGRPOTrainer's loss: completions padded with EOS to the batch's
    width, mask = the tokenizer's prompt mask ++ 1 up to the first EOS,
    decision logits at [P-1:-1]; temperature None as the reference (a
    number: memgen's default, which divides by the sampling temperature)."""
    tok = model.tokenizer
    pad, eos = tok.pad_token_id, tok.eos_token_id
    width = max(len(c) for c in completions)
    prompt_ids = _left_pad(prompts, pad)
    prompt_mask = torch.tensor([[0] * (prompt_ids.shape[1] - len(p)) + [1] * len(p) for p in prompts])
    completion_ids = torch.tensor([list(c) + [eos] * (width - len(c)) for c in completions])
    completion_mask = torch.tensor([[1] * len(c) + [0] * (width - len(c)) for c in completions])
    aug = torch.tensor([list(a) + [IGNORE] * (width - len(a)) for a in augmentations])
    ids = torch.cat([prompt_ids, completion_ids], 1)
    mask = torch.cat([prompt_mask, completion_mask], 1)
    hidden = model.trigger(input_ids=ids, attention_mask=mask, position_ids=positions(mask),
                           output_hidden_states=True).hidden_states[-1]
    logits = model.trigger_head(hidden)[:, prompt_ids.shape[1] - 1:-1]
    if temperature is not None:
        logits = logits / temperature
    valid = aug != IGNORE
    logp = torch.log_softmax(logits, -1).gather(-1, aug.clamp(min=0)[..., None]).squeeze(-1) * valid
    return _surrogate_loss(logp, advantages, valid.long(), loss_type)
