"""Tiny random SmolLM3 models saved as HF directories (the shape of the
reference's smollm_*.sh reasoner and weaver), for the decoder and MemGen
parity tests. Plain functions; test modules wrap them as fixtures.

SmolLM3 ties its LM head to the embeddings, so the delimiter and EOS nudges
scale embedding rows (which the tied head shares) instead of untying the head
as fixtures.emphasize_delimiters does: the tests then exercise tied weights.
"""
from __future__ import annotations

from pathlib import Path

import torch


def tiny_smollm3_config(vocab_size: int, hidden_size: int = 64, num_layers: int = 4, **overrides):
    from transformers import SmolLM3Config

    common = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                  num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                  no_rope_layer_interval=2)  # layers 1 and 3 NoPE with 4 layers
    common.update(overrides)
    return SmolLM3Config(**common)


def build_tiny_smollm3(save_dir, tokenizer, hidden_size: int = 64, num_layers: int = 4, seed: int = 0,
                       delimiter_factor: float | None = 1.3, eos_factor: float | None = None,
                       **config_overrides) -> Path:
    """A random tiny SmolLM3ForCausalLM (float32 safetensors + tokenizer)."""
    from transformers import AutoModelForCausalLM

    vocab_size = config_overrides.pop("vocab_size", len(tokenizer))
    config = tiny_smollm3_config(vocab_size, hidden_size, num_layers, **config_overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        # a wider init than 0.02 gives peaked, tie-free argmaxes (see fixtures.build_tiny_model)
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.1)
        head = model.get_output_embeddings().weight        # the embedding matrix itself when tied
        if delimiter_factor:
            ids = [i for i in range(len(tokenizer)) if tokenizer.decode([i]).endswith((",", ".", "\n"))]
            head[ids] *= delimiter_factor
        if eos_factor:
            head[tokenizer.eos_token_id] *= eos_factor
    save_dir = Path(save_dir)
    model.save_pretrained(str(save_dir))
    tokenizer.save_pretrained(str(save_dir))
    return save_dir
