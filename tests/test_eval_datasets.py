"""`memgen eval --dataset gsm8k|gpqa|kodcode|triviaqa`: the reference's prompts,
character for character (expected strings written out here, checked once against
the reference's builders), its rewards with their quirks, the dataset files in
their published schemas (JSONL, parquet, save_to_disk), --prompts-only, and the
TriviaQA search loop with a BM25 corpus and the reference's HTTP protocol."""
from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from memgen.cli import main
from memgen.eval.dataset_files import read_rows
from memgen.eval.protocols import get_protocol, render_prompt
from memgen.eval.protocols import gpqa, kodcode, triviaqa
from memgen.eval.runner import EvalConfig, evaluate

import pyarrow          # [test] extra, as bm25s: these tests run, never skip
import pyarrow.ipc  # noqa: F401

GSM8K_ROWS = [
    {"question": "Natalia sold clips to 48 of her friends in April. How many clips did she sell? ",
     "answer": "Natalia sold 48 clips.\n#### 48"},
    {"question": "What is 12 plus 30?", "answer": "12 + 30 = <<12+30=42>>42\n#### 42"},
]
GPQA_ROW = {"Record ID": "recA1", "Question": " Which gas is inert? ", "Correct Answer": "Neon ",
            "Incorrect Answer 1": "Oxygen", "Incorrect Answer 2": " Hydrogen", "Incorrect Answer 3": "Chlorine",
            "Explanation": " Noble gases are inert. ", "Subdomain": "Chemistry"}
KODCODE_ROW = {"question_id": "Leetcode_1", "question": " Write a function double(x) returning 2*x. ",
               "solution": "def double(x):\n    return 2 * x", "test_info": [{"function_name": "double",
                                                                               "parameter_list": "(x)"}],
               "test": "from solution import double\n\ndef test_double():\n    assert double(2) == 4\n"}
TRIVIA_ROWS = [
    {"question_id": "tc_1", "question": "Which city is the capital of France?",
     "answer": {"value": "Paris", "aliases": ["Paris", "Paree"], "normalized_aliases": ["paris", "paree"]}},
    {"question_id": "tc_2", "question": "Who wrote Hamlet?",
     "answer": {"value": "Shakespeare", "aliases": ["William Shakespeare"],
                "normalized_aliases": ["william shakespeare", "shakespeare"]}},
]
CORPUS = [
    {"id": "0", "contents": '"Paris"\nParis is the capital and largest city of France.'},
    {"id": "1", "contents": '"Berlin"\nBerlin is the capital of Germany.'},
    {"id": "2", "title": "Hamlet", "text": "Hamlet is a tragedy written by William Shakespeare."},
]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def config(path, dataset, **kw) -> EvalConfig:
    kw.setdefault("output", str(Path(path).with_suffix(".out.jsonl")))
    return EvalConfig(input=str(path), dataset=dataset, progress=False, **kw)


# ---- prompts, character for character ------------------------------------------------
def test_gsm8k_prompt_and_label():
    data = get_protocol("gsm8k").build(GSM8K_ROWS[0], 0, 0)
    assert data["messages"] == [{"role": "user", "content":
        "Solve the math problem with proper reasoning, and make sure to put the FINAL ANSWER inside \\boxed{}."
        "Question: Natalia sold clips to 48 of her friends in April. How many clips did she sell?\n"}]
    assert data["solution"] == "Natalia sold 48 clips.\\boxed{48}"
    assert render_prompt(data["messages"]) == (
        "<|im_start|>user\nSolve the math problem with proper reasoning, and make sure to put the FINAL ANSWER "
        "inside \\boxed{}.Question: Natalia sold clips to 48 of her friends in April. How many clips did she "
        "sell?\n<|im_end|>\n<|im_start|>assistant\n")


def test_gpqa_prompt_shuffle_is_seeded_and_recorded():
    data = gpqa.build(GPQA_ROW, "recA1", seed=0)
    order = data["gpqa"]["order"]
    options = ["Neon", "Oxygen", "Hydrogen", "Chlorine"]
    letter = "ABCD"[order.index(0)]
    assert data["gpqa"]["correct"] == letter
    assert data["messages"][0]["content"] == (
        "Solve the problem with proper reasoning, and make sure to put the FINAL CHOICE inside \\boxed{}."
        "Question: Which gas is inert?\n\nPlease choose one of the following options:\n"
        + "".join(f"{'ABCD'[i]}. {options[k]}\n" for i, k in enumerate(order)) + "\n")
    assert data["solution"] == f"Noble gases are inert.\n\nTherefore, the final answer is \\boxed{{{letter}}}"
    # the same seed and id: the same shuffle; other seeds reach other orders
    assert gpqa.build(GPQA_ROW, "recA1", seed=0) == data
    orders = {tuple(gpqa.build(GPQA_ROW, "recA1", seed=s)["gpqa"]["order"]) for s in range(12)}
    assert len(orders) > 3
    assert get_protocol("gpqa").score(f"so \\boxed{{{letter}}}", data).value == 1.0
    assert get_protocol("gpqa").score("\\boxed{E}", data).value == 0.0


def test_gpqa_duplicate_options_collapse_as_in_the_reference():
    letters, correct = gpqa.lettered_options(["c", "w1", "c", "w3"], [2, 0, 1, 3])
    assert letters == {"c": "B", "w1": "C", "w3": "D"} and correct == "B"


def test_kodcode_prompt():
    data = kodcode.build(KODCODE_ROW, "Leetcode_1", 0)
    assert data["messages"][0]["content"] == (
        "Write an efficient and correct Python function to solve the following problem."
        "Question: Write a function double(x) returning 2*x.\n")
    assert data["function_name"] == "double" and data["test"] == KODCODE_ROW["test"].strip()


def test_triviaqa_first_turn():
    data = triviaqa.build(TRIVIA_ROWS[0], "tc_1", 0)
    assert data["messages"] == [
        {"role": "system", "content":
            "Answer the given question. You must conduct reasoning inside <think> and </think> first every time "
            "you get new information. After reasoning, if you find you lack some knowledge, you can call a search "
            "engine by <search> query </search> and it will return the top searched results between <information> "
            "and </information>. You can search as many times as your want. If you find no further external "
            "knowledge needed, you can directly provide the answer inside <answer> and </answer>, without detailed "
            "illustrations. For example, <answer> Beijing </answer>. "},
        {"role": "user", "content": "Which city is the capital of France?"}]
    assert data["aliases"] == ["paris", "paree"]     # the normalized aliases, as the reference scores


# ---- rewards -------------------------------------------------------------------------
@pytest.mark.parametrize("completion,test,expected", [
    ("```python\ndef twice(x):\n    return 2 * x\n```", KODCODE_ROW["test"], 1.0),       # renamed to double
    ("```python\ndef twice(x):\n    return 3 * x\n```", KODCODE_ROW["test"], 0.0),
    # a __main__ block does not run (the reference's exec namespace has no __name__ == "__main__")
    ("def f(x):\n    return 2 * x\nif __name__ == '__main__':\n    raise SystemExit(input())\n",
     KODCODE_ROW["test"], 1.0),
    # one test failing makes the whole record 0, as the reference runs the file as one test
    ("def f(x):\n    return 2 * x\n", KODCODE_ROW["test"] + "\ndef test_other():\n    assert double(1) == 3\n", 0.0),
    # two names imported from solution: the reference leaves ", other" behind (a syntax error)
    ("def f(x):\n    return 2 * x\n", "from solution import double, other\ndef test_a():\n    assert double(1) == 2\n",
     0.0),
    # `from x import a, b` is not one of the reference's import lines: the solution loses it
    ("from math import floor, ceil\ndef f(x):\n    return floor(2 * x)\n", KODCODE_ROW["test"], 0.0),
])
def test_kodcode_reward_as_the_reference(completion, test, expected):
    score = kodcode.score(completion, {"test": test.strip(), "function_name": "double"})
    assert score.value == expected, score


def test_triviaqa_actions_as_the_reference():
    assert triviaqa.cut_response("<search> a </search> tail </answer>") == "<search> a </search>"
    assert triviaqa.parse_action("<think>x</think>\n<search> capital\n of France </search>") == ("search", "capital")
    # an answer followed by a search is a search (the reference cuts at </search> first)
    assert triviaqa.parse_action("<answer>Paris</answer> then <search>q</search>")[0] == "search"
    assert triviaqa.parse_action("<answer> Paris, France\nmore </answer>") == ("answer", "Paris, France")
    assert triviaqa.parse_action("I think so.") == ("invalid", "I think so.")
    assert triviaqa.is_correct("It is PARIS.", ["paris"]) and not triviaqa.is_correct("Lyon", ["paris"])


# ---- dataset files -------------------------------------------------------------------
def _save_to_disk(root: Path, splits: dict[str, list[dict]]) -> Path:
    """The layout of datasets' DatasetDict.save_to_disk (arrow IPC streams + state.json)."""
    root.mkdir()
    (root / "dataset_dict.json").write_text(json.dumps({"splits": list(splits)}))
    for name, rows in splits.items():
        d = root / name
        d.mkdir()
        table = pyarrow.Table.from_pylist(rows)
        with pyarrow.OSFile(str(d / "data-00000-of-00001.arrow"), "wb") as sink:
            with pyarrow.ipc.new_stream(sink, table.schema) as writer:
                writer.write_table(table)
        (d / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}],
                                                  "_split": name}))
        (d / "dataset_info.json").write_text("{}")
    return root


def test_jsonl_parquet_and_save_to_disk_give_the_same_records(tmp_path):
    import pyarrow.parquet as pq

    jsonl = write_jsonl(tmp_path / "trivia.jsonl", TRIVIA_ROWS)
    parquet = tmp_path / "trivia.parquet"
    pq.write_table(pyarrow.Table.from_pylist(TRIVIA_ROWS), str(parquet))
    saved = _save_to_disk(tmp_path / "trivia_saved", {"train": TRIVIA_ROWS[:1], "validation": TRIVIA_ROWS})
    assert read_rows(jsonl) == read_rows(parquet) == read_rows(saved, default_split="validation")
    assert read_rows(saved, split="train") == TRIVIA_ROWS[:1]
    with pytest.raises(ValueError, match="train, validation"):
        read_rows(saved, split="test")
    from memgen.eval.dataset_runner import load_dataset_records

    records = [load_dataset_records(config(p, "triviaqa")).records for p in (jsonl, parquet, saved)]
    assert [[(r.id, r.data) for r in recs] for recs in records] == [[(r.id, r.data) for r in records[0]]] * 3
    assert [r.id for r in records[0]] == ["tc_1", "tc_2"]


def test_gpqa_csv_as_published(tmp_path):
    import csv

    path = tmp_path / "gpqa_diamond.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(GPQA_ROW))
        writer.writeheader()
        writer.writerow(GPQA_ROW)
    from memgen.eval.dataset_runner import load_dataset_records

    (record,) = load_dataset_records(config(path, "gpqa")).records
    assert record.id == "recA1" and record.data == gpqa.build(GPQA_ROW, "recA1", 0)


# ---- --gpqa-order reference: the reference's global-random draw ----------------------------
GPQA_COLUMNS = ["Pre-Revision Question", "Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2",
                "Incorrect Answer 3", "Explanation", "Record ID", "Subdomain"]     # a subset of the HF CSVs'


def _gpqa_rows(tag, n):
    return [{"Pre-Revision Question": "old", "Question": f" {tag} question {i}? ", "Correct Answer": f"right {i}",
             "Incorrect Answer 1": f"wrong a{i}", "Incorrect Answer 2": f"wrong b{i}",
             "Incorrect Answer 3": f" wrong c{i}", "Explanation": f"because {i}. ", "Record ID": f"{tag}{i}",
             "Subdomain": "Physics"} for i in range(n)]


def _write_gpqa_csv(path, rows):
    import csv

    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=GPQA_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return path


def _reference_gpqa_expected(main_rows, diamond_rows, run_seed=42):
    """What the reference's builder makes of the diamond rows, by its call sequence:
    main.py seeds Python's global random once; the builder then maps its preprocess,
    one random.shuffle(list(range(4))) per row, over gpqa_main's train and valid
    rows (how numpy splits them does not matter: only their number), then over
    gpqa_diamond in file order. Candidate 0 is the correct answer."""
    import random

    saved = random.getstate()
    try:
        random.seed(run_seed)
        for _ in main_rows:
            random.shuffle(list(range(4)))
        expected = []
        for row in diamond_rows:
            indices = list(range(4))
            random.shuffle(indices)
            candidates = [row[k].strip() for k in ("Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2",
                                                   "Incorrect Answer 3")]
            options = "".join(f"{'ABCD'[pos]}. {candidates[k]}\n" for pos, k in enumerate(indices))
            letter = "ABCD"[indices.index(0)]
            prompt = ("Solve the problem with proper reasoning, and make sure to put the FINAL CHOICE inside "
                      "\\boxed{}.Question: " + row["Question"].strip()
                      + "\n\nPlease choose one of the following options:\n" + options + "\n")
            solution = row["Explanation"].strip() + f"\n\nTherefore, the final answer is \\boxed{{{letter}}}"
            expected.append((indices, prompt, solution))
        return expected
    finally:
        random.setstate(saved)


def _memgen_default_order(run_seed, record_id):
    """memgen's own order (the default), written out: random.Random(sha256 of
    "gpqa-options", the run seed and the id) shuffles [0, 1, 2, 3]."""
    import hashlib
    import random

    digest = hashlib.sha256(f"gpqa-options\x00{run_seed}\x00{record_id}".encode()).digest()
    order = [0, 1, 2, 3]
    random.Random(int.from_bytes(digest[:8], "little")).shuffle(order)
    return order


def test_gpqa_reference_order_replays_the_reference_draw(tmp_path, capsys):
    from memgen.eval.dataset_runner import load_dataset_records

    main_rows, diamond_rows = _gpqa_rows("main", 448), _gpqa_rows("dia", 12)
    _write_gpqa_csv(tmp_path / "gpqa_main.csv", main_rows)
    diamond = _write_gpqa_csv(tmp_path / "gpqa_diamond.csv", diamond_rows)
    expected = _reference_gpqa_expected(main_rows, diamond_rows)

    records = load_dataset_records(config(diamond, "gpqa", gpqa_order="reference")).records
    assert [r.id for r in records] == [f"dia{i}" for i in range(12)]
    assert [r.data["messages"] for r in records] == [[{"role": "user", "content": p}] for _, p, _ in expected]
    assert [r.data["solution"] for r in records] == [s for _, _, s in expected]
    assert [r.data["gpqa"]["order"] for r in records] == [o for o, _, _ in expected]
    assert [r.data["gpqa"]["reference_draw"] for r in records] == list(range(448, 460))
    assert capsys.readouterr().err == ""              # a complete gpqa_main: nothing to say

    # the default is memgen's own order, unchanged, and differs from the reference's
    default = load_dataset_records(config(diamond, "gpqa")).records
    assert [r.data["gpqa"]["order"] for r in default] == [_memgen_default_order(0, r.id) for r in default]
    assert [r.data for r in default] == [gpqa.build(row, row["Record ID"], 0) for row in diamond_rows]
    assert sum(r.data["gpqa"]["order"] != o for r, (o, _, _) in zip(default, expected)) >= 6

    # --prompts-only through the CLI, and another run.seed
    out = tmp_path / "prompts.jsonl"
    assert main(["eval", str(diamond), "--dataset", "gpqa", "--prompts-only", "--gpqa-order", "reference",
                 "-o", str(out)]) == 0
    assert [json.loads(x)["messages"][0]["content"] for x in out.read_text().splitlines()] == \
        [p for _, p, _ in expected]
    seven = load_dataset_records(config(diamond, "gpqa", gpqa_order="reference:7")).records
    assert [r.data["gpqa"]["order"] for r in seven] == \
        [o for o, _, _ in _reference_gpqa_expected(main_rows, diamond_rows, run_seed=7)]


def test_gpqa_reference_order_counts_the_main_rows(tmp_path, capsys):
    from memgen.eval.dataset_runner import load_dataset_records

    diamond_rows = _gpqa_rows("dia", 12)
    orders = lambda recs: [r.data["gpqa"]["order"] for r in recs]    # noqa: E731
    # no gpqa_main beside the input: the published 448 rows are assumed, and said
    alone = _write_gpqa_csv(tmp_path / "gpqa_diamond.csv", diamond_rows)
    assert orders(load_dataset_records(config(alone, "gpqa", gpqa_order="reference")).records) == \
        [o for o, _, _ in _reference_gpqa_expected(range(448), diamond_rows)]
    assert "assuming the published gpqa_main (448 rows)" in capsys.readouterr().err
    # an incomplete gpqa_main (save_to_disk layout here): its row count decides, with a warning
    sub = tmp_path / "short"
    sub.mkdir()
    short_main = _gpqa_rows("main", 447)
    _save_to_disk(sub / "gpqa_main", {"train": short_main})
    diamond = _write_gpqa_csv(sub / "gpqa_diamond.csv", diamond_rows)
    got = orders(load_dataset_records(config(diamond, "gpqa", gpqa_order="reference")).records)
    assert got == [o for o, _, _ in _reference_gpqa_expected(short_main, diamond_rows)]
    assert got != [o for o, _, _ in _reference_gpqa_expected(range(448), diamond_rows)]
    assert "has 447 rows, the published gpqa_main 448" in capsys.readouterr().err


def test_gpqa_with_order_is_the_protocols_prompt():
    from memgen.eval.dataset_runner import gpqa_with_order

    for seed in range(6):
        data = gpqa.build(GPQA_ROW, "recA1", seed)
        rebuilt = gpqa_with_order(GPQA_ROW, data["gpqa"]["order"])
        assert (rebuilt["messages"], rebuilt["solution"], rebuilt["gpqa"]["correct"]) == \
            (data["messages"], data["solution"], data["gpqa"]["correct"])


def test_gpqa_order_flag_errors_and_settings(tmp_path, capsys):
    from memgen.eval.runner import run_settings

    main_csv = _write_gpqa_csv(tmp_path / "gpqa_main.csv", _gpqa_rows("main", 3))
    diamond = _write_gpqa_csv(tmp_path / "gpqa_diamond.csv", _gpqa_rows("dia", 2))
    gsm = write_jsonl(tmp_path / "gsm8k.jsonl", GSM8K_ROWS)
    for argv, message in [
        ([str(gsm), "--dataset", "gsm8k", "--gpqa-order", "reference"], "applies to --dataset gpqa"),
        ([str(diamond), "--dataset", "gpqa", "--gpqa-order", "shuffled"], "expected memgen, reference"),
        ([str(diamond), "--dataset", "gpqa", "--gpqa-order", "reference:x"], "expected memgen, reference"),
        ([str(main_csv), "--dataset", "gpqa", "--gpqa-order", "reference"], "is gpqa_main"),
    ]:
        assert main(["eval", *argv, "--prompts-only"]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert run_settings(config(diamond, "gpqa", gpqa_order="reference"))["gpqa_order"] == "reference"
    assert "gpqa_order" not in run_settings(config(diamond, "gpqa"))     # older outputs still resume


def test_rows_that_do_not_fit_the_schema(tmp_path, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", [GSM8K_ROWS[0], {"question": "no answer"}])
    assert main(["eval", str(bad), "--dataset", "gsm8k", "--prompts-only", "--strict"]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:2" in err and "'answer'" in err and len(err.strip().splitlines()) == 1
    assert main(["eval", str(tmp_path / "x.csv"), "--dataset", "gsm8k", "--prompts-only"]) == 2
    assert "no dataset file" in capsys.readouterr().err


# ---- --prompts-only --------------------------------------------------------------------
def test_prompts_only_loads_no_model(tmp_path, capsys):
    data = write_jsonl(tmp_path / "gpqa.jsonl", [GPQA_ROW])
    out = tmp_path / "prompts.jsonl"
    rc = main(["eval", str(data), "--dataset", "gpqa", "--prompts-only", "-o", str(out),
               "--model", str(tmp_path / "no_such_model"), "--seed", "3"])
    assert rc == 0, capsys.readouterr().err
    (line,) = [json.loads(x) for x in out.read_text().splitlines()]
    expected = gpqa.build(GPQA_ROW, "recA1", seed=3)["messages"]
    assert line == {"id": "recA1", "messages": expected,
                    "prompt": "<|im_start|>user\n" + expected[0]["content"] + "<|im_end|>\n<|im_start|>assistant\n"}
    # to stdout without -o
    assert main(["eval", str(data), "--dataset", "gpqa", "--prompts-only", "--seed", "3"]) == 0
    assert json.loads(capsys.readouterr().out) == line
    assert main(["eval", str(data), "--prompts-only"]) == 2
    assert "--dataset" in capsys.readouterr().err


# ---- runs ------------------------------------------------------------------------------
def test_gsm8k_run_on_a_memgen_checkpoint(tmp_path, memgen_reasoner_dir, memgen_ckpt_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(memgen_reasoner_dir))   # the engine's
    data = write_jsonl(tmp_path / "gsm8k.jsonl", GSM8K_ROWS)
    out = tmp_path / "out.jsonl"
    rc = main(["eval", str(data), "--dataset", "gsm8k", "-o", str(out), "--model", str(memgen_reasoner_dir),
               "--memgen", str(memgen_ckpt_dir), "--dtype", "float64", "--max-tokens", "6", "--no-progress"])
    assert rc == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [0, 1] and all(r["task"] == "gsm8k" for r in rows)
    for row, src in zip(rows, GSM8K_ROWS):
        prompt = render_prompt(get_protocol("gsm8k").build(src, 0, 0)["messages"])
        assert row["num_prompt_tokens"] == len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        assert row["augmentation"][0] == 1          # inactive trigger: the prompt insertion
        assert row["score"] == 0.0 and row["reference"]["solution"].endswith("\\boxed{%s}" % src["answer"][-2:])
    settings = json.loads((tmp_path / "out.settings.json").read_text())["settings"]
    assert settings["dataset"] == "gsm8k" and settings["max_tokens"] == 6 and settings["temperature"] == 0.0


def test_dataset_defaults_are_the_reference_config(tmp_path):
    import argparse

    from memgen.eval.runner import add_eval_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    cfg = config_from_args(parser.parse_args(["in.jsonl", "--dataset", "kodcode"]))
    assert (cfg.max_tokens, cfg.temperature) == (1024, 0.0)
    cfg = config_from_args(parser.parse_args(["in.jsonl"]))
    assert (cfg.max_tokens, cfg.temperature) == (256, 0.0)


# a scripted LLM: answers from a table keyed by (question, turn), honouring stop strings
@dataclass
class Out:
    token_ids: list[int]
    text: str
    augmentation: list[int]
    finish_reason: str = "stop"
    metrics: dict = field(default_factory=lambda: {"num_insertions": 1})


class ScriptedLLM:
    def __init__(self, tokenizer, script):
        self.tokenizer, self.script, self.prompts = tokenizer, script, []

    def generate(self, prompts, params, use_tqdm=True):
        outs = []
        for ids, p in zip(prompts, params):
            text = self.tokenizer.decode(ids)
            self.prompts.append(text)
            question = next(q for q in self.script if q in text)
            response = self.script[question][text.count("<|im_start|>assistant") - 1]
            for s in getattr(p, "stop", None) or []:
                if s in response:
                    response = response[:response.index(s) + len(s)]
            token_ids = self.tokenizer(response, add_special_tokens=False)["input_ids"]
            outs.append(Out(token_ids, response, [1] + [-100] * (len(token_ids) - 1)))
        return outs


def test_triviaqa_search_loop_with_bm25(tmp_path, tokenizer):
    corpus = write_jsonl(tmp_path / "corpus.jsonl", CORPUS)
    data = write_jsonl(tmp_path / "trivia.jsonl", TRIVIA_ROWS)
    script = {
        "capital of France": ["<think>I should look.</think>\n<search> capital of France </search> ignored <answer>x",
                              "<answer> Paris </answer>"],
        "Hamlet": ["I do not know.", "<search> Hamlet author </search>", "<search> Hamlet </search>",
                   "<search> Hamlet </search>", "<search> again </search>"],
    }
    llm = ScriptedLLM(tokenizer, script)
    cfg = config(data, "triviaqa", retriever=str(corpus), batch_size=2)
    summary = evaluate(llm, cfg)
    rows = {r["id"]: r for r in map(json.loads, Path(cfg.output).read_text().splitlines())}
    paris, hamlet = rows["tc_1"], rows["tc_2"]
    assert paris["score"] == 1.0 and paris["num_turns"] == 2 and paris["extracted"] == "Paris"
    observation = paris["turns"][0]["observation"]
    assert observation.startswith('Doc 1(Title: "Paris") Paris is the capital and largest city of France.\n')
    # the second turn's prompt is the whole chat: the cut response, then the observation as a user turn
    second = next(p for p in llm.prompts if "capital of France" in p and p.count("<|im_start|>assistant") == 2)
    assert ("<|im_start|>assistant\n<think>I should look.</think>\n<search> capital of France </search><|im_end|>\n"
            "<|im_start|>user\n" + observation + "<|im_end|>\n<|im_start|>assistant\n") in second
    assert hamlet["score"] == 0.0 and hamlet["num_turns"] == 5          # never answers: the turn limit
    assert hamlet["turns"][0]["observation"] == triviaqa.INVALID_ACTION
    assert "William Shakespeare" in hamlet["turns"][1]["observation"]
    assert summary["tasks"]["triviaqa"]["accuracy"] == 0.5


def test_long_observations_are_cut_to_512_tokens(tokenizer):
    from memgen.eval.multiturn import truncate_observation

    long = "word " * 2000
    cut = truncate_observation(tokenizer, long)
    ids = tokenizer(cut, add_special_tokens=False)["input_ids"]
    assert cut.endswith("...") and len(ids) <= 512 and long.startswith(cut[:-3])
    assert truncate_observation(tokenizer, "short") == "short"


def test_http_retriever_speaks_the_reference_protocol(tmp_path):
    from memgen.eval.retrievers import BM25Retriever, HTTPRetriever, serve

    local = BM25Retriever(write_jsonl(tmp_path / "corpus.jsonl", CORPUS), topk=2)
    server = serve(local, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/retrieve"
        remote = HTTPRetriever(url, topk=2)
        remote.check()
        queries = ["capital of Germany", "Shakespeare tragedy"]
        assert remote.search(queries) == local.search(queries)
        assert remote.search(queries)[0].startswith('Doc 1(Title: "Berlin") Berlin is the capital of Germany.\n')
    finally:
        server.shutdown()
        server.server_close()
    with pytest.raises(RuntimeError, match="does not answer"):
        HTTPRetriever(url, timeout=2).check()


@pytest.fixture(scope="module")
def long_context_memgen(tmp_path_factory, tokenizer):
    """A tiny qwen2 with 2048 positions (the chat grows each turn) and a MemGen checkpoint on it."""
    import fixtures
    import memgen_fixtures

    model = fixtures.build_tiny_model(tmp_path_factory.mktemp("long_ctx"), tokenizer, max_position_embeddings=2048)
    return model, memgen_fixtures.build_memgen_checkpoint(tmp_path_factory.mktemp("long_ctx_ckpt"), tokenizer, model)


def test_triviaqa_run_with_the_engine(tmp_path, long_context_memgen):
    """The loop on the real engine: a random model emits no tags, so every turn is
    an invalid action answered with the reference's message, up to --max-turns."""
    memgen_reasoner_dir, memgen_ckpt_dir = long_context_memgen
    corpus = write_jsonl(tmp_path / "corpus.jsonl", CORPUS)
    data = write_jsonl(tmp_path / "trivia.jsonl", TRIVIA_ROWS[:1])
    out = tmp_path / "out.jsonl"
    rc = main(["eval", str(data), "--dataset", "triviaqa", "--retriever", str(corpus), "--max-turns", "2",
               "-o", str(out), "--model", str(memgen_reasoner_dir), "--memgen", str(memgen_ckpt_dir),
               "--dtype", "float64", "--max-tokens", "4", "--no-progress"])
    assert rc == 0
    (row,) = [json.loads(x) for x in out.read_text().splitlines()]
    assert row["num_turns"] == 2 and row["score"] == 0.0, row
    assert [t["action"] for t in row["turns"]] == ["invalid", "invalid"]
    assert row["conversation"][3] == {"role": "user", "content": triviaqa.INVALID_ACTION}
    assert row["augmentation"].count(1) >= 2          # a prompt insertion in each turn


def test_a_failing_retriever_gives_the_reference_observation(tmp_path, tokenizer):
    from memgen.eval.dataset_runner import generate_ids
    from memgen.eval.multiturn import run_episodes
    from memgen.eval.records import Record

    class Down:
        def search(self, queries):
            raise ConnectionError("no server")

    llm = ScriptedLLM(tokenizer, {"capital of France": ["<search> France </search>", "<answer> paris </answer>"]})
    record = Record("tc_1", 1, triviaqa.build(TRIVIA_ROWS[0], "tc_1", 0), "triviaqa")
    (episode,) = run_episodes(llm, [record], lambda r, turn: None, Down(), generate_ids)
    assert episode.turns[0]["observation"] == "Cannot find corresponding pages."
    assert episode.metrics["retrieval_errors"] == 1 and episode.reward == 1.0
