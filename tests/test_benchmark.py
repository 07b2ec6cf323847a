"""`memgen bench` on tiny models: the JSON schema, ratios computed from the
measured numbers, memory on/off generating the same token counts, the plot,
the output folder, the load warning and the time budget (pure functions),
bad options. No timing assertions (benchmarks measure time, tests do not)."""
from __future__ import annotations

import json
import math

import pytest

from pathlib import Path

from memgen.benchmark import report
from memgen.benchmark.timing import RequestTiming, TimedRun, fits_budget, memory_counts, percentile, run_metrics
from memgen.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def bench(tmp_path, *argv) -> tuple[int, dict | None]:
    """Run `memgen bench --output-dir tmp_path ...`; (exit code, the mode's JSON or None)."""
    mode = argv[argv.index("--mode") + 1] if "--mode" in argv else "latency"
    out = tmp_path / f"{mode}_cpu.json"
    if out.exists():
        out.unlink()
    rc = main(["bench", "--output-dir", str(tmp_path), *map(str, argv)])
    return rc, (json.loads(out.read_text()) if out.exists() else None)


@pytest.fixture(scope="module")
def latency_run(tmp_path_factory, memgen_reasoner_dir):
    pytest.importorskip("matplotlib")
    tmp = tmp_path_factory.mktemp("bench")
    rc, data = bench(tmp, "--model", memgen_reasoner_dir, "--batch-sizes", 1, 3, "--max-tokens", 4, 9,
                     "--iterations", 2, "--warmup-tokens", 2, "--latents", 3, "--budget", 2, "--always-insert",
                     "--threads", 1)
    return rc, data, tmp


def test_latency_json_schema(latency_run, capsys):
    rc, data, _ = latency_run
    assert rc == 0
    assert data["mode"] == "latency"
    for key in ("cpu", "cpu_count", "torch_threads", "OMP_NUM_THREADS", "load_average_start", "load_average_end"):
        assert key in data["machine"]
    assert {"torch", "transformers", "memgen", "memgen_git"} <= set(data["versions"])
    cfg = data["config"]
    assert cfg["batch_sizes"] == [1, 3] and cfg["max_tokens"] == [4, 9] and cfg["iterations"] == 2
    assert cfg["memgen"]["source"] == "random_checkpoint"
    assert cfg["memgen"]["settings"]["inference_latents_len"] == 3
    assert cfg["memgen"]["settings"]["max_inference_aug_num"] == 2
    assert cfg["engine"]["enable_prefix_caching"] is False
    assert [(p["batch_size"], p["max_tokens"]) for p in data["results"]] == [(1, 4), (1, 9), (3, 4), (3, 9)]
    metric_keys = {"latency_s", "ttft_median_s", "tpot_median_s", "itl_p50_s", "itl_p99_s", "output_tokens_per_s",
                   "num_insertions_per_request", "num_trigger_calls_per_request", "num_latent_positions_per_request"}
    for p in data["results"]:
        for side in ("memory_on", "memory_off"):
            assert metric_keys <= set(p[side])
            assert len(p[f"{side}_iterations"]) == 2
        assert p["memory_off"]["num_latent_positions_per_request"] == 0
    # 2 iterations of the longest length per (batch, side), one timestamp per token
    assert len(data["raw_runs"]) == 4
    for raw in data["raw_runs"]:
        assert len(raw["iterations"]) == 2
        for it in raw["iterations"]:
            assert it["cpu_s"] > 0 and it["wall_s"] > 0
            for r in it["requests"]:
                assert r["num_output_tokens"] == 9 and len(r["token_times_s"]) == 9
                assert r["token_times_s"] == sorted(r["token_times_s"])


def test_latency_ratios_from_measured_numbers(latency_run):
    _, data, _ = latency_run
    for p in data["results"]:
        for key, ratio in p["on_over_off"].items():
            assert math.isclose(ratio, p["memory_on"][key] / p["memory_off"][key], rel_tol=1e-12)
        for side in ("memory_on", "memory_off"):   # the summary is the median over iterations
            values = sorted(m["latency_s"] for m in p[f"{side}_iterations"])
            assert math.isclose(p[side]["latency_s"], (values[0] + values[1]) / 2, rel_tol=1e-12)


def test_memory_on_off_same_token_counts(latency_run):
    """ignore_eos: both sides generate max_tokens per row; memory on inserts
    (the trigger head always inserts) and its latents are counted apart."""
    _, data, _ = latency_run
    runs = {(r["batch_size"], r["side"]): r for r in data["raw_runs"]}
    for b in (1, 3):
        on, off = runs[b, "memory_on"], runs[b, "memory_off"]
        for it_on, it_off in zip(on["iterations"], off["iterations"]):
            assert [r["num_output_tokens"] for r in it_on["requests"]] == \
                   [r["num_output_tokens"] for r in it_off["requests"]] == [9] * b
            for r in it_on["requests"]:
                m = r["engine_metrics"]
                assert m["num_insertions"] >= 1
                # the counts read off the augmentation mask equal the engine's metrics
                assert memory_counts(r["augmentation"], 3, 3)["num_latent_positions"] == m["num_latent_positions"]
                assert memory_counts(r["augmentation"], 3, 3)["num_insertions"] == m["num_insertions"]
            for r in it_off["requests"]:
                assert set(r["augmentation"]) == {-100}
    p = next(p for p in data["results"] if p["max_tokens"] == 9)
    assert p["memory_on"]["num_latent_positions_per_request"] >= 3


def test_latency_plot_is_png(latency_run):
    """Beside the JSON in --output-dir, with the default install (matplotlib is a dependency)."""
    _, data, tmp = latency_run
    png = tmp / "latency_cpu.png"
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert sorted(p.name for p in tmp.iterdir()) == ["latency_cpu.json", "latency_cpu.png"]
    # the run was not cut by a time budget: explicit --iterations are all run
    assert data["config"]["iterations_done"] == 2 and data["config"]["stopped_by_time_budget"] is False
    # the load warning is recorded either way (null on a quiet machine)
    assert "load_warning" in data and "own_load_estimate" in data["machine"]
    assert data["load_warning"] == report.load_warning(
        data["machine"]["load_average_start"], data["machine"]["load_average_end"], data["machine"]["usable_cores"],
        data["machine"]["own_load_estimate"])


def test_default_output_is_outside_the_checkout(tmp_path, monkeypatch):
    import torch

    assert report.default_output("latency", torch.device("cpu")) == Path("memgen-bench-results/latency_cpu.json")
    assert report.default_output("overhead", torch.device("cpu"), tmp_path) == tmp_path / "overhead_cpu.json"
    # relative to where the user runs it, so never the checkout's tracked bench/results/
    monkeypatch.chdir(tmp_path)
    assert report.default_output("latency", torch.device("cpu")).resolve().parent == tmp_path / "memgen-bench-results"


def test_load_warning():
    assert report.load_warning([0.4, 2.0, 3.0], [0.9, 1.0, 1.0], cores=2) is None      # only the 1-minute value counts
    assert report.load_warning([1.0, 0, 0], [1.0, 0, 0], cores=2) is None                # not above 0.5 x cores
    assert report.load_warning(None, None, cores=2) is None                               # unknown: no claim
    w = report.load_warning([2.5, 0, 0], [0.2, 0, 0], cores=2)
    assert "2.50 at the start" in w and "above 1 = 0.5 x 2 cores" in w and "at the end" not in w
    # this run's own load is not others' load: 1.8 - 1.0 = 0.8 is quiet on 2 cores, 2.6 - 1.0 is not
    assert report.load_warning([0.1, 0, 0], [1.8, 0, 0], cores=2, own=1.0) is None
    w = report.load_warning([0.1, 0, 0], [2.6, 0, 0], cores=2, own=1.0)
    assert "1.60 at the end" in w and "at the start" not in w
    assert report.load_warning([3.0, 0, 0], [0.1, 0, 0], cores=8) is None


def test_time_budget():
    assert fits_budget(50.0, 40.0, 100.0) and fits_budget(60.0, 40.0, 100.0)
    assert not fits_budget(61.0, 40.0, 100.0)
    assert fits_budget(1e6, 1e6, 0.0) and fits_budget(1e6, 1e6, None)     # no budget


@pytest.mark.parametrize("argv, budget", [([], 100.0), (["--iterations", "5"], 0.0), (["--mode", "overhead"], 0.0),
                                          (["--time-budget", "30"], 30.0)])
def test_time_budget_defaults(argv, budget):
    import argparse

    from memgen.benchmark import add_bench_arguments, check_args

    p = argparse.ArgumentParser()
    add_bench_arguments(p)
    args = p.parse_args(argv)
    check_args(args)
    assert args.time_budget == budget


def test_run_metrics_prefix_and_percentiles():
    run = TimedRun(wall_s=1.0, requests=[
        RequestTiming([0.1, 0.2, 0.4, 0.5], [5, 6, 7, 8], [1, -100, 0, 1], {}),
        RequestTiming([0.2, 0.3, 0.5, 0.6], [5, 6, 7, 8], [0, -100, -100, -100], {}),
    ])
    m = run_metrics(run, 3, latents=(4, 2))
    assert math.isclose(m["latency_s"], 0.5)
    assert math.isclose(m["ttft_median_s"], 0.15)
    assert math.isclose(m["tpot_median_s"], 0.15)
    assert math.isclose(m["output_tokens_per_s"], 6 / 0.5)
    assert m["num_insertions_per_request"] == 0.5 and m["num_latent_positions_per_request"] == 2.0
    assert m["num_trigger_calls_per_request"] == 1.5
    assert math.isclose(percentile([1.0, 2.0, 3.0, 4.0], 50), 2.5)
    assert math.isclose(percentile([1.0, 2.0, 3.0, 4.0], 99), 3.97)
    with pytest.raises(ValueError, match="fewer than"):
        run_metrics(run, 5)


def test_overhead_and_throughput_modes(tmp_path, memgen_reasoner_dir):
    rc, data = bench(tmp_path, "--mode", "overhead", "--model", memgen_reasoner_dir, "--batch-sizes", 2,
                     "--max-tokens", 5, "--iterations", 1, "--warmup-tokens", 0, "--threads", 1)
    assert rc == 0 and data["mode"] == "overhead"
    t = data["target"]
    assert t["target_max"] == 1.10 and t["value"] == data["results"][0]["on_over_off"]["latency_s"]
    assert t["met"] == (t["value"] <= 1.10)
    assert not (tmp_path / "overhead_cpu.png").exists()
    p = data["results"][0]
    # ignore_eos: 5 tokens = 5 steps off (a short prompt is one prefill chunk); on adds the insertions' steps
    assert p["steps_off"] == 5 and p["steps_on"] >= p["steps_off"]
    assert p["linear_floor_s"] > 0 and math.isclose(
        p["step_vs_linear_floor"], p["memory_off"]["latency_best_s"] / p["linear_floor_s"])

    rc, data = bench(tmp_path, "--mode", "throughput", "--model", memgen_reasoner_dir, "--batch-sizes", 2,
                     "--num-prompts", 3, "--max-tokens", 4, "--iterations", 1, "--threads", 1)
    assert rc == 0
    p = data["results"][0]
    assert p["max_num_seqs"] == 2 and p["num_prompts"] == 3
    assert math.isclose(p["memory_off"]["output_tokens_per_s"], 12 / p["memory_off"]["latency_s"])


def test_vs_reference(tmp_path, memgen_reasoner_dir):
    rc, data = bench(tmp_path, "--mode", "vs-reference", "--model", memgen_reasoner_dir, "--batch-sizes", 2,
                     "--max-tokens", 6, "--iterations", 1, "--latents", 2, "--budget", 1, "--threads", 1)
    assert rc == 0
    p = data["results"][0]
    assert math.isclose(p["speedup"], p["reference_median_s"] / p["engine_median_s"], rel_tol=1e-12)
    assert 1 <= p["columns_generated"] <= 6
    assert data["target"]["target_min"] == 20.0
    assert 0.0 <= p["token_agreement"] <= 1.0


@pytest.mark.parametrize("argv, message", [
    (["--batch-sizes", "0"], "--batch-sizes must be >= 1"),
    (["--max-tokens", "4", "-2"], "--max-tokens must be >= 1"),
    (["--iterations", "0"], "--iterations must be >= 1"),
    (["--warmup-tokens", "-1"], "--warmup-tokens must be >= 0"),
    (["--memgen", "somewhere", "--latents", "4"], "cannot be combined with --memgen"),
    (["--budget", "-1"], "must be >= 0"),
    (["--time-budget", "-1"], "--time-budget must be >= 0"),
    (["--prompt-tokens", "-1"], "--prompt-tokens must be >= 0"),
    (["--config", "small", "--model", "x"], "--config small runs its own small model"),
])
def test_bad_options_exit_2(argv, message, tmp_path, capsys):
    rc, data = bench(tmp_path, *argv)
    assert rc == 2 and data is None
    assert message in capsys.readouterr().err


def test_bad_option_values_exit_2(tmp_path, capsys, memgen_reasoner_dir):
    with pytest.raises(SystemExit) as e:   # argparse: unknown mode
        main(["bench", "--mode", "fastest"])
    assert e.value.code == 2
    rc, _ = bench(tmp_path, "--model", tmp_path / "missing")
    assert rc == 2 and "missing" in capsys.readouterr().err
    rc, _ = bench(tmp_path, "--model", memgen_reasoner_dir, "--memgen", tmp_path / "no_ckpt")
    assert rc == 2 and "no_ckpt" in capsys.readouterr().err


def test_free_cores():
    assert report.free_cores(2, 0.1) == 2
    assert report.free_cores(2, 0.6) == 1 and report.free_cores(2, 1.4) == 1
    assert report.free_cores(2, 5.0) == 1          # never 0
    assert report.free_cores(16, 3.2) == 13


def test_long_prompts_reach_the_asked_length(tokenizer):
    from memgen.benchmark.timing import make_prompts

    short = make_prompts(tokenizer, 6)
    long = make_prompts(tokenizer, 6, min_tokens=120)
    assert all(len(p) >= 120 for p in long) and all(len(p) < 150 for p in long)   # a context of 8-word steps
    assert len({tuple(p) for p in long}) == 6                 # no two alike (no prefix-cache shortcut)
    assert all(len(s) < 120 for s in short)
    assert make_prompts(tokenizer, 6, min_tokens=1) == short


def test_small_config_model(tmp_path, monkeypatch):
    """--config small: issue 17's shape, built once into the cache and loaded from it after."""
    import json as _json

    from memgen.benchmark import small_model

    monkeypatch.setenv("MEMGEN_CACHE", str(tmp_path))
    first = small_model.small_model_dir()
    config = _json.loads((first / "config.json").read_text())
    assert config["model_type"] == "qwen2" and config["vocab_size"] == small_model.VOCAB_SIZE
    assert {k: config[k] for k in small_model.SHAPE} == small_model.SHAPE
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert small_model.small_model_dir() == first and (first / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [small_model.NAME]   # no temp dir left behind


def test_linear_floor_runs_the_base_layers_of_a_memgen_engine(memgen_reasoner_dir):
    """The floor times the base projections only: a MemGen engine's LoRA hooks need a
    forward's context, which the floor has none of."""
    from memgen import LLM
    from memgen.benchmark.floor import linear_floor_s
    from memgen.checkpoint import random_checkpoint, save_reference
    from memgen.models import load_hf_config

    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        settings = {"prompt_latents_len": 2, "inference_latents_len": 2, "max_inference_aug_num": 1}
        save_reference(random_checkpoint(settings, load_hf_config(memgen_reasoner_dir), seed=0), tmp)
        llm = LLM(memgen_reasoner_dir, memgen=tmp, max_model_len=64)
        assert any(m.lora is not None for m in llm.engine.model_runner.model.modules() if hasattr(m, "lora"))
        assert linear_floor_s(llm, 4, 2) > 0 and linear_floor_s(llm, 4, 2, mkl=True) > 0
