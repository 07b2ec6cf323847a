"""A real `memgen serve` process for tests: started on a free 127.0.0.1 port, waited
for until /health answers, and stopped (terminate, then kill) however the test ends."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from memgen.serve.processes import free_port, stop, wait_until_answers


@contextlib.contextmanager
def memgen_serve(args: list[str], log: Path, startup_timeout_s: float = 180):
    """Yields (base URL, process) of `memgen serve ARGS --host 127.0.0.1 --port P`; its
    output goes to `log`; a server that exits or never answers fails the test with its log."""
    port = free_port()
    cmd = [sys.executable, "-m", "memgen.cli", "serve", *args, "--host", "127.0.0.1", "--port", str(port)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    base = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_until_answers(proc, f"{base}/health", startup_timeout_s)
        except RuntimeError as err:
            pytest.fail(f"memgen serve {err}:\n{log.read_text()[-3000:]}")
        yield base, proc
    finally:
        stop(proc, 20)
