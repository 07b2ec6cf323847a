"""The model ids a server answers to, and its MemGen checkpoints by name.

`memgen serve --memgen DIR` (today's single checkpoint) answers to one id: the
checkpoint directory's name, or --served-model-name; its base model is not served
alone. `memgen serve --memgen a=DIR_A --memgen b=DIR_B` (named checkpoints, one or
more) answers to each checkpoint's NAME, and lists its base model too (id:
--served-model-name, else --model as given, else the packaged model's name) as the
checkpoints' `parent`; a request for the base is refused (400): every request on a
MemGen engine runs a MemGen checkpoint, and running the default one under the base's
id would hide which. A plain server (no --memgen) answers to its base's id, as always.

Checkpoints loaded, updated and unloaded live (the /v1/*_memgen_checkpoint routes)
appear and disappear here; the engine loop publishes which are loaded after every
change (`EngineLoop.checkpoints`), and this registry reads only that snapshot, never
the LLM, from the HTTP side.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from memgen.serve.errors import APIError


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


@dataclass
class ServedModels:
    """What a server answers to. `base_id`: the base model's id (listed when
    `list_base`; a generation request for it runs only on a plain server);
    `aliases`: model id -> checkpoint name for ids that differ from the name (the
    single checkpoint's --served-model-name / directory name); `paths`: checkpoint
    name -> the directory it was loaded from (for /v1/models)."""
    base_id: str | None                            # None: a single --memgen DIR server's (not served)
    memgen: bool                                   # a MemGen engine (every request runs a checkpoint)
    list_base: bool = False
    aliases: dict[str, str] = field(default_factory=dict)
    paths: dict[str, str] = field(default_factory=dict)

    def ids(self, loaded: dict[str, int]) -> list[tuple[str, str | None]]:
        """(model id, checkpoint name or None for the base) in /v1/models' order."""
        out: list[tuple[str, str | None]] = \
            [(self.base_id, None)] if self.base_id is not None and (self.list_base or not self.memgen) else []
        by_name = {name: model_id for model_id, name in self.aliases.items()}
        out += [(by_name.get(name, name), name) for name in loaded]
        return out

    def resolve(self, model: str, loaded: dict[str, int]) -> str | None:
        """The checkpoint name `model` runs (None on a plain server); APIError 404 for an
        id this server does not serve, 400 for a MemGen server's base."""
        if not self.memgen:
            if model != self.base_id:
                raise model_not_found(model, [self.base_id])
            return None
        served = {model_id: name for model_id, name in self.ids(loaded) if name is not None}
        if model in served:
            return served[model]
        if model is not None and model == self.base_id:
            raise APIError(400, f"`{model}` is the base model of this server's MemGen checkpoints and is not served "
                                f"alone: every request runs a MemGen checkpoint; send model = one of "
                                f"{', '.join(f'`{m}`' for m in served) or '(none loaded)'}",
                           "invalid_request_error", "model", "base_model_not_served")
        raise model_not_found(model, [m for m, _ in self.ids(loaded)])

    def check_new_name(self, name: str) -> None:
        """A live load's name must not be an id this server already answers to otherwise."""
        if (self.base_id is not None and name == self.base_id) or (name in self.aliases and self.aliases[name] != name):
            raise APIError(400, f"`{name}` is already a model id of this server (its base or an alias); "
                                "load the checkpoint under another name", "invalid_request_error", "name",
                           "invalid_memgen_checkpoint")


def model_not_found(model: str, served: list[str]) -> APIError:
    listed = ", ".join(f"`{m}`" for m in served) or "no model"
    return APIError(404, f"The model `{model}` does not exist; this server serves {listed}",
                    "invalid_request_error", "model", "model_not_found")
