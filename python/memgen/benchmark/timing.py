"""Timed runs: step `llm.engine` ourselves so that every generated token gets a
timestamp (true inter-token latencies), then reduce a run to vLLM-style metrics.

Lengths shorter than a run's `max_tokens` are read off the same run: with greedy
decoding and `ignore_eos` the first L tokens of an N-token run are produced by
exactly the same steps as an L-token run, so "latency at L" is the time of token
L-1. The JSON says so (`config.shorter_lengths`).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

from memgen.outputs import NOT_CONSULTED, OutputBuilder

QUESTIONS = [  # GSM8K-style, different lengths, as MemGen is evaluated on math word problems
    "What is 12 plus 30?",
    "A baker makes 24 muffins and sells 15. How many are left?",
    "Tom has 3 boxes with 8 pencils each. He gives away 5 pencils. How many pencils does he have now?",
    "Solve step by step: a train travels 60 km per hour for 2.5 hours. How far does it go?",
    "Explain the water cycle to a curious student.",
    "Sara reads 20 pages a day. Her book has 340 pages. After 9 days, how many pages are left to read?",
    "If a shirt costs $25 and is on sale for 20% off, what is the sale price? Show your reasoning.",
    "Write three short facts about volcanoes.",
    "A rectangle is 7 cm wide and 12 cm long. What are its area and its perimeter?",
    "How many minutes are there in a week? Explain the calculation, and put the answer in a box.",
    "Lisa saves $15 every week. How many weeks does she need to buy a bike that costs $240?",
    "Why is the sky blue?",
    "A farmer has 17 sheep, 9 cows and twice as many chickens as cows. How many animals in total?",
    "Describe how a compiler turns source code into a program, step by step.",
    "What is the sum of the first ten odd numbers?",
    "Three friends share 45 stickers equally, then each buys 4 more. How many stickers does each have?",
]


# words a long prompt's context is cut from (--prompt-tokens)
CONTEXT_WORDS = ("We add the numbers, then we check the result. The quick brown fox jumps over the lazy dog. "
                 "Each step is written down, and the answer is checked against the question.").split()


def make_prompts(tokenizer, n: int, min_tokens: int = 0) -> list[list[int]]:
    """n chat-formatted prompts (one user turn each) as token ids; the list of
    questions is cycled with a suffix so that no two prompts are identical. With
    `min_tokens`, each question follows a context passage long enough that the
    prompt has at least that many tokens (GSM8K-like lengths)."""
    def encode(content: str) -> list[int]:
        msgs = [{"role": "user", "content": content}]
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
            return list(tokenizer(text, add_special_tokens=False)["input_ids"])
        return list(tokenizer(content)["input_ids"])

    prompts = []
    for i in range(n):
        q = QUESTIONS[i % len(QUESTIONS)] + (f" (variant {i // len(QUESTIONS)})" if i >= len(QUESTIONS) else "")
        ids, words = encode(q), 0
        while len(ids) < min_tokens:
            words += 8
            context = " ".join((CONTEXT_WORDS * (1 + words // len(CONTEXT_WORDS)))[i % 5: i % 5 + words])
            ids = encode(f"Context: {context}\nQuestion: {q}")
        prompts.append(ids)
    return prompts


@dataclass
class RequestTiming:
    """One request of a timed run; times are seconds from the run's start."""
    token_times_s: list[float]
    token_ids: list[int]
    augmentation: list[int]
    engine_metrics: dict

    def to_json(self) -> dict:
        return {"token_times_s": [round(t, 6) for t in self.token_times_s], "augmentation": self.augmentation,
                "num_output_tokens": len(self.token_ids), "engine_metrics": self.engine_metrics}


@dataclass
class TimedRun:
    wall_s: float
    requests: list[RequestTiming] = field(default_factory=list)
    cpu_s: float = float("nan")     # this process's CPU time: less sensitive to a busy machine than wall time
    steps: int = 0                  # engine steps the run took

    def to_json(self) -> dict:
        return {"wall_s": round(self.wall_s, 6), "cpu_s": round(self.cpu_s, 6), "steps": self.steps,
                "requests": [r.to_json() for r in self.requests]}


def timed_generate(llm, prompts: list[list[int]], params) -> TimedRun:
    """`llm.generate(prompts, params)` with a timestamp per generated token: the
    same requests, the same engine steps, stepped here (LLM.generate's loop), their
    outputs built by the same OutputBuilder."""
    engine, builder = llm.engine, OutputBuilder(llm.tokenizer)
    if engine.has_unfinished():
        raise RuntimeError("the engine still has unfinished requests; a timed run needs it idle")
    cpu_start, start = time.process_time(), time.perf_counter()
    rids = [builder.add(engine.add_request(ids, params), ids, params) for ids in prompts]
    times: dict[int, list[float]] = {rid: [] for rid in rids}
    steps = 0
    while engine.has_unfinished():
        outputs = engine.step()
        steps += 1
        now = time.perf_counter() - start
        builder.update(outputs)
        for o in outputs:
            times[o.request_id].extend([now] * len(o.new_token_ids))
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    outs = [builder.request_output([rid]) for rid in rids]
    times = [times[rid] for rid in rids]
    return TimedRun(wall, [RequestTiming(t, o.token_ids, o.augmentation, o.metrics) for t, o in zip(times, outs)],
                    cpu, steps)


def fits_budget(elapsed_s: float, next_s: float, budget_s: float | None) -> bool:
    """Whether a run expected to take `next_s` (the last one's time) still ends
    within `budget_s` seconds of the benchmark's start; no budget (None or 0): always."""
    return not budget_s or elapsed_s + next_s <= budget_s


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), q in [0, 100]."""
    if not values:
        return float("nan")
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def memory_counts(aug: list[int], num_prompt_latents: int, num_inference_latents: int) -> dict:
    """Insertions, trigger decisions and latent positions before the tokens of
    this augmentation mask (entry 0 is the prompt decision)."""
    inserted = [i for i, a in enumerate(aug) if a == 1]
    return {"num_insertions": len(inserted),
            "num_trigger_calls": sum(a != NOT_CONSULTED for a in aug),
            "num_latent_positions": sum(num_prompt_latents if i == 0 else num_inference_latents for i in inserted)}


def run_metrics(run: TimedRun, length: int, latents: tuple[int, int] = (0, 0)) -> dict:
    """vLLM-style metrics of one run, over each request's first `length` tokens.
    latency_s: the batch's end-to-end latency (last request's token length-1);
    TTFT/TPOT: medians and means over requests; ITL: pooled over all requests."""
    ttft, e2e, tpot, itl, counts = [], [], [], [], []
    for r in run.requests:
        t = r.token_times_s[:length]
        if len(t) < length:
            raise ValueError(f"a request produced {len(r.token_times_s)} tokens, fewer than {length}: "
                             "timed runs use ignore_eos so that every row reaches max_tokens")
        ttft.append(t[0])
        e2e.append(t[-1])
        if length > 1:
            tpot.append((t[-1] - t[0]) / (length - 1))
            itl.extend(b - a for a, b in zip(t, t[1:]))
        counts.append(memory_counts(r.augmentation[:length], *latents))
    latency = max(e2e)
    n = len(run.requests)
    out = {
        "latency_s": latency,
        "ttft_median_s": statistics.median(ttft), "ttft_mean_s": statistics.fmean(ttft),
        "tpot_median_s": statistics.median(tpot) if tpot else float("nan"),
        "tpot_mean_s": statistics.fmean(tpot) if tpot else float("nan"),
        "itl_p50_s": percentile(itl, 50), "itl_p99_s": percentile(itl, 99),
        "e2e_median_s": statistics.median(e2e),
        "output_tokens_per_s": n * length / latency,
        "output_tokens": n * length,
    }
    if length == len(run.requests[0].token_times_s):   # CPU time is known for the whole run only
        out["cpu_s"] = run.cpu_s
    for key in ("num_insertions", "num_trigger_calls", "num_latent_positions"):
        out[f"{key}_per_request"] = statistics.fmean(c[key] for c in counts)
    return out


def median_metrics(per_iteration: list[dict]) -> dict:
    """The median over iterations of every metric."""
    return {k: statistics.median(m[k] for m in per_iteration) for k in per_iteration[0]}
