"""`kvrec bench restore`: how long a worker takes to restore a partition's windows from its
changelog topic, against the number of windows (what a rebalance or a lost volume costs).

For each size N: a fresh compacted changelog partition gets N window records as a worker's
checkpoint writes them (windows of `--events-per-window` events, the input-offset header), and
`stream.worker.recovery.recover_partition` restores them into an empty RocksDB store through a
fresh consumer, exactly as a worker does on assignment. Reported: seconds, windows/s, MB/s.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, Producer

from kvrec.bench.e2e import broker
from kvrec.bench.machine import machine_info
from kvrec.errors import ConfigError
from kvrec.flags import integer
from kvrec.model.owned import claim_dir
from kvrec.state.changelog import ChangelogRecord
from kvrec.state.partition import WorkerState
from kvrec.state.window import Window, WindowEvent
from kvrec.stream.kafka_config import ensure_topics
from kvrec.stream.worker.recovery import recover_partition, restore_consumer_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", required=True, help="output JSON")
    parser.add_argument("--windows", default="10,1000,10000,100000",
                        help="changelog sizes to restore (windows), comma-separated")
    parser.add_argument("--events-per-window", type=integer(1), default=99,
                        help="events in each window (99 = N*(W-1)+1 for 2 layers, W=50)")
    parser.add_argument("--bootstrap-servers", default=None, help="default: start a local broker")
    parser.add_argument("--workdir", default=None, help="default: a temporary directory")


def _window(user: int, events: int) -> bytes:
    window = Window(events)
    for i in range(events):
        window.apply(WindowEvent(f"i{(user * 31 + i * 7) % 100_000}", 1 + i % 4,
                                 1_700_000_000_000 + i, user * events + i))
    return window.to_bytes()


def write_changelog(producer: Producer, topic: str, records: Iterable[ChangelogRecord],
                    flush_s: float) -> int:
    """Produce `records` to partition 0 of `topic` as a worker's checkpoints write them (waiting
    out a full queue); the bytes of their windows."""
    size = 0
    for record in records:
        size += len(record.window)
        while True:
            try:
                producer.produce(topic, key=record.key, value=record.window, partition=0,
                                 headers=record.headers)
                break
            except BufferError:
                producer.poll(0.1)
        producer.poll(0)
    if producer.flush(flush_s):
        raise RuntimeError("the changelog could not be written")
    return size


def _fill(bootstrap: str, topic: str, windows: int, events: int) -> int:
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20,
                         "compression.type": "lz4"})
    records = (ChangelogRecord(f"user-{user}", _window(user, events), user)  # as a checkpoint
               for user in range(windows))
    return write_changelog(producer, topic, records, flush_s=120)


def measure(bootstrap: str, workdir: Path, windows: int, events: int) -> dict[str, Any]:
    topic = f"bench-restore-{uuid.uuid4().hex[:8]}"
    ensure_topics({"bootstrap.servers": bootstrap}, {topic: (1, {"cleanup.policy": "compact"})})
    size = _fill(bootstrap, topic, windows, events)
    state = WorkerState(workdir / topic, "bench-restore", "events", events)
    restore_consumer = Consumer(  # as the worker's own restore consumer
        restore_consumer_config({"bootstrap.servers": bootstrap}, topic)
    )
    try:
        started = time.perf_counter()
        result = recover_partition(restore_consumer, topic, state.open(0), windows + 1)
        seconds = time.perf_counter() - started
    finally:
        restore_consumer.close()
        state.close_all()
    if result.restored != windows:
        raise RuntimeError(f"restored {result.restored} of {windows} windows")
    return {
        "windows": windows,
        "events_per_window": events,
        "bytes": size,
        "seconds": round(seconds, 4),
        "windows_per_s": round(windows / seconds, 1),
        "mb_per_s": round(size / seconds / 1e6, 2),
    }


def main(args: argparse.Namespace) -> int:
    try:
        sizes = [int(n) for n in args.windows.split(",") if n.strip()]
    except ValueError:
        raise ConfigError(f"--windows {args.windows!r}: comma-separated integers") from None
    if not sizes or min(sizes) <= 0 or args.events_per_window <= 0:
        raise ConfigError("--windows and --events-per-window must be positive")
    with tempfile.TemporaryDirectory() as scratch:
        workdir = claim_dir(args.workdir or scratch, "--workdir", "kvrec bench restore")
        with broker(args.bootstrap_servers, workdir) as bootstrap:
            results = []
            for windows in sizes:
                results.append(measure(bootstrap, workdir, windows, args.events_per_window))
                print(json.dumps(results[-1]), flush=True)
    report = {"benchmark": "restore", "machine": machine_info(), "results": results,
              "command": "kvrec bench restore " + f"--windows {args.windows} "
                         f"--events-per-window {args.events_per_window}"}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0
