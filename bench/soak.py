"""Soak: many mixed requests under KV pressure, on every pool layout, prefix
caching on. Requests share a chat-template-like prefix (the workload of an
offline evaluation), repeat, mix greedy and seeded sampling and max_tokens, and
arrive in generate() calls of random sizes; the KV cache is a few blocks above
what one max-length sequence needs, so preemption is constant.

Per layout it reports requests served and lost (must be 0), calls that raised,
preemptions, tokens/s, blocks free at the end in every pool (must be all), and
how many of a sample of greedy requests equal the same request run alone on a
roomy engine (must be all; float64, so that batching cannot flip an argmax). Writes bench/results/soak_<device>.json.

    python bench/soak.py [--requests 1000] [--layouts plain shared_active ...] [--no-prefix-caching]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))   # the tiny-model builders (fixtures.py, memgen_fixtures.py)

MAX_MODEL_LEN = 160
BLOCK_SIZE = 8
LAYOUTS = ["plain", "shared_inactive", "shared_active", "weaver_own_base", "trigger_own_base"]


def build_assets(root: Path) -> dict:
    """Tiny random models and MemGen checkpoints, one per layout (seconds)."""
    import fixtures
    import memgen_fixtures

    tok = fixtures.build_tokenizer(root / "tok")
    reasoner = memgen_fixtures.build_memgen_reasoner(root / "reasoner", tok)
    other = fixtures.build_tiny_model(root / "other", tok, hidden_size=96, seed=1)
    ckpt = memgen_fixtures.build_memgen_checkpoint
    return {
        "tokenizer": tok,
        "plain": dict(model=reasoner),
        "shared_inactive": dict(model=reasoner, memgen=ckpt(root / "c_inactive", tok, reasoner)),
        "shared_active": dict(model=reasoner, memgen=ckpt(root / "c_active", tok, reasoner, trigger_active=True,
                                                          seed=1)),
        "weaver_own_base": dict(model=reasoner, weaver_model=other,
                                memgen=ckpt(root / "c_wide", tok, reasoner, weaver_dir=other, trigger_active=True,
                                            seed=2)),
        "trigger_own_base": dict(model=reasoner, trigger_model=other,
                                 memgen=ckpt(root / "c_trig", tok, reasoner, trigger_dir=other, trigger_active=True,
                                             seed=3)),
    }


def tight_blocks(layout: str) -> int:
    """A few blocks above one max-length sequence in the base pool (three streams share it)."""
    streams = {"plain": 1, "weaver_own_base": 2, "trigger_own_base": 2}.get(layout, 3)
    return streams * (-(-MAX_MODEL_LEN // BLOCK_SIZE) + (streams > 1)) + 4


def workload(tokenizer, n: int, seed: int):
    """n (prompt ids, SamplingParams) pairs: one shared system prompt, 40 questions, repeats."""
    from memgen import SamplingParams

    rng = random.Random(seed)
    words = "add the numbers then check result write it down quick brown fox jumps over lazy dog".split()
    questions = [" ".join(rng.choice(words) for _ in range(rng.randint(2, 10))) + "." for _ in range(40)]
    requests = []
    for i in range(n):
        text = tokenizer.apply_chat_template(
            [{"role": "system", "content": "Solve the problem and put the answer in a box."},
             {"role": "user", "content": rng.choice(questions)}], tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        seeded = rng.random() < 0.3
        params = SamplingParams(max_tokens=rng.randint(1, 40), temperature=0.8 if seeded else 0.0,
                                seed=rng.randrange(10**6) if seeded else None, ignore_eos=rng.random() < 0.5)
        requests.append((ids, params))
    return requests


def soak_layout(assets: dict, layout: str, n: int, seed: int, prefix_caching: bool, sample: int) -> dict:
    from memgen import LLM

    kwargs = dict(assets[layout], dtype="float64", device="cpu", max_model_len=MAX_MODEL_LEN, block_size=BLOCK_SIZE)
    llm = LLM(**kwargs, num_kv_blocks=tight_blocks(layout), max_num_batched_tokens=64, max_num_seqs=16,
              enable_prefix_caching=prefix_caching)
    requests = workload(assets["tokenizer"], n, seed)
    rng = random.Random(seed + 1)
    served = lost = failed_calls = preemptions = tokens = 0
    errors: list[str] = []
    greedy_outputs = []
    start = time.perf_counter()
    i = 0
    while i < n:
        batch = requests[i:i + rng.randint(1, 48)]
        i += len(batch)
        try:
            outs = llm.generate([p for p, _ in batch], [sp for _, sp in batch], use_tqdm=False)
        except Exception as e:   # noqa: BLE001: a soak counts failures instead of stopping
            failed_calls += 1
            lost += len(batch)
            errors.append(f"{type(e).__name__}: {e}")
            continue
        for (prompt, params), out in zip(batch, outs):
            ok = out.prompt_token_ids == prompt and out.finish_reason in ("stop", "length") and \
                len(out.augmentation) == len(out.token_ids) and 1 <= len(out.token_ids) <= params.max_tokens
            served += ok
            lost += not ok
            tokens += len(out.token_ids)
            preemptions += out.metrics["num_preemptions"]
            if params.temperature == 0.0:
                greedy_outputs.append((prompt, params, out.token_ids, out.augmentation))
    elapsed = time.perf_counter() - start
    blocks = {pool: {"free": m.num_free_blocks, "total": m.num_blocks,
                     "max_ref_count": max(m.ref_count(b) for b in range(m.num_blocks))}
              for pool, m in ((p.name, p.block_manager) for p in llm.engine.pools)}
    # a sample of greedy requests must equal the request run alone on a roomy engine
    roomy = LLM(**kwargs, enable_prefix_caching=False)
    picks = random.Random(seed + 2).sample(greedy_outputs, min(sample, len(greedy_outputs)))
    equal = 0
    for prompt, params, token_ids, augmentation in picks:
        alone = roomy.generate([prompt], params, use_tqdm=False)[0]
        equal += alone.token_ids == token_ids and alone.augmentation == augmentation
    return {"layout": layout, "requests": n, "served": served, "lost": lost, "failed_calls": failed_calls,
            "errors": errors[:5], "preemptions": preemptions, "output_tokens": tokens,
            "seconds": round(elapsed, 2), "tokens_per_s": round(tokens / elapsed, 1),
            "blocks_at_end": blocks, "all_blocks_free": all(b["free"] == b["total"] for b in blocks.values()),
            "greedy_sample": len(picks), "greedy_sample_equal_alone": equal}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=1000, help="requests per layout (default 1000)")
    ap.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=LAYOUTS)
    ap.add_argument("--no-prefix-caching", action="store_true")
    ap.add_argument("--sample", type=int, default=40, help="greedy requests re-run alone to compare (default 40)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("-o", "--output", type=Path, default=ROOT / "bench" / "results" / "soak_cpu.json")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(1)   # tiny models: one thread is fastest and immune to a busy machine
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        assets = build_assets(Path(tmp))
        for layout in args.layouts:
            r = soak_layout(assets, layout, args.requests, args.seed, not args.no_prefix_caching, args.sample)
            results.append(r)
            print(f"{layout:17s} served {r['served']}/{r['requests']}  lost {r['lost']}  failed calls "
                  f"{r['failed_calls']}  preemptions {r['preemptions']}  {r['tokens_per_s']} tok/s  "
                  f"blocks free: {r['all_blocks_free']}  greedy = alone: "
                  f"{r['greedy_sample_equal_alone']}/{r['greedy_sample']}", flush=True)
    ok = all(r["lost"] == 0 and r["all_blocks_free"] and r["greedy_sample_equal_alone"] == r["greedy_sample"]
             for r in results)
    doc = {"benchmark": "soak", "ok": ok, "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                                      "load_average": os.getloadavg(), "torch": torch.__version__},
           "config": {"max_model_len": MAX_MODEL_LEN, "block_size": BLOCK_SIZE, "max_num_seqs": 16,
                      "max_num_batched_tokens": 64, "prefix_caching": not args.no_prefix_caching,
                      "dtype": "float64", "seed": args.seed},
           "layouts": results}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"{'OK' if ok else 'FAILED'}: wrote {args.output}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
