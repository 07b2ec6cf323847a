"""`memgen serve`: its options and its runner. Light on purpose (the CLI imports
it to build its parser): FastAPI, uvicorn and the engine load only when the
server starts."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from memgen.model_options import add_engine_arguments, add_model_arguments, engine_option_kwargs, llm_kwargs

DEFAULT_MAX_WAITING = 1024
DEFAULT_SHUTDOWN_TIMEOUT_S = 30.0


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("An OpenAI-compatible HTTP server (FastAPI + uvicorn): /v1/models, /v1/completions, "
                          "/v1/chat/completions (streaming or not), /health, /metrics. One engine loop batches "
                          "every connection's requests continuously.")
    add_model_arguments(parser)
    add_engine_arguments(parser)
    s = parser.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1", help="address to bind")
    s.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    s.add_argument("--served-model-name", default=None,
                   help="the model id clients send and /v1/models lists (default: with --memgen, the checkpoint "
                        "directory's name, so a MemGen server and a plain server of its base differ; without, "
                        "--model as given, else the packaged model's name)")
    s.add_argument("--max-waiting", type=int, default=DEFAULT_MAX_WAITING,
                   help=f"answer 503 (with Retry-After) while this many sequences wait for admission "
                        f"(default {DEFAULT_MAX_WAITING}; 0 or less: no limit)")
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="the server's and uvicorn's logging level")
    s.add_argument("--shutdown-timeout", type=float, default=DEFAULT_SHUTDOWN_TIMEOUT_S,
                   help=f"graceful drain on SIGTERM: new requests get 503 + Retry-After and /ready turns 503 at "
                        f"once; requests in flight get this many seconds to finish, then end with an error event "
                        f"(and [DONE]); then the process exits 0 (default {DEFAULT_SHUTDOWN_TIMEOUT_S:g}). "
                        f"A second SIGTERM or a SIGINT stops at once")
    r = parser.add_argument_group("replicas (docs/API.md, 'Replicas behind a router')")
    r.add_argument("--replicas", type=int, default=0,
                   help="start this many `memgen serve` processes on 127.0.0.1, ports --port+1 .. --port+N, "
                        "behind vllm-router on --host:--port (pip install 'memgen-engine[router]'); 0: one "
                        "plain server, no router")
    r.add_argument("--router-args", default="", metavar="ARGS",
                   help="extra vllm-router options, one shell-quoted string (e.g. \"--policy round_robin\")")


def serve_llm_kwargs(args: argparse.Namespace) -> dict:
    """The LLM(...) keywords of `memgen serve`'s options."""
    return {**llm_kwargs(args), "seed": args.seed, **engine_option_kwargs(args)}


def checkpoint_model_id(memgen: str | os.PathLike) -> str:
    """A MemGen checkpoint's default model id: its directory's name ('gsm8k-weaver'
    for --memgen runs/gsm8k-weaver/), with the parent's before a bare layout folder
    ('sft-run/export' for a training run's export/ or reference/)."""
    path = Path(memgen).expanduser().resolve()
    if path.name in ("export", "reference") and path.parent.name:
        return f"{path.parent.name}/{path.name}"
    return path.name or str(memgen)


def served_model_name(args: argparse.Namespace) -> str:
    """--served-model-name; else the checkpoint's name for a MemGen server (not
    its base's: a client must tell them apart); else the base model's."""
    if args.served_model_name:
        return args.served_model_name
    if args.memgen:
        return checkpoint_model_id(args.memgen)
    if args.model:
        return args.model
    from memgen.sources import PACKAGED_MODEL

    return PACKAGED_MODEL


def run_serve_from_args(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from memgen.serve.app import create_app
    except ImportError as e:
        print(f"memgen serve: error: {e.name or e} is not installed; install the server's packages with "
              "pip install 'memgen-engine[serve]' (fastapi, uvicorn, prometheus-client)", file=sys.stderr)
        return 2
    if not 1 <= args.port <= 65535:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    if args.shutdown_timeout < 0:
        raise ValueError(f"--shutdown-timeout must be >= 0, got {args.shutdown_timeout}")
    if args.replicas:
        from memgen.serve.replicas import run_replicas

        return run_replicas(args)
    from memgen import LLM

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    llm = LLM(**serve_llm_kwargs(args))
    name = served_model_name(args)
    app = create_app(llm, name, max_waiting=args.max_waiting if args.max_waiting > 0 else None, memgen=args.memgen)
    logging.getLogger("memgen.serve").info("serving %r on http://%s:%d (OpenAI API under /v1)", name, args.host,
                                           args.port)
    run_uvicorn(app, host=args.host, port=args.port, log_level=args.log_level, shutdown_timeout=args.shutdown_timeout)
    return 0


def run_uvicorn(app, host: str, port: int, log_level: str, shutdown_timeout: float) -> None:
    """Serve `app` until SIGTERM has drained it (or SIGINT)."""
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
    _draining_server(uvicorn.Server)(config, app, shutdown_timeout).run()


def _draining_server(base):
    """uvicorn.Server whose first SIGTERM drains (app.Drain) instead of closing the
    listening socket: a router still reaching this replica gets 503s (and retries
    elsewhere), /ready is false, in-flight requests finish within `grace` seconds, the
    engine loop then ends the rest with an error event, and the server exits (0)."""
    import signal
    import threading
    import time

    class DrainingServer(base):
        def __init__(self, config, app, grace: float):
            super().__init__(config)
            self.app, self.grace = app, grace

        def handle_exit(self, sig, frame):
            drain = self.app.state.drain
            if sig != signal.SIGTERM or drain.draining or self.should_exit:
                return super().handle_exit(sig, frame)
            drain.draining = True
            threading.Thread(target=self._drain, name="memgen-drain", daemon=True).start()

        def _drain(self):
            drain, log = self.app.state.drain, logging.getLogger("memgen.serve")
            log.info("SIGTERM: draining %d request(s) in flight (up to %g s)", drain.in_flight, self.grace)
            deadline = time.monotonic() + self.grace
            while drain.in_flight and time.monotonic() < deadline:
                time.sleep(0.05)
            if drain.in_flight:
                log.warning("%d request(s) still running after %g s: ending them", drain.in_flight, self.grace)
                self.app.state.engine_loop.stop()   # each gets a final 503 error (an event and [DONE] if streamed)
                deadline = time.monotonic() + 5
                while drain.in_flight and time.monotonic() < deadline:
                    time.sleep(0.05)
            self.should_exit = True

    return DrainingServer
