"""The reference MemGen generation loop (spec §2.2), step for step.

Per step i: (a) trigger decisions (step 0: the prompt decision, every row;
later: rows whose decoded text ends with a delimiter and whose budget is not
spent); (b) rows deciding 1 get K latents from the weaver appended, every other
row gets K zero columns (mask 0) on the LEFT, and the reasoner cache is dropped;
(c) once every row has spent its budget, HF generate finishes on inputs_embeds;
(d) otherwise one reasoner step (a full re-prefill after an insertion).

Running example, B=2, prompt 4 tokens, row 0 left-padded by one, K=2 prompt
latents inserted for both rows at step 0, then row 1 inserts K=2 at step 3:

    after step 0   mask  row0: 0 1 1 1 L L        row1: 1 1 1 1 L L
    after step 3   mask  row0: 0 0 0 1 1 1 L L t t t   row1: 1 1 1 1 L L t t t L L
                   positions are recomputed from the cumsum of the mask, so row 0's
                   positions are unchanged and row 1's latents take the next two.
"""
from __future__ import annotations

import torch
from torch import Tensor

from memgen.outputs import NOT_CONSULTED

from .model import positions_from_mask

def _pick(logits: Tensor, do_sample: bool, temperature: float) -> Tensor:
    """Temperature-only sampling, or argmax (ties -> the lower index)."""
    if do_sample and temperature != 0:
        return torch.multinomial(torch.softmax(logits / temperature, dim=-1), num_samples=1).view(-1)
    return logits.argmax(dim=-1)


def _check_inputs(input_ids: Tensor, attention_mask: Tensor, max_new_tokens: int, temperature: float) -> None:
    if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(f"input_ids and attention_mask must both be [batch, length]; got "
                         f"{list(input_ids.shape)} and {list(attention_mask.shape)}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature!r}")
    m = attention_mask.long()
    if bool((m[:, 1:] < m[:, :-1]).any()):
        raise ValueError("attention_mask must be left-padded (zeros only before the first 1 of each row)")
    if bool((m.sum(dim=1) == 0).any()):
        raise ValueError("every row needs at least one prompt token")


def _tail(model, embeds: Tensor, mask: Tensor, max_new_tokens: int, temperature: float,
          do_sample: bool) -> Tensor:
    """The reference's switch to HF generate once no row may insert any more.
    Greedy when temperature == 0 or not do_sample; otherwise plain temperature
    sampling (the reference passes HF defaults here; see DIFFERENCES.md)."""
    from transformers import GenerationConfig

    tok = model.tokenizer
    sample = bool(do_sample and temperature != 0)
    extra = {"temperature": float(temperature), "top_k": 0, "top_p": 1.0} if sample else {}
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=sample, num_beams=1, repetition_penalty=1.0,
                              pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, use_cache=True, **extra)
    return model.reasoner.generate(inputs_embeds=embeds, attention_mask=mask, generation_config=config)


@torch.no_grad()
def generate(model, input_ids: Tensor, attention_mask: Tensor, max_new_tokens: int, temperature: float = 0.0,
             trigger_do_sample: bool = False, weaver_do_sample: bool = False,
             return_augmentation_mask: bool = True):
    """Returns ids [B, P + n] (prompt included, like the reference) and, with
    return_augmentation_mask, aug [B, n]: entry i is the decision taken before
    token i (-100 not consulted, 0 skipped, 1 inserted; entry 0 = the prompt)."""
    _check_inputs(input_ids, attention_mask, max_new_tokens, temperature)
    settings, reasoner, tok = model.settings, model.reasoner, model.tokenizer
    device = model.device
    ids = input_ids.to(device)
    mask = attention_mask.to(device).long()
    batch, prompt_len = ids.shape
    budget = settings.max_inference_aug_num
    eos = tok.eos_token_id

    embeds = model.embed(ids)
    positions = positions_from_mask(mask)
    cache = None
    count = torch.zeros(batch, dtype=torch.long, device=device)
    aug = torch.full((batch, max_new_tokens), NOT_CONSULTED, dtype=torch.long, device=device)

    for i in range(max_new_tokens):
        # (a) trigger decisions
        if i == 0:
            decision = torch.zeros(batch, dtype=torch.long, device=device)  # prompt: always consulted
        else:
            decision = torch.full((batch,), NOT_CONSULTED, dtype=torch.long, device=device)
            decision[torch.tensor(model.ends_with_delimiter(ids), device=device)] = 0
            decision[count >= budget] = NOT_CONSULTED
        consult = (decision != NOT_CONSULTED).nonzero().view(-1)
        if consult.numel() > 0:
            logits = model.trigger_logits(ids[consult])
            decision[consult] = _pick(logits, trigger_do_sample, temperature).to(decision.dtype)
        aug[:, i] = decision

        # (b) insertion
        rows = (decision == 1).nonzero().view(-1)
        if rows.numel() > 0:
            if i != 0:
                count[rows] += 1  # the prompt insertion is free
            kind = "prompt" if i == 0 else "inference"
            k = getattr(model, f"{kind}_query_latents").shape[0]
            if k > 0:  # K == 0 inserts nothing (see DIFFERENCES.md)
                latents = model.weave(embeds[rows], mask[rows], positions[rows], kind).to(embeds.dtype)
                length = embeds.shape[1]
                new_embeds = embeds.new_zeros(batch, length + k, embeds.shape[2])
                new_mask = mask.new_zeros(batch, length + k)
                new_embeds[:, k:], new_mask[:, k:] = embeds, mask  # non-inserting rows: left zero pad
                new_embeds[rows] = torch.cat([embeds[rows], latents], dim=1)
                new_mask[rows] = torch.cat([mask[rows], mask.new_ones(rows.numel(), k)], dim=1)
                embeds, mask = new_embeds, new_mask
                positions = positions_from_mask(mask)
                cache = None

        # (c) tail: every row has spent its budget
        if bool((count >= budget).all()):
            new = _tail(model, embeds, mask, max_new_tokens - i, temperature, weaver_do_sample)
            ids = torch.cat([ids, new.to(ids.dtype)], dim=1)
            break

        # (d) one reasoner step
        if cache is None:
            out = reasoner(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True)
        else:
            out = reasoner(inputs_embeds=embeds[:, -1:], attention_mask=mask, position_ids=positions[:, -1:],
                           past_key_values=cache, use_cache=True)
        token = _pick(out.logits[:, -1], weaver_do_sample, temperature).to(ids.dtype)
        ids = torch.cat([ids, token[:, None]], dim=1)
        embeds = torch.cat([embeds, model.embed(token[:, None])], dim=1)
        mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
        positions = torch.cat([positions, positions[:, -1:] + 1], dim=1)
        cache = out.past_key_values
        if bool((ids[:, -1] == eos).all()):
            break

    aug = aug[:, : ids.shape[1] - prompt_len]
    return (ids, aug) if return_augmentation_mask else ids
