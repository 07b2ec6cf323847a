"""memgen.hf: MemGen on HF transformers + PEFT with the reference's semantics,
the project's parity oracle and training-side model. Never imported by the engine.

    model = HFMemGenModel.from_checkpoint(ckpt_dir, reasoner_dir, dtype=torch.float64)
    ids, aug = model.generate(input_ids, attention_mask, max_new_tokens=32)
    out = model.sft_forward(ids[0], labels)

Where it knowingly differs from the reference code: DIFFERENCES.md beside this file.
"""
from .generate import generate
from .model import DELIMITERS, MEMGEN_CHAT_TEMPLATE, HFMemGenModel, positions_from_mask
from .sft import SFTOutput, insertion_points, sft_forward

__all__ = ["HFMemGenModel", "generate", "sft_forward", "insertion_points", "SFTOutput",
           "DELIMITERS", "MEMGEN_CHAT_TEMPLATE", "positions_from_mask"]
