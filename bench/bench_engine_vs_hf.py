"""Engine vs HF transformers `generate(use_cache=True)` on the packaged
SmolLM2-135M-Instruct (float32, CPU by default): the same prompts, greedy,
128 new tokens per row (EOS ignored), batch 1 and 16. Prints a table and writes
bench/results/engine_vs_hf_<device>.json with the machine, versions and config.

    python bench/bench_engine_vs_hf.py [--batches 1 16] [--max-tokens 128] [--repeats 2]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

TOPICS = ["the water cycle", "how a compiler works", "the history of tea", "why the sky is blue",
          "prime numbers", "photosynthesis", "the French revolution", "how vaccines work",
          "black holes", "the stock market", "machine learning", "the Roman empire",
          "climate change", "how bicycles balance", "the internet", "volcanoes"]


def make_prompts(tokenizer, n: int) -> list[list[int]]:
    """Chat-formatted prompts of a few dozen tokens, different lengths."""
    prompts = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        msg = [{"role": "user", "content": f"Explain {topic} to a curious student" + ", step by step" * (i % 4) + "."}]
        text = tokenizer.apply_chat_template(msg, add_generation_prompt=True, tokenize=False)
        prompts.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return prompts


def bench_hf(model, tokenizer, prompts, max_tokens: int) -> tuple[float, list[list[int]]]:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens,
                             min_new_tokens=max_tokens, do_sample=False, use_cache=True, pad_token_id=pad)
    elapsed = time.perf_counter() - start
    return elapsed, out[:, width:].tolist()


def bench_engine(llm, prompts, max_tokens: int) -> tuple[float, list[list[int]]]:
    from memgen import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    return elapsed, [o.token_ids for o in outs]


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Mean fraction of each row's tokens equal before the first difference."""
    fracs = []
    for x, y in zip(a, b):
        n = next((i for i, (s, t) in enumerate(zip(x, y)) if s != t), min(len(x), len(y)))
        fracs.append(n / max(len(x), 1))
    return sum(fracs) / len(fracs)


def machine_info(device: str) -> dict:
    from memgen.benchmark.report import cpu_name

    cpu = cpu_name()
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu": cpu,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": device}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF directory or .gguf (default: the packaged SmolLM2-135M)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per side and point, alternating (best kept)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import memgen
    from memgen import LLM
    from memgen.sources import resolve_model_dir

    model_dir = resolve_model_dir(args.model)
    dtype = getattr(torch, args.dtype)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, attn_implementation="sdpa")
    hf = hf.to(args.device).eval()
    llm = LLM(model_dir, dtype=args.dtype, device=args.device, max_num_seqs=max(args.batches))

    rows = []
    for batch in args.batches:
        prompts = make_prompts(tokenizer, batch)
        bench_engine(llm, prompts, 8)            # warm-up both sides
        bench_hf(hf, tokenizer, prompts, 8)
        # alternate the two sides and keep each one's best run: load from other processes on a
        # shared machine then biases neither side
        eng_runs, hf_runs = [], []
        for _ in range(args.repeats):
            eng_runs.append(bench_engine(llm, prompts, args.max_tokens))
            hf_runs.append(bench_hf(hf, tokenizer, prompts, args.max_tokens))
        eng_t, eng_tokens = min(eng_runs, key=lambda r: r[0])
        hf_t, hf_tokens = min(hf_runs, key=lambda r: r[0])
        n = batch * args.max_tokens
        rows.append({"batch": batch, "new_tokens_per_row": args.max_tokens,
                     "prompt_tokens": [len(p) for p in prompts],
                     "engine_s": eng_t, "hf_s": hf_t,
                     "engine_tokens_per_s": n / eng_t, "hf_tokens_per_s": n / hf_t,
                     "speedup": hf_t / eng_t, "greedy_agreement": agreement(eng_tokens, hf_tokens)})

    print(f"\nengine vs HF generate: {model_dir.name}, {args.dtype}, {args.device}, "
          f"{args.max_tokens} new tokens, threads={torch.get_num_threads()}")
    print(f"{'batch':>5} {'engine tok/s':>13} {'HF tok/s':>10} {'ratio':>7} {'agree':>7}")
    for r in rows:
        print(f"{r['batch']:>5} {r['engine_tokens_per_s']:>13.1f} {r['hf_tokens_per_s']:>10.1f} "
              f"{r['speedup']:>6.2f}x {r['greedy_agreement']:>7.2f}")

    result = {
        "benchmark": "engine_vs_hf", "model": str(model_dir.name), "dtype": args.dtype,
        "machine": machine_info(args.device),
        "versions": {"memgen": memgen.__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__},
        "config": {"max_tokens": args.max_tokens, "batches": args.batches, "repeats": args.repeats,
                   "greedy": True, "ignore_eos": True, "hf": "generate(use_cache=True), sdpa, left padding",
                   "engine": {"block_size": llm.config.block_size, "max_num_seqs": llm.config.max_num_seqs,
                              "max_num_batched_tokens": llm.config.max_num_batched_tokens,
                              "attention": llm.engine.model_runner.attn_backend.name}},
        "results": rows,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    device_tag = "cpu" if args.device == "cpu" else "gpu"
    out = Path(args.out or Path(__file__).parent / "results" / f"engine_vs_hf_{device_tag}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
