"""Kernel microbenchmarks with pytest-benchmark: each Triton kernel and its torch
reference, one benchmark each, grouped per kernel and shape. Not part of the
test suite (pyproject's testpaths is tests/); run it explicitly:

    pytest bench/test_kernel_microbench.py                         # table
    pytest bench/test_kernel_microbench.py --benchmark-json=OUT    # + JSON (gpu.sh does this)

The shapes and inputs are bench/bench_kernels.py's (`cases`): Qwen2.5-1.5B's on
CUDA, tiny ones in Triton's CPU interpreter otherwise. Interpreter timings are
NOT performance numbers; the output and every record's extra_info say so. On
CUDA the timer synchronizes the device and each round runs the kernel 20 times,
so a round's mean is the kernel's time, not a launch's; each record's
extra_info holds the bytes moved, the bandwidth floor and time / floor.
"""
from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_kernels  # noqa: E402  (sets TRITON_INTERPRET=1 without CUDA, before the kernels load)

CUDA = bench_kernels.CUDA
DTYPE = torch.bfloat16 if CUDA else torch.float32
DEVICE_NAME = torch.cuda.get_device_name(0) if CUDA else "cpu (Triton interpreter)"
NOTE = None if CUDA else bench_kernels.INTERPRETER_NOTE
CASES = list(bench_kernels.cases(CUDA, DTYPE))
CALLS_PER_ROUND = 20 if CUDA else 1


def synced_timer() -> float:
    """perf_counter after the device has finished everything queued."""
    if CUDA:
        torch.cuda.synchronize()
    return time.perf_counter()


pytestmark = pytest.mark.benchmark(timer=synced_timer, disable_gc=True)


@pytest.fixture(scope="module")
def bandwidth(request):
    """Copy bandwidth (bytes/s, read + write) on CUDA; the note on the interpreter."""
    capture = request.config.pluginmanager.getplugin("capturemanager")

    def say(line: str) -> None:         # past pytest's output capture, so that it shows
        if capture is None:
            print(line)
            return
        with capture.global_and_fixture_disabled():
            print(f"\n{line}")

    bw = bench_kernels.copy_bandwidth()
    say(f"kernel microbenchmarks on {DEVICE_NAME}, {str(DTYPE).replace('torch.', '')}"
        + (f", copy bandwidth {bw / 1e9:.0f} GB/s" if bw else ""))
    if NOTE:
        say(NOTE)
    yield bw
    if NOTE:
        say(NOTE)


def _id(case) -> str:
    return re.sub(r"[^A-Za-z0-9=]+", "_", f"{case[0]}-{case[1]}").strip("_")


@pytest.mark.parametrize("impl", ["triton", "torch_ref"])
@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_kernel(benchmark, bandwidth, case, impl):
    name, shape, triton_fn, ref_fn, moved = case
    fn = triton_fn if impl == "triton" else ref_fn
    benchmark.group = f"{name} {shape}" + ("" if CUDA else " [Triton interpreter: NOT performance numbers]")
    floor = moved / bandwidth if bandwidth else None
    benchmark.extra_info.update(kernel=name, shape=shape, impl=impl, device=DEVICE_NAME,
                                dtype=str(DTYPE).replace("torch.", ""), interpreted=not CUDA, note=NOTE,
                                bytes=moved, copy_bandwidth_Bps=bandwidth, floor_s=floor,
                                calls_per_round=CALLS_PER_ROUND)
    if CUDA:
        benchmark.pedantic(fn, rounds=30, iterations=CALLS_PER_ROUND, warmup_rounds=2)
    else:
        benchmark.pedantic(fn, rounds=3, iterations=1, warmup_rounds=1)
    if floor:
        benchmark.extra_info["x_floor"] = benchmark.stats.stats.median / floor
