"""One model and its paged KV cache: loads the weights, allocates the cache,
and runs a forward over a step's chunks. An engine may hold several (MemGen's
weaver on another checkpoint gets its own runner and pool); none is global."""
from __future__ import annotations

from pathlib import Path

import torch

from memgen._native import StepCore
from memgen.engine.input_batch import InputBuffers, ModelInput, build_model_input
from memgen.layers.backend import TorchBackend
from memgen.layers.context import forward_context
from memgen.models import DecoderForCausalLM, load_model


class ModelRunner:
    def __init__(self, model_dir: Path, hf_config, dtype: torch.dtype, device: torch.device,
                 max_position: int, block_size: int, attn_backend=None):
        self.dtype, self.device, self.block_size = dtype, device, block_size
        self.hf_config = hf_config
        self.model: DecoderForCausalLM = load_model(model_dir, dtype, device, max_position, hf_config)
        self.attn_backend = attn_backend or TorchBackend()
        self.num_kv_blocks = 0
        self.input_buffers = InputBuffers(device)
        self.decode_graphs = None   # engine.cuda_graph.DecodeGraphs when CUDA graphs are on

    @property
    def kv_bytes_per_block(self) -> int:
        layers = self.model.attention_layers()
        a = layers[0]
        return 2 * len(layers) * self.block_size * a.num_kv_heads * a.head_dim * self.dtype.itemsize

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self.num_kv_blocks = num_blocks
        # A backend that reads only the slots written before may get an untouched cache: on
        # the CPU its pages then arrive as blocks are used (zero-filling a 1 GiB cache took
        # 4 s here); padded gathers (SDPA) need zeros, never garbage times a zero weight.
        written_only = getattr(self.attn_backend, "reads_only_written_slots", None)
        alloc = torch.empty if written_only is not None and written_only(self.device, self.dtype) else torch.zeros
        for layer in self.model.attention_layers():
            shape = (num_blocks, self.block_size, layer.num_kv_heads, layer.head_dim)
            k = alloc(shape, dtype=self.dtype, device=self.device)
            v = alloc(shape, dtype=self.dtype, device=self.device)
            layer.bind(k, v, self.attn_backend)

    def prepare(self, step: StepCore, pool_index: int = -1) -> ModelInput:
        """The model input of a step's chunks (those of `pool_index`; -1: all). The
        integer tensors are views of this runner's buffers: valid until its next prepare()."""
        return build_model_input(step, pool_index, self.input_buffers, self.block_size, self.device, self.dtype,
                                 self.attn_backend)

    @torch.inference_mode()
    def forward(self, inp: ModelInput) -> torch.Tensor:
        """Post-final-norm hidden states of every row, [N, H] (`inp` from prepare(): read only)."""
        if self.decode_graphs is not None and self.decode_graphs.can_run(inp):
            return self.decode_graphs.run(inp)
        with forward_context(inp.context):
            return self.model(inp.input_ids, inp.positions, inp.latents, inp.latent_index)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.compute_logits(hidden)
