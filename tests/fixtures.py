"""Builders for tiny offline test assets: a byte-level BPE tokenizer with ChatML
specials and tiny random Qwen2 / Qwen3 / Llama models saved as HF directories.

Plain functions (not pytest fixtures) so benchmarks and scripts can use them too;
`conftest.py` wraps them as session-scoped fixtures.
"""
from __future__ import annotations

from pathlib import Path

import torch

from memgen.benchmark.small_model import chatml_bpe_tokenizer

_CORPUS = [
    "Hello world, this is a small test. Numbers 1 2 3 4 5 6 7 8 9 0.",
    "The quick brown fox jumps over the lazy dog.\nA new line, and more text.",
    "Solve the math problem with proper reasoning, and put the answer in \\boxed{}.",
    "user\nassistant\nsystem\nQuestion: what is 12 plus 30? Answer: 42.",
    "We add the numbers, then we check the result. Finally, we write it down.",
]


def build_tokenizer(save_dir: str | Path | None = None, vocab_size: int = 320):
    """A byte-level BPE tokenizer: pad `<|endoftext|>` (id 0), `<|im_start|>` (1),
    eos `<|im_end|>` (2), left padding, ChatML chat template."""
    hf_tok = chatml_bpe_tokenizer(_CORPUS * 4, vocab_size)
    if save_dir is not None:
        hf_tok.save_pretrained(str(save_dir))
    return hf_tok


def tiny_config(arch: str, vocab_size: int, hidden_size: int = 64, num_layers: int = 2, **overrides):
    """A tiny config of a real architecture: 'qwen2', 'qwen3' or 'llama'."""
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=arch == "llama",
    )
    common.update(overrides)
    if arch == "qwen2":
        return Qwen2Config(**common)
    if arch == "qwen3":
        return Qwen3Config(head_dim=hidden_size // common["num_attention_heads"], **common)
    if arch == "llama":
        return LlamaConfig(**common)
    raise ValueError(f"unknown tiny arch {arch!r}")


def emphasize_delimiters(model, tokenizer, factor: float = 4.0) -> None:
    """Scale up the lm_head rows of tokens ending in ',' '.' or newline so that a
    random model emits delimiters often (insertions then happen in tests)."""
    vocab = tokenizer.get_vocab()
    ids = [i for tok, i in vocab.items() if tokenizer.decode([i]).endswith((",", ".", "\n"))]
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        if model.config.tie_word_embeddings:
            # tied: scale a copy by untying first, so embeddings stay as they were
            model.config.tie_word_embeddings = False
            model.lm_head.weight = torch.nn.Parameter(head.detach().clone())
            head = model.lm_head.weight
        head[ids] *= factor


def build_tiny_model(
    save_dir: str | Path,
    tokenizer,
    arch: str = "qwen2",
    hidden_size: int = 64,
    num_layers: int = 2,
    seed: int = 0,
    delimiter_factor: float | None = 1.3,
    **config_overrides,
) -> Path:
    """Build a random tiny causal LM and save it (float32 safetensors + tokenizer)."""
    from transformers import AutoModelForCausalLM

    vocab_size = config_overrides.pop("vocab_size", len(tokenizer))
    config = tiny_config(arch, vocab_size, hidden_size, num_layers, **config_overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # random init std 0.02 gives near-uniform logits; a wider init gives peaked,
    # tie-free argmaxes that make greedy parity meaningful
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.1)
    if delimiter_factor:
        emphasize_delimiters(model, tokenizer, delimiter_factor)
    save_dir = Path(save_dir)
    model.save_pretrained(str(save_dir))
    tokenizer.save_pretrained(str(save_dir))
    return save_dir
