"""MemGen's factory, called by `LLM` (the engine knows no MemGen names): where the
weaver and trigger run, their LoRA adapters, and the policy that drives them
(memory.controller.MemGenPolicy, a memgen.LatentPolicy whose two extra streams are
bound here). `LLM` hands `MemGenSetup.factory(...)` to the engine, which calls it
with its base runner and stream binder and runs the policy as its default one.

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
from memgen.engine.extra_streams import BASE_POOL, SCRATCH_SLACK_BLOCKS, Pool, StreamBinder, open_pool
from memgen.engine.model_runner import ModelRunner
from memgen.layers.lora import install_lora
from memgen.memory.controller import ADAPTER_IDS, REASONER, TRIGGER, WEAVER, MemGenPolicy
from memgen.memory.delimiters import build_delimiter_table
from memgen.memory.parts import MemGenParts

__all__ = ["BASE_POOL", "SCRATCH_SLACK_BLOCKS", "MemGenPlan", "MemGenSetup", "Pool", "check_memgen_fits"]


@dataclass
class MemGenPlan:
    """What MemGen adds to an engine: pools for weaver/trigger checkpoints other
    than the reasoner's, the pool of each stream, and the policy of its requests."""
    extra_pools: list[Pool]
    pool_of_stream: dict[str, str]
    streams_in_base: int
    policy: MemGenPolicy


@dataclass
class MemGenSetup:
    ckpt: MemGenCheckpoint
    tokenizer: object
    weaver_dir: Path | None = None    # None: the reasoner's checkpoint
    trigger_dir: Path | None = None
    weaver_config: object = None      # HF configs of those directories
    trigger_config: object = None

    def build(self, base: ModelRunner, dtype: torch.dtype, device: torch.device, max_model_len: int,
              block_size: int, binder: StreamBinder, follow: bool = False) -> MemGenPlan:
        """Runners for separate checkpoints (pools numbered after the base's 0), the
        adapters installed on the model each role runs on, and the policy, whose
        streams `binder` maps onto those pools and adapters."""
        ckpt = self.ckpt
        extra: list[Pool] = []
        pool_of_stream = {REASONER: BASE_POOL}
        runner_of = {TRIGGER: base}
        streams_in_base = 1
        roles = [(WEAVER, self.weaver_dir, self.weaver_config, ckpt.weaver_lora)]
        if ckpt.settings.trigger_active:  # an inactive trigger never runs: no model, no KV
            roles.append((TRIGGER, self.trigger_dir, self.trigger_config, ckpt.trigger_lora))
        else:
            pool_of_stream[TRIGGER] = BASE_POOL
        for name, model_dir, config, lora in roles:
            if model_dir is None:
                runner, pool_of_stream[name] = base, BASE_POOL
                streams_in_base += 1
            else:
                pool = open_pool(name, 1 + len(extra), model_dir, config, base, max_model_len, block_size)
                extra.append(pool)
                runner, pool_of_stream[name] = pool.runner, name
            install_lora(runner.model, ADAPTER_IDS[name], lora, dtype, device)
            runner_of[name] = runner
        parts = MemGenParts.from_checkpoint(ckpt, dtype, device)
        table = build_delimiter_table(self.tokenizer, base.hf_config.vocab_size)
        policy = MemGenPolicy(parts, table, self.tokenizer, self.tokenizer.pad_token_id, backend=base.attn_backend,
                              follow=follow)
        index_of = {BASE_POOL: 0, **{pool.name: pool.index for pool in extra}}
        for spec in policy.streams:
            binder.bind(spec, index_of[pool_of_stream[spec.name]], ADAPTER_IDS[spec.name],
                        int(runner_of[spec.name].hf_config.hidden_size))
        return MemGenPlan(extra, pool_of_stream, streams_in_base, policy)

    def factory(self, dtype: torch.dtype, device: torch.device, max_model_len: int, block_size: int,
                follow: bool, plans: list):
        """The engine's `default_policy` factory: (base runner, stream binder) -> (policy, its
        extra pools, streams per sequence in the base pool); the plan it makes is appended
        to `plans` (LLM keeps it for weight updates)."""
        def build(base: ModelRunner, binder: StreamBinder):
            plan = self.build(base, dtype, device, max_model_len, block_size, binder, follow=follow)
            plans.append(plan)
            return plan.policy, plan.extra_pools, plan.streams_in_base
        return build

    def update(self, ckpt: MemGenCheckpoint, runners: dict[str, ModelRunner], plan: MemGenPlan,
               dtype: torch.dtype, device: torch.device) -> None:
        """Swap in new MemGen weights of the same shapes (live weight sync); `runners`:
        pool name -> runner."""
        old = self.ckpt
        pools = plan.pool_of_stream
        reasoner_config = runners[BASE_POOL].hf_config
        # the configs checked at load; an inactive trigger's unnamed base of another width
        # was left unchecked there (trigger_config None) and stays so
        trigger_config = self.trigger_config
        if trigger_config is None and ckpt.settings.trigger_active:
            trigger_config = reasoner_config
        check_memgen_fits(ckpt, reasoner_config, self.weaver_config or reasoner_config, trigger_config)
        if ckpt.settings.trigger_active != old.settings.trigger_active:
            raise ValueError("a weight update cannot switch the trigger between active and inactive; "
                             "build a new LLM for that")
        install_lora(runners[pools[WEAVER]].model, ADAPTER_IDS[WEAVER], ckpt.weaver_lora, dtype, device)
        if ckpt.settings.trigger_active:
            install_lora(runners[pools[TRIGGER]].model, ADAPTER_IDS[TRIGGER], ckpt.trigger_lora, dtype, device)
        plan.policy.parts = MemGenParts.from_checkpoint(ckpt, dtype, device)
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
