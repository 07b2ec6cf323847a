"""The trigger's delimiter test without detokenizing every step.

The reference decodes each whole sequence at every step and asks whether the
text ends with "," "." or a newline (spec §2.3). For byte-level BPE tokenizers
that equals asking whether the *last token's* text ends with one of them: the
delimiters are ASCII, and an ASCII final byte decodes to itself whatever comes
before it. So we decode every vocabulary entry once and keep a bool per id.

Two kinds of ids cannot be decided from their own text, and fall back to
decoding the sequence (exact, and rare):
- ids whose text is empty (the check then looks further back), and ids the
  tokenizer does not know (model vocab padding);
- ids whose verdict changes with the preceding token, found at build time by
  decoding each id after a few different contexts (e.g. SentencePiece
  tokenizers that strip a leading space only at the start of a sequence).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

DELIMITERS = (",", ".", "\n")

# Preceding contexts used to find ids whose verdict depends on what comes before.
_CONTEXT_TEXTS = ("a", " b", "1.", "\n", "é")


@dataclass
class DelimiterTable:
    ends_with_delimiter: torch.Tensor  # bool [vocab]: the id's text ends with a delimiter
    needs_context: torch.Tensor  # bool [vocab]: decide by decoding the sequence instead
    delimiters: tuple[str, ...] = DELIMITERS

    def is_delimiter_end(self, token_ids: Sequence[int], tokenizer) -> bool:
        """Does the decoded text of `token_ids` end with a delimiter?"""
        if not token_ids:
            return False
        last = token_ids[-1]
        if 0 <= last < len(self.needs_context) and not self.needs_context[last]:
            return bool(self.ends_with_delimiter[last])
        text = tokenizer.decode(list(token_ids), skip_special_tokens=False)
        return text.endswith(self.delimiters)


def build_delimiter_table(tokenizer, vocab_size: int | None = None,
                          delimiters: tuple[str, ...] = DELIMITERS) -> DelimiterTable:
    """Decode each id once (skip_special_tokens=False, as the reference does)."""
    num_known = len(tokenizer)
    vocab_size = max(vocab_size or num_known, num_known)
    ids = list(range(num_known))
    texts = _decode_batch(tokenizer, [[i] for i in ids])
    ends = [text.endswith(delimiters) for text in texts]
    needs = [text == "" for text in texts]
    for context in _CONTEXT_TEXTS:
        prefix = tokenizer.encode(context, add_special_tokens=False)
        if not prefix:
            continue
        in_context = _decode_batch(tokenizer, [prefix + [i] for i in ids])
        needs = [n or text.endswith(delimiters) != e for n, e, text in zip(needs, ends, in_context)]
    # ids past the tokenizer's (model vocab padding): never a delimiter by themselves, decode instead
    pad = vocab_size - num_known
    ends = torch.tensor(ends + [False] * pad, dtype=torch.bool)
    needs = torch.tensor(needs + [True] * pad, dtype=torch.bool)
    return DelimiterTable(ends, needs, tuple(delimiters))


def _decode_batch(tokenizer, batch: list[list[int]]) -> list[str]:
    # the Rust backend decodes a 150k vocabulary ~10x faster than the Python wrapper;
    # cleanup of spaces never changes a text's final character
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return backend.decode_batch(batch, skip_special_tokens=False)
    return tokenizer.batch_decode(batch, skip_special_tokens=False)
