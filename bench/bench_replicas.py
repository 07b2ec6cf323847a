"""Beyond one process, measured on this machine (issue 28's closing numbers):

1. throughput of `memgen serve --replicas 2` vs `--replicas 1`, both behind vllm-router,
   on the tests' tiny MemGen (closed loop: --concurrency clients, non-streaming greedy
   completions of exactly --max-tokens tokens, `ignore_eos`), runs alternated;
2. a replica killed (SIGKILL) under load, with clients that retry a failed request
   (3 tries, 0.5 s apart, as Ray Data's HTTP processor or any OpenAI client with
   max_retries does): how long until no request fails, requests lost (must be 0);
3. a Ray node killed (SIGKILL of its raylet) during `memgen eval --ray` on a 2-node
   cluster of `ray start` raylets on a loopback address (memgen.eval.ray_cluster):
   the same run with no kill beside it, the time until GCS marks the node dead and
   until the run ends, records lost (must be 0) and repeated.

    python bench/bench_replicas.py [--part replicas node] [--rounds 2] [--ray-defaults]
                                   [--output bench/results/replicas_cpu.json]

Everything runs on 127.0.0.x and stops by itself; each server gets OMP_NUM_THREADS=1.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
NAME = "tiny-memgen"


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _models(tmp: Path) -> tuple[str, str]:
    import fixtures
    import memgen_fixtures

    tok = fixtures.build_tokenizer(tmp / "tok")
    reasoner = memgen_fixtures.build_memgen_reasoner(tmp / "reasoner", tok)
    ckpt = memgen_fixtures.build_memgen_checkpoint(tmp / "ckpt", tok, reasoner)
    return str(reasoner), str(ckpt)


class Launcher:
    """`memgen serve --replicas N` on free ports of 127.0.0.1, until stop()."""

    def __init__(self, n: int, reasoner: str, ckpt: str, tmp: Path, policy: str = "round_robin"):
        from memgen.serve.processes import free_port

        self.port = free_port()
        while any(_busy(self.port + i) for i in range(1, n + 1)):
            self.port = free_port()
        self.log = tmp / f"replicas{n}.log"
        cmd = [sys.executable, "-m", "memgen.cli", "serve", "--replicas", str(n), "--port", str(self.port),
               "--model", reasoner, "--memgen", ckpt, "--dtype", "float32", "--device", "cpu",
               "--served-model-name", NAME, "--max-waiting", "100000", "--log-level", "warning",
               "--router-args", f"--policy {policy}"]
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                         env={**os.environ, "OMP_NUM_THREADS": "1",   # the venv's vllm-router too
                                              "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"})
        deadline = time.monotonic() + 300
        while "memgen serve --replicas: ready" not in self.log.read_text(errors="replace"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(self.log.read_text(errors="replace")[-3000:])
            time.sleep(0.2)
        text = self.log.read_text(errors="replace")
        self.replica_pids = [int(p) for p in re.findall(r"replica \d+ pid (\d+)", text)]
        self.replica_urls = re.findall(r"replica \d+ pid \d+ url (\S+)", text)
        self.url = f"http://127.0.0.1:{self.port}/v1/completions"

    def served(self) -> list[float]:
        """Requests each replica answered with 200 (its /metrics; a dead one: None)."""
        import httpx

        counts = []
        for url in self.replica_urls:
            try:
                text = httpx.get(f"{url}/metrics", timeout=10).text
            except httpx.HTTPError:
                counts.append(None)
                continue
            counts.append(sum(float(m.group(1)) for m in re.finditer(
                r'^memgen_requests_total\{.*status="200"\} (\S+)$', text, re.MULTILINE)))
        return counts

    def stop(self) -> None:
        from memgen.serve.processes import stop

        stop(self.proc, 60)


def _busy(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return False
        except OSError:
            return True


def _request(url: str, i: int, max_tokens: int, tries: int = 1, wait_s: float = 0.5) -> dict:
    import httpx

    body = {"model": NAME, "prompt": f"Question {i}: what is {i} plus {2 * i}?", "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True}
    errors = []
    for attempt in range(tries):
        t = time.monotonic()
        try:
            r = httpx.post(url, json=body, timeout=60)
            if r.status_code == 200:
                return {"ok": True, "t_end": time.monotonic(), "tokens": r.json()["usage"]["completion_tokens"],
                        "errors": errors}
            errors.append((t, f"HTTP {r.status_code}"))
        except httpx.HTTPError as e:
            errors.append((t, type(e).__name__))
        time.sleep(wait_s)
    return {"ok": False, "t_end": time.monotonic(), "tokens": 0, "errors": errors}


def _closed_loop(url: str, n: int, concurrency: int, max_tokens: int, tries: int = 1, on_done=None) -> dict:
    t0 = time.monotonic()
    with ThreadPoolExecutor(concurrency) as pool:
        futures = [pool.submit(_request, url, i, max_tokens, tries) for i in range(n)]
        results = []
        for f in futures:
            results.append(f.result())
            if on_done:
                on_done(results)
    wall = time.monotonic() - t0
    tokens = sum(r["tokens"] for r in results)
    return {"wall_s": round(wall, 3), "tokens": tokens, "tokens_per_s": round(tokens / wall, 1),
            "requests_ok": sum(r["ok"] for r in results), "requests": n, "results": results}


def part_replicas(args, tmp: Path) -> dict:
    reasoner, ckpt = _models(tmp)
    out = {"throughput": {"1": [], "2": []}, "load_before": _load(), "policy": args.policy,
           "concurrency": args.concurrency, "requests": args.requests, "max_tokens": args.max_tokens}
    for rnd in range(args.rounds):
        for n in (1, 2) if rnd % 2 == 0 else (2, 1):
            launcher = Launcher(n, reasoner, ckpt, tmp, args.policy)
            try:
                _closed_loop(launcher.url, args.concurrency, args.concurrency, 4)       # warm-up
                before = launcher.served()
                r = _closed_loop(launcher.url, args.requests, args.concurrency, args.max_tokens)
                r["served_per_replica"] = [a - b for a, b in zip(launcher.served(), before)]
            finally:
                launcher.stop()
            r.pop("results")
            r["load"] = _load()
            out["throughput"][str(n)].append(r)
            print(f"replicas {n}: {r['tokens_per_s']} tok/s ({r['wall_s']} s, load {r['load']})", flush=True)
    best = {n: max(x["tokens_per_s"] for x in runs) for n, runs in out["throughput"].items()}
    out["best_tokens_per_s"] = best
    out["ratio_2_vs_1"] = round(best["2"] / best["1"], 3)

    # a replica killed under load, clients retrying
    launcher = Launcher(2, reasoner, ckpt, tmp, args.policy)
    kill, probes = {}, []

    def probe():
        """Right after the kill: short requests one after another, no retry, until 4 in a row
        succeed (what a client without retries sees while the router drops the replica)."""
        ok_in_a_row, deadline = 0, time.monotonic() + 60
        while ok_in_a_row < 4 and time.monotonic() < deadline:
            res = _request(launcher.url, 1000 + len(probes), 2, tries=1, wait_s=0.05)
            probes.append(res)
            ok_in_a_row = ok_in_a_row + 1 if res["ok"] else 0
        kill["probe_recovered"] = time.monotonic()

    prober = threading.Thread(target=probe, daemon=True)

    def on_done(results):
        if "at" not in kill and len(results) >= args.requests // 4:
            kill["at"] = time.monotonic()
            os.kill(launcher.replica_pids[0], signal.SIGKILL)
            prober.start()

    try:
        r = _closed_loop(launcher.url, args.requests, args.concurrency, args.max_tokens, tries=3, on_done=on_done)
        prober.join(70)
        served_after = launcher.served()
    finally:
        launcher.stop()
    errors = [t for res in r["results"] for t, _ in res["errors"]]
    after = [t - kill["at"] for t in errors if t >= kill["at"] - 1]
    out["replica_killed"] = {
        "requests": args.requests, "lost": args.requests - r["requests_ok"],
        "failed_attempts": len(errors), "requests_retried": sum(1 for res in r["results"] if res["errors"]),
        "last_failure_after_kill_s": round(max(after), 2) if after else 0.0,
        "kinds": sorted({k for res in r["results"] for _, k in res["errors"]}),
        "victim_dead": served_after[0] is None,
        "probe_failures_without_retry": sum(not p["ok"] for p in probes),
        "probe_recovered_after_kill_s": round(kill["probe_recovered"] - kill["at"], 2) if "probe_recovered" in kill
        else None,
        "wall_s": r["wall_s"], "tokens_per_s": r["tokens_per_s"], "load": _load()}
    print(f"replica killed: {out['replica_killed']}", flush=True)
    return out


class _SlowLLM:
    def __init__(self, delay_s: float, **kw):
        from memgen import LLM

        self.llm, self.delay_s = LLM(**kw), delay_s

    def __getattr__(self, name):
        return getattr(self.llm, name)

    def generate(self, *a, **k):
        time.sleep(self.delay_s)
        return self.llm.generate(*a, **k)


def part_node(args, tmp: Path) -> dict:
    import ray

    import fixtures
    from memgen import SamplingParams
    from memgen.eval.ray_cluster import LOCAL_ENV, LocalCluster, connect
    from memgen.eval.ray_runner import run_eval_ray
    from memgen.eval.records import iter_results
    from memgen.eval.runner import EvalConfig

    os.environ.update(LOCAL_ENV)
    tok = fixtures.build_tokenizer(tmp / "tok")
    model = str(fixtures.build_tiny_model(tmp / "qwen2", tok, arch="qwen2"))
    n = args.records
    inp = tmp / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"What is {i} plus {i}?", "answer": str(2 * i)})
                           + "\n" for i in range(n)))
    out = {"records": n, "batch_size": 2, "batch_delay_s": args.batch_delay, "load_before": _load()}
    t = time.monotonic()
    out["failure_detection"] = "ray defaults" if args.ray_defaults else "health checks 1 s apart, dead after 3 missed"
    with LocalCluster(num_nodes=2, num_cpus=1, fast_failure_detection=not args.ray_defaults) as cluster:
        out["cluster_start_s"] = round(time.monotonic() - t, 1)
        connect(cluster.address)
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
        second = cluster.node_id(1)
        factory = functools.partial(_SlowLLM, args.batch_delay, model=model, dtype="float32", device="cpu")

        def run(name, kill_after=None):
            cfg = EvalConfig(input=str(inp), output=str(tmp / f"{name}.jsonl"), batch_size=2, max_tokens=8,
                             progress=False)
            marks = {}

            def watch():
                while not Path(cfg.output).exists():
                    time.sleep(0.05)
                while kill_after is not None and "kill" not in marks:
                    if len(Path(cfg.output).read_text().splitlines()) >= kill_after:
                        marks["kill"] = cluster.kill_node(1)
                    time.sleep(0.02)
                while "kill" in marks and "dead" not in marks:
                    if not any(x["Alive"] for x in ray.nodes() if x["NodeID"] == second):
                        marks["dead"] = time.monotonic()
                    time.sleep(0.1)

            th = threading.Thread(target=watch, daemon=True)
            th.start()
            t0 = time.monotonic()
            summary = run_eval_ray(cfg, num_workers=2, llm_factory=factory, make_params=SamplingParams,
                                   address=cluster.address)
            end = time.monotonic()
            th.join(30)
            ids = [r["id"] for r in iter_results(cfg.output)]
            res = {"wall_s": round(end - t0, 1), "records_written": len(ids), "unique": len(set(ids)),
                   "lost": n - len(set(ids)), "duplicates_dropped": summary["ray"]["duplicates_dropped"],
                   "nodes": summary["ray"]["nodes"], "nodes_lost": len(summary["ray"]["nodes_lost"]),
                   "records_per_node": sorted(w["records"] for w in summary["ray"]["workers"]), "load": _load()}
            if "kill" in marks:
                res["killed_after_records"] = kill_after
                res["kill_to_marked_dead_s"] = round(marks["dead"] - marks["kill"], 1) if "dead" in marks else None
                res["kill_to_run_end_s"] = round(end - marks["kill"], 1)
            print(f"{name}: {res}", flush=True)
            return res

        out["no_kill"] = run("no_kill")
        out["node_killed"] = run("node_killed", kill_after=n // 4)
        ray.shutdown()
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", nargs="+", choices=["replicas", "node"], default=["replicas", "node"])
    p.add_argument("--rounds", type=int, default=2, help="alternated 1-vs-2 replica rounds")
    p.add_argument("--requests", type=int, default=48)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--policy", default="round_robin",
                   help="the router's --policy (its default cache_aware sends these shared-prefix prompts to one replica)")
    p.add_argument("--records", type=int, default=32, help="node part: records (2 per batch)")
    p.add_argument("--batch-delay", type=float, default=0.4, help="node part: seconds added per batch")
    p.add_argument("--ray-defaults", action="store_true",
                   help="node part: Ray's own health-check timing (default: LocalCluster's fast detection)")
    p.add_argument("--output", default=str(ROOT / "bench/results/replicas_cpu.json"))
    args = p.parse_args()
    result = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    try:
        result["commit"] = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                                          capture_output=True, text=True).stdout.strip()
    except OSError:
        pass
    path = Path(args.output)
    if path.exists():
        result = {**json.loads(path.read_text()), **result}
    with tempfile.TemporaryDirectory(prefix="bench-replicas-") as tmp:
        for part in args.part:
            key = part + ("_ray_defaults" if part == "node" and args.ray_defaults else "")
            result[key] = (part_replicas if part == "replicas" else part_node)(args, Path(tmp))
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
