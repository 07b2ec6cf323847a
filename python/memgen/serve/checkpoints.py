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

from dataclasses import dataclass, field

from memgen.serve.errors import APIError
from memgen.serve.model_ids import checkpoint_model_id, parse_memgen_flags  # noqa: F401  (re-exported)


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
