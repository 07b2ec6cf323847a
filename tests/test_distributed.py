"""`memgen eval --ray` on a Ray cluster of two nodes on this machine (two `ray start`
raylets on a loopback address, 1 CPU each, see memgen.eval.ray_cluster), and the node
loss it survives.

- the CLI joins the cluster with --ray-address; its two workers land one on each node
  (the summary counts each worker's node and batches); outputs equal the single-process run;
  (16 batches of one record, Ray Data told to wait for both workers before the first);
- the second node's raylet is SIGKILLed mid-run, once each node has finished a batch:
  the run finishes on the head's worker with every record exactly once, outputs equal
  the single-process run, and the summary names the lost node;
- an address that answers nothing: one line, exit 2, within seconds;
- Ray Data's own LLM path (ray.data.llm's HttpRequestProcessorConfig, through
  memgen.eval.ray_data) against a real `memgen serve`: greedy completions and chats
  equal offline generation, with memgen's token ids and augmentation mask.

Ray is started and stopped by pid (never `ray stop`, which would end every cluster on
the machine). Marked `distributed`: `pytest -m distributed` runs these alone."""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.distributed

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")

from memgen.eval.ray_cluster import LOCAL_ENV, LocalCluster, connect  # noqa: E402
from memgen.eval.records import iter_results  # noqa: E402
from memgen.eval.runner import EvalConfig, evaluate  # noqa: E402

BATCH_DELAY_S = 0.4       # per batch, so the run is still going when the node is killed
MAX_TOKENS = 16


def _rows(n: int) -> list[dict]:
    return [{"id": f"q{i}", "prompt": f"Question: what is {i} plus {2 * i}? Answer:", "answer": str(3 * i)}
            for i in range(n)]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _by_id(path) -> list[dict]:
    rows = list(iter_results(path))
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)), f"a record written twice: {sorted(ids)}"
    for r in rows:
        r.pop("metrics", None)              # timings differ run to run
    return sorted(rows, key=lambda r: r["id"])


@pytest.fixture(scope="module")
def cluster():
    saved = {k: os.environ.get(k) for k in LOCAL_ENV}
    os.environ.update(LOCAL_ENV)          # this process's drivers talk to the cluster as its nodes do
    try:
        with LocalCluster(num_nodes=2, num_cpus=1) as c:
            yield c
            if ray.is_initialized():
                ray.shutdown()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def single_process(qwen2_dir, tmp_path_factory):
    """The reference: the same records through one engine in this process."""
    from memgen import LLM, SamplingParams

    tmp = tmp_path_factory.mktemp("single")
    inp = _write_jsonl(tmp / "in.jsonl", _rows(16))
    cfg = EvalConfig(input=str(inp), output=str(tmp / "local.jsonl"), batch_size=2, max_tokens=MAX_TOKENS,
                     progress=False)
    evaluate(LLM(model=str(qwen2_dir), dtype="float32", device="cpu"), cfg, make_params=SamplingParams)
    return inp, _by_id(cfg.output)


def test_unreachable_ray_address_is_one_line_and_exit_2(qwen2_dir, tmp_path):
    inp = _write_jsonl(tmp_path / "in.jsonl", _rows(2))
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "memgen.cli", "eval", str(inp), "--model", str(qwen2_dir),
                          "--device", "cpu", "--ray-address", "127.0.0.1:1", "-o", str(tmp_path / "o.jsonl")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines() == [
        "memgen eval: error: --ray-address 127.0.0.1:1: no Ray cluster answers there (Connection refused); "
        "start one with `ray start --head` or give its head's address"]
    assert time.monotonic() - t0 < 60 and not (tmp_path / "o.jsonl").exists()
    bad = subprocess.run([sys.executable, "-m", "memgen.cli", "eval", str(inp), "--model", str(qwen2_dir),
                          "--ray-address", "headnode"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "expected HOST:PORT" in bad.stderr and len(bad.stderr.splitlines()) == 1


def test_cli_spreads_workers_over_both_nodes(cluster, single_process, qwen2_dir, tmp_path):
    inp, expected = single_process
    out = tmp_path / "ray.jsonl"
    run = subprocess.run([sys.executable, "-m", "memgen.cli", "eval", str(inp), "--model", str(qwen2_dir),
                          "--dtype", "float32", "--device", "cpu", "--ray-address", cluster.address,
                          "--num-workers", "2", "--batch-size", "1", "--max-tokens", str(MAX_TOKENS),
                          "--no-progress",
                          "-o", str(out)],
                         capture_output=True, text=True, timeout=300,
                         # Ray Data sends batches as soon as one worker is up: the first could take
                         # them all while the other still loads; wait for both before the first
                         env={**os.environ, **LOCAL_ENV, "RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S": "240"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert _by_id(out) == expected
    summary = json.loads((tmp_path / "ray.summary.json").read_text())["ray"]
    workers = summary["workers"]
    assert summary["nodes"] == 2 and len(workers) == 2, workers          # one worker on each node
    assert len({w["node_id"] for w in workers}) == 2 and all(w["node_ip"] == cluster.host for w in workers)
    assert sum(w["records"] for w in workers) == 16 and sum(w["batches"] for w in workers) == 16
    assert summary["nodes_lost"] == [] and summary["duplicates_dropped"] == 0


def _connect(cluster):
    if not ray.is_initialized():
        connect(cluster.address)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # from inside ray.data
def test_ray_data_http_processor_against_memgen_serve(cluster, memgen_reasoner_dir, memgen_ckpt_dir, tmp_path):
    pytest.importorskip("fastapi")
    pytest.importorskip("ray.data.llm")
    from serve_process import memgen_serve

    from memgen import LLM, SamplingParams
    from memgen.eval.ray_data import memgen_http_processor

    args = ["--model", str(memgen_reasoner_dir), "--memgen", str(memgen_ckpt_dir), "--dtype", "float64",
            "--device", "cpu", "--served-model-name", "tiny", "--log-level", "warning"]
    prompts = [f"Question {i}: what is {i} plus {2 * i}?" for i in range(6)]
    chats = [[{"role": "user", "content": f"Hello {i}"}] for i in range(3)]
    offline = LLM(model=str(memgen_reasoner_dir), memgen=str(memgen_ckpt_dir), dtype="float64", device="cpu")
    greedy = SamplingParams(max_tokens=10, temperature=0.0)
    ref = offline.generate(prompts, greedy, use_tqdm=False)
    ref_chat = offline.chat(chats, greedy, use_tqdm=False)
    _connect(cluster)
    with memgen_serve(args, tmp_path / "server.log") as (base, _):
        kw = dict(max_tokens=10, batch_size=4, stage_num_cpus=0.25)
        done = memgen_http_processor(base, "tiny", **kw)(
            ray.data.from_items([{"id": i, "prompt": p} for i, p in enumerate(prompts)])).take_all()
        done_chat = memgen_http_processor(base, "tiny", chat=True, **kw)(
            ray.data.from_items([{"id": i, "messages": m} for i, m in enumerate(chats)])).take_all()
    got = {r["id"]: r for r in done}
    assert sorted(got) == list(range(len(prompts)))
    for i, out in enumerate(ref):
        assert (got[i]["prompt"], got[i]["text"], got[i]["token_ids"]) == (prompts[i], out.text, out.token_ids)
        assert got[i]["augmentation"] == list(out.augmentation) and got[i]["finish_reason"] == out.finish_reason
    got_chat = {r["id"]: r for r in done_chat}
    for i, out in enumerate(ref_chat):
        assert (got_chat[i]["text"], got_chat[i]["token_ids"]) == (out.text, out.token_ids)


class SlowLLM:
    """The real engine, slowed per batch; each finished batch appends its node id to
    `progress`, so the test knows when both nodes have done work. A worker starts its
    second batch only once both nodes have finished one (or after a minute), so a
    worker that started late still gets work before the kill."""

    def __init__(self, progress: str, **llm_kwargs):
        from memgen import LLM

        self.llm = LLM(**llm_kwargs)
        self.progress = progress
        self.node = ray.get_runtime_context().get_node_id()
        self.batches = 0

    def __getattr__(self, name):
        return getattr(self.llm, name)

    def generate(self, *args, **kwargs):
        if self.batches == 1:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and len(set(Path(self.progress).read_text().split())) < 2:
                time.sleep(0.05)
        time.sleep(BATCH_DELAY_S)
        out = self.llm.generate(*args, **kwargs)
        self.batches += 1
        with open(self.progress, "a") as f:
            f.write(self.node + "\n")
        return out


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # from inside ray.data
def test_node_killed_mid_run_every_record_once(cluster, single_process, qwen2_dir, tmp_path):
    from memgen import SamplingParams
    from memgen.eval.ray_runner import run_eval_ray

    inp, expected = single_process
    _connect(cluster)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])    # SlowLLM, for the actors
    head, second = cluster.node_id(0), cluster.node_id(1)
    progress = tmp_path / "progress"
    killed = {}

    def kill_when_both_nodes_worked():
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            done = progress.read_text().split() if progress.exists() else []
            if {head, second} <= set(done):
                killed["after_batches"] = len(done)
                killed["at"] = cluster.kill_node(1)
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_when_both_nodes_worked, daemon=True)
    killer.start()
    cfg = EvalConfig(input=str(inp), output=str(tmp_path / "ray.jsonl"), batch_size=2, max_tokens=MAX_TOKENS,
                     progress=False)
    summary = run_eval_ray(cfg, num_workers=2, make_params=SamplingParams, address=cluster.address,
                           llm_factory=functools.partial(SlowLLM, str(progress), model=str(qwen2_dir),
                                                         dtype="float32", device="cpu"))
    ended = time.monotonic()
    killer.join(5)
    assert "at" in killed, "the run ended before both nodes had finished a batch"
    assert killed["after_batches"] < 8, "the node was killed after the last batch"
    assert _by_id(cfg.output) == expected                    # every record exactly once, as one process
    info = summary["ray"]
    assert info["nodes_lost"] == [second]
    by_node = {}
    for w in info["workers"]:
        by_node[w["node_id"]] = by_node.get(w["node_id"], 0) + w["records"]
    assert set(by_node) == {head, second} and sum(by_node.values()) == 16
    print(f"\nnode killed after {killed['after_batches']} of 8 batches; the run ended {ended - killed['at']:.1f} s "
          f"later on the head's worker; records per node {sorted(by_node.values())}, "
          f"{info['duplicates_dropped']} repeated result(s) dropped, 0 lost")
