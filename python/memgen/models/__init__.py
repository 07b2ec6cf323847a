"""memgen.models: engine-native decoders and their weight loading.

`load_model(model_dir, dtype, device, max_position)` builds the decoder for a
local HF directory (config.json + safetensors) and loads its weights."""
from __future__ import annotations

from pathlib import Path

import torch

from memgen.models.decoder import SUPPORTED_MODEL_TYPES, DecoderForCausalLM, arch_spec
from memgen.layers import native
from memgen.layers.linear import TiedEmbedding, pack_linears_for_cpu
from memgen.models.loader import load_weights

__all__ = ["SUPPORTED_MODEL_TYPES", "DecoderForCausalLM", "load_hf_config", "load_model"]


def load_hf_config(model_dir: str | Path):
    from transformers import AutoConfig

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{str(model_dir / 'config.json')!r} not found: not an HF model directory")
    try:
        config = AutoConfig.from_pretrained(str(model_dir))
    except (ValueError, OSError) as e:
        raise ValueError(f"cannot read {model_dir / 'config.json'}: {e}") from e
    arch_spec(config)  # raises ValueError for unsupported families
    return config


def load_model(model_dir: str | Path, dtype: torch.dtype, device: torch.device,
               max_position: int, hf_config=None) -> DecoderForCausalLM:
    hf_config = hf_config or load_hf_config(model_dir)
    with torch.device(device):
        model = DecoderForCausalLM(hf_config, max_position, dtype)
    model.to(dtype=dtype)
    model.model.rotary.to(device)
    if model.tie_word_embeddings and native.packed_linear is not None \
            and torch.device(device).type == "cpu" and dtype in (torch.float32, torch.bfloat16):
        # the tied LM head's W, read whole every decode step, packed in panels like every
        # linear (the lookup gathers from them): one copy of the matrix
        model.model.embed_tokens = TiedEmbedding(hf_config.vocab_size, hf_config.hidden_size).to(dtype)
    # float32 / bfloat16 on the CPU: the linears hold their weights in the native kernel's panels
    # (engine/cpu_gemm.h: ~1.8x MKL at a decode step's few rows), loaded straight into them
    pack_linears_for_cpu(model, keep_values=False)
    load_weights(model, Path(model_dir))
    return model.eval().requires_grad_(False)
