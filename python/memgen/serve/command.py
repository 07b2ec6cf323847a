"""`memgen serve`: its options and its runner. Light on purpose (the CLI imports
it to build its parser): FastAPI, uvicorn and the engine load only when the
server starts."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from memgen.model_options import add_engine_arguments, add_model_arguments, engine_option_kwargs, llm_kwargs
from memgen.serve.model_ids import checkpoint_model_id, parse_memgen_flags

MEMGEN_HELP = ("a MemGen checkpoint: DIR (one checkpoint; the model id is its directory's name or "
               "--served-model-name) or NAME=DIR, repeatable: several checkpoints on the one base, a request's "
               "`model` picks one by NAME and /v1/models lists the base (--served-model-name) and each "
               "(default: none, a plain LLM)")
API_KEY_ENV = "MEMGEN_API_KEY"

DEFAULT_MAX_WAITING = 1024
DEFAULT_SHUTDOWN_TIMEOUT_S = 30.0


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("An OpenAI-compatible HTTP server (FastAPI + uvicorn): /v1/models, /v1/completions, "
                          "/v1/chat/completions (streaming or not), /health, /metrics. One engine loop batches "
                          "every connection's requests continuously.")
    add_model_arguments(parser, memgen_help=MEMGEN_HELP, memgen_repeatable=True)
    add_engine_arguments(parser)
    parser.add_argument("--max-memgen-versions", type=int, default=None,
                        help="MemGen checkpoint versions live at once: loaded ones, and old versions still "
                             "finishing requests after an update or unload (default: 8)")
    s = parser.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1", help="address to bind")
    s.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    s.add_argument("--served-model-name", default=None,
                   help="the model id clients send and /v1/models lists (default: with one --memgen DIR, the "
                        "checkpoint directory's name, so a MemGen server and a plain server of its base differ; "
                        "with --memgen NAME=DIR, the base's id listed beside the checkpoints' NAMEs; without, "
                        "--model as given, else the packaged model's name)")
    s.add_argument("--api-key", default=os.environ.get(API_KEY_ENV) or None,
                   help=f"every route but /health and /ready then wants the header `Authorization: Bearer KEY` "
                        f"(401 otherwise) (default: ${API_KEY_ENV}, else none: open)")
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
    kwargs = {**llm_kwargs(args), "seed": args.seed, **engine_option_kwargs(args)}
    kwargs["memgen"] = parse_memgen_flags(args.memgen)
    if getattr(args, "max_memgen_versions", None) is not None:
        kwargs["max_memgen_versions"] = args.max_memgen_versions
    return kwargs


def served_model_name(args: argparse.Namespace) -> str:
    """--served-model-name; else the checkpoint's name for a single --memgen DIR server
    (not its base's: a client must tell them apart); else the base model's (a plain
    server's, or the base listed beside named checkpoints)."""
    if args.served_model_name:
        return args.served_model_name
    memgen = parse_memgen_flags(args.memgen)
    if isinstance(memgen, str):
        return checkpoint_model_id(memgen)
    if args.model:
        return args.model
    from memgen.sources import PACKAGED_MODEL

    return PACKAGED_MODEL


def served_models(args: argparse.Namespace, llm):
    """What the server answers to (checkpoints.ServedModels): one id for a plain or a
    single --memgen DIR server; the base and each NAME for --memgen NAME=DIR."""
    from memgen.serve.app import single_model
    from memgen.serve.checkpoints import ServedModels

    memgen = parse_memgen_flags(args.memgen)
    name = served_model_name(args)
    if not isinstance(memgen, dict):
        return single_model(llm, name, memgen)
    return ServedModels(base_id=name, memgen=True, list_base=True, paths=dict(memgen))


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
    kwargs = serve_llm_kwargs(args)        # --memgen items checked before the model loads
    llm = LLM(**kwargs)
    served = served_models(args, llm)
    app = create_app(llm, None, max_waiting=args.max_waiting if args.max_waiting > 0 else None, served=served,
                     api_key=args.api_key)
    ids = [model_id for model_id, _ in served.ids(llm.memgen_checkpoints())]
    logging.getLogger("memgen.serve").info("serving %s on http://%s:%d (OpenAI API under /v1%s)",
                                           ", ".join(map(repr, ids)), args.host, args.port,
                                           "; API key required" if args.api_key else "")
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
            if self.app.state.engine_loop.paused:   # (POST /v1/pause) the requests in flight must finish
                log.info("SIGTERM: resuming the paused engine to drain")
                self.app.state.engine_loop.unpause()
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
