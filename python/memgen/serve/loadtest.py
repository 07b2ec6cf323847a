"""`memgen serve` under load: N concurrent streaming clients (the official
`openai` client) against a real server process, beside offline `LLM.generate`
on the same prompts with the same settings. `memgen bench --mode serve` and
bench/bench_serve.py run it.

    memgen bench --mode serve [--model M] [--memgen C] [--batch-sizes 1 8 32] [--max-tokens 64]
    python bench/bench_serve.py [--model M] [--memgen C] [--concurrency 1 8 32]
                                [--num-prompts 32] [--max-tokens 64] [--dtype auto] [--device auto]
    python bench/bench_serve.py --tiny      # the tests' tiny random model: the server's own overhead

Each concurrency level is a closed loop: N clients, each sending its next
request (chat, greedy, `ignore_eos`, so every request makes exactly
--max-tokens tokens) when its previous one ends. Per request: TTFT (send to the
first token's chunk), TPOT ((last - first) / (tokens - 1)); per level: output
tokens / wall time. Offline: one `generate()` of every prompt, after the server
is gone (the two never share the machine or the accelerator). Greedy texts are
compared with the offline ones (reported, not asserted: float32/bfloat16
batches of other shapes may round differently).

Writes <output-dir>/serve_<device>.json (machine, config, per-request
timings, summaries) and serve_<device>.png.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from memgen.serve.processes import free_port, stop, wait_until_answers

NAME = "bench"


def _args(argv=None):
    p = argparse.ArgumentParser(prog="bench_serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="reasoner (default: the packaged SmolLM2-135M-Instruct)")
    p.add_argument("--tiny", action="store_true",
                   help="use the tests' tiny random Qwen2 (hidden 64, 2 layers, built in a temp dir): a step costs "
                        "about a millisecond, so the numbers show the server's own per-token overhead")
    p.add_argument("--threads", type=int, default=None,
                   help="OMP_NUM_THREADS / torch threads for the server and the offline run (default: as set)")
    p.add_argument("--memgen", default=None, help="MemGen checkpoint (default: plain LLM)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="LLM(...) keyword for both the server and the offline run (repeatable)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32], help="concurrent clients per level")
    p.add_argument("--num-prompts", type=int, default=32, help="requests per level (arithmetic questions)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--output-dir", default="memgen-bench-results")
    p.add_argument("--startup-timeout", type=float, default=600)
    return p.parse_args(argv)


def _prompts(n: int) -> list[list[dict]]:
    """Short arithmetic questions, one user turn each (the same every run)."""
    return [[{"role": "user", "content": f"What is {17 * i % 89 + 3} + {29 * i % 97 + 5}? "
                                         "Put the answer in \\boxed{}."}] for i in range(n)]


def _engine_kwargs(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _start_server(args, port: int, log_path: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "memgen.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--served-model-name", NAME, "--dtype", args.dtype, "--device", args.device, "--log-level", "warning",
           "--max-waiting", "0"]
    if args.model:
        cmd += ["--model", args.model]
    if args.memgen:
        cmd += ["--memgen", args.memgen]
    for item in args.engine_arg:
        cmd += ["--engine-arg", item]
    with open(log_path, "wb") as log:   # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
    try:
        wait_until_answers(proc, f"http://127.0.0.1:{port}/health", args.startup_timeout, interval_s=0.5)
    except RuntimeError as err:
        stop(proc, 10)
        raise SystemExit(f"memgen serve {err}; see {log_path}") from None
    return proc


async def _run_level(base: str, prompts, max_tokens: int, concurrency: int) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=3600)
    queue = list(enumerate(prompts))
    results: list[dict] = [None] * len(prompts)

    async def one(index: int, messages) -> dict:
        start = time.perf_counter()
        first = last = None
        text, num_tokens = "", 0
        stream = await client.chat.completions.create(
            model=NAME, messages=messages, max_tokens=max_tokens, temperature=0, stream=True,
            extra_body={"ignore_eos": True, "return_token_ids": True})
        async for chunk in stream:
            for c in chunk.choices:
                n = len((c.model_extra or {}).get("token_ids", []))
                if n:
                    now = time.perf_counter()
                    first = first if first is not None else now
                    last = now
                    num_tokens += n
                text += c.delta.content or ""
        return dict(index=index, ttft_s=first - start, tpot_s=(last - first) / (num_tokens - 1)
                    if num_tokens > 1 else None, latency_s=time.perf_counter() - start, num_tokens=num_tokens,
                    text=text)

    async def worker():
        while queue:
            index, messages = queue.pop(0)
            results[index] = await one(index, messages)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    await client.close()
    tokens = sum(r["num_tokens"] for r in results)
    return dict(concurrency=concurrency, wall_s=wall, output_tokens=tokens, throughput_tok_s=tokens / wall,
                ttft_s=_summary([r["ttft_s"] for r in results]),
                tpot_s=_summary([r["tpot_s"] for r in results if r["tpot_s"] is not None]), requests=results)


def _summary(values: list[float]) -> dict:
    if not values:
        return {}
    v = sorted(values)

    def pick(q: float) -> float:
        return v[min(len(v) - 1, int(q * len(v)))]

    return dict(mean=statistics.fmean(v), p50=pick(0.5), p90=pick(0.9), p99=pick(0.99), max=v[-1])


def _offline(args, prompts) -> tuple[dict, list[str], str]:
    from memgen import LLM, SamplingParams

    llm = LLM(model=args.model, memgen=args.memgen, dtype=args.dtype, device=args.device,
              **_engine_kwargs(args.engine_arg))
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    llm.chat(prompts[:2], params, use_tqdm=False)   # warm-up (first-call costs, CUDA graphs)
    start = time.perf_counter()
    outs = llm.chat(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - start
    tokens = sum(len(o.token_ids) for o in outs)
    return dict(wall_s=wall, output_tokens=tokens, throughput_tok_s=tokens / wall,
                ttft_s=_summary([o.metrics["time_to_first_token_s"] for o in outs])), \
        [o.text for o in outs], str(llm.device)


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = result["serve"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    names = [f"serve x{lv['concurrency']}" for lv in levels] + ["offline"]
    a.bar(names, [lv["throughput_tok_s"] for lv in levels] + [result["offline"]["throughput_tok_s"]])
    a.set_ylabel("output tokens / s")
    a.set_title("throughput")
    xs = [lv["concurrency"] for lv in levels]
    b.plot(xs, [lv["ttft_s"]["p50"] * 1e3 for lv in levels], "o-", label="TTFT p50")
    b.plot(xs, [lv["tpot_s"].get("p50", 0) * 1e3 for lv in levels], "s-", label="TPOT p50")
    b.set_xscale("log", base=2)
    b.set_xlabel("concurrent clients")
    b.set_ylabel("ms")
    b.legend()
    b.set_title("latency")
    fig.suptitle(f"memgen serve vs offline ({result['config']['model'] or 'SmolLM2-135M'}, "
                 f"{result['config']['max_tokens']} tokens/request)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _build_tiny(directory: str) -> str:
    tests = Path(__file__).resolve().parents[3] / "tests"   # a source checkout's tests/fixtures.py
    if not (tests / "fixtures.py").is_file():
        raise SystemExit("--tiny needs a source checkout (it builds the tests' tiny model from tests/fixtures.py)")
    sys.path.insert(0, str(tests))
    import fixtures

    tokenizer = fixtures.build_tokenizer(Path(directory) / "tokenizer")
    return str(fixtures.build_tiny_model(Path(directory) / "tiny-qwen2", tokenizer,
                                         max_position_embeddings=2048))


def main(argv=None) -> int:
    args = _args(argv)
    if args.threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        import torch

        torch.set_num_threads(args.threads)
    if args.tiny:
        import tempfile

        if args.model or args.memgen:
            raise SystemExit("--tiny replaces --model / --memgen")
        tmp = tempfile.TemporaryDirectory()
        args.model = _build_tiny(tmp.name)
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    prompts = _prompts(args.num_prompts)
    port = free_port()
    log_path = out_dir / "serve_server.log"
    load_before = os.getloadavg()
    proc = _start_server(args, port, log_path)
    try:
        base = f"http://127.0.0.1:{port}"
        asyncio.run(_run_level(base, prompts[:2], args.max_tokens, 2))     # warm-up
        levels = []
        for c in args.concurrency:
            level = asyncio.run(_run_level(base, prompts, args.max_tokens, c))
            print(f"serve x{c:>3}: {level['throughput_tok_s']:8.1f} tok/s, TTFT p50 "
                  f"{level['ttft_s']['p50'] * 1e3:7.1f} ms, TPOT p50 {level['tpot_s'].get('p50', 0) * 1e3:6.1f} ms")
            levels.append(level)
    finally:
        stop(proc, 30)
    log_path.unlink(missing_ok=True)
    offline, texts, device = _offline(args, prompts)
    print(f"offline    : {offline['throughput_tok_s']:8.1f} tok/s (one generate() of {len(prompts)} prompts)")
    for level in levels:
        level["same_text_as_offline"] = sum(r["text"] == t for r, t in zip(level["requests"], texts))
    result = dict(
        machine=dict(platform=platform.platform(), python=platform.python_version(), cpus=os.cpu_count(),
                     load_before=load_before, load_after=os.getloadavg(), device=device),
        config=dict(model="tests' tiny qwen2 (--tiny)" if args.tiny else args.model, threads=args.threads,
                    memgen=args.memgen, dtype=args.dtype, engine_args=args.engine_arg,
                    num_prompts=len(prompts), max_tokens=args.max_tokens, concurrency=args.concurrency,
                    prompts="arithmetic questions (memgen.serve.loadtest._prompts)", greedy=True, ignore_eos=True),
        serve=levels, offline=offline,
        serve_vs_offline_throughput={str(lv["concurrency"]): lv["throughput_tok_s"] / offline["throughput_tok_s"]
                                     for lv in levels})
    tag = device.split(":")[0] + ("_tiny" if args.tiny else "")
    path = out_dir / f"serve_{tag}.json"
    path.write_text(json.dumps(result, indent=1))
    _plot(result, out_dir / f"serve_{tag}.png")
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
