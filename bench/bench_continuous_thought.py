"""Continuous thought (Coconut) in the engine vs a plain HF loop with a KV cache,
at batch 8 on a small random model (CPU by default).

The engine runs memgen.policies.ContinuousThought; the HF side runs
memgen.hf.continuous_thought.continuous_thought_generate, the same loop the
tests use as the parity oracle (one forward per position for the whole batch,
a DynamicCache, the hidden state fed back as the next input). Every prompt
ends with the start marker, so each row thinks `--thoughts` continuous
thoughts, takes the end marker, then decodes `--max-tokens` greedy tokens
(EOS ignored). Prompts are of equal length (the HF loop does not pad).

The two sides alternate, `--repeats` timed runs each, the best kept (other
processes' load then biases neither); the load average before and after is
recorded. Writes bench/results/continuous_thought_<device>.json.

    python bench/bench_continuous_thought.py [--batch 8] [--thoughts 6] [--max-tokens 64] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench_engine_vs_hf import agreement   # bench/ is on sys.path when run as a script

ROOT = Path(__file__).resolve().parents[1]


def build_model(tmp: Path, hidden: int, layers: int) -> Path:
    """A small random llama with the tests' byte-level tokenizer (no download)."""
    sys.path.insert(0, str(ROOT / "tests"))
    import fixtures

    tok = fixtures.build_tokenizer(tmp / "tok")
    return fixtures.build_tiny_model(tmp / "model", tok, arch="llama", hidden_size=hidden, num_layers=layers,
                                     delimiter_factor=None, max_position_embeddings=1024)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=48, help="prompt tokens, the start marker included")
    ap.add_argument("--thoughts", type=int, default=6, help="continuous thoughts per row (Coconut's GSM8k: 6)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: a shared machine)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import memgen
    import transformers
    from memgen import LLM, SamplingParams
    from memgen.benchmark.report import cpu_name
    from memgen.hf.continuous_thought import continuous_thought_generate
    from memgen.policies import ContinuousThought
    from transformers import AutoModelForCausalLM

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model(Path(tmp), args.hidden, args.layers)
        dtype = getattr(torch, args.dtype)
        hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).to(args.device).eval()
        llm = LLM(model_dir, dtype=args.dtype, device=args.device, max_num_seqs=args.batch)
        vocab = llm.vocab_size
        start_id, end_id = vocab - 2, vocab - 1   # two ordinary ids of the random model as the markers
        gen = torch.Generator().manual_seed(0)
        prompts = [torch.randint(3, vocab - 2, (args.prompt_len - 1,), generator=gen).tolist() + [start_id]
                   for _ in range(args.batch)]
        policy = ContinuousThought(start_id, end_id, args.thoughts)
        params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True, latent_policy=policy)

        def run_engine():
            t = time.perf_counter()
            outs = llm.generate(prompts, params, use_tqdm=False)
            return time.perf_counter() - t, [o.token_ids for o in outs], outs

        def run_hf():
            t = time.perf_counter()
            tokens = continuous_thought_generate(hf, prompts, start_id, end_id, args.thoughts, args.max_tokens)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            return time.perf_counter() - t, tokens, None

        run_engine()   # warm-up both sides
        run_hf()
        eng_runs, hf_runs = [], []
        for _ in range(args.repeats):
            eng_runs.append(run_engine())
            hf_runs.append(run_hf())
        eng_t, eng_tokens, outs = min(eng_runs, key=lambda r: r[0])
        hf_t, hf_tokens, _ = min(hf_runs, key=lambda r: r[0])
        engine_cfg = {"block_size": llm.config.block_size, "max_num_seqs": llm.config.max_num_seqs,
                      "prefix_caching": llm.config.enable_prefix_caching,
                      "attention": llm.engine.model_runner.attn_backend.name}
    load_after = os.getloadavg()

    positions = args.batch * (args.thoughts + 1 + args.max_tokens)   # thoughts + end marker + tokens per row
    row = {"batch": args.batch, "prompt_tokens": args.prompt_len, "thoughts": args.thoughts,
           "new_tokens_per_row": args.max_tokens,
           "engine_s": eng_t, "hf_s": hf_t, "speedup": hf_t / eng_t,
           "engine_positions_per_s": positions / eng_t, "hf_positions_per_s": positions / hf_t,
           "engine_tokens_per_s": args.batch * args.max_tokens / eng_t,
           "hf_tokens_per_s": args.batch * args.max_tokens / hf_t,
           "greedy_agreement": agreement(eng_tokens, hf_tokens),
           "engine_latent_positions": sum(o.metrics["num_latent_positions"] for o in outs),
           "engine_runs_s": [r[0] for r in eng_runs], "hf_runs_s": [r[0] for r in hf_runs]}
    print(f"\ncontinuous thought, engine vs HF loop: random llama hidden {args.hidden} x {args.layers} layers, "
          f"{args.dtype}, {args.device}, batch {args.batch}, {args.thoughts} thoughts + {args.max_tokens} tokens, "
          f"threads={torch.get_num_threads()}, load {load_before[0]:.1f} -> {load_after[0]:.1f}")
    print(f"engine {eng_t:.3f} s ({row['engine_tokens_per_s']:.0f} tok/s)   HF loop {hf_t:.3f} s "
          f"({row['hf_tokens_per_s']:.0f} tok/s)   ratio {row['speedup']:.2f}x   "
          f"greedy agreement {row['greedy_agreement']:.2f}")

    machine = {"platform": platform.platform(), "python": platform.python_version(), "cpu": cpu_name(),
               "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": args.device,
               "load_avg_before": load_before, "load_avg_after": load_after}
    if args.device.startswith("cuda"):
        machine["gpu"] = torch.cuda.get_device_name(0)
    result = {
        "benchmark": "continuous_thought_engine_vs_hf_loop",
        "model": f"random llama, hidden {args.hidden}, {args.layers} layers, vocab {vocab}",
        "dtype": args.dtype, "machine": machine,
        "versions": {"memgen": memgen.__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__},
        "config": {"batch": args.batch, "prompt_len": args.prompt_len, "thoughts": args.thoughts,
                   "max_tokens": args.max_tokens, "repeats": args.repeats, "greedy": True, "ignore_eos": True,
                   "hf": "memgen.hf.continuous_thought.continuous_thought_generate (DynamicCache, one forward "
                         "per position for the batch)",
                   "engine": engine_cfg},
        "results": [row],
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    device_tag = "cpu" if args.device == "cpu" else "gpu"
    out = Path(args.out or ROOT / "bench" / "results" / f"continuous_thought_{device_tag}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
