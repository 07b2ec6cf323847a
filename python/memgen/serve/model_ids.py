"""`--memgen` items and the model ids they give (light: the CLI's parser and `memgen
eval` import it without the server's packages)."""
from __future__ import annotations

import os
from pathlib import Path


def checkpoint_model_id(memgen: str | os.PathLike) -> str:
    """A MemGen checkpoint's default model id: its directory's name ('gsm8k-weaver'
    for --memgen runs/gsm8k-weaver/), with the parent's before a bare layout folder
    ('sft-run/export' for a training run's export/ or reference/); the same rule as
    the LLM's own name for it (memgen_setup.checkpoint_name)."""
    path = Path(memgen).expanduser().resolve()
    if path.name in ("export", "reference") and path.parent.name:
        return f"{path.parent.name}/{path.name}"
    return path.name or str(memgen)


def parse_memgen_flags(values: str | list[str] | None, flag: str = "--memgen") -> str | dict[str, str] | None:
    """`--memgen` items (repeatable) -> LLM(memgen=...): None; one bare DIR -> that
    str (today's single checkpoint); else {NAME: DIR} in the order given, an item
    being NAME=DIR or a bare DIR (named after its directory). An item that is an
    existing path is a DIR even when it holds '='. ValueError for an empty name or
    directory, or a name given twice."""
    if values is None:
        return None
    items = [values] if isinstance(values, (str, os.PathLike)) else list(values)
    if not items:
        return None
    pairs: list[tuple[str | None, str]] = []
    for item in items:
        text = os.fspath(item)
        name, sep, path = text.partition("=")
        if sep and not Path(text).expanduser().exists():
            if not name or not path:
                raise ValueError(f"{flag} {text!r}: expected NAME=DIR (both non-empty) or a checkpoint directory")
            pairs.append((name, path))
        else:
            if not text:
                raise ValueError(f"{flag} '': expected NAME=DIR or a checkpoint directory")
            pairs.append((None, text))
    if len(pairs) == 1 and pairs[0][0] is None:
        return pairs[0][1]
    named: dict[str, str] = {}
    for name, path in pairs:
        name = name if name is not None else checkpoint_model_id(path)
        if name in named:
            raise ValueError(f"{flag}: checkpoint name {name!r} is given twice ({named[name]} and {path}); "
                             "give each its own NAME=DIR")
        named[name] = path
    return named
