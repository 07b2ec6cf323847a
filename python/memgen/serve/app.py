"""The FastAPI app: OpenAI's routes over one `LLM` and one engine loop.

GET /v1/models, POST /v1/completions, POST /v1/chat/completions (whole, or
`stream: true` as server-sent events ending with `data: [DONE]`), GET /health
(liveness), GET /ready (readiness: false while draining), GET /metrics. Every error is OpenAI's body {"error": {...}}: 400 for bad input,
404 for an unknown model or route, 503 + Retry-After when the waiting queue is
full; a 500 only for the server's own faults."""
from __future__ import annotations

import asyncio
import json
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from memgen.serve.engine_loop import EngineLoop, RequestHandle
from memgen.serve.errors import APIError, bad_request, internal, model_not_found, shutting_down
from memgen.serve.metrics import ServeMetrics
from memgen.serve.protocol import chat_input, completion_input
from memgen.serve.responses import ResponseBuilder
from memgen.serve.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
)

log = logging.getLogger(__name__)
MAX_ERRORS_SHOWN = 3


def create_app(llm, model_name: str, max_waiting: int | None = None, memgen: str | None = None,
               start_loop: bool = True) -> FastAPI:
    """The server for `llm`, answering to `model_name`. `max_waiting`: refuse (503)
    while that many sequences wait for admission (None: never). `start_loop=False`
    leaves the engine loop stopped (tests of the queue limit)."""
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
    app.add_middleware(_DrainMiddleware, drain=drain)
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
        return ModelList(data=[ModelCard(id=model_name, root=str(llm.model_dir), max_model_len=llm.max_model_len,
                                         memgen=memgen)]).model_dump()

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
            if req.model != model_name:
                raise model_not_found(req.model, model_name)
            inp = to_input(llm, req)
            builder = ResponseBuilder(llm, model_name, inp, chat)
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
