"""Input and output files of `memgen eval`: reading and validating the input JSONL
(every problem reported with its line number), and the resumable output JSONL
(one complete line per record, appended with flush + fsync, keyed by id).

Input record (one JSON object per line):
    {"id": "q1",                         # optional: the 1-based line number otherwise
     "prompt": "raw text"  |  "messages": [{"role": "user", "content": "..."}],
     "answer": "42" | 42                 # boxed / exact reference
     "aliases": ["Paris", "paris, fr"]   # alias reference (TriviaQA)
     "tests": "def test_x(): ...",       # code reference (KodCode), with
     "function_name": "solve",           #   optional name to give the first function
     "task": "boxed" | "exact" | "alias" | "code"}   # optional, else --task, else inferred
"""
from __future__ import annotations

import fcntl
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from memgen.eval.tasks import TASKS, infer_task


class InputError(ValueError):
    """A malformed input line; `line_no` is 1-based."""

    def __init__(self, path: str, line_no: int, message: str):
        super().__init__(f"{path}:{line_no}: {message}")
        self.path, self.line_no, self.message = path, line_no, message


@dataclass
class Record:
    id: Any                      # as given (str or int), or the line number
    line_no: int
    data: dict[str, Any]         # the validated JSON object
    task: str | None             # None: no reference, generation only
    checkpoint: str | None = None   # the MemGen checkpoint to run it on (several in one run; None: the LLM's)

    @property
    def key(self) -> str:
        return record_key(self.id)

    @property
    def is_chat(self) -> bool:
        return "messages" in self.data


def record_key(record_id: Any) -> str:
    """Ids 3 and "3" are the same record (and so a duplicate)."""
    return str(record_id)


@dataclass
class ReadResult:
    records: list[Record] = field(default_factory=list)
    errors: list[InputError] = field(default_factory=list)


def _validate(obj: Any, line_no: int, task_flag: str | None) -> tuple[Any, str | None]:
    """Returns (id, task) or raises ValueError with what is wrong and what is right."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    has_prompt, has_messages = "prompt" in obj, "messages" in obj
    if has_prompt == has_messages:
        raise ValueError('needs exactly one of "prompt" (a string) or "messages" (a chat list)')
    if has_prompt and (not isinstance(obj["prompt"], str) or not obj["prompt"]):
        raise ValueError('"prompt" must be a non-empty string')
    if has_messages:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise ValueError('"messages" must be a non-empty list of {"role", "content"} objects')
        for i, m in enumerate(msgs):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise ValueError(f'"messages"[{i}] must be an object with string "role" and "content"')
    rid = obj.get("id", line_no)
    if isinstance(rid, bool) or not isinstance(rid, (str, int)) or rid == "":
        raise ValueError('"id" must be a non-empty string or an integer')
    if "answer" in obj and (isinstance(obj["answer"], (dict, list)) or obj["answer"] is None):
        raise ValueError('"answer" must be a string or a number')
    if "aliases" in obj:
        al = obj["aliases"]
        if not isinstance(al, list) or not al or not all(isinstance(a, (str, int, float)) for a in al):
            raise ValueError('"aliases" must be a non-empty list of strings')
    if "tests" in obj and (not isinstance(obj["tests"], str) or not obj["tests"].strip()):
        raise ValueError('"tests" must be a non-empty string of Python test code')
    if "function_name" in obj and not (isinstance(obj["function_name"], str) and obj["function_name"].isidentifier()):
        raise ValueError('"function_name" must be a Python identifier')
    task = obj.get("task", task_flag) or infer_task(obj)
    if task is not None and task not in TASKS:
        raise ValueError(f'unknown task {task!r}; expected one of {", ".join(TASKS)}')
    needs = {"boxed": ("answer",), "exact": ("answer", "aliases"), "alias": ("aliases", "answer"),
             "code": ("tests",)}
    if task is not None and not any(k in obj for k in needs[task]):
        raise ValueError(f'task {task!r} needs a {" or ".join(repr(k) for k in needs[task])} field')
    return rid, task


def read_records(path: str | os.PathLike, task: str | None = None, strict: bool = False) -> ReadResult:
    """All valid records of a JSONL file, in file order. Bad lines (unparsable JSON,
    wrong fields, duplicate ids) are collected in `errors` and skipped, or, with
    `strict`, the first one raises `InputError`. Blank lines are ignored."""
    path = str(path)
    out = ReadResult()
    seen: dict[str, int] = {}
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                try:
                    obj = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise ValueError(f"not valid JSON ({e})") from None
                rid, rtask = _validate(obj, line_no, task)
                key = record_key(rid)
                if key in seen:
                    raise ValueError(f"duplicate id {rid!r} (first on line {seen[key]})")
                seen[key] = line_no
                out.records.append(Record(rid, line_no, obj, rtask))
            except ValueError as e:
                err = InputError(path, line_no, str(e))
                if strict:
                    raise err from None
                out.errors.append(err)
    return out


class ResultWriter:
    """Append-only output JSONL, safe to kill at any instant.

    Each record is one `os.write` of a complete line to an O_APPEND file followed by
    fsync, so after a crash the file holds whole records plus at most one torn last
    line; opening the file again truncates that torn line away and loads the ids
    already written (or, with `truncate`, empties the file). An exclusive lock keeps
    two runs off the same file."""

    def __init__(self, path: str | os.PathLike, truncate: bool = False):
        self.path = Path(path)
        if self.path.parent and not self.path.parent.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise RuntimeError(f"{self.path} is being written by another run") from None
        self.done: set[str] = set()
        try:
            if truncate:     # under the lock, so a run still writing the file is never cut short
                os.ftruncate(self._fd, 0)
                os.fsync(self._fd)
            self.num_torn_bytes = self._recover()
        except BaseException:
            self.close()
            raise

    def _recover(self) -> int:
        with open(self._fd, "rb", closefd=False) as f:
            f.seek(0)
            data = f.read()
        end = data.rfind(b"\n") + 1          # 0 when there is no complete line
        torn = len(data) - end
        if torn:
            os.ftruncate(self._fd, end)
            os.fsync(self._fd)
        for line_no, line in enumerate(data[:end].splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                self.done.add(record_key(obj["id"]))
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
                raise ValueError(
                    f"{self.path}:{line_no}: not a record written by memgen eval; "
                    "use another output file or remove the line") from None
        return torn

    def append(self, record: dict[str, Any]) -> None:
        line = (json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n").encode()
        written = os.write(self._fd, line)
        while written < len(line):          # only on a very long line or a signal
            written += os.write(self._fd, line[written:])
        os.fsync(self._fd)
        self.done.add(record_key(record["id"]))

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "ResultWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def iter_results(path: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """The complete records of an output file (a torn last line is ignored)."""
    with open(path, "rb") as f:
        for line in f:
            if line.endswith(b"\n") and line.strip():
                yield json.loads(line)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON to `path` via a temp file + rename: readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def report_errors(errors: list[InputError], stream=None, limit: int = 20) -> None:
    stream = stream or sys.stderr
    for err in errors[:limit]:
        print(f"memgen eval: skipped {err}", file=stream)
    if len(errors) > limit:
        print(f"memgen eval: ... and {len(errors) - limit} more bad lines", file=stream)
