"""Host time per engine step, before and after the native host runtime.

Host step = schedule (running sequences catch up, blocks allocated) + batch
assembly (input ids, positions, slot mapping, block tables, cu_seqlens,
context lens, adapter ids) + postprocess (chunks marked computed, full blocks
registered in the prefix cache); no model runs. Measured in steady decode at
1, 64, 256 and 1,024 sequences (prompts of 64-79 tokens, block size 16).

"before" is the pure-Python host path (Python scheduler loop, the Python
allocator that now lives in tests/oracle.py, torch-op batch assembly) of the
commit before the native runtime, run from a `git archive` of that commit in a
subprocess; "after" is the installed package. The end-to-end part runs
`LLM.generate` on a tiny random model (hidden 64, 2 layers) on the CPU, both
versions, and reports output tokens/s.

    python bench/bench_host_step.py [--sizes 1 64 256 1024] [--before-rev REV] [--no-e2e] [--after-path DIR]

--after-path DIR measures "after" with the memgen package under DIR (a source
tree's `python/` folder with a built `memgen/_native*.so` in it) instead of the
installed one: a commit's own code when the checkout holds other work.

    python bench/bench_host_step.py --against DIR [--rounds 6] [--sizes 1 64 256]

--against DIR compares the installed package with another native build (DIR as for
--after-path, e.g. the commit that set a host-step target): host steps only, the two
run in turn --rounds times, best of the rounds per size (this shared VM swings up to
2x between runs of the same code), written to bench/results/host_step_against_cpu.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCK_SIZE = 16


# ---- worker: runs inside one interpreter, with whichever memgen it imports ------------
def host_steps(n: int, steps: int) -> dict:
    import torch

    from memgen.engine import input_batch
    from memgen.engine.block_manager import BlockManager
    from memgen.engine.scheduler import Scheduler
    from memgen.engine.sequence import Sequence
    from memgen.sampling_params import SamplingParams

    torch.set_num_threads(1)
    native = hasattr(input_batch, "InputBuffers")
    cpu = torch.device("cpu")
    buffers = input_batch.InputBuffers(cpu) if native else None

    def assemble(out):
        if native:
            return input_batch.build_model_input(out.core, -1, buffers, BLOCK_SIZE, cpu, torch.float32)
        return input_batch.build_model_input(out.chunks, BLOCK_SIZE, 64, cpu, torch.float32)

    prompt_len = 80
    num_blocks = n * (-(-(prompt_len + steps + 8) // BLOCK_SIZE) + 1)
    manager = BlockManager(num_blocks, BLOCK_SIZE)
    import inspect

    # block managers by pool index (a list) today; older trees took {pool name: manager}
    by_name = "dict" in str(inspect.signature(Scheduler).parameters["block_managers"].annotation)
    managers = {"base": manager} if by_name else [manager]
    sched = Scheduler(managers, max_num_seqs=n, max_num_batched_tokens=max(4096, n * prompt_len))
    params = SamplingParams(max_tokens=10**6, ignore_eos=True)
    for i in range(n):
        prompt = [1000 + i] + [(7 * i + 3 * j) % 500 for j in range(63 + i % 16)]   # distinct: no prefix hits
        sched.add(Sequence(prompt, params, None, frozenset()))
    while sched.waiting or any(s.reasoner.num_pending_tokens > 1 for s in sched.running):  # prefill
        out = sched.schedule()
        assemble(out)
        sched.postprocess(out)
    for seq in sched.running:
        if seq.reasoner.num_pending_tokens == 0:
            seq.append_token(5, None)
    t_sched, t_asm, t_post = [], [], []
    clock = time.perf_counter
    for k in range(steps):
        t0 = clock()
        out = sched.schedule()
        t1 = clock()
        assemble(out)
        t2 = clock()
        sched.postprocess(out)
        t3 = clock()
        t_sched.append(t1 - t0)
        t_asm.append(t2 - t1)
        t_post.append(t3 - t2)
        for seq in sched.running:
            seq.append_token((k * 31 + seq.seq_id) % 500, None)
    assert len(sched.running) == n and not sched.waiting

    def us(xs):
        return round(statistics.median(xs) * 1e6, 2)

    total = [a + b + c for a, b, c in zip(t_sched, t_asm, t_post)]
    return {"num_seqs": n, "steps": steps, "schedule_us": us(t_sched), "assemble_us": us(t_asm),
            "postprocess_us": us(t_post), "schedule_plus_assemble_us": us([a + b for a, b in zip(t_sched, t_asm)]),
            "host_step_us": us(total)}


def e2e(model_dir: str, n: int, max_tokens: int) -> dict:
    import torch

    from memgen import LLM, SamplingParams

    torch.set_num_threads(1)
    llm = LLM(model_dir, dtype="float32", max_num_seqs=max(n, 1), max_model_len=256)
    prompts = [[(7 * i + 3 * j) % 200 + 10 for j in range(24 + i % 8)] for i in range(n)]
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    best = float("inf")
    for _ in range(2):
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        best = min(best, time.perf_counter() - start)
    tokens = sum(len(o.token_ids) for o in outs)
    return {"num_seqs": n, "max_tokens": max_tokens, "seconds": round(best, 4),
            "output_tokens_per_s": round(tokens / best, 1), "ms_per_step": round(best / max_tokens * 1e3, 3)}


def worker(args) -> None:
    result = {"host": [host_steps(n, args.steps if n < 1024 else max(20, args.steps // 4)) for n in args.sizes]}
    if args.model_dir:
        result["e2e"] = [e2e(args.model_dir, n, args.e2e_tokens) for n in args.e2e_sizes]
    import memgen

    result["memgen_file"] = memgen.__file__
    print("RESULT " + json.dumps(result))


# ---- driver ------------------------------------------------------------------------------
def run_worker(python_path: list[str], args, model_dir: str | None) -> dict:
    # before: -S, so that no site hook (an editable install's import redirect) hides the old tree
    cmd = [sys.executable, *(["-S"] if python_path else []), __file__, "--worker", "--steps", str(args.steps), "--sizes", *map(str, args.sizes),
           "--e2e-tokens", str(args.e2e_tokens), "--e2e-sizes", *map(str, args.e2e_sizes)]
    if model_dir:
        cmd += ["--model-dir", model_dir]
    import site

    paths = python_path + site.getsitepackages() + [str(ROOT / "tests")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths), OMP_NUM_THREADS="1")
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"worker failed:\n{out.stderr[-3000:]}")
    line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def before_rev() -> str:
    first = subprocess.run(["git", "log", "--format=%H", "--diff-filter=A", "--", "engine/runtime.cpp"],
                           cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    return subprocess.run(["git", "rev-parse", first[-1] + "^"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.strip()


def against(args) -> None:
    other = str(Path(args.against).resolve())
    load_before = open("/proc/loadavg").read().split()[:3]
    best: dict[str, dict[int, dict]] = {"installed": {}, "against": {}}
    for r in range(args.rounds):
        for side in (("installed", "against") if r % 2 == 0 else ("against", "installed")):
            got = run_worker([other] if side == "against" else [], args, None)
            if side == "against":
                assert got["memgen_file"].startswith(other), got["memgen_file"]
            for h in got["host"]:
                kept = best[side].get(h["num_seqs"])
                if kept is None or h["host_step_us"] < kept["host_step_us"]:
                    best[side][h["num_seqs"]] = h
    print(f"host time per decode step, best of {args.rounds} alternated rounds, µs: installed vs {other}")
    print(f"{'seqs':>6} {'sched+asm':>10} {'against':>9} | {'host step':>10} {'against':>9} {'ratio':>6}")
    rows = []
    for n in args.sizes:
        a, b = best["installed"][n], best["against"][n]
        ratio = a["host_step_us"] / b["host_step_us"]
        print(f"{n:>6} {a['schedule_plus_assemble_us']:>10.1f} {b['schedule_plus_assemble_us']:>9.1f} | "
              f"{a['host_step_us']:>10.1f} {b['host_step_us']:>9.1f} {ratio:>6.2f}")
        rows.append({"num_seqs": n, "installed": a, "against": b, "host_step_ratio": round(ratio, 3)})
    result = {"benchmark": "host_step_against", "against": other, "rounds": args.rounds,
              "commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                       text=True).stdout.strip(),
              "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count()},
              "load_before": load_before, "load_after": open("/proc/loadavg").read().split()[:3], "host": rows}
    path = ROOT / "bench" / "results" / "host_step_against_cpu.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path.relative_to(ROOT)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 64, 256, 1024])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--before-rev", default=None, help="the pure-Python commit (default: before engine/runtime.cpp)")
    ap.add_argument("--no-e2e", action="store_true")
    ap.add_argument("--after-path", default=None, help="import 'after' from this python/ folder (default: installed)")
    ap.add_argument("--e2e-sizes", type=int, nargs="+", default=[1, 64, 256])
    ap.add_argument("--e2e-tokens", type=int, default=32)
    ap.add_argument("--against", default=None, help="compare with the memgen package under this python/ folder")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    if args.against:
        return against(args)
    import memgen
    import torch

    rev = args.before_rev or before_rev()
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp) / "before"
        old.mkdir()
        archive = subprocess.run(["git", "archive", rev, "python"], cwd=ROOT, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
        model_dir = None
        if not args.no_e2e:
            sys.path.insert(0, str(ROOT / "tests"))
            import fixtures

            tok = fixtures.build_tokenizer(Path(tmp) / "tok")
            model_dir = str(fixtures.build_tiny_model(Path(tmp) / "model", tok, arch="llama"))
        before = run_worker([str(old / "python")], args, model_dir)
        after_path = str(Path(args.after_path).resolve()) if args.after_path else None
        after = run_worker([after_path] if after_path else [], args, model_dir)
    assert before["memgen_file"].startswith(tmp), before["memgen_file"]
    assert not after["memgen_file"].startswith(tmp)
    if after_path:
        assert after["memgen_file"].startswith(after_path), after["memgen_file"]

    print(f"host time per decode step, median µs (schedule + assembly | + postprocess); before = {rev}")
    print(f"{'seqs':>6} {'before':>10} {'after':>9} {'speedup':>8} | {'before':>10} {'after':>9}")
    rows = []
    for b, a in zip(before["host"], after["host"]):
        speed = b["schedule_plus_assemble_us"] / a["schedule_plus_assemble_us"]
        print(f"{a['num_seqs']:>6} {b['schedule_plus_assemble_us']:>10.1f} {a['schedule_plus_assemble_us']:>9.1f} "
              f"{speed:>7.1f}x | {b['host_step_us']:>10.1f} {a['host_step_us']:>9.1f}")
        rows.append({"num_seqs": a["num_seqs"], "before": b, "after": a, "speedup": round(speed, 2)})
    e2e_rows = []
    if model_dir:
        print("end to end, LLM.generate on a tiny random llama (hidden 64, 2 layers), CPU float32, "
              f"{args.e2e_tokens} tokens per sequence: output tokens/s")
        for b, a in zip(before["e2e"], after["e2e"]):
            ratio = a["output_tokens_per_s"] / b["output_tokens_per_s"]
            print(f"{a['num_seqs']:>6} {b['output_tokens_per_s']:>10.1f} {a['output_tokens_per_s']:>9.1f} "
                  f"{ratio:>7.2f}x   ({b['ms_per_step']:.2f} -> {a['ms_per_step']:.2f} ms per step)")
            e2e_rows.append({"num_seqs": a["num_seqs"], "before": b, "after": a, "ratio": round(ratio, 3)})
    result = {
        "benchmark": "host_step", "before_rev": rev,
        "commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip(),
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpu_count": os.cpu_count(), "python": platform.python_version()},
        "versions": {"torch": torch.__version__, "memgen": memgen.__version__},
        "config": {"block_size": BLOCK_SIZE, "steps": args.steps, "prompt_tokens": "64-79",
                   "e2e_tokens": args.e2e_tokens, "threads": 1},
        "after_source": after_path or "the installed package",
        "host": rows, "e2e": e2e_rows,
    }
    out_dir = ROOT / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "host_step_cpu.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
