"""`memgen eval --ray`: the same evaluation through Ray Data. An actor pool of
`num_workers` actors, each holding one `LLM` (a GPU, or a share of one, when the
cluster has GPUs), generates and scores batches with `runner.process_batch`; the
driver alone appends results to the output file, batch by batch as they finish,
so its records, settings and resume behaviour are those of the single-process run
(only the order of the lines may differ: resume is keyed by id).

Ray is an optional extra: `pip install "memgen-engine[ray]"`. `ray.init()` joins
the cluster named by RAY_ADDRESS, or starts a local one.
"""
from __future__ import annotations

import functools
import json
import math
import sys
from typing import Any, Callable

from memgen.eval.records import Record
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


class _EvalActor:
    """One engine per actor, built once; called with rows that each hold one batch
    of serialized records."""

    def __init__(self, llm_factory: Callable[[], Any], cfg: EvalConfig,
                 make_params: Callable[..., Any] | None = None):
        self.llm = llm_factory()
        self.cfg = cfg
        self.make_params = make_params

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        results = []
        for row in batch["records"]:
            records = [Record(**r) for r in json.loads(row)]
            results += process_batch(self.llm, records, self.cfg, self.make_params)
        return {"result": np.array([json.dumps(r) for r in results], dtype=object)}


def _llm_factory(llm_kwargs: dict[str, Any]):
    from memgen import LLM

    return LLM(**llm_kwargs)


def run_eval_ray(cfg: EvalConfig, llm_kwargs: dict[str, Any] | None = None,
                 num_workers: int | None = None, llm_factory: Callable[[], Any] | None = None,
                 make_params: Callable[..., Any] | None = None,
                 ray_init_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run (or resume) an evaluation on a Ray cluster; returns the summary it wrote.
    `llm_factory` (picklable, called once per actor) overrides `llm_kwargs`."""
    ray = import_ray()
    if llm_factory is None:
        llm_factory = functools.partial(_llm_factory, dict(llm_kwargs or {}))
    state = open_run(cfg, run_settings(cfg, llm_kwargs))    # a settings mismatch stops before Ray starts
    try:
        if not ray.is_initialized():
            ray.init(**(ray_init_kwargs or {}))
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
                    record_written(state, pbar, json.loads(row["result"]))
    except BaseException:
        state.writer.close()
        raise
    return finish_run(cfg, state, {"ray": {"num_workers": num_workers, "gpus_per_worker": gpus_per_actor},
                                   "engine": llm_kwargs})
