"""The server's Prometheus metrics (GET /metrics), in a registry of their own.

The engine loop sets the gauges after every step (and when it goes idle), so a
scrape never reads the engine from another thread."""
from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                   120.0, 300.0)
TOKEN_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)


class ServeMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.running = Gauge("memgen_requests_running", "sequences being generated", registry=r)
        self.waiting = Gauge("memgen_requests_waiting", "sequences queued for admission", registry=r)
        self.kv_blocks_used = Gauge("memgen_kv_blocks_used", "KV blocks held by sequences, per pool", ["pool"],
                                    registry=r)
        self.kv_blocks_total = Gauge("memgen_kv_blocks_total", "KV blocks in the pool", ["pool"], registry=r)
        self.kv_usage = Gauge("memgen_kv_cache_usage", "fraction of all KV blocks held by sequences", registry=r)
        self.requests = Counter("memgen_requests", "HTTP generation requests by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.finished = Counter("memgen_sequences_finished", "sequences (choices) ended, by finish reason",
                                ["finish_reason"], registry=r)
        self.prompt_tokens = Counter("memgen_prompt_tokens", "prompt tokens of admitted sequences", registry=r)
        self.generation_tokens = Counter("memgen_generation_tokens", "tokens generated", registry=r)
        self.insertions = Counter("memgen_insertions", "MemGen latent insertions (prompt and inference)",
                                  registry=r)
        self.latent_positions = Counter("memgen_latent_positions", "latent positions inserted", registry=r)
        self.trigger_calls = Counter("memgen_trigger_calls", "MemGen trigger decisions", registry=r)
        self.preemptions = Counter("memgen_preemptions", "sequences preempted for KV room (recomputed later)",
                                   registry=r)
        self.ttft = Histogram("memgen_time_to_first_token_seconds", "arrival to first token", registry=r,
                              buckets=LATENCY_BUCKETS)
        self.tpot = Histogram("memgen_time_per_output_token_seconds", "mean time between a sequence's tokens",
                              registry=r, buckets=TOKEN_LATENCY_BUCKETS)
        self.e2e = Histogram("memgen_request_latency_seconds", "arrival to the end of a sequence", registry=r,
                             buckets=LATENCY_BUCKETS)
        # per MemGen checkpoint (label `checkpoint`: its name, as a request's `model` picks it)
        ck = ["checkpoint"]
        self.checkpoint_version = Gauge("memgen_checkpoint_version", "the loaded version of each MemGen checkpoint "
                                        "(0 when loaded, +1 per update)", ck, registry=r)
        self.checkpoint_running = Gauge("memgen_checkpoint_requests_running", "sequences admitted and unfinished, "
                                        "by checkpoint", ck, registry=r)
        self.checkpoint_finished = Counter("memgen_checkpoint_sequences_finished", "sequences ended, by checkpoint "
                                           "and finish reason", ck + ["finish_reason"], registry=r)
        self.checkpoint_prompt_tokens = Counter("memgen_checkpoint_prompt_tokens", "prompt tokens of admitted "
                                                "sequences, by checkpoint", ck, registry=r)
        self.checkpoint_generation_tokens = Counter("memgen_checkpoint_generation_tokens", "tokens generated, by "
                                                    "checkpoint", ck, registry=r)
        self.checkpoint_insertions = Counter("memgen_checkpoint_insertions", "MemGen latent insertions, by "
                                             "checkpoint", ck, registry=r)
        self.checkpoint_trigger_calls = Counter("memgen_checkpoint_trigger_calls", "MemGen trigger decisions, by "
                                                "checkpoint", ck, registry=r)
        self.checkpoint_latency = Histogram("memgen_checkpoint_request_latency_seconds", "arrival to the end of a "
                                            "sequence, by checkpoint", ck, registry=r, buckets=LATENCY_BUCKETS)
        self.checkpoint_changes = Counter("memgen_checkpoint_changes", "live checkpoint changes (load, update, "
                                          "unload) by outcome", ["action", "status"], registry=r)
        self.paused = Gauge("memgen_paused", "1 while generation is paused (POST /v1/pause)", registry=r)
        self._checkpoints: set[str] = set()

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def set_engine_state(self, running: int, waiting: int, blocks: dict[str, tuple[int, int]]) -> None:
        """blocks: pool -> (used, total)."""
        self.running.set(running)
        self.waiting.set(waiting)
        for pool, (used, total) in blocks.items():
            self.kv_blocks_used.labels(pool).set(used)
            self.kv_blocks_total.labels(pool).set(total)
        total = sum(t for _, t in blocks.values())
        self.kv_usage.set(sum(u for u, _ in blocks.values()) / total if total else 0.0)

    def set_checkpoints(self, versions: dict[str, int]) -> None:
        """The loaded checkpoints' versions (an unloaded one's series go away)."""
        for name in self._checkpoints - set(versions):
            self.checkpoint_version.remove(name)
        for name, version in versions.items():
            self.checkpoint_version.labels(name).set(version)
        self._checkpoints = set(versions)

    def checkpoint_tokens(self, checkpoint_of: dict[int, str], outputs) -> None:
        """One step's generated tokens by checkpoint; the running gauge from `checkpoint_of`
        (the unfinished requests' checkpoints)."""
        counts: dict[str, int] = {}
        for o in outputs:
            name = checkpoint_of.get(o.request_id)
            if name is not None and o.new_token_ids:
                counts[name] = counts.get(name, 0) + len(o.new_token_ids)
        for name, n in counts.items():
            self.checkpoint_generation_tokens.labels(name).inc(n)

    def set_checkpoint_running(self, checkpoint_of: dict[int, str]) -> None:
        running: dict[str, int] = dict.fromkeys(self._checkpoints | set(checkpoint_of.values()), 0)
        for name in checkpoint_of.values():
            running[name] += 1
        for name, n in running.items():
            self.checkpoint_running.labels(name).set(n)

    def record_request(self, metrics: dict, num_tokens: int, finish_reason: str) -> None:
        """A request (one choice) that ended, finished or aborted: its final metrics
        (`EngineOutput.metrics`) and how many tokens it generated."""
        self.finished.labels(finish_reason).inc()
        self.insertions.inc(metrics["num_insertions"])
        self.latent_positions.inc(metrics["num_latent_positions"])
        self.trigger_calls.inc(metrics["num_trigger_calls"])
        checkpoint = metrics.get("memgen_checkpoint")
        total, ttft = metrics["total_s"], metrics["time_to_first_token_s"]
        if checkpoint is not None:
            self.checkpoint_finished.labels(checkpoint, finish_reason).inc()
            self.checkpoint_insertions.labels(checkpoint).inc(metrics["num_insertions"])
            self.checkpoint_trigger_calls.labels(checkpoint).inc(metrics["num_trigger_calls"])
            if total is not None:
                self.checkpoint_latency.labels(checkpoint).observe(total)
        if total is None:
            return
        self.e2e.observe(total)
        if ttft is not None:
            self.ttft.observe(ttft)
            if num_tokens > 1:
                self.tpot.observe((total - ttft) / (num_tokens - 1))
