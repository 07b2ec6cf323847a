"""The reference's teacher-forced SFT forward for one row (spec §3.1).

Insertion points over i = 1 .. S-1: the one prompt point (labels[i] supervised,
labels[i-1] not) and the inference points (labels[i-1], labels[i] supervised and
the decoded ids[:i] ends with a delimiter), the first max_inference_aug_num of
them. The weaver runs at each point over everything accumulated so far; then
one reasoner forward runs over tokens + latents, and the logits of every
position followed by a latent are dropped, leaving S rows aligned with the
input tokens (for a latent block, its last latent stands in for the token just
before the block).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .model import positions_from_mask

IGNORE = -100   # cross_entropy's ignore_index: labels not learned (not the augmentation mask)


@dataclass
class SFTOutput:
    logits: Tensor                 # [S, V], row j predicts token j + 1
    loss: Tensor                   # mean shifted cross-entropy over supervised labels
    prompt_point: int              # index of the first supervised token
    inference_points: list[int]    # token indices a latent block was inserted before


def insertion_points(model, input_ids: Tensor, labels: Tensor) -> tuple[int, list[int]]:
    """(prompt point, inference points) for one row, as the reference picks them."""
    prompt, inference = [], []
    supervised = (labels != IGNORE).tolist()
    for i in range(1, input_ids.shape[0]):
        if supervised[i] and not supervised[i - 1]:
            prompt.append(i)
        elif supervised[i] and supervised[i - 1]:
            text = model.tokenizer.decode(input_ids[:i], skip_special_tokens=False)
            if text.endswith(model.delimiters):
                inference.append(i)
    if len(prompt) != 1:
        raise ValueError(f"one row needs exactly one start of supervision (a label after a -100 label), "
                         f"found {len(prompt)} at {prompt}")
    return prompt[0], inference[: model.settings.max_inference_aug_num]


def sft_forward(model, input_ids: Tensor, labels: Tensor, attention_mask: Tensor | None = None) -> SFTOutput:
    """input_ids, labels (and attention_mask): [S] or [1, S]. Labels are used as
    given (the reference's `forward` also masks `<|im_start|>assistant\\n`
    first; do that before calling when reproducing training)."""
    ids = input_ids.reshape(-1).to(model.device)
    labels = labels.reshape(-1).to(model.device)
    if labels.shape != ids.shape:
        raise ValueError(f"labels {list(labels.shape)} must match input_ids {list(ids.shape)}")
    mask = (torch.ones_like(ids) if attention_mask is None else attention_mask.reshape(-1).to(model.device)).long()
    prompt_point, inference = insertion_points(model, ids, labels)
    points = sorted([prompt_point, *inference])

    token_embeds = model.embed(ids[None])
    embeds = token_embeds[:, :0]
    cur_mask = mask[None, :0]
    is_latent: list[bool] = []
    start = 0
    for point in points:
        embeds = torch.cat([embeds, token_embeds[:, start:point]], dim=1)
        cur_mask = torch.cat([cur_mask, mask[None, start:point]], dim=1)
        is_latent += [False] * (point - start)
        kind = "prompt" if point == prompt_point else "inference"
        if getattr(model, f"{kind}_query_latents").shape[0] > 0:
            latents = model.weave(embeds, cur_mask, positions_from_mask(cur_mask), kind).to(embeds.dtype)
            embeds = torch.cat([embeds, latents], dim=1)
            cur_mask = torch.cat([cur_mask, cur_mask.new_ones(1, latents.shape[1])], dim=1)
            is_latent += [True] * latents.shape[1]
        start = point
    embeds = torch.cat([embeds, token_embeds[:, start:]], dim=1)
    cur_mask = torch.cat([cur_mask, mask[None, start:]], dim=1)
    is_latent += [False] * (ids.shape[0] - start)

    logits = model.reasoner(inputs_embeds=embeds, attention_mask=cur_mask,
                            position_ids=positions_from_mask(cur_mask)).logits[0]
    followed_by_latent = torch.tensor(is_latent[1:] + [False], device=logits.device)
    logits = logits[~followed_by_latent]
    loss = torch.nn.functional.cross_entropy(logits[:-1], labels[1:], ignore_index=IGNORE)
    return SFTOutput(logits=logits, loss=loss, prompt_point=prompt_point, inference_points=list(inference))
