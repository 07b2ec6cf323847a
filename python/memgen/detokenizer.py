"""Streaming text for one completion: each time tokens arrive, decode the whole
output (as the offline API does) and hand out what is new, holding back what
may still change or be cut: an unfinished UTF-8 tail (decoded as U+FFFD) and a
tail that could be the start of a stop string. At the end the final text (the
offline API's, cut before a stop string) supplies the rest, so the chunks
always add up to exactly the offline text. Used by `LLM.stream` and `memgen serve`."""
from __future__ import annotations

import logging
from collections.abc import Callable

REPLACEMENT = "\ufffd"
log = logging.getLogger(__name__)


class IncrementalText:
    def __init__(self, decode: Callable[[list[int]], str], stop: list[str] | None):
        self.decode = decode
        self.stop = list(stop or ())
        self.sent = ""                  # what the client has so far
        self._mismatch = False

    def update(self, token_ids: list[int]) -> str:
        """The new text to send for the output so far (may be "")."""
        return self._advance(self._stable(self.decode(token_ids)))

    def finish(self, final_text: str) -> str:
        """The rest of the final text."""
        return self._advance(final_text)

    def _stable(self, text: str) -> str:
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:                    # the text will end before it (or, if the request goes on, resumes later)
            return text[:cut]
        text = text.rstrip(REPLACEMENT)
        hold = max((k for s in self.stop for k in range(min(len(s) - 1, len(text)), 0, -1)
                    if text.endswith(s[:k])), default=0)
        return text[:len(text) - hold]

    def _advance(self, text: str) -> str:
        if len(text) <= len(self.sent):
            return ""
        if not text.startswith(self.sent):
            # a tokenizer whose earlier text changes with later tokens: never resend what was sent
            if not self._mismatch:
                log.warning("streamed text diverged from the decoded output; the stream may differ from it")
                self._mismatch = True
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta
