"""Training-bridge demo on CPU: weaver SFT of a fresh MemGen (K=4 prompt and
inference latents, budget 2, trigger inactive) on the packaged SmolLM2-135M,
with the example arithmetic set; accuracy before and after on a held-out part
through the engine (weights pushed live, no reload); and the rollout
throughput of the engine vs memgen.hf generation for a GRPO group.

    python bench/train_demo.py [--train 16] [--heldout 10] [--epochs 1] [--lr 5e-4]
                               [--group-prompts 1] [--group-samples 8] [--group-max-tokens 16]

The SFT targets are made from the records' answers: "The answer is \\boxed{N}.".
Writes bench/results/train_demo.json and bench/results/train_demo_loss.png.
The defaults are sized for a shared 2-core machine (a few minutes); the GRPO
group is 8 samples x `--group-prompts` prompts (8 x 8 in the issue; fewer by
default: on a shared 2-core CPU the HF side takes minutes even for 2 x 8,
because it re-prefills the whole batch after every insertion).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
DATA = ROOT / "data" / "arith50.jsonl"
RESULTS = ROOT / "results"


def reference_completion(answer) -> str:
    return f"The answer is \\boxed{{{answer}}}."


def accuracy(llm, records, max_tokens: int) -> dict:
    from memgen import SamplingParams
    from memgen.eval.tasks import score

    start = time.perf_counter()
    outs = llm.chat([r["messages"] for r in records], SamplingParams(max_tokens=max_tokens, temperature=0.0),
                    use_tqdm=False)
    seconds = time.perf_counter() - start
    scores = [score("boxed", o.text, r).value for o, r in zip(outs, records)]
    lenient = [last_number(o.text) == str(r["answer"]) for o, r in zip(outs, records)]
    return {"accuracy": sum(scores) / len(scores), "correct": int(sum(scores)), "n": len(scores),
            "last_number_correct": sum(lenient),
            "seconds": seconds, "mean_tokens": sum(len(o.token_ids) for o in outs) / len(outs),
            "mean_insertions": sum(o.metrics["num_insertions"] for o in outs) / len(outs),
            "examples": [o.text for o in outs[:3]]}


def last_number(text: str) -> str | None:
    """The last integer in the text: a lenient check beside the boxed reward
    (the model may answer "The answer is: 57" without a box)."""
    found = re.findall(r"-?\d+", text.replace(",", ""))
    return found[-1] if found else None


def useful_tokens(rows: list[list[int]], eos: int) -> int:
    """Tokens up to and including each row's first EOS (HF rows run on after it)."""
    return sum(row.index(eos) + 1 if eos in row else len(row) for row in rows)


def group_throughput(model, llm, records, prompts_n: int, samples: int, max_tokens: int, seed: int) -> dict:
    """One GRPO group's rollouts (temperature 1, trigger argmax as in weaver GRPO):
    the engine (per-sample seeds, one generate call) vs memgen.hf's batched
    reference loop over the same prompt x sample rows."""
    from memgen.train import encode_prompt, sample_groups

    tok = model.tokenizer
    prompts = [encode_prompt(tok, r) for r in records[:prompts_n]]
    start = time.perf_counter()
    rollouts = sample_groups(llm, prompts, samples, max_tokens, temperature=1.0, seed=seed)
    engine_s = time.perf_counter() - start
    engine_tokens = sum(len(r.completion_ids) for r in rollouts)

    rows = [p for p in prompts for _ in range(samples)]
    width = max(len(p) for p in rows)
    ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in rows])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in rows])
    torch.manual_seed(seed)
    start = time.perf_counter()
    out, _ = model.generate(ids, mask, max_new_tokens=max_tokens, temperature=1.0, weaver_do_sample=True)
    hf_s = time.perf_counter() - start
    hf_tokens = useful_tokens(out[:, width:].tolist(), tok.eos_token_id)
    return {"prompts": prompts_n, "samples_per_prompt": samples, "max_tokens": max_tokens,
            "engine_seconds": engine_s, "engine_tokens": engine_tokens, "engine_tok_s": engine_tokens / engine_s,
            "hf_seconds": hf_s, "hf_tokens": hf_tokens, "hf_tok_s": hf_tokens / hf_s,
            "throughput_ratio_engine_over_hf": (engine_tokens / engine_s) / (hf_tokens / hf_s),
            "wall_time_ratio_hf_over_engine": hf_s / engine_s}


def plot_loss(history: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], marker="o")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("SFT loss (token mean)")
    ax.set_title("MemGen weaver SFT, SmolLM2-135M, arith")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train", type=int, default=16, help="training records (the first N)")
    ap.add_argument("--heldout", type=int, default=10, help="held-out records (the last N)")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--lr", type=float, default=5e-4, help="higher than the reference's 1e-5: few steps here")
    ap.add_argument("--latents", type=int, default=4, help="K for prompt and inference latents")
    ap.add_argument("--budget", type=int, default=2, help="max inference insertions")
    ap.add_argument("--eval-max-tokens", type=int, default=40)
    ap.add_argument("--group-prompts", type=int, default=1)
    ap.add_argument("--group-samples", type=int, default=8)
    ap.add_argument("--group-max-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy 2-core box)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS / "train_demo.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()

    from memgen import LLM
    from memgen.checkpoint import MemGenSettings
    from memgen.hf import HFMemGenModel
    from memgen.sources import resolve_model_dir
    from memgen.train import ChatExample, SFTConfig, encode_example, train_sft

    records = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    train, heldout = records[:args.train], records[-args.heldout:]
    if args.train + args.heldout > len(records):
        raise SystemExit(f"--train + --heldout must be <= {len(records)}")
    reasoner = resolve_model_dir(None)
    settings = MemGenSettings(prompt_latents_len=args.latents, inference_latents_len=args.latents,
                              max_inference_aug_num=args.budget)
    model = HFMemGenModel.from_random(settings, reasoner, seed=args.seed)
    llm = LLM(model=reasoner, memgen=model.to_checkpoint(), dtype="float32")
    load_s = time.perf_counter() - t0

    print(f"[{time.perf_counter() - t0:6.1f}s] accuracy before ({len(heldout)} held out) ...", flush=True)
    before = accuracy(llm, heldout, args.eval_max_tokens)
    print(f"  boxed {before['correct']}/{before['n']}, last number {before['last_number_correct']}", flush=True)

    examples = [encode_example(model.tokenizer, ChatExample(r["messages"], reference_completion(r["answer"]), r["id"]))
                for r in train]
    config = SFTConfig(learning_rate=args.lr, epochs=args.epochs, batch_size=args.batch_size, seed=args.seed)
    print(f"[{time.perf_counter() - t0:6.1f}s] SFT: {len(examples)} examples x {args.epochs} epoch(s) ...",
          flush=True)
    start = time.perf_counter()
    history = train_sft(model, examples, config,
                        on_step=lambda h: print(f"  step {h['step']}: loss {h['loss']:.3f}", flush=True))
    sft_s = time.perf_counter() - start
    start = time.perf_counter()
    llm.update_memgen_weights(model.to_checkpoint())
    sync_s = time.perf_counter() - start

    print(f"[{time.perf_counter() - t0:6.1f}s] accuracy after ...", flush=True)
    after = accuracy(llm, heldout, args.eval_max_tokens)
    print(f"  boxed {after['correct']}/{after['n']}, last number {after['last_number_correct']}", flush=True)

    print(f"[{time.perf_counter() - t0:6.1f}s] GRPO group rollouts: engine vs memgen.hf ...", flush=True)
    throughput = group_throughput(model, llm, heldout, args.group_prompts, args.group_samples,
                                  args.group_max_tokens, args.seed)
    total_s = time.perf_counter() - t0

    RESULTS.mkdir(exist_ok=True)
    png = Path(args.out).with_name(Path(args.out).stem + "_loss.png")
    plot_loss(history, png)
    result = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "load_avg_1m": os.getloadavg()[0]},
        "versions": {"torch": torch.__version__, **_versions()},
        "config": {**vars(args), "model": "SmolLM2-135M-Instruct (packaged)", "dtype": "float32",
                   "trigger_active": False, "completion_template": reference_completion("N")},
        "sft": {"steps": len(history), "seconds": sft_s, "first_loss": history[0]["loss"],
                "last_loss": history[-1]["loss"], "history": history},
        "weight_sync_seconds": sync_s,
        "accuracy_before": before, "accuracy_after": after,
        "rollout_throughput": throughput,
        "load_seconds": load_s, "total_seconds": total_s, "loss_png": str(png),
    }
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\nSFT loss {history[0]['loss']:.3f} -> {history[-1]['loss']:.3f} in {len(history)} steps ({sft_s:.0f} s)")
    print(f"held-out accuracy (boxed reward): before {before['correct']}/{before['n']}, "
          f"after {after['correct']}/{after['n']}; last number right: before {before['last_number_correct']}, "
          f"after {after['last_number_correct']}")
    t = throughput
    print(f"GRPO group {t['prompts']}x{t['samples_per_prompt']}, {t['max_tokens']} tokens: engine "
          f"{t['engine_tok_s']:.1f} tok/s ({t['engine_seconds']:.1f} s), memgen.hf {t['hf_tok_s']:.1f} tok/s "
          f"({t['hf_seconds']:.1f} s): {t['throughput_ratio_engine_over_hf']:.1f}x")
    print(f"total {total_s:.0f} s; wrote {args.out} and {png}")


def _versions() -> dict:
    import peft
    import transformers

    return {"transformers": transformers.__version__, "peft": peft.__version__}


if __name__ == "__main__":
    main()
