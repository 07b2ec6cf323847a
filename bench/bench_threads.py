"""Decode steps of few rows on 1 vs 2 (or more) threads on the packaged SmolLM2-135M
(CPU, float32 and/or bfloat16): the model's linear layers alone (the linear floor:
every Linear and the LM head at the step's rows) and whole engine decode steps, at
batch 1 and 8, runs alternated between configurations, best of --repeats. A
configuration is a dtype, a thread count and the packed linear's split rule
(engine/cpu_gemm.h): 1 thread; N threads under "stream" (the default: few-row calls
split too); N threads under "sums" (only calls of 4M+ multiply-adds split). Also the
machine's read stream rate at each thread count (a sum over a 1 GiB tensor), and the
bound of a batch-1 step: the bytes of its weights over that rate.

    python bench/bench_threads.py [--threads 1 2] [--batches 1 8] [--tokens 64] [--repeats 5]
        [--dtypes float32 bfloat16] [--rules stream sums]
    python bench/bench_threads.py --neighbour [--threads 2] [--tokens 64] [--repeats 3]

--neighbour: how much a busy neighbour (another process spinning on one core) slows
memgen's batch-1 decode against how much it slows HF `generate` (same model, float32,
same thread count), each side timed alone and beside the spinner, alternated.

Prints one JSON object (machine, load average before and after, every run).
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch


def stream_rate(threads: int, repeats: int) -> float:
    """GB/s of reading a 1 GiB float32 tensor (torch's sum), best of repeats."""
    torch.set_num_threads(threads)
    x = torch.ones(1 << 28)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best / 1e9


def weight_bytes(llm) -> int:
    from memgen.layers.linear import Linear

    model = llm.engine.model_runner.model
    elem = model.model.embed_tokens.weight.element_size()
    n = sum(m.in_features * m.out_features * elem for m in model.modules() if isinstance(m, Linear))
    if model.lm_head is None:   # tied: the embedding is the LM head
        n += model.model.embed_tokens.weight.numel() * elem
    return n


def decode_s_per_step(llm, batch: int, tokens: int) -> float:
    """Seconds per decode step at `batch` rows: the prefill step untimed, then `tokens` steps."""
    from memgen import SamplingParams

    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=tokens + 1, ignore_eos=True)
    prompt = llm.tokenizer.encode("Tell me a story about a cat who learns to fly.")
    for i in range(batch):
        engine.add_request(prompt + [i + 10], params)
    engine.step()                                   # prefill (and the first token)
    start = time.perf_counter()
    steps = 0
    while engine.has_unfinished():
        engine.step()
        steps += 1
    return (time.perf_counter() - start) / steps


def _spin() -> None:
    while True:
        pass


def neighbour(args) -> dict:
    """Seconds per token for memgen and HF generate at batch 1, with and without a busy
    process beside them: alternated rounds, best of args.repeats each."""
    import multiprocessing

    from transformers import AutoModelForCausalLM

    from memgen import LLM
    from memgen.sources import resolve_model_dir

    threads = args.threads[-1]
    torch.set_num_threads(threads)
    llm = LLM(dtype="float32", device="cpu")
    hf = AutoModelForCausalLM.from_pretrained(str(resolve_model_dir(None)), dtype=torch.float32).eval()
    prompt = llm.tokenizer.encode("Tell me a story about a cat who learns to fly.")

    def hf_s_per_token() -> float:
        ids = torch.tensor([prompt])
        with torch.no_grad():
            hf.generate(ids, max_new_tokens=2, min_new_tokens=2, do_sample=False)   # prefill timed apart
            t = time.perf_counter()
            hf.generate(ids, max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False)
            total = time.perf_counter() - t
        return total / args.tokens

    sides = {"memgen": lambda: decode_s_per_step(llm, 1, args.tokens), "hf": hf_s_per_token}
    times = {(side, busy): [] for side in sides for busy in (False, True)}
    for r in range(args.repeats):
        for busy in ((False, True) if r % 2 == 0 else (True, False)):
            proc = None
            if busy:
                proc = multiprocessing.get_context("fork").Process(target=_spin, daemon=True)
                proc.start()
                time.sleep(0.2)
            try:
                for side, run in sides.items():
                    times[(side, busy)].append(run() * 1e3)
            finally:
                if proc is not None:
                    proc.kill()
                    proc.join()
    out = {"threads": threads, "tokens": args.tokens, "ms_per_token": {}, "slowdown": {}}
    for side in sides:
        alone, beside = min(times[(side, False)]), min(times[(side, True)])
        out["ms_per_token"][side] = {"alone": round(alone, 2), "busy_neighbour": round(beside, 2),
                                     "alone_all": [round(x, 2) for x in times[(side, False)]],
                                     "busy_all": [round(x, 2) for x in times[(side, True)]]}
        out["slowdown"][side] = round(beside / alone, 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--floor-steps", type=int, default=20)
    ap.add_argument("--dtypes", nargs="+", default=["float32"])
    ap.add_argument("--rules", nargs="+", default=["stream"])
    ap.add_argument("--no-engine", action="store_true")
    ap.add_argument("--neighbour", action="store_true")
    args = ap.parse_args()
    if args.neighbour:
        load0 = open("/proc/loadavg").read().split()[:3]
        res = neighbour(args)
        print(json.dumps({"load_before": load0, **res, "load_after": open("/proc/loadavg").read().split()[:3]},
                         indent=1))
        return

    from memgen import LLM
    from memgen.benchmark.floor import linear_floor_s
    from memgen.layers import native

    load0 = open("/proc/loadavg").read().split()[:3]
    llms = {dt: LLM(dtype=dt, device="cpu") for dt in args.dtypes}
    out = {"load_before": load0, "isa": native.linear_isa(), "isa_bf16": native.linear_isa_bf16(),
           "weight_mb": {dt: weight_bytes(llm) / 1e6 for dt, llm in llms.items()},
           "stream_gb_s": {}, "floor_ms": {}, "step_ms": {}}
    for t in args.threads:
        out["stream_gb_s"][t] = round(max(stream_rate(t, 3) for _ in range(2)), 1)
    configs = [(dt, t, rule) for dt in args.dtypes for t in args.threads
               for rule in ((args.rules[0],) if t == 1 else args.rules)]
    for b in args.batches:
        for dt, t, _ in configs:
            torch.set_num_threads(t)
            linear_floor_s(llms[dt], b, 2)           # build the calls, warm
    floors = {(b, c): [] for b in args.batches for c in configs}
    steps = {(b, c): [] for b in args.batches for c in configs}
    for _ in range(args.repeats):
        for b in args.batches:
            for dt, t, rule in configs:
                torch.set_num_threads(t)
                native.set_linear_split(rule)
                llm = llms[dt]
                floors[(b, (dt, t, rule))].append(linear_floor_s(llm, b, args.floor_steps) / args.floor_steps * 1e3)
                if not args.no_engine:
                    steps[(b, (dt, t, rule))].append(decode_s_per_step(llm, b, args.tokens) * 1e3)
    native.set_linear_split("stream")
    for (b, (dt, t, rule)), v in floors.items():
        name = f"{dt}_b{b}_t{t}" + ("" if t == 1 or len(args.rules) == 1 else f"_{rule}")
        out["floor_ms"][name] = round(min(v), 2)
        if steps[(b, (dt, t, rule))]:
            out["step_ms"][name] = round(min(steps[(b, (dt, t, rule))]), 2)
            out["step_ms"][name + "_all"] = [round(x, 2) for x in steps[(b, (dt, t, rule))]]
    for dt in args.dtypes:
        for t in args.threads:
            out[f"bound_ms_{dt}_t{t}"] = round(out["weight_mb"][dt] / 1e3 / out["stream_gb_s"][t] * 1e3, 2)
    out["load_after"] = open("/proc/loadavg").read().split()[:3]
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
