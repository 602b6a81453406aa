"""Prometheus metrics and the `/metrics`, `/health`, `/ready` endpoints of a worker.

Names follow Prometheus' conventions: a counter is declared without `_total` and scraped with
it (`kvrec_events_in` is scraped as `kvrec_events_in_total`), durations are `_seconds` and
sizes `_bytes`. README.md lists every name as a scrape shows it (a test compares the two).
"""

from __future__ import annotations

import contextlib
import errno
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.exposition import generate_latest

from kvrec.errors import ConfigError

if TYPE_CHECKING:  # numpy is imported by the loop, not before the probes answer
    import numpy as np

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def observe_many(histogram: Histogram, amounts: np.ndarray) -> None:
    """`histogram.observe(a)` for every `a` of `amounts`, in one call per bucket: each amount
    counts in the first bucket whose upper bound is at least it, as `observe` counts it, and
    the sum grows by their total. One lock per changed bucket instead of two per amount: the
    loop's per-event latency histogram cost it a few µs an event."""
    if not len(amounts):
        return
    import numpy as np

    bounds = histogram._upper_bounds  # ends with +Inf
    counts = np.bincount(np.searchsorted(bounds, amounts, side="left"), minlength=len(bounds))
    histogram._sum.inc(float(amounts.sum()))
    for bucket, count in zip(histogram._buckets, counts.tolist(), strict=True):
        if count:
            bucket.inc(count)


class WorkerMetrics:
    def __init__(self) -> None:
        # no `<counter>_created` series (a timestamp gauge per counter and histogram); this is
        # process-wide, and the worker's process has no other metrics
        disable_created_metrics()
        self.registry = CollectorRegistry()
        r = self.registry
        # process_* (CPU, memory, file descriptors), python_gc_*, python_info
        for collector in (PROCESS_COLLECTOR, GC_COLLECTOR, PLATFORM_COLLECTOR):
            r.register(collector)
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
        self.checkpoint_seconds = Histogram(
            "kvrec_checkpoint_seconds",
            "A checkpoint's duration (changelog, flush, offset commit, RocksDB): the loop waits",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.cache_hits = Counter("kvrec_cache_hits", "Key/value cache hits", registry=r)
        self.cache_misses = Counter("kvrec_cache_misses", "Key/value cache misses", registry=r)
        self.cache_bytes = Gauge("kvrec_cache_bytes", "Bytes held by key/value caches", registry=r)
        self.producer_queue_full = Counter(
            "kvrec_producer_queue_full",
            "Waits of 100 ms for deliveries because the producer's queue was full (backpressure)",
            registry=r,
        )
        self.windows_quarantined = Counter(
            "kvrec_windows_quarantined",
            "Stored windows that did not decode: sent to the dead-letter topic, user restarted empty",
            registry=r,
        )
        self.restored_windows = Counter(
            "kvrec_restored_windows", "Windows restored from the changelog", registry=r
        )
        self.checkpoints = Counter("kvrec_checkpoints", "Checkpoints committed", registry=r)
        self.transactions_aborted = Counter(
            "kvrec_transactions_aborted",
            "Transactions the broker aborted (e.g. after a restart): the work was replayed",
            registry=r,
        )
        self.model_info = Gauge(
            "kvrec_model_info",
            'The model version being served (value 1); version "none": cold-start mode, no model',
            ["version"], registry=r,
        )
        self.model_swaps = Counter(
            "kvrec_model_swaps", "Hot swaps to a new serving model version", registry=r
        )
        self.model_refusals = Counter(
            "kvrec_model_refusals",
            "Announced versions refused, by the check that failed (verify, compatibility, build, "
            "smoke, announcement): the serving model stays",
            ["check"], registry=r,
        )
        for check in ("verify", "compatibility", "build", "smoke", "announcement"):
            self.model_refusals.labels(check)  # each series from 0, for rate()
        self.model_prepare_seconds = Histogram(
            "kvrec_model_prepare_seconds",
            "Time to load, check, index and pre-warm an announced version (off the hot path)",
            buckets=(0.5, 1, 2, 5, 10, 30, 60, 120, 300), registry=r,
        )
        self.live_events = Counter(
            "kvrec_live_events",
            "Events that followed a list of this version to their user (role serve: published "
            "lists; shadow: a candidate's, never published)",
            ["version", "role"], registry=r,
        )
        self.live_hits = Counter(
            "kvrec_live_hits",
            "Of kvrec_live_events, those whose item was in the list (prequential hit rate = "
            "hits / events)",
            ["version", "role"], registry=r,
        )
        self.assigned_partitions = Gauge(
            "kvrec_assigned_partitions", "Input partitions owned", registry=r
        )
        self.consumer_lag = Gauge(
            "kvrec_consumer_lag",
            "Messages of an owned input partition not consumed yet: its high watermark minus "
            "the consumer's position (updated every second)",
            ["partition"],
            registry=r,
        )
        self.restore_records = Gauge(
            "kvrec_restore_records",
            "Changelog records (offsets) the partition's latest restore reads, from watermarks",
            ["partition"],
            registry=r,
        )
        self.restore_records_remaining = Gauge(
            "kvrec_restore_records_remaining",
            "Changelog records (offsets) the partition's restore has still to read (0: done)",
            ["partition"],
            registry=r,
        )

    def serving(self, version: str, previous: str | None = None) -> None:
        """The model version served from now on (its live series start at 0)."""
        if previous is not None:
            self.model_info.remove(previous)
        self.model_info.labels(version).set(1)
        self.live_events.labels(version, "serve")
        self.live_hits.labels(version, "serve")

    def forget_partition(self, partition: int) -> None:
        """The partition is no longer owned: drop its labelled series."""
        for gauge in (self.consumer_lag, self.restore_records, self.restore_records_remaining):
            with contextlib.suppress(KeyError):
                gauge.remove(str(partition))


class HealthState:
    """What `/health` and `/ready` report.

    `/health`, liveness: the process is alive and not stuck. It answers 200 `starting` while the
    model loads and the index builds, then 200 `ok` as long as the loop, or a restore inside the
    assignment callback, beat within `stale_after_s`, and 503 `stalled` after that. A wait for
    Kafka that has a limit of its own (a checkpoint within `--outage-limit-s`: the worker exits
    by itself past it) is alive for that limit however long the loop does not beat
    (`waiting_on_kafka`); past the limit the silence counts from the wait's start.

    `/ready`, readiness: the worker is a member of its group and every partition assigned to it
    is restored and consuming. An assignment that leaves the worker owning nothing is not
    enough: a cooperative rebalance's first round hands a joining member nothing while the
    others give up partitions, and its partitions come in a second round (`assignment_empty`);
    the worker is ready owning nothing only once the group is known to have more members than
    the input has partitions (an idle member, `assignment_done`). A restore, a revocation or a
    lost assignment makes the worker not ready until the next assignment completes. A stalled
    worker is not ready either.
    """

    def __init__(self, stale_after_s: float = 60.0) -> None:
        self.stale_after_s = stale_after_s
        self.last_beat = time.monotonic()
        self.starting = True
        self.restoring = False
        self.assigned = False  # the group's assignment (possibly empty) is restored and consuming
        self.kafka_wait: tuple[float, float] | None = None  # (since, until): waiting on Kafka

    def started(self) -> None:
        """The model is loaded and the index built: from here the loop's beats count."""
        self.beat()
        self.starting = False

    def beat(self) -> None:
        self.last_beat = time.monotonic()

    @contextlib.contextmanager
    def waiting_on_kafka(self, limit_s: float) -> Iterator[None]:
        """Within: the worker waits for Kafka, at most `limit_s` (after which the wait gives up
        by itself and the worker exits), so it is alive until then without beating."""
        self.beat()
        outer = self.kafka_wait
        now = time.monotonic()
        self.kafka_wait = (now, now + limit_s)
        try:
            yield
        finally:
            self.kafka_wait = outer
            self.beat()

    def _waiting_for(self, now: float) -> float | None:
        """Seconds spent waiting on Kafka within the wait's limit, None when not so waiting."""
        wait = self.kafka_wait
        if wait is None or now >= wait[1]:
            return None
        return now - wait[0]

    def assignment_started(self) -> None:
        self.beat()
        self.restoring = True
        self.assigned = False

    def assignment_empty(self) -> None:
        """The rebalance left the worker owning nothing: not ready until it is assigned
        partitions, or known to be idle (`assignment_done`)."""
        self.beat()
        self.restoring = False
        self.assigned = False

    def assignment_done(self) -> None:
        self.beat()
        self.restoring = False
        self.assigned = True

    def revoked(self) -> None:
        """Partitions were revoked or lost: not ready until the next assignment completes."""
        self.restoring = False
        self.assigned = False

    def healthy(self) -> bool:
        now = time.monotonic()
        return (self.starting or now - self.last_beat < self.stale_after_s
                or self._waiting_for(now) is not None)

    @property
    def ready(self) -> bool:
        return self.assigned and not self.starting and not self.restoring and self.healthy()

    def health_reply(self) -> tuple[int, str]:
        if self.starting:
            return 200, "starting"
        now = time.monotonic()
        silent = now - self.last_beat
        if silent < self.stale_after_s:
            return 200, "ok"
        waiting = self._waiting_for(now)
        if waiting is not None:
            return 200, f"ok: waiting for Kafka for {waiting:.0f} s, within the outage limit"
        return 503, f"stalled: no progress for {silent:.0f} s"

    def ready_reply(self) -> tuple[int, str]:
        if self.ready:
            return 200, "ready"
        if self.starting:
            reason = "starting"
        elif not self.healthy():
            reason = "stalled"
        elif self.restoring:
            reason = "restoring"
        else:
            reason = "waiting for a partition assignment"
        return 503, f"not ready: {reason}"


class _Server(ThreadingHTTPServer):
    daemon_threads = True


class _Server6(_Server):
    address_family = socket.AF_INET6


def serve(
    metrics: WorkerMetrics, health: HealthState, port: int, host: str = "0.0.0.0"
) -> ThreadingHTTPServer:
    """Serve the endpoints on `host`:`port` (port 0 = any free port; an IPv6 host such as `::`
    listens on IPv6) in a daemon thread. An address it cannot listen on raises OSError."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.startswith("/metrics"):
                self._reply(200, generate_latest(metrics.registry), CONTENT_TYPE_LATEST)
            elif self.path.startswith("/health"):
                status, text = health.health_reply()
                self._reply(status, f"{text}\n".encode())
            elif self.path.startswith("/ready"):
                status, text = health.ready_reply()
                self._reply(status, f"{text}\n".encode())
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
        server = (_Server6 if ":" in host else _Server)((host, port), Handler)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(f"--metrics-port {port}: port {port} in use") from None
        raise ConfigError(
            f"--metrics-host {host} --metrics-port {port}: cannot listen there "
            f"({exc.strerror or exc})"
        ) from None
    threading.Thread(target=server.serve_forever, name="kvrec-metrics", daemon=True).start()
    return server
