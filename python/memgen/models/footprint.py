"""What a decoder's weights would occupy, from its config alone (no weights
read): for load logs that report memory the engine did not spend."""
from __future__ import annotations

import torch


def weight_bytes(hf_config, dtype: torch.dtype) -> int:
    """Bytes of the engine decoder's parameters for `hf_config` in `dtype`
    (built on the meta device; a tied head counts once)."""
    from memgen.models.decoder import DecoderForCausalLM

    with torch.device("meta"):
        model = DecoderForCausalLM(hf_config, 1, dtype)
    itemsize = torch.empty((), dtype=dtype).element_size()
    return sum(p.numel() for p in model.parameters()) * itemsize


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
