"""`memgen eval --memgen a=DIR --memgen b=DIR`: several MemGen checkpoints in one pass
over the data on one engine (tiny float64 MemGen model). Each checkpoint's output file
equals a run of that checkpoint alone (sampled, so the per-record seeds matter too);
every batch's requests of all checkpoints go through one generate call; a rerun
resumes (nothing redone); the summary holds a table per checkpoint."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from memgen.eval.runner import add_eval_arguments, run_eval_from_args

PROMPTS = ["Solve the math problem, and put the answer in a box.", "What is 12 plus 30?", "Hello",
           "What is 3 plus 4?", "Count: 1, 2, 3,"]
SAME = ("id", "line", "task", "prompt", "seed", "text", "token_ids", "augmentation", "finish_reason", "score",
        "num_prompt_tokens")


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _input(tmp_path: Path) -> Path:
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({"id": f"r{i}", "prompt": p, "answer": "7"}) + "\n"
                            for i, p in enumerate(PROMPTS)))
    return path


def _eval(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    return run_eval_from_args(parser.parse_args(argv))


@pytest.fixture()
def common(memgen_reasoner_dir, tmp_path):
    return ["--model", str(memgen_reasoner_dir), "--dtype", "float64", "--device", "cpu", "--max-tokens", "10",
            "--temperature", "0.8", "--no-progress", "--task", "exact"]


def test_several_checkpoints_equal_each_alone(memgen_ckpt_dir, memgen_active_ckpt_dir, tmp_path, common, capsys):
    inp = _input(tmp_path)
    out = tmp_path / "sweep.jsonl"
    assert _eval([str(inp), "-o", str(out), "--memgen", f"a={memgen_ckpt_dir}", "--memgen",
                  f"b={memgen_active_ckpt_dir}", *common]) == 0
    printed = capsys.readouterr().out
    files = {"a": tmp_path / "sweep.a.jsonl", "b": tmp_path / "sweep.b.jsonl"}
    assert not out.exists() and all(f.is_file() for f in files.values())
    table = [line for line in printed.splitlines() if line.startswith(("checkpoint", "a ", "b "))]
    assert len(table) == 3 and "exact acc" in table[0]
    combined = json.loads((tmp_path / "sweep.summary.json").read_text())
    assert list(combined["checkpoints"]) == ["a", "b"]
    assert combined["outputs"] == {name: str(f) for name, f in files.items()}

    for name, ckpt in (("a", memgen_ckpt_dir), ("b", memgen_active_ckpt_dir)):
        alone = tmp_path / f"alone_{name}.jsonl"
        assert _eval([str(inp), "-o", str(alone), "--memgen", str(ckpt), *common]) == 0
        multi, single = _rows(files[name]), _rows(alone)
        assert [r["checkpoint"] for r in multi] == [name] * len(PROMPTS)
        assert all(r["metrics"]["memgen_checkpoint"] == name for r in multi)
        assert [{k: r.get(k) for k in SAME} for r in multi] == [{k: r.get(k) for k in SAME} for r in single]
        summary = json.loads((tmp_path / f"sweep.{name}.summary.json").read_text())
        assert summary["num_records"] == len(PROMPTS) and summary["checkpoint"] == name
        assert combined["checkpoints"][name]["tasks"] == summary["tasks"]
        # its settings are a single run's of that checkpoint: a single run resumes the file
        assert json.loads((tmp_path / f"sweep.{name}.settings.json").read_text()) == \
            json.loads((tmp_path / f"alone_{name}.settings.json").read_text())
    assert [r["token_ids"] for r in _rows(files["a"])] != [r["token_ids"] for r in _rows(files["b"])]

    # a rerun resumes: nothing is generated again
    capsys.readouterr()
    assert _eval([str(inp), "-o", str(out), "--memgen", f"a={memgen_ckpt_dir}", "--memgen",
                  f"b={memgen_active_ckpt_dir}", *common]) == 0
    combined = json.loads((tmp_path / "sweep.summary.json").read_text())
    assert [s["this_run"]["generated_records"] for s in combined["checkpoints"].values()] == [0, 0]
    # other settings for an existing output: refused before the model loads
    assert _eval([str(inp), "-o", str(out), "--memgen", f"a={memgen_ckpt_dir}", "--memgen",
                  f"b={memgen_active_ckpt_dir}", *common, "--seed", "5"]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_one_engine_one_generate_call_per_batch(memgen_reasoner_dir, memgen_ckpt_dir, memgen_active_ckpt_dir,
                                               tmp_path):
    """Every batch's requests, all checkpoints, go through one generate call (they batch
    together in the engine); a record missing from one checkpoint's output is redone on
    that checkpoint only."""
    from memgen import LLM
    from memgen.eval.checkpoints import evaluate_checkpoints
    from memgen.eval.runner import EvalConfig

    dirs = {"a": str(memgen_ckpt_dir), "b": str(memgen_active_ckpt_dir)}
    llm = LLM(model=memgen_reasoner_dir, memgen=dirs, dtype="float64", device="cpu")
    calls = []
    real = llm.generate

    def spy(prompts, params=None, **kw):
        calls.append(sorted(p.memgen_checkpoint for p in params))
        return real(prompts, params, **kw)

    llm.generate = spy
    cfg = EvalConfig(input=str(_input(tmp_path)), output=str(tmp_path / "o.jsonl"), batch_size=3, max_tokens=6,
                     progress=False, task="exact")
    first = evaluate_checkpoints(llm, cfg, dirs)
    assert calls == [["a"] * 3 + ["b"] * 3, ["a"] * 2 + ["b"] * 2]
    # drop b's last record: only it runs again
    b = tmp_path / "o.b.jsonl"
    rows = _rows(b)
    b.write_text("".join(json.dumps(r) + "\n" for r in rows[:-1]))
    calls.clear()
    again = evaluate_checkpoints(llm, cfg, dirs)
    assert calls == [["b"]]
    assert _rows(b)[-1]["token_ids"] == rows[-1]["token_ids"]
    assert again["checkpoints"]["b"]["this_run"]["generated_records"] == 1
    assert first["checkpoints"]["a"]["tasks"] == again["checkpoints"]["a"]["tasks"]


def test_flags(memgen_ckpt_dir, tmp_path, common, capsys):
    from memgen.eval.checkpoints import checkpoint_configs, checkpoint_file_name
    from memgen.eval.runner import EvalConfig

    assert checkpoint_file_name("sft-run/export") == "sft-run_export"
    cfg = EvalConfig(input="in.jsonl", output=str(tmp_path / "res.jsonl"))
    assert {n: Path(c.output).name for n, c in checkpoint_configs(cfg, {"x": 1, "s/e": 2}).items()} == \
        {"x": "res.x.jsonl", "s/e": "res.s_e.jsonl"}
    with pytest.raises(ValueError, match="same output file"):
        checkpoint_configs(cfg, {"a/b": 1, "a_b": 2})
    inp = _input(tmp_path)
    # several checkpoints with --ray: one line, exit 2
    assert _eval([str(inp), "-o", str(tmp_path / "r.jsonl"), "--memgen", f"a={memgen_ckpt_dir}", "--memgen",
                  f"b={memgen_ckpt_dir}", "--ray", *common]) == 2
    assert "--ray" in capsys.readouterr().err
    # one named checkpoint: a plain single run (one output file, no name in it)
    assert _eval([str(inp), "-o", str(tmp_path / "one.jsonl"), "--memgen", f"a={memgen_ckpt_dir}", "--limit", "1",
                  *common]) == 0
    assert (tmp_path / "one.jsonl").is_file() and not (tmp_path / "one.a.jsonl").exists()


def test_a_reference_dataset_on_several_checkpoints(memgen_ckpt_dir, memgen_active_ckpt_dir, tmp_path, common):
    """--dataset gsm8k (the reference's protocol) takes several checkpoints the same way."""
    data = tmp_path / "gsm8k.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in (
        {"question": "Natalia sold clips to 48 of her friends in April. How many?", "answer": "48 clips.\n#### 48"},
        {"question": "What is 12 plus 30?", "answer": "12 + 30 = <<12+30=42>>42\n#### 42"})))
    flags = [a for a in common if a not in ("--task", "exact")] + ["--dataset", "gsm8k"]
    assert _eval([str(data), "-o", str(tmp_path / "g.jsonl"), "--memgen", f"a={memgen_ckpt_dir}", "--memgen",
                  f"b={memgen_active_ckpt_dir}", *flags]) == 0
    for name, ckpt in (("a", memgen_ckpt_dir), ("b", memgen_active_ckpt_dir)):
        assert _eval([str(data), "-o", str(tmp_path / f"g1_{name}.jsonl"), "--memgen", str(ckpt), *flags]) == 0
        multi, single = _rows(tmp_path / f"g.{name}.jsonl"), _rows(tmp_path / f"g1_{name}.jsonl")
        keys = ("id", "seed", "text", "token_ids", "augmentation", "score", "reference")
        assert [{k: r[k] for k in keys} for r in multi] == [{k: r[k] for k in keys} for r in single]
        assert all(r["checkpoint"] == name and r["task"] == "gsm8k" for r in multi)
