"""`memgen eval --memgen a=DIR_A --memgen b=DIR_B`: several MemGen checkpoints in one
pass over the data, on one engine (one copy of the base model).

Every record runs on every checkpoint: a batch of `--batch-size` records becomes
`batch-size x checkpoints` requests in one `generate` call (the record tagged with
its checkpoint, `SamplingParams.memgen_checkpoint`), so the checkpoints' rows batch
together in each engine step. Each record keeps its seed (from the run seed and its
id, as in a single run), so a checkpoint's records equal those of a run of that
checkpoint alone.

Output: one file per checkpoint, `<output stem>.<name>.jsonl` (with its own
`.summary.json` and `.settings.json`), each holding what `memgen eval --memgen DIR`
of that checkpoint alone writes, plus a `"checkpoint": NAME` field per record; each
resumes on its own (also by a single-checkpoint run with -o that file). The summary
path (`<output stem>.summary.json`) gets {"checkpoints": {name: that checkpoint's
summary}}, and a table per checkpoint is printed.
"""
from __future__ import annotations

import dataclasses
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable

from memgen.eval.records import write_json_atomic
from memgen.eval.runner import (
    EvalConfig, check_settings, default_sampling_params, finish_run, make_progress, open_run, process_batch,
    record_written, run_settings,
)


def checkpoint_file_name(name: str) -> str:
    """A checkpoint name as a file-name part ('sft-run/export' -> 'sft-run_export')."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "checkpoint"


def checkpoint_configs(cfg: EvalConfig, checkpoints: dict[str, Any]) -> dict[str, EvalConfig]:
    """Each checkpoint's EvalConfig: its own output (`<stem>.<name>.jsonl`) and summary
    beside it. ValueError when two names give the same file."""
    out = Path(cfg.output)
    stem, suffix = (out.stem, out.suffix) if out.suffix == ".jsonl" else (out.name, ".jsonl")
    configs, seen = {}, {}
    for name in checkpoints:
        part = checkpoint_file_name(name)
        if part in seen:
            raise ValueError(f"checkpoints {seen[part]!r} and {name!r} would write the same output file "
                             f"({stem}.{part}{suffix}): rename one")
        seen[part] = name
        configs[name] = dataclasses.replace(cfg, output=str(out.with_name(f"{stem}.{part}{suffix}")), summary=None)
    return configs


def checkpoint_settings(cfg: EvalConfig, llm_kwargs: dict[str, Any], path) -> dict[str, Any]:
    """The settings recorded beside one checkpoint's output: a single run's of that
    checkpoint (memgen = its directory), so either kind of run resumes it."""
    return run_settings(cfg, {**llm_kwargs, "memgen": path})


def check_checkpoint_outputs(cfg: EvalConfig, checkpoints: dict[str, Any], llm_kwargs: dict[str, Any]) -> None:
    """Before the model loads: an existing output of another run's settings stops the run."""
    for name, ccfg in checkpoint_configs(cfg, checkpoints).items():
        if not cfg.overwrite and Path(ccfg.output).is_file() and os.path.getsize(ccfg.output):
            check_settings(ccfg, checkpoint_settings(ccfg, llm_kwargs, checkpoints[name]))


def evaluate_checkpoints(llm: Any, cfg: EvalConfig, checkpoints: dict[str, Any],
                         llm_kwargs: dict[str, Any] | None = None,
                         make_params: Callable[..., Any] | None = None,
                         extra_summary: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run (or resume) `cfg` on each of `llm`'s checkpoints (`checkpoints`: name -> the
    directory it was loaded from, recorded in the settings) in one pass; returns
    {"checkpoints": {name: summary}, ...}, also written to cfg.summary_path."""
    make_params = make_params or default_sampling_params()
    llm_kwargs = dict(llm_kwargs or {})
    configs = checkpoint_configs(cfg, checkpoints)
    states = {}
    try:
        for name, ccfg in configs.items():
            states[name] = open_run(ccfg, checkpoint_settings(ccfg, llm_kwargs, checkpoints[name]))
    except BaseException:
        for state in states.values():
            state.writer.close()
        raise
    names = list(configs)
    pending = {name: {r.key for r in state.pending} for name, state in states.items()}
    records = states[names[0]].records
    todo = [r for r in records if any(r.key in pending[name] for name in names)]
    total = dataclasses.replace(states[names[0]], records=records * len(names),
                                pending=[r for name in names for r in states[name].pending])
    try:
        with make_progress(cfg, total) as pbar:
            for start in range(0, len(todo), cfg.batch_size):
                batch = todo[start : start + cfg.batch_size]
                tagged = [dataclasses.replace(r, checkpoint=name) for name in names for r in batch
                          if r.key in pending[name]]
                for record, result in zip(tagged, process_batch(llm, tagged, cfg, make_params)):
                    record_written(states[record.checkpoint], pbar, result)
    except BaseException:
        for state in states.values():
            state.writer.close()
        raise
    summaries = {}
    for name in names:
        extra = {**(extra_summary or {}), "checkpoint": name, "checkpoint_path": str(checkpoints[name])}
        summaries[name] = finish_run(configs[name], states[name], extra)
    combined = {"input": cfg.input, "checkpoints": summaries,
                "outputs": {name: configs[name].output for name in names},
                "summaries": {name: configs[name].summary_path for name in names}}
    write_json_atomic(cfg.summary_path, combined)
    return combined


def print_checkpoint_table(combined: dict[str, Any], stream=None) -> None:
    """One row per checkpoint: records, accuracy per task, tokens, insertions per request."""
    stream = stream or sys.stdout
    summaries = combined["checkpoints"]
    tasks = sorted({task for s in summaries.values() for task in s["tasks"]})
    width = max([10] + [len(name) for name in summaries])
    head = f"{'checkpoint':<{width}}  {'records':>9}  " + "".join(f"{t + ' acc':>11}  " for t in tasks) + \
        f"{'out tok':>8}  {'ins/req':>7}  {'errors':>6}  output"
    print(head, file=stream)
    for name, s in summaries.items():
        accs = "".join(f"{_num(s['tasks'].get(t, {}).get('accuracy')):>11}  " for t in tasks)
        print(f"{name:<{width}}  {s['num_records']:>4}/{s['num_input_records']:<4}  {accs}"
              f"{_num(s['mean_output_tokens'], 1):>8}  {_num(s['insertions_per_request'], 2):>7}  "
              f"{s['num_errors']:>6}  {s['output']}", file=stream)


def _num(x, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}f}"
