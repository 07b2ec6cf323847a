"""`memgen serve --replicas 2` (two `memgen serve` processes behind vllm-router) and the
graceful drain on SIGTERM, on 127.0.0.1 only with the tiny MemGen fixture model.

Through the router, with the official `openai` client: streamed and whole completions
and a chat equal offline greedy generation; a replica killed with SIGKILL mid-stream
makes its streams fail with a clear error (never a hang, never a silently short
answer) while new requests go to the survivor; SIGTERM to the launcher stops it (0).
The drain test: SIGTERM during a long stream -> /ready is 503 at once, a new request
gets 503 + Retry-After, the stream still ends normally with [DONE], the process exits 0;
past --shutdown-timeout a stream ends with an error event and [DONE]. Every client call
has a timeout."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
if shutil.which("vllm-router") is None:
    pytest.skip("vllm-router is not installed (pip install 'memgen-engine[router]')", allow_module_level=True)

from memgen import LLM, SamplingParams  # noqa: E402

pytestmark = pytest.mark.distributed

NAME = "tiny-memgen"
TIMEOUT_S = 30          # every client call's limit (a hang fails the test, it never blocks it)
STARTUP_TIMEOUT_S = 120


def _model_args(memgen_reasoner_dir, memgen_ckpt_dir) -> list[str]:
    return ["--model", str(memgen_reasoner_dir), "--memgen", str(memgen_ckpt_dir), "--dtype", "float64",
            "--device", "cpu", "--served-model-name", NAME, "--max-waiting", "100000", "--log-level", "warning"]


def _free_consecutive_ports(n: int) -> int:
    """A port P with P .. P+n-1 free on 127.0.0.1 (checked, not reserved)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n > 65535:
            continue
        try:
            socks = []
            for p in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free consecutive ports")


class Replicas:
    def __init__(self, proc: subprocess.Popen, port: int, log: Path):
        self.proc, self.port, self.log = proc, port, log
        self.base = f"http://127.0.0.1:{port}"
        self.replicas: list[tuple[int, str]] = []   # (pid, url)
        self.router_pid: int | None = None

    def client(self):
        return openai.OpenAI(base_url=f"{self.base}/v1", api_key="none", max_retries=0, timeout=TIMEOUT_S)

    def requests_served(self, url: str) -> float:
        text = httpx.get(f"{url}/metrics", timeout=TIMEOUT_S).text
        return sum(float(m.group(1)) for m in re.finditer(r'^memgen_requests_total\{.*status="200"\} (\S+)$',
                                                          text, re.MULTILINE))


@pytest.fixture(scope="module")
def replicas(memgen_reasoner_dir, memgen_ckpt_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("replicas") / "launcher.log"
    port = _free_consecutive_ports(3)
    cmd = [sys.executable, "-m", "memgen.cli", "serve", "--replicas", "2", "--port", str(port),
           "--shutdown-timeout", "5", *_model_args(memgen_reasoner_dir, memgen_ckpt_dir)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    r = Replicas(proc, port, log)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while "memgen serve --replicas: ready" not in log.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"memgen serve --replicas did not start (rc {proc.poll()}):\n"
                            f"{log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.2)
        text = log.read_text(errors="replace")
        r.replicas = [(int(pid), url) for pid, url in re.findall(r"replica \d+ pid (\d+) url (\S+)", text)]
        r.router_pid = int(re.search(r"router pid (\d+)", text).group(1))
        assert [u for _, u in r.replicas] == [f"http://127.0.0.1:{port + 1}", f"http://127.0.0.1:{port + 2}"]
        yield r
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        for pid in [p for p, _ in r.replicas] + ([r.router_pid] if r.router_pid else []):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture(scope="module")
def offline(memgen_reasoner_dir, memgen_ckpt_dir):
    return LLM(model=memgen_reasoner_dir, memgen=memgen_ckpt_dir, dtype="float64", device="cpu")


def _greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw)


def test_replicas_answer_health_and_ready(replicas):
    for _, url in replicas.replicas:
        assert httpx.get(f"{url}/health", timeout=TIMEOUT_S).json() == {"status": "ok"}
        assert httpx.get(f"{url}/ready", timeout=TIMEOUT_S).status_code == 200
    assert [m.id for m in replicas.client().models.list().data] == [NAME]


def test_through_the_router_equals_offline(replicas, offline):
    prompts = [f"Question {i}: what is {i} plus {2 * i}?" for i in range(6)]
    refs = offline.generate(prompts, _greedy(12), use_tqdm=False)
    client = replicas.client()
    before = [replicas.requests_served(url) for _, url in replicas.replicas]
    for prompt, ref in zip(prompts, refs):
        whole = client.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0,
                                          extra_body={"return_token_ids": True})
        assert whole.choices[0].text == ref.text and whole.choices[0].token_ids == ref.token_ids
        assert whole.choices[0].finish_reason == ref.finish_reason
        chunks = list(client.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0,
                                                stream=True))
        assert "".join(c.choices[0].text for c in chunks if c.choices) == ref.text
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == ref.finish_reason
    messages = [{"role": "user", "content": "What is 12 plus 30?"}]
    ref = offline.chat(messages, _greedy(10), use_tqdm=False)[0]
    chat = client.chat.completions.create(model=NAME, messages=messages, max_tokens=10, temperature=0)
    assert chat.choices[0].message.content == ref.text
    after = [replicas.requests_served(url) for _, url in replicas.replicas]
    assert sum(after) - sum(before) == 2 * len(prompts) + 1      # each request served exactly once


def test_killed_replica_fails_its_streams_clearly_and_the_survivor_serves(replicas, offline):
    client = replicas.client()
    (victim, victim_url), (_, survivor_url) = replicas.replicas
    prompts = [f"Stream {i} keeps going" for i in range(4)]
    long = dict(max_tokens=400, temperature=0, stream=True, n=4, extra_body={"ignore_eos": True})
    streams = [iter(client.completions.create(model=NAME, prompt=p, **long)) for p in prompts]
    for s in streams:
        next(s)                     # every stream is open, generating on one replica or the other
    t_kill = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    failed = completed = 0
    for s in streams:
        finished = 0
        try:
            for chunk in s:
                finished += sum(1 for c in chunk.choices if c.finish_reason)
        except (openai.APIConnectionError, openai.APIStatusError, openai.APIError):
            failed += 1             # a clear error, raised within the timeout
            continue
        assert finished == 4, "a stream ended without every choice's finish_reason (silently cut)"
        completed += 1
    assert failed + completed == len(prompts)
    # until the router's health checks (every 1 s, 2 failures) drop the replica, a request it sends
    # there fails with the router's clear 5xx (or succeeds on a retry); never a hang
    refused, ok_in_a_row, deadline = [], 0, time.monotonic() + TIMEOUT_S
    while ok_in_a_row < 4:
        assert time.monotonic() < deadline, f"the router never recovered: {refused}"
        try:
            client.completions.create(model=NAME, prompt=f"Probe {len(refused)} {ok_in_a_row}", max_tokens=2)
            ok_in_a_row += 1
        except (openai.APIStatusError, openai.APIConnectionError) as e:
            refused.append(f"{type(e).__name__}: {e}"[:200])
            ok_in_a_row = 0
            time.sleep(0.1)
    recovered_s = time.monotonic() - t_kill
    # then every new request goes to the survivor, and answers as offline
    time.sleep(2.5)             # past the router's health-check window (2 x 1 s)
    before = replicas.requests_served(survivor_url)
    refs = offline.generate([f"After the kill {i}" for i in range(4)], _greedy(8), use_tqdm=False)
    for i, ref in enumerate(refs):
        out = client.completions.create(model=NAME, prompt=f"After the kill {i}", max_tokens=8, temperature=0)
        assert out.choices[0].text == ref.text
    assert replicas.requests_served(survivor_url) - before == len(refs)
    print(f"\nkilled replica: {failed} stream(s) failed, {completed} completed; {len(refused)} request(s) "
          f"refused before the router recovered, {recovered_s:.2f} s after the kill {refused[:2]}")
    # the launcher noticed and stays up for the survivor
    deadline = time.monotonic() + TIMEOUT_S
    while "exited with -9" not in replicas.log.read_text(errors="replace"):
        assert time.monotonic() < deadline, replicas.log.read_text(errors="replace")[-2000:]
        time.sleep(0.2)
    assert replicas.proc.poll() is None


def test_launcher_stops_on_sigterm(replicas):
    replicas.proc.send_signal(signal.SIGTERM)
    assert replicas.proc.wait(TIMEOUT_S) == 0
    for pid, _ in replicas.replicas[1:] + [(replicas.router_pid, None)]:
        with pytest.raises(ProcessLookupError):     # reaped by the launcher
            os.kill(pid, 0)


# ---- graceful drain -----------------------------------------------------------------------
def _sse(lines) -> list[str]:
    return [line for line in lines if line]


def test_sigterm_drains(memgen_reasoner_dir, memgen_ckpt_dir, tmp_path):
    """A stream in flight finishes (every choice to its length) while /ready is 503 and a
    new request gets 503 + Retry-After; then the process exits 0."""
    from serve_process import memgen_serve

    args = [*_model_args(memgen_reasoner_dir, memgen_ckpt_dir), "--shutdown-timeout", "20"]
    with memgen_serve(args, tmp_path / "server.log") as (base, proc):
        body = {"model": NAME, "prompt": "A long answer", "max_tokens": 500, "temperature": 0, "stream": True,
                "n": 32, "ignore_eos": True}     # seconds of generation: still running after the checks below
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=TIMEOUT_S) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line)
            proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + TIMEOUT_S
            while httpx.get(f"{base}/ready", timeout=TIMEOUT_S).status_code != 503:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            assert httpx.get(f"{base}/health", timeout=TIMEOUT_S).status_code == 200   # alive, not ready
            refused = httpx.post(f"{base}/v1/completions", json={**body, "stream": False}, timeout=TIMEOUT_S)
            assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
            assert refused.json()["error"]["code"] == "server_shutting_down"
            assert proc.poll() is None                  # still up for the stream in flight
            events = [first, *_sse(lines)]
        assert events[-1] == "data: [DONE]"
        chunks = [json.loads(e[6:]) for e in events[:-1]]
        assert not any("error" in c for c in chunks)
        assert sum(1 for c in chunks for ch in c["choices"] if ch["finish_reason"] == "length") == 32
        assert proc.wait(TIMEOUT_S) == 0


def test_sigterm_past_the_grace_ends_streams_with_an_error_event(memgen_reasoner_dir, memgen_ckpt_dir, tmp_path):
    from serve_process import memgen_serve

    args = [*_model_args(memgen_reasoner_dir, memgen_ckpt_dir), "--shutdown-timeout", "0.2"]
    with memgen_serve(args, tmp_path / "server.log") as (base, proc):
        body = {"model": NAME, "prompt": "An endless answer", "max_tokens": 500, "temperature": 0, "stream": True,
                "n": 64, "ignore_eos": True}
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=TIMEOUT_S) as r:
            lines = r.iter_lines()
            events = [next(line for line in lines if line)]
            proc.send_signal(signal.SIGTERM)
            events += _sse(lines)
        assert events[-1] == "data: [DONE]"
        last = json.loads(events[-2][6:])
        assert last["error"]["code"] == "server_shutting_down"
        assert proc.wait(TIMEOUT_S) == 0
