"""A real `memgen serve` process for tests: started on a free 127.0.0.1 port, waited
for until /health answers, and stopped (terminate, then kill) however the test ends."""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
        deadline = time.monotonic() + startup_timeout_s
        while True:
            if proc.poll() is not None:
                pytest.fail(f"memgen serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"memgen serve did not answer /health in {startup_timeout_s} s:\n"
                            f"{log.read_text()[-3000:]}")
            time.sleep(0.2)
        yield base, proc
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
