"""`memgen eval --ray`: the same evaluation through Ray Data. An actor pool of
`num_workers` actors, each holding one `LLM` (one GPU each when the cluster has
GPUs), generates and scores batches with `runner.process_batch`; the driver alone
appends results to the output file, in input order, so the file, its resume
behaviour and its records are those of the single-process run.

Ray is an optional extra: `pip install "memgen-engine[ray]"`. `ray.init()` joins
the cluster named by RAY_ADDRESS, or starts a local one.
"""
from __future__ import annotations

import functools
import json
from typing import Any, Callable

from memgen.eval.records import Record
from memgen.eval.runner import (
    EvalConfig, finish_run, make_progress, open_run, process_batch, record_written,
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


class _EvalActor:
    """One engine per actor, built once; called with batches of serialized records."""

    def __init__(self, llm_factory: Callable[[], Any], cfg: EvalConfig,
                 make_params: Callable[..., Any] | None = None):
        self.llm = llm_factory()
        self.cfg = cfg
        self.make_params = make_params

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        records = [Record(**json.loads(s)) for s in batch["record"]]
        results = process_batch(self.llm, records, self.cfg, self.make_params)
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
    if not ray.is_initialized():
        ray.init(**(ray_init_kwargs or {}))
    num_gpus = int(ray.cluster_resources().get("GPU", 0))
    if num_workers is None:
        num_workers = max(1, num_gpus)
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    gpus_per_actor = 1 if num_gpus >= num_workers else 0

    state = open_run(cfg)
    try:
        with make_progress(cfg, state) as pbar:
            if state.pending:
                ctx = ray.data.DataContext.get_current()
                ctx.execution_options.preserve_order = True   # the file is in input order
                items = [{"record": json.dumps({"id": r.id, "line_no": r.line_no, "data": r.data,
                                                "task": r.task})} for r in state.pending]
                ds = ray.data.from_items(items).map_batches(
                    _EvalActor,
                    fn_constructor_kwargs={"llm_factory": llm_factory, "cfg": cfg, "make_params": make_params},
                    batch_size=cfg.batch_size,
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
