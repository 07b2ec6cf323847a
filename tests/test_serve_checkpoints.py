"""`memgen serve` with several MemGen checkpoints on one base: a real server process
(`--memgen a=DIR --memgen b=DIR --api-key KEY`) on the tiny float64 MemGen model,
spoken to with the official `openai` client and raw httpx. A request's `model` picks
the checkpoint; greedy outputs equal offline `LLM.generate` with the same checkpoint
(also for checkpoints loaded, updated and unloaded live through the routes, and
across a pause); unknown models are 404, the base 400, a wrong key 401, a corrupt
directory 400 while the others go on serving. The tests share one server and run
in file order (live changes build on each other)."""
from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")

import memgen_fixtures  # noqa: E402

from memgen import LLM, SamplingParams  # noqa: E402

BASE = "tiny-base"
KEY = "sk-test-key"
WAIT_S = 60
PROMPTS = ["Solve the math problem, and put the answer in a box.", "What is 12 plus 30?", "Hello"]


@dataclass
class Server:
    base: str
    log: Path

    def client(self, key: str = KEY, **kw):
        return openai.OpenAI(base_url=f"{self.base}/v1", api_key=key, max_retries=0, **kw)

    def async_client(self):
        return openai.AsyncOpenAI(base_url=f"{self.base}/v1", api_key=KEY, max_retries=0, timeout=120)

    def post(self, path: str, body: dict | None = None, key: str | None = KEY) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
        return httpx.post(f"{self.base}{path}", json=body, headers=headers, timeout=120)

    def metrics(self) -> dict[str, float]:
        text = httpx.get(f"{self.base}/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=30).text
        return {m.group(1): float(m.group(2))
                for m in re.finditer(r"^([a-zA-Z_:][^ ]*) ([-+0-9.eE]+|NaN)$", text, re.MULTILINE)}


@pytest.fixture(scope="module")
def ckpt_c(tmp_path_factory, tokenizer, memgen_reasoner_dir):
    """A third checkpoint (other random weights), for the live routes."""
    return memgen_fixtures.build_memgen_checkpoint(tmp_path_factory.mktemp("memgen_c"), tokenizer,
                                                   memgen_reasoner_dir, seed=3)


@pytest.fixture(scope="module")
def server(memgen_reasoner_dir, memgen_ckpt_dir, memgen_active_ckpt_dir, tmp_path_factory):
    from serve_process import memgen_serve

    log = tmp_path_factory.mktemp("serve_ckpts") / "server.log"
    args = ["--model", str(memgen_reasoner_dir), "--memgen", f"a={memgen_ckpt_dir}",
            "--memgen", f"b={memgen_active_ckpt_dir}", "--served-model-name", BASE, "--api-key", KEY,
            "--dtype", "float64", "--device", "cpu", "--max-waiting", "100000", "--log-level", "warning"]
    with memgen_serve(args, log) as (base, _):
        yield Server(base, log)


@pytest.fixture(scope="module")
def offline(memgen_reasoner_dir, memgen_ckpt_dir, memgen_active_ckpt_dir, ckpt_c):
    """The same checkpoints in one offline LLM (a, b; c loaded live as the server's)."""
    llm = LLM(model=memgen_reasoner_dir, memgen={"a": memgen_ckpt_dir, "b": memgen_active_ckpt_dir},
              dtype="float64", device="cpu")
    llm.load_memgen("c", ckpt_c)
    return llm


def _ref(offline, checkpoint: str, prompt: str, max_tokens: int = 12):
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, memgen_checkpoint=checkpoint)
    return offline.generate(prompt, params, use_tqdm=False)[0]


def _complete(client, model: str, prompt: str, max_tokens: int = 12):
    out = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                    extra_body={"return_token_ids": True})
    assert out.model == model
    return out.choices[0]


def _same(choice, ref) -> None:
    assert (choice.text, choice.token_ids, choice.augmentation, choice.finish_reason) == \
        (ref.text, ref.token_ids, ref.augmentation, ref.finish_reason)


def _error(r: httpx.Response) -> dict:
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


# ---- flags ------------------------------------------------------------------------------
def test_memgen_flags(tmp_path, monkeypatch):
    from memgen.cli import build_parser
    from memgen.serve.checkpoints import parse_memgen_flags
    from memgen.serve.command import served_model_name, serve_llm_kwargs

    odd = tmp_path / "x=y"
    odd.mkdir()
    assert parse_memgen_flags(None) is None and parse_memgen_flags([]) is None
    assert parse_memgen_flags(["runs/ckpt"]) == "runs/ckpt"          # today's single checkpoint
    assert parse_memgen_flags([str(odd)]) == str(odd)                 # an existing path holding '='
    assert parse_memgen_flags(["a=d1", "b=d2"]) == {"a": "d1", "b": "d2"}
    assert parse_memgen_flags(["a=d1"]) == {"a": "d1"}
    assert parse_memgen_flags(["a=d1", "runs/sft"]) == {"a": "d1", "sft": "runs/sft"}
    for bad in (["=d"], ["a="], ["a=d1", "a=d2"]):
        with pytest.raises(ValueError):
            parse_memgen_flags(bad)

    parser = build_parser()
    args = parser.parse_args(["serve", "--memgen", "a=d1", "--memgen", "b=d2", "--model", "org/base"])
    assert serve_llm_kwargs(args)["memgen"] == {"a": "d1", "b": "d2"}
    assert served_model_name(args) == "org/base" and args.api_key is None
    args = parser.parse_args(["serve", "--memgen", "runs/ckpt", "--model", "org/base"])
    assert serve_llm_kwargs(args)["memgen"] == "runs/ckpt" and served_model_name(args) == "ckpt"
    monkeypatch.setenv("MEMGEN_API_KEY", "from-env")
    assert build_parser().parse_args(["serve"]).api_key == "from-env"


# ---- the server ---------------------------------------------------------------------------
def test_models_list_the_base_and_each_checkpoint(server, memgen_ckpt_dir, memgen_active_ckpt_dir):
    models = server.client().models.list().data
    assert [m.id for m in models] == [BASE, "a", "b"]
    base, a, b = (m.model_extra for m in models)
    assert base["memgen"] is None and base["parent"] is None
    assert (a["memgen"], a["parent"], a["memgen_version"]) == (str(memgen_ckpt_dir), BASE, 0)
    assert (b["memgen"], b["parent"], b["memgen_version"]) == (str(memgen_active_ckpt_dir), BASE, 0)


def test_api_key(server):
    assert httpx.get(f"{server.base}/health").status_code == 200       # probes stay open
    assert httpx.get(f"{server.base}/ready").status_code == 200
    for key in (None, "wrong"):
        headers = {} if key is None else {"Authorization": f"Bearer {key}"}
        for method, path in (("GET", "/v1/models"), ("GET", "/metrics"), ("POST", "/v1/completions"),
                             ("POST", "/v1/pause"), ("POST", "/v1/load_memgen_checkpoint")):
            r = httpx.request(method, f"{server.base}{path}", headers=headers, json={}, timeout=30)
            assert r.status_code == 401, (key, path)
            assert _error(r)["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        server.client(key="wrong").completions.create(model="a", prompt="Hi", max_tokens=1)
    assert server.metrics()["memgen_paused"] == 0          # the refused pause never ran


def test_each_model_runs_its_checkpoint_as_offline(server, offline):
    client = server.client()
    texts = {}
    for checkpoint in ("a", "b"):
        for prompt in PROMPTS:
            ref = _ref(offline, checkpoint, prompt)
            assert ref.metrics["memgen_checkpoint"] == checkpoint
            _same(_complete(client, checkpoint, prompt), ref)
            texts[checkpoint, prompt] = ref.token_ids
    assert any(texts["a", p] != texts["b", p] for p in PROMPTS)   # the two checkpoints differ
    # chat, streamed
    messages = [{"role": "user", "content": "What is 12 plus 30?"}]
    ref = offline.chat(messages, SamplingParams(max_tokens=10, temperature=0, memgen_checkpoint="b"),
                       use_tqdm=False)[0]
    chunks = list(client.chat.completions.create(model="b", messages=messages, max_tokens=10, temperature=0,
                                                 stream=True, extra_body={"return_token_ids": True}))
    assert {c.model for c in chunks} == {"b"}
    body = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in body) == ref.text
    assert [t for c in body for t in (c.choices[0].model_extra or {}).get("token_ids", [])] == ref.token_ids


def test_mixed_concurrent_requests_batch_and_match_offline(server, offline):
    jobs = [(ckpt, prompt) for prompt in PROMPTS for ckpt in ("a", "b")] * 3
    refs = {(c, p): _ref(offline, c, p, 16) for c, p in set(jobs)}

    async def run():
        async with server.async_client() as client:
            return await asyncio.gather(*[
                client.completions.create(model=c, prompt=p, max_tokens=16, temperature=0,
                                          extra_body={"return_token_ids": True}) for c, p in jobs])

    before = server.metrics()
    outs = asyncio.run(run())
    for (c, p), out in zip(jobs, outs):
        assert out.model == c
        _same(out.choices[0], refs[c, p])
    after = server.metrics()
    for c in ("a", "b"):
        finished = sum(v - before.get(k, 0) for k, v in after.items()
                       if k.startswith("memgen_checkpoint_sequences_finished_total{") and f'checkpoint="{c}"' in k)
        assert finished == len(jobs) // 2
        key = f'memgen_checkpoint_generation_tokens_total{{checkpoint="{c}"}}'
        assert after[key] - before.get(key, 0) == sum(len(refs[j].token_ids) for j in jobs if j[0] == c)
        assert after[f'memgen_checkpoint_version{{checkpoint="{c}"}}'] == 0


def test_unknown_model_is_404_and_the_base_400(server):
    r = server.post("/v1/completions", {"model": "nope", "prompt": "Hi", "max_tokens": 1})
    assert r.status_code == 404 and _error(r)["code"] == "model_not_found" and "`a`" in _error(r)["message"]
    with pytest.raises(openai.NotFoundError):
        server.client().chat.completions.create(model="nope", messages=[{"role": "user", "content": "Hi"}])
    r = server.post("/v1/completions", {"model": BASE, "prompt": "Hi", "max_tokens": 1})
    assert r.status_code == 400 and _error(r)["code"] == "base_model_not_served"


def test_live_load_and_a_corrupt_directory(server, offline, ckpt_c, memgen_ckpt_dir, memgen_wide_ckpt_dir, tmp_path):
    client = server.client()
    # a corrupt directory: 400 with the reason, nothing loaded, the others keep serving
    corrupt = tmp_path / "corrupt"
    shutil.copytree(ckpt_c, corrupt)
    weights = sorted(p for p in corrupt.rglob("*") if p.suffix in (".bin", ".pt", ".safetensors"))
    assert weights
    weights[0].write_bytes(b"not a checkpoint")
    for path in (corrupt, tmp_path / "missing"):
        r = server.post("/v1/load_memgen_checkpoint", {"name": "c", "path": str(path)})
        assert r.status_code == 400 and _error(r)["code"] == "invalid_memgen_checkpoint", r.text
        assert str(path) in _error(r)["message"]
    assert [m.id for m in client.models.list().data] == [BASE, "a", "b"]
    _same(_complete(client, "a", PROMPTS[0]), _ref(offline, "a", PROMPTS[0]))
    # a checkpoint made for another base (its weaver is 96 wide, this reasoner 64): 400, nothing loaded
    r = server.post("/v1/load_memgen_checkpoint", {"name": "w", "path": str(memgen_wide_ckpt_dir)})
    assert r.status_code == 400 and _error(r)["code"] == "invalid_memgen_checkpoint", r.text
    # bad bodies and names
    assert server.post("/v1/load_memgen_checkpoint", {"name": "c"}).status_code == 400
    r = server.post("/v1/load_memgen_checkpoint", {"name": "a", "path": str(ckpt_c)})
    assert r.status_code == 400 and "already loaded" in _error(r)["message"]
    r = server.post("/v1/load_memgen_checkpoint", {"name": BASE, "path": str(ckpt_c)})
    assert r.status_code == 400

    r = server.post("/v1/load_memgen_checkpoint", {"name": "c", "path": str(ckpt_c)})
    assert r.status_code == 200 and r.json() == {"name": "c", "version": 0, "path": str(ckpt_c), "status": "loaded"}
    models = client.models.list().data
    assert [m.id for m in models] == [BASE, "a", "b", "c"] and models[-1].model_extra["memgen"] == str(ckpt_c)
    for prompt in PROMPTS:
        _same(_complete(client, "c", prompt), _ref(offline, "c", prompt))
    assert server.metrics()['memgen_checkpoint_changes_total{action="load",status="error"}'] >= 2


def test_live_update_then_unload(server, offline, ckpt_c, memgen_ckpt_dir):
    client = server.client()
    r = server.post("/v1/update_memgen_checkpoint", {"name": "nope", "path": str(ckpt_c)})
    assert r.status_code == 404 and _error(r)["code"] == "model_not_found"
    # a gets c's weights: version 1, and it now answers as c
    r = server.post("/v1/update_memgen_checkpoint", {"name": "a", "path": str(ckpt_c)})
    assert r.status_code == 200 and r.json()["version"] == 1
    assert {m.id: m.model_extra["memgen_version"] for m in client.models.list().data[1:]} == {"a": 1, "b": 0, "c": 0}
    for prompt in PROMPTS[:2]:
        _same(_complete(client, "a", prompt), _ref(offline, "c", prompt))
    assert server.metrics()['memgen_checkpoint_version{checkpoint="a"}'] == 1
    # and back
    assert server.post("/v1/update_memgen_checkpoint", {"name": "a", "path": str(memgen_ckpt_dir)}).json()[
        "version"] == 2
    _same(_complete(client, "a", PROMPTS[0]), _ref(offline, "a", PROMPTS[0]))

    r = server.post("/v1/unload_memgen_checkpoint", {"name": "c"})
    assert r.status_code == 200 and r.json() == {"name": "c", "status": "unloaded"}
    assert [m.id for m in client.models.list().data] == [BASE, "a", "b"]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="c", prompt="Hi", max_tokens=1)
    r = server.post("/v1/unload_memgen_checkpoint", {"name": "c"})
    assert r.status_code == 404
    assert 'memgen_checkpoint_version{checkpoint="c"}' not in server.metrics()


def test_pause_holds_requests_and_an_update_meanwhile_applies_to_them(server, offline, ckpt_c,
                                                                       memgen_active_ckpt_dir):
    """A trainer's weight sync: pause, update b, resume; a request sent during the pause
    waits, then runs on b's new weights."""
    assert server.post("/v1/pause").json() == {"paused": True}
    assert server.metrics()["memgen_paused"] == 1

    async def during_pause():
        async with server.async_client() as client:
            task = asyncio.create_task(client.completions.create(
                model="b", prompt=PROMPTS[1], max_tokens=12, temperature=0, extra_body={"return_token_ids": True}))
            deadline = time.monotonic() + WAIT_S
            while (await asyncio.to_thread(server.metrics))["memgen_requests_waiting"] < 1:   # it arrived, waits
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)
            assert not task.done()
            r = await asyncio.to_thread(server.post, "/v1/update_memgen_checkpoint", {"name": "b",
                                                                                     "path": str(ckpt_c)})
            assert r.status_code == 200 and r.json()["version"] == 1
            assert not task.done()
            assert (await asyncio.to_thread(server.post, "/v1/resume")).json() == {"paused": False}
            return await asyncio.wait_for(task, WAIT_S)

    out = asyncio.run(during_pause())
    _same(out.choices[0], _ref(offline, "c", PROMPTS[1]))
    assert server.metrics()["memgen_paused"] == 0
    # b back to its own weights
    assert server.post("/v1/update_memgen_checkpoint", {"name": "b", "path": str(memgen_active_ckpt_dir)}
                       ).status_code == 200
    _same(_complete(server.client(), "b", PROMPTS[2]), _ref(offline, "b", PROMPTS[2]))


def test_a_plain_server_refuses_checkpoint_routes_and_pauses(qwen2_dir):
    """In process: a plain LLM has no checkpoints to load (400); its one model id as before;
    pause and resume work on it too."""
    from memgen.serve.app import create_app

    llm = LLM(model=qwen2_dir, dtype="float64", device="cpu")
    ref = llm.generate("Hello", SamplingParams(max_tokens=3, temperature=0), use_tqdm=False)[0]
    app = create_app(llm, "tiny")
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 3, "temperature": 0}

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://memgen") as client:
            listed = (await client.get("/v1/models")).json()["data"]
            load = await client.post("/v1/load_memgen_checkpoint", json={"name": "c", "path": "/nowhere"})
            other = await client.post("/v1/completions", json={**body, "model": "other"})
            assert (await client.post("/v1/pause")).json() == {"paused": True}
            task = asyncio.create_task(client.post("/v1/completions", json=body))
            await asyncio.sleep(0.3)
            held = not task.done()
            await client.post("/v1/resume")
            return listed, load, other, held, await asyncio.wait_for(task, WAIT_S)

    app.state.engine_loop.start()
    try:
        listed, load, other, held, out = asyncio.run(main())
    finally:
        app.state.engine_loop.stop()
    assert [m["id"] for m in listed] == ["tiny"] and listed[0]["memgen"] is None
    assert load.status_code == 400 and _error(load)["code"] == "no_memgen"
    assert other.status_code == 404 and _error(other)["code"] == "model_not_found"
    assert held and out.status_code == 200 and out.json()["choices"][0]["text"] == ref.text


def test_a_single_checkpoint_server_keeps_its_id_and_takes_live_loads(memgen_reasoner_dir, memgen_ckpt_dir, ckpt_c,
                                                                      offline):
    """In process, `--memgen DIR --served-model-name solo` as before (one id, the base not
    listed: 404); a checkpoint loaded live joins it; the routes take the served id as name."""
    from memgen.serve.app import create_app

    llm = LLM(model=memgen_reasoner_dir, memgen=memgen_ckpt_dir, dtype="float64", device="cpu")
    app = create_app(llm, "solo", memgen=str(memgen_ckpt_dir))
    body = {"prompt": PROMPTS[1], "max_tokens": 8, "temperature": 0, "return_token_ids": True}

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://memgen") as client:
            first = (await client.get("/v1/models")).json()["data"]
            base = await client.post("/v1/completions", json={**body, "model": str(memgen_reasoner_dir)})
            load = await client.post("/v1/load_memgen_checkpoint", json={"name": "c", "path": str(ckpt_c)})
            listed = (await client.get("/v1/models")).json()["data"]
            on_c = (await client.post("/v1/completions", json={**body, "model": "c"})).json()
            update = await client.post("/v1/update_memgen_checkpoint", json={"name": "solo", "path": str(ckpt_c)})
            solo = (await client.post("/v1/completions", json={**body, "model": "solo"})).json()
            return first, base, load, listed, on_c, update, solo

    app.state.engine_loop.start()
    try:
        first, base, load, listed, on_c, update, solo = asyncio.run(main())
    finally:
        app.state.engine_loop.stop()
    assert [(m["id"], m["memgen"], m["parent"]) for m in first] == [("solo", str(memgen_ckpt_dir), None)]
    assert base.status_code == 404 and _error(base)["code"] == "model_not_found"
    assert load.status_code == 200 and [m["id"] for m in listed] == ["solo", "c"]
    ref = _ref(offline, "c", PROMPTS[1], 8)
    assert on_c["model"] == "c" and on_c["choices"][0]["token_ids"] == ref.token_ids
    assert update.status_code == 200 and update.json()["version"] == 1
    assert solo["model"] == "solo" and solo["choices"][0]["token_ids"] == ref.token_ids


def test_too_many_versions_is_a_400_and_changes_nothing(memgen_reasoner_dir, memgen_ckpt_dir, ckpt_c):
    """--max-memgen-versions bounds the live versions: one more load is a 400 naming the limit."""
    from memgen.cli import build_parser
    from memgen.serve.app import create_app
    from memgen.serve.command import serve_llm_kwargs, served_models

    args = build_parser().parse_args(["serve", "--memgen", f"a={memgen_ckpt_dir}", "--max-memgen-versions", "2"])
    assert serve_llm_kwargs(args)["max_memgen_versions"] == 2
    llm = LLM(model=memgen_reasoner_dir, memgen={"a": memgen_ckpt_dir}, dtype="float64", device="cpu",
              max_memgen_versions=2)
    app = create_app(llm, None, served=served_models(args, llm))

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://memgen") as client:
            ok = await client.post("/v1/load_memgen_checkpoint", json={"name": "c", "path": str(ckpt_c)})
            over = await client.post("/v1/load_memgen_checkpoint", json={"name": "d", "path": str(ckpt_c)})
            listed = (await client.get("/v1/models")).json()["data"]
            return ok, over, listed

    app.state.engine_loop.start()
    try:
        ok, over, listed = asyncio.run(main())
    finally:
        app.state.engine_loop.stop()
    assert ok.status_code == 200
    assert over.status_code == 400 and "max_memgen_versions=2" in _error(over)["message"]
    assert [m["id"] for m in listed][1:] == ["a", "c"]


def test_sigterm_while_paused_resumes_and_drains(memgen_reasoner_dir, memgen_ckpt_dir, tmp_path):
    """A paused server that gets SIGTERM resumes, so the requests in flight finish (200),
    and exits 0."""
    import signal
    import threading

    from serve_process import memgen_serve

    args = ["--model", str(memgen_reasoner_dir), "--memgen", f"a={memgen_ckpt_dir}", "--dtype", "float64",
            "--device", "cpu", "--log-level", "warning", "--shutdown-timeout", "60"]
    with memgen_serve(args, tmp_path / "server.log") as (base, proc):
        assert httpx.post(f"{base}/v1/pause").json() == {"paused": True}
        got = []
        thread = threading.Thread(target=lambda: got.append(httpx.post(
            f"{base}/v1/completions", json={"model": "a", "prompt": "Hello", "max_tokens": 4, "temperature": 0},
            timeout=120)))
        thread.start()
        deadline = time.monotonic() + WAIT_S
        while 'memgen_requests_waiting 1.0' not in httpx.get(f"{base}/metrics").text:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        thread.join(WAIT_S)
        assert got and got[0].status_code == 200 and got[0].json()["choices"][0]["finish_reason"] == "length"
        assert proc.wait(WAIT_S) == 0
