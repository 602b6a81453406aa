"""`kvrec bench takeover`: how long a partition that moves takes to serve again, with and
without a standby copy (`--standby-replicas`), in one run, and what the standby costs.

For each size N: a compacted changelog partition gets N window records as a worker's
checkpoints write them, and the group commits their input offsets. Then, through the worker's
own code (stream/worker/standby.py, recovery.py):

- the standby: a `StandbyReplicas` follows the partition from nothing and tails it to the end
  (its catch-up time, the memory it added, its store's size on disk, the bytes it read);
- `--tail` more records are written and committed while the standby does not poll (it is
  behind when the partition moves, as a real one is by up to one poll);
- with a standby (a kill -9 whose partitions go to a member that shadows them): the
  assignment's `hand_over` promotes the standby and the restore reads the tail;
- without one (a scale-up: the new member has no copy; or no standbys at all): a full restore
  into an empty store;
- the two stores are compared window for window (the promoted one must equal the full
  restore).

The time is from the assignment to the partition restored: the next consumed batch is its
first recommendation. Events delayed = `--rate` (events/s of the partition) x that time.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, Producer, TopicPartition

from kvrec.bench.e2e import broker
from kvrec.bench.machine import machine_info
from kvrec.bench.restore import _window, write_changelog
from kvrec.errors import ConfigError
from kvrec.flags import integer, number
from kvrec.model.owned import claim_dir
from kvrec.state.changelog import ChangelogRecord
from kvrec.state.partition import WorkerState
from kvrec.state.store import WindowStore
from kvrec.stream.kafka_config import ensure_topics
from kvrec.stream.worker.recovery import recover_partition, restore_consumer_config
from kvrec.stream.worker.standby import StandbyReplicas, standby_consumer_config

_TEMPLATES = 1_000  # distinct windows written round-robin (building each is the slow part)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", required=True, help="output JSON")
    parser.add_argument("--windows", default="100000,1000000",
                        help="windows in the moved partition, comma-separated")
    parser.add_argument("--events-per-window", type=integer(1), default=99)
    parser.add_argument("--tail", type=integer(0), default=2_000,
                        help="records written after the standby's last poll")
    parser.add_argument("--rate", type=number(0.0), default=500.0,
                        help="the partition's input rate (events/s), for the events delayed")
    parser.add_argument("--bootstrap-servers", default=None, help="default: start a local broker")
    parser.add_argument("--workdir", default=None, help="default: a temporary directory")


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _disk_mib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def _write(bootstrap: str, topic: str, users: range, input_offset: int, events: int) -> int:
    templates = [_window(u, events) for u in range(min(_TEMPLATES, len(users)))]
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20,
                         "compression.type": "lz4"})
    records = (ChangelogRecord(f"user-{user}", templates[user % len(templates)], input_offset + n)
               for n, user in enumerate(users))
    return write_changelog(producer, topic, records, flush_s=300)


def _commit(bootstrap: str, group: str, topic: str, offset: int) -> None:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    consumer.commit(offsets=[TopicPartition(topic, 0, offset)], asynchronous=False)
    consumer.close()


def _digest(state: WorkerState) -> tuple[int, str]:
    windows = state.open(0)
    digest, count = hashlib.sha256(), 0
    for user, raw in windows.store.items():
        digest.update(user.encode() + b"\0" + raw)
        count += 1
    digest.update(str(windows.changelog_offset()).encode())
    state.close_all()
    return count, digest.hexdigest()


def _restore(bootstrap: str, topic: str, group: str, state: WorkerState, committed: int,
             store: WindowStore | None = None) -> float:
    consumer = Consumer(restore_consumer_config({"bootstrap.servers": bootstrap}, group))
    try:
        started = time.perf_counter()
        recover_partition(consumer, topic, state.open(0, store), committed)
        return time.perf_counter() - started
    finally:
        consumer.close()
        state.close_all()


def _standby(bootstrap: str, names: dict[str, str], state: WorkerState, windows: int
             ) -> tuple[StandbyReplicas, dict[str, float]]:
    rss = _rss_mib()
    consumer = Consumer(standby_consumer_config({"bootstrap.servers": bootstrap}, names["group"]))
    standbys = StandbyReplicas(consumer, names["changelog"], names["input"], state.path)
    started = time.perf_counter()
    standbys.follow([0])
    while standbys.offsets()[0] != windows - 1:
        if time.perf_counter() - started > 900:
            raise RuntimeError(f"the standby did not catch up: {standbys.offsets()}")
        if not standbys.poll():
            time.sleep(0.01)
    return standbys, {"standby_catch_up_s": round(time.perf_counter() - started, 3),
                      "standby_rss_mib": round(_rss_mib() - rss, 1),
                      "standby_disk_mib": round(_disk_mib(standbys.path(0)), 1)}


def measure(bootstrap: str, workdir: Path, windows: int, args: argparse.Namespace) -> dict[str, Any]:
    run = uuid.uuid4().hex[:8]
    names = {"changelog": f"bench-takeover-{run}-changelog", "input": f"bench-takeover-{run}",
             "group": f"bench-takeover-{run}"}
    ensure_topics({"bootstrap.servers": bootstrap},
                  {names["changelog"]: (1, {"cleanup.policy": "compact"}),
                   names["input"]: (1, {})})
    events = args.events_per_window
    size = _write(bootstrap, names["changelog"], range(windows), 0, events)
    _commit(bootstrap, names["group"], names["input"], windows)
    promoted_state = WorkerState(workdir / run / "standby-member", names["group"], names["input"],
                                 events)
    standbys, cost = _standby(bootstrap, names, promoted_state, windows)
    # the tail: users updated after the standby's last poll (it is behind at the takeover)
    _write(bootstrap, names["changelog"], range(args.tail), windows, events)
    committed = windows + args.tail
    _commit(bootstrap, names["group"], names["input"], committed)
    started = time.perf_counter()
    store = standbys.hand_over(0)  # the assignment: the open store, then the tail
    with_standby = time.perf_counter() - started
    with_standby += _restore(bootstrap, names["changelog"], names["group"], promoted_state,
                             committed, store)
    standbys.close()
    full_state = WorkerState(workdir / run / "new-member", names["group"], names["input"], events)
    without = _restore(bootstrap, names["changelog"], names["group"], full_state, committed)
    promoted, full = _digest(promoted_state), _digest(full_state)
    if promoted != full:
        raise RuntimeError(f"the promoted standby differs from the full restore: {promoted} "
                           f"!= {full}")
    return {
        "windows": windows, "events_per_window": events, "changelog_bytes": size,
        "tail_records": args.tail,
        "takeover_with_standby_s": round(with_standby, 3),
        "takeover_without_standby_s": round(without, 3),
        "speedup": round(without / with_standby, 1),
        "events_delayed_with_standby": round(args.rate * with_standby),
        "events_delayed_without_standby": round(args.rate * without),
        "promoted_equals_full_restore": True, "windows_compared": full[0],
        **cost,
        "standby_catch_up_read_bytes": size,
    }


def main(args: argparse.Namespace) -> int:
    try:
        sizes = [int(n) for n in args.windows.split(",") if n.strip()]
    except ValueError:
        raise ConfigError(f"--windows {args.windows!r}: comma-separated integers") from None
    if not sizes or min(sizes) <= 0:
        raise ConfigError("--windows must be positive")
    with tempfile.TemporaryDirectory() as scratch:
        workdir = claim_dir(args.workdir or scratch, "--workdir", "kvrec bench takeover")
        with broker(args.bootstrap_servers, workdir) as bootstrap:
            results = []
            for windows in sizes:
                results.append(measure(bootstrap, workdir, windows, args))
                print(json.dumps(results[-1]), flush=True)
    report = {"benchmark": "takeover", "machine": machine_info(),
              "load_average": os.getloadavg(), "results": results,
              "command": f"kvrec bench takeover --windows {args.windows} --events-per-window "
                         f"{args.events_per_window} --tail {args.tail} --rate {args.rate:g}"}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0
