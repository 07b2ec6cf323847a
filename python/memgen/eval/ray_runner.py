"""`memgen eval --ray`: the same evaluation through Ray Data. An actor pool of
`num_workers` actors, each holding one `LLM` (a GPU, or a share of one, when the
cluster has GPUs), generates and scores batches with `runner.process_batch`; the
driver alone appends results to the output file, batch by batch as they finish,
so its records, settings and resume behaviour are those of the single-process run
(only the order of the lines may differ: resume is keyed by id).

Ray is an optional extra: `pip install "memgen-engine[ray]"`. `ray.init()` joins
the cluster at `address` (`--ray-address HOST:PORT`, the head's GCS port), else the
one named by RAY_ADDRESS, else starts a local one. An address that does not answer
is refused at once (a ConnectionError naming it; `ray.init` itself would wait minutes).

Across nodes: Ray Data places the actors with its SPREAD strategy and every node
that fits an actor's resources gets some. A worker that dies (its process, or its
node: raylet gone, machine lost) loses only the batches it held: Ray Data's actor
pool retries them (max_task_retries=-1) on a live actor, restarting the dead actor
where resources allow (max_restarts=-1); the driver writes each record once (a
result for an id already written is dropped and counted), so the output holds every
record exactly once. If the driver's node (the head) dies the run stops; the same
command resumes it. Which worker and node produced each batch is counted in the
summary's `ray.workers` (docs/distributed.md).
"""
from __future__ import annotations

import functools
import json
import math
import os
import socket
import sys
from typing import Any, Callable

from memgen.eval.records import Record, record_key
from memgen.eval.runner import (
    EvalConfig, finish_run, make_progress, open_run, process_batch, record_written, run_settings,
)


def import_ray():
    try:
        import ray
        import ray.data
    except ImportError as e:
        raise ImportError(
            f'memgen eval --ray needs Ray Data ({e}); install it with: pip install "memgen-engine[ray]"'
        ) from None
    return ray


def gpus_per_worker(num_gpus: float, num_workers: int) -> float:
    """The GPUs each of `num_workers` actors reserves on a cluster with `num_gpus`:
    1 when there are enough, else an equal share such that whole shares pack onto
    every GPU (1/ceil(workers/GPUs): Ray places a fractional actor on a single GPU,
    so 2/3 each would fit only two of three actors on two GPUs). Ray then sets each
    actor's CUDA_VISIBLE_DEVICES, so no device holds more actors than its share
    allows; 0 without GPUs."""
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    num_gpus = int(num_gpus)          # a fractional GPU total cannot hold a whole share
    if num_gpus <= 0:
        return 0
    return 1 / math.ceil(num_workers / num_gpus)


def check_ray_address(address: str | None, timeout_s: float = 5.0) -> None:
    """Raise a one-line ConnectionError (ValueError for a malformed one) when a
    HOST:PORT (or ray://HOST:PORT) address does not accept a connection within
    `timeout_s`; "auto", "local" and None are left to Ray."""
    if address is None or address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[1] if "://" in address else address
    host, sep, port = hostport.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--ray-address {address!r}: expected HOST:PORT (the head node's GCS port, "
                         "6379 by default), ray://HOST:PORT, or auto")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except OSError as e:
        raise ConnectionError(f"--ray-address {address}: no Ray cluster answers there ({e.strerror or e}); "
                              "start one with `ray start --head` or give its head's address") from None


def _placement() -> dict[str, str]:
    """This process's Ray worker: its actor id, node id and node address."""
    import ray

    ctx = ray.get_runtime_context()
    actor = ctx.get_actor_id() or f"pid-{os.getpid()}"
    return {"worker": actor, "node_id": ctx.get_node_id(), "node_ip": ray.util.get_node_ip_address()}


class _EvalActor:
    """One engine per actor, built once; called with rows that each hold one batch
    of serialized records. Each result row carries the actor and node it ran on."""

    def __init__(self, llm_factory: Callable[[], Any], cfg: EvalConfig,
                 make_params: Callable[..., Any] | None = None):
        self.llm = llm_factory()
        self.cfg = cfg
        self.make_params = make_params
        self.placement = json.dumps(_placement())

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        results = []
        for row in batch["records"]:
            records = [Record(**r) for r in json.loads(row)]
            results += process_batch(self.llm, records, self.cfg, self.make_params)
        return {"result": np.array([json.dumps(r) for r in results], dtype=object),
                "placement": np.array([self.placement] * len(results), dtype=object)}


class _Placements:
    """Per worker: its node and how many batches and records of this run it wrote."""

    def __init__(self):
        self.workers: dict[str, dict[str, Any]] = {}

    def add(self, placement: str, batch: int) -> None:
        p = json.loads(placement)
        w = self.workers.setdefault(p["worker"], {**p, "batches": set(), "records": 0})
        w["batches"].add(batch)
        w["records"] += 1

    def summary(self) -> list[dict[str, Any]]:
        return [{**w, "batches": len(w["batches"])} for w in self.workers.values()]


def _llm_factory(llm_kwargs: dict[str, Any]):
    from memgen import LLM

    return LLM(**llm_kwargs)


def run_eval_ray(cfg: EvalConfig, llm_kwargs: dict[str, Any] | None = None,
                 num_workers: int | None = None, llm_factory: Callable[[], Any] | None = None,
                 make_params: Callable[..., Any] | None = None,
                 ray_init_kwargs: dict[str, Any] | None = None, address: str | None = None) -> dict[str, Any]:
    """Run (or resume) an evaluation on a Ray cluster; returns the summary it wrote.
    `llm_factory` (picklable, called once per actor) overrides `llm_kwargs`.
    `address`: the cluster to join (HOST:PORT of its head, ray://..., auto); default
    RAY_ADDRESS, else a local cluster."""
    ray = import_ray()
    if llm_factory is None:
        llm_factory = functools.partial(_llm_factory, dict(llm_kwargs or {}))
    if not ray.is_initialized():
        check_ray_address(address or os.environ.get("RAY_ADDRESS") or None)   # before the output is taken
    state = open_run(cfg, run_settings(cfg, llm_kwargs))    # a settings mismatch stops before Ray starts
    placements = _Placements()
    duplicates = 0
    try:
        if not ray.is_initialized():
            init_kwargs = dict(ray_init_kwargs or {})
            if address is not None:
                init_kwargs["address"] = address
            ray.init(**init_kwargs)
        alive_at_start = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        num_gpus = int(ray.cluster_resources().get("GPU", 0))
        if str((llm_kwargs or {}).get("device", "auto")) == "cpu":
            num_gpus = 0                  # engines on the CPU reserve no GPU
        if num_workers is None:
            num_workers = max(1, num_gpus)
        gpus_per_actor = gpus_per_worker(num_gpus, num_workers)
        if 0 < gpus_per_actor < 1 and not {"num_kv_blocks", "kv_cache_memory_gb"} & set(llm_kwargs or {}):
            print(f"memgen eval: warning: {round(1 / gpus_per_actor)} workers share each GPU and each engine "
                  "sizes its KV cache from the memory free when it starts; give each a budget with "
                  "--engine-arg kv_cache_memory_gb=GiB", file=sys.stderr)
        with make_progress(cfg, state) as pbar:
            if state.pending:
                ctx = ray.data.DataContext.get_current()
                ctx.execution_options.preserve_order = False   # write each batch as soon as it is done
                # One row, and one block, per batch: each actor task is exactly one batch,
                # and its results reach the driver when that batch finishes.
                batch_of = {r.key: i // cfg.batch_size for i, r in enumerate(state.pending)}
                batches = [json.dumps([{"id": r.id, "line_no": r.line_no, "data": r.data, "task": r.task}
                                       for r in state.pending[i : i + cfg.batch_size]])
                           for i in range(0, len(state.pending), cfg.batch_size)]
                ds = ray.data.from_items([{"records": b} for b in batches],
                                         override_num_blocks=len(batches)).map_batches(
                    _EvalActor,
                    fn_constructor_kwargs={"llm_factory": llm_factory, "cfg": cfg, "make_params": make_params},
                    batch_size=1,
                    compute=ray.data.ActorPoolStrategy(size=num_workers),
                    num_gpus=gpus_per_actor,
                    batch_format="numpy",
                )
                for row in ds.iter_rows():
                    result = json.loads(row["result"])
                    if record_key(result["id"]) in state.writer.done:
                        duplicates += 1           # a retried batch's second result: written once already
                        continue
                    placements.add(row["placement"], batch_of[record_key(result["id"])])
                    record_written(state, pbar, result)
        lost = sorted(alive_at_start - {n["NodeID"] for n in ray.nodes() if n["Alive"]})
    except BaseException:
        state.writer.close()
        raise
    workers = placements.summary()
    if duplicates or lost:
        print(f"memgen eval --ray: {len(lost)} node(s) died during the run; {duplicates} repeated "
              "result(s) dropped; every record is written once", file=sys.stderr)
    return finish_run(cfg, state, {"ray": {"num_workers": num_workers, "gpus_per_worker": gpus_per_actor,
                                           "workers": workers, "nodes": len({w["node_id"] for w in workers}),
                                           "nodes_lost": lost, "duplicates_dropped": duplicates},
                                   "engine": llm_kwargs})

