"""The benchmark modes. Each builds what it compares, warms it up, times it
several times (interleaving the sides so that load drift hits both), prints a
table and writes the JSON."""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from . import report
from .build import (build_llm, build_reference, engine_description, latent_lengths, memory_source,
                    needed_model_len, prompt_tokenizer)
from .timing import fits_budget, make_prompts, median_metrics, run_metrics, timed_generate

OVERHEAD_TARGET = 1.10      # issue 4, benchmark 1: memory on / off time
REFERENCE_TARGET = 20.0     # issue 4, benchmark 2: memgen.hf time / engine time
RATIO_KEYS = ("latency_s", "ttft_median_s", "tpot_median_s", "itl_p50_s", "itl_p99_s", "output_tokens_per_s")


def _params(args, max_tokens: int):
    from memgen import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=args.temperature, ignore_eos=True, seed=args.seed)


def _machine(args) -> dict:
    """Machine and versions, taken before anything runs: load_average_start is
    the load the run met, memgen_git the code it ran (not a later commit)."""
    from memgen.config import resolve_device

    machine = report.machine_info(resolve_device(args.device))
    warning = report.load_warning(machine["load_average_start"], None, machine["usable_cores"])
    if warning:   # said at once, so a user can stop and rerun later; the JSON gets it at the end
        print(f"memgen bench: warning: {warning}", file=sys.stderr, flush=True)
    return {"machine": machine, "versions": report.versions()}


def _result(args, mode: str, start: dict, config: dict) -> dict:
    return {"benchmark": "memgen bench", "mode": mode, **start,
            "config": {"argv": sys.argv[1:], **{k: v for k, v in vars(args).items() if k != "func"}, **config}}


def _ratios(on: dict, off: dict) -> dict:
    keys = RATIO_KEYS + tuple(k for k in ("cpu_s", "latency_best_s") if k in on and k in off)
    return {k: (on[k] / off[k] if off[k] else float("nan")) for k in keys}


def _both_sides(args, batch_sizes: list[int], max_len: int):
    """The memory-off and memory-on engines and the prompts they share."""
    from memgen.sources import resolve_model_dir

    model_dir = Path(resolve_model_dir(args.model))
    src = memory_source(args, model_dir)
    prompts = make_prompts(prompt_tokenizer(model_dir), max(batch_sizes), args.prompt_tokens)
    mml = needed_model_len(src.checkpoint, max(map(len, prompts)), max_len)   # KV pool sized for the workload
    print("memgen bench: loading the engine with memory off and on ...", flush=True)
    off = build_llm(args, model_dir, None, max(batch_sizes), mml)
    on = build_llm(args, model_dir, src.checkpoint, max(batch_sizes), mml)
    return model_dir, src, off, on, prompts


def _warm_up(args, llms, prompts, batch_sizes) -> None:
    if args.warmup_tokens:
        for llm in llms:
            for b in batch_sizes:
                timed_generate(llm, prompts[:b], _params(args, args.warmup_tokens))


# ---- latency / overhead ---------------------------------------------------------
def run_latency(args) -> int:
    """Memory on vs off, each batch size, each output length (read off one run
    of the longest length per batch size and iteration)."""
    machine = _machine(args)
    batches, lengths = sorted(set(args.batch_sizes)), sorted(set(args.max_tokens))
    n_max = lengths[-1]
    model_dir, src, off, on, prompts = _both_sides(args, batches, n_max)
    sides = {"memory_off": off, "memory_on": on}
    latents = {"memory_off": (0, 0), "memory_on": latent_lengths(src.checkpoint)}
    t0 = time.perf_counter()
    _warm_up(args, sides.values(), prompts, batches)
    runs = {(b, side): [] for b in batches for side in sides}
    done, cut = 0, False
    for it in range(args.iterations):
        if it and not fits_budget(report.elapsed_s(), last_s, args.time_budget):
            cut = True
            print(f"memgen bench: --time-budget {args.time_budget:g} s reached: {it} of {args.iterations} "
                  "iterations", file=sys.stderr, flush=True)
            break
        start = time.perf_counter()
        # memory off and on alternate, and swap which goes first each iteration, so drifting load hits both
        order = list(sides) if it % 2 == 0 else list(sides)[::-1]
        for b in batches:
            for side in order:
                runs[b, side].append(timed_generate(sides[side], prompts[:b], _params(args, n_max)))
                print(f"  iteration {it + 1}/{args.iterations} batch {b} {side}: "
                      f"{runs[b, side][-1].wall_s:.2f} s", flush=True)
        last_s, done = time.perf_counter() - start, it + 1
    points = []
    for b in batches:
        for n in lengths:
            point = {"batch_size": b, "max_tokens": n}
            for side in sides:
                per_iter = [run_metrics(r, n, latents[side]) for r in runs[b, side]]
                point[side] = median_metrics(per_iter)
                # best of the iterations: on a shared machine, the run the least disturbed by others
                point[side]["latency_best_s"] = min(m["latency_s"] for m in per_iter)
                point[f"{side}_iterations"] = per_iter
            point["on_over_off"] = _ratios(point["memory_on"], point["memory_off"])
            points.append(point)
    result = _result(args, args.mode, machine, {
        "model": model_dir.name, "memgen": src.description, "engine": engine_description(on),
        "prompt_tokens": [len(p) for p in prompts],
        "shorter_lengths": "read from the per-token timestamps of the longest run (greedy, ignore_eos: "
                           "the same engine steps as a shorter run)",
        "itl": "exact: per-token timestamps taken after each engine step",
        "order": "per iteration and batch size, memory off then on, the other way round the next iteration",
        "iterations_done": done, "stopped_by_time_budget": cut,
        "timed_s": time.perf_counter() - t0})
    result["results"] = points
    result["raw_runs"] = [{"batch_size": b, "side": side, "max_tokens": n_max, "iterations": [r.to_json() for r in rs]}
                          for (b, side), rs in runs.items()]
    rows = []
    for p in points:
        on_m, off_m, r = p["memory_on"], p["memory_off"], p["on_over_off"]
        rows.append([p["batch_size"], p["max_tokens"], off_m["latency_s"], on_m["latency_s"], f"{r['latency_s']:.3f}x",
                     off_m["ttft_median_s"] * 1e3, on_m["ttft_median_s"] * 1e3, off_m["tpot_median_s"] * 1e3,
                     on_m["tpot_median_s"] * 1e3, on_m["itl_p50_s"] * 1e3, on_m["itl_p99_s"] * 1e3,
                     on_m["num_insertions_per_request"], on_m["num_latent_positions_per_request"],
                     on_m["num_trigger_calls_per_request"]])
    report.print_table(
        f"memory on vs off: {model_dir.name}, {result['config']['engine']['dtype']}, {on.device}, "
        f"torch threads {torch.get_num_threads()}, median of {done}, load avg "
        f"{result['machine']['load_average_start']}",
        ["batch", "tokens", "off s", "on s", "on/off", "TTFT off ms", "TTFT on ms", "TPOT off ms", "TPOT on ms",
         "ITL p50 on", "ITL p99 on", "ins/req", "latents/req", "trig/req"], rows)
    if args.mode == "overhead":
        _steps_and_floor(points, runs, off)
        worst = max(p["on_over_off"]["latency_s"] for p in points)
        cpu = max(p["on_over_off"].get("cpu_s", float("nan")) for p in points)
        best = max(p["on_over_off"]["latency_best_s"] for p in points)
        result["target"] = {"metric": "memory on / off end-to-end latency (medians)", "value": worst,
                            "target_max": OVERHEAD_TARGET, "met": worst <= OVERHEAD_TARGET,
                            "best_of_iterations_ratio": best, "cpu_time_ratio": cpu}
        print(f"memory on/off time: {worst:.3f}x (target <= {OVERHEAD_TARGET}x: "
              f"{'met' if worst <= OVERHEAD_TARGET else 'MISSED'}); best of iterations {best:.3f}x; "
              f"process CPU time on/off {cpu:.3f}x")
        for p in points:
            print(f"batch {p['batch_size']}: {p['steps_off']} steps off, {p['steps_on']} on "
                  f"({p['extra_steps_per_insertion']:.2f} extra per insertion); a memory-off step takes "
                  f"{p['step_vs_linear_floor']:.2f}x its linear layers alone")
    out = report.write_json(args.output or report.default_output(args.mode, on.device, args.output_dir), result)
    print(f"wrote {out}")
    if args.mode == "latency" and not args.no_plot:
        png = Path(args.plot) if args.plot else out.with_suffix(".png")
        try:
            report.plot_latency(points, png, f"memgen bench: {model_dir.name}, {on.device}, memory on vs off")
            print(f"wrote {png}")
        except ImportError:   # a dependency since 0.1.1; an older environment may lack it
            print("memgen bench: matplotlib is not installed (pip install matplotlib): no plot", file=sys.stderr)
    return 0


def _steps_and_floor(points: list[dict], runs: dict, off) -> None:
    """Per point: engine steps on and off, extra steps per insertion, and the memory-off
    run's best time against its linear layers alone at its rows for as many steps
    (memgen.benchmark.floor; best of 2)."""
    from .floor import linear_floor_s

    for p in points:
        b = p["batch_size"]
        on_run, off_run = runs[b, "memory_on"][-1], runs[b, "memory_off"][-1]
        insertions = sum(r.engine_metrics.get("num_insertions", 0) for r in on_run.requests)
        floor = min(linear_floor_s(off, b, off_run.steps) for _ in range(2))
        p.update(steps_on=on_run.steps, steps_off=off_run.steps,
                 extra_steps_per_insertion=(on_run.steps - off_run.steps) / max(insertions, 1),
                 linear_floor_s=floor, step_vs_linear_floor=p["memory_off"]["latency_best_s"] / floor)


# ---- throughput -------------------------------------------------------------------
def run_throughput(args) -> int:
    """--num-prompts requests at once, max_num_seqs = each batch size, memory
    on vs off; one run per output length."""
    machine = _machine(args)
    batches, lengths = sorted(set(args.batch_sizes)), sorted(set(args.max_tokens))
    points = []
    model_dir, src, off, on, prompts = _both_sides(args, [max(batches), args.num_prompts], lengths[-1])
    prompts = prompts[:args.num_prompts]
    latents = {"memory_off": (0, 0), "memory_on": latent_lengths(src.checkpoint)}
    _warm_up(args, (off, on), prompts, [min(batches)])
    for b in batches:
        for llm in (off, on):   # the engines were built for the largest; the scheduler caps a step's rows
            llm.engine.cap_running(b)
        for n in lengths:
            point = {"max_num_seqs": b, "num_prompts": args.num_prompts, "max_tokens": n}
            per_iter = {"memory_off": [], "memory_on": []}
            for it in range(args.iterations):
                for side in (list(per_iter) if it % 2 == 0 else list(per_iter)[::-1]):
                    run = timed_generate(off if side == "memory_off" else on, prompts, _params(args, n))
                    m = run_metrics(run, n, latents[side])
                    m["wall_s"], m["requests_per_s"] = run.wall_s, len(prompts) / run.wall_s
                    per_iter[side].append(m)
            for side, ms in per_iter.items():
                point[side], point[f"{side}_iterations"] = median_metrics(ms), ms
            point["on_over_off"] = _ratios(point["memory_on"], point["memory_off"])
            points.append(point)
    result = _result(args, "throughput", machine, {"model": model_dir.name, "memgen": src.description,
                                                     "engine": engine_description(on),
                                                     "prompt_tokens": [len(p) for p in prompts]})
    result["results"] = points
    report.print_table(
        f"throughput: {args.num_prompts} requests, {model_dir.name}, {on.device}, median of {args.iterations}",
        ["max seqs", "tokens", "off tok/s", "on tok/s", "on/off", "off req/s", "on req/s"],
        [[p["max_num_seqs"], p["max_tokens"], p["memory_off"]["output_tokens_per_s"],
          p["memory_on"]["output_tokens_per_s"], f"{p['on_over_off']['output_tokens_per_s']:.3f}x",
          p["memory_off"]["requests_per_s"], p["memory_on"]["requests_per_s"]] for p in points])
    out = report.write_json(args.output or report.default_output("throughput", on.device, args.output_dir), result)
    print(f"wrote {out}")
    return 0


# ---- engine vs memgen.hf ------------------------------------------------------------
def _agreement(engine_rows: list[list[int]], ref_rows: list[list[int]], eos: int | None) -> float:
    """Mean fraction of each reference row (up to its first EOS) that the engine
    reproduces before the first difference."""
    fracs = []
    for e, r in zip(engine_rows, ref_rows):
        if eos is not None and eos in r:
            r = r[: r.index(eos) + 1]
        n = next((i for i, (a, b) in enumerate(zip(e, r)) if a != b), min(len(e), len(r)))
        fracs.append(n / max(len(r), 1))
    return statistics.fmean(fracs)


def run_vs_reference(args) -> int:
    """The engine with memory on vs memgen.hf (the reference's loop: trigger over
    the whole sequence at each delimiter, weaver over the whole sequence and a
    full re-prefill at each insertion), same checkpoint, same prompts. The HF
    side generates B x C columns (rows go on after EOS, finished rows are still
    computed); the engine generates C tokens per row with ignore_eos."""
    machine = _machine(args)
    from memgen.sources import resolve_model_dir

    model_dir = Path(resolve_model_dir(args.model))
    src = memory_source(args, model_dir)
    batches, n = sorted(set(args.batch_sizes)), max(args.max_tokens)
    prompts = make_prompts(prompt_tokenizer(model_dir), max(batches), args.prompt_tokens)
    on = build_llm(args, model_dir, src.checkpoint, max(batches),
                   needed_model_len(src.checkpoint, max(map(len, prompts)), n))
    print("memgen bench: loading the HF reference (memgen.hf) ...", flush=True)
    ref = build_reference(args, model_dir, src.checkpoint, on.dtype, on.device)
    tok = ref.tokenizer
    latents = latent_lengths(src.checkpoint)
    points = []
    for b in batches:
        rows = prompts[:b]
        width = max(map(len, rows))
        ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in rows])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in rows])
        if args.warmup_tokens:
            ref.generate(ids, mask, max_new_tokens=args.warmup_tokens, temperature=args.temperature)
            timed_generate(on, rows, _params(args, args.warmup_tokens))
        ref_s, ref_cpu_s = [], []
        for it in range(args.reference_iterations):
            cpu_start, start = time.process_time(), time.perf_counter()
            out_ids, aug = ref.generate(ids, mask, max_new_tokens=n, temperature=args.temperature)
            ref_s.append(time.perf_counter() - start)
            ref_cpu_s.append(time.process_time() - cpu_start)
            print(f"  batch {b} memgen.hf run {it + 1}: {ref_s[-1]:.1f} s", flush=True)
        cols = out_ids.shape[1] - width
        ref_rows = out_ids[:, width:].tolist()
        eng_runs = []
        for it in range(args.iterations):
            eng_runs.append(timed_generate(on, rows, _params(args, cols)))
            print(f"  batch {b} engine run {it + 1}: {eng_runs[-1].wall_s:.2f} s", flush=True)
        eng_s = [r.wall_s for r in eng_runs]
        engine_median, ref_median = statistics.median(eng_s), statistics.median(ref_s)
        point = {"batch_size": b, "max_tokens_requested": n, "columns_generated": cols,
                 "reference_s": ref_s, "engine_s": eng_s,
                 "reference_median_s": ref_median, "engine_median_s": engine_median,
                 "speedup": ref_median / engine_median,
                 "reference_cpu_s": ref_cpu_s, "engine_cpu_s": [r.cpu_s for r in eng_runs],
                 "cpu_time_speedup": statistics.median(ref_cpu_s) / statistics.median(r.cpu_s for r in eng_runs),
                 "engine_metrics": median_metrics([run_metrics(r, cols, latents) for r in eng_runs]),
                 "reference_insertions_per_request": statistics.fmean(a.count(1) for a in aug.tolist()),
                 "token_agreement": _agreement([r.token_ids for r in eng_runs[0].requests], ref_rows,
                                               tok.eos_token_id),
                 "augmentation_agreement": _agreement([r.augmentation for r in eng_runs[0].requests],
                                                      aug.tolist(), None)}
        points.append(point)
    result = _result(args, "vs-reference", machine, {
        "model": model_dir.name, "memgen": src.description, "engine": engine_description(on),
        "reference": "memgen.hf.HFMemGenModel.generate (the reference's loop, HF + PEFT)",
        "prompt_tokens": [len(p) for p in prompts],
        "work": "HF: batch x columns (rows continue after EOS); engine: columns tokens per row, ignore_eos"})
    result["results"] = points
    worst = min(p["speedup"] for p in points)
    result["target"] = {"metric": "memgen.hf time / engine time", "value": worst, "target_min": REFERENCE_TARGET,
                        "met": worst >= REFERENCE_TARGET}
    report.print_table(
        f"engine vs memgen.hf: {model_dir.name}, {on.device}, engine median of {args.iterations}, "
        f"reference median of {args.reference_iterations}, load avg {result['machine']['load_average_start']}",
        ["batch", "tokens", "memgen.hf s", "engine s", "speedup", "ins/req eng", "ins/req hf", "agree"],
        [[p["batch_size"], p["columns_generated"], p["reference_median_s"], p["engine_median_s"],
          f"{p['speedup']:.2f}x", p["engine_metrics"]["num_insertions_per_request"],
          p["reference_insertions_per_request"], p["token_agreement"]] for p in points])
    print(f"speedup {worst:.2f}x (target >= {REFERENCE_TARGET}x: {'met' if result['target']['met'] else 'MISSED'})")
    out = report.write_json(args.output or report.default_output("vs-reference", on.device, args.output_dir), result)
    print(f"wrote {out}")
    return 0


# ---- engine vs HF generate ------------------------------------------------------------
def run_vs_hf(args) -> int:
    """Runs bench/bench_engine_vs_hf.py (one call per output length) and adds
    this run's machine, load and versions to its JSON."""
    machine = _machine(args)
    from memgen.config import resolve_device, resolve_dtype

    root = report.repo_root()
    script = root / "bench" / "bench_engine_vs_hf.py" if root else None
    if script is None or not script.is_file():
        raise FileNotFoundError("--mode vs-hf runs bench/bench_engine_vs_hf.py from a source checkout; "
                                "none was found next to this package")
    device = resolve_device(args.device)
    dtype = str(resolve_dtype(args.dtype, device)).replace("torch.", "")
    result = _result(args, "vs-hf", machine, {"script": str(script.relative_to(root))})
    result["results"] = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in sorted(set(args.max_tokens)):
            part = Path(tmp) / f"{n}.json"
            cmd = [sys.executable, str(script), "--batches", *map(str, args.batch_sizes), "--max-tokens", str(n),
                   "--repeats", str(args.iterations), "--device", device.type, "--dtype", dtype, "--out", str(part)]
            if args.model:
                cmd += ["--model", str(args.model)]
            if args.threads is not None:
                cmd += ["--threads", str(args.threads)]
            if subprocess.run(cmd).returncode != 0:
                print(f"memgen bench: {script.name} failed", file=sys.stderr)
                return 1
            data = json.loads(part.read_text())
            result["results"] += data["results"]
            result["config"]["script_config"] = data.get("config")
    out = report.write_json(args.output or report.default_output("vs-hf", device, args.output_dir), result)
    print(f"wrote {out}")
    return 0
