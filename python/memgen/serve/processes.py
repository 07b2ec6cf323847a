"""Server processes started by memgen itself: a free local port, whether a URL answers,
waiting until a started server does, and stopping one (a signal, a grace period, then
kill). Used by the replica launcher, the serve load test, the benchmarks and the tests'
server fixture. Standard library only."""
from __future__ import annotations

import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answers(url: str, timeout: float = 2) -> bool:
    """Does a GET of `url` answer 200?"""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def wait_until_answers(proc: subprocess.Popen, url: str, timeout_s: float, interval_s: float = 0.2) -> None:
    """Wait until `url` answers 200; RuntimeError if `proc` exits first or `timeout_s` passes."""
    deadline = time.monotonic() + timeout_s
    while not answers(url):
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"did not answer {url} in {timeout_s:g} s")
        time.sleep(interval_s)


def reap(proc: subprocess.Popen, timeout_s: float) -> None:
    """Wait for a process told to stop; kill it after `timeout_s`."""
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def stop(proc: subprocess.Popen, timeout_s: float, sig: int = signal.SIGTERM) -> None:
    """Signal a process (if it still runs) and reap it."""
    if proc.poll() is None:
        proc.send_signal(sig)
    reap(proc, timeout_s)
