"""MemGen's factory and its checkpoints, called by `LLM` (the engine knows no MemGen
names). One `LLM(memgen=...)` holds one or more named MemGen checkpoints on its one
base model (`MemGenCheckpoints`); each is a `memory.controller.MemGenPolicy` (a
memgen.LatentPolicy) whose two extra streams, weaver W and trigger T, are bound here
to their model and LoRA adapter id. A request picks its checkpoint by name
(`SamplingParams.memgen_checkpoint`; None: the default, the first still loaded);
the engine asks `policy_for(params)`.

W and T share the reasoner's model (and KV pool) when their base checkpoint is the
reasoner's: the base weights are read once per step and each adapter's LoRA delta
(every checkpoint's, each under its own adapter ids) is added to its own rows. A
weaver or trigger on another checkpoint (even of another width) gets its own model
runner and pool, shared by every checkpoint whose role runs on that model.

Live changes (`load`, `update`, `unload`) happen between engine steps. A version whose
requests are all gone is changed in place (an update copies the new adapter weights
into the same stacks: CUDA graphs stay valid); one with requests still running keeps
running them to their end on its weights ("retiring") while new requests take the new
version. At most `max_versions` versions are live at once (current + retiring).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from memgen.checkpoint import MemGenCheckpoint, validate
from memgen.engine.extra_streams import BASE_POOL, SCRATCH_SLACK_BLOCKS, Pool, StreamBinder, open_pool
from memgen.engine.model_runner import ModelRunner
from memgen.layers.lora import install_lora, uninstall_lora
from memgen.memory.controller import TRIGGER, WEAVER, MemGenPolicy
from memgen.memory.delimiters import build_delimiter_table
from memgen.memory.parts import MemGenParts

__all__ = ["BASE_POOL", "SCRATCH_SLACK_BLOCKS", "DEFAULT_MAX_VERSIONS", "MemGenCheckpoints", "MemGenLoader",
           "MemGenSource",
           "Pool", "check_memgen_fits", "checkpoint_name"]

DEFAULT_MAX_VERSIONS = 8
_log = logging.getLogger("memgen.llm")   # the load log LLM users follow


def checkpoint_name(memgen: str | os.PathLike) -> str:
    """A checkpoint directory's default name ('gsm8k-weaver' for runs/gsm8k-weaver/), with the
    parent's before a bare layout folder ('sft-run/export' for a training run's export/)."""
    path = Path(memgen).expanduser().resolve()
    if path.name in ("export", "reference") and path.parent.name:
        return f"{path.parent.name}/{path.name}"
    return path.name or str(memgen)


@dataclass
class MemGenSource:
    """One checkpoint as LLM loaded and checked it: its tensors, and the base model each
    role runs on (None: the reasoner's own weights)."""
    ckpt: MemGenCheckpoint
    weaver_dir: Path | None = None
    trigger_dir: Path | None = None
    weaver_config: object = None      # HF configs of those directories
    trigger_config: object = None

    def role_dir(self, role: str) -> Path | None:
        return self.weaver_dir if role == WEAVER else self.trigger_dir

    def roles(self) -> list[str]:
        """The roles that run (an inactive trigger never does: no model, no KV)."""
        return [WEAVER, TRIGGER] if self.ckpt.settings.trigger_active else [WEAVER]

    def streams_in_base(self) -> int:
        return 1 + sum(self.role_dir(role) is None for role in self.roles())


@dataclass
class MemGenLoader:
    """Reads MemGen checkpoints for one LLM and checks them against its bases: at start
    (`sources`) and for live loads and updates (`source`). A role's base is the one given
    to the LLM (weaver_model / trigger_model), else the one the checkpoint records, else
    the reasoner's."""
    model_dir: Path
    hf_config: object
    dtype: torch.dtype
    reference_compat: bool = False
    weaver_model: str | os.PathLike | None = None
    trigger_model: str | os.PathLike | None = None
    _noted: set = field(default_factory=set)     # load-log warnings already given

    def sources(self, memgen) -> dict[str, MemGenSource]:
        """LLM(memgen=...): one checkpoint (named after its directory) or {name: checkpoint}."""
        if isinstance(memgen, dict):
            if not memgen:
                raise ValueError("memgen={} names no checkpoint: give {name: directory, ...}")
            for name in memgen:
                if not isinstance(name, str) or not name:
                    raise ValueError(f"memgen={{name: checkpoint}}: a name must be a non-empty str, got {name!r}")
            named = dict(memgen)
        else:
            named = {checkpoint_name(memgen) if isinstance(memgen, (str, os.PathLike)) else "memgen": memgen}
        return {name: self.source(ckpt, name) for name, ckpt in named.items()}

    def source(self, memgen, name: str) -> MemGenSource:
        """A checkpoint directory (either layout) or a MemGenCheckpoint, checked against the bases."""
        from memgen.checkpoint import drop_lora, load_checkpoint
        from memgen.model_config import load_model_config
        from memgen.sources import resolve_model_dir, same_model

        if isinstance(memgen, MemGenCheckpoint):
            ckpt = drop_lora(memgen) if self.reference_compat else memgen
        elif isinstance(memgen, (str, os.PathLike)):
            ckpt = load_checkpoint(memgen, reference_compat=self.reference_compat)
        else:
            raise TypeError(f"MemGen checkpoint {name!r} must be a checkpoint directory or a MemGenCheckpoint, "
                            f"got {type(memgen).__name__}")
        dirs = {}
        for role, given, recorded in ((WEAVER, self.weaver_model, ckpt.weaver_base),
                                      (TRIGGER, self.trigger_model, ckpt.trigger_base)):
            path = given if given is not None else recorded
            if path is not None and not same_model(resolve_model_dir(path), self.model_dir):
                dirs[role] = Path(resolve_model_dir(path))
            else:
                dirs[role] = None   # shares the reasoner's weights (the same directory, or a copy)
        configs = {role: load_model_config(d) if d is not None else self.hf_config for role, d in dirs.items()}
        if not ckpt.settings.trigger_active:
            # it never runs and none is loaded: an unnamed base whose head is not the reasoner's
            # width (e.g. smollm_*.sh's Qwen2.5 trigger) is left unchecked, not assumed the reasoner's
            head = ckpt.trigger_head["weight"]
            if self.trigger_model is None and ckpt.trigger_base is None \
                    and head.shape[-1] != self.hf_config.hidden_size:
                configs[TRIGGER] = None
            from memgen.models.footprint import inactive_trigger_note
            note = inactive_trigger_note(configs[TRIGGER], dirs[TRIGGER], self.dtype)
            if note not in self._noted:     # once per LLM: a trainer's weight push per step repeats it
                self._noted.add(note)
                _log.warning(note)
        try:
            check_memgen_fits(ckpt, self.hf_config, configs[WEAVER], configs[TRIGGER])
        except ValueError as err:
            raise ValueError(f"MemGen checkpoint {name!r}: {err}") from err
        shared = "the reasoner's model (one forward)"
        _log.info("MemGen layout of %r: %s", name, "; ".join(
            f"{'weaver' if role == WEAVER else 'trigger'} on {shared if d is None else d}"
            for role, d in dirs.items() if role == WEAVER or ckpt.settings.trigger_active))
        return MemGenSource(ckpt, dirs[WEAVER], dirs[TRIGGER], configs[WEAVER], configs[TRIGGER])


@dataclass
class _Version:
    """One version of a named checkpoint, live in the engine."""
    name: str
    version: int
    source: MemGenSource
    policy: MemGenPolicy
    runners: dict[str, ModelRunner]     # role -> the model its adapter is installed on
    adapter_ids: dict[str, int]         # role -> its adapter id (T's kept even when inactive)
    pools: dict[str, int] = field(default_factory=dict)   # role -> pool index


class MemGenCheckpoints:
    """The named MemGen checkpoints of one LLM: the engine's policy factory (`factory`),
    a request's pick (`policy_for`), and live `load`, `update`, `unload` between steps.
    `in_use`: the ids of the policy templates unfinished requests run
    (LatentRuntime.templates_in_use)."""

    def __init__(self, sources: dict[str, MemGenSource], tokenizer, dtype: torch.dtype, device: torch.device,
                 max_model_len: int, block_size: int, follow: bool, max_versions: int = DEFAULT_MAX_VERSIONS):
        if not sources:
            raise ValueError("memgen={} names no checkpoint: give at least one")
        if len(sources) > max_versions:
            raise ValueError(f"{len(sources)} MemGen checkpoints but max_memgen_versions={max_versions}: "
                             "raise max_memgen_versions")
        self.initial = dict(sources)
        self.tokenizer = tokenizer
        self.dtype, self.device = dtype, device
        self.max_model_len, self.block_size = max_model_len, block_size
        self.follow = follow
        self.max_versions = max_versions
        self.current: dict[str, _Version] = {}      # name -> its newest version (what requests pick)
        self.retiring: list[_Version] = []          # older versions still running requests
        self._versions: dict[str, int] = {}         # name -> last version number (never reused)
        self._pools: dict[tuple[str, Path | None], int] = {}   # (role, base dir or None) -> pool index
        self._base_streams = 0
        self.base: ModelRunner | None = None
        self.binder: StreamBinder | None = None

    # ---- the engine's factory ---------------------------------------------------------
    def factory(self):
        """The engine's `default_policy` factory: (base runner, stream binder) -> (policy_for,
        the extra pools, streams per sequence in the base pool)."""
        def build(base: ModelRunner, binder: StreamBinder):
            self.base, self.binder = base, binder
            self.table = build_delimiter_table(self.tokenizer, base.hf_config.vocab_size)
            extra = self._open_pools(base)
            self._base_streams = max(src.streams_in_base() for src in self.initial.values())
            for name, source in self.initial.items():
                self._versions[name] = 0
                self.current[name] = self._install(name, 0, source)
            return self.policy_for, extra, self._base_streams
        return build

    def _open_pools(self, base: ModelRunner) -> list[Pool]:
        """One pool per (role, model) that is not the reasoner's: a weaver and a trigger on
        the same other directory each get their own, as a single checkpoint always had."""
        extra: list[Pool] = []
        self._runners = {0: base}
        for source in self.initial.values():
            for role in source.roles():
                model_dir = source.role_dir(role)
                if self._pool_of(role, model_dir) is not None:
                    continue
                config = source.weaver_config if role == WEAVER else source.trigger_config
                index = 1 + len(extra)
                name = f"{role}{index}" if any(r == role for r, _ in self._pools) else role   # "W": the first
                pool = open_pool(name, index, model_dir, config, base, self.max_model_len, self.block_size)
                extra.append(pool)
                self._pools[(role, model_dir)] = pool.index
                self._runners[pool.index] = pool.runner
        return extra

    def _pool_of(self, role: str, model_dir: Path | None) -> int | None:
        """The pool a role on `model_dir` (None: the reasoner's) runs in, if one is open."""
        from memgen.sources import same_model

        if model_dir is None:
            return 0
        return next((index for (r, d), index in self._pools.items() if r == role and same_model(d, model_dir)),
                    None)

    def _install(self, name: str, version: int, source: MemGenSource, reuse: _Version | None = None) -> _Version:
        """Adapters installed (under `reuse`'s ids when given: in place), the policy made and
        its streams bound (a new cache salt, so old weights' entries are never hit)."""
        ckpt, binder = source.ckpt, self.binder
        pools = {role: self._pool_of(role, source.role_dir(role)) for role in (WEAVER, TRIGGER)}
        pools[TRIGGER] = pools[TRIGGER] if pools[TRIGGER] is not None else 0   # inactive: never runs
        runners = {role: self._runners[index] for role, index in pools.items()}
        ids = dict(reuse.adapter_ids) if reuse is not None else \
            {WEAVER: binder.new_adapter_id(), TRIGGER: binder.new_adapter_id()}
        installed = []
        try:
            install_lora(runners[WEAVER].model, ids[WEAVER], ckpt.weaver_lora, self.dtype, self.device)
            installed.append(WEAVER)
            if ckpt.settings.trigger_active:
                install_lora(runners[TRIGGER].model, ids[TRIGGER], ckpt.trigger_lora, self.dtype, self.device)
                installed.append(TRIGGER)
            parts = MemGenParts.from_checkpoint(ckpt, self.dtype, self.device)
        except BaseException:
            if reuse is None:   # nothing half-loaded: a new version's ids go back
                for role in installed:
                    uninstall_lora(runners[role].model, ids[role])
                for adapter_id in ids.values():
                    binder.release_adapter_id(adapter_id)
            raise
        if reuse is not None:
            policy = reuse.policy
            policy.parts = parts          # every request's copy shares its scorer
            policy.checkpoint = (name, version)
        else:
            policy = MemGenPolicy(parts, self.table, self.tokenizer, self.tokenizer.pad_token_id,
                                  backend=self.base.attn_backend, follow=self.follow, checkpoint=(name, version))
        for spec in policy.streams:
            binder.bind(spec, pools[spec.name], ids[spec.name], int(runners[spec.name].hf_config.hidden_size))
        return _Version(name, version, source, policy, runners, ids, pools)

    def _drop(self, v: _Version) -> None:
        for role in v.source.roles():
            uninstall_lora(v.runners[role].model, v.adapter_ids[role])
        for spec in v.policy.streams:
            self.binder.unbind(spec)

    # ---- what requests see ------------------------------------------------------------
    @property
    def default_name(self) -> str | None:
        return next(iter(self.current), None)

    def names(self) -> list[str]:
        return list(self.current)

    def get(self, name: str | None = None) -> _Version:
        """The current version of checkpoint `name` (None: the default); ValueError if unknown."""
        if name is None:
            name = self.default_name
            if name is None:
                raise ValueError("no MemGen checkpoint is loaded (all were unloaded): load one with "
                                 "load_memgen(name, checkpoint)")
        found = self.current.get(name)
        if found is None:
            raise ValueError(f"unknown MemGen checkpoint {name!r}; loaded: {', '.join(map(repr, self.current))}")
        return found

    def policy_for(self, params) -> MemGenPolicy:
        return self.get(params.memgen_checkpoint).policy

    def versions(self) -> dict[str, int]:
        return {name: v.version for name, v in self.current.items()}

    def num_live(self) -> int:
        return len(self.current) + len(self.retiring)

    # ---- live changes, between steps --------------------------------------------------------
    def sweep(self, in_use: set[int]) -> None:
        """Let retiring versions whose requests are all gone go (adapters, ids, bindings)."""
        keep = []
        for v in self.retiring:
            if id(v.policy) in in_use:
                keep.append(v)
            else:
                self._drop(v)
        self.retiring = keep

    def _check_fits(self, name: str, source: MemGenSource) -> None:
        """A live checkpoint must run on models this engine already holds, with no more
        streams in the reasoner's KV pool than it was sized for."""
        for role in source.roles():
            model_dir = source.role_dir(role)
            if self._pool_of(role, model_dir) is None:
                what = "weaver" if role == WEAVER else "trigger"
                raise ValueError(f"MemGen checkpoint {name!r}: its {what} runs on {model_dir}, a model this LLM "
                                 f"did not load; a live load uses the models loaded at start (the reasoner's, or "
                                 f"a {what} base of a checkpoint given to LLM(memgen=...)): start the LLM with it")
        if source.streams_in_base() > self._base_streams:
            raise ValueError(f"MemGen checkpoint {name!r} runs {source.streams_in_base()} streams per request on the "
                             f"reasoner's model, but its KV cache was sized for {self._base_streams} (the "
                             "checkpoints given at start): start the LLM with a checkpoint of that layout")

    def _make_room(self, in_use: set[int]) -> None:
        self.sweep(in_use)
        if self.num_live() >= self.max_versions:
            raise RuntimeError(f"{self.num_live()} MemGen checkpoint versions are live ({len(self.current)} current, "
                               f"{len(self.retiring)} still finishing requests), the most max_memgen_versions="
                               f"{self.max_versions} allows: unload one, wait for running requests to finish, or "
                               "raise max_memgen_versions")

    def load(self, name: str, source: MemGenSource, in_use: set[int]) -> int:
        if not isinstance(name, str) or not name:
            raise ValueError(f"a MemGen checkpoint's name must be a non-empty str, got {name!r}")
        if name in self.current:
            raise ValueError(f"MemGen checkpoint {name!r} is already loaded: update_memgen({name!r}, ...) gives it "
                             "new weights, or unload it first")
        self._check_fits(name, source)
        self._make_room(in_use)
        version = self._versions[name] = self._versions.get(name, -1) + 1
        self.current[name] = self._install(name, version, source)
        return version

    def update(self, name: str, source: MemGenSource, in_use: set[int]) -> int:
        old = self.get(name)
        self._check_fits(name, source)
        version = self._versions[name] + 1
        same_layout = (source.ckpt.settings.trigger_active == old.source.ckpt.settings.trigger_active
                       and all(self._pool_of(r, source.role_dir(r)) == old.pools[r] for r in source.roles()))
        self.sweep(in_use)
        if id(old.policy) not in in_use and same_layout:
            new = self._install(name, version, source, reuse=old)    # in place: nobody runs on it
        else:
            self._make_room(in_use)
            new = self._install(name, version, source)
            self.retiring.append(old)       # its running requests finish on it
        self._versions[name], self.current[name] = version, new
        return version

    def unload(self, name: str, in_use: set[int]) -> None:
        old = self.get(name)
        del self.current[name]
        self.retiring.append(old)           # running requests finish on it
        self.sweep(in_use)


def check_memgen_fits(ckpt: MemGenCheckpoint, reasoner_config, weaver_config, trigger_config) -> None:
    """Every shape against the bases, and an active trigger's vocabulary against
    the reasoner's (it reads the reasoner's token ids)."""
    validate(ckpt, reasoner_config, weaver_config, trigger_config)
    if ckpt.settings.trigger_active and trigger_config.vocab_size != reasoner_config.vocab_size:
        raise ValueError(
            f"the trigger's base model has a vocabulary of {trigger_config.vocab_size} tokens but the "
            f"reasoner's has {reasoner_config.vocab_size}: an active trigger reads the reasoner's token ids, "
            "so its base must share the reasoner's vocabulary")
