"""`kvrec bench e2e`: end-to-end throughput and latency through a real broker, kvrec against
the same event stream with no cache and against two Kafka relays that do no work at all.

For each system, on fresh topics of one broker:
1. **peak**: N events are produced first (a backlog), then the system starts as a subprocess;
   throughput = N / seconds from the first to the last output, by the broker's append times
   (output topics use LogAppendTime; + 1 ms for their resolution), once all N outputs arrived
   (startup time, model load and index build, is left out);
2. **latency**: events are then produced at a fixed offered rate (`--rate-fraction` of that
   system's peak, at most `--max-rate`) for `--seconds`; each output is matched to its input
   event by (user id, event ts), and its latency is the time the bench read it minus the Kafka
   timestamp of the input message (CreateTime, set by the producer; read back from the input
   topic afterwards, so every system is measured the same way; it is also the worker's
   `source_ts`). The fixed-rate producer is connected before the phase starts (linger 2 ms);
   every producer here sends uncompressed (aiokafka, under Faust, has no lz4 codec installed).

Systems: `kvrec` (the worker, `--retrieval auto`), `kvrec-no-cache` (the worker with
`--cache-bytes 1`: every event misses and re-encodes the user's window, what a system without
the key/value cache pays), `confluent-passthrough` (`bench/passthrough.py`, a confluent-kafka
consume-produce loop) and `faust-passthrough` (`bench/faust_passthrough.py`, a Faust agent).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from bench.machine import machine_info
from model.datasets import Interaction, SyntheticSpec, generate_synthetic
from model.errors import ConfigError
from stream.kafka_config import ensure_topics
from stream.replay import BURST_SECONDS, TokenBucket, replay_events
from stream.schema import Event, encode_event

SYSTEMS = ("kvrec", "kvrec-no-cache", "confluent-passthrough", "faust-passthrough")
EVENT_TYPES = ["view", "click", "add_to_cart", "purchase"]
REPO = Path(__file__).resolve().parent.parent


def build_artifact(out_dir: Path, *, n_items: int, window: int, d_model: int = 64,
                   layers: int = 2, seed: int = 0) -> Path:
    """A model artifact with random weights (no training): item ids "i1".."iN", the ids
    `generate_synthetic` uses for a catalog of N items. The item embeddings are a clustered
    catalog (`bench.retrieval.clustered_catalog`), like trained ones: with i.i.d. Gaussian
    embeddings no approximate index can skip anything (at 100k items IVF-PQ needed every list
    probed for recall@10 0.96, 200 us a query), which no trained catalog looks like."""
    import torch

    from bench.retrieval import clustered_catalog
    from model.artifact import save_artifact
    from model.config import ModelConfig
    from model.encoder import Encoder

    torch.manual_seed(seed)
    config = ModelConfig(
        n_items=n_items, n_event_types=len(EVENT_TYPES), d_model=d_model, n_layers=layers,
        n_heads=2, window=window, dropout=0.0,
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
                self.outputs: (partitions, {"message.timestamp.type": "LogAppendTime"}),
                self.dead_letters: (1, {}),
                f"{self.group}-windows-changelog": (partitions, {"cleanup.policy": "compact"}),
            },
        )
        self.process: subprocess.Popen | None = None
        self.log_path = log_path

    def command(self, model: Path, state_dir: Path, worker_args: Sequence[str]) -> tuple[list[str], dict]:
        env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
        if self.name.startswith("kvrec"):
            command = [
                sys.executable, "-m", "stream.cli", "worker", "--bootstrap-servers", self.bootstrap,
                "--input-topic", self.events, "--output-topic", self.outputs,
                "--dead-letter-topic", self.dead_letters, "--group-id", self.group,
                "--instance-id", self.group, "--model", str(model),
                "--state-dir", str(state_dir / self.name), "--retrieval", "auto",
                "--metrics-port", "-1", "--log-level", "WARNING", *worker_args,
            ]
            if self.name == "kvrec-no-cache":
                command += ["--cache-bytes", "1"]
            return command, env
        if self.name == "confluent-passthrough":
            return [sys.executable, "-m", "bench.passthrough", self.bootstrap, self.events,
                    self.outputs, self.group], env
        env.update(
            KVREC_BENCH_APP_ID=self.group, KVREC_BENCH_BOOTSTRAP=self.bootstrap,
            KVREC_BENCH_IN=self.events, KVREC_BENCH_OUT=self.outputs,
            KVREC_BENCH_PARTITIONS=str(self.partitions),
        )
        return [sys.executable, "-m", "bench.faust_passthrough"], env

    def start(self, model: Path, state_dir: Path, worker_args: Sequence[str]) -> None:
        command, env = self.command(model, state_dir, worker_args)
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                command, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def check_alive(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            tail = self.log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{tail}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)


def _reader(bootstrap: str, topic: str, partitions: int) -> Consumer:
    consumer = Consumer({
        "bootstrap.servers": bootstrap, "group.id": f"e2e-reader-{uuid.uuid4().hex[:8]}",
        "enable.auto.commit": False, "fetch.wait.max.ms": 5,
    })
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(partitions)])
    return consumer


def _event_key(system: str, value: bytes) -> tuple[str, int]:
    """(user id, event ts) of an output: a recommendation, or a relayed event."""
    data = json.loads(value)
    if system.startswith("kvrec"):
        return data["user_id"], int(data["event_ts"])
    return data["user_id"], int(data["ts"])


def _drain(consumer: Consumer, expected: int, timeout: float, run: Run,
           on_message: Callable[[bytes, float], None] | None = None) -> list[float]:
    """Read until `expected` outputs arrived; return each one's broker append time (s, epoch)."""
    times: list[float] = []
    deadline = time.monotonic() + timeout
    while len(times) < expected:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{run.name}: {len(times)} of {expected} outputs in {timeout:.0f}s")
        messages = consumer.consume(1000, timeout=0.05)
        now = time.time()
        for message in messages:
            if message.error() is None:
                times.append(message.timestamp()[1] / 1000.0)
                if on_message is not None:
                    on_message(message.value(), now)
        if not messages:
            run.check_alive()
    return times


def produce_paced(producer: Producer, topic: str, events: Sequence[Interaction], rate: float) -> None:
    """Produce `events` at `rate` per second (replay's token bucket) with a connected producer."""
    bucket = TokenBucket(rate, rate * BURST_SECONDS)
    for n, event in enumerate(events):
        bucket.take()
        value = encode_event(Event(event.user_id, event.item_id, event.event_type, event.ts))
        producer.produce(topic, key=event.user_id.encode(), value=value)
        if n % 100 == 0:
            producer.poll(0)
    producer.flush(60)


def _input_timestamps(bootstrap: str, topic: str, partitions: int, expected: int) -> dict:
    consumer = _reader(bootstrap, topic, partitions)
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
    rate_fraction: float, max_rate: float, timeout: float,
) -> dict[str, Any]:
    # uncompressed for every system: aiokafka (Faust) has no lz4 codec installed here
    producer_config = {"bootstrap.servers": run.bootstrap, "compression.type": "none"}
    stats = replay_events(producer_config, run.events, peak_events, 0.0, progress=False)
    if stats.failed:
        raise RuntimeError(f"{run.name}: {stats.failed} events not delivered")
    consumer = _reader(run.bootstrap, run.outputs, run.partitions)
    # connected before the rate phase, so no event waits for a connection
    paced = Producer({**producer_config, "linger.ms": 2})
    paced.list_topics(run.events, timeout=10)
    run.start(model, state_dir, worker_args)
    try:
        times = sorted(_drain(consumer, len(peak_events), timeout, run))
        # + 1 ms: append times have millisecond resolution (and one per producer batch)
        span = times[-1] - times[0] + 0.001
        peak = len(times) / span
        offered = min(max_rate, peak * rate_fraction)
        count = min(len(rate_events), max(1, int(offered * seconds)))
        phase = rate_events[:count]
        read_ms: dict[tuple[str, int], float] = {}

        def on_message(value: bytes, now: float) -> None:
            read_ms[_event_key(run.name, value)] = now * 1000.0

        producer = threading.Thread(
            target=produce_paced, args=(paced, run.events, phase, offered), daemon=True
        )
        producer.start()
        _drain(consumer, count, timeout + seconds, run, on_message)
        producer.join()
    finally:
        consumer.close()
        run.stop()
    stamps = _input_timestamps(run.bootstrap, run.events, run.partitions, len(peak_events) + count)
    latencies = np.array([read_ms[k] - stamps[k] for k in read_ms if k in stamps])
    if len(latencies) < count:
        raise RuntimeError(f"{run.name}: matched {len(latencies)} of {count} outputs to inputs")
    percentiles = {f"p{q}": float(np.percentile(latencies, q)) for q in (50, 95, 99)}
    result = {
        "events": len(times),
        "peak_seconds": span,
        "peak_events_per_s": peak,
        "offered_rate": offered,
        "rate_phase_events": count,
        "latency_ms": {**percentiles, "max": float(latencies.max())},
        "latencies_ms": [round(float(x), 2) for x in latencies],
    }
    print(
        f"{run.name:22s} peak {peak:9,.0f} ev/s   at {offered:7,.0f} ev/s: latency p50 "
        f"{percentiles['p50']:7.1f}  p95 {percentiles['p95']:7.1f}  p99 {percentiles['p99']:7.1f}"
        f"  max {result['latency_ms']['max']:7.1f} ms",
        flush=True,
    )
    return result


@contextlib.contextmanager
def _broker(bootstrap: str | None, workdir: Path) -> Iterator[str]:
    if bootstrap:
        yield bootstrap
        return
    from deploy.kafka.launcher import LocalKafka

    with LocalKafka(data_dir=workdir / "kafka", die_with_parent=True) as kafka:
        yield kafka.bootstrap_servers


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = report["systems"]
    figure, (cdf, bars) = plt.subplots(1, 2, figsize=(13, 4.5))
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
    bars.bar(range(len(names)), peaks, color=["C0", "C1", "C2", "C3"][: len(names)])
    bars.set_xticks(range(len(names)), names, rotation=15, fontsize=8)
    bars.set_yscale("log")
    bars.set_ylabel("events/s draining a backlog (log)")
    bars.set_title("peak throughput")
    settings = report["settings"]
    figure.suptitle(
        f"kvrec bench e2e: {settings['events']} events, {settings['items']} items, "
        f"W={settings['window']}, {report['machine']['cores']} cores"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", required=True, help="output JSON")
    parser.add_argument("--plot", default=None, help="output PNG")
    parser.add_argument("--quick", action="store_true",
                        help="2000 events, 2000 items, W=8, 3 s rate phase (CI smoke)")
    parser.add_argument("--bootstrap-servers", default=None, help="default: start a local broker")
    parser.add_argument("--events", type=int, default=50_000, help="backlog for the peak phase")
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--window", type=int, default=50)
    parser.add_argument("--users", type=int, default=5_000)
    parser.add_argument("--seconds", type=float, default=20.0, help="fixed-rate phase")
    parser.add_argument("--rate-fraction", type=float, default=0.5,
                        help="offered rate = this share of the system's measured peak")
    parser.add_argument("--max-rate", type=float, default=20_000.0, help="offered rate cap, ev/s")
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--timeout", type=float, default=600.0, help="per phase, seconds")
    parser.add_argument("--workdir", default=None, help="default: a temporary directory")


def main(args: argparse.Namespace) -> int:
    if args.quick:
        args.events, args.items, args.window, args.seconds = 2000, 2000, 8, 3.0
        args.users, args.max_rate, args.timeout = min(args.users, 500), min(args.max_rate, 5000.0), 60.0
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    if not systems or set(systems) - set(SYSTEMS):
        raise ConfigError(f"--systems: choose from {', '.join(SYSTEMS)}")
    if min(args.events, args.window, args.users, args.partitions) < 1 or args.items < 2:
        raise ConfigError("--events, --window, --users, --partitions must be >= 1, --items >= 2")
    if not 0 < args.rate_fraction <= 1 or args.seconds <= 0 or args.max_rate <= 0:
        raise ConfigError("--rate-fraction in (0, 1], --seconds and --max-rate > 0")
    rate_events = int(args.max_rate * args.seconds) + 1
    interactions = generate_synthetic(
        SyntheticSpec(users=args.users, items=args.items, events=args.events + rate_events)
    )
    peak_events, tail = interactions[: args.events], interactions[args.events:]
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="kvrec-e2e-"))
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    model = build_artifact(workdir / "model", n_items=args.items, window=args.window)
    results: dict[str, Any] = {}
    with _broker(args.bootstrap_servers, workdir) as bootstrap:
        for name in systems:
            run = Run(name, bootstrap, args.partitions, workdir / f"{name}.log")
            results[name] = measure(
                run, peak_events, tail, model=model, state_dir=workdir / "state",
                worker_args=[], seconds=args.seconds, rate_fraction=args.rate_fraction,
                max_rate=args.max_rate, timeout=args.timeout,
            )
    report: dict[str, Any] = {
        "benchmark": "end to end through Kafka",
        "machine": machine_info(),
        "settings": {
            "events": args.events, "items": args.items, "window": args.window, "d_model": 64,
            "layers": 2, "users": args.users, "seconds": args.seconds,
            "rate_fraction": args.rate_fraction, "max_rate": args.max_rate,
            "partitions": args.partitions, "systems": systems, "quick": args.quick,
            "broker": "given" if args.bootstrap_servers else "local launcher",
            "worker": "torch-cpu, --retrieval auto, at-least-once, default batch settings",
            "latency": "bench read time - input message Kafka timestamp (CreateTime)",
        },
        "systems": results,
        "seconds_total": time.monotonic() - started,
    }
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
    return 0
