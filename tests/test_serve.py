"""`memgen serve`: a real server process on 127.0.0.1 (a free port) on a tiny
MemGen model, spoken to with the official `openai` client (and raw httpx for
what the client will not send). Greedy float64 outputs are compared with the
same requests run alone offline through `LLM`; the server is killed at the end
of the module whatever happens."""
from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")

from memgen import LLM, SamplingParams  # noqa: E402

NAME = "tiny-memgen"
NUM_CONCURRENT = 200
STARTUP_TIMEOUT_S = 180
WAIT_S = 60       # how long a poll for a state may take before the test gives up (never a timing assertion)


@dataclass
class Server:
    base: str
    proc: subprocess.Popen
    log: Path

    def client(self, **kw):
        return openai.OpenAI(base_url=f"{self.base}/v1", api_key="none", max_retries=0, **kw)

    def async_client(self):
        return openai.AsyncOpenAI(base_url=f"{self.base}/v1", api_key="none", max_retries=0, timeout=120)

    def metrics(self) -> dict[str, float]:
        """Prometheus samples as {'name{labels}': value}."""
        text = httpx.get(f"{self.base}/metrics", timeout=30).text
        return {m.group(1): float(m.group(2))
                for m in re.finditer(r"^([a-zA-Z_:][^ ]*) ([-+0-9.eE]+|NaN)$", text, re.MULTILINE)}


@pytest.fixture(scope="module")
def server(memgen_reasoner_dir, memgen_ckpt_dir, tmp_path_factory):
    from serve_process import memgen_serve

    log = tmp_path_factory.mktemp("serve") / "server.log"
    args = ["--model", str(memgen_reasoner_dir), "--memgen", str(memgen_ckpt_dir), "--dtype", "float64",
            "--device", "cpu", "--served-model-name", NAME, "--max-waiting", "100000", "--log-level", "warning"]
    with memgen_serve(args, log, STARTUP_TIMEOUT_S) as (base, proc):
        yield Server(base, proc, log)


@pytest.fixture(scope="module")
def offline(memgen_reasoner_dir, memgen_ckpt_dir):
    """The same model and engine settings, offline, in this process."""
    return LLM(model=memgen_reasoner_dir, memgen=memgen_ckpt_dir, dtype="float64", device="cpu")


def _greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw)


def _wait_for(server: Server, what, ok) -> dict[str, float]:
    """Poll /metrics until ok(samples); fail (naming `what`) if it never happens."""
    deadline = time.monotonic() + WAIT_S
    while True:
        samples = server.metrics()
        if ok(samples):
            return samples
        if time.monotonic() > deadline:
            pytest.fail(f"{what} never happened; metrics: "
                        f"{ {k: v for k, v in samples.items() if 'bucket' not in k and 'created' not in k} }")
        time.sleep(0.05)


def _idle(samples) -> bool:
    used = sum(v for k, v in samples.items() if k.startswith("memgen_kv_blocks_used"))
    return used == 0 and samples["memgen_requests_running"] == 0 and samples["memgen_requests_waiting"] == 0


def _aborted(samples) -> float:
    return samples.get('memgen_sequences_finished_total{finish_reason="abort"}', 0.0)


# ---- the basic routes -------------------------------------------------------------------
def test_health_and_models(server, memgen_reasoner_dir, memgen_ckpt_dir):
    assert httpx.get(f"{server.base}/health").json() == {"status": "ok"}
    models = server.client().models.list().data
    assert [m.id for m in models] == [NAME]
    assert models[0].model_extra["memgen"] == str(memgen_ckpt_dir)
    assert models[0].model_extra["max_model_len"] == 512
    r = httpx.get(f"{server.base}/no/such/route")
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_completion_matches_offline_with_memgen_fields(server, offline):
    prompt = "Solve the math problem, and put the answer in a box."
    ref = offline.generate(prompt, _greedy(12), use_tqdm=False)[0]
    out = server.client().completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0,
                                             extra_body={"return_token_ids": True})
    choice = out.choices[0]
    assert out.object == "text_completion" and out.model == NAME and out.id.startswith("cmpl-")
    assert choice.text == ref.text and choice.finish_reason == ref.finish_reason
    assert choice.token_ids == ref.token_ids and choice.augmentation == ref.augmentation
    assert choice.prompt_token_ids == ref.prompt_token_ids
    # MemGen inserted latents (the inactive trigger inserts at the prompt and at delimiters)
    assert ref.augmentation[0] == 1 and ref.metrics["num_insertions"] >= 1
    assert choice.insertion_positions == [i for i, a in enumerate(ref.augmentation) if a == 1]
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(ref.prompt_token_ids), len(ref.token_ids))
    # without return_token_ids, none of MemGen's fields
    plain = server.client().completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0)
    assert plain.choices[0].text == ref.text
    assert not {"token_ids", "augmentation", "insertion_positions"} & set(plain.choices[0].model_extra or {})


def test_chat_stream_and_whole(server, offline):
    messages = [{"role": "user", "content": "What is 12 plus 30?"}]
    ref = offline.chat(messages, _greedy(10), use_tqdm=False)[0]
    client = server.client()
    whole = client.chat.completions.create(model=NAME, messages=messages, max_tokens=10, temperature=0,
                                           extra_body={"return_token_ids": True})
    assert whole.object == "chat.completion" and whole.choices[0].message.role == "assistant"
    assert whole.choices[0].message.content == ref.text and whole.choices[0].finish_reason == ref.finish_reason
    assert whole.choices[0].token_ids == ref.token_ids and whole.choices[0].augmentation == ref.augmentation
    assert whole.model_extra["prompt_token_ids"] == ref.prompt_token_ids

    stream = client.chat.completions.create(model=NAME, messages=messages, max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"return_token_ids": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant" and len({c.id for c in chunks}) == 1
    body = [c for c in chunks if c.choices]
    text = "".join(c.choices[0].delta.content or "" for c in body)
    ids = [t for c in body for t in (c.choices[0].model_extra or {}).get("token_ids", [])]
    aug = [a for c in body for a in (c.choices[0].model_extra or {}).get("augmentation", [])]
    reasons = [c.choices[0].finish_reason for c in body if c.choices[0].finish_reason]
    assert (text, ids, aug, reasons) == (ref.text, ref.token_ids, ref.augmentation, [ref.finish_reason])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(ref.token_ids)


def test_completion_stream_raw_sse(server, offline):
    """The wire format: `data: {json}` events ending with `data: [DONE]`."""
    prompt = "Hello"
    ref = offline.generate(prompt, _greedy(8), use_tqdm=False)[0]
    with httpx.stream("POST", f"{server.base}/v1/completions", timeout=60,
                      json={"model": NAME, "prompt": prompt, "max_tokens": 8, "temperature": 0, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == ref.text
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == ref.finish_reason


# ---- OpenAI's sampling fields -----------------------------------------------------------
def test_n_seed_penalties_stop_and_logprobs_as_offline(server, offline):
    prompt = "We add the numbers, then"
    sampled = SamplingParams(n=3, seed=7, temperature=0.8, top_p=0.9, max_tokens=8, presence_penalty=0.5,
                             frequency_penalty=0.3, logprobs=2)
    ref = offline.generate(prompt, sampled, use_tqdm=False)[0].outputs
    out = server.client().completions.create(model=NAME, prompt=prompt, n=3, seed=7, temperature=0.8, top_p=0.9,
                                             max_tokens=8, presence_penalty=0.5, frequency_penalty=0.3, logprobs=2)
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert [c.text for c in out.choices] == [r.text for r in ref]
    assert len({r.text for r in ref}) > 1          # the seeds differ per completion
    for c, r in zip(out.choices, ref):
        assert c.logprobs.token_logprobs == [lp[t] for t, lp in zip(r.token_ids, r.logprobs)]
        assert len(c.logprobs.tokens) == len(r.token_ids) and all(len(d) <= 3 for d in c.logprobs.top_logprobs)

    # stop: the text ends before the first stop string, finish_reason "stop"
    greedy = offline.generate(prompt, _greedy(16), use_tqdm=False)[0]
    stop = next(greedy.text[i:i + 2] for i in range(1, len(greedy.text) - 1) if "\ufffd" not in greedy.text[i:i + 2])
    ref_stop = offline.generate(prompt, _greedy(16, stop=[stop]), use_tqdm=False)[0]
    assert ref_stop.finish_reason == "stop" and stop not in ref_stop.text
    for stream in (False, True):
        res = server.client().completions.create(model=NAME, prompt=prompt, max_tokens=16, temperature=0, stop=stop,
                                                 stream=stream)
        choices = [c.choices[0] for c in res if c.choices] if stream else res.choices
        assert "".join(c.text for c in choices) == ref_stop.text
        assert [c.finish_reason for c in choices if c.finish_reason] == ["stop"]


def test_chat_logprobs(server, offline):
    messages = [{"role": "user", "content": "Hello"}]
    ref = offline.chat(messages, _greedy(6, logprobs=2), use_tqdm=False)[0]
    out = server.client().chat.completions.create(model=NAME, messages=messages, max_tokens=6, temperature=0,
                                                  logprobs=True, top_logprobs=2)
    content = out.choices[0].logprobs.content
    assert [c.logprob for c in content] == [lp[t] for t, lp in zip(ref.token_ids, ref.logprobs)]
    assert all(len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob for c in content)


def test_memgen_trigger_knobs_via_extra_body(server, offline):
    """trigger_sample / trigger_temperature reach the engine: the server's masks equal the
    offline ones with the same knobs (and differ from the argmax trigger's)."""
    prompts = ["Solve the math problem, and put the answer in a box.", "What is 12 plus 30?", "Hello"]
    knobs = dict(trigger_sample=True, trigger_temperature=5.0)
    client = server.client()
    differs = False
    for i, prompt in enumerate(prompts):
        ref = offline.generate(prompt, _greedy(16, seed=11 + i, **knobs), use_tqdm=False)[0]
        argmax = offline.generate(prompt, _greedy(16, seed=11 + i), use_tqdm=False)[0]
        out = client.completions.create(model=NAME, prompt=prompt, max_tokens=16, temperature=0, seed=11 + i,
                                        extra_body={"return_token_ids": True, **knobs})
        assert out.choices[0].augmentation == ref.augmentation and out.choices[0].token_ids == ref.token_ids
        differs |= ref.augmentation != argmax.augmentation
    assert differs


# ---- many clients at once ---------------------------------------------------------------
def test_concurrent_streams_nothing_lost_duplicated_or_crossed(server, offline):
    """NUM_CONCURRENT streaming requests at once (completions and chat, different
    prompts and lengths): each stream's text, ids and mask equal the same request
    run alone offline."""
    jobs = []
    for i in range(NUM_CONCURRENT):
        content = f"Question {i}: what is {i} plus {3 * i + 1}?"
        jobs.append((i % 2 == 1, content, 4 + i % 5))
    refs = []
    for chat, content, max_tokens in jobs:   # each alone
        run = offline.chat if chat else offline.generate
        arg = [{"role": "user", "content": content}] if chat else content
        refs.append(run(arg, _greedy(max_tokens), use_tqdm=False)[0])

    async def one(client, chat, content, max_tokens):
        extra = {"return_token_ids": True}
        if chat:
            stream = await client.chat.completions.create(
                model=NAME, messages=[{"role": "user", "content": content}], max_tokens=max_tokens, temperature=0,
                stream=True, extra_body=extra)
        else:
            stream = await client.completions.create(model=NAME, prompt=content, max_tokens=max_tokens,
                                                     temperature=0, stream=True, extra_body=extra)
        text, ids, aug, reasons, chunk_ids = "", [], [], [], set()
        async for chunk in stream:
            chunk_ids.add(chunk.id)
            for c in chunk.choices:
                assert c.index == 0
                text += (c.delta.content or "") if chat else c.text
                ids += (c.model_extra or {}).get("token_ids", [])
                aug += (c.model_extra or {}).get("augmentation", [])
                if c.finish_reason:
                    reasons.append(c.finish_reason)
        return text, ids, aug, reasons, chunk_ids

    async def main():
        client = server.async_client()
        try:
            return await asyncio.gather(*(one(client, *job) for job in jobs))
        finally:
            await client.close()

    results = asyncio.run(main())
    assert len(results) == NUM_CONCURRENT
    stream_ids = [next(iter(r[4])) for r in results]
    assert all(len(r[4]) == 1 for r in results) and len(set(stream_ids)) == NUM_CONCURRENT
    for i, ((text, ids, aug, reasons, _), ref) in enumerate(zip(results, refs)):
        assert (ids, aug, reasons) == (ref.token_ids, ref.augmentation, [ref.finish_reason]), f"request {i}"
        assert text == ref.text, f"request {i}"
    assert len({tuple(r.token_ids) for r in refs}) > NUM_CONCURRENT // 4   # the requests differ: crossing shows
    _wait_for(server, "the server going idle with every KV block free", _idle)


# ---- clients that go away ---------------------------------------------------------------
def test_disconnect_mid_stream_aborts_and_frees_blocks(server):
    before = _aborted(server.metrics())
    client = server.client(timeout=60)
    stream = client.completions.create(model=NAME, prompt="Hello", max_tokens=480, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    first = next(iter(stream))
    assert first.choices and first.choices[0].finish_reason is None
    stream.close()
    client.close()
    samples = _wait_for(server, "the abort of the disconnected stream",
                        lambda s: _aborted(s) >= before + 1 and _idle(s))
    assert _aborted(samples) == before + 1
    # the server goes on serving
    out = server.client().completions.create(model=NAME, prompt="Hello", max_tokens=3, temperature=0)
    assert out.choices[0].finish_reason in ("stop", "length")


def test_disconnect_while_waiting_for_a_whole_response_aborts(server):
    before = _aborted(server.metrics())
    # 48 long choices (two waves of max_num_seqs=32), asked for over a raw connection that
    # the client drops once the engine runs them: a client timeout instead raced the
    # server's admission on a busy machine (the request could time out before it started)
    body = json.dumps({"model": NAME, "prompt": "Hello", "n": 48, "max_tokens": 480, "temperature": 0,
                       "ignore_eos": True}).encode()
    host, port = server.base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as conn:
        conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % (host.encode(), len(body)) + body)
        _wait_for(server, "the request to start", lambda s: s["memgen_requests_running"] > 0)
    samples = _wait_for(server, "the abort of the dropped request", lambda s: _aborted(s) >= before + 48 and _idle(s))
    assert _aborted(samples) == before + 48


# ---- bad input: OpenAI's error body, never a 500, and the server keeps serving -------------
def _error(response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_bad_requests_get_400_or_404(server):
    client = server.client()
    cases = [  # (kwargs, text the message must hold)
        (dict(prompt="Hi", temperature=3.0), "'temperature'"),
        (dict(prompt="Hi", top_p=0.0), "top_p must be in (0, 1]"),
        (dict(prompt="Hi", max_tokens=0), "max_tokens must be >= 1"),
        (dict(prompt="Hi", n=0), "'n'"),
        (dict(prompt="Hi", logprobs=50), "'logprobs'"),
        (dict(prompt="Hi", presence_penalty=3.0), "'presence_penalty'"),
        (dict(prompt="Hi", extra_body={"max_tokens": "5"}), "'max_tokens'"),
        (dict(prompt="", max_tokens=2), "empty string"),
        (dict(prompt=[999999]), "outside the vocabulary"),
        (dict(prompt=[5] * 600), "longer than max_model_len"),
        (dict(prompt="Hi", stop=[""]), "stop strings must not be empty"),
        (dict(prompt="Hi", echo=True), "echo is not supported"),
        (dict(prompt="Hi", extra_body={"trigger_temperature": "hot"}), "'trigger_temperature'"),
    ]
    for kwargs, text in cases:
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=NAME, **{"max_tokens": 2, **kwargs})
        assert e.value.status_code == 400 and text in e.value.body["message"], (kwargs, e.value.body)
        assert e.value.type == "invalid_request_error"
    # another server's field is ignored (one warning in the log), as vLLM does
    plain = client.completions.create(model=NAME, prompt="Hi", max_tokens=2, temperature=0)
    other = client.completions.create(model=NAME, prompt="Hi", max_tokens=2, temperature=0,
                                      extra_body={"no_such_field": 1, "chat_template_kwargs": {"x": 1}})
    assert other.choices[0].text == plain.choices[0].text
    with pytest.raises(openai.BadRequestError, match="conversation"):
        client.chat.completions.create(model=NAME, messages=[])
    with pytest.raises(openai.BadRequestError, match="not among the tools"):   # tests/test_serve_tools.py has more
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hi"}],
                                       tools=[{"type": "function", "function": {"name": "f"}}],
                                       tool_choice={"type": "function", "function": {"name": "g"}})
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="no-such-model", prompt="Hi")
    assert e.value.code == "model_not_found" and e.value.param == "model"

    url = f"{server.base}/v1/completions"
    for raw in ('{"model": "tiny-memgen", "prompt": ', "[1, 2]",
                '{"model": "tiny-memgen", "prompt": "Hi", "temperature": NaN}', b"\xff\xfe"):
        r = httpx.post(url, content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 400 and _error(r)["type"] == "invalid_request_error", raw
    r = httpx.post(url, json={"prompt": "Hi"})
    assert r.status_code == 400 and "missing field 'model'" in _error(r)["message"]
    r = httpx.get(url)
    assert r.status_code == 405 and _error(r)["code"] == "method_not_allowed"

    # never a 500, and the server still serves
    assert not [k for k, v in server.metrics().items() if 'status="500"' in k and v]
    assert client.completions.create(model=NAME, prompt="Hi", max_tokens=2, temperature=0).choices[0].text is not None
    assert httpx.get(f"{server.base}/health").status_code == 200


def test_metrics_exposition(server):
    text = httpx.get(f"{server.base}/metrics").text
    for name in ("memgen_requests_running", "memgen_requests_waiting", "memgen_kv_blocks_used",
                 "memgen_generation_tokens_total", "memgen_prompt_tokens_total", "memgen_insertions_total",
                 "memgen_preemptions_total", "memgen_time_to_first_token_seconds_bucket",
                 "memgen_time_per_output_token_seconds_bucket", "memgen_request_latency_seconds_bucket"):
        assert name in text, name
    samples = server.metrics()
    assert samples["memgen_generation_tokens_total"] > 0 and samples["memgen_insertions_total"] > 0


# ---- in process: the queue limit (deterministic: the loop starts late), an engine failure --
@pytest.fixture(scope="module")
def plain_llm(qwen2_dir):
    return LLM(model=qwen2_dir, dtype="float64", device="cpu")


def _asgi_client(app):
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://memgen")


def test_queue_limit_answers_503_then_serves_the_queued_request(plain_llm):
    from memgen.serve.app import create_app

    llm = plain_llm
    ref = llm.generate("Hello", _greedy(3), use_tqdm=False)[0]
    app = create_app(llm, "tiny", max_waiting=1, start_loop=False)
    engine_loop = app.state.engine_loop
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 3, "temperature": 0, "return_token_ids": True}

    async def main():
        async with _asgi_client(app) as client:
            first = asyncio.create_task(client.post("/v1/completions", json=body))
            while engine_loop.num_waiting < 1:      # queued; nothing admits it yet
                await asyncio.sleep(0.01)
            second = await client.post("/v1/completions", json=body)
            assert second.status_code == 503 and int(second.headers["retry-after"]) >= 1
            assert _error(second)["code"] == "server_overloaded"
            engine_loop.start()
            try:
                return await asyncio.wait_for(first, WAIT_S)
            finally:
                engine_loop.stop()

    first = asyncio.run(main())
    assert first.status_code == 200
    choice = first.json()["choices"][0]
    assert choice["text"] == ref.text and choice["token_ids"] == ref.token_ids
    assert choice["augmentation"] == [-100] * len(ref.token_ids) and choice["insertion_positions"] == []


def test_an_engine_failure_fails_its_requests_with_500_and_the_server_goes_on(plain_llm, monkeypatch):
    from memgen.serve.app import create_app

    ref = plain_llm.generate("Hello", _greedy(4), use_tqdm=False)[0]
    app = create_app(plain_llm, "tiny")
    engine, real_step, calls = plain_llm.engine, plain_llm.engine.step, []

    def step():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected fault")
        return real_step()

    monkeypatch.setattr(engine, "step", step)
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 4, "temperature": 0}

    async def main():
        async with _asgi_client(app) as client:
            failed = await client.post("/v1/completions", json=body)
            after = await client.post("/v1/completions", json=body)
            metrics = (await client.get("/metrics")).text
        return failed, after, metrics

    app.state.engine_loop.start()
    try:
        failed, after, metrics = asyncio.run(main())
    finally:
        app.state.engine_loop.stop()
    assert failed.status_code == 500
    error = _error(failed)
    assert error["type"] == "server_error" and "injected fault" in error["message"]
    assert after.status_code == 200 and after.json()["choices"][0]["text"] == ref.text
    assert 'memgen_sequences_finished_total{finish_reason="error"} 1.0' in metrics
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks and not engine.has_unfinished()


def test_cli_serve_user_errors_are_one_line(tmp_path, capsys):
    from memgen.cli import main

    assert main(["serve", "--model", str(tmp_path / "missing"), "--port", "1"]) == 2
    err = capsys.readouterr().err
    assert "missing" in err and "Traceback" not in err


def test_incremental_text_holds_back_unfinished_utf8_and_stop_prefixes():
    from memgen.detokenizer import IncrementalText

    pieces = {1: b"ab", 2: b"\xe2\x82", 3: b"\xac", 4: b"c S", 5: b"TO", 6: b"P d", 7: b"\xff"}

    def decode(ids):
        return b"".join(pieces[i] for i in ids).decode("utf-8", errors="replace")

    text = IncrementalText(decode, stop=["STOP"])
    ids, sent = [], []
    for token in (1, 2, 3, 4, 5):
        ids.append(token)
        sent.append(text.update(ids))
    # the euro sign waits for its last byte; "S", "STO" wait: they may start "STOP"
    assert sent == ["ab", "", "\u20ac", "c ", ""]
    ids.append(6)                    # "STOP" is complete: nothing past it is ever sent
    assert text.update(ids) == ""
    assert text.finish("ab\u20acc ") == "" and text.sent == "ab\u20acc "

    # a request that ends ("length") with a stop-string prefix and a broken byte: the rest comes at the end
    text = IncrementalText(decode, stop=["STOP"])
    assert text.update([1, 4]) == "abc "
    assert text.update([1, 4, 7]) == ""
    assert text.finish(decode([1, 4, 7])) == "S\ufffd" and text.sent == decode([1, 4, 7])


def test_bench_mode_serve(qwen2_dir, tmp_path):
    """`memgen bench --mode serve`: concurrent streaming clients against a real server
    beside offline generate; every streamed text equals the offline one (greedy, float64)."""
    import json
    import subprocess
    import sys

    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "memgen.cli", "bench", "--mode", "serve", "--model", str(qwen2_dir),
           "--dtype", "float64", "--device", "cpu", "--batch-sizes", "1", "3", "--max-tokens", "4",
           "--num-prompts", "6", "--threads", "1", "--output-dir", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    (path,) = out.glob("serve_*.json")
    data = json.loads(path.read_text())
    assert [level["concurrency"] for level in data["serve"]] == [1, 3]
    for level in data["serve"]:
        assert level["output_tokens"] == 6 * 4 and level["same_text_as_offline"] == 6
        assert level["ttft_s"]["p50"] > 0
    assert data["offline"]["output_tokens"] == 6 * 4
    assert (out / path.name.replace(".json", ".png")).is_file()


# ---- the model id a server answers to -------------------------------------------
def test_default_model_id_names_the_memgen_checkpoint(memgen_reasoner_dir, memgen_ckpt_dir, tmp_path, monkeypatch):
    """`memgen serve --memgen DIR` answers to the checkpoint's name, not its base
    model's (which a plain server of that base reports), and /v1/models lists it;
    --served-model-name still wins."""
    import argparse

    from memgen.cli import main
    from memgen.serve.command import checkpoint_model_id, served_model_name

    def names(**kw):
        return served_model_name(argparse.Namespace(**{"served_model_name": None, "model": None, "memgen": None,
                                                       **kw}))

    ckpt_id = Path(memgen_ckpt_dir).resolve().name
    assert names(model="org/base", memgen=str(memgen_ckpt_dir)) == ckpt_id != names(model="org/base") == "org/base"
    assert names(model="org/base", memgen=str(memgen_ckpt_dir), served_model_name="mine") == "mine"
    assert checkpoint_model_id(tmp_path / "runs" / "gsm8k-weaver") == "gsm8k-weaver"
    assert checkpoint_model_id(tmp_path / "sft-run" / "export") == "sft-run/export"
    assert checkpoint_model_id(str(tmp_path / "ckpt") + "/") == "ckpt"

    apps = []
    monkeypatch.setattr("memgen.serve.command.run_uvicorn", lambda app, **kw: apps.append(app))
    assert main(["serve", "--model", str(memgen_reasoner_dir), "--memgen", str(memgen_ckpt_dir),
                 "--dtype", "float64", "--device", "cpu"]) == 0

    async def ask():
        async with _asgi_client(apps[0]) as client:
            listed = (await client.get("/v1/models")).json()["data"]
            base = await client.post("/v1/completions", json={"model": str(memgen_reasoner_dir), "prompt": "Hi",
                                                              "max_tokens": 1})
            return listed, base

    listed, base = asyncio.run(ask())
    assert [m["id"] for m in listed] == [ckpt_id] and listed[0]["memgen"] == str(memgen_ckpt_dir)
    assert base.status_code == 404 and _error(base)["code"] == "model_not_found"


def test_unknown_request_fields_are_ignored_with_one_warning(caplog):
    """vLLM's habit (API.md): another server's fields pass with one warning naming them;
    a known field with a bad value is still refused."""
    import logging

    import pydantic

    from memgen.serve.schemas import ChatCompletionRequest, CompletionRequest

    with caplog.at_level(logging.WARNING, logger="memgen.serve"):
        req = CompletionRequest.model_validate({"model": "m", "prompt": "Hi", "lora_request": None, "rid": "7"})
    assert req.prompt == "Hi" and not req.model_extra
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "['lora_request', 'rid']" in warnings[0]
    with pytest.raises(pydantic.ValidationError):
        ChatCompletionRequest.model_validate({"model": "m", "messages": [], "top_k": "5", "whatever": 1})


def test_server_process_helpers():
    """memgen.serve.processes: a child that exits before it answers is reported, not waited
    for; stop() ends one that ignores nothing within its grace, and a dead one at once."""
    import subprocess
    import sys

    from memgen.serve.processes import free_port, stop, wait_until_answers

    url = f"http://127.0.0.1:{free_port()}/health"
    gone = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    with pytest.raises(RuntimeError, match="exited with 3"):
        wait_until_answers(gone, url, 30)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    with pytest.raises(RuntimeError, match="did not answer"):
        wait_until_answers(sleeper, url, 0.5)
    stop(sleeper, 10)
    assert sleeper.returncode is not None
    stop(gone, 1)       # already reaped: nothing to signal
