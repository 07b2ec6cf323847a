"""`memgen eval --dataset NAME`: records from an original dataset file (its
published schema), generated from MemGen-template prompts and scored with the
dataset's reference reward; `--prompts-only` writes the prompts without loading
a model. The output records, resume and summary are the runner's.

GPQA's option order (`--gpqa-order`): "memgen" (the default) seeds each record's
shuffle from the run seed and its id (protocols/gpqa.py); "reference" replays the
reference's draw. Its builder (data/gpqa/builder.py) shuffles each row's four
options with one `random.shuffle` of [0, 1, 2, 3] on Python's global `random`,
inside `datasets.map`, after main.py's `random.seed(run.seed)` (42 in
configs/latent_memory/gpqa.yaml) and nothing else drawn from it: first every
gpqa_main row (its train and valid parts, 404 + 44; numpy decides which rows go
where, which does not matter here since the shuffles depend only on how many came
before), then the gpqa_diamond rows in file order. A shuffle of four items
consumes the generator the same way whatever the items are, so diamond row k
(from 0) gets the shuffle number main_rows + k of `random.Random(run.seed)`.
"""
from __future__ import annotations

import functools
import json
import random
import sys
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

from memgen.eval.dataset_files import read_rows
from memgen.eval.protocols import get_protocol, render_prompt
from memgen.eval.records import InputError, ReadResult, Record, record_key


def load_dataset_records(cfg) -> ReadResult:
    """The records of `cfg.input` under `cfg.dataset`'s protocol; a row that does
    not fit its schema is an InputError (raised at once with `cfg.strict`)."""
    protocol = get_protocol(cfg.dataset)
    rows = read_rows(cfg.input, cfg.split, protocol.default_split)
    kind, order_seed = parse_gpqa_order(getattr(cfg, "gpqa_order", "memgen"))
    reference_orders = None
    if protocol.name == "gpqa" and kind == "reference":
        main_rows = gpqa_main_row_count(cfg.input)
        reference_orders = gpqa_reference_orders(order_seed, main_rows, len(rows))
    out = ReadResult()
    seen: dict[str, int] = {}
    for index, row in enumerate(rows):
        row_no = index + 1
        try:
            if not isinstance(row, dict):
                raise ValueError(f"expected an object, got {type(row).__name__}")
            rid = row.get(protocol.id_field) if protocol.id_field else None
            rid = index if rid is None or rid == "" else rid
            if not isinstance(rid, (str, int)) or isinstance(rid, bool):
                rid = str(rid)
            key = record_key(rid)
            if key in seen:
                raise ValueError(f"duplicate id {rid!r} (first in row {seen[key]})")
            data = protocol.build(row, rid, cfg.seed)
            if reference_orders is not None:
                data = gpqa_with_order(row, reference_orders[index])
                data["gpqa"].update(order_source="reference", reference_seed=order_seed,
                                    reference_draw=main_rows + index)
            seen[key] = row_no
            out.records.append(Record(rid, row_no, data, protocol.name))
        except ValueError as e:
            err = InputError(str(cfg.input), row_no, str(e))
            if cfg.strict:
                raise err from None
            out.errors.append(err)
    return out


GPQA_REFERENCE_SEED = 42        # run.seed of the reference's configs/latent_memory/gpqa.yaml
GPQA_MAIN_ROWS = 448            # the published gpqa_main (the reference's train 404 + valid 44)


def parse_gpqa_order(value: str) -> tuple[str, int | None]:
    """`--gpqa-order`: "memgen" -> ("memgen", None); "reference" -> ("reference", 42);
    "reference:N" (a reference run with run.seed=N) -> ("reference", N)."""
    kind, sep, seed = str(value).partition(":")
    if kind == "memgen" and not sep:
        return kind, None
    if kind == "reference":
        if not sep:
            return kind, GPQA_REFERENCE_SEED
        try:
            return kind, int(seed)
        except ValueError:
            pass
    raise ValueError(f"--gpqa-order {value!r}: expected memgen, reference or reference:SEED")


def gpqa_reference_orders(run_seed: int, main_rows: int, rows: int) -> list[list[int]]:
    """The option order the reference gives each of `rows` diamond rows: one shuffle
    of [0, 1, 2, 3] per gpqa_main row, then one per diamond row, from Python's
    `random` seeded with `run_seed` (see the module docstring)."""
    rng = random.Random(run_seed)
    for _ in range(main_rows):
        rng.shuffle([0, 1, 2, 3])
    orders = []
    for _ in range(rows):
        order = [0, 1, 2, 3]
        rng.shuffle(order)
        orders.append(order)
    return orders


_GPQA_MAIN_NAMES = ("gpqa_main.csv", "gpqa_main.parquet", "gpqa_main.jsonl", "gpqa_main.json", "gpqa_main")


def find_gpqa_main(input_path: str | Path) -> Path | None:
    """gpqa_main beside the diamond INPUT: INPUT's name with "diamond" -> "main", else
    gpqa_main.csv / .parquet / .jsonl / .json or a gpqa_main save_to_disk directory."""
    path = Path(input_path)
    names = ([path.name.replace("diamond", "main")] if "diamond" in path.name else []) + list(_GPQA_MAIN_NAMES)
    for name in names:
        candidate = path.parent / name
        if candidate.exists():
            if candidate.resolve() == path.resolve():
                raise ValueError(f"--gpqa-order reference replays the reference's test split, gpqa_diamond; "
                                 f"{path} is gpqa_main (the reference's train and valid rows)")
            return candidate
    return None


@functools.lru_cache(maxsize=8)
def gpqa_main_row_count(input_path: str) -> int:
    """How many shuffles the reference draws before the diamond rows: the rows of the
    gpqa_main found beside INPUT, else the published 448 (said once on stderr, as is
    a main file of another size)."""
    main = find_gpqa_main(input_path)
    if main is None:
        print(f"memgen eval: --gpqa-order reference: no gpqa_main beside {input_path}; assuming the published "
              f"gpqa_main ({GPQA_MAIN_ROWS} rows) was drawn before the diamond rows", file=sys.stderr)
        return GPQA_MAIN_ROWS
    count = len(read_rows(main, None, "train"))
    if count != GPQA_MAIN_ROWS:
        print(f"memgen eval: --gpqa-order reference: {main} has {count} rows, the published gpqa_main "
              f"{GPQA_MAIN_ROWS}; the option orders follow the reference as if it had read this file",
              file=sys.stderr)
    return count


def gpqa_with_order(row: dict[str, Any], order: list[int]) -> dict[str, Any]:
    """A GPQA record with its options in `order` (see protocols/gpqa.py)."""
    from memgen.eval.protocols import gpqa

    return gpqa.build_with_order(row, order)


def check_before_loading(cfg) -> None:
    """Stop before the model loads: an unreadable file or split, a row that does not
    fit the schema (with --strict), no usable record, an unreachable retriever."""
    read = load_dataset_records(cfg)
    if not read.records:
        first = f": {read.errors[0]}" if read.errors else ""
        raise ValueError(f"{cfg.input} holds no usable {cfg.dataset} record{first}")
    if get_protocol(cfg.dataset).multiturn:
        retriever = retriever_for(cfg.retriever, cfg.retrieval_topk)
        if hasattr(retriever, "check"):
            retriever.check()


def prompt_lines(cfg) -> list[dict[str, Any]]:
    """--prompts-only: {"id", "messages", "prompt"} per record (the first turn's
    chat for TriviaQA), with no model or tokenizer loaded."""
    from memgen.eval.records import report_errors

    read = load_dataset_records(cfg)
    report_errors(read.errors)
    records = read.records if cfg.limit is None else read.records[: cfg.limit]
    return [{"id": r.id, "messages": r.data["messages"], "prompt": render_prompt(r.data["messages"])}
            for r in records]


def write_prompts(cfg, stream=None) -> int:
    lines = prompt_lines(cfg)
    text = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)
    if cfg.output and cfg.output != "-":
        with open(cfg.output, "w", encoding="utf-8") as f:
            f.write(text)
        print(f"memgen eval: {len(lines)} prompts written to {cfg.output}", file=sys.stderr)
    else:
        (stream or sys.stdout).write(text)
    return len(lines)


def generate_ids(llm, prompts: list[list[int]], params: list[Any]) -> tuple[list[Any], list[str | None]]:
    """One generate call; if the API refuses it (ValueError/TypeError before anything
    runs, e.g. a prompt over max_model_len), one call per prompt so a bad one fails alone."""
    from memgen.eval.runner import _accepts

    kwargs = {"use_tqdm": False} if _accepts(llm.generate, "use_tqdm") else {}
    try:
        return list(llm.generate(prompts, params, **kwargs)), [None] * len(prompts)
    except (ValueError, TypeError):
        pass
    outs, errors = [], []
    for ids, p in zip(prompts, params):
        try:
            outs.append(llm.generate([ids], [p], **kwargs)[0])
            errors.append(None)
        except (ValueError, TypeError) as e:
            outs.append(None)
            errors.append(f"{type(e).__name__}: {e}")
    return outs, errors


def _params_factory(cfg, make_params: Callable[..., Any]):
    from memgen.eval.runner import _accepts, checkpoint_kwargs, derive_seed

    stop = {"stop": ["</search>"]} if _accepts(make_params, "stop") else {}

    def params(record: Record, turn: int = 0, multiturn: bool = False):
        seed = derive_seed(cfg.seed, record.key if turn == 0 else f"{record.key}#turn{turn}")
        return make_params(max_tokens=cfg.max_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                           top_k=cfg.top_k, seed=seed, **(stop if multiturn else {}), **checkpoint_kwargs(record))
    return params


def _result(record: Record, seed: int, score) -> dict[str, Any]:
    reference = {k: v for k, v in record.data.items() if k != "messages"}
    res = {"id": record.id, "line": record.line_no, "task": record.task, "messages": record.data["messages"],
           "seed": seed, "reference": reference}
    if record.checkpoint is not None:
        res["checkpoint"] = record.checkpoint
    if score is not None:
        res.update(score=score.value, extracted=score.extracted)
        if score.details:
            res["score_details"] = score.details
    return res


def process_dataset_batch(llm, records: Sequence[Record], cfg, make_params: Callable[..., Any],
                          retriever=None) -> list[dict[str, Any]]:
    from memgen.eval.runner import _jsonable, derive_seed
    from memgen.eval.tasks import Score

    protocol = get_protocol(cfg.dataset)
    params = _params_factory(cfg, make_params)
    seeds = [derive_seed(cfg.seed, r.key) for r in records]
    if protocol.multiturn:
        return [_jsonable(r) for r in _multiturn_results(llm, records, cfg, params, retriever, seeds)]
    prompts = [llm.tokenizer(render_prompt(r.data["messages"]), add_special_tokens=False)["input_ids"]
               for r in records]
    outs, errors = generate_ids(llm, prompts, [params(r) for r in records])

    def score_one(i: int):
        if errors[i] is not None:
            return Score(0.0)       # a record the engine refused counts as not answered
        return protocol.score(outs[i].text, records[i].data)

    workers = max(1, min(cfg.score_workers, len(records))) if protocol.name == "kodcode" else 1
    with ThreadPoolExecutor(workers) as pool:
        scores = list(pool.map(score_one, range(len(records))))
    results = []
    for r, prompt, out, err, sc, seed in zip(records, prompts, outs, errors, scores, seeds):
        res = _result(r, seed, sc)
        if err is None:
            res.update(text=out.text, token_ids=list(out.token_ids), num_prompt_tokens=len(prompt),
                       augmentation=list(out.augmentation), finish_reason=out.finish_reason,
                       metrics=dict(getattr(out, "metrics", None) or {}))
        else:
            res.update(text="", token_ids=[], num_prompt_tokens=0, augmentation=[], finish_reason="error",
                       metrics={}, error=err)
        results.append(_jsonable(res))
    return results


@functools.lru_cache(maxsize=4)
def retriever_for(spec: str, topk: int):
    """One retriever per process (a BM25 index is built once, also in each Ray worker)."""
    from memgen.eval.retrievers import make_retriever

    return make_retriever(spec, topk)


def _multiturn_results(llm, records, cfg, params, retriever, seeds):
    from memgen.eval.multiturn import run_episodes
    from memgen.eval.tasks import Score

    retriever = retriever or retriever_for(cfg.retriever, cfg.retrieval_topk)
    episodes = run_episodes(llm, records, lambda r, turn: params(r, turn, multiturn=True), retriever,
                            generate_ids, max_turns=cfg.max_turns)
    results = []
    for r, e, seed in zip(records, episodes, seeds):
        res = _result(r, seed, Score(e.reward, e.answer))
        res.update(text=render_prompt(e.messages, add_generation_prompt=False), token_ids=e.token_ids,
                   num_prompt_tokens=e.num_prompt_tokens, augmentation=e.augmentation,
                   finish_reason=e.finish_reason, metrics=e.metrics, conversation=e.messages, turns=e.turns,
                   num_turns=len(e.turns))
        if e.error is not None:
            res["error"] = e.error
        results.append(res)
    return results
