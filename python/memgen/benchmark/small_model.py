"""`memgen bench --config small`: the small random model of issue 17, where the
engine's own overhead shows (cheap GEMMs: the regime of a GPU). Qwen2-shaped,
hidden 512, 6 layers, 4 heads / 2 KV heads, intermediate 1024, a 320-entry
byte-level BPE vocabulary; ~14 M parameters, float32. Built offline from a fixed
seed the first time and kept under the cache ($MEMGEN_CACHE/bench-small-v1)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

SHAPE = dict(hidden_size=512, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=1024, max_position_embeddings=2048)
VOCAB_SIZE = 320
NAME = "bench-small-v1"   # a new shape or init needs a new name: the cache is never rebuilt in place

_CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
           "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
           "{% endif %}")
# the text the tokenizer learns from: the benchmark prompts' words, digits, delimiters
_CORPUS = [
    "Solve the math problem with proper reasoning, and put the answer in \\boxed{}.",
    "Question: what is 12 plus 30? Answer: 42. We add the numbers, then we check the result.",
    "The quick brown fox jumps over the lazy dog.\nA new line, and more text. Numbers 1 2 3 4 5 6 7 8 9 0.",
    "user\nassistant\nsystem\nFinally, we write it down; the total is the sum of the parts.",
]


def small_model_dir() -> Path:
    """The small model's HF directory (config, safetensors, tokenizer), built once."""
    from memgen.sources import cache_dir

    target = cache_dir() / NAME
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{NAME}-") as tmp:
        build_small_model(Path(tmp) / NAME)
        try:
            os.replace(Path(tmp) / NAME, target)    # atomic: a concurrent build loses the race, harmlessly
        except OSError:
            if not (target / "config.json").is_file():
                raise
    return target


def chatml_bpe_tokenizer(corpus: list[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on `corpus`: pad `<|endoftext|>` (id 0),
    `<|im_start|>` (1), eos `<|im_end|>` (2), left padding, the ChatML chat template
    (the tests' tiny models use it too, tests/fixtures.py)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  padding_side="left")
    tok.chat_template = _CHATML
    return tok


def build_small_model(out: Path, seed: int = 0) -> Path:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = chatml_bpe_tokenizer(_CORPUS * 4, VOCAB_SIZE)
    config = Qwen2Config(vocab_size=len(tok), bos_token_id=1, eos_token_id=2, pad_token_id=0,
                         tie_word_embeddings=False, **SHAPE)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:   # wider than HF's 0.02: peaked logits, greedy argmaxes without ties
                p.normal_(0.0, 0.1)
        # delimiters (',' '.' newline) often enough that the trigger is consulted
        delims = [i for i in range(len(tok)) if tok.decode([i]).endswith((",", ".", "\n"))]
        model.lm_head.weight[delims] *= 1.6
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out

