"""What a decoder's weights would occupy, from its config alone (no weights
read): for load logs that report memory the engine did not spend."""
from __future__ import annotations

import torch


def weight_bytes(hf_config, dtype: torch.dtype) -> int:
    """Bytes of the engine decoder's parameters for `hf_config` in `dtype` (a tied
    head counts once), counted from the config: building the decoder, even on the
    meta device, imports torch._dynamo (~2 s) for a log line."""
    from memgen.models.decoder import arch_spec

    spec = arch_spec(hf_config)
    hidden, inter, vocab = hf_config.hidden_size, hf_config.intermediate_size, hf_config.vocab_size
    heads = hf_config.num_attention_heads
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
    head_dim = getattr(hf_config, "head_dim", None) or hidden // heads
    q, kv = heads * head_dim, kv_heads * head_dim
    layer = (hidden * (q + 2 * kv) + q * hidden + 3 * hidden * inter   # q/k/v, o, gate/up/down
             + spec.qkv_bias * (q + 2 * kv) + spec.o_bias * hidden + spec.mlp_bias * (2 * inter + hidden)
             + 2 * hidden + spec.qk_norm * 2 * head_dim)                  # the two norms, q/k norms
    tied = bool(getattr(hf_config, "tie_word_embeddings", False))
    total = hf_config.num_hidden_layers * layer + vocab * hidden * (1 if tied else 2) + hidden
    return total * torch.empty((), dtype=dtype).element_size()


def inactive_trigger_note(trigger_config, trigger_dir, dtype: torch.dtype) -> str:
    """The one load-log line for an inactive trigger: it never runs, so its base
    is not loaded (the reference loads a full copy regardless, spec §4).
    trigger_config None: the base was not named; trigger_dir None: the reasoner's."""
    name = str(dtype).removeprefix("torch.")
    if trigger_config is None:
        return ("memgen: trigger inactive: its base model is not named (trigger_model) and is not loaded; "
                "no trigger weights or KV cache")
    mib = weight_bytes(trigger_config, dtype) / 2**20
    if trigger_dir is None:
        return (f"memgen: trigger inactive: its base model (the reasoner's) is not loaded as a separate copy "
                f"as the reference does, saving {mib:.1f} MiB of {name} weights; no trigger KV cache")
    return (f"memgen: trigger inactive: its base model ({trigger_dir}) is not loaded, saving {mib:.1f} MiB of "
            f"{name} weights and a trigger KV cache")
