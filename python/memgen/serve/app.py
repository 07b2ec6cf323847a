"""The FastAPI app: OpenAI's routes over one `LLM` and one engine loop.

GET /v1/models, POST /v1/completions, POST /v1/chat/completions (whole, or
`stream: true` as server-sent events ending with `data: [DONE]`), GET /health
(liveness), GET /ready (readiness: false while draining), GET /metrics. A request's
`model` picks the MemGen checkpoint it runs (checkpoints.ServedModels). Live changes,
run by the engine loop between steps: POST /v1/load_memgen_checkpoint {"name",
"path"}, /v1/update_memgen_checkpoint {"name", "path"}, /v1/unload_memgen_checkpoint
{"name"}, /v1/pause, /v1/resume. With an API key every route but /health and /ready
wants `Authorization: Bearer KEY` (401 otherwise). Every error is OpenAI's body
{"error": {...}}: 400 for bad input, 401 for a missing or wrong key, 404 for an
unknown model or route, 503 + Retry-After when the waiting queue is full; a 500
only for the server's own faults."""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from memgen.serve.checkpoints import ServedModels
from memgen.serve.engine_loop import EngineLoop, RequestHandle
from memgen.serve.errors import APIError, bad_request, internal, shutting_down
from memgen.serve.metrics import ServeMetrics
from memgen.serve.protocol import chat_input, completion_input
from memgen.serve.responses import ResponseBuilder
from memgen.serve.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    LoadCheckpointRequest,
    ModelCard,
    ModelList,
    UnloadCheckpointRequest,
)

log = logging.getLogger(__name__)
MAX_ERRORS_SHOWN = 3
OPEN_PATHS = frozenset({"/health", "/ready"})   # probes: answered without the API key


def create_app(llm, model_name: str | None, max_waiting: int | None = None, memgen: str | None = None,
               start_loop: bool = True, served: ServedModels | None = None, api_key: str | None = None) -> FastAPI:
    """The server for `llm`, answering to `model_name` (a plain model's or a single MemGen
    checkpoint's id; `memgen`: that checkpoint's directory), or to the ids `served` gives
    (several named checkpoints). `max_waiting`: refuse (503) while that many sequences
    wait for admission (None: never). `start_loop=False` leaves the engine loop stopped
    (tests of the queue limit). `api_key`: every route but /health and /ready wants
    `Authorization: Bearer api_key`."""
    if served is None:
        served = single_model(llm, model_name, memgen)
    metrics = ServeMetrics()
    engine_loop = EngineLoop(llm, metrics, max_waiting)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if start_loop:
            engine_loop.start()
        try:
            yield
        finally:
            engine_loop.stop()

    app = FastAPI(title="memgen", summary="OpenAI-compatible server for MemGen models", lifespan=lifespan)
    app.state.engine_loop = engine_loop
    app.state.metrics = metrics
    drain = app.state.drain = Drain()
    app.state.served = served
    app.add_middleware(_DrainMiddleware, drain=drain)
    if api_key:
        app.add_middleware(_AuthMiddleware, api_key=api_key)   # outermost: before anything is counted
    _add_error_handlers(app)

    @app.get("/health")
    async def health():
        if engine_loop.alive or not start_loop:
            return {"status": "ok"}
        return APIError(503, f"the engine loop is not running: {engine_loop.error}", "server_error").response()

    @app.get("/ready")
    async def ready():
        """Readiness, for a router's or a load balancer's health check: 503 as soon as
        the server drains (SIGTERM), or when the engine loop is down."""
        if drain.draining:
            return shutting_down().response()
        return await health()

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/v1/models")
    async def models():
        loaded = engine_loop.checkpoints
        cards = []
        for model_id, name in served.ids(loaded):
            card = ModelCard(id=model_id, root=str(llm.model_dir), max_model_len=llm.max_model_len)
            if name is not None:
                card.memgen, card.memgen_version = served.paths.get(name), loaded[name]
                card.parent = served.base_id if served.list_base else None
            cards.append(card)
        return ModelList(data=cards).model_dump()

    # ---- MemGen checkpoints, live; pause / resume (run by the engine loop between steps) ------------
    def need_memgen():
        if llm.memgen is None:
            raise bad_request("this server runs a plain model: start it with --memgen NAME=DIR to serve MemGen "
                              "checkpoints (and load more live)", code="no_memgen")

    def known(name: str) -> None:
        """404 for a checkpoint name that is not loaded (run on the engine thread)."""
        if name not in llm.memgen_checkpoints():
            raise APIError(404, f"unknown MemGen checkpoint `{name}`; loaded: "
                                f"{', '.join(f'`{n}`' for n in llm.memgen_checkpoints()) or 'none'}",
                           "invalid_request_error", "name", "model_not_found")

    async def change(action: str, fn):
        """Run `fn` on the engine thread; its ValueError / RuntimeError / TypeError -> 400."""
        status = "error"
        try:
            result = await engine_loop.call(fn)
            status = "ok"
            return result
        except (ValueError, RuntimeError, TypeError) as e:
            raise bad_request(f"{action} failed: {e}", param="name", code="invalid_memgen_checkpoint") from None
        finally:
            metrics.checkpoint_changes.labels(action, status).inc()

    @app.post("/v1/load_memgen_checkpoint")
    async def load_memgen_checkpoint(request: Request):
        body = await _parse(request, LoadCheckpointRequest)
        need_memgen()
        served.check_new_name(body.name)
        if body.name in engine_loop.checkpoints:
            raise bad_request(f"MemGen checkpoint `{body.name}` is already loaded: POST "
                              "/v1/update_memgen_checkpoint gives it new weights, or unload it first", "name",
                              "invalid_memgen_checkpoint")
        ckpt = await _read_checkpoint(body.name, body.path, metrics, "load")
        version = await change("load", lambda: llm.load_memgen(body.name, ckpt))
        served.paths[body.name] = body.path
        log.info("loaded MemGen checkpoint %r (version %d) from %s", body.name, version, body.path)
        return {"name": body.name, "version": version, "path": body.path, "status": "loaded"}

    @app.post("/v1/update_memgen_checkpoint")
    async def update_memgen_checkpoint(request: Request):
        body = await _parse(request, LoadCheckpointRequest)
        need_memgen()
        body.name = served.aliases.get(body.name, body.name)    # a single checkpoint's model id works too
        if body.name not in engine_loop.checkpoints:
            await engine_loop.call(lambda: known(body.name))
        ckpt = await _read_checkpoint(body.name, body.path, metrics, "update")

        def update():
            known(body.name)
            return llm.update_memgen(body.name, ckpt)

        version = await change("update", update)
        served.paths[body.name] = body.path
        log.info("updated MemGen checkpoint %r to version %d from %s", body.name, version, body.path)
        return {"name": body.name, "version": version, "path": body.path, "status": "updated"}

    @app.post("/v1/unload_memgen_checkpoint")
    async def unload_memgen_checkpoint(request: Request):
        body = await _parse(request, UnloadCheckpointRequest)
        need_memgen()
        body.name = served.aliases.get(body.name, body.name)

        def unload():
            known(body.name)
            llm.unload_memgen(body.name)

        await change("unload", unload)
        served.paths.pop(body.name, None)
        log.info("unloaded MemGen checkpoint %r", body.name)
        return {"name": body.name, "status": "unloaded"}

    def set_paused(paused: bool):
        engine_loop.paused = paused
        return paused

    @app.post("/v1/pause")
    async def pause():
        """No new engine step starts (arrived requests wait) until /v1/resume; answers once
        the step running now has ended."""
        await engine_loop.call(lambda: set_paused(True))
        return {"paused": True}

    @app.post("/v1/resume")
    async def resume():
        await engine_loop.call(lambda: set_paused(False))
        return {"paused": False}

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _generate(request, CompletionRequest, completion_input, chat=False, endpoint="completions")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _generate(request, ChatCompletionRequest, chat_input, chat=True, endpoint="chat")

    async def _generate(request: Request, schema, to_input, chat: bool, endpoint: str):
        status = 200
        try:
            req = await _parse(request, schema)
            checkpoint = served.resolve(req.model, engine_loop.checkpoints)
            inp = to_input(llm, req, checkpoint)
            builder = ResponseBuilder(llm, req.model, inp, chat)
            handle = engine_loop.submit(inp.prompts, inp.params, inp.stream)
            if inp.stream:
                return _EventStream(handle, _stream(handle, builder))
            outputs = await _wait_or_abort(request, handle)
            if outputs is None:         # the client went away; its request was aborted
                status = 499
                return Response(status_code=499)
            return JSONResponse(builder.final(outputs).model_dump())
        except APIError as e:
            status = e.status
            raise
        except _ClientGone:
            status = 499
            return Response(status_code=499)
        except Exception:
            status = 500
            raise
        finally:
            metrics.requests.labels(endpoint, str(status)).inc()

    return app


def single_model(llm, model_name: str, memgen=None) -> ServedModels:
    """One id: a plain server's base, or its single MemGen checkpoint's (then the base is
    not served, and the checkpoint is the LLM's default one)."""
    if llm.memgen is None:
        return ServedModels(base_id=model_name, memgen=False)
    default = llm.memgen.default_name
    paths = {default: str(memgen)} if isinstance(memgen, (str, bytes)) or hasattr(memgen, "__fspath__") else {}
    return ServedModels(base_id=None, memgen=True, aliases={model_name: default}, paths=paths)


async def _read_checkpoint(name: str, path: str, metrics: ServeMetrics, action: str):
    """A checkpoint directory read and checked off the engine thread (a corrupt or missing
    one: 400 with the reason; the engine never sees it)."""
    from memgen.checkpoint import load_checkpoint

    try:
        return await asyncio.to_thread(load_checkpoint, path)
    except Exception as e:
        metrics.checkpoint_changes.labels(action, "error").inc()
        raise bad_request(f"cannot {action} MemGen checkpoint `{name}` from {path}: {type(e).__name__}: {e}",
                          param="path", code="invalid_memgen_checkpoint") from None


class _AuthMiddleware:
    """`Authorization: Bearer KEY` on every route but the probes (/health, /ready), else 401
    in OpenAI's error shape. Pure ASGI: streams pass through as they are."""

    def __init__(self, app, api_key: str):
        self.app, self.key = app, api_key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path") in OPEN_PATHS:
            return await self.app(scope, receive, send)
        auth = next((v for k, v in scope.get("headers", ()) if k == b"authorization"), b"")
        scheme, _, token = auth.partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
            error = APIError(401, "missing or incorrect API key: send the header `Authorization: Bearer <key>` "
                                  "with the server's --api-key", "invalid_request_error", None, "invalid_api_key",
                             headers={"WWW-Authenticate": "Bearer"})
            return await error.response()(scope, receive, send)
        return await self.app(scope, receive, send)


class Drain:
    """Graceful drain: once `draining`, generation requests get 503 + Retry-After and
    /ready is false; `in_flight` counts the generation requests (streams until their
    last byte) still being answered."""

    def __init__(self):
        self.draining = False
        self.in_flight = 0


class _DrainMiddleware:
    """Counts POST requests in flight (a streamed one until its response ends) and
    refuses new ones with 503 while draining. Pure ASGI: streams pass through as they are."""

    def __init__(self, app, drain: Drain):
        self.app, self.drain = app, drain

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        if self.drain.draining:
            return await shutting_down().response()(scope, receive, send)
        self.drain.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.drain.in_flight -= 1


class _ClientGone(Exception):
    """The client left before its request was read: nothing to answer."""


async def _parse(request: Request, schema):
    try:
        raw = await request.body()
    except ClientDisconnect:
        raise _ClientGone() from None
    try:
        data = json.loads(raw, parse_constant=_no_constants)
    except (ValueError, UnicodeDecodeError) as e:
        raise bad_request(f"the request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise bad_request(f"the request body must be a JSON object, got {type(data).__name__}")
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        raise _validation_error(e.errors()) from None


def _no_constants(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _validation_error(errors) -> APIError:
    """pydantic's errors -> one 400 naming the fields."""
    def loc(err) -> str:
        return ".".join(str(p) for p in err.get("loc", ())) or "body"

    parts = []
    for err in errors:
        if err.get("type") == "extra_forbidden":
            text = f"unknown field '{loc(err)}'"
        elif err.get("type") == "missing":
            text = f"missing field '{loc(err)}'"
        else:
            text = f"'{loc(err)}': {err.get('msg')}"
        if text not in parts:
            parts.append(text)
    shown = "; ".join(parts[:MAX_ERRORS_SHOWN]) + (f" (+{len(parts) - MAX_ERRORS_SHOWN} more)"
                                                   if len(parts) > MAX_ERRORS_SHOWN else "")
    first = errors[0].get("loc", ()) if errors else ()
    return bad_request(f"invalid request: {shown}", param=str(first[0]) if first else None)


async def _wait_or_abort(request: Request, handle: RequestHandle):
    """The final outputs by choice index, or None when the client disconnected first
    (the request is then aborted and its blocks freed)."""
    async def collect():
        outputs = {}
        async for update in handle.updates():
            for choice in update.choices:
                if choice.output is not None:
                    outputs[choice.index] = choice.output
        return outputs

    result = asyncio.ensure_future(collect())
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not result.done():
            result.cancel()
            handle.abort()
    return result.result() if result in done else None


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class _EventStream(StreamingResponse):
    """SSE whose request is aborted however the response ends (a client gone before the
    first chunk included: then the generator never starts, and its own `finally` never runs)."""

    def __init__(self, handle: RequestHandle, chunks):
        super().__init__(chunks, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.handle = handle

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.handle.abort()         # a no-op once the request finished


async def _stream(handle: RequestHandle, builder: ResponseBuilder):
    """SSE chunks until [DONE]; a client that goes away (the task is cancelled) aborts
    the request, which frees its blocks."""
    try:
        for chunk in builder.first_chunks():
            yield chunk
        try:
            async for update in handle.updates():
                for chunk in builder.chunks(update.choices):
                    yield chunk
        except APIError as e:           # mid-stream: OpenAI's error object as an event, then [DONE]
            yield f"data: {json.dumps(e.body())}\n\n"
            yield "data: [DONE]\n\n"
            return
        for chunk in builder.last_chunks():
            yield chunk
    finally:
        handle.abort()                  # a no-op once the request finished


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        return _validation_error(e.errors()).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        kind = "invalid_request_error" if e.status_code < 500 else "server_error"
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        message = f"{request.method} {request.url.path}: {e.detail}"
        return APIError(e.status_code, message, kind, None, code, headers=getattr(e, "headers", None)).response()

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception):
        log.exception("internal error on %s %s", request.method, request.url.path)
        return internal(f"internal error: {type(e).__name__}: {e}").response()
