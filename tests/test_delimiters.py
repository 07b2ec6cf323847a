"""The per-vocabulary delimiter table equals the reference's whole-sequence decode test."""
import random

import pytest

from memgen.memory.delimiters import DELIMITERS, build_delimiter_table


def reference_test(tokenizer, ids):
    return tokenizer.decode(ids, skip_special_tokens=False).endswith(DELIMITERS)


def test_table_matches_whole_sequence_decoding(tokenizer):
    table = build_delimiter_table(tokenizer)
    rng = random.Random(0)
    vocab = len(tokenizer)
    delim_ids = [i for i in range(vocab) if table.ends_with_delimiter[i]]
    assert delim_ids, "the test tokenizer must have delimiter tokens"
    for _ in range(2000):
        seq = [rng.randrange(vocab) for _ in range(rng.randint(1, 6))]
        if rng.random() < 0.3:
            seq.append(rng.choice(delim_ids))
        assert table.is_delimiter_end(seq, tokenizer) == reference_test(tokenizer, seq), seq


def test_specials_and_known_tokens(tokenizer):
    table = build_delimiter_table(tokenizer)
    comma, period, newline = (tokenizer.convert_tokens_to_ids(t) for t in (",", ".", "Ċ"))
    for i in (comma, period, newline):
        assert table.ends_with_delimiter[i] and not table.needs_context[i]
    assert not table.ends_with_delimiter[tokenizer.eos_token_id]  # "<|im_end|>" ends with ">"
    assert not table.is_delimiter_end([], tokenizer)


def test_ids_beyond_the_tokenizer_fall_back_to_decoding(tokenizer):
    table = build_delimiter_table(tokenizer, vocab_size=len(tokenizer) + 8)
    assert table.ends_with_delimiter.shape[0] == len(tokenizer) + 8
    assert table.needs_context[len(tokenizer):].all()


class _SpaceStrippingTokenizer:
    """A toy tokenizer whose id 1 reads ' .' after text but '' at the start, and id 2 is empty."""

    def __len__(self):
        return 4

    def encode(self, text, add_special_tokens=False):
        return [3]

    def decode(self, ids, skip_special_tokens=False):
        out = ""
        for i in ids:
            out += {0: "a", 1: " ." if out else "", 2: "", 3: "x"}[i]
        return out

    def batch_decode(self, batch, skip_special_tokens=False):
        return [self.decode(ids) for ids in batch]


def test_context_dependent_and_empty_ids_use_the_fallback():
    tok = _SpaceStrippingTokenizer()
    table = build_delimiter_table(tok)
    assert table.needs_context[1] and table.needs_context[2] and not table.needs_context[0]
    assert table.is_delimiter_end([0, 1], tok)
    assert table.is_delimiter_end([0, 1, 2], tok)  # empty last token: look further back
    assert not table.is_delimiter_end([1], tok)


@pytest.mark.slow
def test_packaged_tokenizer_table_is_exact():
    from transformers import AutoTokenizer

    from memgen.sources import resolve_model_dir
    try:
        path = resolve_model_dir(None)
    except FileNotFoundError as e:
        pytest.skip(str(e))
    tok = AutoTokenizer.from_pretrained(path)
    table = build_delimiter_table(tok)
    rng = random.Random(1)
    for _ in range(500):
        seq = [rng.randrange(len(tok)) for _ in range(rng.randint(1, 5))]
        assert table.is_delimiter_end(seq, tok) == reference_test(tok, seq)
