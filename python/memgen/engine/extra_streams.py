"""Where a policy's extra streams (memgen.StreamSpec) run: which pool (model and
KV cache), which LoRA adapter id, which prefix-cache salt, and how their token
positions enter the model. One binding per StreamSpec object, made once per
engine: MemGen's by its set-up (memgen_setup.py); a user's the first time a
request carries it, its adapter installed under a fresh adapter id, on the
reasoner's base or on the model its `model=` names (`LLM(stream_models=...)`)."""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from memgen.engine.model_runner import ModelRunner
from memgen.engine.sequence import Stream
from memgen.latent_policy import StreamSpec
from memgen.layers.lora import install_lora

BASE_POOL = "base"
# One block of slack per stream in a pool shared by several streams, and one block of
# positions for a stream on its own model: room for its scratch rows past max_model_len.
# Named once here; the engine sizes its pools with it.
SCRATCH_SLACK_BLOCKS = 1


@dataclass
class Pool:
    """One model, its KV cache and block manager. `index` is how the engine addresses it
    everywhere (LLMEngine.pools[index], Stream.pool_index, the scheduler, batch assembly);
    `name` only labels logs and stats."""
    name: str
    index: int
    runner: ModelRunner
    num_streams: int = 1      # streams of one sequence that live in this pool
    block_manager: object = None   # memgen._native.BlockManager, made when the engine sizes the pool


def open_pool(name: str, index: int, model_dir: Path, hf_config, base: ModelRunner, max_model_len: int,
              block_size: int) -> Pool:
    """A model of its own beside the reasoner's (its KV cache is allocated by the
    engine with every pool's): same dtype, device and attention backend."""
    max_position = max_model_len + SCRATCH_SLACK_BLOCKS * block_size
    runner = ModelRunner(model_dir, hf_config, base.dtype, base.device, max_position, block_size,
                         attn_backend=base.attn_backend)
    return Pool(name, index, runner)


@dataclass
class StreamModel:
    """A model declared by `LLM(stream_models={name: path})`, resolved: its directory and
    config, or `shares`, the pool of an earlier model (or the reasoner's) with the same
    weights, which runs its streams in that pool's forward."""
    name: str
    model_dir: Path
    config: object
    shares: str | None = None


def resolve_stream_models(stream_models, reasoner_dir: Path, reasoner_config, max_model_len: int) -> list[StreamModel]:
    """Check `LLM(stream_models=...)` before anything loads: names, directories, supported
    architectures, room for max_model_len positions."""
    from memgen.model_config import load_model_config
    from memgen.sources import resolve_model_dir, same_model

    if not isinstance(stream_models, dict):
        raise TypeError(f"stream_models must be a dict of name -> model directory, got {type(stream_models).__name__}")
    resolved: list[StreamModel] = []
    for name, path in stream_models.items():
        if not isinstance(name, str) or not name or name == BASE_POOL:
            raise ValueError(f"stream_models: a model's name must be a non-empty str other than {BASE_POOL!r} "
                             f"(StreamSpec(model=None) is the reasoner's base), got {name!r}")
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"stream_models[{name!r}] must be a model directory (str or os.PathLike), "
                            f"got {type(path).__name__}")
        model_dir = Path(resolve_model_dir(path))
        try:
            config = load_model_config(model_dir)
        except ValueError as err:     # an unsupported architecture, said with the model's name
            raise ValueError(f"stream_models[{name!r}] ({model_dir}): {err}") from err
        positions = int(getattr(config, "max_position_embeddings", max_model_len))
        if positions < max_model_len:
            raise ValueError(f"stream_models[{name!r}] holds at most {positions} positions "
                             f"(max_position_embeddings) but max_model_len is {max_model_len}: a stream holds "
                             "as many positions as the reasoner; lower max_model_len")
        shares = BASE_POOL if same_model(model_dir, reasoner_dir) else None
        for earlier in resolved:
            if shares is None and earlier.shares is None and same_model(model_dir, earlier.model_dir):
                shares = earlier.name     # one model loaded once, one forward for both names
        resolved.append(StreamModel(name, model_dir, config, shares))
    return resolved


@dataclass
class StreamBinding:
    spec: StreamSpec
    pool: int                       # the pool's index (0: the reasoner's)
    adapter_id: int                 # -1: the base weights
    project: Callable[[torch.Tensor], torch.Tensor] | None   # the spec's input projection, width-checked
    token_input: Callable[[torch.Tensor], torch.Tensor] | None   # ids -> input rows (projected embeddings)
    width: int                      # the hidden size of the model it runs on
    salt: object                    # the prefix-cache salt of its streams: unique per binding


class StreamBinder:
    def __init__(self, base_runner, dtype: torch.dtype, device: torch.device):
        self.base_runner = base_runner
        self.dtype, self.device = dtype, device
        self._num_bindings = 0      # explicit bindings' salts are new: a rebound spec never hits old entries
        self._bindings: dict[int, StreamBinding] = {}   # id(spec) -> binding (it holds the spec alive)
        self._used_adapter_ids: set[int] = set()
        self._models: dict[str, tuple[int, ModelRunner]] = {}   # StreamSpec.model -> (pool index, runner)

    def open_models(self, models: list[StreamModel], first_index: int, max_model_len: int,
                    block_size: int) -> list[Pool]:
        """The pools of the declared stream models (numbered from `first_index`); a model
        with the reasoner's weights, or an earlier one's, runs in that one's pool."""
        pools: list[Pool] = []
        for model in models:
            if model.shares is not None:
                self._models[model.name] = (0, self.base_runner) if model.shares == BASE_POOL \
                    else self._models[model.shares]
                continue
            pool = open_pool(model.name, first_index + len(pools), model.model_dir, model.config,
                             self.base_runner, max_model_len, block_size)
            pools.append(pool)
            self._models[model.name] = (pool.index, pool.runner)
        return pools

    def new_adapter_id(self) -> int:
        """The lowest adapter id not in use (LoRA stacks are as long as the highest id)."""
        adapter_id = next(i for i in range(len(self._used_adapter_ids) + 1) if i not in self._used_adapter_ids)
        self._used_adapter_ids.add(adapter_id)
        return adapter_id

    def release_adapter_id(self, adapter_id: int) -> None:
        self._used_adapter_ids.discard(adapter_id)

    def bind(self, spec: StreamSpec, pool: int, adapter_id: int, width: int) -> None:
        """An explicit binding (MemGen's streams: their adapters are installed by the set-up).
        Binding a spec again (new weights under the same adapter id) gives its streams a new
        cache salt: entries made with the old weights are never hit again."""
        self._used_adapter_ids.add(adapter_id)
        self._num_bindings += 1
        self._bindings[id(spec)] = self._binding(spec, pool, adapter_id, width, self._num_bindings)

    def unbind(self, spec: StreamSpec) -> None:
        """Forget a spec whose requests are all gone; its adapter id is free again."""
        found = self._bindings.pop(id(spec), None)
        if found is not None:
            self._used_adapter_ids.discard(found.adapter_id)

    def _binding(self, spec, pool: int, adapter_id: int, width: int, serial: int = 0) -> StreamBinding:
        project = self._checked_projection(spec, width)
        # with a projection, token positions enter as the reasoner's embeddings, projected: one
        # function per spec, so that the batch assembly makes one call per step for all its rows
        embed = self.base_runner.model.model.embed_tokens
        token_input = None if project is None else (lambda ids: project(embed(ids)))
        return StreamBinding(spec, pool, adapter_id, project, token_input, width, (spec.name, adapter_id, pool, serial))

    def binding(self, spec: StreamSpec) -> StreamBinding:
        found = self._bindings.get(id(spec))
        if found is None:
            if not isinstance(spec, StreamSpec):
                raise TypeError(f"a policy's streams must be memgen.StreamSpec objects, got {type(spec).__name__}")
            pool, runner = self._model_of(spec)
            width = int(runner.hf_config.hidden_size)
            adapter_id = -1
            if spec.adapter is not None:
                adapter_id = self.new_adapter_id()
                try:
                    install_lora(runner.model, adapter_id, spec.adapter, self.dtype, self.device)
                except BaseException:
                    self._used_adapter_ids.discard(adapter_id)
                    raise
            found = self._bindings[id(spec)] = self._binding(spec, pool, adapter_id, width)
        return found

    def _model_of(self, spec: StreamSpec) -> tuple[int, ModelRunner]:
        """The pool and runner a user's spec runs on, checked against what its inputs need."""
        if spec.model is None:
            return 0, self.base_runner
        found = self._models.get(spec.model)
        if found is None:
            declared = sorted(self._models)
            raise ValueError(f"StreamSpec {spec.name!r} runs on model {spec.model!r}, which this LLM was not built "
                             f"with (declared: {declared or 'none'}): LLM(..., stream_models={{{spec.model!r}: "
                             "path}) loads it")
        config, base = found[1].hf_config, self.base_runner.hf_config
        if spec.input_projection is None:
            # without a projection its tokens go through the model's own embedding table,
            # and the rows of Inserts it follows enter as they are (at the reasoner's width)
            if spec.follow == "all" and config.hidden_size != base.hidden_size:
                raise ValueError(
                    f"StreamSpec {spec.name!r} follows every reasoner position (follow='all'), Inserts included, "
                    f"on model {spec.model!r} of hidden size {config.hidden_size}, but the reasoner's is "
                    f"{base.hidden_size}: give it an input_projection [N, {base.hidden_size}] -> "
                    f"[N, {config.hidden_size}], or follow='tokens'")
            if config.vocab_size < base.vocab_size:
                raise ValueError(
                    f"StreamSpec {spec.name!r} on model {spec.model!r} reads the reasoner's token ids with that "
                    f"model's embedding table of {config.vocab_size} rows, fewer than the reasoner's vocabulary "
                    f"({base.vocab_size}): give it an input_projection of the reasoner's embeddings")
        return found

    @staticmethod
    def _checked_projection(spec: StreamSpec, width: int):
        """The spec's input projection, its output checked against the stream's width (a
        wrong width would otherwise fail deep inside the forward)."""
        project = spec.input_projection
        if project is None:
            return None

        def checked(rows: torch.Tensor) -> torch.Tensor:
            out = project(rows)
            if not isinstance(out, torch.Tensor) or out.shape != (rows.shape[0], width):
                shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise ValueError(f"StreamSpec {spec.name!r}: input_projection must map [N, {rows.shape[-1]}] to "
                                 f"[N, {width}] (the hidden size of the model it runs on), got {shape} "
                                 f"for N = {rows.shape[0]}")
            return out
        return checked

    def create(self, spec: StreamSpec, prompt_token_ids: list[int]) -> Stream:
        """The stream of one request, holding the prompt positions it follows."""
        b = self.binding(spec)
        skip = spec.skip_token_ids
        ids = [t for t in prompt_token_ids if t not in skip] if skip else list(prompt_token_ids)
        return Stream(spec.name, ids, pool_index=b.pool, cache_salt=b.salt, adapter_id=b.adapter_id,
                      token_input=b.token_input)
