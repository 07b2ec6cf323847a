"""Structured outputs' cost (issue 30): the decode step time of 8 rows under a JSON
schema vs the same 8 rows unconstrained, on the packaged SmolLM2-135M-Instruct
(offline), plain and with MemGen (demo/smollm2-arith); grammar compile time cold
and cached. One process, runs alternated (plain, constrained, plain, ...), greedy.

A step's time is the wall time of LLMEngine.step(); only steps where all 8 rows
are running and sample (decode steps, no prefill in them) count, and the median
of those per run is reported, the best run of --repeats. The constrained rows'
mask (xgrammar's bitmask filled per row in C++, unpacked on the device, one
masked_fill) is the whole difference.

    python bench/bench_structured.py [--repeats 3] [--tokens 64] [--threads 1] [--device cpu]

Writes bench/results/structured_<device>.json (machine, load average before/after,
every run). Target: constrained / unconstrained step time <= 1.10x.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
BATCH = 8
SCHEMA = {"type": "object",
          "properties": {"name": {"type": "string"},
                         "steps": {"type": "array", "items": {"type": "string"}, "minItems": 3},
                         "answer": {"type": "integer"}},
          "required": ["name", "steps", "answer"]}
QUESTIONS = ["What is 12 + 30?", "How many legs do 3 spiders have?", "What is 7 times 8?",
             "Name a prime number above 50.", "What is half of 96?", "How many minutes are in 3 hours?",
             "What is 15 squared?", "What is 1000 minus 357?"]


def timed_steps(llm, prompts, params) -> dict:
    """Generate, timing every engine step; the median of the steps where all rows sample."""

    engine = llm.engine
    step = engine.step
    times: list[float] = []

    def timed():
        running = engine.stats()["running"]
        t0 = time.perf_counter()
        out = step()
        dt = time.perf_counter() - t0
        sampled = sum(1 for o in out if o.new_token_ids)
        if running == BATCH and sampled == BATCH:
            times.append(dt)
        return out

    engine.step = timed
    try:
        t0 = time.perf_counter()
        outs = llm.chat([[{"role": "user", "content": q}] for q in prompts], params, use_tqdm=False)
        total = time.perf_counter() - t0
    finally:
        engine.step = step
    return {"median_step_ms": 1e3 * statistics.median(times) if times else None, "num_full_steps": len(times),
            "total_s": total, "tokens": sum(len(o.token_ids) for o in outs),
            "finish": [o.finish_reason for o in outs],
            "insertions": sum(o.metrics.get("num_insertions", 0) for o in outs),
            "texts": [o.text[:80] for o in outs[:2]]}


def compile_times(llm) -> dict:
    from memgen.structured.backend import StructuredOutputs
    from memgen.structured.params import StructuredOutputsParams

    t0 = time.perf_counter()
    backend = StructuredOutputs(llm.tokenizer, llm.vocab_size, llm.engine.eos_token_ids)
    info_s = time.perf_counter() - t0
    schema = dict(SCHEMA, properties={**SCHEMA["properties"], f"k{os.getpid()}": {"type": "boolean"}})
    out = {"tokenizer_info_s": info_s}
    for name, so in (("json", StructuredOutputsParams(json=schema)),
                     ("regex", StructuredOutputsParams(regex=r"[0-9]{1,4}(\.[0-9]+)? (apples|pears)")),
                     ("grammar", StructuredOutputsParams(grammar='root ::= "yes" | "no" | "maybe " [a-z]+'))):
        t0 = time.perf_counter()
        backend.compile(so)
        cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        backend.compile(StructuredOutputsParams(**{so.kind: getattr(so, so.kind)}))
        cached = time.perf_counter() - t0
        out[name] = {"cold_ms": 1e3 * cold, "cached_ms": 1e3 * cached}
    return out


def mask_cost(llm, repeats: int = 200) -> dict:
    """The mask alone, per step of 8 JSON rows (mid-object), on random logits of the
    vocabulary's width: robust against a busy machine's noise in whole steps."""
    import xgrammar as xgr

    from memgen.structured.params import StructuredOutputsParams

    backend = llm.structured_outputs()
    compiled = backend.compile(StructuredOutputsParams(json=SCHEMA))

    class Row:     # what mask() reads of a sequence
        def __init__(self):
            self.grammar = xgr.GrammarMatcher(compiled)
            self.grammar.accept_string('{"name": "Ann", "steps": ["add the ')
            self.grammar_json = True

    rows = [Row() for _ in range(BATCH)]
    logits = torch.randn(BATCH, llm.vocab_size, device=llm.device)
    backend.mask(rows, logits.clone())
    t0 = time.perf_counter()
    for _ in range(repeats):
        backend.mask(rows, logits.clone())
    if llm.device.type == "cuda":
        torch.cuda.synchronize()
    masked = (time.perf_counter() - t0) / repeats
    t0 = time.perf_counter()
    for _ in range(repeats):
        logits.clone()
    if llm.device.type == "cuda":
        torch.cuda.synchronize()
    return {"mask_ms_per_step": 1e3 * (masked - (time.perf_counter() - t0) / repeats)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)   # 2 threads on a busy 2-core box: 10x noise
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--memgen", default=str(ROOT / "demo" / "smollm2-arith"))
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    from memgen import LLM, SamplingParams, StructuredOutputsParams

    load_before = os.getloadavg()
    result = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "threads": args.threads,
              "device": args.device, "torch": torch.__version__, "load_before": load_before, "configs": {}}
    plain = SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True)
    constrained = SamplingParams(max_tokens=args.tokens, temperature=0.0,
                                 structured_outputs=StructuredOutputsParams(json=SCHEMA))
    for label, kwargs in (("plain", {}), ("memgen", {"memgen": args.memgen})):
        llm = LLM(device=args.device, **kwargs)
        if label == "plain":
            result["compile"] = compile_times(llm)
            result["mask"] = mask_cost(llm)
        timed_steps(llm, QUESTIONS[:2], plain)           # warm up both paths
        timed_steps(llm, QUESTIONS[:2], constrained)
        runs = {"unconstrained": [], "constrained": []}
        for _ in range(args.repeats):
            runs["unconstrained"].append(timed_steps(llm, QUESTIONS, plain))
            runs["constrained"].append(timed_steps(llm, QUESTIONS, constrained))
        best = {k: min(r["median_step_ms"] for r in v if r["median_step_ms"]) for k, v in runs.items()}
        result["configs"][label] = {"runs": runs, "best_median_step_ms": best,
                                    "ratio": best["constrained"] / best["unconstrained"]}
        print(f"{label:7s} step ms: unconstrained {best['unconstrained']:.2f}  constrained "
              f"{best['constrained']:.2f}  ratio {best['constrained'] / best['unconstrained']:.3f}  "
              f"(full steps per run: {[r['num_full_steps'] for r in runs['constrained']]})")
        del llm
    result["load_after"] = os.getloadavg()
    c = result["compile"]
    print("compile ms (cold / cached): " + ", ".join(f"{k} {v['cold_ms']:.2f} / {v['cached_ms']:.3f}"
                                                   for k, v in c.items() if isinstance(v, dict))
          + f"; tokenizer info {1e3 * c['tokenizer_info_s']:.0f} ms")
    print(f"mask alone: {result['mask']['mask_ms_per_step']:.3f} ms per step of {BATCH} JSON rows")
    print(f"load average before {load_before}, after {result['load_after']}")
    out = ROOT / "bench" / "results" / f"structured_{args.device.split(':')[0]}.json"
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
