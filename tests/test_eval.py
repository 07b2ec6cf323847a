"""memgen eval: scorers, the code sandbox, JSONL input errors, resumable output,
determinism, the CLI arguments, and (slow) the Ray path and the real engine."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from memgen.eval import records as rec_mod
from memgen.eval.records import InputError, ResultWriter, iter_results, read_records
from memgen.eval.runner import EvalConfig, add_eval_arguments, derive_seed, evaluate, run_eval_from_args
from memgen.eval.sandbox import extract_code, rename_first_function, run_tests, score_code
from memgen.eval.tasks import first_boxed, infer_task, last_boxed, score_alias, score_boxed, score_exact, strip_string

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------- fakes

@dataclass
class FakeParams:
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None


@dataclass
class FakeOutput:
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    augmentation: list[int]
    finish_reason: str
    metrics: dict = field(default_factory=dict)


class FakeLLM:
    """Deterministic stand-in for memgen.LLM: the answer is a hash of (prompt, seed),
    and is right (the record's answer appears in the prompt as "[n]") for half of them."""

    def __init__(self, fail_after_calls: int | None = None):
        self.calls: list[int] = []
        self.fail_after_calls = fail_after_calls

    def _one(self, prompt: str, p: FakeParams) -> FakeOutput:
        h = zlib.crc32(f"{prompt}|{p.seed}".encode())
        hint = prompt.rsplit("[", 1)[-1].rstrip("]\n") if "[" in prompt else "0"
        text = f"We think. \\boxed{{{hint if h % 2 else h % 97}}}"
        ids = list(text.encode())[: p.max_tokens]
        return FakeOutput(list(prompt.encode()), ids, text, [-100] * len(ids),
                          "stop" if len(ids) < p.max_tokens else "length",
                          {"time_to_first_token_s": 0.001, "total_s": 0.002, "num_insertions": h % 3,
                           "num_trigger_calls": 2, "num_latent_positions": 8 * (h % 3)})

    def generate(self, prompts, sampling_params=None, use_tqdm=True):
        if self.fail_after_calls is not None and len(self.calls) >= self.fail_after_calls:
            raise KeyboardInterrupt("simulated kill")
        self.calls.append(len(prompts))
        return [self._one(pr, sp) for pr, sp in zip(prompts, sampling_params)]

    def chat(self, messages, sampling_params=None):
        flat = ["".join(f"<{m['role']}>{m['content']}" for m in conv) for conv in messages]
        return self.generate(flat, sampling_params)


def write_jsonl(path: Path, rows) -> Path:
    with open(path, "w") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


def arith_rows(n: int):
    return [{"id": f"q{i}", "prompt": f"What is {i} plus {i}? [{2 * i}]", "answer": str(2 * i)} for i in range(n)]


def strip_timing(rows):
    return [{k: v for k, v in r.items() if k != "metrics"} for r in rows]


def run(tmp_path: Path, inp: Path, name="out.jsonl", llm=None, **kw):
    cfg = EvalConfig(input=str(inp), output=str(tmp_path / name), progress=False, **kw)
    summary = evaluate(llm or FakeLLM(), cfg, make_params=FakeParams)
    return summary, list(iter_results(cfg.output))


# --------------------------------------------------------------------- scorers

@pytest.mark.parametrize("completion, answer, expected", [
    ("So the total is \\boxed{42}.", "42", 1.0),
    ("\\boxed{ 42 }", "42", 1.0),                           # spaces removed
    ("\\boxed{42}", 42, 1.0),                               # JSON number label
    ("\\boxed{42}", 42.0, 1.0),
    ("\\boxed{43}", "42", 0.0),
    ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),                  # 0.5 -> \frac{1}{2}
    ("\\boxed{1/2}", "\\boxed{0.5}", 1.0),                  # a/b -> \frac{a}{b}
    ("\\boxed{.5}", "\\frac12", 1.0),
    ("\\boxed{\\dfrac12}", "\\frac{1}{2}", 1.0),
    ("\\boxed{0.25}", "\\frac{1}{4}", 0.0),                 # only 0.5 is special-cased
    ("\\boxed{\\frac{3}{\\sqrt{2}}}", "\\frac{3}{\\sqrt2}", 1.0),   # nested braces, sqrt fix
    ("\\boxed{10\\text{ cm}}", "10", 1.0),                  # units on the right
    ("\\boxed{90^\\circ}", "90", 1.0),
    ("\\boxed{50\\%}", "50", 1.0),
    ("\\boxed{\\$18}", "18", 1.0),
    ("\\boxed{x = 5}", "5", 1.0),                           # short lhs dropped
    ("\\boxed{$42$}", "42", 0.0),                           # plain "$" is kept, as the reference
    ("$\\boxed 42$", "42", 1.0),                            # "\boxed " space form
    ("\\boxed{1,000}", "1000", 0.0),                        # commas are kept
    ("\\boxed{1} and later \\boxed{42}", "42", 0.0),        # the FIRST box of the completion
    ("\\boxed{42}", "first \\boxed{1}, finally \\boxed{42}", 1.0),   # the LAST box of the label
    ("the answer is 42", "42", 0.0),                        # no box
    ("\\boxed{42", "42", 0.0),                              # unclosed
    ("\\fbox{42}", "42", 0.0),                              # found but rejected, as the reference
])
def test_score_boxed(completion, answer, expected):
    assert score_boxed(completion, answer).value == expected


def test_boxed_extraction_nested_and_normaliser_fallback():
    text = "a \\boxed{\\frac{1}{\\sqrt{2}}} b \\boxed{{3}} c"
    assert first_boxed(text) == "\\boxed{\\frac{1}{\\sqrt{2}}}"
    assert last_boxed(text) == "\\boxed{{3}}"
    assert score_boxed("\\boxed{7}", "\\boxed{7}").extracted == "7"
    # inputs where the MATH normaliser fails compare as raw strings
    assert score_boxed("\\boxed{1\\text{ a}\\text{ b}}", "1\\text{ a}\\text{ b}").value == 1.0
    assert score_boxed("\\boxed{\\sqrt}", "\\sqrt").value == 1.0
    assert strip_string("\\left( 1, 2 \\right)") == "(1,2)"


@pytest.mark.parametrize("completion, answer, expected", [
    ("Paris", "paris.", 1.0),
    ("The Paris", "Paris", 1.0),
    ("<think>hmm</think><answer> Paris </answer>", "Paris", 1.0),
    ("\\boxed{Paris}", "paris", 1.0),
    ("Paris, France", "Paris", 0.0),
])
def test_score_exact(completion, answer, expected):
    assert score_exact(completion, answer).value == expected


def test_score_alias():
    assert score_alias("<answer>It is Paris, France\nmore</answer>", ["PARIS", "x"]).value == 1.0
    assert score_alias("<answer>London</answer> Paris", ["Paris"]).value == 0.0   # only the answer span
    assert score_alias("I guess paris.", ["Paris"]).value == 1.0                  # no tags: whole text
    assert score_alias("nothing", ["Paris", 12]).value == 0.0


def test_infer_task():
    assert infer_task({"tests": "x"}) == "code"
    assert infer_task({"aliases": ["a"]}) == "alias"
    assert infer_task({"answer": "1"}) == "boxed"
    assert infer_task({"prompt": "p"}) is None


# --------------------------------------------------------------------- code sandbox

TESTS = textwrap.dedent("""\
    from solution import add_one

    def test_small():
        assert add_one(1) == 2

    def test_negative():
        assert add_one(-1) == 0

    def test_wrong_on_purpose():
        assert add_one(1) == 3
""")


def test_extract_and_rename():
    completion = textwrap.dedent("""\
        Here is my solution:
        ```python
        import math
        from typing import List

        def helper(x):
            return x + 1

        def solve(x):
            return helper(x)

        print(solve(3))
        ```
        It prints 4.""")
    code = extract_code(completion)
    assert "import math" in code and "def solve" in code and "print(" not in code
    assert "Here is" not in code
    renamed = rename_first_function(code, "add_one")
    assert renamed.count("def add_one(") == 1 and "helper = add_one" in renamed
    # unfenced text that does not parse: line fallback keeps the defs
    code = extract_code("Sure! def f(x):\nimport os\ndef g(x):\n    return 1\nThat's it.")
    assert "import os" in code and "def g(x):\n    return 1" in code and "Sure" not in code


def test_code_pass_fraction():
    sc = score_code("```python\ndef plus_one(x):\n    return x + 1\n```", TESTS)   # renamed via `from solution import`
    assert sc.value == pytest.approx(2 / 3)
    assert sc.details["tests_passed"] == 2 and sc.details["tests_total"] == 3
    assert sc.details["all_passed"] == 0.0
    sc = score_code("def f(x):\n    return x + 1\n", "def test_a():\n    assert f(2) == 3\n", "f")
    assert sc.value == 1.0 and sc.details["all_passed"] == 1.0
    assert score_code("not code at all", TESTS).value == 0.0
    assert score_code("def add_one(x):\n    return (", TESTS).value == 0.0   # syntax error


def test_code_timeout_kills_infinite_loop():
    start = time.perf_counter()
    res = run_tests("def add_one(x):\n    while True:\n        pass\n", TESTS, timeout=1.0)
    assert time.perf_counter() - start < 4
    assert res.passed == [] and res.total == 3 and "timed out" in res.error


def test_code_partial_results_before_timeout():
    tests = "def test_a():\n    assert f() == 1\n\ndef test_b():\n    while True:\n        pass\n"
    res = run_tests("def f():\n    return 1\n", tests, timeout=1.0)
    assert res.passed == ["test_a"] and list(res.failed) == ["test_b"]


def test_code_cannot_write_outside_its_dir():
    target = REPO / "tests" / "SANDBOX_ESCAPE.txt"
    code = textwrap.dedent(f"""\
        import os
        def escape():
            open({str(target)!r}, "w").write("x")
        def escape_relative():
            open("../../memgen_sandbox_escape.txt", "w").write("x")
        def remove_repo_file():
            os.remove({str(REPO / "pyproject.toml")!r})
        def write_inside():
            with open("scratch.txt", "w") as f:
                f.write("ok")
            return open("scratch.txt").read()
    """)
    tests = textwrap.dedent("""\
        def test_escape():
            escape()
        def test_escape_relative():
            escape_relative()
        def test_remove():
            remove_repo_file()
        def test_inside():
            assert write_inside() == "ok"
        def test_no_network():
            import socket
            socket.socket().connect(("127.0.0.1", 9))
        def test_no_subprocess():
            import subprocess
            subprocess.run(["true"])
    """)
    res = run_tests(code, tests, timeout=5.0)
    assert res.passed == ["test_inside"]
    assert all("sandbox" in err for err in res.failed.values()), res.failed
    assert not target.exists() and (REPO / "pyproject.toml").exists()


def test_code_memory_limit():
    res = run_tests("def big():\n    return bytearray(8 << 30)\n", "def test_big():\n    big()\n", timeout=5.0)
    assert res.passed == [] and "MemoryError" in res.failed["test_big"]


# --------------------------------------------------------------------- input JSONL

def test_bad_lines_reported_with_line_numbers(tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", [
        {"id": "a", "prompt": "p [1]", "answer": "1"},           # 1 ok
        '{"id": "b", "prompt": "unterminated',                   # 2 bad JSON
        "",                                                      # 3 blank: ignored
        {"id": "c", "answer": "1"},                              # 4 no prompt
        {"id": "a", "prompt": "again", "answer": "1"},           # 5 duplicate id
        {"id": "d", "prompt": "p", "answer": "1", "task": "nope"},   # 6 unknown task
        {"id": "e", "messages": [{"role": "user"}], "answer": "1"},  # 7 bad messages
        {"prompt": "no id: uses the line number [3]", "answer": "3"},  # 8 ok, id 8
        [1, 2],                                                  # 9 not an object
        {"id": "f", "prompt": "p", "task": "code"},              # 10 code without tests
    ])
    read = read_records(inp)
    assert [r.id for r in read.records] == ["a", 8]
    assert [e.line_no for e in read.errors] == [2, 4, 5, 6, 7, 9, 10]
    assert "duplicate id 'a' (first on line 1)" in str(read.errors[2])
    assert str(read.errors[0]).startswith(f"{inp}:2: not valid JSON")
    with pytest.raises(InputError, match=r"in\.jsonl:2:"):
        read_records(inp, strict=True)
    summary, rows = run(tmp_path, inp)
    assert [r["id"] for r in rows] == ["a", 8]
    assert summary["skipped_input_lines"] == [2, 4, 5, 6, 7, 9, 10]


def test_strict_failure_keeps_existing_output(tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", arith_rows(4))
    _, first = run(tmp_path, inp)
    before = (tmp_path / "out.jsonl").read_bytes()
    with open(inp, "a") as f:
        f.write("{oops\n")
    with pytest.raises(InputError, match=":5:"):
        run(tmp_path, inp, strict=True)
    assert (tmp_path / "out.jsonl").read_bytes() == before and len(first) == 4


# --------------------------------------------------------------------- runner

def test_run_writes_records_and_summary(tmp_path):
    rows_in = arith_rows(5) + [
        {"id": "chat", "messages": [{"role": "user", "content": "hi [7]"}], "answer": "7"},
        {"id": "gen-only", "prompt": "no reference"},
        {"id": "alias", "prompt": "capital? [Paris]", "aliases": ["paris"], "task": "alias"},
    ]
    inp = write_jsonl(tmp_path / "in.jsonl", rows_in)
    llm = FakeLLM()
    summary, rows = run(tmp_path, inp, llm=llm, batch_size=3)
    assert llm.calls == [3, 2, 1, 2]                    # batch 2: 2 prompts via generate, 1 via chat
    assert [r["id"] for r in rows] == [r["id"] for r in rows_in]
    r0 = rows[0]
    for key in ("id", "prompt", "task", "text", "token_ids", "augmentation", "finish_reason", "metrics",
                "score", "seed", "num_prompt_tokens", "extracted"):
        assert key in r0, key
    assert "messages" in rows[5] and "prompt" not in rows[5]
    assert rows[6]["task"] is None and rows[6]["score"] is None
    assert len(r0["augmentation"]) == len(r0["token_ids"])
    boxed = [r["score"] for r in rows if r["task"] == "boxed"]
    assert summary["tasks"]["boxed"]["count"] == 6
    assert summary["tasks"]["boxed"]["accuracy"] == pytest.approx(sum(boxed) / 6)
    assert summary["num_records"] == 8 and summary["this_run"]["generated_records"] == 8
    assert summary["mean_output_tokens"] == pytest.approx(sum(len(r["token_ids"]) for r in rows) / 8)
    assert summary["insertions_per_request"] is not None and summary["this_run"]["tokens_per_s"] > 0
    on_disk = json.loads((tmp_path / "out.summary.json").read_text())
    assert on_disk["tasks"] == summary["tasks"]


def test_code_task_through_runner(tmp_path):
    class CodeLLM(FakeLLM):
        def _one(self, prompt, p):
            text = "```python\ndef add_one(x):\n    return x + 1\n```"
            return FakeOutput([1], [1, 2], text, [-100, -100], "stop")

    inp = write_jsonl(tmp_path / "in.jsonl", [{"id": 1, "prompt": "write add_one", "tests": TESTS}])
    summary, rows = run(tmp_path, inp, llm=CodeLLM())
    assert rows[0]["score"] == pytest.approx(2 / 3) and rows[0]["score_details"]["tests_total"] == 3
    assert summary["tasks"]["code"] == {"count": 1, "accuracy": 0.0, "mean_score": pytest.approx(2 / 3)}


def test_engine_rejection_fails_one_record_not_the_run(tmp_path):
    class Picky(FakeLLM):
        def generate(self, prompts, sampling_params=None, use_tqdm=True):
            if any("too long" in p for p in prompts):
                raise ValueError("prompt is longer than max_model_len")
            return super().generate(prompts, sampling_params)

    rows_in = arith_rows(3)
    rows_in[1]["prompt"] = "too long [2]"
    inp = write_jsonl(tmp_path / "in.jsonl", rows_in)
    summary, rows = run(tmp_path, inp, llm=Picky(), batch_size=3)
    assert [r["finish_reason"] == "error" for r in rows] == [False, True, False]
    assert "max_model_len" in rows[1]["error"] and rows[1]["score"] == 0.0
    assert summary["num_errors"] == 1 and summary["tasks"]["boxed"]["count"] == 3
    _, again = run(tmp_path, inp, "one.jsonl", llm=Picky(), batch_size=1)
    assert strip_timing(again) == strip_timing(rows)   # a single-record batch fails alone too


def test_deterministic_and_batch_independent(tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", arith_rows(11))
    _, a = run(tmp_path, inp, "a.jsonl", batch_size=4, seed=7, temperature=0.8)
    _, b = run(tmp_path, inp, "b.jsonl", batch_size=1, seed=7, temperature=0.8)
    _, c = run(tmp_path, inp, "c.jsonl", batch_size=4, seed=8, temperature=0.8)
    assert strip_timing(a) == strip_timing(b)
    assert [r["seed"] for r in a] != [r["seed"] for r in c]
    assert derive_seed(7, "q1") == derive_seed(7, "q1") != derive_seed(7, "q2")
    assert a[1]["seed"] == derive_seed(7, "q1")


def test_resume_after_kill_and_torn_line(tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", arith_rows(10))
    _, full = run(tmp_path, inp, "full.jsonl", batch_size=3)

    with pytest.raises(KeyboardInterrupt):                        # killed during the 3rd batch
        run(tmp_path, inp, "part.jsonl", llm=FakeLLM(fail_after_calls=2), batch_size=3)
    part = tmp_path / "part.jsonl"
    assert len(list(iter_results(part))) == 6
    with open(part, "ab") as f:                                   # a write torn mid-line
        f.write(json.dumps(full[6]).encode()[:40])
    summary, rows = run(tmp_path, inp, "part.jsonl", batch_size=3)
    assert strip_timing(rows) == strip_timing(full)               # no loss, no duplicate, same order
    assert part.read_bytes().endswith(b"\n")
    assert summary["this_run"]["resumed_from_records"] == 6 and summary["num_records"] == 10
    # a finished run resumes to nothing
    llm = FakeLLM()
    run(tmp_path, inp, "part.jsonl", llm=llm)
    assert llm.calls == []


def test_writer_refuses_foreign_file_and_second_writer(tmp_path):
    out = tmp_path / "o.jsonl"
    out.write_text('{"id": 1}\nnot json\n')
    with pytest.raises(ValueError, match=r"o\.jsonl:2"):
        ResultWriter(out)
    out.write_text("")
    with ResultWriter(out):
        with pytest.raises(RuntimeError, match="another run"):
            ResultWriter(out)


def test_resume_checks_the_recorded_settings(tmp_path, capsys):
    inp = write_jsonl(tmp_path / "in.jsonl", arith_rows(6))
    out = tmp_path / "out.jsonl"
    with pytest.raises(KeyboardInterrupt):                        # 4 of 6 records written
        run(tmp_path, inp, llm=FakeLLM(fail_after_calls=2), batch_size=2, max_tokens=16)
    settings = json.loads((tmp_path / "out.settings.json").read_text())["settings"]
    assert settings["max_tokens"] == 16 and settings["temperature"] == 0.0
    before = out.read_bytes()

    llm = FakeLLM()
    with pytest.raises(ValueError) as e:
        run(tmp_path, inp, llm=llm, batch_size=2, max_tokens=64, temperature=0.7)
    msg = str(e.value)
    assert "max_tokens: 16 -> 64" in msg and "temperature: 0.0 -> 0.7" in msg, msg
    assert "batch_size" not in msg and "new -o path" in msg and "--overwrite" in msg and "\n" not in msg
    assert llm.calls == [] and out.read_bytes() == before
    assert json.loads((tmp_path / "out.settings.json").read_text())["settings"] == settings

    # same settings, another batch size: resumes
    summary, rows = run(tmp_path, inp, batch_size=3, max_tokens=16)
    assert summary["this_run"]["resumed_from_records"] == 4 and len(rows) == 6
    assert summary["settings"] == settings
    _, fresh = run(tmp_path, inp, "fresh.jsonl", max_tokens=16)
    assert strip_timing(rows) == strip_timing(fresh)

    # overwrite: the old records are discarded and every record is made again
    llm = FakeLLM()
    summary, rows = run(tmp_path, inp, llm=llm, max_tokens=64, temperature=0.7, overwrite=True)
    assert sum(llm.calls) == 6 and len(rows) == 6 and summary["this_run"]["resumed_from_records"] == 0
    _, fresh = run(tmp_path, inp, "fresh64.jsonl", max_tokens=64, temperature=0.7)
    assert strip_timing(rows) == strip_timing(fresh) != strip_timing(run(tmp_path, inp, "x.jsonl", max_tokens=16)[1])
    assert json.loads((tmp_path / "out.settings.json").read_text())["settings"]["max_tokens"] == 64
    assert "warning" not in capsys.readouterr().err


def test_output_without_recorded_settings_resumes_with_a_warning(tmp_path, capsys):
    inp = write_jsonl(tmp_path / "in.jsonl", arith_rows(5))
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, inp, llm=FakeLLM(fail_after_calls=1), batch_size=2)
    (tmp_path / "out.settings.json").unlink()                    # as an older memgen wrote it
    capsys.readouterr()
    summary, rows = run(tmp_path, inp, batch_size=2, max_tokens=64)
    err = capsys.readouterr().err
    assert "warning" in err and "no recorded settings" in err
    assert summary["this_run"]["resumed_from_records"] == 2 and len(rows) == 5
    # recorded from now on
    with pytest.raises(ValueError, match="max_tokens: 64 -> 8"):
        run(tmp_path, inp, max_tokens=8)


def test_run_settings_keep_what_shapes_outputs(tmp_path, monkeypatch):
    from memgen.eval.runner import run_settings

    monkeypatch.chdir(tmp_path)
    cfg = EvalConfig(input="in.jsonl", output="o.jsonl", batch_size=3, score_workers=4)
    s = run_settings(cfg, {"model": "m", "memgen": None, "dtype": "float32", "device": "cpu", "seed": 0,
                           "max_num_seqs": 4, "attention_backend": "torch", "max_model_len": 128})
    assert s["model"] == str(tmp_path / "m") and s["memgen"] is None      # paths made absolute
    assert s["dtype"] == "float32" and s["max_model_len"] == 128 and s["max_tokens"] == 256
    for speed_only in ("batch_size", "score_workers", "max_num_seqs", "attention_backend", "limit", "progress"):
        assert speed_only not in s


def test_cli_resume_with_other_settings_is_one_line_and_overwrite_works(tmp_path, monkeypatch, capsys):
    import memgen

    built = []
    monkeypatch.setattr(memgen, "LLM", lambda **kw: built.append(kw) or FakeLLM(), raising=False)
    monkeypatch.setattr(memgen, "SamplingParams", FakeParams, raising=False)
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    inp = write_jsonl(tmp_path / "in.jsonl", arith_rows(3))
    base = [str(inp), "-o", str(tmp_path / "o.jsonl"), "--no-progress"]
    assert run_eval_from_args(parser.parse_args(base + ["--max-tokens", "16"])) == 0
    # speed-only options do not block a resume
    assert run_eval_from_args(parser.parse_args(base + ["--max-tokens", "16", "--batch-size", "1",
                                                        "--engine-arg", "max_num_seqs=2"])) == 0
    capsys.readouterr()
    built.clear()
    args = parser.parse_args(base + ["--max-tokens", "64", "--dtype", "float64"])
    assert run_eval_from_args(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "dtype: 'auto' -> 'float64'" in err and "max_tokens: 16 -> 64" in err and "--overwrite" in err
    assert built == []                                           # stopped before the model loads
    assert run_eval_from_args(parser.parse_args(base + ["--max-tokens", "64", "--dtype", "float64",
                                                        "--overwrite"])) == 0
    assert all(len(r["token_ids"]) > 16 for r in iter_results(tmp_path / "o.jsonl"))
    assert json.loads((tmp_path / "o.summary.json").read_text())["settings"]["max_tokens"] == 64


_KILL_SCRIPT = """
import sys, time
sys.path.insert(0, {tests!r})
import test_eval
from memgen.eval.runner import EvalConfig, evaluate

class Slow(test_eval.FakeLLM):
    def generate(self, prompts, sampling_params=None, use_tqdm=True):
        time.sleep(0.02)
        return super().generate(prompts, sampling_params)

evaluate(Slow(), EvalConfig(input={inp!r}, output={out!r}, batch_size=2, progress=False),
         make_params=test_eval.FakeParams)
"""


def test_resume_after_sigkill(tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", arith_rows(200))
    _, full = run(tmp_path, inp, "full.jsonl", batch_size=2)
    out = tmp_path / "killed.jsonl"
    script = tmp_path / "job.py"
    script.write_text(_KILL_SCRIPT.format(tests=str(Path(__file__).parent), inp=str(inp), out=str(out)))
    proc = subprocess.Popen([sys.executable, str(script)])
    deadline = time.time() + 20
    while time.time() < deadline and (not out.exists() or out.stat().st_size < 3000):
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list(iter_results(out)))
    assert 0 < done < 200
    _, rows = run(tmp_path, inp, "killed.jsonl", batch_size=2)
    assert strip_timing(rows) == strip_timing(full)


# --------------------------------------------------------------------- CLI

def test_cli_arguments_and_run(tmp_path, monkeypatch, capsys):
    import memgen

    monkeypatch.setattr(memgen, "LLM", lambda **kw: FakeLLM(), raising=False)
    monkeypatch.setattr(memgen, "SamplingParams", FakeParams, raising=False)
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    inp = write_jsonl(tmp_path / "in.jsonl", arith_rows(3))
    out = tmp_path / "o.jsonl"
    args = parser.parse_args([str(inp), "-o", str(out), "--batch-size", "2", "--no-progress",
                              "--engine-arg", "max_num_seqs=4", "--task", "exact"])
    assert args.batch_size == 2 and args.dtype == "auto" and args.attention_backend == "auto"
    assert run_eval_from_args(args) == 0
    assert "exact" in capsys.readouterr().out
    assert json.loads((tmp_path / "o.summary.json").read_text())["engine"]["max_num_seqs"] == 4
    bad = parser.parse_args([str(tmp_path / "missing.jsonl"), "-o", str(out)])
    assert run_eval_from_args(bad) == 2


def test_example_dataset_is_reproducible(tmp_path):
    out = tmp_path / "arith.jsonl"
    subprocess.run([sys.executable, str(REPO / "bench/data/make_arith.py"), "--out", str(out)],
                   check=True, capture_output=True)
    assert out.read_bytes() == (REPO / "bench/data/arith50.jsonl").read_bytes()
    read = read_records(out)
    assert len(read.records) == 50 and not read.errors
    assert all(r.task == "boxed" and r.is_chat for r in read.records)


# --------------------------------------------------------------------- Ray and the real engine

def test_ray_missing_names_the_extra(tmp_path, monkeypatch):
    from memgen.eval.ray_runner import import_ray

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ImportError, match=r'pip install "memgen-engine\[ray\]"'):
        import_ray()


def _real_llm_or_none():
    try:
        from memgen import LLM, SamplingParams
    except ImportError:
        return None
    return LLM, SamplingParams


def test_end_to_end_with_the_engine(tmp_path, request):
    real = _real_llm_or_none()
    if real is None:
        pytest.skip("memgen.LLM is not there yet")
    LLM, SamplingParams = real
    llm = LLM(model=str(request.getfixturevalue("qwen2_dir")), dtype="float32", device="cpu")
    inp = write_jsonl(tmp_path / "in.jsonl", [
        {"id": "p", "prompt": "Question: what is 12 plus 30? Answer:", "answer": "42"},
        {"id": "m", "messages": [{"role": "user", "content": "Hello world"}], "aliases": ["hello"]},
        {"id": "g", "prompt": "The quick brown fox"},
    ])

    def go(name, **kw):
        cfg = EvalConfig(input=str(inp), output=str(tmp_path / name), max_tokens=8, progress=False, **kw)
        return evaluate(llm, cfg, make_params=SamplingParams), list(iter_results(cfg.output))

    summary, a = go("a.jsonl", batch_size=3)
    _, b = go("b.jsonl", batch_size=1)
    assert strip_timing(a) == strip_timing(b)
    for row in a:
        assert 1 <= len(row["token_ids"]) <= 8 and len(row["augmentation"]) == len(row["token_ids"])
        assert row["finish_reason"] in ("stop", "length") and "total_s" in row["metrics"]
    assert summary["num_records"] == 3 and set(summary["tasks"]) == {"boxed", "alias"}
    _, s1 = go("s1.jsonl", temperature=1.0, seed=3)
    _, s2 = go("s2.jsonl", temperature=1.0, seed=3, batch_size=1)
    assert strip_timing(s1) == strip_timing(s2)


@pytest.fixture(scope="module")
def ray_cluster():
    """One local 2-CPU Ray cluster for this module's Ray tests (starting one takes seconds)."""
    ray = pytest.importorskip("ray")
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])   # the fakes, for the actors
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def rows_by_id(path):
    """Records sorted by id: the Ray run writes batches as they finish, in any order."""
    rows = strip_timing(list(iter_results(path)))
    assert len({r["id"] for r in rows}) == len(rows)
    return sorted(rows, key=lambda r: str(r["id"]))


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # from inside ray.data
def test_ray_matches_single_process(tmp_path, request, ray_cluster):
    """Two Ray workers give the records the single-process run gives, on the tiny real model."""
    import functools

    from memgen import LLM, SamplingParams
    from memgen.eval.ray_runner import run_eval_ray

    factory = functools.partial(LLM, model=str(request.getfixturevalue("qwen2_dir")), dtype="float32",
                                device="cpu")
    inp = write_jsonl(tmp_path / "in.jsonl", arith_rows(7) + ["{bad"])
    local_cfg = EvalConfig(input=str(inp), output=str(tmp_path / "local.jsonl"), batch_size=2, progress=False,
                           max_tokens=6)
    evaluate(factory(), local_cfg, make_params=SamplingParams)
    cfg = EvalConfig(input=str(inp), output=str(tmp_path / "ray.jsonl"), batch_size=2, progress=False,
                     max_tokens=6)
    summary = run_eval_ray(cfg, num_workers=2, llm_factory=factory, make_params=SamplingParams)
    assert rows_by_id(cfg.output) == rows_by_id(local_cfg.output) and len(rows_by_id(cfg.output)) == 7
    assert summary["ray"]["num_workers"] == 2 and summary["skipped_input_lines"] == [8]
    assert summary["ray"]["gpus_per_worker"] == 0
    # the Ray path records and checks the settings as the single-process one does
    with pytest.raises(ValueError, match="max_tokens: 6 -> 7"):
        run_eval_ray(dataclasses.replace(cfg, max_tokens=7), num_workers=2, llm_factory=factory,
                     make_params=SamplingParams)


class FirstBatchWaits(FakeLLM):
    """The batch holding q0 waits until the output file has a record (so one of
    another batch): a runner that holds results back in input order never gets
    one, and after the deadline q0's batch would be written first."""

    def __init__(self, output: str):
        super().__init__()
        self.output = output

    def generate(self, prompts, sampling_params=None, use_tqdm=True):
        if any(p.startswith("What is 0 plus") for p in prompts):
            deadline = time.monotonic() + 60       # a fallback against a hang, not a timed assertion
            while time.monotonic() < deadline and not (os.path.exists(self.output) and
                                                        os.path.getsize(self.output)):
                time.sleep(0.02)
        return super().generate(prompts, sampling_params)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # from inside ray.data
def test_ray_writes_batches_as_they_finish(tmp_path, ray_cluster):
    import functools

    from memgen.eval.ray_runner import run_eval_ray

    inp = write_jsonl(tmp_path / "in.jsonl", arith_rows(12))
    cfg = EvalConfig(input=str(inp), output=str(tmp_path / "ray.jsonl"), batch_size=2, progress=False)
    run_eval_ray(cfg, num_workers=2, llm_factory=functools.partial(FirstBatchWaits, cfg.output),
                 make_params=FakeParams)
    order = [r["id"] for r in iter_results(cfg.output)]
    assert order[0] != "q0" and sorted(order) == sorted(f"q{i}" for i in range(12))
    _, local = run(tmp_path, inp, "local.jsonl")
    assert rows_by_id(cfg.output) == rows_by_id(tmp_path / "local.jsonl") and len(local) == 12


def test_gpus_per_worker_never_oversubscribes():
    from memgen.eval.ray_runner import gpus_per_worker

    assert gpus_per_worker(0, 3) == 0 and gpus_per_worker(0.5, 2) == 0
    assert gpus_per_worker(4, 2) == 1 and gpus_per_worker(2, 2) == 1
    assert gpus_per_worker(1, 2) == 0.5 and gpus_per_worker(2, 3) == 0.5 and gpus_per_worker(3, 7) == 1 / 3
    for num_gpus in range(1, 9):
        for workers in range(1, 25):
            share = gpus_per_worker(num_gpus, workers)
            # place every actor on the first GPU with room, as Ray packs fractional GPUs
            free = [1.0] * num_gpus
            for _ in range(workers):
                gpu = next((g for g in range(num_gpus) if free[g] >= share - 1e-9), None)
                assert gpu is not None, (num_gpus, workers, share)
                free[gpu] -= share
            assert min(free) >= -1e-9 and 0 < share <= 1
    with pytest.raises(ValueError, match="num_workers"):
        gpus_per_worker(2, 0)


def test_model_cache_filled_atomically_when_two_runs_race(tmp_path, monkeypatch):
    """Two first runs convert the same GGUF at once (as Ray actors do): both end up
    with one complete folder, the loser's copy is deleted, and no folder is ever
    deleted in place of being renamed over."""
    import shutil
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from memgen import sources

    monkeypatch.setenv("MEMGEN_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF not a real model")
    both_converted = threading.Barrier(2)

    def fake_convert(src, out_dir):
        (out_dir / "config.json").write_text(json.dumps({"by": threading.current_thread().name}))
        both_converted.wait(timeout=30)            # neither installs before both have converted

    deleted = []
    real_rmtree = shutil.rmtree
    monkeypatch.setattr(sources, "_convert_gguf", fake_convert)
    monkeypatch.setattr(shutil, "rmtree", lambda path, *a, **k: (deleted.append(Path(path)),
                                                                   real_rmtree(path, *a, **k)))
    with ThreadPoolExecutor(2, thread_name_prefix="run") as pool:
        got = list(pool.map(lambda _: sources.resolve_model_dir(gguf), range(2)))
        seen = list(pool.map(lambda path: json.loads((path / "config.json").read_text())["by"], got))
    target = got[0]
    assert got[1] == target and seen[0] == seen[1] and seen[0].startswith("run")
    assert [p.name for p in target.parent.iterdir()] == [target.name]    # the losing copy is gone
    assert len(deleted) == 1 and deleted[0] != target and deleted[0].parent == target.parent
    both_converted.reset()
    monkeypatch.setattr(sources, "_convert_gguf", lambda *a: pytest.fail("converted again"))
    assert sources.resolve_model_dir(gguf) == target                   # later runs reuse it
    # a folder that is not a complete conversion is reported, not deleted from under anyone
    (target / "memgen_source.json").write_text("{torn")
    with pytest.raises(FileExistsError, match="delete that folder"):
        sources.resolve_model_dir(gguf)
    assert (target / "config.json").is_file()
