"""The model and engine options every command that builds an `LLM` shares
(generate, chat, bench, eval, serve): one definition, so their names, defaults
and help never drift."""
from __future__ import annotations

import argparse
import json
import re

class HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, unless the help already says it
    in words (a default of None, 'auto' or a list reads better so): '(default:
    %(default)s)' is added to options that take a value, not to on/off flags."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help = action.help or ""
        if (not action.option_strings or action.nargs == 0 or action.default in (None, argparse.SUPPRESS)
                or "default" in help.lower()):
            return help
        return help + " (default: %(default)s)"


DEFAULT_MEMGEN_HELP = "MemGen checkpoint directory (default: none, a plain LLM)"


def add_model_arguments(parser: argparse.ArgumentParser, memgen_help: str = DEFAULT_MEMGEN_HELP,
                        seed_help: str | None = "engine seed", memgen_repeatable: bool = False) -> None:
    """--model, --memgen, --weaver-model, --trigger-model, --dtype, --device,
    --reference-compat, --attention-backend, --enforce-eager (and --seed unless
    `seed_help` is None: a command with its own seed semantics adds its own).
    `memgen_repeatable`: --memgen may be given several times (args.memgen is then a
    list, or None; the command reads it, e.g. as name=dir items)."""
    g = parser.add_argument_group("model")
    g.add_argument("--model", default=None,
                   help="reasoner: HF directory or .gguf file (default: the packaged SmolLM2-135M-Instruct)")
    g.add_argument("--memgen", default=None, help=memgen_help, action="append" if memgen_repeatable else "store")
    g.add_argument("--weaver-model", default=None, help="weaver base model directory (default: --model)")
    g.add_argument("--trigger-model", default=None, help="trigger base model directory (default: --model)")
    g.add_argument("--dtype", default="auto", help="auto (float32 on CPU, bfloat16 on CUDA) | float32 | float64 | "
                                                   "bfloat16 | float16")
    g.add_argument("--device", type=parse_device, default="auto", help="auto | cpu | cuda | cuda:N")
    g.add_argument("--reference-compat", action="store_true",
                   help="reproduce the reference loader, which drops the trained LoRA weights")
    g.add_argument("--attention-backend", default="auto", choices=["auto", "torch", "triton"],
                   help="kernels: auto (Triton on CUDA, torch on CPU) | torch | triton")
    g.add_argument("--enforce-eager", action="store_true",
                   help="no CUDA graphs for decode steps (by default they are captured on CUDA with Triton)")
    if seed_help is not None:
        g.add_argument("--seed", type=int, default=0, help=seed_help)


_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def parse_device(text: str) -> str:
    """The --device type: 'auto', 'cpu', 'cuda' or 'cuda:N' (any case), lowercased.
    Checks only the spelling, without importing torch; `check_device` checks
    that the machine has it."""
    try:
        return _device_name(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _device_name(text: str) -> str:
    name = str(text).strip().lower()
    if not _DEVICE.fullmatch(name):
        raise ValueError(f"unknown device {str(text)!r}: use auto, cpu, cuda or cuda:N")
    return name


def check_device(device: str) -> None:
    """ValueError (one line, for the CLI's exit 2) when `device` names a CUDA
    device this machine does not have. 'auto' and 'cpu' always exist, and are
    answered without importing torch."""
    name = _device_name(device)
    if name in ("auto", "cpu"):
        return
    import torch

    if not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine (torch "
                         f"{torch.__version__}, CUDA build {torch.version.cuda or 'none'}); use --device cpu "
                         "(or auto)")
    index = int(name.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                         f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")


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


# LLM(...) engine keywords with a flag of their own (None: the engine's default)
ENGINE_FLAGS = ("max_num_seqs", "max_model_len", "max_num_batched_tokens", "block_size", "num_kv_blocks",
                "kv_cache_memory_gb", "enable_prefix_caching")


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """The engine's sizes (generate, chat, eval, serve), and --engine-arg for any other keyword."""
    e = parser.add_argument_group("engine")
    e.add_argument("--max-num-seqs", type=int, default=None, help="sequences batched at once (default: 32)")
    e.add_argument("--max-model-len", type=int, default=None,
                   help="longest sequence, latents included (default: min(model's positions, 4096))")
    e.add_argument("--max-num-batched-tokens", type=int, default=None, help="token rows per engine step (default: 4096)")
    e.add_argument("--block-size", type=int, default=None, help="KV block size in tokens (default: 16)")
    e.add_argument("--num-kv-blocks", type=int, default=None, help="KV cache size in blocks (default: auto)")
    e.add_argument("--kv-cache-memory-gb", type=float, default=None, help="KV cache size in GiB (default: auto)")
    e.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_false", default=None,
                   help="do not reuse cached prompt blocks across requests")
    e.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="any other LLM(...) keyword, VALUE parsed as JSON when it parses "
                        "(repeatable; default: none)")


def engine_option_kwargs(args: argparse.Namespace) -> dict:
    """The LLM(...) keywords add_engine_arguments' flags give (only those set)."""
    kwargs = {name: getattr(args, name) for name in ENGINE_FLAGS if getattr(args, name, None) is not None}
    for item in getattr(args, "engine_arg", None) or ():
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise ValueError(f"--engine-arg expects KEY=VALUE, got {item!r}")
        try:
            kwargs[key] = json.loads(value)
        except json.JSONDecodeError:
            kwargs[key] = value
    return kwargs
