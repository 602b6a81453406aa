"""`kvrec bench e2e`: end-to-end throughput and latency through a real broker, kvrec against
the same event stream with no cache and against two Kafka relays that do no work at all.

For each system, on fresh topics of one broker:
1. **peak**: N events are produced first (a backlog), then the system starts as a subprocess;
   throughput = N / seconds from the first to the last output, by the broker's append times
   (output topics use LogAppendTime; + 1 ms for their resolution), once all N outputs arrived
   (startup time, model load and index build, is left out);
2. **latency**: events are then produced at a fixed offered rate (`--rate-fraction` of that
   system's peak, at most `--max-rate`) for `--seconds`; each output is matched to its input
   event by (user id, event ts), and its latency is the output's broker append time minus the
   Kafka timestamp of the input message (CreateTime, set by the producer; read back from the
   input topic afterwards, so every system is measured the same way; it is also the worker's
   `source_ts`): the bench's reader cannot delay it; its own share (read time minus append
   time) is reported beside it, as `kvrec demo` does (`stream/latency.py`). The fixed-rate
   producer is connected before the phase starts (linger 2 ms);
   every producer here sends uncompressed (aiokafka, under Faust, has no lz4 codec installed).

Systems: `kvrec` (the worker, `--retrieval auto`), `kvrec-eos` (the same under
`--processing-guarantee exactly-once`, once per `--eos-commit-intervals` value, as
`kvrec-eos-<N>ms`), `kvrec-no-cache` (the worker with `--no-kv-cache`: every event re-encodes
the user's stored window, what a system without the key/value cache pays),
`confluent-passthrough` (`bench/passthrough.py`, a confluent-kafka consume-produce loop) and
`faust-passthrough` (`bench/faust_passthrough.py`, a Faust agent). Every kvrec system is
measured once per `--d-models` value, on a model of that width (`-d<D>` after its name for a
D other than 64; 128 is what `kvrec train` makes by default).

Under exactly-once an output is appended before its transaction commits, and a downstream
(`read_committed`) reader sees it only after: for `kvrec-eos` the bench reads with
`isolation.level=read_committed` and the latency is the *visible* latency, the bench's read
time minus the input's timestamp (`stream/latency.py`), with the append's beside it.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from confluent_kafka import OFFSET_BEGINNING, Consumer, Message, Producer, TopicPartition

from kvrec import flags
from kvrec.bench.machine import machine_info, machine_line
from kvrec.errors import ConfigError
from kvrec.model.datasets import BASE_TS_MS, Interaction, SyntheticSpec, generate_synthetic
from kvrec.model.owned import work_dir
from kvrec.stream.kafka_config import ensure_topics
from kvrec.stream.latency import (
    LOG_APPEND_TIME,
    READ_COMMITTED,
    Latencies,
    output_stamp,
    read_available,
)
from kvrec.stream.replay import BURST_SECONDS, TokenBucket, replay_events
from kvrec.stream.schema import Event, encode_event

SYSTEMS = ("kvrec", "kvrec-eos", "kvrec-no-cache", "confluent-passthrough", "faust-passthrough")
DEFAULT_SYSTEMS = ("kvrec", "kvrec-no-cache", "confluent-passthrough", "faust-passthrough")
BENCH_D_MODEL = 64  # the bench's model width unless --d-models says otherwise
BENCH_LAYERS, BENCH_HEADS = 2, 2  # as kvrec train's defaults (model/config.py)
EOS_COMMIT_INTERVALS = (100, 250, 500, 1000)  # kvrec-eos: --commit-interval-ms values, ms
EVENT_TYPES = ["view", "click", "add_to_cart", "purchase"]
REPO = Path(__file__).resolve().parent.parent


def build_artifact(out_dir: Path, *, n_items: int, window: int, d_model: int = BENCH_D_MODEL,
                   layers: int = BENCH_LAYERS, seed: int = 0) -> Path:
    """A model artifact with random weights (no training): item ids "i1".."iN", the ids
    `generate_synthetic` uses for a catalog of N items. The item embeddings are a clustered
    catalog (`bench.retrieval.clustered_catalog`), like trained ones: with i.i.d. Gaussian
    embeddings no approximate index can skip anything (at 100k items IVF-PQ needed every list
    probed for recall@10 0.96, 200 us a query), which no trained catalog looks like."""
    import torch

    from kvrec.bench.retrieval import clustered_catalog
    from kvrec.model.artifact import save_artifact
    from kvrec.model.config import ModelConfig
    from kvrec.model.encoder import Encoder

    torch.manual_seed(seed)
    config = ModelConfig(
        n_items=n_items, n_event_types=len(EVENT_TYPES), d_model=d_model, n_layers=layers,
        n_heads=BENCH_HEADS, window=window, dropout=0.0,
    )
    encoder = Encoder(config).eval()
    catalog = torch.from_numpy(clustered_catalog(n_items, d_model, seed=seed))
    with torch.no_grad():  # the scale of the trained init (std 0.02), the shape of a catalog
        encoder.item_embedding.weight.copy_(catalog * (0.02 / float(catalog[1:].std())))
    popularity = np.zeros(n_items + 1, dtype=np.int64)
    popularity[1:] = np.arange(n_items, 0, -1)
    save_artifact(
        out_dir, encoder, item_ids=["", *[f"i{i}" for i in range(1, n_items + 1)]],
        event_types=EVENT_TYPES, popularity=popularity,
        metrics={"note": "random weights for kvrec bench e2e"},
    )
    return out_dir


def warmup_history(users: int, items: int, per_user: int, seed: int = 7) -> list[Interaction]:
    """`per_user` events for each of `users` users (ids "u0".., as `generate_synthetic`
    names them), users interleaved, Zipf-popular items, all before the synthetic stream's
    times: what fills every stored window before the timed phases."""
    rng = np.random.default_rng(seed)
    popularity = np.arange(1, items + 1, dtype=np.float64) ** -1.1
    drawn = rng.choice(items, size=(per_user, users), p=popularity / popularity.sum()) + 1
    return [
        Interaction(f"u{user}", f"i{drawn[round_, user]}", "view",
                    BASE_TS_MS - (per_user - round_) * 60_000)
        for round_ in range(per_user)
        for user in range(users)
    ]


class Run:
    """One system's topics, its subprocess and what the bench read from it."""

    def __init__(self, name: str, bootstrap: str, partitions: int, log_path: Path) -> None:
        tag = f"e2e-{name}-{uuid.uuid4().hex[:8]}"
        self.name, self.bootstrap, self.partitions = name, bootstrap, partitions
        self.events, self.outputs, self.group = f"{tag}-events", f"{tag}-out", f"{tag}-group"
        self.dead_letters = f"{tag}-dlq"
        ensure_topics(
            {"bootstrap.servers": bootstrap},
            {
                self.events: (partitions, {}),
                # the broker stamps each output when it appends it: the system's emit times
                self.outputs: (partitions, LOG_APPEND_TIME),
                self.dead_letters: (1, {}),
                f"{self.group}-windows-changelog": (partitions, {"cleanup.policy": "compact"}),
            },
        )
        self.process: subprocess.Popen | None = None
        self.log_path = log_path
        self.metrics_port = 0  # a kvrec worker's probes, on a free port at each start

    def command(self, model: Path, state_dir: Path, worker_args: Sequence[str],
                system: str | None = None) -> tuple[list[str], dict]:
        env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
        system = system or self.name
        if system.startswith("kvrec"):
            command = [
                sys.executable, "-m", "kvrec.stream.cli", "worker", "--bootstrap-servers", self.bootstrap,
                "--input-topic", self.events, "--output-topic", self.outputs,
                "--dead-letter-topic", self.dead_letters, "--group-id", self.group,
                "--instance-id", self.group, "--model", str(model),
                "--state-dir", str(state_dir / self.name), "--retrieval", "auto",
                "--metrics-port", str(self.metrics_port), "--metrics-host", "127.0.0.1",
                "--log-level", "WARNING", *worker_args,
            ]
            if system.startswith("kvrec-no-cache"):
                command += ["--no-kv-cache"]
            return command, env
        if system == "confluent-passthrough":
            return [sys.executable, "-m", "kvrec.bench.passthrough", self.bootstrap, self.events,
                    self.outputs, self.group], env
        env.update(
            KVREC_BENCH_APP_ID=self.group, KVREC_BENCH_BOOTSTRAP=self.bootstrap,
            KVREC_BENCH_IN=self.events, KVREC_BENCH_OUT=self.outputs,
            KVREC_BENCH_PARTITIONS=str(self.partitions),
        )
        return [sys.executable, "-m", "kvrec.bench.faust_passthrough"], env

    def start(self, model: Path, state_dir: Path, worker_args: Sequence[str],
              system: str | None = None) -> None:
        from kvrec.deploy.kafka.launcher import free_port

        self.metrics_port = free_port()
        command, env = self.command(model, state_dir, worker_args, system)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                command, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def worker_series(self, processes: int) -> dict[str, dict[str, float]]:
        """The worker's own timing histograms from its /metrics (each child's, added up, with
        `--processes`): how long its checkpoints and its waves' inference took so far; {} for
        a system that serves none."""
        import urllib.request

        ports = [self.metrics_port] if processes == 1 else [
            self.metrics_port + 1 + i for i in range(processes)
        ]
        totals: dict[str, dict[str, float]] = {}
        for port in ports:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as got:
                    text = got.read().decode()
            except OSError:
                return {}
            for line in text.splitlines():
                for name in ("kvrec_checkpoint_seconds", "kvrec_step_seconds"):
                    if not line.startswith(name):
                        continue
                    key, _, value = line.rpartition(" ")
                    series = totals.setdefault(name, {})
                    series[key[len(name):]] = series.get(key[len(name):], 0.0) + float(value)
        return totals

    def wait_ready(self, timeout: float) -> None:
        """Until the worker's /ready answers 200: every process in the group with its
        partitions assigned and restored (`kvrec worker --processes N`: all N)."""
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                url = f"http://127.0.0.1:{self.metrics_port}/ready"
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        return
            self.check_alive()
            time.sleep(0.3)
        raise RuntimeError(f"{self.name}: not ready within {timeout:.0f}s")

    def check_alive(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            tail = self.log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{tail}")

    def stop(self) -> None:
        stop_process(self.process)


def _timings_between(before: dict[str, dict[str, float]],
                     after: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Each histogram's summary over what was observed between two scrapes."""
    return {
        name: _histogram_summary({key: value - before.get(name, {}).get(key, 0.0)
                                  for key, value in series.items()})
        for name, series in after.items()
    }


def _histogram_summary(series: dict[str, float]) -> dict[str, Any]:
    """count, mean and the bucket bound under which 99% fall, from Prometheus text series
    (`_count`, `_sum`, `_bucket{le="..."}`)."""
    count = series.get("_count", 0.0)
    buckets = sorted(
        (float(key.split('le="')[1].rstrip('"}')), value)
        for key, value in series.items() if key.startswith("_bucket")
    )
    p99 = next((bound for bound, below in buckets if count and below >= 0.99 * count), None)
    return {"count": int(count), "mean_ms": 1000 * series.get("_sum", 0.0) / count if count else None,
            "p99_at_most_ms": None if p99 is None else 1000 * p99}


def stop_process(process: subprocess.Popen | None, timeout: float = 20.0) -> None:
    """SIGTERM to the process group of a subprocess started with `start_new_session=True`
    (a worker checkpoints and exits), SIGKILL after `timeout` seconds."""
    if process is None or process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def _replay(producer_config: dict, run: Run, events: Sequence[Interaction]) -> None:
    stats = replay_events(producer_config, run.events, events, 0.0, progress=False)
    if stats.failed:
        raise RuntimeError(f"{run.name}: {stats.failed} events not delivered")


def reader(bootstrap: str, topic: str, partitions: int, committed: bool = False) -> Consumer:
    """A consumer of every partition of `topic` from the beginning; `committed`: with
    `isolation.level=read_committed`, as a downstream reader of an exactly-once worker."""
    consumer = Consumer({
        "bootstrap.servers": bootstrap, "group.id": f"e2e-reader-{uuid.uuid4().hex[:8]}",
        "enable.auto.commit": False, "fetch.wait.max.ms": 5, **(READ_COMMITTED if committed else {}),
    })
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(partitions)])
    return consumer


_USER_PREFIX = b'{"user_id":"'
_EVENT_TS = b'"event_ts":'


def _event_key(system: str, value: bytes) -> tuple[str, int]:
    """(user id, event ts) of an output: a recommendation, or a relayed event. A kvrec
    recommendation is read without decoding all of it (the reader shares the machine with the
    system under test): it starts with the user id, and `event_ts` is an integer field."""
    if system.startswith("kvrec") and value.startswith(_USER_PREFIX):
        end = value.find(b'"', len(_USER_PREFIX))
        at = value.find(_EVENT_TS, end)
        if end > 0 and at > 0 and b"\\" not in value[: end]:
            stop = value.find(b",", at)
            return value[len(_USER_PREFIX) : end].decode(), int(value[at + len(_EVENT_TS) : stop])
    data = json.loads(value)
    if system.startswith("kvrec"):
        return data["user_id"], int(data["event_ts"])
    return data["user_id"], int(data["ts"])


def _drain(consumer: Consumer, expected: int, timeout: float, run: Run,
           on_message: Callable[[Message, float], None] | None = None) -> list[float]:
    """Read until `expected` outputs arrived; return each one's broker append time (s, epoch).
    `on_message(message, read time in s)` for each."""
    times: list[float] = []
    deadline = time.monotonic() + timeout
    while len(times) < expected:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{run.name}: {len(times)} of {expected} outputs in {timeout:.0f}s")
        messages = read_available(consumer, 0.05)
        now = time.time()
        for message in messages:
            if message.error() is None:
                times.append(message.timestamp()[1] / 1000.0)
                if on_message is not None:
                    on_message(message, now)
        if not messages:
            run.check_alive()
    return times


def produce_paced(producer: Producer, topic: str, events: Iterable[Interaction], rate: float) -> None:
    """Produce `events` at `rate` per second (replay's token bucket) with a connected producer."""
    produce_records(producer, topic, encoded(events), rate)


def encoded(events: Iterable[Interaction]) -> Iterator[tuple[bytes, bytes]]:
    """Each event as its (key, value) on the wire."""
    for event in events:
        yield event.user_id.encode(), encode_event(
            Event(event.user_id, event.item_id, event.event_type, event.ts))


def produce_records(producer: Producer, topic: str, records: Iterable[tuple[bytes, bytes]],
                    rate: float) -> None:
    """Produce (key, value) records at `rate` per second; a phase's records are encoded before
    it starts, so the paced thread does no JSON while the system under test runs."""
    bucket = TokenBucket(rate, rate * BURST_SECONDS)
    for n, (key, value) in enumerate(records):
        bucket.take()
        producer.produce(topic, key=key, value=value)
        if n % 100 == 0:
            producer.poll(0)
    producer.flush(60)


def _input_timestamps(bootstrap: str, topic: str, partitions: int, expected: int) -> dict:
    consumer = reader(bootstrap, topic, partitions)
    stamps: dict[tuple[str, int], int] = {}
    deadline = time.monotonic() + 60
    while len(stamps) < expected and time.monotonic() < deadline:
        for message in consumer.consume(5000, timeout=0.2):
            if message.error() is None:
                data = json.loads(message.value())
                stamps[(data["user_id"], int(data["ts"]))] = message.timestamp()[1]
    consumer.close()
    return stamps


def measure(
    run: Run, peak_events: Sequence[Interaction], rate_events: Sequence[Interaction], *,
    model: Path, state_dir: Path, worker_args: Sequence[str], seconds: float,
    rate_fractions: Sequence[float], max_rate: float, timeout: float,
    warmup: Sequence[Interaction] = (), warmup_args: Sequence[str] | None = None,
    visible: bool = False,
) -> dict[str, Any]:
    """Peak throughput on a backlog, then one fixed-rate phase per fraction of that peak
    (none when `rate_fractions` is empty). Each phase uses the next events of `rate_events`.

    For the kvrec systems, `warmup` events first go through a kvrec worker of the same group
    and state directory (with `warmup_args`, default `worker_args`), which then stops
    (checkpointing): the system under test starts with every stored window full, as a worker
    does in steady state, and a cold key/value cache.

    `visible` (an exactly-once system): the outputs are read `read_committed` and a latency is
    the read time minus the input's timestamp (`stream.latency`, `Latencies(visible=True)`)."""
    # uncompressed for every system: aiokafka (Faust) has no lz4 codec installed here
    producer_config = {"bootstrap.servers": run.bootstrap, "compression.type": "none"}
    consumer = reader(run.bootstrap, run.outputs, run.partitions, committed=visible)
    warmup = warmup if run.name.startswith("kvrec") else ()
    if warmup:
        _replay(producer_config, run, warmup)
        run.start(model, state_dir, worker_args if warmup_args is None else warmup_args,
                  system="kvrec")
        try:
            _drain(consumer, len(warmup), timeout, run)
        finally:
            run.stop()
    # connected before the rate phases, so no event waits for a connection
    paced = Producer({**producer_config, "linger.ms": 2})
    paced.list_topics(run.events, timeout=10)
    if run.name.startswith("kvrec"):
        # a worker starts, then the backlog arrives (at the producer's speed, far above the
        # worker's): with several processes, all of them have their partitions first, so the
        # peak is not one process draining alone until the other joins
        run.start(model, state_dir, worker_args)
        run.wait_ready(timeout)
        _replay(producer_config, run, peak_events)
    else:
        _replay(producer_config, run, peak_events)
        run.start(model, state_dir, worker_args)
    phases: list[dict[str, Any]] = []
    try:
        times = sorted(_drain(consumer, len(peak_events), timeout, run))
        peak_load = os.getloadavg()[0]  # the machine is shared: how busy it was
        # + 1 ms: append times have millisecond resolution (and one per producer batch)
        span = times[-1] - times[0] + 0.001
        peak = len(times) / span
        is_kvrec = run.name.startswith("kvrec")
        processes = (int(worker_args[list(worker_args).index("--processes") + 1])
                     if "--processes" in worker_args else 1)
        series = run.worker_series(processes) if is_kvrec else {}
        used = 0
        for fraction in rate_fractions:
            offered = min(max_rate, peak * fraction)
            count = min(len(rate_events) - used, max(1, int(offered * seconds)))
            phase = rate_events[used : used + count]
            used += count
            read_ms: dict[tuple[str, int], tuple[float, float]] = {}  # (append, read) time

            def on_message(message: Message, now: float, read_ms: dict = read_ms) -> None:
                now_ms = now * 1000.0
                read_ms[_event_key(run.name, message.value() or b"")] = (
                    output_stamp(message, now_ms)[0], now_ms)

            producer = threading.Thread(
                target=produce_records, args=(paced, run.events, list(encoded(phase)), offered),
                daemon=True,
            )
            producer.start()
            _drain(consumer, count, timeout + seconds, run, on_message)
            producer.join()
            scraped = run.worker_series(processes) if is_kvrec else {}
            phases.append({"fraction": fraction, "offered_rate": offered, "count": count,
                           "read_ms": read_ms, "load_average_1m": os.getloadavg()[0],
                           "worker_timings": _timings_between(series, scraped)})
            series = scraped
    finally:
        consumer.close()
        run.stop()
    result: dict[str, Any] = {
        "events": len(times), "peak_seconds": span, "peak_events_per_s": peak, "phases": [],
        "warmup_events": len(warmup), "load_average_1m": peak_load,
    }
    line = f"{run.name:22s} peak {peak:9,.0f} ev/s"
    if phases:
        total = len(warmup) + len(peak_events) + sum(p["count"] for p in phases)
        stamps = _input_timestamps(run.bootstrap, run.events, run.partitions, total)
        for phase in phases:
            read_ms = phase.pop("read_ms")
            measured = Latencies(visible=visible)
            for key, (appended_ms, at_ms) in read_ms.items():
                if key in stamps:
                    measured.add_stamped(stamps[key], appended_ms, at_ms)
            if len(measured) < phase["count"]:
                raise RuntimeError(
                    f"{run.name}: matched {len(measured)} of {phase['count']} outputs to inputs"
                )
            latencies = np.array(measured.system_ms)
            first_input = min(stamps[k] for k in read_ms)
            last_output = max(appended for appended, _ in read_ms.values())
            achieved = phase["count"] / max(1e-3, (last_output - first_input) / 1000.0)
            percentiles, reader_share = measured.percentiles((50, 95, 99))
            phase.update(
                achieved_events_per_s=achieved,
                latency_ms={**percentiles, "max": float(latencies.max())},
                latencies_ms=[round(float(x), 2) for x in latencies],
                reader_ms={**reader_share, "max": float(max(measured.reader_ms))},
                latency_stamp=measured.stamp,
            )
            if visible:  # the append's latency, before the commit made the output visible
                appended = np.array(measured.appended_ms)
                phase["appended_latency_ms"] = {
                    f"p{q}": float(np.percentile(appended, q)) for q in (50, 95, 99)}
            result["phases"].append(phase)
            line += (f"\n{'':22s}   at {phase['offered_rate']:7,.0f} ev/s: latency p50 "
                     f"{percentiles['p50']:7.1f}  p95 {percentiles['p95']:7.1f}  p99 "
                     f"{percentiles['p99']:7.1f}  max {phase['latency_ms']['max']:7.1f} ms"
                     f"  ({'visible; after append' if visible else 'reader'} "
                     f"+{reader_share['p50']:.1f} p50, +{reader_share['p99']:.1f} p99)")
            checkpoints = phase["worker_timings"].get("kvrec_checkpoint_seconds")
            if checkpoints and checkpoints["count"]:
                line += (f"\n{'':22s}   {checkpoints['count']} checkpoints, mean "
                         f"{checkpoints['mean_ms']:.1f} ms, 99% <= {checkpoints['p99_at_most_ms']} ms")
        # the headline phase: the one at half the peak (else the middle one)
        headline = min(result["phases"], key=lambda p: abs(p["fraction"] - 0.5))
        result.update(
            offered_rate=headline["offered_rate"], rate_phase_events=headline["count"],
            latency_ms=headline["latency_ms"], latencies_ms=headline["latencies_ms"],
            reader_ms=headline["reader_ms"], latency_stamp=headline["latency_stamp"],
        )
    print(line, flush=True)
    return result


@contextlib.contextmanager
def broker(bootstrap: str | None, workdir: Path) -> Iterator[str]:
    if bootstrap:
        yield bootstrap
        return
    from kvrec.deploy.kafka.launcher import LocalKafka

    with LocalKafka(data_dir=workdir / "kafka", die_with_parent=True) as kafka:
        yield kafka.bootstrap_servers


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = report["systems"]
    curve = report.get("exactly_once_curve", [])
    figure, axes = plt.subplots(1, 4 if curve else 3, figsize=(24 if curve else 18, 4.5))
    cdf, bars, rates = axes[:3]
    if curve:
        plot_exactly_once(curve, axes[3])
    for index, (name, result) in enumerate(systems.items()):
        phases = result.get("phases", [])
        if phases:
            rates.plot([p["offered_rate"] for p in phases],
                       [p["achieved_events_per_s"] for p in phases], marker="o",
                       color=f"C{index}", label=name)
    rates.set_xlabel("offered events/s")
    rates.set_ylabel("delivered events/s")
    rates.set_title("throughput against offered rate")
    rates.legend(fontsize=8)
    for name, result in systems.items():
        values = np.sort(np.array(result["latencies_ms"]))
        cdf.plot(values, np.arange(1, len(values) + 1) / len(values),
                 label=f"{name} ({result['offered_rate']:,.0f} ev/s)")
    cdf.set_xscale("log")
    cdf.set_xlabel("event to output latency, ms (log)")
    cdf.set_ylabel("share of events")
    cdf.set_title("latency at a fixed offered rate")
    cdf.legend(fontsize=8)
    names = list(systems)
    peaks = [systems[n]["peak_events_per_s"] for n in names]
    bars.bar(range(len(names)), peaks, color=[f"C{i}" for i in range(len(names))])
    bars.set_xticks(range(len(names)), names, rotation=15, fontsize=8)
    bars.set_yscale("log")
    bars.set_ylabel("events/s draining a backlog (log)")
    bars.set_title("peak throughput")
    settings = report["settings"]
    figure.suptitle(
        f"kvrec bench e2e: {settings['events']} events, {settings['items']} items, "
        f"W={settings['window']}, d={','.join(str(d) for d in settings['d_models'])}, "
        f"{settings['users']} users, {settings['partitions']} partitions; "
        f"{machine_line(report['machine'])}"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_exactly_once(curve: list[dict[str, Any]], axis: Any) -> None:
    """Peak, and visible p99 at the headline rate phase (half the peak unless capped), against
    the commit interval, one line per width."""
    latency = axis.twinx()
    for index, d in enumerate(sorted({p["d_model"] for p in curve})):
        points = [p for p in curve if p["d_model"] == d]
        intervals = [p["commit_interval_ms"] for p in points]
        axis.plot(intervals, [p["peak_events_per_s"] for p in points], marker="o",
                  color=f"C{index}", label=f"peak, d={d}")
        measured = [p for p in points if "visible_ms" in p]
        if measured:
            latency.plot([p["commit_interval_ms"] for p in measured],
                         [p["visible_ms"]["p99"] for p in measured], marker="s", linestyle="--",
                         color=f"C{index}", label=f"visible p99 at the rate phase, d={d}")
            latency.plot([p["commit_interval_ms"] for p in measured],
                         [p["commit_wait_ms"]["p99"] for p in measured], marker="^",
                         linestyle=":", color=f"C{index}",
                         label=f"read - append time (the wait for the commit), p99, d={d}")
    axis.set_xscale("log")
    axis.set_xlabel("--commit-interval-ms (exactly-once)")
    axis.set_ylabel("peak events/s (solid)")
    latency.set_ylabel("ms: visible p99 (dashed), its wait for the commit p99 (dotted)")
    axis.set_ylim(bottom=0)
    latency.set_ylim(bottom=0)
    axis.set_title("exactly-once: the commit interval")
    lines = axis.get_legend_handles_labels()
    more = latency.get_legend_handles_labels()
    axis.legend(lines[0] + more[0], lines[1] + more[1], fontsize=7)


def _retrieval_report(log_path: Path) -> dict[str, Any] | None:
    """The worker's logged retrieval build report (kind, settings, measured recall@10)."""
    for line in log_path.read_text(errors="replace").splitlines():
        found = _RETRIEVAL_LINE.search(line)  # `model V: retrieval {...}` (stream/worker/models.py)
        if found:
            return ast.literal_eval(found.group(1))
    return None


_RETRIEVAL_LINE = re.compile(r" retrieval:? (\{.*\})\s*$")


@dataclass(frozen=True)
class Variant:
    """One measured row: a system with its worker flags and model width."""

    name: str
    system: str
    worker_args: list[str] = field(default_factory=list)  # the warm-up worker's too
    d_model: int = BENCH_D_MODEL
    commit_interval_ms: int | None = None  # exactly-once, with this --commit-interval-ms
    processes: int = 1

    @property
    def exactly_once(self) -> bool:
        return self.commit_interval_ms is not None

    @property
    def args(self) -> list[str]:
        """The measured worker's flags (the warm-up worker, which only fills the windows, runs
        at-least-once with `worker_args`)."""
        if self.commit_interval_ms is None:
            return list(self.worker_args)
        return ["--processing-guarantee", "exactly-once",
                "--commit-interval-ms", str(self.commit_interval_ms), *self.worker_args]


def _variants(system: str, process_counts: Sequence[int],
              eos_intervals: Sequence[int] = (1000,),
              d_models: Sequence[int] = (BENCH_D_MODEL,)) -> list[Variant]:
    """Each way `system` is measured: every kvrec system once per model width (`-d<D>` after
    the name for a width other than the bench's 64); kvrec once per process count (`kvrec`,
    `kvrec-2proc`, ...); kvrec-eos once per commit interval (`kvrec-eos-100ms`, ...); every
    other system once."""
    if not system.startswith("kvrec"):
        return [Variant(system, system)]
    variants = []
    for d in d_models:
        suffix = "" if d == BENCH_D_MODEL else f"-d{d}"
        if system == "kvrec":
            variants += [Variant(("kvrec" if n == 1 else f"kvrec-{n}proc") + suffix, system,
                                 ["--processes", str(n)] if n > 1 else [], d, processes=n)
                         for n in process_counts]
        elif system == "kvrec-eos":
            variants += [Variant(f"kvrec-eos-{ms}ms{suffix}", system, [], d, ms)
                         for ms in eos_intervals]
        else:
            variants.append(Variant(system + suffix, system, [], d))
    return variants


def _integers(flag: str, text: str, low: int) -> list[int]:
    """A comma-separated list of distinct integers >= `low`, in the order given."""
    try:
        values = [int(n) for n in text.split(",") if n.strip()]
    except ValueError:
        raise ConfigError(f"{flag}: numbers and commas, got {text!r}") from None
    if not values or min(values) < low or len(set(values)) != len(values):
        raise ConfigError(f"{flag}: one or more distinct numbers >= {low}, got {text!r}")
    return values


def exactly_once_curve(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The exactly-once rows, by width and commit interval: peak, and at the headline phase
    (half the peak) the offered and delivered rates and the visible and appended latencies,
    with the checkpoints' count and mean over that phase (a checkpoint stops the loop)."""
    curve = []
    for name, result in results.items():
        if result.get("commit_interval_ms") is None:
            continue
        point: dict[str, Any] = {
            "system": name, "d_model": result["d_model"],
            "commit_interval_ms": result["commit_interval_ms"],
            "peak_events_per_s": result["peak_events_per_s"],
        }
        if result.get("phases"):
            headline = min(result["phases"], key=lambda p: abs(p["fraction"] - 0.5))
            checkpoints = headline["worker_timings"].get("kvrec_checkpoint_seconds", {})
            point.update(
                fraction=headline["fraction"], offered_rate=headline["offered_rate"],
                achieved_events_per_s=headline["achieved_events_per_s"],
                visible_ms={k: headline["latency_ms"][k] for k in ("p50", "p95", "p99")},
                appended_ms=headline["appended_latency_ms"],
                # read time - append time: the wait for the commit (and the reader's few ms)
                commit_wait_ms={k: headline["reader_ms"][k] for k in ("p50", "p95", "p99")},
                checkpoints=checkpoints.get("count"), checkpoint_mean_ms=checkpoints.get("mean_ms"),
            )
        curve.append(point)
    return sorted(curve, key=lambda p: (p["d_model"], p["commit_interval_ms"]))


def history_per_user(history: int, window: int, layers: int = 2) -> int:
    return layers * (window - 1) + 1 if history < 0 else history


SWEEP_WINDOWS = (20, 50, 200)
SWEEP_ITEMS = (10_000, 100_000, 1_000_000)
SWEEP_BATCHES = (64, 256, 512, 2048)


def sweep_points(items: int, window: int) -> list[dict[str, Any]]:
    """Peak-throughput points: kvrec against W, catalog size and batch size (the others at
    the defaults), and the no-cache worker at each W."""
    points = [{"system": "kvrec", "window": w, "items": items, "batch_size": 512}
              for w in SWEEP_WINDOWS]
    points += [{"system": "kvrec", "window": window, "items": n, "batch_size": 512}
               for n in SWEEP_ITEMS if n != items]
    points += [{"system": "kvrec", "window": window, "items": items, "batch_size": b}
               for b in SWEEP_BATCHES if b != 512]
    points += [{"system": "kvrec-no-cache", "window": w, "items": items, "batch_size": 512}
               for w in SWEEP_WINDOWS]
    return points


def run_sweep(args: argparse.Namespace, bootstrap: str, workdir: Path) -> list[dict[str, Any]]:
    results = []
    points = sweep_points(args.items, args.window)
    for number, point in enumerate(points, start=1):
        # the no-cache worker re-encodes N*(W-1)+1 events per event: a shorter backlog
        events = args.events if point["system"] == "kvrec" else max(1000, args.events // 10)
        interactions = generate_synthetic(
            SyntheticSpec(users=args.sweep_users, items=point["items"], events=events)
        )
        warmup = warmup_history(args.sweep_users, point["items"],
                                history_per_user(args.history, point["window"]))
        model = workdir / f"model-{point['items']}-{point['window']}"
        if not model.exists():
            build_artifact(model, n_items=point["items"], window=point["window"])
        tag = f"{point['system']}-w{point['window']}-n{point['items']}-b{point['batch_size']}"
        run = Run(point["system"], bootstrap, args.partitions, workdir / f"sweep-{tag}.log")
        print(f"[{number}/{len(points)}] {tag}", flush=True)
        result = measure(
            run, interactions, [], model=model, state_dir=workdir / f"state-{tag}",
            worker_args=["--batch-size", str(point["batch_size"]), "--log-level", "INFO"],
            seconds=1.0, rate_fractions=[], max_rate=args.max_rate, timeout=args.timeout,
            warmup=warmup,
        )
        retrieval = _retrieval_report(run.log_path) or {}
        results.append({
            **point, "events": events, "users": args.sweep_users, "warmup_events": len(warmup),
            "peak_events_per_s": result["peak_events_per_s"],
            "retrieval": {k: retrieval.get(k) for k in ("kind", "factory", "nprobe", "k_factor",
                                                        "recall@10", "build_seconds")},
        })
    return results


def plot_sweep(sweep: list[dict[str, Any]], items: int, window: int, path: Path,
               machine: dict[str, Any] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    for system, marker in (("kvrec", "o"), ("kvrec-no-cache", "s")):
        by_window = sorted((p["window"], p["peak_events_per_s"]) for p in sweep
                           if p["system"] == system and p["items"] == items and p["batch_size"] == 512)
        axes[0].plot(*zip(*by_window, strict=True), marker=marker, label=system)
    by_items = sorted((p["items"], p["peak_events_per_s"]) for p in sweep if p["system"] == "kvrec"
                      and p["window"] == window and p["batch_size"] == 512)
    by_batch = sorted((p["batch_size"], p["peak_events_per_s"]) for p in sweep
                      if p["system"] == "kvrec" and p["window"] == window and p["items"] == items)
    axes[1].plot(*zip(*by_items, strict=True), marker="o", color="C0")
    axes[2].plot(*zip(*by_batch, strict=True), marker="o", color="C0")
    for axis, label in zip(axes, ("window W (events)", "catalog items", "batch size (events)"),
                           strict=True):
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel(label)
        axis.set_ylabel("peak events/s")
    axes[0].legend(fontsize=8)
    axes[0].set_title(f"against W ({items:,} items)")
    axes[1].set_title(f"against catalog size (W={window})")
    axes[2].set_title(f"against batch size (W={window}, {items:,} items)")
    figure.suptitle("kvrec bench e2e --sweep: one worker draining a backlog"
                    + (f"; {machine_line(machine)}" if machine else ""))
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", required=True, help="output JSON")
    parser.add_argument("--plot", default=None, help="output PNG")
    parser.add_argument("--quick", action="store_true",
                        help="2000 events, 2000 items, W=8, 3 s rate phase (CI smoke)")
    parser.add_argument("--bootstrap-servers", default=None, help="default: start a local broker")
    parser.add_argument("--events", type=flags.integer(1), default=50_000, help="backlog for the peak phase")
    parser.add_argument("--items", type=flags.integer(2), default=100_000)
    parser.add_argument("--window", type=flags.integer(1), default=50)
    parser.add_argument("--users", type=flags.integer(1), default=1_000)
    parser.add_argument("--history", type=flags.integer(-1), default=-1,
                        help="events per user stored before the timed phases, by a kvrec worker "
                             "(-1: fill each window, N*(W-1)+1; 0: none)")
    parser.add_argument("--seconds", type=flags.number(above=0), default=20.0, help="fixed-rate phase")
    parser.add_argument("--rate-fractions", default="0.25,0.5,0.75",
                        help="fixed-rate phases: offered rate = these shares of the measured peak")
    parser.add_argument("--max-rate", type=flags.number(above=0), default=20_000.0,
                        help="offered rate cap, ev/s")
    parser.add_argument("--partitions", type=flags.integer(1), default=4)
    parser.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS),
                        help=f"any of {', '.join(SYSTEMS)}")
    parser.add_argument("--eos-commit-intervals",
                        default=",".join(str(ms) for ms in EOS_COMMIT_INTERVALS),
                        help="kvrec-eos is measured with each of these --commit-interval-ms "
                             "values (ms), as kvrec-eos-<N>ms; its latency is the visible one "
                             "(a read_committed reader's read time - the input's timestamp)")
    parser.add_argument("--d-models", default=str(BENCH_D_MODEL),
                        help="every kvrec system is measured on a model of each of these widths "
                             "(e.g. 64,128: 128 is kvrec train's default), as <system>-d<D> for "
                             f"a width other than {BENCH_D_MODEL}")
    parser.add_argument("--timeout", type=flags.number(above=0), default=600.0, help="per phase, seconds")
    parser.add_argument("--workdir", default=None, help="default: a temporary directory")
    parser.add_argument("--processes", default="1",
                        help="kvrec is measured with each of these `kvrec worker --processes` "
                             "counts (e.g. 1,2); N > 1 is reported as kvrec-<N>proc, with its "
                             "peak over the 1-process peak as process_scaling")
    parser.add_argument("--sweep", action="store_true",
                        help="also: kvrec peak against W (20, 50, 200), catalog (10k, 100k, 1M) and "
                             "batch size (64..2048), no-cache peak against W; plot to <plot>-sweep.png")
    parser.add_argument("--sweep-events", type=flags.integer(1), default=20_000,
                        help="backlog per sweep point")
    parser.add_argument("--sweep-users", type=flags.integer(1), default=500, help="users per sweep point")


def main(args: argparse.Namespace) -> int:
    if args.quick:
        args.events, args.items, args.window, args.seconds = 2000, 2000, 8, 3.0
        args.users, args.max_rate, args.timeout = min(args.users, 200), min(args.max_rate, 5000.0), 60.0
        args.rate_fractions = "0.5"
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    if not systems or set(systems) - set(SYSTEMS):
        raise ConfigError(f"--systems: choose from {', '.join(SYSTEMS)}")
    eos_intervals = _integers("--eos-commit-intervals", args.eos_commit_intervals, 1)
    d_models = _integers("--d-models", args.d_models, 2)
    if any(d % BENCH_HEADS for d in d_models):
        raise ConfigError(f"--d-models: each width must divide by the model's {BENCH_HEADS} heads")
    if min(args.events, args.window, args.users, args.partitions) < 1 or args.items < 2:
        raise ConfigError("--events, --window, --users, --partitions must be >= 1, --items >= 2")
    try:
        fractions = [float(f) for f in args.rate_fractions.split(",") if f.strip()]
    except ValueError:
        raise ConfigError(f"--rate-fractions: numbers and commas, got {args.rate_fractions!r}") from None
    if not all(0 < f <= 1 for f in fractions) or args.seconds <= 0 or args.max_rate <= 0:
        raise ConfigError("--rate-fractions in (0, 1], --seconds and --max-rate > 0")
    process_counts = _integers("--processes", args.processes, 1)
    workdir = work_dir(args.workdir, "kvrec-e2e-", "kvrec bench e2e")
    rate_events = int(args.max_rate * args.seconds * len(fractions)) + 1
    interactions = generate_synthetic(
        SyntheticSpec(users=args.users, items=args.items, events=args.events + rate_events)
    )
    peak_events, tail = interactions[: args.events], interactions[args.events:]
    started = time.monotonic()
    variants = [v for system in systems
                for v in _variants(system, process_counts, eos_intervals, d_models)]
    models = {  # the bench's model (d 64) where it always was; other widths beside it
        d: build_artifact(workdir / ("model" if d == BENCH_D_MODEL else f"model-d{d}"),
                          n_items=args.items, window=args.window, d_model=d)
        for d in sorted({v.d_model for v in variants})
    }
    warmup = warmup_history(args.users, args.items, history_per_user(args.history, args.window))
    results: dict[str, Any] = {}
    sweep: list[dict[str, Any]] = []
    with broker(args.bootstrap_servers, workdir) as bootstrap:
        if args.sweep:
            sweep_args = argparse.Namespace(**{**vars(args), "events": args.sweep_events})
            sweep = run_sweep(sweep_args, bootstrap, workdir)
        for variant in variants:
            run = Run(variant.name, bootstrap, args.partitions, workdir / f"{variant.name}.log")
            results[variant.name] = {
                "system": variant.system, "d_model": variant.d_model,
                "processing_guarantee": "exactly-once" if variant.exactly_once else "at-least-once",
                "commit_interval_ms": variant.commit_interval_ms, "processes": variant.processes,
                **measure(
                    run, peak_events, tail, model=models[variant.d_model],
                    state_dir=workdir / "state", worker_args=variant.args, seconds=args.seconds,
                    rate_fractions=fractions, max_rate=args.max_rate, timeout=args.timeout,
                    warmup=warmup, warmup_args=variant.worker_args, visible=variant.exactly_once,
                ),
            }
    report: dict[str, Any] = {
        "benchmark": "end to end through Kafka",
        "machine": machine_info(),
        "settings": {
            "events": args.events, "items": args.items, "window": args.window,
            "d_models": d_models, "layers": BENCH_LAYERS, "heads": BENCH_HEADS,
            "users": args.users, "seconds": args.seconds,
            "history_per_user": history_per_user(args.history, args.window),
            "sweep_users": args.sweep_users if args.sweep else None,
            "rate_fractions": fractions, "max_rate": args.max_rate,
            "partitions": args.partitions, "systems": systems, "quick": args.quick,
            "processes": process_counts,
            "eos_commit_intervals_ms": eos_intervals if "kvrec-eos" in systems else None,
            "broker": "given" if args.bootstrap_servers else "local launcher",
            "worker": "torch-cpu, --retrieval auto, at-least-once (kvrec-eos: exactly-once), "
                      "default batch settings",
            "latency": "output's broker append time (LogAppendTime) - input message Kafka "
                       "timestamp (CreateTime); reader_ms: bench read time - append time. "
                       "kvrec-eos: visible latency, the read time of a read_committed reader - "
                       "the input's timestamp (appended_latency_ms: the append's; reader_ms: "
                       "the wait for the commit and the reader's share)",
        },
        "systems": results,
        "seconds_total": time.monotonic() - started,
    }
    if sweep:
        report["sweep"] = sweep
        cached = {p["window"]: p["peak_events_per_s"] for p in sweep
                  if p["system"] == "kvrec" and p["items"] == args.items and p["batch_size"] == 512}
        naive = {p["window"]: p["peak_events_per_s"] for p in sweep if p["system"] == "kvrec-no-cache"}
        report["sweep_kvrec_over_no_cache"] = {
            str(w): cached[w] / naive[w] for w in sorted(cached) if w in naive
        }
    scaled = {n: results[f"kvrec-{n}proc"]["peak_events_per_s"] for n in process_counts
              if f"kvrec-{n}proc" in results}
    if scaled and "kvrec" in results:
        report["process_scaling"] = {
            str(n): peak / results["kvrec"]["peak_events_per_s"] for n, peak in scaled.items()
        }
    curve = exactly_once_curve(results)
    if curve:
        report["exactly_once_curve"] = curve
    widths = {r["d_model"]: r["peak_events_per_s"] for r in results.values()
              if r["system"] == "kvrec" and r["commit_interval_ms"] is None
              and r["processes"] == 1}
    if len(widths) > 1 and BENCH_D_MODEL in widths:
        report["peak_over_d64"] = {str(d): peak / widths[BENCH_D_MODEL]
                                   for d, peak in sorted(widths.items())}
    if "kvrec" in results and "kvrec-no-cache" in results:
        report["kvrec_over_no_cache"] = {
            "peak_events_per_s": results["kvrec"]["peak_events_per_s"]
            / results["kvrec-no-cache"]["peak_events_per_s"],
            "latency_p50": results["kvrec"]["latency_ms"]["p50"]
            / results["kvrec-no-cache"]["latency_ms"]["p50"],
        }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=1))
    if args.plot:
        plot(report, Path(args.plot))
        if sweep:
            plot_sweep(sweep, args.items, args.window,
                       Path(args.plot).with_name(Path(args.plot).stem + "-sweep.png"),
                       report["machine"])
    return 0
