"""Prometheus metrics and the `/metrics`, `/health`, `/ready` endpoints of a worker."""

from __future__ import annotations

import errno
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest

from model.errors import ConfigError

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class WorkerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.events_in = Counter("kvrec_events_in", "Input messages consumed", registry=r)
        self.events_applied = Counter(
            "kvrec_events_applied", "Valid events applied to a window", registry=r
        )
        self.events_duplicate = Counter(
            "kvrec_events_duplicate",
            "Events already applied to their window (replayed after a restart)",
            registry=r,
        )
        self.events_out_of_order = Counter(
            "kvrec_events_out_of_order",
            "Events older than the user's newest event (applied in log order)",
            registry=r,
        )
        self.unknown_items = Counter(
            "kvrec_unknown_items", "Events whose item the model does not know yet", registry=r
        )
        self.recommendations_out = Counter(
            "kvrec_recommendations_out", "Recommendations produced", ["kind"], registry=r
        )
        self.dead_letters = Counter(
            "kvrec_dead_letters", "Events sent to the dead-letter topic", ["reason"], registry=r
        )
        self.batch_size = Histogram(
            "kvrec_batch_size",
            "Events per micro-batch",
            buckets=(1, 8, 32, 64, 128, 256, 512, 1024, 2048, 4096),
            registry=r,
        )
        self.step_seconds = Histogram(
            "kvrec_step_seconds", "Inference time per wave (step + retrieval)",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.event_to_emit_seconds = Histogram(
            "kvrec_event_to_emit_seconds",
            "From the event's Kafka timestamp to producing its recommendation",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.cache_hits = Counter("kvrec_cache_hits", "Key/value cache hits", registry=r)
        self.cache_misses = Counter("kvrec_cache_misses", "Key/value cache misses", registry=r)
        self.cache_bytes = Gauge("kvrec_cache_bytes", "Bytes held by key/value caches", registry=r)
        self.windows_quarantined = Counter(
            "kvrec_windows_quarantined",
            "Stored windows that did not decode: sent to the dead-letter topic, user restarted empty",
            registry=r,
        )
        self.restored_windows = Counter(
            "kvrec_restored_windows", "Windows restored from the changelog", registry=r
        )
        self.checkpoints = Counter("kvrec_checkpoints", "Checkpoints committed", registry=r)
        self.model_info = Gauge(
            "kvrec_model_info", "The model version being served (value 1)", ["version"], registry=r
        )
        self.assigned_partitions = Gauge(
            "kvrec_assigned_partitions", "Input partitions owned", registry=r
        )


class HealthState:
    """What `/health` and `/ready` report: the loop is alive; partitions are restored."""

    def __init__(self, stale_after_s: float = 60.0) -> None:
        self.last_loop = time.monotonic()
        self.ready = False
        self.stale_after_s = stale_after_s

    def beat(self) -> None:
        self.last_loop = time.monotonic()

    def healthy(self) -> bool:
        return time.monotonic() - self.last_loop < self.stale_after_s


def serve(metrics: WorkerMetrics, health: HealthState, port: int) -> ThreadingHTTPServer:
    """Serve the endpoints on `port` (0 = any free port) in a daemon thread."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.startswith("/metrics"):
                self._reply(200, generate_latest(metrics.registry), CONTENT_TYPE_LATEST)
            elif self.path.startswith("/health"):
                ok = health.healthy()
                self._reply(200 if ok else 503, b"ok\n" if ok else b"stalled\n")
            elif self.path.startswith("/ready"):
                ok = health.ready and health.healthy()
                self._reply(200 if ok else 503, b"ready\n" if ok else b"not ready\n")
            else:
                self._reply(404, b"not found\n")

        def _reply(self, status: int, body: bytes, content_type: str = "text/plain") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            return

    try:
        server = ThreadingHTTPServer(("0.0.0.0", port), Handler)
    except OSError as exc:
        reason = f"port {port} in use" if exc.errno == errno.EADDRINUSE else exc.strerror
        raise ConfigError(f"--metrics-port {port}: {reason}") from None
    threading.Thread(target=server.serve_forever, name="kvrec-metrics", daemon=True).start()
    return server
