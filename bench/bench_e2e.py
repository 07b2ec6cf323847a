"""End-to-end engine benchmarks on a random-weight model of real shapes
(Qwen2.5-1.5B's config, built offline): decode time per output token at batch 1
against the memory-bandwidth floor, and MemGen against the plain LLM.

    python bench/bench_e2e.py                       # Qwen2.5-1.5B shapes, CUDA if present
    python bench/bench_e2e.py --quick               # shorter outputs, one iteration
    python bench/bench_e2e.py --config tiny         # a tiny model: runs on CPU in seconds

Writes bench/results/e2e_<device>.json (e2e_tiny_<device>.json for --config tiny).
Targets (issue, GPU): plain decode time per output token at batch 1 <= 1.3x the
floor = (weight bytes + KV bytes read per step) / measured copy bandwidth; MemGen
time per output token <= 1.1x the plain LLM's (batch 1 and 8). Times per output
token exclude prefill: (time of the last token - time of the first) / (tokens - 1),
from a timestamp per engine step (memgen.benchmark.timing). Anything but CUDA with
the real shapes is a smoke run: its numbers are NOT performance numbers, targets
are not judged, and the output says so.

The model: weights N(0, 0.02) (norms 1), saved as bf16 safetensors to a temporary
directory, with a synthetic byte-level tokenizer of the full vocabulary (151936
ids; every 20th id's text ends with "," "." or a newline, so that MemGen's
trigger has delimiters to react to). Prompts are random token ids. MemGen is
`random_checkpoint` on that base: K=8 prompt and inference latents, budget 5,
trigger active, LoRA r=16 on q/v, every role sharing the reasoner's weights.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

# Qwen2.5-1.5B(-Instruct)'s config.json, minus the fields that do not shape the model.
QWEN25_15B = dict(
    architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=1536, intermediate_size=8960,
    num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
    max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
    hidden_act="silu", attention_dropout=0.0, use_sliding_window=False, sliding_window=32768,
    max_window_layers=21, bos_token_id=151643, eos_token_id=151645, torch_dtype="bfloat16",
)
# The same architecture at toy size, for CPU smoke runs and the test.
TINY = {**QWEN25_15B, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 2048,
        "max_position_embeddings": 2048, "sliding_window": 2048, "max_window_layers": 2,
        "bos_token_id": 1, "eos_token_id": 2}
CONFIGS = {"qwen2.5-1.5b": QWEN25_15B, "tiny": TINY}

FLOOR_TARGET = 1.3       # plain decode time per output token at batch 1 / bandwidth floor
MEMGEN_TARGET = 1.1      # MemGen time per output token / plain LLM's
INIT_STD = 0.02
DELIMITER_EVERY = 20
LATENTS, BUDGET = 8, 5
NOT_PERFORMANCE = ("NOTE: not a performance run ({why}): these timings are NOT performance numbers "
                   "and the targets are not judged.")


# ---- the model ---------------------------------------------------------------------
def build_tokenizer(save_dir: Path, vocab_size: int, delimiter_every: int = DELIMITER_EVERY):
    """A byte-level tokenizer with exactly `vocab_size` ids and no download: ChatML
    specials (pad 0, <|im_start|> 1, eos <|im_end|> 2), the 256 byte symbols, then
    synthetic words; every `delimiter_every`-th id ends with "," "." or a newline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    i = 0
    while len(vocab) < vocab_size:
        word, n = "", i
        while True:                      # bijective base 26: a, b, ..., z, aa, ab, ...
            word = chr(97 + n % 26) + word
            n = n // 26 - 1
            if n < 0:
                break
        word = ("Ġ" if i % 2 else "") + word          # Ġ: a leading space in byte-level BPE
        if len(vocab) % delimiter_every == 0:
            word += ",.Ċ"[(len(vocab) // delimiter_every) % 3]   # Ċ: a newline
        vocab.setdefault(word, len(vocab))
        i += 1
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                     pad_token="<|endoftext|>")
    hf_tok.save_pretrained(str(save_dir))
    return hf_tok


def build_model_dir(save_dir: Path, config: dict, seed: int, device: torch.device) -> dict:
    """config.json + model.safetensors (bf16, random N(0, INIT_STD), norms 1) +
    tokenizer. Tensor names and shapes come from HF's own model built on the meta
    device, so the layout is exactly what HF would save. Returns sizes."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, Qwen2Config

    save_dir.mkdir(parents=True, exist_ok=True)
    hf_config = Qwen2Config(**{k: v for k, v in config.items() if k not in ("architectures", "model_type")})
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(hf_config)
    gen_device = device if device.type == "cuda" else torch.device("cpu")   # randn is fast on a GPU
    g = torch.Generator(gen_device).manual_seed(seed)
    torch.manual_seed(seed)
    tensors = {}
    for name, t in meta.state_dict().items():
        if config["tie_word_embeddings"] and name == "lm_head.weight":
            continue                                       # tied: HF saves the embedding only
        if "norm" in name:
            x = torch.ones(t.shape, dtype=torch.bfloat16)
        else:
            x = torch.empty(t.shape, dtype=torch.bfloat16, device=gen_device).normal_(0.0, INIT_STD, generator=g)
        tensors[name] = x.cpu().contiguous()
    save_file(tensors, str(save_dir / "model.safetensors"), metadata={"format": "pt"})
    (save_dir / "config.json").write_text(json.dumps(config, indent=1))
    build_tokenizer(save_dir, config["vocab_size"])
    del meta
    return {"num_tensors": len(tensors), "num_params": sum(t.numel() for t in tensors.values()),
            "file_bytes": (save_dir / "model.safetensors").stat().st_size}


# ---- measurements ------------------------------------------------------------------
def copy_bandwidth(device: torch.device, num_bytes: int, reps: int) -> dict:
    """Device-to-device copy of one buffer into another; bandwidth counts the
    bytes read plus the bytes written (bench_kernels.py's floor uses it too).
    Median of `reps` copies, CUDA events on a GPU, perf_counter on the CPU."""
    src = torch.empty(num_bytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t0)
    seconds = statistics.median(times)
    del src, dst
    return {"buffer_bytes": num_bytes, "reps": reps, "median_s": seconds, "bytes_per_s": 2 * num_bytes / seconds,
            "method": "dst.copy_(src), bytes read + bytes written / median time"}


def weight_bytes_per_step(model: torch.nn.Module) -> int:
    """Bytes of weights a decode step reads: every parameter once (the tied
    embedding is read whole as the LM head), except an untied input embedding,
    of which a step reads only its batch's rows."""
    tied = getattr(model, "tie_word_embeddings", False)
    return sum(p.numel() * p.element_size() for name, p in model.named_parameters()
               if tied or not name.endswith("embed_tokens.weight"))


def kv_bytes_per_token(config: dict, dtype: torch.dtype) -> int:
    """K and V of one position in every layer."""
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return 2 * config["num_hidden_layers"] * config["num_key_value_heads"] * head_dim * (torch.finfo(dtype).bits // 8)


def decode_kv_bytes_per_step(prompt_lens: list[int], num_tokens: int, per_token: int) -> float:
    """Mean KV bytes a plain decode step reads: the step that samples token i
    (i = 1 .. n-1) attends over prompt + i positions, for every row of the batch."""
    steps = range(1, num_tokens)
    return statistics.fmean(sum(p + i for p in prompt_lens) * per_token for i in steps)


def make_prompts(n: int, vocab_size: int, seed: int, lengths: tuple[int, int]) -> list[list[int]]:
    """Random token ids (specials 0-2 excluded), lengths uniform in [lo, hi]."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lengths[0], lengths[1] + 1, (n,), generator=g).tolist()
    return [torch.randint(3, vocab_size, (k,), generator=g).tolist() for k in lens]


def run_side(llm, prompts, max_tokens: int, temperature: float, latents: tuple[int, int]):
    """One timed run (a timestamp per engine step) and its metrics. seed=None:
    request i of an engine samples from seed engine_seed * 1000003 + i, so both
    engines draw the same random streams and the rows of a batch differ."""
    from memgen import SamplingParams
    from memgen.benchmark.timing import run_metrics, timed_generate

    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, ignore_eos=True)
    run = timed_generate(llm, prompts, params)
    metrics = run_metrics(run, max_tokens, latents)
    metrics["inference_insertions_per_request"] = statistics.fmean(r.augmentation[1:].count(1) for r in run.requests)
    return run, metrics


# ---- main --------------------------------------------------------------------------
def _graph_use(llm) -> dict:
    """Per pool: whether decode graphs were captured, their sizes, and how often they replayed."""
    out = {}
    for pool, runner in ((p.name, p.runner) for p in llm.engine.pools):
        graphs = runner.decode_graphs
        out[pool] = None if graphs is None else {"batch_sizes": graphs.batch_sizes, "replays": graphs.num_replays}
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", choices=sorted(CONFIGS), default="qwen2.5-1.5b",
                   help="model shapes: qwen2.5-1.5b (default) or tiny (CPU smoke run)")
    p.add_argument("--device", default="auto", help="auto (cuda if present) | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="auto", help="engine dtype: auto (bf16 on CUDA, float32 on CPU) | ...")
    p.add_argument("--attention-backend", default="auto", choices=["auto", "torch", "triton"])
    p.add_argument("--enforce-eager", action="store_true",
                   help="no CUDA graphs (default: decode steps replay graphs on CUDA with Triton)")
    p.add_argument("--lazy-memgen-streams", action="store_true",
                   help="MemGen's weaver/trigger catch up in one chunk when needed (default on CUDA: they "
                        "follow the reasoner step by step, keeping steps decode-shaped for CUDA graphs)")
    p.add_argument("--quick", action="store_true", help="shorter outputs, one iteration, smaller copy buffer")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=None,
                   help="default 1 8 16 (tiny: 1 4); targets are judged at 1 and 8")
    p.add_argument("--max-tokens", type=int, default=None, help="output tokens per request (default 256, quick 64)")
    p.add_argument("--iterations", type=int, default=None, help="timed runs per point (default 3, quick 1)")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="sampling temperature of the MemGen vs plain runs (default 1.0; 0 = greedy); the "
                        "floor run is always greedy")
    p.add_argument("--seed", type=int, default=0, help="weights, prompts, MemGen init and engine seed")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/e2e_<device>.json)")
    args = p.parse_args(argv)
    tiny = args.config == "tiny"
    args.batch_sizes = sorted(set(args.batch_sizes or ([1, 4] if tiny else [1, 8, 16])))
    args.max_tokens = args.max_tokens or (12 if tiny and args.quick else 32 if tiny else 64 if args.quick else 256)
    args.iterations = args.iterations or (1 if args.quick else 3)
    if min(args.batch_sizes) < 1 or args.max_tokens < 2 or args.iterations < 1 or not args.temperature >= 0:
        p.error("batch sizes >= 1, --max-tokens >= 2, --iterations >= 1 and --temperature >= 0")
    return args


def device_slug(device: torch.device) -> tuple[str, str]:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        from memgen.benchmark.report import cpu_name
        name = f"cpu ({cpu_name()})"
    slug = "cpu" if device.type == "cpu" else re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_").lower()
    return name, slug


def main(argv=None) -> dict:
    args = parse_args(argv)
    from memgen import LLM
    from memgen.benchmark import report
    from memgen.benchmark.timing import median_metrics
    from memgen.checkpoint import DEFAULT_LORA_CONFIG, MemGenSettings, random_checkpoint
    from memgen.config import resolve_device, resolve_dtype

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    device_name, slug = device_slug(device)
    config = CONFIGS[args.config]
    performance = device.type == "cuda" and args.config != "tiny"
    why_not = None if performance else ("tiny config" if args.config == "tiny" else f"device {device.type}")
    note = None if performance else NOT_PERFORMANCE.format(why=why_not)
    if note:
        print(note)
    machine, versions = report.machine_info(device), report.versions()
    try:
        import triton
        versions["triton"] = triton.__version__
    except ImportError:
        versions["triton"] = None
    t_start = time.perf_counter()

    # (a) copy bandwidth
    big = performance or args.config != "tiny"
    bw = copy_bandwidth(device, (1 << 30) if big and not args.quick else (256 << 20) if big else (32 << 20),
                        20 if device.type == "cuda" else 5)
    print(f"device: {device_name}; copy bandwidth {bw['bytes_per_s'] / 1e9:.1f} GB/s (read + write)", flush=True)

    batches, n = args.batch_sizes, args.max_tokens
    prompt_range = (8, 24) if args.config == "tiny" else (64, 128)
    prompts = make_prompts(max(batches), config["vocab_size"], args.seed, prompt_range)
    settings = MemGenSettings(prompt_latents_len=LATENTS, inference_latents_len=LATENTS, trigger_active=True,
                              max_prompt_aug_num=1, max_inference_aug_num=BUDGET,
                              weaver_lora_config=dict(DEFAULT_LORA_CONFIG), trigger_lora_config=dict(DEFAULT_LORA_CONFIG))
    max_model_len = max(map(len, prompts)) + n + LATENTS * (1 + BUDGET) + 16
    with tempfile.TemporaryDirectory(prefix="memgen_e2e_") as tmp:
        t0 = time.perf_counter()
        model_info = build_model_dir(Path(tmp) / "model", config, args.seed, device)
        model_info["build_s"] = time.perf_counter() - t0
        print(f"built a random {args.config} model: {model_info['num_params'] / 1e6:.1f} M parameters "
              f"in {model_info['build_s']:.1f} s", flush=True)
        ckpt = random_checkpoint(settings, config, seed=args.seed)
        engine_kw = dict(dtype=dtype, device=device, seed=args.seed, max_num_seqs=max(batches),
                         max_model_len=max_model_len, enable_prefix_caching=False,
                         attention_backend=args.attention_backend, enforce_eager=args.enforce_eager,
                         lazy_memgen_streams=True if args.lazy_memgen_streams else None)
        print("loading the engine: plain, then MemGen ...", flush=True)
        plain = LLM(Path(tmp) / "model", **engine_kw)
        memgen = LLM(Path(tmp) / "model", memgen=ckpt, **engine_kw)
    sides = {"plain": (plain, (0, 0)), "memgen": (memgen, (LATENTS, LATENTS))}
    weight_bytes = weight_bytes_per_step(plain.engine.model_runner.model)
    kv_per_token = kv_bytes_per_token(config, dtype)

    # warm-up (Triton compiles here), then interleaved timed runs: (b) the plain LLM
    # greedy at batch 1 against the floor, (c) plain and MemGen sampled at each batch size
    temp = args.temperature
    print("warming up (Triton compiles its kernels here on a GPU) ...", flush=True)
    for side, (llm, latents) in sides.items():
        for b in batches:
            run_side(llm, prompts[:b], min(n, 32), temp, latents)
    run_side(plain, prompts[:1], min(n, 32), 0.0, (0, 0))
    floor_runs, runs = [], {(b, side): [] for b in batches for side in sides}
    for it in range(args.iterations):
        floor_runs.append(run_side(plain, prompts[:1], n, 0.0, (0, 0)))
        print(f"  iteration {it + 1}/{args.iterations} batch  1 plain greedy: {floor_runs[-1][0].wall_s:.3f} s",
              flush=True)
        order = list(sides) if it % 2 == 0 else list(sides)[::-1]
        for b in batches:
            for side in order:
                runs[b, side].append(run_side(sides[side][0], prompts[:b], n, temp, sides[side][1]))
                print(f"  iteration {it + 1}/{args.iterations} batch {b:>2} {side}: "
                      f"{runs[b, side][-1][0].wall_s:.3f} s", flush=True)

    def summary(per_iter: list[dict]) -> dict:
        out = median_metrics(per_iter)
        out["tpot_best_s"] = min(m["tpot_median_s"] for m in per_iter)
        return out

    def floor_of(prompt_lens: list[int]) -> dict:
        kv_step = decode_kv_bytes_per_step(prompt_lens, n, kv_per_token)
        return {"weight_bytes": weight_bytes, "kv_bytes_per_step_mean": kv_step,
                "bytes_per_step": weight_bytes + kv_step, "floor_s": (weight_bytes + kv_step) / bw["bytes_per_s"]}

    decode = {"batch_size": 1, "temperature": 0.0, "prompt_tokens": [len(prompts[0])],
              "plain": summary([m for _, m in floor_runs]), "floor": floor_of([len(prompts[0])])}
    decode["plain_tpot_over_floor"] = decode["plain"]["tpot_median_s"] / decode["floor"]["floor_s"]
    decode["plain_tpot_best_over_floor"] = decode["plain"]["tpot_best_s"] / decode["floor"]["floor_s"]
    points = []
    for b in batches:
        point = {"batch_size": b, "temperature": temp, "prompt_tokens": [len(p) for p in prompts[:b]]}
        for side in sides:
            point[side] = summary([m for _, m in runs[b, side]])
        point["floor"] = floor_of(point["prompt_tokens"])
        point["plain_tpot_over_floor"] = point["plain"]["tpot_median_s"] / point["floor"]["floor_s"]
        point["memgen_over_plain_tpot"] = point["memgen"]["tpot_median_s"] / point["plain"]["tpot_median_s"]
        point["memgen_over_plain_tpot_best"] = point["memgen"]["tpot_best_s"] / point["plain"]["tpot_best_s"]
        point["memgen_over_plain_throughput"] = (point["memgen"]["output_tokens_per_s"]
                                                 / point["plain"]["output_tokens_per_s"])
        points.append(point)

    def target(metric: str, value: float, limit: float) -> dict:
        return {"metric": metric, "value": value, "target_max": limit,
                "met": (value <= limit) if performance else None,
                **({} if performance else {"not_judged": why_not})}

    by_batch = {p["batch_size"]: p for p in points}
    targets = {"decode_batch1_vs_floor": target("plain decode time per output token at batch 1 (greedy) / "
                                                "bandwidth floor (medians)", decode["plain_tpot_over_floor"],
                                                FLOOR_TARGET)}
    for b in (1, 8):
        if b in by_batch:
            targets[f"memgen_vs_plain_batch{b}"] = target(
                f"MemGen / plain time per output token at batch {b} (medians)",
                by_batch[b]["memgen_over_plain_tpot"], MEMGEN_TARGET)

    title = (f"random {args.config} ({model_info['num_params'] / 1e6:.1f} M params), {dtype}, {device_name}, "
             f"{n} tokens, median of {args.iterations}")
    report.print_table(
        f"(b) decode at batch 1, greedy, vs the bandwidth floor: {title}; copy bandwidth "
        f"{bw['bytes_per_s'] / 1e9:.1f} GB/s",
        ["batch", "TPOT ms", "best ms", "weights MB", "KV MB/step", "floor ms", "x floor"],
        [[1, decode["plain"]["tpot_median_s"] * 1e3, decode["plain"]["tpot_best_s"] * 1e3, weight_bytes / 1e6,
          decode["floor"]["kv_bytes_per_step_mean"] / 1e6, decode["floor"]["floor_s"] * 1e3,
          f"{decode['plain_tpot_over_floor']:.2f}x"]])
    report.print_table(
        f"(c) MemGen vs plain, temperature {temp}: {title}",
        ["batch", "plain TPOT ms", "MemGen TPOT ms", "MemGen/plain", "plain x floor", "plain tok/s", "MemGen tok/s",
         "inserts/req", "trigger/req"],
        [[p["batch_size"], p["plain"]["tpot_median_s"] * 1e3, p["memgen"]["tpot_median_s"] * 1e3,
          f"{p['memgen_over_plain_tpot']:.3f}x", f"{p['plain_tpot_over_floor']:.2f}x",
          p["plain"]["output_tokens_per_s"], p["memgen"]["output_tokens_per_s"],
          p["memgen"]["inference_insertions_per_request"], p["memgen"]["num_trigger_calls_per_request"]]
         for p in points])
    print("(inserts/req: inference insertions, the prompt's excluded; trigger/req: decisions, the prompt's included)")
    for t in targets.values():
        verdict = {True: "met", False: "MISSED", None: f"not judged: {why_not}"}[t["met"]]
        print(f"{t['metric']}: {t['value']:.3f}x (target <= {t['target_max']}x: {verdict})")
    if any(p["memgen"]["inference_insertions_per_request"] == 0 for p in points):
        print("warning: some MemGen runs made no inference insertion (no delimiter sampled, or the trigger "
              "declined each): there MemGen vs plain measures the prompt insertion and the trigger only")

    result = {
        "benchmark": "bench/bench_e2e.py", "device": device_name, "performance_numbers": performance, "note": note,
        "machine": machine, "versions": versions,
        "config": {"argv": sys.argv[1:] if argv is None else list(argv), **vars(args), "dtype": str(dtype),
                   "model_config": config, "model": model_info, "init_std": INIT_STD,
                   "delimiter_every": DELIMITER_EVERY,
                   "memgen": {"source": "random_checkpoint", "seed": args.seed, "settings": settings.to_dict()},
                   "engine": {"max_num_seqs": max(batches), "max_model_len": max_model_len,
                              "enable_prefix_caching": False, "enforce_eager": plain.config.enforce_eager,
                              "cuda_graphs": {side: _graph_use(llm) for side, (llm, _) in sides.items()},
                              "memgen_streams_follow": memgen.memgen.get().policy.follow,
                              "attention": getattr(getattr(plain.engine.model_runner, "attn_backend", None),
                                                   "name", None)},
                   "tpot": "(time of last token - time of first token) / (tokens - 1) per request: prefill "
                           "excluded; median over requests, then over iterations",
                   "floor": "(weight bytes + mean KV bytes read per decode step) / copy bandwidth",
                   "sampling": "(b) greedy; (c) temperature --temperature with per-request seeds: a random model's "
                               "greedy output repeats one token, so delimiters (and insertions) would hang on "
                               "chance"},
        "copy_bandwidth": bw, "kv_bytes_per_token": kv_per_token,
        "decode_vs_floor": decode, "results": points, "targets": targets,
        "raw_runs": [{"batch_size": 1, "side": "plain_greedy", "max_tokens": n,
                      "iterations": [{"metrics": m, **r.to_json()} for r, m in floor_runs]}]
                    + [{"batch_size": b, "side": side, "max_tokens": n,
                        "iterations": [{"metrics": m, **r.to_json()} for r, m in rs]}
                       for (b, side), rs in runs.items()],
        "timed_s": time.perf_counter() - t_start,
    }
    out = Path(args.out) if args.out else (Path(__file__).resolve().parent / "results" /
                                           f"e2e_{'tiny_' if args.config == 'tiny' else ''}{slug}.json")
    report.write_json(out, result)
    print(f"wrote {out}")
    if note:
        print(note)
    return result


if __name__ == "__main__":
    main()
