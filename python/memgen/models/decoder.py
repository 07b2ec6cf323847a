"""One engine-native decoder for the Llama family as MemGen uses it: Qwen2 /
Qwen2.5 (QKV bias), Qwen3 (per-head q/k RMSNorm), Llama / SmolLM2, SmolLM3
(NoPE layers: no rotary embedding on the layers its config marks). Packed QKV
and gate-up projections, GQA, RoPE, tied or separate LM head.

forward(input_ids, positions, latents=None, latent_index=None) takes a flat
batch of N rows (the chunks of the step, see layers.context) and returns the
post-final-norm hidden states [N, H]; compute_logits(hidden) is separate, so
callers that read hidden states (MemGen's weaver and trigger) skip the LM head.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from memgen.layers.attention import Attention
from memgen.layers.backend import TorchBackend, layer_ops
from memgen.layers.context import get_context
from memgen.layers.linear import Linear, SiluAndMul, TiedEmbedding
from memgen.layers.norm import RMSNorm
from memgen.layers.rotary import RotaryEmbedding


@dataclass(frozen=True)
class ArchSpec:
    """What differs between the supported families."""
    qkv_bias: bool
    o_bias: bool
    qk_norm: bool
    mlp_bias: bool
    rope_layers: tuple[bool, ...] | None = None   # per layer: apply RoPE? None: every layer


def _smollm3_rope_layers(hf_config) -> tuple[bool, ...]:
    """SmolLM3's `no_rope_layers[i]` is 1 where layer i USES RoPE (HF's
    `use_rope = no_rope_layers[i]`); its config fills it from
    `no_rope_layer_interval` (every interval-th layer is NoPE) when absent."""
    n = hf_config.num_hidden_layers
    flags = getattr(hf_config, "no_rope_layers", None)
    if flags is None:
        interval = getattr(hf_config, "no_rope_layer_interval", 4)
        flags = [int((i + 1) % interval != 0) for i in range(n)]
    if len(flags) < n:
        raise ValueError(f"SmolLM3 config: no_rope_layers has {len(flags)} entries for {n} layers")
    # HF gives its NoPE layers sliding-window attention when use_sliding_window is
    # set; the engine's attention has no window, so refuse rather than differ.
    if getattr(hf_config, "use_sliding_window", False) \
            and "sliding_attention" in (getattr(hf_config, "layer_types", None) or []):
        raise ValueError("SmolLM3 config with use_sliding_window=true is not supported: the engine's "
                         "attention has no sliding window (the released SmolLM3-3B has it off)")
    return tuple(bool(f) for f in flags[:n])


def arch_spec(hf_config) -> ArchSpec:
    model_type = hf_config.model_type
    attention_bias = bool(getattr(hf_config, "attention_bias", False))
    if model_type == "qwen2":
        return ArchSpec(qkv_bias=True, o_bias=False, qk_norm=False, mlp_bias=False)
    if model_type == "qwen3":
        return ArchSpec(qkv_bias=attention_bias, o_bias=attention_bias, qk_norm=True, mlp_bias=False)
    if model_type == "llama":
        return ArchSpec(qkv_bias=attention_bias, o_bias=attention_bias, qk_norm=False,
                        mlp_bias=bool(getattr(hf_config, "mlp_bias", False)))
    if model_type == "smollm3":
        return ArchSpec(qkv_bias=attention_bias, o_bias=attention_bias, qk_norm=False,
                        mlp_bias=bool(getattr(hf_config, "mlp_bias", False)),
                        rope_layers=_smollm3_rope_layers(hf_config))
    raise ValueError(f"model type {model_type!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")


SUPPORTED_MODEL_TYPES = ("qwen2", "qwen3", "llama", "smollm3")


class DecoderAttention(nn.Module):
    def __init__(self, hf_config, spec: ArchSpec, use_rope: bool = True):
        super().__init__()
        self.use_rope = use_rope
        self.num_heads = hf_config.num_attention_heads
        self.num_kv_heads = getattr(hf_config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // self.num_heads
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.split_sizes = [q_size, kv_size, kv_size]
        self.qkv_proj = Linear(hf_config.hidden_size, {"q": q_size, "k": kv_size, "v": kv_size}, bias=spec.qkv_bias)
        self.o_proj = Linear(q_size, hf_config.hidden_size, bias=spec.o_bias)
        if spec.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, hf_config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, hf_config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim ** -0.5)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv_proj.forward(x)
        q_size, kv_size = self.split_sizes[0], self.split_sizes[1]
        v = qkv[:, q_size + kv_size:].reshape(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is None and self.use_rope and self.attn.fuses_rope(qkv):
            # the native CPU attention rotates q and k as it reads them: views, no copies
            q = qkv[:, :q_size].view(-1, self.num_heads, self.head_dim)
            k = qkv[:, q_size:q_size + kv_size].view(-1, self.num_kv_heads, self.head_dim)
            out = self.attn.forward(q, k, v, rope=(cos.squeeze(1), sin.squeeze(1)))
        else:
            if self.q_norm is None:
                # q and k are adjacent in the packed output: one [N, Hq + Hk, D] view, rotated at once
                qk = qkv[:, :q_size + kv_size].reshape(-1, self.num_heads + self.num_kv_heads, self.head_dim)
                if self.use_rope:
                    qk = RotaryEmbedding.apply_one(qk, cos, sin)
                q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
            else:
                q = self.q_norm(qkv[:, :q_size].reshape(-1, self.num_heads, self.head_dim))
                k = self.k_norm(qkv[:, q_size:q_size + kv_size].reshape(-1, self.num_kv_heads, self.head_dim))
                if self.use_rope:
                    q, k = RotaryEmbedding.apply(q, k, cos, sin)
            out = self.attn.forward(q, k, v)
        return self.o_proj.forward(out.reshape(-1, self.num_heads * self.head_dim))


class DecoderMLP(nn.Module):
    def __init__(self, hf_config, spec: ArchSpec):
        super().__init__()
        inter = hf_config.intermediate_size
        self.gate_up_proj = Linear(hf_config.hidden_size, {"gate": inter, "up": inter}, bias=spec.mlp_bias)
        self.down_proj = Linear(inter, hf_config.hidden_size, bias=spec.mlp_bias)
        self.act = SiluAndMul()
        if getattr(hf_config, "hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {hf_config.hidden_act!r} is not supported (only 'silu')")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj.forward(self.act.forward(self.gate_up_proj.forward(x)))


class DecoderLayer(nn.Module):
    def __init__(self, hf_config, spec: ArchSpec, layer_idx: int = 0):
        super().__init__()
        use_rope = spec.rope_layers is None or spec.rope_layers[layer_idx]
        self.input_layernorm = RMSNorm(hf_config.hidden_size, hf_config.rms_norm_eps)
        self.self_attn = DecoderAttention(hf_config, spec, use_rope)
        self.post_attention_layernorm = RMSNorm(hf_config.hidden_size, hf_config.rms_norm_eps)
        self.mlp = DecoderMLP(hf_config, spec)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor,
                sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the previous layer's output (the embeddings at layer 0, residual None);
        returns this layer's output and the residual stream before it: the residual
        adds ride in the norms (one fused op each on CPU)."""
        # submodules' forward called directly: nn.Module.__call__'s hook machinery costs
        # ~5 us a call, ~10 calls a layer, 300 a SmolLM2 step (no hooks are registered here)
        if residual is None:
            residual, x = x, self.input_layernorm.forward(x)
        else:
            x, residual = self.input_layernorm.forward(x, residual)
        x, residual = self.post_attention_layernorm.forward(self.self_attn.forward(x, cos, sin), residual)
        return self.mlp.forward(x), residual


class DecoderModel(nn.Module):
    def __init__(self, hf_config, spec: ArchSpec, max_position: int, dtype: torch.dtype):
        super().__init__()
        # uninitialized: the checkpoint's weights are always loaded over it, and nn.Embedding's
        # random init costs 0.15 s of LLM() on SmolLM2
        self.embed_tokens = nn.Embedding(hf_config.vocab_size, hf_config.hidden_size,
                                         _weight=torch.empty(hf_config.vocab_size, hf_config.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(hf_config, spec, i) for i in range(hf_config.num_hidden_layers))
        self.norm = RMSNorm(hf_config.hidden_size, hf_config.rms_norm_eps)
        head_dim = self.layers[0].self_attn.head_dim
        self.rotary = RotaryEmbedding(hf_config, head_dim, max_position, dtype)


class DecoderForCausalLM(nn.Module):
    def __init__(self, hf_config, max_position: int, dtype: torch.dtype):
        super().__init__()
        self.config = hf_config
        self.spec = arch_spec(hf_config)
        self.model = DecoderModel(hf_config, self.spec, max_position, dtype)
        self.tie_word_embeddings = bool(getattr(hf_config, "tie_word_embeddings", False))
        self.lm_head = None if self.tie_word_embeddings else Linear(hf_config.hidden_size, hf_config.vocab_size)

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn.attn for layer in self.model.layers]

    def embed_inputs(self, input_ids: torch.Tensor, latents: torch.Tensor | None = None,
                     latent_index: torch.Tensor | None = None) -> torch.Tensor:
        """Token rows take their embedding, rows with latent_index >= 0 that row of
        `latents` (through the forward's backend: one fused pass on Triton)."""
        embed = self.model.embed_tokens
        if latents is None:
            return embed(input_ids)
        if isinstance(embed, TiedEmbedding):   # the embedding lives in the LM head's panels
            return embed.inject(input_ids, latent_index, latents)
        backend = get_context().backend
        inject = (backend or TorchBackend).inject_latents
        return inject(input_ids, latent_index, self.model.embed_tokens.weight, latents)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, latents: torch.Tensor | None = None,
                latent_index: torch.Tensor | None = None) -> torch.Tensor:
        h = self.embed_inputs(input_ids, latents, latent_index)
        cos, sin = self.model.rotary.lookup(positions)
        fused = None
        if h.device.type == "cpu":   # the layers in one native call (backend.decoder_layers), rope as float32 [N, D]
            rope32 = (cos.squeeze(1).float().contiguous(), sin.squeeze(1).float().contiguous())
            fused = layer_ops().decoder_layers(self.model.layers, h, rope32)
        if fused is not None:
            h, residual = fused
        else:
            residual = None
            for layer in self.model.layers:
                h, residual = layer.forward(h, residual, cos, sin)
        return self.model.norm.forward(h, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.lm_head is not None:
            return self.lm_head(hidden)
        embed = self.model.embed_tokens
        if isinstance(embed, TiedEmbedding):
            return embed.project(hidden)
        # tied: the embedding [V, H] is W, read as it is stored
        return layer_ops().tied_logits(hidden, embed.weight)
