"""`kvrec demo`: the whole product on one machine, in one command.

Starts a local single-node Kafka broker (unless `--bootstrap-servers` names one), trains a small
model (or uses `--model`), starts a worker process, replays a dataset into the events topic,
and shows recommendations arriving: throughput, event-to-recommendation latency and the live
hit rate (the share of events whose item was in that user's previous recommendation list).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from confluent_kafka import Consumer

from model.datasets import Interaction, add_dataset_arguments, dataset_from_args
from model.errors import ConfigError
from stream.kafka_config import ensure_topics
from stream.replay import replay_events
from stream.schema import decode_recommendation

DEFAULT_DATA = Path(__file__).resolve().parent.parent.parent / "shared/datasets/amazon-games.txt"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataset_arguments(parser)
    parser.add_argument("--bootstrap-servers", default=None, help="default: start a local broker")
    parser.add_argument("--model", default=None, help="an artifact; default: train one now")
    parser.add_argument("--train-epochs", type=int, default=2)
    parser.add_argument("--rate", type=float, default=2000.0, help="replayed events/s (0 = max)")
    parser.add_argument("--events", type=int, default=60_000, help="events to replay")
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--workdir", default=None, help="default: a temporary directory")
    parser.add_argument("--backend", default="torch-cpu")


@contextlib.contextmanager
def _broker(bootstrap: str | None, workdir: Path) -> Iterator[str]:
    if bootstrap:
        yield bootstrap
        return
    from deploy.kafka.launcher import LocalKafka

    started = time.monotonic()
    print("demo: starting a local Kafka broker (KRaft) ...", flush=True)
    with LocalKafka(data_dir=workdir / "kafka") as kafka:
        print(f"demo: broker at {kafka.bootstrap_servers} in {time.monotonic() - started:.1f}s")
        yield kafka.bootstrap_servers


def _train(args: argparse.Namespace, workdir: Path) -> Path:
    out = workdir / "model"
    command = [
        sys.executable, "-m", "stream.cli", "train", "--format", args.format,
        "--out", str(out), "--epochs", str(args.train_epochs), "--loss", "ce",
        "--max-len", "100", "--seed", str(args.seed),
    ]
    if args.data:
        command += ["--data", str(args.data)]
    if args.format == "synthetic":
        command += [
            "--synthetic-users", str(args.synthetic_users),
            "--synthetic-items", str(args.synthetic_items),
            "--synthetic-events", str(args.synthetic_events),
        ]
    print(f"demo: training a small model: {' '.join(command[3:])}", flush=True)
    if subprocess.run(command).returncode != 0:
        raise ConfigError("training the demo model failed (see above)")
    return out


class LiveStats:
    """Reads recommendations and keeps the figures the demo shows."""

    def __init__(self, items_by_event: dict[tuple[str, int], str]) -> None:
        self.items_by_event = items_by_event
        self.previous: dict[str, set[str]] = {}
        self.count = 0
        self.hits = 0
        self.judged = 0
        self.cold = 0
        self.latencies_ms: list[float] = []
        self.last_example: str = ""

    def add(self, value: bytes, consumed_ms: float) -> None:
        rec = decode_recommendation(value)
        self.count += 1
        self.cold += int(rec.cold_start)
        produced = getattr(rec, "source_ts", None)
        if produced:
            self.latencies_ms.append(consumed_ms - produced)
        item = self.items_by_event.get((rec.user_id, rec.event_ts))
        previous = self.previous.get(rec.user_id)
        if item is not None and previous is not None:
            self.judged += 1
            self.hits += int(item in previous)
        self.previous[rec.user_id] = {i.item_id for i in rec.items}
        if rec.because and self.count % 500 == 0:
            because = ", ".join(f"{b.item_id} ({b.event_type}, {b.weight:.2f})" for b in rec.because)
            top = ", ".join(i.item_id for i in rec.items[:5])
            self.last_example = f"user {rec.user_id}: {top}  because {because}"

    def line(self, elapsed: float, window_count: int, window_s: float) -> str:
        latency = np.array(self.latencies_ms[-5000:]) if self.latencies_ms else np.array([0.0])
        hit_rate = self.hits / self.judged if self.judged else 0.0
        return (
            f"{elapsed:6.1f}s  recs {self.count:7d}  {window_count / window_s:7.0f}/s  "
            f"latency p50 {np.percentile(latency, 50):6.1f} ms  p99 "
            f"{np.percentile(latency, 99):6.1f} ms  hit rate {hit_rate:6.2%}  cold {self.cold}"
        )


def main(args: argparse.Namespace) -> int:
    if args.format == "sasrec" and args.data is None:
        if not DEFAULT_DATA.exists():
            raise ConfigError(f"no --data given and {DEFAULT_DATA} is missing; try --format synthetic")
        args.data = str(DEFAULT_DATA)
    interactions: list[Interaction] = dataset_from_args(args)[: args.events]
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="kvrec-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    model = Path(args.model) if args.model else _train(args, workdir)
    with _broker(args.bootstrap_servers, workdir) as bootstrap:
        topics = {"events": (args.partitions, {}), "recommendations": (args.partitions, {})}
        topics["events-dead-letter"] = (1, {})
        topics["kvrec-worker-windows-changelog"] = (args.partitions, {"cleanup.policy": "compact"})
        ensure_topics({"bootstrap.servers": bootstrap}, topics)
        worker = subprocess.Popen(
            [
                sys.executable, "-m", "stream.cli", "worker", "--bootstrap-servers", bootstrap,
                "--model", str(model), "--state-dir", str(workdir / "state"),
                "--backend", args.backend, "--metrics-port", "0", "--log-level", "WARNING",
            ],
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        try:
            return _replay_and_watch(args, bootstrap, interactions, worker)
        finally:
            worker.terminate()
            worker.wait(timeout=60)


def _replay_and_watch(
    args: argparse.Namespace,
    bootstrap: str,
    interactions: list[Interaction],
    worker: subprocess.Popen,
) -> int:
    items_by_event = {(i.user_id, i.ts): i.item_id for i in interactions}
    stats = LiveStats(items_by_event)
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"kvrec-demo-{os.getpid()}",
            "auto.offset.reset": "latest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe(["recommendations"])
    consumer.consume(1, timeout=3.0)  # join the group before the replay starts
    print(f"demo: replaying {len(interactions)} events at {args.rate:.0f}/s", flush=True)
    replay = threading.Thread(
        target=replay_events,
        args=({"bootstrap.servers": bootstrap}, "events", interactions, args.rate),
        kwargs={"progress": False},
        daemon=True,
    )
    started = time.monotonic()
    replay.start()
    last_print, last_count = started, 0
    idle_since = None
    while True:
        messages = consumer.consume(1000, timeout=0.2)
        now_ms = time.time() * 1000
        for message in messages:
            if message.error() is None:
                stats.add(message.value(), now_ms)
        now = time.monotonic()
        if now - last_print >= 1.0:
            print(stats.line(now - started, stats.count - last_count, now - last_print), flush=True)
            if stats.last_example:
                print(f"        e.g. {stats.last_example}", flush=True)
                stats.last_example = ""
            last_print, last_count = now, stats.count
        if worker.poll() is not None:
            print(f"demo: the worker exited with {worker.returncode}", file=sys.stderr)
            return 1
        if not replay.is_alive() and not messages:
            idle_since = idle_since or now
            if now - idle_since > 5.0 or stats.count >= len(interactions):
                break
        else:
            idle_since = None
    consumer.close()
    elapsed = time.monotonic() - started
    print(json.dumps({
        "events_replayed": len(interactions),
        "recommendations": stats.count,
        "seconds": round(elapsed, 1),
        "recommendations_per_s": round(stats.count / elapsed, 1),
        "latency_ms_p50": round(float(np.percentile(stats.latencies_ms or [0], 50)), 1),
        "latency_ms_p99": round(float(np.percentile(stats.latencies_ms or [0], 99)), 1),
        "live_hit_rate": round(stats.hits / stats.judged, 4) if stats.judged else None,
        "cold_start": stats.cold,
    }))
    return 0
