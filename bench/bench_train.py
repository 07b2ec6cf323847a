"""Training speed: the fast forward (memgen.hf.fast_forward) against the
step-by-step forward it replaces, on issue 24's shape: a random Qwen2-shaped
reasoner (hidden 256, 4 layers, 4 heads / 2 KV, the tests' 320-token BPE),
MemGen K=8 prompt and inference latents, budget 5, trigger active (every role
on the reasoner), float32, one thread.

    python bench/bench_train.py [--repeats 3] [--sections sft,grpo,step,conv,memory]

Sections (each alternates its variants A, B, A, B, ... and keeps the best):
  sft:    a weaver SFT step, batch 4 (rows of ~300 tokens, 5+ delimiters in
          each completion): forward, backward and the optimizer step
          (memgen.train.sft.accumulate_step with forward "step" / "fast");
  grpo:   GRPO loss + backward of one group (8 engine rollouts of one prompt
          at temperature 1, up to --completion tokens), weaver and trigger
          (memgen.train.grpo.policy_loss_backward, forward "step" / "fast");
  step:   a whole weaver GRPO step: rollouts, loss + backward, optimizer step;
          the reference's rollouts are stood in for by memgen.hf.generate (the
          reference's generation loop written out, spec §2.2), memgen's are
          the engine's. Twice: rollouts stopping at their EOS (each sampler as it
          behaves: memgen.hf.generate, like the reference, runs the batch until
          every row has stopped; the samples differ between the two samplers),
          and every rollout run to full length (EOS ignored on both sides: the
          same number of tokens generated and trained);
  conv:   a conversational SFT step on one 6-turn row (TriviaQA's settings:
          max_prompt_aug_num 8, max_inference_aug_num 0; spec §3.2);
  memory: peak resident memory of one SFT step above the size before it,
          each variant in its own process: "step" (memgen's step-by-step
          path: each forward back-propagated at once), "reference" (the
          reference's Trainer: the whole batch's step-by-step graph, then one
          backward), "fast" (the whole batch's fast graph, one backward).
The step-by-step path is the baseline: it is the reference's algorithm and
ran within 1.1x of the reference's own code (issue 24). Times are wall and
process CPU seconds; ratios are best-of baseline / best-of fast, on the CPU
times too (less disturbed by other jobs on a shared machine). The load
average is recorded before and after. JSON: bench/results/train_cpu.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))   # the offline model builders (fixtures.py, memgen_fixtures.py)

SHAPE = dict(hidden_size=256, num_layers=4, max_position_embeddings=2048)
LATENTS, BUDGET = 8, 5
SENTENCES = ["We add the numbers, then we check the result.", "The quick brown fox jumps over the lazy dog.",
             "Finally, we write it down; the total is the sum of the parts.",
             "Question: what is 12 plus 30? Answer: 42."]


def build(root: Path) -> tuple[Path, Path]:
    import fixtures
    import memgen_fixtures

    tok = fixtures.build_tokenizer()
    reasoner = fixtures.build_tiny_model(root / "reasoner", tok, delimiter_factor=1.6, **SHAPE)
    ckpt = memgen_fixtures.build_memgen_checkpoint(root / "memgen", tok, reasoner, prompt_latents_len=LATENTS,
                                                   inference_latents_len=LATENTS, max_inference_aug_num=BUDGET,
                                                   trigger_active=True)
    return reasoner, ckpt


def load(reasoner: Path, ckpt: Path):
    from memgen.hf import HFMemGenModel

    return HFMemGenModel.from_checkpoint(ckpt, reasoner, dtype=torch.float32)


def sft_rows(tok, n: int = 4, sentences: int = 6) -> list[tuple[list[int], list[int]]]:
    from memgen.train import ChatExample, encode_example

    rows = []
    for i in range(n):
        prompt = [{"role": "user", "content": f"Solve problem {i}. " + " ".join(SENTENCES[(i + j) % 4]
                                                                              for j in range(3))}]
        answer = " ".join(SENTENCES[(i * 3 + j) % 4] for j in range(sentences)) + f" The answer is \\boxed{{{i}}}."
        e = encode_example(tok, ChatExample(prompt, answer))
        rows.append((e.input_ids, e.labels))
    return rows


def conversation_rows(tok, turns: int = 6) -> list[tuple[list[int], list[int]]]:
    """One AgentBank/TriviaQA-style conversation (system prompt, user and
    observation turns, assistant turns with <think>/<search>/<answer>), as the
    single-turn forwards memgen.train's conversational SFT runs (spec §3.2):
    one per assistant turn, over the conversation up to that turn's end,
    labels on that turn."""
    messages = [{"role": "system", "content": "Answer the question. Think in <think></think>, search with "
                                              "<search></search>, answer in <answer></answer>."},
                {"role": "user", "content": "Question: who wrote the quick brown fox sentence?"}]
    for t in range(turns):
        last = t == turns - 1
        act = "<answer>42</answer>" if last else f"<search>{SENTENCES[t % 4]}</search>"
        messages.append({"role": "assistant", "content": f"<think>{SENTENCES[(t + 1) % 4]} "
                                                         f"{SENTENCES[(t + 2) % 4]}</think>\n{act}"})
        if not last:
            messages.append({"role": "user", "content": f"<information>{SENTENCES[(t + 3) % 4]} "
                                                        f"{SENTENCES[t % 4]}</information>"})

    import random

    from memgen.train import encode_example, parse_chat_example
    from memgen.train.conversation import row_segments

    example = encode_example(tok, parse_chat_example({"messages": messages}))
    return [(seg.input_ids, seg.labels) for seg in row_segments(example, 8, random.Random(0))]


# ----------------------------------------------------------------- the steps
def segments_of(rows):
    from memgen.train.conversation import Segment

    return [Segment(list(ids), list(labels)) for ids, labels in rows]


def reference_loss_backward(model, segments, scale: float) -> float:
    """The reference's Trainer: the whole batch's step-by-step graph, then one
    backward (memgen's step path back-propagates each forward at once)."""
    ce = sum(torch.nn.functional.cross_entropy(model.sft_forward(torch.tensor(s.input_ids),
                                                                 torch.tensor(s.labels)).logits[:-1],
                                               torch.tensor(s.labels[1:]), ignore_index=-100, reduction="sum")
             for s in segments)
    (ce / scale).backward()
    return float(ce.detach())


class Trainer:
    """A weaver (or trigger) optimizer over `model` (AdamW, clipping at 1.0, as memgen.train)."""

    def __init__(self, model, role: str = "weaver"):
        from memgen.train.common import freeze_for, make_optimizer, make_scheduler

        self.model = model
        self.params = freeze_for(model, role)
        self.optimizer = make_optimizer(list(self.params.values()), 1e-5)
        self.scheduler = make_scheduler(self.optimizer, "constant", 10 ** 6, 0.0)
        model.train()

    def sft_step(self, segments, variant: str) -> float:
        """variant: "step" / "fast" (memgen.train.sft.accumulate_step's forwards),
        "reference" (reference_loss_backward)."""
        from memgen.train.common import clip_and_step
        from memgen.train.sft import accumulate_step

        if variant == "reference":
            n = sum(s.num_supervised for s in segments)
            loss = reference_loss_backward(self.model, segments, n) / n
        else:
            loss, _ = accumulate_step(self.model, [segments], forward=variant)
        clip_and_step(self.params.values(), self.optimizer, self.scheduler, 1.0)
        return loss

    def grpo_loss(self, rollouts, advantages, variant: str, role: str = "weaver") -> float:
        """memgen.train.grpo's loss + backward (bnpo, num_iterations 1) with the given forward."""
        from memgen.train.data import ASSISTANT_HEADER
        from memgen.train.grpo import GRPOConfig, policy_loss_backward, policy_rows

        config = GRPOConfig(role=role, forward=variant, max_completion_length=512)
        header = self.model.tokenizer(ASSISTANT_HEADER, add_special_tokens=False)["input_ids"]
        rows = policy_rows(self.model, rollouts, config, header)
        return policy_loss_backward(self.model, rows, torch.tensor(advantages, dtype=torch.float64), config)


# ----------------------------------------------------------------- timing
def timed(fn):
    start, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - start, time.process_time() - cpu


def alternate(repeats: int, fns: dict) -> dict:
    """{name: {"wall": [...], "cpu": [...]}}, the functions run in turn `repeats` times."""
    out = {k: {"wall": [], "cpu": []} for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            wall, cpu = timed(fn)
            out[name]["wall"].append(round(wall, 4))
            out[name]["cpu"].append(round(cpu, 4))
    return out


def ratios(times: dict, base: str, other: str) -> dict:
    return {"wall": round(min(times[base]["wall"]) / min(times[other]["wall"]), 2),
            "cpu": round(min(times[base]["cpu"]) / min(times[other]["cpu"]), 2)}


def section(name: str, times: dict, pairs: list[tuple[str, str]], extra: dict | None = None) -> dict:
    res = {"times_s": times, "best_wall_s": {k: min(v["wall"]) for k, v in times.items()},
           "best_cpu_s": {k: min(v["cpu"]) for k, v in times.items()},
           "ratios": {f"{a}/{b}": ratios(times, a, b) for a, b in pairs}, "load_average": os.getloadavg(),
           **(extra or {})}
    print(f"{name}: best wall {res['best_wall_s']}, ratios {res['ratios']}, load {res['load_average']}", flush=True)
    return res


# ----------------------------------------------------------------- sections
def time_sft(model, segments, repeats) -> dict:
    """SFT steps on `segments` with the step-by-step and the fast forward, alternated (after a warm-up)."""
    trainer = Trainer(model)
    for v in ("step", "fast"):
        trainer.sft_step(segments, v)
    return alternate(repeats, {v: (lambda v=v: trainer.sft_step(segments, v)) for v in ("step", "fast")})


def run_sft(reasoner, ckpt, repeats) -> dict:
    model = load(reasoner, ckpt)
    segments = segments_of(sft_rows(model.tokenizer))
    return section("sft", time_sft(model, segments, repeats), [("step", "fast")],
                   {"row_tokens": [len(s.input_ids) for s in segments]})


def conv_model(reasoner, ckpt):
    import dataclasses

    model = load(reasoner, ckpt)
    model.settings = dataclasses.replace(model.settings, max_prompt_aug_num=8, max_inference_aug_num=0)
    return model


def run_conv(reasoner, ckpt, repeats) -> dict:
    model = conv_model(reasoner, ckpt)
    segments = segments_of(conversation_rows(model.tokenizer))
    return section("conv", time_sft(model, segments, repeats), [("step", "fast")],
                   {"turns": len(segments), "conversation_tokens": len(segments[-1].input_ids),
                    "forward_tokens_step_by_step": sum(len(s.input_ids) for s in segments)})


def engine_of(reasoner, ckpt, model, completion: int, seed: int = 0):
    """(the group's prompt, a function sampling its 8 rollouts with the engine;
    full_length=True: every rollout generates `completion` tokens, EOS ignored)."""
    from memgen import LLM, SamplingParams
    from memgen.train.data import encode_prompt
    from memgen.train.rollout import Rollout, sample_groups

    record = json.loads((ROOT / "bench" / "data" / "arith50.jsonl").read_text().splitlines()[0])
    prompt = encode_prompt(model.tokenizer, record)
    llm = LLM(str(reasoner), memgen=str(ckpt), dtype="float32", device="cpu", max_model_len=2048)

    def sample(trigger: bool = False, full_length: bool = False):
        if not full_length:
            return sample_groups(llm, [prompt], 8, completion, 1.0, seed=seed, trigger_sample=trigger)
        params = [SamplingParams(max_tokens=completion, temperature=1.0, seed=seed + j, ignore_eos=True)
                  for j in range(8)]
        outs = llm.generate([prompt] * 8, params, use_tqdm=False)
        return [Rollout(0, prompt, list(o.token_ids), list(o.augmentation), o.text, o.finish_reason) for o in outs]

    return prompt, sample


class _NoEos:
    """A tokenizer whose EOS is never generated: memgen.hf.generate then runs
    every row to max_new_tokens (the engine's ignore_eos)."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self.eos_token_id = len(tokenizer) + 1000

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


def hf_rollouts(model, prompt, completion: int, seed: int = 0, full_length: bool = False):
    """The reference's generation loop (memgen.hf.generate) on the same group:
    8 copies of the prompt, reasoner sampling at 1.0, trigger argmax."""
    torch.manual_seed(seed)
    ids = torch.tensor([prompt] * 8)
    tokenizer = model.tokenizer
    if full_length:
        model.tokenizer = _NoEos(tokenizer)
    try:
        out, _ = model.generate(ids, torch.ones_like(ids), completion, temperature=1.0, weaver_do_sample=True,
                                trigger_do_sample=False)
    finally:
        model.tokenizer = tokenizer
    return out[:, len(prompt):]


def advantages_of(rollouts) -> list[float]:
    from memgen.train.grpo import group_advantages

    rewards = torch.tensor([len(r.completion_ids) % 3 for r in rollouts], dtype=torch.float64)
    adv = group_advantages(rewards, len(rollouts)).tolist()
    return adv if any(adv) else [float(i % 2) - 0.5 for i in range(len(rollouts))]


def run_grpo(reasoner, ckpt, repeats, completion) -> dict:
    """Weaver GRPO's loss + backward on one group, and trigger GRPO's."""
    model = load(reasoner, ckpt)
    prompt, engine = engine_of(reasoner, ckpt, model, completion)
    out = {}
    for role in ("weaver", "trigger"):
        trainer = Trainer(model, role)
        rollouts = engine(trigger=role == "trigger")
        adv = advantages_of(rollouts)

        def run(v):
            trainer.grpo_loss(rollouts, adv, v, role)
            model.zero_grad(set_to_none=True)

        for v in ("step", "fast"):
            run(v)
        times = alternate(repeats, {v: (lambda v=v: run(v)) for v in ("step", "fast")})
        out[role] = section(f"grpo {role}", times, [("step", "fast")],
                            {"prompt_tokens": len(prompt),
                             "completion_tokens": [len(r.completion_ids) for r in rollouts],
                             "insertions": [r.num_insertions for r in rollouts],
                             "decisions": [r.num_decisions for r in rollouts]})
    return out


def run_step(reasoner, ckpt, repeats, completion, full_length: bool = True) -> dict:
    """A whole weaver GRPO step, three ways: the reference's algorithm (its
    generation loop, step-by-step loss), memgen before (engine rollouts,
    step-by-step loss), memgen now (engine rollouts, fast loss). full_length:
    every rollout runs to `completion` tokens (EOS ignored on both sides), so
    the three generate and train the same number of tokens; otherwise each
    stops at its EOS (and the sampled lengths differ between the two samplers)."""
    from memgen.train.common import clip_and_step
    from memgen.train.rollout import Rollout

    model = load(reasoner, ckpt)
    trainer = Trainer(model)
    prompt, engine = engine_of(reasoner, ckpt, model, completion)
    eos = model.tokenizer.eos_token_id
    lengths, phases = {}, {}

    def step(rollout_kind: str, loss_kind: str):
        start = time.process_time()
        if rollout_kind == "hf":
            model.eval()
            out = hf_rollouts(model, prompt, completion, full_length=full_length).tolist()
            model.train()
            comps = [c[:c.index(eos) + 1] if eos in c and not full_length else c for c in out]
            rollouts = [Rollout(0, prompt, c, [], "", "") for c in comps]
        else:
            rollouts = engine(full_length=full_length)
        middle = time.process_time()
        lengths[rollout_kind] = [len(r.completion_ids) for r in rollouts]
        trainer.grpo_loss(rollouts, advantages_of(rollouts), loss_kind)
        clip_and_step(trainer.params.values(), trainer.optimizer, trainer.scheduler, 1.0)
        phases.setdefault(f"{rollout_kind}+{loss_kind}", []).append(
            {"rollout_cpu_s": round(middle - start, 3), "loss_cpu_s": round(time.process_time() - middle, 3)})

    variants = {"reference": ("hf", "step"), "memgen_step": ("engine", "step"), "memgen_fast": ("engine", "fast")}
    for v in variants.values():
        step(*v)
    times = alternate(repeats, {k: (lambda v=v: step(*v)) for k, v in variants.items()})
    return section("step, full length" if full_length else "step, stop at EOS", times,
                   [("reference", "memgen_fast"), ("reference", "memgen_step"), ("memgen_step", "memgen_fast")],
                   {"completion_tokens": lengths, "phases_cpu_s": phases, "full_length": full_length})


def memory_probe(reasoner, ckpt, variant: str, kind: str) -> dict:
    """Peak RSS of one SFT step (the process's first) above the RSS before it."""
    import gc

    model = conv_model(reasoner, ckpt) if kind == "conv" else load(reasoner, ckpt)
    segments = segments_of(conversation_rows(model.tokenizer) if kind == "conv" else sft_rows(model.tokenizer))
    trainer = Trainer(model)
    gc.collect()

    def status(key):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) * 1024
        raise KeyError(key)

    Path("/proc/self/clear_refs").write_text("5")     # reset the peak (VmHWM) to the current RSS
    resting = status("VmRSS:")
    trainer.sft_step(segments, variant)
    return {"resting_mb": round(resting / 2 ** 20, 1),
            "peak_above_resting_mb": round((status("VmHWM:") - resting) / 2 ** 20, 1)}


def run_memory(reasoner, ckpt, repeats, kind="sft") -> dict:
    out = {}
    for variant in ("step", "reference", "fast"):
        runs = []
        for _ in range(repeats):
            p = subprocess.run([sys.executable, __file__, "--probe", f"{kind}:{variant}", "--assets",
                                f"{reasoner}:{ckpt}"], capture_output=True, text=True, check=True)
            runs.append(json.loads(p.stdout.strip().splitlines()[-1]))
        out[variant] = {"runs": runs, "peak_above_resting_mb": min(r["peak_above_resting_mb"] for r in runs)}
    print(f"memory ({kind}):", {k: v["peak_above_resting_mb"] for k, v in out.items()}, flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sections", default="sft,grpo,step,conv,memory")
    ap.add_argument("--completion", type=int, default=512,
                    help="GRPO rollouts' max completion tokens (512: the released weaver GRPO configs)")
    ap.add_argument("--step-completion", type=int, default=None,
                    help="the whole step's completion tokens (default: --completion)")
    ap.add_argument("--step-rollouts", default="both", choices=["eos", "full", "both"],
                    help="whole step: rollouts stop at their EOS (as each sampler does), run to full length "
                         "(EOS ignored: both sides generate and train the same tokens), or both")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--probe", help=argparse.SUPPRESS)
    ap.add_argument("--assets", help=argparse.SUPPRESS)
    ap.add_argument("-o", "--output", type=Path, default=ROOT / "bench" / "results" / "train_cpu.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.probe:
        kind, variant = args.probe.split(":")
        reasoner, ckpt = map(Path, args.assets.split(":"))
        print(json.dumps(memory_probe(reasoner, ckpt, variant, kind)))
        return 0

    import subprocess as sp

    sha = sp.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    import peft
    import transformers

    result = {"benchmark": "bench_train", "machine": {
        "platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
        "transformers": transformers.__version__, "peft": peft.__version__, "threads": args.threads,
        "git": sha, "load_average_start": os.getloadavg()},
        "config": {**SHAPE, "latents": LATENTS, "budget": BUDGET, "trigger_active": True, "dtype": "float32",
                   "repeats": args.repeats, "completion": args.completion}}
    sections = args.sections.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        reasoner, ckpt = build(Path(tmp))
        if "sft" in sections:
            result["sft"] = run_sft(reasoner, ckpt, args.repeats)
        if "grpo" in sections:
            result["grpo"] = run_grpo(reasoner, ckpt, args.repeats, args.completion)
        if "step" in sections:
            for kind in (["eos", "full"] if args.step_rollouts == "both" else [args.step_rollouts]):
                result[f"step_{kind}"] = run_step(reasoner, ckpt, args.repeats, args.step_completion or args.completion,
                                                  full_length=kind == "full")
        if "conv" in sections:
            result["conv"] = run_conv(reasoner, ckpt, args.repeats)
        if "memory" in sections:
            result["memory"] = {"sft": run_memory(reasoner, ckpt, args.repeats),
                                "conv": run_memory(reasoner, ckpt, args.repeats, "conv")}
    result["machine"]["load_average_end"] = os.getloadavg()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
