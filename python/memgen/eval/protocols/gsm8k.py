"""GSM8K (`question`, `answer`): the reference's data/gsm8k/builder.py prompt and
label, scored by its compute_score (first \\boxed{} of the completion against
the label's last, MATH normalisation: memgen.eval.tasks.score_boxed)."""
from __future__ import annotations

from typing import Any

from memgen.eval.protocols import DatasetProtocol, require, text_field
from memgen.eval.tasks import Score, score_boxed

INSTRUCTION = r"Solve the math problem with proper reasoning, and make sure to put the FINAL ANSWER inside \boxed{}."


def label(answer: str) -> str:
    """The rationale before "\\n####" followed directly by \\boxed{final answer}."""
    parts = answer.strip().split("\n####")
    return (parts[0] + "\\boxed{" + parts[-1].strip() + "}").strip()


def build(row: dict[str, Any], record_id: Any, seed: int) -> dict[str, Any]:
    require(row, "GSM8K", "question", "answer")
    # no space or newline between the instruction and "Question:", as the reference
    prompt = INSTRUCTION + "Question: " + text_field(row, "question").strip() + "\n"
    return {"messages": [{"role": "user", "content": prompt}], "solution": label(text_field(row, "answer"))}


def score(completion: str, data: dict[str, Any]) -> Score:
    return score_boxed(completion, data["solution"])


PROTOCOL = DatasetProtocol("gsm8k", build, score, default_split="test")
