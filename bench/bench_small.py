"""Where the engine's own overhead shows: a small Qwen2-shaped random model
(hidden 512, 6 layers, 4 heads / 2 KV heads, intermediate 1024, a ~320-entry
vocabulary; ~14 M parameters), float32 on CPU, batch 8, greedy, EOS ignored.
Cheap GEMMs make this the regime of a GPU: host work, attention and MemGen's
extra rows decide the speed. Everything is built offline in a temp dir.

Measured in one process, runs alternated, best of --repeats:
  plain      engine vs HF generate(use_cache=True), and each engine step against
             the same linear layers run alone at its rows (the floor of a step)
  memory     MemGen (K=8 prompt and inference latents, budget 5, trigger active with
             a head calibrated to insert at about half its consultations) vs plain,
             all roles on the reasoner's base; steps per insertion; the rows of each
             run's forwards, and each run against its linear layers at those rows
             (what MemGen costs beside its extra rows)
  reference  MemGen engine vs memgen.hf (the reference's semantics) with ~26-token
             and 170-200-token prompts; tokens and masks compared

    python bench/bench_small.py [--tokens 384] [--repeats 2] [--threads 1]

Writes bench/results/small_cpu.json (machine, load average, config, every run).
Targets (issue 17): plain >= 1.5x HF; memory on/off <= 1.25x (goal 1.10x);
MemGen vs reference >= 4.5x short, >= 8x long.
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))   # the offline model builders (fixtures.py, memgen_fixtures.py)

BATCH = 8
SHAPE = dict(hidden_size=512, num_layers=6, max_position_embeddings=2048)   # 4 heads / 2 KV, intermediate 2x
LATENTS, BUDGET = 8, 5


def build(root: Path):
    import fixtures
    import memgen_fixtures

    tok = fixtures.build_tokenizer(root / "tok")
    model = fixtures.build_tiny_model(root / "small", tok, delimiter_factor=1.6, **SHAPE)
    ckpt = memgen_fixtures.build_memgen_checkpoint(root / "memgen", tok, model, prompt_latents_len=LATENTS,
                                                   inference_latents_len=LATENTS, max_inference_aug_num=BUDGET,
                                                   trigger_active=True)
    return tok, model, ckpt


def prompts_of(tok, n: int, words: int) -> list[list[int]]:
    base = "We add the numbers, then we check the result. The quick brown fox jumps over the lazy dog. "
    out = []
    for i in range(n):
        text = (base * (1 + words // 18))[: 6 * words + 7 * i]
        msg = [{"role": "user", "content": f"Question {i}: " + text}]
        out.append(tok(tok.apply_chat_template(msg, tokenize=False, add_generation_prompt=True),
                       add_special_tokens=False)["input_ids"])
    return out


CPU_TIMES: dict[str, list[float]] = {}   # process CPU seconds of every timed run, by name (less hit by other jobs)


def timed(fn):
    start, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return time.perf_counter() - start, time.process_time() - cpu, result


def best_of(runs: dict[str, list[float]]) -> dict[str, float]:
    return {k: min(v) for k, v in runs.items()}


def alternate(repeats: int, **fns) -> tuple[dict[str, list[float]], dict]:
    """Run each function `repeats` times, interleaved; keep every time (wall; CPU in
    CPU_TIMES) and the last result."""
    times, results = {k: [] for k in fns}, {}
    for _ in range(repeats):
        for name, fn in fns.items():
            t, cpu, results[name] = timed(fn)
            times[name].append(round(t, 3))
            CPU_TIMES.setdefault(name, []).append(round(cpu, 3))
    return times, results


def cpu_ratio(a: str, b: str) -> float:
    """best CPU time of run `a` / of run `b` (this section's runs: CPU_TIMES is cleared per section)"""
    return round(min(CPU_TIMES[a]) / min(CPU_TIMES[b]), 2)


def linear_floor(llm, rows: int, steps: int, mkl: bool = False) -> float:
    """The model's linear layers and LM head alone (memgen.benchmark.floor): the
    engine's own kernel, or MKL's F.linear on the same weights (mkl=True)."""
    from memgen.benchmark.floor import linear_floor_s

    return linear_floor_s(llm, rows, steps, mkl)


def count_steps(llm, prompts, params, rows: list[int]) -> int:
    """Engine steps for the prompts; `rows` collects each forward's rows (all pools)."""
    engine = llm.engine
    runners = [pool.runner for pool in engine.pools]

    def recording(forward):
        def run(inp):
            rows.append(inp.input_ids.shape[0])
            return forward(inp)
        return run

    for runner in runners:
        runner.forward = recording(runner.forward)   # an instance attribute over the method
    try:
        for p in prompts:
            engine.add_request(p, params)
        steps = 0
        while engine.has_unfinished():
            engine.step()
            steps += 1
    finally:
        for runner in runners:
            del runner.forward
    return steps


def rows_floor(llm, rows: list[int]) -> float:
    """The linear floor of a run whose forwards had these row counts: every linear
    layer at each forward's rows (the LM head too, at all rows: ~1% here)."""
    counts: dict[int, int] = {}
    for r in rows:
        counts[r] = counts.get(r, 0) + 1
    return sum(linear_floor(llm, r, n) for r, n in counts.items())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=384)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: immune to a busy machine)")
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("-o", "--output", type=Path, default=ROOT / "bench" / "results" / "small_cpu.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM

    from memgen import LLM, SamplingParams
    from memgen.checkpoint import load_checkpoint
    from memgen.hf import HFMemGenModel

    load_start = os.getloadavg()
    result = {"benchmark": "bench_small", "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                                      "torch": torch.__version__, "threads": args.threads},
              "config": {**SHAPE, "batch": BATCH, "tokens": args.tokens, "latents": LATENTS, "budget": BUDGET,
                         "dtype": "float32", "repeats": args.repeats}}
    with tempfile.TemporaryDirectory() as tmp:
        tok, model_dir, ckpt_dir = build(Path(tmp))
        params = SamplingParams(temperature=0.0, max_tokens=args.tokens, ignore_eos=True)
        short = prompts_of(tok, BATCH, 3)
        plain = LLM(model_dir, dtype="float32", device="cpu", max_model_len=1024)
        memgen = LLM(model_dir, memgen=ckpt_dir, dtype="float32", device="cpu", max_model_len=1024)

        # ---- plain engine vs HF generate, and the linear floor -----------------------------
        hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
        width = max(map(len, short))
        pad = tok.pad_token_id
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in short])
        mask = (torch.arange(width)[None, :] >= torch.tensor([width - len(p) for p in short])[:, None]).long()

        def run_hf():
            with torch.inference_mode():
                return hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.tokens,
                                   min_new_tokens=args.tokens, do_sample=False, pad_token_id=pad)[:, width:].tolist()

        plain.generate(short[:2], SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False)   # warm-up
        times, res = alternate(args.repeats, engine=lambda: plain.generate(short, params, use_tqdm=False),
                               hf=run_hf, floor=lambda: linear_floor(plain, BATCH, args.tokens),
                               floor_mkl=lambda: linear_floor(plain, BATCH, args.tokens, mkl=True))
        best = best_of(times)
        engine_tokens = [o.token_ids for o in res["engine"]]
        result["plain"] = {"times_s": times, "cpu_s": dict(CPU_TIMES),
                           "engine_vs_hf": round(best["hf"] / best["engine"], 2),
                           "engine_vs_hf_cpu": cpu_ratio("hf", "engine"),
                           "engine_vs_linear_floor_cpu": cpu_ratio("engine", "floor"),
                           "engine_vs_linear_floor": round(best["engine"] / best["floor"], 2),
                           "hf_vs_linear_floor": round(best["hf"] / best["floor"], 2),
                           "hf_vs_mkl_linear_floor": round(best["hf"] / best["floor_mkl"], 2),
                           "tokens_equal_hf": engine_tokens == res["hf"]}
        print("plain:", result["plain"], flush=True)

        # ---- memory on vs off ------------------------------------------------------------------
        CPU_TIMES.clear()
        times, res = alternate(args.repeats, on=lambda: memgen.generate(short, params, use_tqdm=False),
                               off=lambda: plain.generate(short, params, use_tqdm=False))
        best = best_of(times)
        insertions = sum(o.metrics["num_insertions"] for o in res["on"])
        rows_on, rows_off = [], []
        steps_on, steps_off = count_steps(memgen, short, params, rows_on), count_steps(plain, short, params, rows_off)
        # MemGen's cost beside its rows: each run against the linear layers at its own forwards' rows
        floors_on, floors_off = [], []
        for _ in range(max(args.repeats, 3)):   # alternated, best of: other jobs on the machine swing them
            floors_on.append(rows_floor(memgen, rows_on))
            floors_off.append(rows_floor(plain, rows_off))
        floor_on, floor_off = min(floors_on), min(floors_off)
        result["memory"] = {"times_s": times, "cpu_s": dict(CPU_TIMES), "on_vs_off": round(best["on"] / best["off"], 2),
                            "on_vs_off_cpu": cpu_ratio("on", "off"),
                            "insertions": insertions, "steps_on": steps_on, "steps_off": steps_off,
                            "extra_steps_per_insertion": round((steps_on - steps_off) / max(insertions, 1), 2),
                            "rows_on": sum(rows_on), "rows_off": sum(rows_off),
                            "linear_floor_on_s": round(floor_on, 3), "linear_floor_off_s": round(floor_off, 3),
                            "floor_on_vs_off": round(floor_on / floor_off, 2),
                            "on_vs_its_linear_floor": round(best["on"] / floor_on, 2),
                            "off_vs_its_linear_floor": round(best["off"] / floor_off, 2),
                            "pools": [p.name for p in memgen.engine.pools]}
        print("memory:", result["memory"], flush=True)

        # ---- MemGen engine vs the reference's semantics -------------------------------------------
        if not args.skip_reference:
            ref = HFMemGenModel.from_checkpoint(load_checkpoint(ckpt_dir), model_dir, dtype=torch.float32)
            result["reference"] = {}
            for name, prompts in (("short", short), ("long", prompts_of(tok, BATCH, 45))):
                width = max(map(len, prompts))
                ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
                mask = (ids != pad).long() if pad not in sum(prompts, []) else \
                    (torch.arange(width)[None, :] >= torch.tensor([width - len(p) for p in prompts])[:, None]).long()

                def run_ref(ids=ids, mask=mask):
                    with torch.inference_mode():
                        return ref.generate(ids, mask, max_new_tokens=args.tokens)

                CPU_TIMES.clear()
                times, res = alternate(args.repeats, engine=lambda p=prompts: memgen.generate(p, params, use_tqdm=False),
                                       reference=run_ref)
                best = best_of(times)
                out, aug = res["reference"]
                same = all(o.token_ids == out[b, width:].tolist() and o.augmentation == aug[b].tolist()
                           for b, o in enumerate(res["engine"]))
                result["reference"][name] = {"prompt_tokens": [min(map(len, prompts)), max(map(len, prompts))],
                                             "times_s": times, "engine_vs_reference": round(
                                                 best["reference"] / best["engine"], 2),
                                             "engine_vs_reference_cpu": cpu_ratio("reference", "engine"),
                                             "tokens_and_masks_equal": same}
                print(f"reference ({name}):", result["reference"][name], flush=True)
    result["machine"]["load_average"] = {"start": load_start, "end": os.getloadavg()}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
