"""Assemble MemGen inside an engine: where the weaver and trigger run, their
LoRA adapters, and the controller that drives them.

W and T share the reasoner's model (and KV pool) when their base checkpoint is
the reasoner's: the base weights are read once per step and each adapter's
LoRA delta is added to its own rows. A weaver or trigger on another checkpoint
(even of another width) gets its own model runner and pool.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from memgen.checkpoint import MemGenCheckpoint, validate
from memgen.engine.model_runner import ModelRunner
from memgen.layers.lora import install_lora
from memgen.memory.controller import ADAPTER_IDS, REASONER, TRIGGER, WEAVER, MemGenController
from memgen.memory.delimiters import build_delimiter_table
from memgen.memory.parts import MemGenParts

BASE_POOL = "base"


@dataclass
class MemGenSetup:
    ckpt: MemGenCheckpoint
    tokenizer: object
    weaver_dir: Path | None = None    # None: the reasoner's checkpoint
    trigger_dir: Path | None = None
    weaver_config: object = None      # HF configs of those directories
    trigger_config: object = None

    def build(self, runners: dict[str, ModelRunner], streams_per_pool: dict[str, int], dtype: torch.dtype,
              device: torch.device, max_model_len: int, block_size: int, follow: bool = False):
        """Add runners for separate checkpoints, install the adapters, and return
        (controller, pool of each stream)."""
        base = runners[BASE_POOL]
        ckpt = self.ckpt
        active = bool(ckpt.settings.trigger_active)
        pools = {REASONER: BASE_POOL}
        roles = [(WEAVER, self.weaver_dir, self.weaver_config, ckpt.weaver_lora)]
        if active:  # an inactive trigger never runs: no model, no KV
            roles.append((TRIGGER, self.trigger_dir, self.trigger_config, ckpt.trigger_lora))
        else:
            pools[TRIGGER] = BASE_POOL
        for name, model_dir, config, lora in roles:
            if model_dir is None:
                pool, runner = BASE_POOL, base
            else:
                pool = name
                runner = ModelRunner(model_dir, config, dtype, device, max_model_len + block_size, block_size,
                                     attn_backend=base.attn_backend)
                runners[pool] = runner
            install_lora(runner.model, ADAPTER_IDS[name], lora, dtype, device)
            pools[name] = pool
            streams_per_pool[pool] = streams_per_pool.get(pool, 0) + 1
        parts = MemGenParts.from_checkpoint(ckpt, dtype, device)
        table = build_delimiter_table(self.tokenizer, base.hf_config.vocab_size)
        controller = MemGenController(parts, table, self.tokenizer, self.tokenizer.pad_token_id,
                                      base.model.model.embed_tokens, max_model_len, backend=base.attn_backend,
                                      follow=follow)
        return controller, pools


    def update(self, ckpt: MemGenCheckpoint, runners: dict[str, ModelRunner], pools: dict[str, str],
               controller: MemGenController, dtype: torch.dtype, device: torch.device) -> None:
        """Swap in new MemGen weights of the same shapes (live weight sync)."""
        old = self.ckpt
        reasoner_config = runners[BASE_POOL].hf_config
        check_memgen_fits(ckpt, reasoner_config, self.weaver_config or reasoner_config,
                          self.trigger_config or reasoner_config)
        if ckpt.settings.trigger_active != old.settings.trigger_active:
            raise ValueError("a weight update cannot switch the trigger between active and inactive; "
                             "build a new LLM for that")
        install_lora(runners[pools[WEAVER]].model, ADAPTER_IDS[WEAVER], ckpt.weaver_lora, dtype, device)
        if ckpt.settings.trigger_active:
            install_lora(runners[pools[TRIGGER]].model, ADAPTER_IDS[TRIGGER], ckpt.trigger_lora, dtype, device)
        controller.parts = MemGenParts.from_checkpoint(ckpt, dtype, device)
        self.ckpt = ckpt


def check_memgen_fits(ckpt: MemGenCheckpoint, reasoner_config, weaver_config, trigger_config) -> None:
    """Every shape against the bases, and an active trigger's vocabulary against
    the reasoner's (it reads the reasoner's token ids)."""
    validate(ckpt, reasoner_config, weaver_config, trigger_config)
    if ckpt.settings.trigger_active and trigger_config.vocab_size != reasoner_config.vocab_size:
        raise ValueError(
            f"the trigger's base model has a vocabulary of {trigger_config.vocab_size} tokens but the "
            f"reasoner's has {reasoner_config.vocab_size}: an active trigger reads the reasoner's token ids, "
            "so its base must share the reasoner's vocabulary")
