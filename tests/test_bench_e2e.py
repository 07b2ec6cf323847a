"""bench/bench_e2e.py end to end on the tiny config (CPU, a few seconds): the JSON's
structure, and that its derived numbers follow from its raw ones."""
import importlib.util
import json
import math
import statistics
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_e2e.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_e2e", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tpot(times: list[float]) -> float:
    return (times[-1] - times[0]) / (len(times) - 1)


def _close(a: float, b: float) -> bool:
    """The JSON keeps timestamps to the microsecond."""
    return math.isclose(a, b, rel_tol=1e-3, abs_tol=2e-6)


def test_bench_e2e_tiny_quick(tmp_path):
    bench = _load()
    out = tmp_path / "e2e.json"
    returned = bench.main(["--config", "tiny", "--quick", "--device", "cpu", "--batch-sizes", "1", "2",
                           "--out", str(out)])
    r = json.loads(out.read_text())
    assert r["targets"].keys() == returned["targets"].keys()

    # labelled as what it is: a smoke run, no verdicts
    assert r["performance_numbers"] is False and "NOT performance numbers" in r["note"]
    assert r["device"].startswith("cpu")
    assert {"torch", "triton", "memgen_git"} <= r["versions"].keys()
    assert r["config"]["model_config"]["vocab_size"] == bench.TINY["vocab_size"]
    assert set(r["targets"]) == {"decode_batch1_vs_floor", "memgen_vs_plain_batch1"}
    for t in r["targets"].values():
        assert t["met"] is None and t["value"] > 0

    # floor = bytes per step / copy bandwidth; bandwidth = 2 * buffer / time
    bw = r["copy_bandwidth"]
    assert math.isclose(bw["bytes_per_s"], 2 * bw["buffer_bytes"] / bw["median_s"], rel_tol=1e-9)
    n, kv_tok = r["config"]["max_tokens"], r["kv_bytes_per_token"]
    cfg = r["config"]["model_config"]
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    assert kv_tok == 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * head_dim * 4   # float32
    d = r["decode_vs_floor"]
    f = d["floor"]
    assert f["weight_bytes"] > 0 and f["kv_bytes_per_step_mean"] > 0
    assert math.isclose(f["kv_bytes_per_step_mean"],
                        statistics.fmean((d["prompt_tokens"][0] + i) * kv_tok for i in range(1, n)))
    assert math.isclose(f["floor_s"], (f["weight_bytes"] + f["kv_bytes_per_step_mean"]) / bw["bytes_per_s"])

    # times per output token come from the raw per-token timestamps (prefill excluded)
    raw = {(x["batch_size"], x["side"]): x["iterations"] for x in r["raw_runs"]}
    greedy = raw[1, "plain_greedy"]
    assert len(greedy) == 1 and len(greedy[0]["requests"][0]["token_times_s"]) == n
    assert _close(d["plain"]["tpot_median_s"], _tpot(greedy[0]["requests"][0]["token_times_s"]))
    assert d["plain"]["tpot_median_s"] > 0
    assert math.isclose(d["plain_tpot_over_floor"], d["plain"]["tpot_median_s"] / f["floor_s"])
    assert math.isclose(r["targets"]["decode_batch1_vs_floor"]["value"], d["plain_tpot_over_floor"])

    assert [p["batch_size"] for p in r["results"]] == [1, 2]
    for p in r["results"]:
        b = p["batch_size"]
        for side in ("plain", "memgen"):
            reqs = raw[b, side][0]["requests"]
            assert len(reqs) == b and all(q["num_output_tokens"] == n for q in reqs)
            assert _close(p[side]["tpot_median_s"], statistics.median(_tpot(q["token_times_s"]) for q in reqs))
            assert p[side]["tpot_median_s"] > 0 and p[side]["output_tokens_per_s"] > 0
        assert all(a == -100 for q in raw[b, "plain"][0]["requests"] for a in q["augmentation"])
        assert all(q["augmentation"][0] in (0, 1) for q in raw[b, "memgen"][0]["requests"])  # prompt decision
        assert math.isclose(p["memgen_over_plain_tpot"], p["memgen"]["tpot_median_s"] / p["plain"]["tpot_median_s"])
        assert math.isclose(p["plain_tpot_over_floor"], p["plain"]["tpot_median_s"] / p["floor"]["floor_s"])
    assert math.isclose(r["targets"]["memgen_vs_plain_batch1"]["value"], r["results"][0]["memgen_over_plain_tpot"])


def test_tokenizer_has_the_full_vocabulary_and_delimiters(tmp_path):
    bench = _load()
    tok = bench.build_tokenizer(tmp_path, 1000, delimiter_every=20)
    assert len(tok) == 1000 and tok.eos_token_id == 2 and tok.pad_token_id == 0
    words = [tok.decode([i]) for i in range(3 + 256, 1000)]      # after the specials and the byte symbols
    assert len(set(words)) == len(words)
    assert sum(w.endswith((",", ".", "\n")) for w in words) == len(range(260, 1000, 20))
    assert tok.decode(tok.encode("a b.\n", add_special_tokens=False)) == "a b.\n"
