"""`memgen serve --replicas N`: N `memgen serve` processes on 127.0.0.1 (ports
--port+1 .. --port+N, one engine each) behind vllm-router on --host:--port.

The router (a Rust binary, `pip install 'memgen-engine[router]'`) speaks the OpenAI
API, routes cache-aware by prompt prefix, probes each replica's /ready every second,
retries a request a replica refused or could not take (connection refused, 503) on
another one, and stops routing to a replica that fails its checks. This launcher only
starts and watches the processes: it prints one line per replica with its pid and URL,
one when the router answers, forwards SIGTERM/SIGINT (replicas drain first, then the
router stops), and goes on while at least one replica lives.
"""
from __future__ import annotations

import argparse
import logging
import shlex
import shutil
import signal
import subprocess
import sys
import time

from memgen.serve.processes import answers, free_port, reap

log = logging.getLogger("memgen.serve.replicas")
ROUTER = "vllm-router"
STARTUP_TIMEOUT_S = 600


def _launcher_options(argv: list[str]) -> list[str]:
    """The replica's own arguments: `memgen serve`'s, less the launcher's (--replicas,
    --router-args, --host, --port)."""
    p = argparse.ArgumentParser(add_help=False)
    for flag in ("--replicas", "--router-args", "--host", "--port"):
        p.add_argument(flag)
    return p.parse_known_args(argv)[1]


def _serve_argv() -> list[str]:
    argv = sys.argv[1:]
    if "serve" not in argv:
        raise ValueError("--replicas: run it as `memgen serve --replicas N ...` (or python -m memgen.cli serve)")
    return argv[argv.index("serve") + 1:]


def router_command(worker_urls: list[str], host: str, port: int, extra: list[str] = ()) -> list[str]:
    """vllm-router in front of `worker_urls`: health checks on /ready every second (a
    draining or dead replica leaves the rotation within ~1-3 s), startup checks every
    second, its Prometheus port on a free port (its default, 29000, may be taken)."""
    exe = shutil.which(ROUTER)
    if exe is None:
        raise OSError(f"{ROUTER} is not installed; pip install 'memgen-engine[router]'")
    return [exe, "--host", host, "--port", str(port), "--worker-urls", *worker_urls,
            "--health-check-endpoint", "/ready", "--health-check-interval-secs", "1",
            "--health-failure-threshold", "2", "--health-success-threshold", "1",
            "--worker-startup-check-interval", "1", "--worker-startup-timeout-secs", str(STARTUP_TIMEOUT_S),
            "--prometheus-port", str(free_port()), *extra]


def run_replicas(args) -> int:
    n = args.replicas
    if n < 1:
        raise ValueError(f"--replicas must be >= 1, got {n}")
    if args.port + n > 65535:
        raise ValueError(f"--port {args.port} leaves no room for {n} replica ports after it")
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    child_args = _launcher_options(_serve_argv())
    extra = shlex.split(args.router_args)
    urls = [f"http://127.0.0.1:{args.port + 1 + i}" for i in range(n)]
    router_cmd = router_command(urls, args.host, args.port, extra)   # fails early when the router is missing
    procs: list[subprocess.Popen] = []
    router: subprocess.Popen | None = None
    stop = []

    def on_signal(sig, frame):
        stop.append(sig)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        for i, url in enumerate(urls):
            cmd = [sys.executable, "-m", "memgen.cli", "serve", *child_args, "--host", "127.0.0.1",
                   "--port", url.rsplit(":", 1)[1]]
            procs.append(subprocess.Popen(cmd, start_new_session=True))   # signals come from here only
            print(f"memgen serve --replicas: replica {i} pid {procs[-1].pid} url {url}", flush=True)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        pending = set(range(n))
        while pending and not stop:
            for i in list(pending):
                if procs[i].poll() is not None:
                    raise RuntimeError(f"replica {i} exited with {procs[i].returncode} while starting")
                if answers(f"{urls[i]}/ready"):
                    pending.discard(i)
            if time.monotonic() > deadline:
                raise RuntimeError(f"replicas {sorted(pending)} not ready in {STARTUP_TIMEOUT_S} s")
            time.sleep(0.2)
        if stop:
            return 0
        router = subprocess.Popen(router_cmd, start_new_session=True)
        print(f"memgen serve --replicas: router pid {router.pid} url http://{args.host}:{args.port}", flush=True)
        while not stop and not answers(f"http://{args.host}:{args.port}/health"):
            if router.poll() is not None:
                raise RuntimeError(f"{ROUTER} exited with {router.returncode} while starting")
            time.sleep(0.2)
        if not stop:
            print(f"memgen serve --replicas: ready, {n} replica(s) behind http://{args.host}:{args.port}/v1",
                  flush=True)
        alive = set(range(n))
        while not stop:
            for i in list(alive):
                if procs[i].poll() is not None:
                    alive.discard(i)
                    log.warning("replica %d (pid %d) exited with %s; %d left behind the router", i, procs[i].pid,
                                procs[i].returncode, len(alive))
            if not alive:
                log.error("every replica has exited")
                return 1
            if router.poll() is not None:
                log.error("%s exited with %s", ROUTER, router.returncode)
                return 1
            time.sleep(0.2)
        return 0
    except RuntimeError as e:
        log.error("%s", e)
        return 1
    finally:
        # replicas drain first (each finishes its requests within --shutdown-timeout), then the router stops
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            reap(p, args.shutdown_timeout + 15)
        if router is not None and router.poll() is None:
            router.terminate()
            reap(router, 10)
        for s, h in old.items():
            signal.signal(s, h)

