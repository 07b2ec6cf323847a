"""The things a benchmark runs: the MemGen checkpoint (given, or initialised the
way the reference does), the engine with memory off and on, the HF reference."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from memgen.checkpoint import DEFAULT_LORA_CONFIG, MemGenCheckpoint, MemGenSettings
from memgen.model_options import engine_kwargs


@dataclasses.dataclass
class MemorySource:
    checkpoint: MemGenCheckpoint
    description: dict        # what went into the JSON's config


def memory_source(args, model_dir: Path) -> MemorySource:
    """--memgen DIR, or a fresh checkpoint with the reference's random init
    (K latents, budget, trigger active, LoRA r=16 alpha=32 on q/v)."""
    from memgen.checkpoint import load_checkpoint, random_checkpoint
    from memgen.models import load_hf_config
    from memgen.sources import resolve_model_dir

    if args.memgen is not None:
        ckpt = load_checkpoint(args.memgen, reference_compat=args.reference_compat)
        desc = {"source": str(args.memgen), "settings": ckpt.settings.to_dict(),
                "reference_compat": args.reference_compat}
    else:
        settings = MemGenSettings(prompt_latents_len=args.prompt_latents, inference_latents_len=args.inference_latents,
                                  trigger_active=args.trigger_active, max_prompt_aug_num=1,
                                  max_inference_aug_num=args.budget,
                                  weaver_lora_config=dict(DEFAULT_LORA_CONFIG),
                                  trigger_lora_config=dict(DEFAULT_LORA_CONFIG))
        weaver_dir = resolve_model_dir(args.weaver_model) if args.weaver_model else None
        trigger_dir = resolve_model_dir(args.trigger_model) if args.trigger_model else None
        ckpt = random_checkpoint(settings, load_hf_config(model_dir),
                                 load_hf_config(weaver_dir) if weaver_dir else None,
                                 load_hf_config(trigger_dir) if trigger_dir else None, seed=args.seed,
                                 weaver_base=str(weaver_dir) if weaver_dir else None,
                                 trigger_base=str(trigger_dir) if trigger_dir else None)
        note = ("random init as the reference does (query latents N(0,1), LayerNorm 1/0, scale 1, "
                "nn.Linear default projections and trigger head, LoRA A Kaiming / B zero)")
        if args.always_insert:
            h = ckpt.trigger_head["weight"]
            ckpt.trigger_head = {"weight": torch.zeros_like(h),
                                 "bias": torch.tensor([0.0, 1.0], dtype=h.dtype)}
            note += "; trigger head set to always insert (--always-insert)"
        desc = {"source": "random_checkpoint", "seed": args.seed, "note": note,
                "settings": settings.to_dict()}
        print(f"memgen bench: no --memgen given: initialised the MemGen parts the way the reference does "
              f"(K={args.prompt_latents} prompt / {args.inference_latents} inference latents, budget {args.budget}, "
              f"trigger {'active' if args.trigger_active else 'inactive'}, LoRA r=16 alpha=32 on q/v, seed {args.seed})"
              + (", trigger forced to always insert" if args.always_insert else ""), flush=True)
    return MemorySource(ckpt, desc)


def prompt_tokenizer(model_dir: Path, with_memory: bool = True):
    """The tokenizer `LLM(model_dir, memgen=...)` uses: its chat template is
    MemGen's ChatML variant, so both sides get the prompts a MemGen user sends."""
    from transformers import AutoTokenizer

    from memgen.memory.chat_template import MEMGEN_CHAT_TEMPLATE

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    if with_memory:
        tok.chat_template = MEMGEN_CHAT_TEMPLATE
    return tok


def latent_lengths(ckpt: MemGenCheckpoint) -> tuple[int, int]:
    return ckpt.settings.prompt_latents_len, ckpt.settings.inference_latents_len


def needed_model_len(ckpt: MemGenCheckpoint | None, max_prompt: int, max_tokens: int) -> int:
    """Room for the prompt, the output and every latent a request may insert."""
    extra = 0
    if ckpt is not None:
        s = ckpt.settings
        extra = s.prompt_latents_len * s.max_prompt_aug_num + s.inference_latents_len * s.max_inference_aug_num
    return max_prompt + max_tokens + extra + 16


def build_llm(args, model_dir: Path, memgen: MemGenCheckpoint | None, max_num_seqs: int, max_model_len: int):
    """The engine for one side of a comparison. Prefix caching is off unless
    --prefix-caching: repeated iterations would otherwise time cache hits."""
    from memgen import LLM

    kwargs = dict(model=model_dir, seed=args.seed, max_num_seqs=max_num_seqs, max_model_len=max_model_len,
                  enable_prefix_caching=args.prefix_caching, **engine_kwargs(args))
    if memgen is not None:
        kwargs.update(memgen=memgen, weaver_model=args.weaver_model, trigger_model=args.trigger_model)
    return LLM(**kwargs)


def engine_description(llm) -> dict:
    cfg = llm.config
    return {"dtype": str(llm.dtype).replace("torch.", ""), "device": str(llm.device),
            "max_num_seqs": cfg.max_num_seqs, "max_model_len": cfg.max_model_len,
            "max_num_batched_tokens": cfg.max_num_batched_tokens, "block_size": cfg.block_size,
            "enable_prefix_caching": cfg.enable_prefix_caching,
            "attention": getattr(getattr(llm.engine.model_runner, "attn_backend", None), "name", None)}


def build_reference(args, model_dir: Path, ckpt: MemGenCheckpoint, dtype: torch.dtype, device: torch.device):
    """memgen.hf's MemGen model (the reference's semantics) on the same weights."""
    from memgen.hf import HFMemGenModel

    return HFMemGenModel.from_checkpoint(ckpt, model_dir, weaver_dir=args.weaver_model,
                                         trigger_dir=args.trigger_model, dtype=dtype,
                                         reference_compat=args.reference_compat, device=device)
