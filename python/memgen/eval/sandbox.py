"""KodCode-style code scoring: pull the Python code out of a completion and run a
record's `test_*` functions against it in a separate, limited Python process.

The child is `python -I` (isolated: no user site, no env vars, no script dir on
sys.path) in a fresh temp dir that is its cwd, HOME and TMPDIR, in its own
session (killed as a group on timeout), with rlimits on address space, CPU time,
file size and core dumps, and an audit hook that refuses writes, deletes and
renames outside the temp dir, sockets and new processes. That is best effort, not
a security boundary (ctypes can get round an audit hook): run untrusted code in a
container as well.
"""
from __future__ import annotations

import ast
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

from memgen.eval.tasks import Score

DEFAULT_TIMEOUT_S = 5.0
DEFAULT_MEMORY_MB = 2048

_FENCED = re.compile(r"```(?:python|py)[^\n]*\n(.*?)```", re.DOTALL)
_IMPORT_LINE = re.compile(r"^(?:from\s+\S+\s+import\s+.+|import\s+\S+.*)$")
_DEF_LINE = re.compile(r"^(?:async\s+)?def\s+\w+\s*\(|^class\s+\w+")
_SOLUTION_IMPORT = re.compile(r"^\s*from\s+solution\s+import\s+[^\n]*$", re.MULTILINE)
_TEST_DEF = re.compile(r"^def\s+(test_\w+)\s*\(", re.MULTILINE)
_SOLUTION_NAME = re.compile(r"from\s+solution\s+import\s+\(?\s*([A-Za-z_]\w*)")


@dataclass
class SandboxResult:
    passed: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)   # test name -> error
    error: str | None = None                               # module-level failure / timeout
    elapsed_s: float = 0.0

    @property
    def total(self) -> int:
        return len(self.passed) + len(self.failed)

    @property
    def fraction(self) -> float:
        return len(self.passed) / self.total if self.total else 0.0


def _keep_imports_and_defs(block: str) -> list[str]:
    """Top-level imports and def/class blocks (with decorators) of one code block."""
    try:
        tree = ast.parse(block)
    except SyntaxError:
        return _keep_imports_and_defs_by_lines(block)
    lines = block.splitlines()
    imports, defs = [], []
    for node in tree.body:
        first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
        text = "\n".join(lines[first - 1 : node.end_lineno])
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            imports.append(text)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defs.append(text)
    return (["\n".join(imports)] if imports else []) + defs


def _keep_imports_and_defs_by_lines(block: str) -> list[str]:
    """Fallback for code that does not parse: import lines, and each top-level
    def/class line with the indented (or blank) lines that follow it."""
    imports, defs, current = [], [], None
    for line in block.splitlines():
        if current is not None and (not line.strip() or line[0] in " \t" or line.startswith(("@", ")"))):
            current.append(line)
            continue
        current = None
        if _IMPORT_LINE.match(line):
            imports.append(line)
        elif _DEF_LINE.match(line):
            current = [line]
            defs.append(current)
    return (["\n".join(imports)] if imports else []) + ["\n".join(d).rstrip() for d in defs]


def extract_code(completion: str) -> str:
    """The fenced python blocks of `completion` (or all of it when it has none),
    reduced to imports and def/class blocks, as the reference's KodCode reward does."""
    blocks = _FENCED.findall(completion) or [completion.strip()]
    parts: list[str] = []
    for block in blocks:
        parts.extend(_keep_imports_and_defs(block))
    return "\n".join(parts)


def rename_first_function(code: str, name: str) -> str:
    """Rename the first top-level function to `name`. Unlike the reference, the old
    name stays bound too, so a recursive function still finds itself."""
    match = re.search(r"^(?:async\s+)?def\s+(\w+)\s*\(", code, re.MULTILINE)
    if match is None or match.group(1) == name:
        return code
    old = match.group(1)
    renamed = code[: match.start(1)] + name + code[match.end(1):]
    return f"{renamed}\n{old} = {name}\n"


# The child's program. It reads {"code", "tests", "memory_mb", "cpu_s"} from stdin
# and writes one JSON object per line to the stdout it started with: {"tests": [...]}
# once the module ran, then {"name", "ok", "error"} per test as each finishes, so a
# timeout still tells which tests passed. The code's own stdout/stderr go nowhere.
_CHILD = r'''
import json, os, resource, sys
payload = json.loads(sys.stdin.read())
out = os.fdopen(os.dup(1), "w")
null = os.open(os.devnull, os.O_RDWR)
os.dup2(null, 0); os.dup2(null, 1); os.dup2(null, 2)

def emit(obj):
    out.write(json.dumps(obj) + "\n"); out.flush()

mem = payload["memory_mb"] * 1024 * 1024
resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
cpu = int(payload["cpu_s"])
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 20, 64 << 20))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

sys.dont_write_bytecode = True
root = os.path.realpath(os.getcwd())
sys.path.insert(0, root)    # `import solution` finds solution.py

def inside(path):
    if isinstance(path, int):
        return True
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    full = os.path.realpath(os.path.join(root, os.fspath(path)))
    return full == root or full.startswith(root + os.sep)

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
PATH_EVENTS = {"os.remove": 1, "os.rmdir": 1, "os.mkdir": 1, "os.chmod": 1, "os.chown": 1,
               "os.truncate": 1, "os.utime": 1, "shutil.rmtree": 1, "os.rename": 2,
               "os.link": 2, "os.symlink": 2, "shutil.copyfile": 2, "shutil.move": 2}
DENIED = ("socket.connect", "socket.bind", "socket.sendto", "socket.getaddrinfo",
          "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
          "os.fork", "os.forkpty", "os.kill", "os.killpg", "pty.spawn")

def audit(event, args):
    if event == "open":
        path, mode, flags = args
        writing = (mode is not None and any(c in mode for c in "wax+")) or (
            mode is None and isinstance(flags, int) and flags & WRITE_FLAGS)
        if writing and path is not None and not inside(path):
            raise PermissionError(f"sandbox: writing outside the work dir: {path}")
    elif event in PATH_EVENTS:
        for path in args[: PATH_EVENTS[event]]:
            if path is not None and not inside(path):
                raise PermissionError(f"sandbox: {event} outside the work dir: {path}")
    elif event.startswith(DENIED):
        raise PermissionError(f"sandbox: {event} is not allowed")

sys.addaudithook(audit)
# as_main false: a bare namespace, as the reference's exec(code, {}) (where __name__ is "builtins")
ns = {"__name__": "__main__"} if payload.get("as_main", True) else {}
try:
    exec(compile(payload["code"] + "\n" + payload["tests"], "solution_and_tests.py", "exec"), ns)
except BaseException as e:
    emit({"module_error": f"{type(e).__name__}: {e}"})
    sys.exit(0)
names = [k for k, v in ns.items() if k.startswith("test_") and callable(v)]
emit({"tests": names})
for name in names:
    try:
        ns[name]()
        emit({"name": name, "ok": True})
    except BaseException as e:
        emit({"name": name, "ok": False, "error": f"{type(e).__name__}: {e}"[:500]})
'''


def run_tests(code: str, tests: str, timeout: float = DEFAULT_TIMEOUT_S,
              memory_mb: int = DEFAULT_MEMORY_MB, reference_exec: bool = False) -> SandboxResult:
    """Run every top-level `test_*` function of `tests` against `code` in a child
    process; `from solution import ...` lines are dropped (the test sees `code`'s
    names directly), and `solution.py` holding `code` sits in the child's cwd.
    `reference_exec`: as the reference's PyExecutor instead: `tests` run as given
    (the caller strips imports its way), no solution.py, and `__name__` is not
    "__main__" (so `if __name__ == "__main__":` blocks do not run)."""
    if not reference_exec:
        tests = _SOLUTION_IMPORT.sub("", tests)
    payload = json.dumps({"code": code, "tests": tests, "memory_mb": memory_mb,
                          "cpu_s": max(1, int(timeout) + 1), "as_main": not reference_exec})
    result = SandboxResult()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="memgen-sandbox-") as work:
        if not reference_exec:
            with open(os.path.join(work, "solution.py"), "w") as f:
                f.write(code)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": work, "TMPDIR": work,
               "LANG": "C.UTF-8"}
        proc = subprocess.Popen(
            [sys.executable, "-I", "-c", _CHILD], cwd=work, env=env, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True, text=True)
        try:
            stdout, _ = proc.communicate(payload, timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            stdout, _ = proc.communicate()
            result.error = f"timed out after {timeout:g} s"
    result.elapsed_s = time.perf_counter() - start
    names: list[str] = _TEST_DEF.findall(tests)
    for line in stdout.splitlines():
        try:
            msg = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "module_error" in msg:
            result.error = msg["module_error"]
        elif "tests" in msg:
            names = msg["tests"]
        elif msg.get("ok"):
            result.passed.append(msg["name"])
        else:
            result.failed[msg["name"]] = msg.get("error", "")
    if result.error is None and proc.returncode not in (0, None) and len(result.passed) + len(result.failed) < len(names):
        result.error = f"child exited with status {proc.returncode} (resource limit?)"
    for name in names:   # not run or not finished: failed
        if name not in result.passed and name not in result.failed:
            result.failed[name] = result.error or "did not run"
    return result


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def score_code(completion: str, tests: str, function_name: str | None = None,
               timeout: float = DEFAULT_TIMEOUT_S) -> Score:
    """Pass fraction of the `test_*` functions. The reference runs all tests in one
    go and scores 1 or 0; `details["all_passed"]` is that number."""
    code = extract_code(completion)
    name = function_name
    if not name:
        found = _SOLUTION_NAME.search(tests)
        name = found.group(1) if found else None
    if name:
        code = rename_first_function(code, name)
    res = run_tests(code, tests, timeout=timeout)
    details = {"tests_passed": len(res.passed), "tests_total": res.total,
               "all_passed": float(res.total > 0 and not res.failed)}
    if res.error:
        details["error"] = res.error
    return Score(res.fraction, code, details)
