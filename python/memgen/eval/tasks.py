"""Scorers for `memgen eval`: boxed-answer accuracy, exact match, alias match and
code tests, each reproducing the reward the MemGen reference computes (spec §3.7).

Every scorer takes the completion text and the record's reference and returns a
`Score` (a float in [0, 1] plus what was extracted); none of them raises on odd
model output.
"""
from __future__ import annotations

import re
import string
from dataclasses import dataclass, field
from typing import Any

TASKS = ("boxed", "exact", "alias", "code")


@dataclass
class Score:
    value: float
    extracted: str | None = None       # the answer the scorer compared (None: nothing found)
    details: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------
# boxed: the reference's GSM8K/GPQA reward (`data/utils/math_utils.py`), i.e. the
# MATH (Hendrycks) normalisation. The first \boxed{} of the completion is compared
# with the last \boxed{} of the label. Reference quirks kept on purpose, because the
# point is to reproduce its numbers:
#   - "\boxed 42" (space form) is cut at the next "$";
#   - a "\fbox{...}" is found but then rejected (the reference's remove_boxed
#     asserts on it), so it scores 0;
#   - "$42$" inside the box keeps its dollars ("\$" is removed, "$" is not);
#   - "0.5" and "1/2" both normalise to "\frac{1}{2}", but "0.25" is not "1/4".
# One extension: a label with no \boxed{} at all (a plain answer such as "42" or a
# JSON number) is compared as it is; the reference scores such a label 0 always.
# ---------------------------------------------------------------------------

def _braced_span(text: str, start: int) -> str | None:
    """The substring from `start` up to the brace closing the first "{" after it."""
    depth = 0
    for i in range(start, len(text)):
        ch = text[i]
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[start : i + 1]
    return None


def _find_boxed(text: str, last: bool) -> str | None:
    if "\\boxed " in text:
        return "\\boxed " + text.split("\\boxed ")[-1 if last else 1].split("$")[0]
    find = text.rfind if last else text.find
    idx = find("\\boxed")
    if idx < 0:
        idx = find("\\fbox")
    return None if idx < 0 else _braced_span(text, idx)


def first_boxed(text: str) -> str | None:
    """The first `\\boxed{...}` (with its command) in `text`, or None."""
    return _find_boxed(text, last=False)


def last_boxed(text: str) -> str | None:
    """The last `\\boxed{...}` (with its command) in `text`, or None."""
    return _find_boxed(text, last=True)


def unbox(boxed: str) -> str | None:
    """`\\boxed{x}` -> `x`; None for anything else (e.g. `\\fbox{x}`, as the reference)."""
    if "\\boxed " in boxed:
        return boxed[len("\\boxed "):] if boxed.startswith("\\boxed ") else None
    if boxed.startswith("\\boxed{") and boxed.endswith("}"):
        return boxed[len("\\boxed{"):-1]
    return None


class _Unnormalisable(Exception):
    """strip_string met input the MATH normaliser cannot handle; compare raw strings."""


def _fix_fracs(s: str) -> str:
    # \frac12 -> \frac{1}{2}, \frac1{72} -> \frac{1}{72}; \frac{..} untouched.
    head, *rest = s.split("\\frac")
    out = [head]
    for part in rest:
        out.append("\\frac")
        if part.startswith("{"):
            out.append(part)
            continue
        if len(part) < 2:
            return s
        a, b, tail = part[0], part[1], part[2:]
        out.append("{" + a + "}" + (b if b == "{" else "{" + b + "}") + tail)
    return "".join(out)


def _fix_a_slash_b(s: str) -> str:
    parts = s.split("/")
    if len(parts) != 2:
        return s
    try:
        a, b = int(parts[0]), int(parts[1])
    except ValueError:
        return s
    if s != f"{a}/{b}":
        return s
    return "\\frac{" + str(a) + "}{" + str(b) + "}"


def _remove_right_units(s: str) -> str:
    if "\\text{ " not in s:
        return s
    parts = s.split("\\text{ ")
    if len(parts) != 2:
        raise _Unnormalisable(s)
    return parts[0]


def _fix_sqrt(s: str) -> str:
    if "\\sqrt" not in s:
        return s
    head, *rest = s.split("\\sqrt")
    out = [head]
    for part in rest:
        if not part:
            raise _Unnormalisable(s)
        out.append("\\sqrt" + (part if part[0] == "{" else "{" + part[0] + "}" + part[1:]))
    return "".join(out)


def strip_string(s: str) -> str:
    """MATH-style answer normalisation, step for step as the reference applies it.
    Raises `_Unnormalisable` where the reference's version would raise."""
    s = s.replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
    s = s.replace("tfrac", "frac").replace("dfrac", "frac")
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "")
    s = s.replace("\\$", "")
    s = _remove_right_units(s)
    s = s.replace("\\%", "")
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    if not s:
        return s
    if s[0] == ".":
        s = "0" + s
    lhs_rhs = s.split("=")
    if len(lhs_rhs) == 2 and len(lhs_rhs[0]) <= 2:   # "k = 3" -> "3"
        s = lhs_rhs[1]
    s = _fix_sqrt(s)
    s = s.replace(" ", "")
    s = _fix_fracs(s)
    if s == "0.5":
        s = "\\frac{1}{2}"
    return _fix_a_slash_b(s)


def is_equiv(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    try:
        return strip_string(a) == strip_string(b)
    except _Unnormalisable:
        return a == b


def reference_text(answer: Any) -> str:
    """A record's `answer` as text: JSON numbers as Python prints them (42, 0.5)."""
    if isinstance(answer, bool):
        return str(answer).lower()
    if isinstance(answer, float) and answer.is_integer():
        return str(int(answer))
    return str(answer)


def score_boxed(completion: str, answer: Any) -> Score:
    label = reference_text(answer)
    label_box = last_boxed(label)
    truth = unbox(label_box) if label_box is not None else label
    found = first_boxed(completion)
    got = unbox(found) if found is not None else None
    if got is None or truth is None:
        return Score(0.0, got)
    return Score(1.0 if is_equiv(got, truth) else 0.0, got)


# ---------------------------------------------------------------------------
# exact: SQuAD-style normalised exact match (lowercase, no punctuation, no
# articles, single spaces) of the whole completion, or of its first \boxed{} or
# <answer></answer> when it has one.
# ---------------------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    text = text.lower().translate(_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def answer_span(completion: str) -> str:
    """What the model put forward as its answer: `<answer>..</answer>` (first line,
    as the reference's TriviaQA environment reads it), else the first \\boxed{},
    else the whole completion."""
    start, end = completion.find("<answer>"), completion.find("</answer>")
    if 0 <= start < end:
        body = completion[start + len("<answer>"):end].strip()
        return body.split("\n", 1)[0].strip()
    found = first_boxed(completion)
    inner = unbox(found) if found is not None else None
    return inner if inner is not None else completion


def score_exact(completion: str, answer: Any) -> Score:
    got = answer_span(completion)
    return Score(float(normalize_answer(got) == normalize_answer(reference_text(answer))), got)


def score_alias(completion: str, aliases: list[Any]) -> Score:
    """TriviaQA: 1 if any alias, lowercased, is a substring of the lowercased answer."""
    got = answer_span(completion)
    low = got.lower()
    hit = next((a for a in aliases if str(a).lower() in low), None)
    return Score(float(hit is not None), got, {"matched": hit} if hit is not None else {})


def infer_task(record: dict[str, Any]) -> str | None:
    """The task a record implies when neither it nor the run names one."""
    if "tests" in record:
        return "code"
    if "aliases" in record:
        return "alias"
    if "answer" in record:
        return "boxed"
    return None


def score(task: str, completion: str, record: dict[str, Any], code_timeout: float = 5.0) -> Score:
    """Score `completion` against `record`'s reference under `task`."""
    if task == "boxed":
        return score_boxed(completion, record["answer"])
    if task == "exact":
        ref = record["answer"] if "answer" in record else record["aliases"][0]
        return score_exact(completion, ref)
    if task == "alias":
        aliases = record["aliases"] if "aliases" in record else [record["answer"]]
        return score_alias(completion, aliases)
    if task == "code":
        from memgen.eval.sandbox import score_code

        return score_code(completion, record["tests"], record.get("function_name"), timeout=code_timeout)
    raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
