"""The `memgen eval` loop: input JSONL -> generations in batches through an `LLM`
-> scored records appended to a resumable output JSONL -> a metrics summary JSON.

`process_batch` is the one place a batch is generated and scored; the
single-process loop here and the Ray path (`ray_runner.py`) both call it, which is
what makes their outputs the same. Each record's sampling seed is derived from
the run seed and the record id, so a record's output depends on neither its
batch nor whether the run was resumed.

The settings that shape the records (`run_settings`) are written beside the
output (`<output stem>.settings.json`) when a run starts; a resume with other
settings stops instead of mixing records made two ways under one summary.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import inspect
import json
import math
import os
import sys
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from memgen.model_options import add_engine_arguments, add_model_arguments, engine_option_kwargs, llm_kwargs
from memgen.eval.records import (
    Record, ResultWriter, iter_results, read_records, report_errors, write_json_atomic,
)
from memgen.eval.tasks import TASKS, Score, score


@dataclass
class EvalConfig:
    input: str
    output: str
    summary: str | None = None        # None: the output path with ".summary.json"
    task: str | None = None           # default task for records that name none
    batch_size: int = 32
    seed: int = 0
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    chat: bool = False                # send "prompt" strings as one user message
    strict: bool = False              # stop at the first bad input line
    limit: int | None = None          # only the first N valid records
    code_timeout: float = 5.0
    score_workers: int = 2            # parallel code-test subprocesses
    progress: bool = True
    overwrite: bool = False           # discard an existing output instead of resuming it
    # --dataset: the reference's protocol for an original dataset file (eval/protocols)
    dataset: str | None = None
    split: str | None = None          # split of a save_to_disk DatasetDict (default: the protocol's)
    retriever: str = "http://127.0.0.1:8001/retrieve"   # triviaqa: the reference's URL, or a JSONL corpus
    retrieval_topk: int = 3
    max_turns: int = 5
    gpqa_order: str = "memgen"        # gpqa: "memgen" (seeded per record) | "reference" | "reference:SEED"

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.task is not None and self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; expected one of {', '.join(TASKS)}")
        if self.limit is not None and self.limit < 0:
            raise ValueError(f"limit must be >= 0, got {self.limit}")
        if not self.code_timeout > 0:
            raise ValueError(f"code_timeout must be > 0, got {self.code_timeout}")
        if self.dataset is not None:
            from memgen.eval.protocols import DATASETS

            if self.dataset not in DATASETS:
                raise ValueError(f"unknown dataset {self.dataset!r}; expected one of {', '.join(DATASETS)}")
            if self.task is not None:
                raise ValueError("--task applies to a plain JSONL input; --dataset scores with its own reward")
        if self.gpqa_order != "memgen":
            from memgen.eval.dataset_runner import parse_gpqa_order

            parse_gpqa_order(self.gpqa_order)
            if self.dataset != "gpqa":
                raise ValueError("--gpqa-order applies to --dataset gpqa")
        if self.retrieval_topk < 1 or self.max_turns < 1:
            raise ValueError("retrieval_topk and max_turns must be >= 1")

    def _beside_output(self, suffix: str) -> str:
        out = Path(self.output)
        return str(out.with_name((out.stem if out.suffix == ".jsonl" else out.name) + suffix))

    @property
    def summary_path(self) -> str:
        return self.summary or self._beside_output(".summary.json")

    @property
    def settings_path(self) -> str:
        return self._beside_output(".settings.json")


# EvalConfig fields that change the records (sampling, scoring, the default task).
_OUTPUT_FIELDS = ("task", "seed", "max_tokens", "temperature", "top_p", "top_k", "chat", "code_timeout")
# recorded only for --dataset runs (so outputs recorded before they existed still resume)
_DATASET_FIELDS = ("dataset", "split")
_SEARCH_FIELDS = ("retriever", "retrieval_topk", "max_turns")
# LLM(...) keywords that change speed or memory but not outputs: the engine is exact
# across them (Triton vs torch and graphs vs eager differ only at near-ties, as batch
# composition does). `seed` seeds only requests without their own, and every eval
# request has one. Every other keyword, --engine-arg ones included, is recorded.
_NOT_OUTPUT_SHAPING = frozenset({
    "max_num_seqs", "max_num_batched_tokens", "block_size", "num_kv_blocks", "kv_cache_memory_gb",
    "enable_prefix_caching", "enforce_eager", "lazy_memgen_streams", "attention_backend", "seed"})
_PATH_KEYS = ("model", "memgen", "weaver_model", "trigger_model")


def run_settings(cfg: EvalConfig, llm_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """The settings that shape the output records: `cfg`'s sampling and scoring
    fields and the LLM(...) keywords (model, checkpoint, dtype, ...), as JSON reads
    them back. Not batch size, workers or other speed knobs, nor the input path (an
    input may grow between resumes; records are matched by id)."""
    fields = _OUTPUT_FIELDS
    if cfg.dataset is not None:
        fields += _DATASET_FIELDS + (_SEARCH_FIELDS if cfg.dataset == "triviaqa" else ())
    settings = {name: getattr(cfg, name) for name in fields}
    if cfg.dataset == "gpqa" and cfg.gpqa_order != "memgen":    # (outputs from before it still resume)
        settings["gpqa_order"] = cfg.gpqa_order
    if cfg.dataset == "triviaqa" and not cfg.retriever.startswith(("http://", "https://")):
        settings["retriever"] = os.path.abspath(os.path.expanduser(cfg.retriever))
    for key, value in sorted((llm_kwargs or {}).items()):
        if key in _NOT_OUTPUT_SHAPING:
            continue
        if key in _PATH_KEYS and isinstance(value, (str, os.PathLike)):
            value = os.path.abspath(os.path.expanduser(value))   # the same model from another cwd
        settings[key] = value
    return json.loads(json.dumps(settings, default=str))


def check_settings(cfg: EvalConfig, settings: dict[str, Any]) -> bool:
    """Raise ValueError if `cfg.output`'s recorded settings differ from `settings`;
    False when none are recorded (an output from before they were)."""
    path = Path(cfg.settings_path)
    if not path.is_file():
        return False
    try:
        old = json.loads(path.read_text())["settings"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"cannot read the settings of {cfg.output} from {path} ({e}); write this run to a "
                         "new -o path, or pass --overwrite to discard the old output") from None
    missing = "(not recorded)"
    diffs = [f"{k}: {old.get(k, missing)!r} -> {settings.get(k, missing)!r}"
             for k in sorted(set(old) | set(settings)) if old.get(k, missing) != settings.get(k, missing)]
    if diffs:
        raise ValueError(f"{cfg.output} holds records made with other settings ({', '.join(diffs)}); "
                         "write this run to a new -o path, or pass --overwrite to discard them and start afresh")
    return True


def derive_seed(run_seed: int, record_key: str) -> int:
    """A record's sampling seed: a hash of (run seed, record id), below 2**31."""
    digest = hashlib.sha256(f"{run_seed}\x00{record_key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % (2**31 - 1)


def default_sampling_params() -> Callable[..., Any]:
    from memgen import SamplingParams

    return SamplingParams


def _accepts(fn: Callable, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _jsonable(x: Any) -> Any:
    """Engine metrics as plain JSON (numpy/torch scalars -> numbers, NaN -> None)."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "item") and callable(x.item):
        try:
            x = x.item()
        except (TypeError, ValueError, RuntimeError):
            return str(x)
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if x is None or isinstance(x, (str, int, float, bool)):
        return x
    return str(x)


def checkpoint_kwargs(record: Record) -> dict[str, Any]:
    """SamplingParams' keyword for a record tagged with a MemGen checkpoint (a run of
    several, eval/checkpoints.py); none otherwise."""
    return {} if record.checkpoint is None else {"memgen_checkpoint": record.checkpoint}


def _call(llm: Any, records: Sequence[Record], params: list[Any], as_chat: list[bool]) -> list[Any]:
    """One generate call for raw prompts and one chat call for conversations;
    outputs in `records` order."""
    outs: list[Any] = [None] * len(records)
    text_idx = [i for i, c in enumerate(as_chat) if not c]
    chat_idx = [i for i, c in enumerate(as_chat) if c]
    if text_idx:
        kwargs = {"use_tqdm": False} if _accepts(llm.generate, "use_tqdm") else {}
        got = llm.generate([records[i].data["prompt"] for i in text_idx], [params[i] for i in text_idx], **kwargs)
        for i, o in zip(text_idx, got):
            outs[i] = o
    if chat_idx:
        convs = [records[i].data["messages"] if records[i].is_chat
                 else [{"role": "user", "content": records[i].data["prompt"]}] for i in chat_idx]
        kwargs = {"use_tqdm": False} if _accepts(llm.chat, "use_tqdm") else {}
        got = llm.chat(convs, [params[i] for i in chat_idx], **kwargs)
        for i, o in zip(chat_idx, got):
            outs[i] = o
    if any(o is None for o in outs):
        raise RuntimeError("the LLM returned fewer outputs than prompts")
    return outs


def _generate_all(llm: Any, records: Sequence[Record], params: list[Any],
                  chat: bool) -> tuple[list[Any], list[str | None]]:
    """Outputs and per-record errors. The API rejects bad input (a prompt longer
    than max_model_len, ...) with ValueError/TypeError before it runs anything; then
    the batch is retried one record at a time so one bad record fails alone."""
    as_chat = [r.is_chat or chat for r in records]
    try:
        return _call(llm, records, params, as_chat), [None] * len(records)
    except (ValueError, TypeError):
        pass
    outs: list[Any] = []
    errors: list[str | None] = []
    for r, p, c in zip(records, params, as_chat):
        try:
            outs.append(_call(llm, [r], [p], [c])[0])
            errors.append(None)
        except (ValueError, TypeError) as e:
            outs.append(None)
            errors.append(f"{type(e).__name__}: {e}")
    return outs, errors


def process_batch(llm: Any, records: Sequence[Record], cfg: EvalConfig,
                  make_params: Callable[..., Any] | None = None) -> list[dict[str, Any]]:
    """Generate and score one batch; returns output records in input order."""
    make_params = make_params or default_sampling_params()
    if cfg.dataset is not None:
        from memgen.eval.dataset_runner import process_dataset_batch

        return process_dataset_batch(llm, records, cfg, make_params)
    seeds = [derive_seed(cfg.seed, r.key) for r in records]
    params = [make_params(max_tokens=cfg.max_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                          top_k=cfg.top_k, seed=s, **checkpoint_kwargs(r)) for r, s in zip(records, seeds)]
    outs, errors = _generate_all(llm, records, params, cfg.chat)

    def score_one(i: int):
        r = records[i]
        if r.task is None:
            return None
        if errors[i] is not None:
            return Score(0.0)      # an item the engine refused counts as not answered
        return score(r.task, outs[i].text, r.data, cfg.code_timeout)

    workers = max(1, min(cfg.score_workers, sum(r.task == "code" for r in records)))
    with ThreadPoolExecutor(workers) as pool:
        scores = list(pool.map(score_one, range(len(records))))

    results = []
    for r, o, err, sc, seed in zip(records, outs, errors, scores, seeds):
        source = {"messages": r.data["messages"]} if "messages" in r.data else {"prompt": r.data["prompt"]}
        res = {"id": r.id, "line": r.line_no, "task": r.task, **source, "seed": seed}
        if r.checkpoint is not None:
            res["checkpoint"] = r.checkpoint
        if err is None:
            res.update(text=o.text, token_ids=list(o.token_ids), num_prompt_tokens=len(o.prompt_token_ids),
                       augmentation=list(o.augmentation), finish_reason=o.finish_reason,
                       metrics=_jsonable(dict(getattr(o, "metrics", None) or {})))
        else:
            res.update(text="", token_ids=[], num_prompt_tokens=0, augmentation=[], finish_reason="error",
                       metrics={}, error=err)
        res.update(score=None if sc is None else sc.value, extracted=None if sc is None else sc.extracted)
        if sc is not None and sc.details:
            res["score_details"] = _jsonable(sc.details)
        results.append(_jsonable(res))
    return results


@dataclass
class RunState:
    """What `open_run` found: the records still to do and the open writer."""
    records: list[Record]
    pending: list[Record]
    writer: ResultWriter
    bad_lines: list[int]
    settings: dict[str, Any]
    started: float = dataclasses.field(default_factory=time.perf_counter)
    generated_records: int = 0
    generated_tokens: int = 0


def open_run(cfg: EvalConfig, settings: dict[str, Any]) -> RunState:
    """Read the input, take the output (resumed, or emptied with `cfg.overwrite`)
    and record `settings` (from `run_settings`) beside it."""
    if cfg.dataset is not None:
        from memgen.eval.dataset_runner import load_dataset_records

        read = load_dataset_records(cfg)
    else:
        read = read_records(cfg.input, task=cfg.task, strict=cfg.strict)
    report_errors(read.errors)
    records = read.records if cfg.limit is None else read.records[: cfg.limit]
    writer = ResultWriter(cfg.output, truncate=cfg.overwrite)
    try:
        if cfg.overwrite:
            Path(cfg.summary_path).unlink(missing_ok=True)    # it described the discarded records
        elif writer.done and not check_settings(cfg, settings):
            print(f"memgen eval: warning: {cfg.output} has no recorded settings (written by an older "
                  "memgen); resuming it without checking that they match this run's", file=sys.stderr)
        # under the output's lock, before any record of this run is written
        write_json_atomic(cfg.settings_path, {"settings": settings})
    except BaseException:
        writer.close()
        raise
    if writer.num_torn_bytes:
        print(f"memgen eval: dropped a torn last line ({writer.num_torn_bytes} bytes) "
              f"of {cfg.output}; that record is redone", file=sys.stderr)
    pending = [r for r in records if r.key not in writer.done]
    return RunState(records, pending, writer, [e.line_no for e in read.errors], settings)


def make_progress(cfg: EvalConfig, state: RunState):
    from tqdm.auto import tqdm

    return tqdm(total=len(state.records), initial=len(state.records) - len(state.pending),
                unit="req", desc="memgen eval", disable=not cfg.progress, dynamic_ncols=True)


def record_written(state: RunState, pbar, result: dict[str, Any]) -> None:
    state.writer.append(result)
    state.generated_records += 1
    state.generated_tokens += len(result["token_ids"])
    elapsed = time.perf_counter() - state.started
    pbar.update(1)
    pbar.set_postfix(tok_s=f"{state.generated_tokens / max(elapsed, 1e-9):.1f}", refresh=False)


def summarize(cfg: EvalConfig, state: RunState, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Metrics over every record of the output file that belongs to this input."""
    wanted = {r.key for r in state.records}
    rows = [row for row in iter_results(cfg.output) if str(row["id"]) in wanted]
    per_task: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        if row.get("task") is not None and row.get("score") is not None:
            per_task[row["task"]].append(row)

    def mean(values: list[float]) -> float | None:
        return sum(values) / len(values) if values else None

    ok = [row for row in rows if "error" not in row]

    def metric(name: str) -> float | None:
        return mean([row["metrics"][name] for row in ok
                     if isinstance(row.get("metrics", {}).get(name), (int, float))])

    tasks = {}
    for task, trows in sorted(per_task.items()):
        scores = [row["score"] for row in trows]
        tasks[task] = {"count": len(trows), "accuracy": mean([float(s == 1.0) for s in scores]),
                       "mean_score": mean(scores)}
    elapsed = time.perf_counter() - state.started
    return {
        "input": cfg.input, "output": cfg.output,
        "num_records": len(rows), "num_input_records": len(state.records),
        "skipped_input_lines": state.bad_lines,
        "tasks": tasks,
        "num_errors": len(rows) - len(ok),
        "mean_output_tokens": mean([len(row["token_ids"]) for row in ok]),
        "mean_prompt_tokens": mean([row["num_prompt_tokens"] for row in ok]),
        "insertions_per_request": metric("num_insertions"),
        "trigger_calls_per_request": metric("num_trigger_calls"),
        "latent_positions_per_request": metric("num_latent_positions"),
        "mean_time_to_first_token_s": metric("time_to_first_token_s"),
        "mean_request_total_s": metric("total_s"),
        "finish_reasons": dict(Counter(row["finish_reason"] for row in rows)),
        "this_run": {"generated_records": state.generated_records,
                     "generated_tokens": state.generated_tokens,
                     "resumed_from_records": len(state.records) - len(state.pending),
                     "elapsed_s": elapsed,
                     "tokens_per_s": state.generated_tokens / elapsed if elapsed > 0 else None},
        "config": {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("progress", "overwrite")},
        "settings": state.settings,
        **(extra or {}),
    }


def finish_run(cfg: EvalConfig, state: RunState, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    state.writer.close()
    summary = summarize(cfg, state, extra)
    write_json_atomic(cfg.summary_path, summary)
    return summary


def evaluate(llm: Any, cfg: EvalConfig, make_params: Callable[..., Any] | None = None,
             extra_summary: dict[str, Any] | None = None,
             llm_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run (or resume) an evaluation in this process; returns the summary it wrote.
    `llm_kwargs`: the LLM(...) keywords `llm` was built with, recorded among the
    run's settings. A kill loses at most the batch being generated."""
    make_params = make_params or default_sampling_params()
    state = open_run(cfg, run_settings(cfg, llm_kwargs))
    try:
        with make_progress(cfg, state) as pbar:
            for start in range(0, len(state.pending), cfg.batch_size):
                batch = state.pending[start : start + cfg.batch_size]
                for result in process_batch(llm, batch, cfg, make_params):
                    record_written(state, pbar, result)
    except BaseException:
        state.writer.close()
        raise
    return finish_run(cfg, state, extra_summary)


# --------------------------------------------------------------------------- CLI

def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `memgen eval`. Model options the CLI already added to `parser`
    (shared with other subcommands) are left as they are."""
    parser.add_argument("input", help="input JSONL: prompt|messages, answer|aliases|tests, optional id, task; "
                                      "with --dataset: the dataset's file (JSONL, parquet) or save_to_disk directory")
    parser.add_argument("-o", "--output", default=None,
                        help="output JSONL, appended and resumable with the same settings "
                             "(default: ./<input stem>.eval.jsonl)")
    parser.add_argument("--overwrite", action="store_true",
                        help="discard an existing output and start afresh instead of resuming it")
    parser.add_argument("--summary", default=None, help="metrics JSON (default: <output stem>.summary.json)")
    parser.add_argument("--task", choices=TASKS, default=None,
                        help="task of records that name none (default: inferred from the reference field)")
    add_model_arguments(parser, seed_help=None, memgen_help=EVAL_MEMGEN_HELP, memgen_repeatable=True)
    add_engine_arguments(parser)
    from memgen.eval.protocols import DATASETS

    d = parser.add_argument_group("reference datasets (the MemGen reference's evaluation protocols)")
    d.add_argument("--dataset", choices=DATASETS, default=None,
                   help="read INPUT in this dataset's published schema, build the reference's prompts with "
                        "MemGen's chat template, score with its reward; defaults: --max-tokens 1024, greedy")
    d.add_argument("--split", default=None, help="split of a save_to_disk DatasetDict (default: test for gsm8k, "
                                                 "train for gpqa (diamond) and kodcode, validation for triviaqa)")
    d.add_argument("--prompts-only", action="store_true",
                   help="write one JSON line per record (id, messages, prompt) to -o (default stdout); "
                        "loads no model")
    d.add_argument("--retriever", default="http://127.0.0.1:8001/retrieve",
                   help="triviaqa: a URL speaking the reference's POST /retrieve (default: the reference's), "
                        "or a JSONL corpus for a local BM25 index")
    d.add_argument("--retrieval-topk", type=int, default=3, help="documents per search (default: 3, as the reference)")
    d.add_argument("--max-turns", type=int, default=5, help="triviaqa turns per episode (default: 5, as the reference)")
    d.add_argument("--gpqa-order", default="memgen", metavar="{memgen,reference,reference:SEED}",
                   help="gpqa option order: memgen (default) seeds each record's shuffle from --seed and its id; "
                        "reference replays the reference's random.seed(42) draw (gpqa_main's 448 rows, then "
                        "INPUT = gpqa_diamond in published order; see docs/API.md)")
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="most tokens to generate per record (default: 256; 1024 with --dataset)")
    parser.add_argument("--temperature", type=float, default=None, help="0 = greedy (default: 0)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep the top tokens of this mass")
    parser.add_argument("--top-k", type=int, default=0, help="keep the K most likely tokens (0: all)")
    parser.add_argument("--seed", type=int, default=0, help="run seed; each record's seed derives from it and its id")
    parser.add_argument("--batch-size", type=int, default=32, help="records per generate call (a kill loses only the batches being generated: one, "
                             "or one per --ray worker)")
    parser.add_argument("--chat", action="store_true", help="send 'prompt' strings as a single user chat message")
    parser.add_argument("--strict", action="store_true", help="stop at the first malformed input line")
    parser.add_argument("--limit", type=int, default=None, help="only the first N valid records (default: all)")
    parser.add_argument("--code-timeout", type=float, default=5.0, help="seconds per code-test subprocess")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--ray", action="store_true", help="run through Ray Data, one engine actor per worker")
    parser.add_argument("--num-workers", type=int, default=None,
                        help="Ray workers (default: the cluster's GPU count, else 1)")
    parser.add_argument("--ray-address", default=None, metavar="HOST:PORT",
                        help="join this Ray cluster (its head's GCS address, or auto); implies --ray "
                             "(default: $RAY_ADDRESS, else a local cluster; docs/distributed.md)")


EVAL_MEMGEN_HELP = ("MemGen checkpoint directory; or NAME=DIR, repeatable: several checkpoints evaluated in one "
                    "pass on one engine, each record on each, one output per checkpoint "
                    "(<output stem>.NAME.jsonl) and a table per checkpoint (default: none, a plain LLM)")


def _engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    from memgen.serve.model_ids import parse_memgen_flags

    memgen = parse_memgen_flags(args.memgen)
    if isinstance(memgen, dict) and len(memgen) == 1:     # one named checkpoint: a single run of it
        memgen = next(iter(memgen.values()))
    return {**llm_kwargs(args), "memgen": memgen, "seed": args.seed, **engine_option_kwargs(args)}


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    dataset = getattr(args, "dataset", None)
    generation = {"max_tokens": 256, "temperature": 0.0}
    if dataset is not None:
        from memgen.eval.protocols import get_protocol

        generation = get_protocol(dataset).generation     # the reference config's settings
    if getattr(args, "prompts_only", False):
        output = args.output or "-"
    else:
        output = args.output or f"{Path(args.input).stem}.eval.jsonl"
    return EvalConfig(
        input=args.input, output=output, summary=args.summary, task=args.task,
        batch_size=args.batch_size, seed=args.seed,
        max_tokens=generation["max_tokens"] if args.max_tokens is None else args.max_tokens,
        temperature=generation["temperature"] if args.temperature is None else args.temperature,
        top_p=args.top_p, top_k=args.top_k, chat=args.chat,
        strict=args.strict, limit=args.limit, code_timeout=args.code_timeout,
        progress=not args.no_progress, overwrite=args.overwrite, dataset=dataset,
        split=getattr(args, "split", None), retriever=getattr(args, "retriever", EvalConfig.retriever),
        retrieval_topk=getattr(args, "retrieval_topk", 3), max_turns=getattr(args, "max_turns", 5),
        gpqa_order=getattr(args, "gpqa_order", "memgen"))


def print_summary(summary: dict[str, Any], stream=None) -> None:
    stream = stream or sys.stdout
    run = summary["this_run"]
    print(f"records: {summary['num_records']}/{summary['num_input_records']} "
          f"(this run {run['generated_records']}, {run['generated_tokens']} tokens, "
          f"{run['tokens_per_s'] or 0:.1f} tok/s)", file=stream)
    for task, m in summary["tasks"].items():
        print(f"  {task:6s} n={m['count']:<6d} accuracy={m['accuracy']:.4f} mean_score={m['mean_score']:.4f}",
              file=stream)
    if summary["skipped_input_lines"]:
        print(f"  skipped input lines: {summary['skipped_input_lines'][:20]}", file=stream)
    print(f"output: {summary['output']}", file=stream)


def check_input(cfg: EvalConfig) -> None:
    """Before the model loads: the first bad line with --strict, and a ValueError
    when the input holds no valid record (an empty file, or every line invalid),
    which would otherwise end as a successful run over nothing."""
    read = read_records(cfg.input, task=cfg.task, strict=cfg.strict)
    if read.records:
        return
    if not read.errors:
        raise ValueError(f"{cfg.input} holds no record: it is empty or blank (expected one JSON object per line "
                         'with "prompt" or "messages")')
    n = len(read.errors)
    raise ValueError(f"{cfg.input} holds no valid record: {'its one line is' if n == 1 else f'all {n} lines are'} "
                     f"invalid; the first: {read.errors[0]}")


def run_eval_from_args(args: argparse.Namespace) -> int:
    """`memgen eval`: 0 on success; 2 (one line on stderr, as the CLI's other
    commands) on bad input, a missing file, or an output another run holds."""
    from memgen.eval.records import InputError

    try:
        cfg = config_from_args(args)
        if getattr(args, "prompts_only", False):
            if cfg.dataset is None:
                raise ValueError("--prompts-only needs --dataset (it writes that dataset's reference prompts)")
            from memgen.eval.dataset_runner import write_prompts

            write_prompts(cfg)
            return 0
        llm_kwargs = _engine_kwargs(args)
        if cfg.dataset is None and not Path(cfg.input).is_file():
            raise FileNotFoundError(f"no input file {cfg.input}")
        if cfg.dataset is not None:
            from memgen.eval.dataset_runner import check_before_loading

            check_before_loading(cfg)        # schema, split and retriever, before the model loads
        # say so before the model loads (open_run checks again under the output's lock)
        if cfg.dataset is None:
            check_input(cfg)
        if isinstance(llm_kwargs["memgen"], dict):      # several checkpoints (eval/checkpoints.py)
            return _run_checkpoints(args, cfg, llm_kwargs)
        if not cfg.overwrite and Path(cfg.output).is_file() and os.path.getsize(cfg.output):
            check_settings(cfg, run_settings(cfg, llm_kwargs))
        if args.ray or args.ray_address is not None:
            from memgen.eval.ray_runner import run_eval_ray

            summary = run_eval_ray(cfg, llm_kwargs=llm_kwargs, num_workers=args.num_workers,
                                   address=args.ray_address)
        else:
            from memgen import LLM

            summary = evaluate(LLM(**llm_kwargs), cfg, extra_summary={"engine": llm_kwargs},
                               llm_kwargs=llm_kwargs)
    except (InputError, ValueError, OSError, RuntimeError, ImportError) as e:
        print(f"memgen eval: error: {e}", file=sys.stderr)
        return 2
    print_summary(summary)
    print(f"summary: {cfg.summary_path}")
    return 0


def _run_checkpoints(args: argparse.Namespace, cfg: EvalConfig, llm_kwargs: dict[str, Any]) -> int:
    """`memgen eval --memgen a=DIR --memgen b=DIR ...`: one pass, one engine (errors as
    run_eval_from_args' own: its caller catches them)."""
    from memgen.eval.checkpoints import check_checkpoint_outputs, evaluate_checkpoints, print_checkpoint_table

    if args.ray:
        raise ValueError("--ray runs one checkpoint per run; evaluate several --memgen NAME=DIR in one process "
                         "(leave --ray out) or run each with --ray")
    checkpoints = dict(llm_kwargs["memgen"])
    shared = {k: v for k, v in llm_kwargs.items() if k != "memgen"}
    check_checkpoint_outputs(cfg, checkpoints, shared)
    from memgen import LLM

    combined = evaluate_checkpoints(LLM(**llm_kwargs), cfg, checkpoints, llm_kwargs=shared,
                                    extra_summary={"engine": llm_kwargs})
    print_checkpoint_table(combined)
    print(f"summary: {cfg.summary_path}")
    return 0
