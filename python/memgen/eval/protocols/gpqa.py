"""GPQA (`Question`, `Correct Answer`, `Incorrect Answer 1-3`, `Explanation`):
the reference's data/gpqa/builder.py prompt, options shuffled and lettered A-D,
scored with the boxed reward against "...the final answer is \\boxed{X}".

The reference shuffles with Python's global `random` inside `datasets.map`, so
its order depends on every row drawn before. By default each record's shuffle
here is `random.Random(seed_of(run seed, id))` with the same algorithm, recorded
per record (`gpqa` field of the output), so a run is reproducible and a record's
options do not depend on the others; `--gpqa-order reference` replays the
reference's draw instead (eval/dataset_runner.py: gpqa_reference_orders).
The reference's prompt is a bare string (its ChatML path cannot render it); it is
sent here as the one user message, as every other dataset's prompt is.
"""
from __future__ import annotations

import hashlib
import random
from typing import Any

from memgen.eval.protocols import DatasetProtocol, require, text_field
from memgen.eval.tasks import Score, score_boxed

INSTRUCTION = r"Solve the problem with proper reasoning, and make sure to put the FINAL CHOICE inside \boxed{}."
FIELDS = ("Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3",
          "Explanation")


def shuffle_seed(run_seed: int, record_id: Any) -> int:
    digest = hashlib.sha256(f"gpqa-options\x00{run_seed}\x00{record_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def lettered_options(candidates: list[str], order: list[int]) -> tuple[dict[str, str], str]:
    """{option text: letter} in the reference's way (a dict keyed by text, so two
    identical options collapse into one, the later letter winning) and the
    correct letter (candidates[0] is the correct answer)."""
    letters: dict[str, str] = {}
    correct = None
    for position, candidate_index in enumerate(order):
        letter = chr(ord("A") + position)
        letters[candidates[candidate_index]] = letter
        if candidate_index == 0:
            correct = letter
    correct = letters.get(candidates[0], correct)   # a duplicated text keeps its later letter
    return letters, correct


def build(row: dict[str, Any], record_id: Any, seed: int) -> dict[str, Any]:
    require(row, "GPQA", *FIELDS)
    s = shuffle_seed(seed, record_id)
    order = list(range(4))
    random.Random(s).shuffle(order)
    record = build_with_order(row, order)
    record["gpqa"]["shuffle_seed"] = s
    return record


def build_with_order(row: dict[str, Any], order: list[int]) -> dict[str, Any]:
    """The record with its options in `order` (candidate indices by position; the
    correct answer is candidate 0)."""
    question, correct, wrong1, wrong2, wrong3, explanation = (text_field(row, f).strip() for f in FIELDS)
    letters, answer_letter = lettered_options([correct, wrong1, wrong2, wrong3], order)
    body = question + "\n\nPlease choose one of the following options:\n"
    for text, letter in sorted(letters.items(), key=lambda item: item[1]):
        body += f"{letter}. {text}\n"
    prompt = INSTRUCTION + "Question: " + body + "\n"
    solution = explanation + f"\n\nTherefore, the final answer is \\boxed{{{answer_letter}}}"
    return {"messages": [{"role": "user", "content": prompt}], "solution": solution,
            "gpqa": {"order": list(order), "correct": answer_letter}}


def score(completion: str, data: dict[str, Any]) -> Score:
    return score_boxed(completion, data["solution"])


PROTOCOL = DatasetProtocol("gpqa", build, score, default_split="train", id_field="Record ID")
