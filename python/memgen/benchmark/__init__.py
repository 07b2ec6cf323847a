"""`memgen bench`: latency and throughput with MemGen's memory on vs off, and
the engine vs the HF reference (`memgen.hf`) and vs HF `generate`.

Every mode prints a table and writes one JSON (machine, versions, load
average, full configuration, raw per-token timestamps, medians and ratios);
`latency` also draws a PNG. Memory off is a plain `LLM(model)`, memory on is
`LLM(model, memgen=...)` over the same prompts with the same generated token
counts (`ignore_eos`). Without --memgen the MemGen parts are initialised the
way the reference does (random_checkpoint) and the output says so.

    memgen bench                                   # latency: 70 s on a 2-core CPU at load 3 (budget 100 s)
    memgen bench --mode overhead                   # memory on vs off at batch 8, 384 tokens
    memgen bench --mode vs-reference --max-tokens 128
    memgen bench --config small --mode vs-hf        # a small model: the engine's own overhead shows
"""
from __future__ import annotations

import argparse
import sys

from memgen.checkpoint_options import (
    add_deprecated_alias, add_fresh_checkpoint_arguments, fill_fresh_checkpoint_defaults,
)
from memgen.model_options import add_model_arguments

DEFAULT_OUTPUT_DIR = "memgen-bench-results"   # under the cwd: the user's folder, never the checkout's bench/results

CONFIGS = ("default", "small")
MODES = ("latency", "throughput", "overhead", "vs-reference", "vs-hf", "serve")

# per mode: batch sizes, output lengths, iterations (each overridable)
MODE_DEFAULTS = {
    "latency": ([1, 4], [16, 32], 3),
    "throughput": ([8], [64], 3),
    "overhead": ([8], [384], 3),
    "vs-reference": ([8], [384], 3),
    "vs-hf": ([1, 16], [128], 2),
    "serve": ([1, 8, 32], [64], 1),      # batch sizes: concurrent clients (memgen.serve.loadtest)
}
DEFAULT_TIME_BUDGET = 100.0   # seconds: the default run ends within 2 minutes even on a loaded 2-core machine


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.description = __doc__.split("\n\n")[0]
    p.add_argument("--mode", choices=MODES, default="latency",
                   help="latency (default): memory on vs off across batch sizes and output lengths; "
                        "throughput: many requests, continuous batching; overhead: memory on vs off at one "
                        "config (batch 8, 384 tokens; the target is at most 1.10x); vs-reference: engine vs "
                        "memgen.hf, the HF reference implementation (target >= 20x); vs-hf: plain engine vs HF "
                        "generate (runs bench/bench_engine_vs_hf.py); serve: --batch-sizes concurrent streaming "
                        "clients against `memgen serve` beside offline generate (TTFT, TPOT, throughput)")
    p.add_argument("--config", choices=CONFIGS, default="default",
                   help="default: --model (the packaged SmolLM2 unless given); small: a small random "
                        "Qwen2-shaped model (hidden 512, 6 layers, 4/2 heads, 320 tokens, float32), built offline "
                        "once into the cache: cheap GEMMs, so the engine's own overhead shows")
    add_model_arguments(p, memgen_help="MemGen checkpoint directory (default: MemGen parts initialised as "
                                        "the reference does)", seed_help="engine seed and random-init seed")
    g = p.add_argument_group("random MemGen init (only without --memgen)")
    add_fresh_checkpoint_arguments(g, trigger_default=True, trigger_why="bench measures the trigger's cost",
                                   lora=False, init_seed=False, defer_defaults=True)
    add_deprecated_alias(g, "--latents", "--prompt-latents and --inference-latents",
                         ("prompt_latents", "inference_latents"), type=int, metavar="N")
    add_deprecated_alias(g, "--trigger-inactive", "--no-trigger-active", "trigger_active", value=False)
    g.add_argument("--always-insert", action="store_true", default=None,
                   help="set the random trigger head to always insert: the worst case for memory on")
    g = p.add_argument_group("workload")
    g.add_argument("--batch-sizes", type=int, nargs="+", default=None,
                   help="requests per batch (throughput: max_num_seqs); default per mode: "
                        + ", ".join(f"{m} {d[0]}" for m, d in MODE_DEFAULTS.items()))
    g.add_argument("--max-tokens", type=int, nargs="+", default=None,
                   help="output lengths (EOS ignored); default per mode: "
                        + ", ".join(f"{m} {d[1]}" for m, d in MODE_DEFAULTS.items()))
    g.add_argument("--prompt-tokens", type=int, default=0,
                   help="at least this many tokens per prompt: a context passage before each question "
                        "(e.g. 180 for GSM8K-like prompts; default 0: the bare questions)")
    g.add_argument("--num-prompts", type=int, default=16, help="throughput: requests submitted at once")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--iterations", type=int, default=None,
                   help="timed runs per point, medians reported (default 3; vs-hf 2)")
    g.add_argument("--time-budget", type=float, default=None,
                   help=f"latency: start no iteration that would end later than this many seconds after the "
                        f"start (loading included); at least one runs (default {DEFAULT_TIME_BUDGET:g} s for the "
                        f"default latency run, none when --iterations is given; 0: none)")
    g.add_argument("--reference-iterations", type=int, default=1,
                   help="vs-reference: timed runs of the slow HF reference")
    g.add_argument("--warmup-tokens", type=int, default=8,
                   help="tokens of the untimed warm-up run per engine and batch size (0: none)")
    g.add_argument("--prefix-caching", action="store_true",
                   help="leave prefix caching on (off by default: repeated iterations would time cache hits)")
    g.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default on CPU: the cores the load average leaves free, at least 1; "
                        "more threads than free cores wait on each other and distort every ratio)")
    g = p.add_argument_group("output")
    g.add_argument("--output-dir", default=DEFAULT_OUTPUT_DIR,
                   help="folder for the JSON and the plot (default: ./%(default)s)")
    g.add_argument("--output", default=None, help="JSON path (default: <output-dir>/<mode>_<device>.json)")
    g.add_argument("--plot", default=None, help="PNG path for latency mode (default: the JSON path with .png)")
    g.add_argument("--no-plot", action="store_true", help="skip the PNG")


def check_args(args) -> None:
    """Fill the mode's defaults and refuse impossible values (ValueError)."""
    batches, lengths, iterations = MODE_DEFAULTS[args.mode]
    args.batch_sizes = args.batch_sizes or batches
    args.max_tokens = args.max_tokens or lengths
    if args.time_budget is None:   # the budget shortens the default run only, never asked-for iterations
        args.time_budget = DEFAULT_TIME_BUDGET if args.mode == "latency" and args.iterations is None else 0.0
    if args.time_budget < 0:
        raise ValueError(f"--time-budget must be >= 0, got {args.time_budget}")
    args.iterations = args.iterations if args.iterations is not None else iterations
    for name in ("batch_sizes", "max_tokens"):
        bad = [v for v in getattr(args, name) if v < 1]
        if bad:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {bad}")
    if args.config == "small" and args.model is not None:
        raise ValueError("--config small runs its own small model: drop --model (or use --config default)")
    for name, low in (("prompt_tokens", 0), ("iterations", 1), ("reference_iterations", 1), ("num_prompts", 1), ("warmup_tokens", 0)):
        if getattr(args, name) < low:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if not args.temperature >= 0:
        raise ValueError(f"--temperature must be >= 0, got {args.temperature}")
    given = fill_fresh_checkpoint_defaults(args, trigger_default=True)
    if args.always_insert is not None:
        given.append("--always-insert")
    if args.memgen is not None and given:
        raise ValueError(f"{', '.join(given)} configure the random MemGen init and cannot be combined with "
                         "--memgen (the checkpoint carries its own settings)")
    args.always_insert = bool(args.always_insert)
    for name in ("prompt_latents", "inference_latents", "budget"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")

def run_bench_from_args(args) -> int:
    try:
        check_args(args)
    except ValueError as e:
        print(f"memgen bench: error: {e}", file=sys.stderr)
        return 2
    import torch

    from . import modes

    from memgen.config import resolve_device

    from .report import free_cores, load_average, usable_cores

    if args.config == "small":
        from .small_model import small_model_dir

        args.model = str(small_model_dir())
        print(f"memgen bench: --config small: {args.model}", flush=True)
    args.threads_from_load = args.threads is None and resolve_device(args.device).type == "cpu"
    if args.threads_from_load:
        load = load_average()
        args.threads = min(torch.get_num_threads(), free_cores(usable_cores(), load[0] if load else 0.0))
        print(f"memgen bench: {args.threads} torch thread(s): the cores free at load {load[0] if load else '?'} "
              f"(--threads to choose)", flush=True)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.mode == "serve":
        from memgen.serve.loadtest import main as run_serve

        argv = ["--dtype", args.dtype, "--device", args.device, "--concurrency", *map(str, args.batch_sizes),
                "--max-tokens", str(args.max_tokens[0]), "--num-prompts", str(args.num_prompts),
                "--output-dir", args.output_dir]
        argv += ["--model", args.model] if args.model else []
        argv += ["--memgen", args.memgen] if args.memgen else []
        argv += ["--threads", str(args.threads)] if args.threads is not None else []
        return run_serve(argv)
    run = {"latency": modes.run_latency, "overhead": modes.run_latency, "throughput": modes.run_throughput,
           "vs-reference": modes.run_vs_reference, "vs-hf": modes.run_vs_hf}[args.mode]
    return run(args)


__all__ = ["add_bench_arguments", "run_bench_from_args", "MODES"]
