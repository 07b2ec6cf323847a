"""Builders for MemGen test assets: random MemGen checkpoints in the reference
layout on top of the tiny models of fixtures.py, and prompt encoding.

Plain functions so tests, benchmarks and scripts can all use them;
conftest.py wraps them as session-scoped fixtures.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

LORA_CONFIG = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.0,
               "bias": "none", "task_type": "CAUSAL_LM"}

PROMPTS = [  # three lengths; with the fixtures' models they give insertions, skips and early EOS
    "Solve the math problem, and put the answer in a box.",
    "What is 12 plus 30?",
    "Hello",
]


def encode_prompts(tokenizer, prompts: list[str] = PROMPTS) -> tuple[torch.Tensor, torch.Tensor]:
    """Chat-format each prompt as one user turn with the generation prompt;
    left-padded (input_ids, attention_mask)."""
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True) for p in prompts]
    enc = tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False)
    return enc["input_ids"], enc["attention_mask"]


def oracle_rows(model, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int,
                eos: int | None) -> list[tuple[list[int], list[int]]]:
    """memgen.hf's (tokens, augmentation) for each row of a left-padded batch, up to and
    including the first EOS (what the engine returns)."""
    out, aug = model.generate(ids, mask, max_new_tokens=max_new_tokens)
    rows = []
    for b in range(ids.shape[0]):
        tokens, decisions = out[b, ids.shape[1]:].tolist(), aug[b].tolist()
        if eos in tokens:
            n = tokens.index(eos) + 1
            tokens, decisions = tokens[:n], decisions[:n]
        rows.append((tokens, decisions))
    return rows


def build_memgen_reasoner(save_dir, tokenizer, hidden_size: int = 64, seed: int = 0,
                          delimiter_factor: float = 2.0, eos_factor: float = 1.5) -> Path:
    """A tiny qwen2 (fixtures.build_tiny_model) that emits delimiters often and
    EOS now and then, so generation tests see insertions and early stops."""
    import fixtures
    from transformers import AutoModelForCausalLM

    path = fixtures.build_tiny_model(save_dir, tokenizer, arch="qwen2", hidden_size=hidden_size, seed=seed,
                                     delimiter_factor=delimiter_factor)
    model = AutoModelForCausalLM.from_pretrained(str(path))
    with torch.no_grad():
        model.get_output_embeddings().weight[tokenizer.eos_token_id] *= eos_factor
    model.save_pretrained(str(path))
    return path


def _config(path) -> dict:
    return json.loads((Path(path) / "config.json").read_text())


def _decision_logit_gaps(model, tokenizer, prompts) -> torch.Tensor:
    """logit1 - logit0 of the trigger head without its bias, at every position of
    a greedy run where the trigger would be consulted (prompt end, delimiters)."""
    from memgen.hf import positions_from_mask

    ids, mask = encode_prompts(tokenizer, prompts)
    out, _ = model.generate(ids, mask, max_new_tokens=24)
    pad = tokenizer.pad_token_id
    t_mask = (out != pad).long()
    with torch.no_grad():
        hidden = model.trigger(input_ids=out, attention_mask=t_mask, position_ids=positions_from_mask(t_mask),
                               output_hidden_states=True).hidden_states[-1]
        w = model.trigger_head.weight
        gap = hidden @ (w[1] - w[0])  # [B, L]
    picks = []
    for b in range(out.shape[0]):
        for j in range(ids.shape[1] - 1, out.shape[1]):
            if out[b, j] != pad and model.ends_with_delimiter(out[b : b + 1, : j + 1])[0]:
                picks.append(gap[b, j])
    return torch.stack(picks)


def _calibrate_trigger_bias(ckpt, tokenizer, reasoner_dir, weaver_dir, trigger_dir, prompts=PROMPTS) -> None:
    """Set the trigger head's bias so that about half of the decisions of real
    greedy runs invoke and half skip: centre the bias-free logit gap on its
    median over the decision points of an inactive-trigger run, then once more
    over those of a run with the calibrated active trigger."""
    import dataclasses

    from memgen.hf import HFMemGenModel

    model = HFMemGenModel.from_checkpoint(ckpt, reasoner_dir, weaver_dir, trigger_dir, dtype=torch.float64)
    gaps = []
    for active in (False, True):
        model.settings = dataclasses.replace(model.settings, trigger_active=active)
        gaps.append(_decision_logit_gaps(model, tokenizer, prompts))
        median = torch.cat(gaps).median()
        with torch.no_grad():
            model.trigger_head.bias.copy_(torch.stack([median / 2, -median / 2]))
    ckpt.trigger_head["bias"] = model.trigger_head.bias.detach().to(ckpt.trigger_head["bias"].dtype).clone()


def build_memgen_checkpoint(save_dir, tokenizer, reasoner_dir, weaver_dir=None, trigger_dir=None,
                            prompt_latents_len: int = 3, inference_latents_len: int = 2,
                            max_inference_aug_num: int = 5, trigger_active: bool = False, seed: int = 0) -> Path:
    """A random MemGen checkpoint in the REFERENCE layout (float32): LoRA r=4,
    alpha=8 on q_proj/v_proj with non-zero lora_B (the adapters matter), and a
    trigger head whose bias makes it both invoke and skip on real runs."""
    from memgen.checkpoint import MemGenSettings, random_checkpoint, save_reference

    weaver_dir = weaver_dir or reasoner_dir
    trigger_dir = trigger_dir or reasoner_dir
    settings = MemGenSettings(prompt_latents_len=prompt_latents_len, inference_latents_len=inference_latents_len,
                              trigger_active=trigger_active, max_prompt_aug_num=1,
                              max_inference_aug_num=max_inference_aug_num,
                              weaver_lora_config=dict(LORA_CONFIG), trigger_lora_config=dict(LORA_CONFIG))
    ckpt = random_checkpoint(settings, _config(reasoner_dir), _config(weaver_dir), _config(trigger_dir), seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    for lora in (ckpt.weaver_lora, ckpt.trigger_lora):
        for module, (a, b) in lora.layers.items():
            lora.layers[module] = (a, torch.randn(b.shape, generator=g, dtype=b.dtype) * 0.1)
    _calibrate_trigger_bias(ckpt, tokenizer, reasoner_dir, weaver_dir, trigger_dir)
    return save_reference(ckpt, save_dir)
