"""`kvrec demo`: the whole product on one machine, in one command.

Starts a local single-node Kafka broker (unless `--bootstrap-servers` names one), trains a small
model (or uses `--model`), starts a worker process and waits until it is ready (its `/ready`
answers 200: model loaded, index built, partitions assigned), replays a dataset into the events
topic, and shows recommendations arriving: throughput, event-to-recommendation latency and the
live hit rate (the share of events whose item was in that user's previous recommendation list).

It succeeds only when every replayed event got its recommendation. It fails with one line and
exit status 1 when the worker exits or is killed, is not ready within `--ready-timeout`, or
when recommendations stop arriving for `--settle-timeout` after the replay while some are
still missing (the summary JSON is printed first).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

from confluent_kafka import Consumer, KafkaException, Message, TopicPartition

from kvrec.errors import ConfigError, RunFailed
from kvrec.flags import integer, number
from kvrec.model.artifact_files import check_artifact_dir
from kvrec.model.choices import BACKENDS
from kvrec.model.datasets import Interaction, add_dataset_arguments, dataset_from_args
from kvrec.model.owned import work_dir
from kvrec.stream.demo_worker import WorkerProcess, free_port
from kvrec.stream.kafka_config import ensure_topics, kafka_error_text
from kvrec.stream.latency import LOG_APPEND_TIME, Latencies, read_available
from kvrec.stream.replay import ReplayStats, replay_events
from kvrec.stream.schema import decode_recommendation

DEFAULT_DATA = Path(__file__).resolve().parent.parent.parent / "shared/datasets/amazon-games.txt"
# the demo's small model, all of it named (not `kvrec train`'s defaults, the full recipe, which
# takes most of an hour): trained for --train-epochs at a constant learning rate
DEMO_MODEL_FLAGS = (
    "--loss", "ce", "--d-model", "64", "--layers", "2", "--heads", "2", "--window", "50",
    "--max-len", "100", "--dropout", "0.2", "--batch-size", "128", "--lr", "1e-3",
    "--lr-schedule", "constant", "--warmup-epochs", "0",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataset_arguments(parser)
    parser.add_argument("--bootstrap-servers", default=None, help="default: start a local broker")
    parser.add_argument("--model", default=None, help="an artifact; default: train one now")
    parser.add_argument("--train-epochs", type=integer(1), default=2)
    parser.add_argument(
        "--train-threads", type=integer(0), default=0,
        help="torch threads for training (0 = the cores free now: cores minus the 1-minute "
             "load average, at least 1)",
    )
    parser.add_argument("--rate", type=number(0), default=2000.0, help="replayed events/s (0 = max)")
    parser.add_argument("--events", type=integer(1), default=60_000, help="events to replay")
    parser.add_argument("--partitions", type=integer(1), default=4)
    parser.add_argument("--workdir", default=None, help="default: a temporary directory")
    parser.add_argument("--backend", default="torch-cpu", choices=BACKENDS)
    parser.add_argument(
        "--topic-prefix", default=None,
        help="prefix of the demo's topics and worker group (default: none with the demo's own "
             "broker, a fresh `demo-<id>-` with --bootstrap-servers)",
    )
    parser.add_argument(
        "--ready-timeout", type=number(above=0), default=300.0,
        help="seconds to wait for the worker's /ready (ONNX export and index build) before failing",
    )
    parser.add_argument(
        "--settle-timeout", type=number(above=0), default=30.0,
        help="after the replay, fail when recommendations are missing and none arrived for this long",
    )


def train_threads(cores: int, load_1min: float) -> int:
    """Training threads for the cores free now: cores minus the 1-minute load average, rounded,
    at least 1 (more threads than free cores spin against each other: 2 s a batch was seen on
    2 busy cores with torch's default of one thread per core)."""
    return max(1, min(cores, int(cores - load_1min + 0.5)))


def _chosen_threads(requested: int) -> tuple[int, str]:
    if requested > 0:
        return requested, "--train-threads"
    cores = len(os.sched_getaffinity(0))
    load = os.getloadavg()[0]
    return train_threads(cores, load), f"{cores} cores, load average {load:.1f} over the last minute"


@contextlib.contextmanager
def _broker(bootstrap: str | None, workdir: Path) -> Iterator[str]:
    if bootstrap:
        yield bootstrap
        return
    from kvrec.deploy.kafka.launcher import LocalKafka

    started = time.monotonic()
    print("demo: starting a local Kafka broker (KRaft) ...", flush=True)
    with LocalKafka(data_dir=workdir / "kafka") as kafka:
        print(f"demo: broker at {kafka.bootstrap_servers} in {time.monotonic() - started:.1f}s")
        yield kafka.bootstrap_servers


def _train(args: argparse.Namespace, workdir: Path) -> Path:
    out = workdir / "model"
    threads, why = _chosen_threads(args.train_threads)
    command = [
        sys.executable, "-m", "kvrec.stream.cli", "train", "--format", args.format,
        "--out", str(out), "--epochs", str(args.train_epochs), *DEMO_MODEL_FLAGS,
        "--seed", str(args.seed), "--threads", str(threads),
    ]
    if args.data:
        command += ["--data", str(args.data)]
    if args.format == "synthetic":
        command += [
            "--synthetic-users", str(args.synthetic_users),
            "--synthetic-items", str(args.synthetic_items),
            "--synthetic-events", str(args.synthetic_events),
        ]
    print(f"demo: training with {threads} torch thread{'s' if threads > 1 else ''} ({why})", flush=True)
    print(f"demo: training a small model: {' '.join(command[3:])}", flush=True)
    started = time.monotonic()
    if subprocess.run(command).returncode != 0:
        raise RunFailed("training the demo model failed (see above)")
    print(f"demo: trained in {time.monotonic() - started:.0f}s", flush=True)
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
        self.latency = Latencies()  # event to the output's broker append time, and the reader's
        self.last_example: str = ""

    def add(self, message: Message, read_ms: float) -> None:
        """One recommendation, read at `read_ms`: its latency is stamped by the broker (the
        output topic's LogAppendTime), not by when this reader got to it (`stream.latency`)."""
        value = message.value()
        if value is None:
            return
        rec = decode_recommendation(value)
        self.count += 1
        self.cold += int(rec.cold_start)
        produced = getattr(rec, "source_ts", None)
        if produced:
            self.latency.add(produced, message, read_ms)
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
        latency, reader = self.latency.percentiles(last=5000)
        hit_rate = self.hits / self.judged if self.judged else 0.0
        return (
            f"{elapsed:6.1f}s  recs {self.count:7d}  {window_count / window_s:7.0f}/s  "
            f"latency p50 {latency['p50']:6.1f} ms  p99 {latency['p99']:6.1f} ms  (reader "
            f"+{reader['p50']:.1f}/+{reader['p99']:.1f})  hit rate {hit_rate:6.2%}  cold {self.cold}"
        )

    def summary(self) -> dict[str, float | str]:
        latency, reader = self.latency.percentiles()
        return {
            "latency_ms_p50": round(latency["p50"], 1),
            "latency_ms_p99": round(latency["p99"], 1),
            "reader_ms_p50": round(reader["p50"], 1),
            "reader_ms_p99": round(reader["p99"], 1),
            "latency_stamp": self.latency.stamp,
        }


class Replay(threading.Thread):
    """`replay_events` in the background; `stats` (or `error`) once it is done."""

    def __init__(
        self, bootstrap: str, topic: str, interactions: Sequence[Interaction], rate: float
    ) -> None:
        super().__init__(name="demo-replay", daemon=True)
        self.args = ({"bootstrap.servers": bootstrap}, topic, interactions, rate)
        self.stats: ReplayStats | None = None
        self.error: str = ""
        self.ended_at = 0.0

    def run(self) -> None:
        try:
            self.stats = replay_events(*self.args, progress=False)
        except KafkaException as exc:
            self.error = kafka_error_text(exc)
        finally:
            self.ended_at = time.monotonic()

    def sent(self) -> int:
        """Events the broker acknowledged; `RunFailed` if the replay could not deliver them."""
        if self.stats is None:
            raise RunFailed(f"the replay failed: {self.error or 'no result'}")
        if self.stats.failed:
            raise RunFailed(f"the replay could not deliver {self.stats.failed} events to Kafka")
        return self.stats.sent


def main(args: argparse.Namespace) -> int:
    if args.format == "sasrec" and args.data is None:
        if not DEFAULT_DATA.exists():
            raise ConfigError(f"no --data given and {DEFAULT_DATA} is missing; try --format synthetic")
        args.data = str(DEFAULT_DATA)
    if args.model:  # checked before the data is read, the model trained or a broker started
        check_artifact_dir(args.model)
    workdir = work_dir(args.workdir, "kvrec-demo-", "kvrec demo")
    interactions: list[Interaction] = dataset_from_args(args)[: args.events]
    model = Path(args.model) if args.model else _train(args, workdir)
    prefix = args.topic_prefix
    if prefix is None:
        prefix = f"demo-{uuid.uuid4().hex[:8]}-" if args.bootstrap_servers else ""
    names = {n: prefix + n for n in ("events", "recommendations", "events-dead-letter")}
    group = f"{prefix}kvrec-worker"
    with _broker(args.bootstrap_servers, workdir) as bootstrap:
        topics = {
            names["events"]: (args.partitions, {}),
            names["recommendations"]: (args.partitions, LOG_APPEND_TIME),
            names["events-dead-letter"]: (1, {}),
            f"{group}-windows-changelog": (args.partitions, {"cleanup.policy": "compact"}),
        }
        ensure_topics({"bootstrap.servers": bootstrap}, topics)
        if prefix:
            print(f"demo: topics {', '.join(topics)}", flush=True)
        port = free_port()
        worker = WorkerProcess(
            [
                sys.executable, "-m", "kvrec.stream.cli", "worker", "--bootstrap-servers", bootstrap,
                "--model", str(model), "--state-dir", str(workdir / "state"),
                "--backend", args.backend, "--metrics-port", str(port), "--log-level", "WARNING",
                "--input-topic", names["events"], "--output-topic", names["recommendations"],
                "--dead-letter-topic", names["events-dead-letter"], "--group-id", group,
            ],
            metrics_port=port,
        )
        try:
            print(f"demo: waiting for the worker (pid {worker.pid}) to be ready ...", flush=True)
            ready_s = worker.wait_until_ready(args.ready_timeout)
            print(
                f"demo: worker ready in {ready_s:.1f}s (pid {worker.pid}, metrics "
                f"http://127.0.0.1:{port}/metrics)",
                flush=True,
            )
            return _replay_and_watch(args, bootstrap, names, interactions, worker, ready_s)
        finally:
            worker.stop()


def _consumer_at_end(bootstrap: str, topic: str) -> Consumer:
    """A consumer of `topic` placed at its current end: it reads exactly what comes next (no
    group join to wait for, so no recommendation is missed at the start)."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"kvrec-demo-{os.getpid()}",
            "enable.auto.commit": False,
        }
    )
    partitions = consumer.list_topics(topic, timeout=10.0).topics[topic].partitions
    ends = [
        TopicPartition(topic, p, consumer.get_watermark_offsets(TopicPartition(topic, p), 10.0)[1])
        for p in sorted(partitions)
    ]
    consumer.assign(ends)
    return consumer


def _replay_and_watch(
    args: argparse.Namespace,
    bootstrap: str,
    names: dict[str, str],
    interactions: list[Interaction],
    worker: WorkerProcess,
    ready_s: float,
) -> int:
    items_by_event = {(i.user_id, i.ts): i.item_id for i in interactions}
    stats = LiveStats(items_by_event)
    consumer = _consumer_at_end(bootstrap, names["recommendations"])
    print(f"demo: replaying {len(interactions)} events at {args.rate:.0f}/s", flush=True)
    replay = Replay(bootstrap, names["events"], interactions, args.rate)
    started = time.monotonic()
    replay.start()
    last_print, last_count = started, 0
    last_arrival = started
    replayed = len(interactions)
    try:
        while True:
            messages = read_available(consumer, 0.2)
            now_ms = time.time() * 1000
            for message in messages:
                if message.error() is None:
                    stats.add(message, now_ms)
            now = time.monotonic()
            if messages:
                last_arrival = now
            if now - last_print >= 1.0:
                print(stats.line(now - started, stats.count - last_count, now - last_print), flush=True)
                if stats.last_example:
                    print(f"        e.g. {stats.last_example}", flush=True)
                    stats.last_example = ""
                last_print, last_count = now, stats.count
            worker.check_alive(f"after {stats.count} of {replayed} recommendations")
            if replay.is_alive():
                continue
            replayed = replay.sent()
            if stats.count >= replayed:
                break
            if now - max(last_arrival, replay.ended_at) > args.settle_timeout:
                break
    finally:
        consumer.close()
    # the run lasts until the last recommendation (or until the watch gave up, if none came)
    elapsed = max((last_arrival if stats.count else time.monotonic()) - started, 1e-9)
    print(json.dumps({
        "events_replayed": replayed,
        "recommendations": stats.count,
        "seconds": round(elapsed, 1),
        "recommendations_per_s": round(stats.count / elapsed, 1),
        **stats.summary(),
        "live_hit_rate": round(stats.hits / stats.judged, 4) if stats.judged else None,
        "cold_start": stats.cold,
        "worker_ready_s": round(ready_s, 1),
    }), flush=True)
    if stats.count < replayed:
        raise RunFailed(
            f"recommendations fell short: {stats.count} of {replayed} arrived, then none for "
            f"{args.settle_timeout:g} s (--settle-timeout); see the worker's output above and "
            f"the {names['events-dead-letter']} topic"
        )
    return 0
