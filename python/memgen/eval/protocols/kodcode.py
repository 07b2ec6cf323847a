"""KodCode (`question`, `solution`, `test`, `test_info`): the reference's
data/kodcode/builder.py prompt, scored by its data/kodcode/env.py reward.

That reward, reproduced quirk for quirk because the point is its numbers:
- code = the ```python fenced blocks (the whole text when there are none); from
  each, the top-level one-line imports (`from x import y` with a single name, or
  `import ...`) and every chunk from a `def name(` up to the next line starting
  with `def ` (so a class header before its methods is lost, and top-level code
  after a function stays with it);
- the first `def name(` is renamed to test_info[0].function_name;
- `from solution import NAME` is cut from the test (one name: a second imported
  name is left behind as a syntax error, as in the reference);
- code + test run in one child process, `__name__` not "__main__"; every global
  `test_*` is called in order; 1.0 if all pass within 5 s, else 0.0 (the reference
  runs them as one test, so the score is all or nothing, and a test file without
  tests passes). The per-test pass
  count is kept in `score_details`.
The child is memgen.eval.sandbox's (limits, an audit hook, a temp cwd), where the
reference forks with no limits in ./code_stuff.
"""
from __future__ import annotations

import json
import re
from typing import Any

from memgen.eval.protocols import DatasetProtocol, require, text_field
from memgen.eval.tasks import Score

INSTRUCTION = "Write an efficient and correct Python function to solve the following problem."

_FENCE = re.compile(r"```python(.*?)```", re.DOTALL)
_IMPORT = re.compile(r"^(?:from\s+\S+\s+import\s+\S+|import\s+\S+.*)$", re.MULTILINE)
_FUNCTION_CHUNK = re.compile(r"(def\s+\w+\(.*?:[\s\S]*?)(?=^def\s|\Z)", re.MULTILINE)
_FIRST_DEF = re.compile(r"def\s+(\w+)\s*\(")
_SOLUTION_IMPORT = re.compile(r"^\s*from\s+solution\s+import\s+\w+\s*", re.MULTILINE)


def extract_code(completion: str) -> str:
    """The code the reference's reward runs, before renaming."""
    text = completion.strip()
    parts: list[str] = []
    for block in _FENCE.findall(text) or [text]:
        imports = _IMPORT.findall(block)
        chunks = _FUNCTION_CHUNK.findall(block.strip())
        parts += (["\n".join(imports)] if imports else []) + chunks
    return "\n".join(parts)


def reference_program(completion: str, function_name: str, test: str) -> tuple[str, str]:
    """(code, test) as the reference runs them."""
    code = _FIRST_DEF.sub(f"def {function_name}(", extract_code(completion), count=1)
    return code, _SOLUTION_IMPORT.sub("", test)


def _function_name(test_info: Any) -> str:
    if isinstance(test_info, str):
        try:
            test_info = json.loads(test_info)
        except json.JSONDecodeError:
            raise ValueError("column 'test_info' is a string that is not JSON") from None
    if not isinstance(test_info, list) or not test_info or not isinstance(test_info[0], dict) \
            or not isinstance(test_info[0].get("function_name"), str):
        raise ValueError("column 'test_info' must be a non-empty list whose first item has a 'function_name'")
    return test_info[0]["function_name"]


def build(row: dict[str, Any], record_id: Any, seed: int) -> dict[str, Any]:
    require(row, "KodCode", "question", "test", "test_info")
    prompt = INSTRUCTION + "Question: " + text_field(row, "question").strip() + "\n"
    return {"messages": [{"role": "user", "content": prompt}], "test": text_field(row, "test").strip(),
            "function_name": _function_name(row["test_info"])}


def score(completion: str, data: dict[str, Any], timeout: float = 5.0) -> Score:
    from memgen.eval.sandbox import run_tests

    code, test = reference_program(completion, data["function_name"], data["test"])
    result = run_tests(code, test, timeout=timeout, reference_exec=True)
    details = {"tests_passed": len(result.passed), "tests_total": result.total}
    if result.error:
        details["error"] = result.error
    # the reference's executor succeeds when nothing raised: a test file without tests passes
    return Score(float(not result.failed and result.error is None), code, details)


PROTOCOL = DatasetProtocol("kodcode", build, score, default_split="train", id_field="question_id")
