"""The model options every command that builds an `LLM` shares (generate, chat,
bench, eval): one definition, so their names, defaults and help never drift."""
from __future__ import annotations

import argparse

DEFAULT_MEMGEN_HELP = "MemGen checkpoint directory (default: plain LLM)"


def add_model_arguments(parser: argparse.ArgumentParser, memgen_help: str = DEFAULT_MEMGEN_HELP,
                        seed_help: str | None = "engine seed") -> None:
    """--model, --memgen, --weaver-model, --trigger-model, --dtype, --device,
    --reference-compat, --attention-backend, --enforce-eager (and --seed unless
    `seed_help` is None: a command with its own seed semantics adds its own)."""
    g = parser.add_argument_group("model")
    g.add_argument("--model", default=None,
                   help="reasoner: HF directory or .gguf file (default: the packaged SmolLM2-135M-Instruct)")
    g.add_argument("--memgen", default=None, help=memgen_help)
    g.add_argument("--weaver-model", default=None, help="weaver base model directory (default: --model)")
    g.add_argument("--trigger-model", default=None, help="trigger base model directory (default: --model)")
    g.add_argument("--dtype", default="auto", help="auto (float32 on CPU, bfloat16 on CUDA) | float32 | float64 | "
                                                   "bfloat16 | float16")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    g.add_argument("--reference-compat", action="store_true",
                   help="reproduce the reference loader, which drops the trained LoRA weights")
    g.add_argument("--attention-backend", default="auto", choices=["auto", "torch", "triton"],
                   help="kernels: auto (Triton on CUDA, torch on CPU) | torch | triton")
    g.add_argument("--enforce-eager", action="store_true",
                   help="no CUDA graphs for decode steps (by default they are captured on CUDA with Triton)")
    if seed_help is not None:
        g.add_argument("--seed", type=int, default=0, help=seed_help)


def engine_kwargs(args: argparse.Namespace) -> dict:
    """The LLM(...) keywords for the engine options above (not model/memgen)."""
    kwargs = dict(dtype=args.dtype, device=args.device, attention_backend=args.attention_backend,
                  enforce_eager=args.enforce_eager)
    if args.reference_compat:
        kwargs["reference_compat"] = True
    return kwargs


def llm_kwargs(args: argparse.Namespace) -> dict:
    """Every LLM(...) keyword the model options give."""
    return dict(model=args.model, memgen=args.memgen, weaver_model=args.weaver_model,
                trigger_model=args.trigger_model, **engine_kwargs(args))
