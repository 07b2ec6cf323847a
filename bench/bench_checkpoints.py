"""Several MemGen checkpoints on one base (issue 27): 4 random MemGen checkpoints on the
packaged SmolLM2-135M-Instruct (float32, CPU), built as `memgen init` does (K=8 prompt
and inference latents, budget 2, trigger inactive, LoRA r16 on q/v) with random
lora_B (0.02 * N(0, 1); init leaves it zero, which would make every checkpoint the same).

Measured in one process, runs alternated, best of --repeats (wall and process CPU):
  throughput  --requests chat prompts, --tokens each (greedy, EOS ignored), all in one
              generate call: `single` = LLM(memgen=c0), every request on it; `multi_one` =
              LLM(memgen={c0..c3}), every request on c0; `mixed` = the same LLM, request i on
              c(i % 4). Target: single / mixed tokens/s <= 1.15. Outputs checked: a request's
              tokens equal the single-checkpoint run's for its checkpoint.
  memory      one base copy: parameter and buffer bytes of the reasoner's model with 1 and
              with 4 checkpoints (the difference: the 3 extra adapters), and the RSS of a
              fresh process holding LLM(memgen=1 checkpoint) vs 4 (VmRSS after a short run).
  update      `llm.update_memgen(name, MemGenCheckpoint)` (the trainer's path; new weights
              alternating between two checkpoints), idle (in place) and while a request runs
              on the old version (a new version; the old one finishes its request); from a
              directory (the server's route reads it off the engine thread first; timed here
              whole); `unload_memgen` + `load_memgen`. Target: update < 100 ms.
  serve       `memgen serve --memgen c0=.. --memgen c1=..`: POST /v1/update_memgen_checkpoint
              idle and while 8 requests decode on c1, and pause + update + resume while they
              decode (a trainer's weight sync over HTTP); --no-serve skips it.

    python bench/bench_checkpoints.py [--requests 16] [--tokens 48] [--repeats 3] [--threads 1]

Writes bench/results/checkpoints_cpu.json (machine, load averages, config, every run).
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

import torch

ROOT = Path(__file__).resolve().parent.parent
NUM_CHECKPOINTS = 4
CPU_TIMES: dict[str, list[float]] = {}


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def build_checkpoints(root: Path, n: int) -> tuple[list[Path], list]:
    """n checkpoints as `memgen init` writes them, lora_B randomised (seed i)."""
    from memgen.checkpoint import save_reference
    from memgen.checkpoint.init import InitOptions, init_checkpoint

    dirs, ckpts = [], []
    for i in range(n):
        path, ckpt = init_checkpoint(root / f"c{i}", None, InitOptions(budget=2, seed=i))
        g = torch.Generator().manual_seed(1000 + i)
        for lora in (ckpt.weaver_lora, ckpt.trigger_lora):
            for module, (a, b) in lora.layers.items():
                lora.layers[module] = (a, torch.randn(b.shape, generator=g, dtype=b.dtype) * 0.02)
        save_reference(ckpt, path)
        dirs.append(path)
        ckpts.append(ckpt)
    return dirs, ckpts


def chat_prompts(llm, n: int) -> list[list[int]]:
    topics = ["adding two numbers", "the water cycle", "a fox and a dog", "prime numbers", "the moon",
              "a short trip", "baking bread", "the colour blue"]
    out = []
    for i in range(n):
        msg = [{"role": "user", "content": f"Question {i}: write a few sentences about {topics[i % len(topics)]}, "
                                           f"step by step. " + "Think, then answer. " * (i % 3)}]
        out.append(llm._apply_chat_template(msg, True))
    return out


def timed(name: str, fn):
    start, cpu = time.perf_counter(), time.process_time()
    result = fn()
    wall = time.perf_counter() - start
    CPU_TIMES.setdefault(name, []).append(round(time.process_time() - cpu, 3))
    return wall, result


def throughput(single, multi, prompts, tokens: int, repeats: int) -> dict:
    from memgen import SamplingParams

    def params(name):
        return SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True, memgen_checkpoint=name)

    runs = {
        "single": lambda: single.generate(prompts, params(None), use_tqdm=False),
        "multi_one": lambda: multi.generate(prompts, params("c0"), use_tqdm=False),
        "mixed": lambda: multi.generate(prompts, [params(f"c{i % NUM_CHECKPOINTS}") for i in range(len(prompts))],
                                        use_tqdm=False),
    }
    walls: dict[str, list[float]] = {k: [] for k in runs}
    outs = {}
    for fn in runs.values():          # warm-up (first-call costs), untimed
        fn()
    loads = [load()]
    for _ in range(repeats):
        for name, fn in runs.items():
            wall, outs[name] = timed(name, fn)
            walls[name].append(round(wall, 3))
        loads.append(load())

    def stats(name):
        o = outs[name]
        n_tok = sum(len(r.outputs[0].token_ids) for r in o)
        best = min(walls[name])
        return {"wall_s": walls[name], "cpu_s": CPU_TIMES[name], "best_wall_s": best, "tokens": n_tok,
                "tokens_per_s": round(n_tok / best, 1),
                "tokens_per_cpu_s": round(n_tok / min(CPU_TIMES[name]), 1),
                "insertions": sum(r.outputs[0].metrics["num_insertions"] for r in o),
                "latent_positions": sum(r.outputs[0].metrics["num_latent_positions"] for r in o),
                "checkpoints": sorted({r.outputs[0].metrics["memgen_checkpoint"] for r in o})}

    result = {name: stats(name) for name in runs}
    # exactness: multi_one equals single (c0 alone); mixed rows equal each checkpoint run alone
    same_one = [r.outputs[0].token_ids for r in outs["single"]] == [r.outputs[0].token_ids for r in outs["multi_one"]]
    alone = {}
    for i in range(1, NUM_CHECKPOINTS):
        name = f"c{i}"
        rows = [j for j in range(len(prompts)) if j % NUM_CHECKPOINTS == i]
        alone.update({j: o.outputs[0].token_ids for j, o in
                      zip(rows, multi.generate([prompts[j] for j in rows], params(name), use_tqdm=False))})
    alone.update({j: outs["single"][j].outputs[0].token_ids for j in range(0, len(prompts), NUM_CHECKPOINTS)})
    same_mixed = all(outs["mixed"][j].outputs[0].token_ids == alone[j] for j in range(len(prompts)))
    result.update(
        loadavg=loads,
        single_over_mixed=round(result["single"]["tokens_per_s"] / result["mixed"]["tokens_per_s"], 3),
        single_over_mixed_cpu=round(result["single"]["tokens_per_cpu_s"] / result["mixed"]["tokens_per_cpu_s"], 3),
        single_over_multi_one=round(result["single"]["tokens_per_s"] / result["multi_one"]["tokens_per_s"], 3),
        outputs_equal={"multi_one_vs_single": same_one, "mixed_vs_each_alone": same_mixed})
    return result


def model_bytes(llm) -> dict:
    """Bytes of the reasoner's model tensors (parameters and buffers, each storage once; the
    LoRA stacks are not among them)."""
    model = llm.engine.pools[0].runner.model
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return {"base_model_bytes": total}


def rss_child(dirs: list[str], threads: int) -> dict:
    """(run in a fresh process) VmRSS / VmHWM after building LLM(memgen=dirs) and a short run."""
    torch.set_num_threads(threads)
    from memgen import LLM, SamplingParams

    memgen = dirs[0] if len(dirs) == 1 else {f"c{i}": d for i, d in enumerate(dirs)}
    llm = LLM(memgen=memgen, dtype="float32", device="cpu", max_model_len=1024, num_kv_blocks=256)
    llm.generate("Hello", SamplingParams(max_tokens=4, temperature=0), use_tqdm=False)
    status = Path("/proc/self/status").read_text()
    kb = {k: int(line.split()[1]) for line in status.splitlines() for k in ("VmRSS", "VmHWM")
          if line.startswith(k + ":")}
    return {"checkpoints": len(dirs), "rss_mb": round(kb["VmRSS"] / 1024, 1),
            "peak_rss_mb": round(kb["VmHWM"] / 1024, 1), **model_bytes(llm)}


def memory(dirs: list[Path], threads: int) -> dict:
    out = {"loadavg_before": load()}
    for n in (1, NUM_CHECKPOINTS):
        cmd = [sys.executable, __file__, "--rss-child", *map(str, dirs[:n]), "--threads", str(threads)]
        text = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ,
                              "OMP_NUM_THREADS": str(threads)}).stdout
        out[f"checkpoints_{n}"] = json.loads(text.strip().splitlines()[-1])
    one, many = out["checkpoints_1"], out[f"checkpoints_{NUM_CHECKPOINTS}"]
    out["extra_rss_mb"] = round(many["rss_mb"] - one["rss_mb"], 1)
    out["extra_base_model_mb"] = round((many["base_model_bytes"] - one["base_model_bytes"]) / 2**20, 2)
    out["loadavg_after"] = load()
    return out


def adapter_bytes(ckpt) -> int:
    n = 0
    for lora in (ckpt.weaver_lora, ckpt.trigger_lora):
        for a, b in lora.layers.values():
            n += a.numel() * 4 + b.numel() * 4
    return n


def updates(multi, ckpts, dirs, repeats: int) -> dict:
    from memgen import SamplingParams

    ms = lambda s: round(s * 1000, 2)   # noqa: E731
    out = {"loadavg_before": load()}
    # idle: in place (no request runs on c1), weights alternating between two checkpoints
    idle = []
    for i in range(repeats):
        ckpt = ckpts[2] if i % 2 == 0 else ckpts[1]
        start = time.perf_counter()
        multi.update_memgen("c1", ckpt)
        idle.append(time.perf_counter() - start)
    # from a directory (read + update)
    from_dir = []
    for i in range(max(2, repeats // 2)):
        start = time.perf_counter()
        multi.update_memgen("c1", dirs[2] if i % 2 == 0 else dirs[1])
        from_dir.append(time.perf_counter() - start)
    # busy: a request runs on c1's current version; the update installs a new one beside it
    busy, engine = [], multi.engine
    prompt = multi._apply_chat_template([{"role": "user", "content": "Count to ten."}], True)
    for i in range(max(2, repeats // 2)):
        rid = engine.add_request(prompt, SamplingParams(max_tokens=8, temperature=0, memgen_checkpoint="c1"))
        engine.step()
        engine.step()
        start = time.perf_counter()
        multi.update_memgen("c1", ckpts[2] if i % 2 == 0 else ckpts[1])
        busy.append(time.perf_counter() - start)
        while engine.has_unfinished():
            engine.step()
        del rid
    # unload + load (from memory)
    reload = []
    for i in range(max(2, repeats // 2)):
        start = time.perf_counter()
        multi.unload_memgen("c3")
        multi.load_memgen("c3", ckpts[3])
        reload.append(time.perf_counter() - start)
    for name, xs in (("update_idle", idle), ("update_from_dir", from_dir), ("update_busy", busy),
                     ("unload_then_load", reload)):
        out[name] = {"ms": [ms(x) for x in xs], "best_ms": ms(min(xs)), "median_ms": ms(statistics.median(xs))}
    out["adapter_mb_per_checkpoint"] = round(adapter_bytes(ckpts[0]) / 2**20, 2)
    out["versions"] = multi.memgen_checkpoints()
    out["loadavg_after"] = load()
    return out


def serve_sync(dirs: list[Path], threads: int, repeats: int) -> dict:
    """Through `memgen serve --memgen c0=.. --memgen c1=..`: the update route's latency
    (directory read off the engine thread + the update between steps), idle and while 8
    streams decode, and a trainer's whole sync (pause, update, resume) while they decode."""
    import threading

    import httpx

    from memgen.serve.processes import free_port, stop, wait_until_answers

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "memgen.cli", "serve", "--memgen", f"c0={dirs[0]}", "--memgen", f"c1={dirs[1]}",
           "--dtype", "float32", "--device", "cpu", "--port", str(port), "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    ms = lambda s: round(s * 1000, 2)   # noqa: E731
    out = {"loadavg_before": load()}
    try:
        wait_until_answers(proc, f"{base}/health", 300)
        client = httpx.Client(base_url=base, timeout=120)

        def post(path, body=None):
            start = time.perf_counter()
            r = client.post(path, json=body)
            r.raise_for_status()
            return time.perf_counter() - start

        def update(i):
            return post("/v1/update_memgen_checkpoint", {"name": "c1", "path": str(dirs[2] if i % 2 else dirs[1])})

        idle = [update(i) for i in range(repeats)]
        busy, sync, done = [], [], []

        def streams():
            body = {"model": "c1", "prompt": "Tell me a long story about a fox.", "max_tokens": 64,
                    "temperature": 0, "ignore_eos": True}
            def one():
                try:
                    done.append(httpx.post(f"{base}/v1/completions", json=body, timeout=300).status_code)
                except httpx.HTTPError as e:
                    done.append(f"{type(e).__name__}: {e}")

            threads_ = [threading.Thread(target=one) for _ in range(8)]
            for t in threads_:
                t.start()
            return threads_

        for i in range(repeats):
            running = streams()
            time.sleep(1.0)
            busy.append(update(i))
            time.sleep(0.3)
            start = time.perf_counter()
            post("/v1/pause")
            update(i + 1)
            post("/v1/resume")
            sync.append(time.perf_counter() - start)
            for t in running:
                t.join()
        out.update({name: {"ms": [ms(x) for x in xs], "best_ms": ms(min(xs)), "median_ms": ms(statistics.median(xs))}
                    for name, xs in (("route_update_idle", idle), ("route_update_busy", busy),
                                     ("pause_update_resume_busy", sync))})
        out["requests_ok"] = done.count(200) == len(done) == 8 * repeats
        if not out["requests_ok"]:
            out["request_statuses"] = sorted(map(str, done))
    finally:
        stop(proc, 30)
    out["loadavg_after"] = load()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--updates", type=int, default=10, help="timed update_memgen calls (idle)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-serve", action="store_true", help="skip the server's update / pause routes")
    p.add_argument("--output", default=str(ROOT / "bench" / "results" / "checkpoints_cpu.json"))
    p.add_argument("--rss-child", nargs="+", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rss_child:
        print(json.dumps(rss_child(args.rss_child, args.threads)))
        return 0
    torch.set_num_threads(args.threads)
    from memgen import LLM

    result = {"machine": {"platform": platform.platform(), "cpu": platform.processor(), "cores": os.cpu_count(),
                          "torch": torch.__version__, "threads": args.threads},
              "config": {"requests": args.requests, "tokens": args.tokens, "repeats": args.repeats,
                         "checkpoints": NUM_CHECKPOINTS, "dtype": "float32", "model": "packaged SmolLM2-135M-Instruct",
                         "memgen": "K=8/8, budget 2, trigger inactive, LoRA r16 q/v, random lora_B*0.02"},
              "uptime_start": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        dirs, ckpts = build_checkpoints(Path(tmp), NUM_CHECKPOINTS)
        result["build_s"] = round(time.perf_counter() - t0, 1)
        result["memory"] = memory(dirs, args.threads)
        print("memory:", json.dumps(result["memory"]), flush=True)
        multi = LLM(memgen={f"c{i}": str(d) for i, d in enumerate(dirs)}, dtype="float32", device="cpu",
                    max_num_seqs=max(32, args.requests))
        single = LLM(memgen=str(dirs[0]), dtype="float32", device="cpu", max_num_seqs=max(32, args.requests))
        prompts = chat_prompts(multi, args.requests)
        result["mean_prompt_tokens"] = round(sum(map(len, prompts)) / len(prompts), 1)
        result["throughput"] = throughput(single, multi, prompts, args.tokens, args.repeats)
        print("throughput:", json.dumps({k: v for k, v in result["throughput"].items()}), flush=True)
        del single
        result["update"] = updates(multi, ckpts, dirs, args.updates)
        print("update:", json.dumps(result["update"]), flush=True)
        del multi
        if not args.no_serve:
            result["serve"] = serve_sync(dirs, args.threads, max(3, args.repeats))
            print("serve:", json.dumps(result["serve"]), flush=True)
    result["uptime_end"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
