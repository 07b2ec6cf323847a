"""JSON Lines input: every non-blank line parsed, a bad one named by file and line."""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from typing import Any


def iter_jsonl(path: str | os.PathLike, lines: Iterable[str] | None = None) -> Iterator[tuple[int, Any]]:
    """(line number, value) of each non-blank line of `path` (or of `lines`, already
    read from it); a line that is not JSON raises ValueError "<path>:<line>: not valid JSON"."""
    if lines is None:
        with open(path, encoding="utf-8") as f:
            yield from iter_jsonl(path, f)
        return
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            yield line_no, json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{line_no}: not valid JSON ({e})") from None
