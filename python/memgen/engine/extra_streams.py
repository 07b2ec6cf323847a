"""Where a policy's extra streams (memgen.StreamSpec) run: which pool (model and
KV cache), which LoRA adapter id, which prefix-cache salt, and how their token
positions enter the model. One binding per StreamSpec object, made once per
engine: MemGen's are bound by its set-up (engine/memgen_setup.py, on the
reasoner's base or on their own checkpoints); a user's spec is bound the first
time a request carries it, on the reasoner's base, its adapter installed under
a fresh adapter id."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from memgen.engine.sequence import Stream
from memgen.latent_policy import StreamSpec
from memgen.layers.lora import install_lora

BASE_POOL = "base"


@dataclass
class StreamBinding:
    spec: StreamSpec
    pool: str                       # the pool's name (the scheduler maps it to its index)
    adapter_id: int                 # -1: the base weights
    token_input: Callable[[torch.Tensor], torch.Tensor] | None   # ids -> input rows (projected embeddings)
    width: int                      # the hidden size of the model it runs on


class StreamBinder:
    def __init__(self, base_runner, dtype: torch.dtype, device: torch.device):
        self.base_runner = base_runner
        self.dtype, self.device = dtype, device
        self.version = 0            # weight updates bump it: cache entries of old weights are never hit
        self._bindings: dict[int, StreamBinding] = {}   # id(spec) -> binding (it holds the spec alive)
        self._used_adapter_ids: set[int] = set()

    def bind(self, spec: StreamSpec, pool: str, adapter_id: int, width: int) -> None:
        """An explicit binding (MemGen's streams: their adapters are installed by the set-up)."""
        self._used_adapter_ids.add(adapter_id)
        self._bindings[id(spec)] = StreamBinding(spec, pool, adapter_id, self._token_input(spec), width)

    def binding(self, spec: StreamSpec) -> StreamBinding:
        found = self._bindings.get(id(spec))
        if found is None:
            if not isinstance(spec, StreamSpec):
                raise TypeError(f"a policy's streams must be memgen.StreamSpec objects, got {type(spec).__name__}")
            adapter_id = -1
            if spec.adapter is not None:
                adapter_id = max(self._used_adapter_ids, default=-1) + 1
                install_lora(self.base_runner.model, adapter_id, spec.adapter, self.dtype, self.device)
                self._used_adapter_ids.add(adapter_id)
            width = int(self.base_runner.hf_config.hidden_size)
            found = StreamBinding(spec, BASE_POOL, adapter_id, self._token_input(spec), width)
            self._bindings[id(spec)] = found
        return found

    def _token_input(self, spec: StreamSpec):
        """One function per spec: the batch assembly makes one call per step for all of
        its rows, whatever the number of requests."""
        project = spec.input_projection
        if project is None:
            return None
        embed = self.base_runner.model.model.embed_tokens
        return lambda ids: project(embed(ids))

    def create(self, spec: StreamSpec, prompt_token_ids: list[int]) -> Stream:
        """The stream of one request, holding the prompt positions it follows."""
        b = self.binding(spec)
        skip = spec.skip_token_ids
        ids = [t for t in prompt_token_ids if t not in skip] if skip else list(prompt_token_ids)
        return Stream(spec.name, ids, pool=b.pool, cache_salt=(spec.name, b.adapter_id, b.pool, self.version),
                      adapter_id=b.adapter_id, token_input=b.token_input)
