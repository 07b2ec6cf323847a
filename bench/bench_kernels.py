"""Kernel microbenchmarks: each Triton kernel against its torch reference and, on
a GPU, against the memory-bandwidth floor (bytes it must move / measured copy
bandwidth). Prints a table and writes bench/results/kernels_<device>.json.

    python bench/bench_kernels.py            # CUDA if present, else the interpreter
    python bench/bench_kernels.py --quick    # fewer repetitions

Shapes on a GPU are Qwen2.5-1.5B's (hidden 1536, 12 heads / 2 KV heads of 128,
vocab 151936). Without CUDA the kernels run in Triton's CPU interpreter at tiny
shapes: those timings are NOT performance numbers, and the output says so.
The torch references are written for clarity (per-sequence Python loops for
attention), so "vs ref" is a sanity ratio, not a claim against a tuned baseline.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch

CUDA = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernel modules are imported

import triton  # noqa: E402

from memgen.kernels.kv_store import store_kvcache, store_kvcache_ref  # noqa: E402
from memgen.kernels.latent_injection import inject_latents, inject_latents_ref  # noqa: E402
from memgen.kernels.lora import add_lora, add_lora_ref, lora_metadata  # noqa: E402
from memgen.kernels.paged_attention import (paged_decode_attention, paged_decode_attention_ref,  # noqa: E402
                                            paged_prefill_attention, paged_prefill_attention_ref)
from memgen.kernels.trigger_scoring import trigger_decisions, trigger_decisions_ref  # noqa: E402

INTERPRETER_NOTE = ("NOTE: no CUDA device: kernels ran in Triton's CPU interpreter at tiny shapes. "
                    "Interpreter timings are NOT performance numbers.")
DEVICE = "cuda" if CUDA else "cpu"


def timeit(fn, reps: int) -> float:
    """Median seconds per call."""
    fn()
    if CUDA:
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return statistics.median(times)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth() -> float | None:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read and written
    (bench_e2e.copy_bandwidth: 1 GiB, median of 20); None without CUDA."""
    if not CUDA:
        return None
    from bench_e2e import copy_bandwidth as measure

    return measure(torch.device("cuda"), 1 << 30, 20)["bytes_per_s"]


def paged(num_seqs, context, num_kv_heads, head_dim, block_size, dtype):
    max_blocks = -(-context // block_size)
    num_blocks = num_seqs * max_blocks
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, device=DEVICE).to(dtype)
    v_cache = torch.randn_like(k_cache)
    block_tables = torch.randperm(num_blocks, device=DEVICE).int().view(num_seqs, max_blocks)
    context_lens = torch.full((num_seqs,), context, dtype=torch.int32, device=DEVICE)
    return k_cache, v_cache, block_tables, context_lens


def cases(big: bool, dtype):
    """(name, shape text, triton fn, reference fn, bytes the kernel must move)."""
    el = torch.finfo(dtype).bits // 8
    heads, kv_heads, head_dim, hidden, vocab = (12, 2, 128, 1536, 151936) if big else (4, 2, 16, 64, 500)
    block_size = 16

    for num_seqs, context in ([(1, 1024), (1, 8192), (32, 1024)] if big else [(2, 40)]):
        k_cache, v_cache, bt, cl = paged(num_seqs, context, kv_heads, head_dim, block_size, dtype)
        q = torch.randn(num_seqs, heads, head_dim, device=DEVICE).to(dtype)
        args = (q, k_cache, v_cache, bt, cl, head_dim ** -0.5)
        moved = 2 * num_seqs * context * kv_heads * head_dim * el + 2 * q.numel() * el
        yield ("decode_attention", f"B={num_seqs} ctx={context}", lambda a=args: paged_decode_attention(*a),
               lambda a=args: paged_decode_attention_ref(*a), moved)

    for num_seqs, chunk, context in ([(1, 2048, 2048), (4, 512, 4096)] if big else [(2, 24, 40)]):
        k_cache, v_cache, bt, cl = paged(num_seqs, context, kv_heads, head_dim, block_size, dtype)
        q = torch.randn(num_seqs * chunk, heads, head_dim, device=DEVICE).to(dtype)
        cu = torch.arange(0, num_seqs * chunk + 1, chunk, dtype=torch.int32, device=DEVICE)
        args = (q, k_cache, v_cache, cu, cl, bt, head_dim ** -0.5)
        moved = 2 * num_seqs * context * kv_heads * head_dim * el + 2 * q.numel() * el
        yield ("prefill_attention", f"B={num_seqs} chunk={chunk} ctx={context}",
               lambda a=args, m=chunk: paged_prefill_attention(*a, max_seqlen_q=m),
               lambda a=args, m=chunk: paged_prefill_attention_ref(*a, max_seqlen_q=m), moved)

    for num_tokens in ([1, 64, 4096] if big else [9]):
        key = torch.randn(num_tokens, kv_heads, head_dim, device=DEVICE).to(dtype)
        k_cache, v_cache, _, _ = paged(1, max(num_tokens, block_size) * 2, kv_heads, head_dim, block_size, dtype)
        slots = torch.randperm(k_cache.shape[0] * block_size, device=DEVICE)[:num_tokens]
        args = (key, key, k_cache, v_cache, slots)
        yield ("store_kvcache", f"N={num_tokens}", lambda a=args: store_kvcache(*a),
               lambda a=args: store_kvcache_ref(*a), 4 * key.numel() * el)

    for num_rows, num_latents in ([(1, 0), (40, 8), (4096, 64)] if big else [(12, 4)]):
        embed = torch.randn(vocab, hidden, device=DEVICE).to(dtype)
        latents = torch.randn(max(num_latents, 1), hidden, device=DEVICE).to(dtype)
        ids = torch.randint(0, vocab, (num_rows,), device=DEVICE)
        idx = torch.full((num_rows,), -1, device=DEVICE)
        idx[:num_latents] = torch.arange(num_latents, device=DEVICE)
        args = (ids, idx, embed, latents)
        yield ("inject_latents", f"N={num_rows} latents={num_latents}", lambda a=args: inject_latents(*a),
               lambda a=args: inject_latents_ref(*a), 2 * num_rows * hidden * el)

    for num_rows in ([1, 64] if big else [8]):
        hidden_states = torch.randn(num_rows, hidden, device=DEVICE).to(dtype)
        weight, bias = torch.randn(2, hidden, device=DEVICE).to(dtype), torch.randn(2, device=DEVICE).to(dtype)
        ones = torch.ones(num_rows, dtype=torch.bool, device=DEVICE)
        args = (hidden_states, weight, bias, torch.zeros(num_rows, dtype=torch.int64, device=DEVICE),
                ones, torch.zeros(num_rows, dtype=torch.int64, device=DEVICE), 3, ones, 0.0,
                torch.rand(num_rows, device=DEVICE))
        yield ("trigger_decisions", f"B={num_rows} Ht={hidden}", lambda a=args: trigger_decisions(*a),
               lambda a=args: trigger_decisions_ref(*a), (num_rows + 2) * hidden * el)

    rank = 16 if big else 8
    for num_rows, out_features in ([(1, 1536), (64, 8960), (4096, 2048)] if big else [(20, 96)]):
        x = torch.randn(num_rows, hidden, device=DEVICE).to(dtype)
        lora_a = (torch.randn(2, rank, hidden, device=DEVICE) / hidden ** 0.5).to(dtype)
        lora_b = (torch.randn(2, out_features, rank, device=DEVICE) / rank ** 0.5).to(dtype)
        scaling = torch.ones(2, device=DEVICE)
        ids = torch.arange(num_rows, device=DEVICE) % 3 - 1          # none / weaver / trigger rows
        y = torch.randn(num_rows, out_features, device=DEVICE).to(dtype)
        meta = lora_metadata(ids, 2)
        moved = (x.numel() + 2 * y.numel() + lora_a.numel() + lora_b.numel()) * el
        yield ("add_lora", f"N={num_rows} in={hidden} out={out_features} r={rank}",
               lambda a=(y, x, lora_a, lora_b, scaling, ids, meta): add_lora(*a),
               lambda a=(y, x, lora_a, lora_b, scaling, ids): add_lora_ref(*a), moved)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--dtype", default="bfloat16" if CUDA else "float32",
                        choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/kernels_<device>.json)")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    reps = (10 if args.quick else 50) if CUDA else 3
    device_name = torch.cuda.get_device_name(0) if CUDA else f"cpu ({platform.processor() or platform.machine()})"
    if not CUDA:
        print(INTERPRETER_NOTE)
    bandwidth = copy_bandwidth()
    if bandwidth:
        print(f"device: {device_name}; copy bandwidth {bandwidth / 1e9:.0f} GB/s (read + write)")

    rows = []
    header = f"{'kernel':<20} {'shape':<36} {'triton us':>10} {'ref us':>10} {'ref/triton':>10} {'floor us':>9} {'x floor':>8}"
    print(header)
    print("-" * len(header))
    for name, shape, fn, ref, moved in cases(CUDA, dtype):
        t_triton, t_ref = timeit(fn, reps), timeit(ref, max(1, reps // 5) if not CUDA else reps)
        floor = moved / bandwidth if bandwidth else None
        rows.append(dict(kernel=name, shape=shape, triton_s=t_triton, ref_s=t_ref, bytes=moved,
                         floor_s=floor, vs_floor=(t_triton / floor) if floor else None))
        floor_txt = f"{floor * 1e6:9.1f} {t_triton / floor:8.2f}" if floor else f"{'-':>9} {'-':>8}"
        print(f"{name:<20} {shape:<36} {t_triton * 1e6:10.1f} {t_ref * 1e6:10.1f} {t_ref / t_triton:10.2f} {floor_txt}")
    if not CUDA:
        print(INTERPRETER_NOTE)

    slug = re.sub(r"[^A-Za-z0-9]+", "_", device_name).strip("_").lower()
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / f"kernels_{slug}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(
        device=device_name, interpreted=not CUDA,
        note=None if CUDA else INTERPRETER_NOTE,
        dtype=args.dtype, torch=torch.__version__, triton=triton.__version__, python=sys.version.split()[0],
        copy_bandwidth_Bps=bandwidth, time=time.strftime("%Y-%m-%dT%H:%M:%S"), results=rows,
    ), indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
