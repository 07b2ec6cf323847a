"""Summarise demo/evaluate.sh's outputs: per model, the boxed accuracy (what
`memgen eval` scores), the last-number accuracy (the last integer of the text,
boxed or not: how much is format), insertions and tokens per answer.

    python demo/table.py HELDOUT.jsonl EVAL_DIR OUT.json
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

MODELS = {"plain": "plain SmolLM2-135M-Instruct", "fresh-init": "MemGen, fresh from `memgen init` (untrained)",
          "trained": "MemGen, demo/smollm2-arith (weaver SFT)"}


def last_number(text: str) -> str | None:
    found = re.findall(r"-?\d+", text.replace(",", ""))
    return found[-1] if found else None


def summarise(answers: dict, rows: list[dict]) -> dict:
    n = len(rows)
    return {"n": n, "boxed_correct": int(sum(r["score"] for r in rows)),
            "last_number_correct": sum(last_number(r["text"]) == answers[r["id"]] for r in rows),
            "insertions_per_answer": sum(r["metrics"]["num_insertions"] for r in rows) / n,
            "tokens_per_answer": sum(len(r["token_ids"]) for r in rows) / n,
            "example": rows[0]["text"]}


def main(heldout: str, eval_dir: str, out: str) -> None:
    answers = {r["id"]: r["answer"] for r in map(json.loads, Path(heldout).read_text().splitlines())}
    results = {}
    for name in MODELS:
        rows = [json.loads(line) for line in (Path(eval_dir) / f"{name}.jsonl").read_text().splitlines()]
        results[name] = summarise(answers, rows)
    Path(out).write_text(json.dumps(results, indent=1) + "\n")
    print("| model | boxed answer right | last number right | insertions / answer | tokens / answer |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {MODELS[name]} | {r['boxed_correct']}/{r['n']} | {r['last_number_correct']}/{r['n']} | "
              f"{r['insertions_per_answer']:.1f} | {r['tokens_per_answer']:.0f} |")


if __name__ == "__main__":
    main(*sys.argv[1:4])
