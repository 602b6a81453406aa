"""`kvrec bench swap`: hot model swaps under a continuous replay, measured.

On fresh topics of one broker (`bench.e2e.broker`: `--bootstrap-servers`, else the local
launcher) and a model store in the work directory:
1. model A (`--model`, else trained by `kvrec train` on the first `--slice-lines` lines of
   `--data`) is published and announced (`kvrec models publish A --serve`);
2. two `kvrec worker` subprocesses join one group, exactly-once, `--model-store`, each with
   its own instance id and metrics port, logging to files in the work directory;
3. the dataset slice is replayed at `--rate` events/s through the whole measurement (laps
   after the first shift every time by the slice's time span, so each event's
   (user id, ts) stays unique); a reader of the output topic (read_committed) records every
   recommendation: partition, offset, version, user, event ts, source ts, receive time;
4. timeline: `--steady-s` of steady state; swap 1: `kvrec retrain --once --data <slice>`
   where the command exists (warm-started from the serving model, it publishes and announces
   with reason retrain), else `kvrec models publish B --serve` of a second artifact (A
   trained one more epoch); then `kvrec models rollback`; then `--swaps` more swaps
   alternating the two versions with `kvrec models promote`, every `--swap-every-s`. After
   each, the bench waits until both workers' `kvrec_model_swaps_total` counted it (scraping
   their /metrics) and reads each worker's resident memory (/proc/PID/status VmRSS);
5. the replay stops; the bench waits until every input has its output, stops the workers
   and reports: missing and duplicated recommendations by (user id, event ts); per output
   partition the versions in offset order and how often they change (exactly once per swap:
   each worker switches at one point); event-to-recommendation latency (receive time minus
   `source_ts`, the input message's Kafka timestamp) in the steady phase and in each swap
   window (events whose input time is from the announcement to `--settle-s` after the last
   worker swapped), the ratio of p99s; resident memory after swap 1 and after the last.

Exit status 1 on a correctness failure (a missing or duplicated recommendation, a partition
whose version changes a different number of times than there were swaps); a latency or memory
figure never fails the run: it is measured and reported.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from kvrec import flags
from kvrec.bench.e2e import REPO, broker, produce_paced, reader, stop_process
from kvrec.bench.machine import machine_info
from kvrec.errors import ConfigError, DataError, RunFailed
from kvrec.model.datasets import GAP_MS, Interaction, read_interactions
from kvrec.model.owned import work_dir
from kvrec.model.store import ModelStore
from kvrec.stream.kafka_config import ensure_topics
from kvrec.stream.model_updates import Announcement, ensure_model_topics

DEFAULT_DATA = REPO.parent / "shared" / "datasets" / "amazon-games.txt"
ENV = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
SWAPS_METRIC = "kvrec_model_swaps_total"


# ------------------------------------------------------------------ subprocesses


def kvrec(arguments: Sequence[str], log_path: Path, timeout: float) -> None:
    """Run `kvrec ARGS` to completion, its output appended to `log_path`; RunFailed if it fails."""
    command = start_kvrec(arguments, log_path)
    try:
        command.wait(timeout)
    except subprocess.TimeoutExpired:
        stop_process(command)
    check_exit(command, arguments, log_path)


def start_kvrec(arguments: Sequence[str], log_path: Path) -> subprocess.Popen:
    with open(log_path, "ab") as log:
        log.write(f"\n$ kvrec {' '.join(arguments)}\n".encode())
        log.flush()
        return subprocess.Popen([sys.executable, "-m", "kvrec.stream.cli", *arguments], env=ENV,
                                cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)


def check_exit(command: subprocess.Popen, arguments: Sequence[str], log_path: Path) -> None:
    if command.returncode != 0:
        tail = log_path.read_text(errors="replace")[-2000:]
        raise RunFailed(f"kvrec {' '.join(arguments[:2])} exited with {command.returncode}:\n{tail}")


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Worker:
    """One `kvrec worker` subprocess and its metrics endpoint."""

    name: str
    port: int
    log_path: Path
    process: subprocess.Popen | None = None
    swap_seen_at: list[float] = field(default_factory=list)  # epoch s when swap k was first seen

    def start(self, command: list[str]) -> None:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, env=ENV, cwd=REPO, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)

    def check_alive(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            tail = self.log_path.read_text(errors="replace")[-3000:]
            raise RunFailed(f"worker {self.name} exited with {self.process.returncode}:\n{tail}")

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=2) as reply:
                return reply.status, reply.read().decode()
        except OSError as exc:  # not listening yet, or 503 (urllib raises HTTPError, an OSError)
            return getattr(exc, "code", 0) or 0, ""

    def metric(self, name: str, text: str | None = None) -> float:
        """The sum of a metric's samples (0 when absent)."""
        text = self.get("/metrics")[1] if text is None else text
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name) and line[len(name):len(name) + 1] in (" ", "{"):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def serving_version(self) -> str | None:
        found = re.search(r'kvrec_model_info\{version="([^"]+)"\} 1\.0', self.get("/metrics")[1])
        return found.group(1) if found else None

    def rss_bytes(self) -> int:
        assert self.process is not None
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def stop(self) -> None:
        stop_process(self.process, timeout=30.0)


# ------------------------------------------------------------------ replay and reader


class Replay(threading.Thread):
    """Produce the slice at `rate` events/s until stopped, lap after lap; each lap's times are
    shifted by the slice's span (plus one gap), so (user id, ts) is unique across laps."""

    def __init__(self, bootstrap: str, topic: str, events: Sequence[Interaction], rate: float) -> None:
        super().__init__(name="swap-replay", daemon=True)
        self.topic, self.events, self.rate = topic, events, rate
        self.producer = Producer({"bootstrap.servers": bootstrap, "compression.type": "none",
                                  "linger.ms": 2, "enable.idempotence": True})
        self.producer.list_topics(topic, timeout=10)  # connected before the clock starts
        self.sent: list[tuple[str, int]] = []
        self.stopping = threading.Event()
        self.started_at = 0.0
        self.error: BaseException | None = None

    def laps(self) -> Iterator[Interaction]:
        span = max(e.ts for e in self.events) - min(e.ts for e in self.events) + GAP_MS
        lap = 0
        while True:
            for event in self.events:
                if self.stopping.is_set():
                    return
                shifted = Interaction(event.user_id, event.item_id, event.event_type,
                                      event.ts + lap * span)
                self.sent.append((shifted.user_id, shifted.ts))
                yield shifted
            lap += 1

    def run(self) -> None:
        self.started_at = time.time()
        try:
            produce_paced(self.producer, self.topic, self.laps(), self.rate)  # type: ignore[arg-type]
        except BaseException as exc:  # reported by the main thread
            self.error = exc


class OutputReader(threading.Thread):
    """Every recommendation of the output topic, read_committed, with its receive time."""

    def __init__(self, bootstrap: str, topic: str, partitions: int) -> None:
        super().__init__(name="swap-reader", daemon=True)
        self.consumer: Consumer = reader(bootstrap, topic, partitions)
        self.rows: list[tuple[int, int, str, int, int, str, float]] = []  # see columns()
        self.stopping = threading.Event()
        self.lock = threading.Lock()

    def run(self) -> None:
        while not self.stopping.is_set():
            messages = self.consumer.consume(1000, timeout=0.05)
            now_ms = time.time() * 1000.0
            batch = []
            for message in messages:
                if message.error() is not None:
                    continue
                data = json.loads(message.value())
                batch.append((message.partition(), message.offset(), data["user_id"],
                              int(data["event_ts"]), int(data.get("source_ts") or 0),
                              data["model_version"], now_ms))
            with self.lock:
                self.rows.extend(batch)
        self.consumer.close()

    def keys(self) -> Counter:
        with self.lock:
            return Counter((row[2], row[3]) for row in self.rows)


# ------------------------------------------------------------------ models


def train_artifact(data: Path, out: Path, log_path: Path, args: argparse.Namespace,
                   init_from: Path | None = None) -> Path:
    command = ["train", "--data", str(data), "--format", "sasrec", "--out", str(out),
               "--epochs", str(args.train_epochs), "--d-model", str(args.d_model),
               "--window", str(args.window), "--max-len", str(2 * args.window),
               "--threads", "0", "--dropout", "0.0", "--seed", "1" if init_from else "0"]
    if init_from is not None:
        command += ["--init-from", str(init_from)]
    kvrec(command, log_path, timeout=1800)
    return out


def retrain_available() -> bool:
    from kvrec.stream.cli import COMMANDS

    return "retrain" in COMMANDS


def read_announcements(bootstrap: str, topic: str) -> list[tuple[float, Announcement]]:
    """Every record of the updates topic, in order: (announcement time, epoch s; announcement)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"swap-{uuid.uuid4().hex[:8]}",
                         "enable.auto.commit": False, "isolation.level": "read_committed"})
    high = consumer.get_watermark_offsets(TopicPartition(topic, 0), timeout=10)[1]
    consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
    found: list[tuple[float, Announcement]] = []
    position, deadline = 0, time.monotonic() + 30
    while position < high and time.monotonic() < deadline:
        message = consumer.poll(0.5)
        if message is None or message.error() is not None:
            continue
        position = message.offset() + 1
        announcement = Announcement.from_json(message.value())
        stamp = announcement.announced_ms or message.timestamp()[1]
        found.append((stamp / 1000.0, announcement))
    consumer.close()
    return found


# ------------------------------------------------------------------ the measurement


class Bench:
    def __init__(self, args: argparse.Namespace, bootstrap: str, workdir: Path) -> None:
        self.args, self.bootstrap, self.workdir = args, bootstrap, workdir
        tag = f"swap-{uuid.uuid4().hex[:8]}"
        self.inputs, self.outputs, self.group = f"{tag}-events", f"{tag}-out", f"{tag}-group"
        self.dead_letters = f"{tag}-dlq"
        self.updates, self.stats = f"{tag}-model-updates", f"{tag}-model-live-stats"
        kafka = {"bootstrap.servers": bootstrap}
        ensure_topics(kafka, {
            self.inputs: (args.partitions, {}),
            self.outputs: (args.partitions, {}),
            self.dead_letters: (1, {}),
            f"{self.group}-windows-changelog": (args.partitions, {"cleanup.policy": "compact"}),
        })
        ensure_model_topics(kafka, self.updates, self.stats)
        self.store_root = workdir / "store"
        self.store_root.mkdir(parents=True, exist_ok=True)
        self.store = ModelStore(self.store_root)
        self.cli_log = workdir / "kvrec-commands.log"
        self.workers = [Worker(f"w{n}", free_port(), workdir / f"worker-{n}.log") for n in (1, 2)]
        self.swaps: list[dict[str, Any]] = []

    def models_args(self) -> list[str]:
        return ["--model-store", str(self.store_root), "--updates-topic", self.updates,
                "--stats-topic", self.stats, "--bootstrap-servers", self.bootstrap]

    def worker_command(self, worker: Worker) -> list[str]:
        return [
            sys.executable, "-m", "kvrec.stream.cli", "worker", "--bootstrap-servers", self.bootstrap,
            "--input-topic", self.inputs, "--output-topic", self.outputs,
            "--dead-letter-topic", self.dead_letters, "--group-id", self.group,
            "--instance-id", f"{self.group}-{worker.name}", "--model-store", str(self.store_root),
            "--updates-topic", self.updates, "--stats-topic", self.stats,
            "--state-dir", str(self.workdir / f"state-{worker.name}"),
            "--processing-guarantee", "exactly-once", "--retrieval", self.args.retrieval,
            "--metrics-port", str(worker.port), "--metrics-host", "127.0.0.1",
            "--session-timeout-ms", "10000", "--log-level", "INFO",
        ]

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for worker in self.workers:
                worker.check_alive()
            ready = all(w.get("/ready")[0] == 200 for w in self.workers)
            owned = [w.metric("kvrec_assigned_partitions") for w in self.workers]
            if ready and sum(owned) == self.args.partitions and min(owned) > 0:
                return
            time.sleep(0.5)
        raise RunFailed(f"the two workers were not both ready within {timeout:.0f}s "
                        f"(logs: {', '.join(str(w.log_path) for w in self.workers)})")

    def swap(self, number: int, action: str, arguments: list[str]) -> None:
        """Run the command that makes swap `number` and wait until both workers counted it,
        polling their /metrics (every 0.1 s) while the command still runs."""
        triggered = time.time()
        command = start_kvrec(arguments, self.cli_log)
        deadline = time.monotonic() + self.args.swap_timeout_s
        try:
            while True:
                for worker in self.workers:
                    worker.check_alive()
                    if len(worker.swap_seen_at) < number and worker.metric(SWAPS_METRIC) >= number:
                        worker.swap_seen_at.append(time.time())
                if command.poll() is not None:
                    check_exit(command, arguments, self.cli_log)
                    if all(len(w.swap_seen_at) >= number for w in self.workers):
                        break
                if time.monotonic() > deadline:
                    seen = {w.name: w.metric(SWAPS_METRIC) for w in self.workers}
                    raise RunFailed(f"swap {number}: not done within "
                                    f"{self.args.swap_timeout_s:.0f}s (swaps counted: {seen})")
                time.sleep(0.1)
        finally:
            stop_process(command)
        time.sleep(1.0)  # the old model's memory is released right after the swap
        self.swaps.append({
            "swap": number, "action": action, "triggered_s": triggered,
            "worker_swapped_s": {w.name: w.swap_seen_at[number - 1] for w in self.workers},
            "serving": {w.name: w.serving_version() for w in self.workers},
            "rss_bytes": {w.name: w.rss_bytes() for w in self.workers},
        })
        rss = ", ".join(f"{n} {b / 2**20:.0f} MiB" for n, b in self.swaps[-1]["rss_bytes"].items())
        print(f"swap {number:2d} ({action}): both workers serve "
              f"{self.swaps[-1]['serving']['w1']} ({time.time() - triggered:.1f}s after the "
              f"command started); RSS {rss}", flush=True)

    def run(self, model_a: Path, model_b: Path | None, slice_file: Path,
            events: Sequence[Interaction]) -> dict[str, Any]:
        args = self.args
        kvrec(["models", "publish", str(model_a), "--serve", *self.models_args()], self.cli_log, 300)
        version_a = self.store.versions()[-1].version
        for worker in self.workers:
            worker.start(self.worker_command(worker))
        output = OutputReader(self.bootstrap, self.outputs, args.partitions)
        replay = Replay(self.bootstrap, self.inputs, events, args.rate)
        try:
            self.wait_ready(args.ready_timeout_s)
            rss_before = {w.name: w.rss_bytes() for w in self.workers}
            output.start()
            replay.start()
            time.sleep(args.steady_s)
            steady_end = time.time()
            if model_b is None:
                first = ["retrain", "--once", "--data", str(slice_file), "--format", "sasrec",
                         "--margin", "1", "--epochs", "1", "--web-port", "0",
                         "--max-len", str(2 * args.window), "--threads", "1",
                         "--state-dir", str(self.workdir / "retrain-state"),
                         "--input-topic", self.inputs, *self.models_args()[:4],
                         "--bootstrap-servers", self.bootstrap]
                self.swap(1, "retrain", first)
            else:
                self.swap(1, "publish --serve",
                          ["models", "publish", str(model_b), "--serve", *self.models_args()])
            version_b = next(v.version for v in self.store.versions() if v.version != version_a)
            time.sleep(args.phase_s)
            self.swap(2, "rollback", ["models", "rollback", *self.models_args()])
            for n in range(args.swaps):
                time.sleep(args.swap_every_s)
                target = version_b if n % 2 == 0 else version_a
                self.swap(3 + n, f"promote {target}", ["models", "promote", target, *self.models_args()])
            time.sleep(args.settle_s)
            replay.stopping.set()
            replay.join(120)
            if replay.error is not None:
                raise RunFailed(f"the replay failed: {replay.error!r}")
            replay_end = time.time()
            expected = set(replay.sent)
            deadline = time.monotonic() + args.drain_timeout_s
            while time.monotonic() < deadline and not expected <= set(output.keys()):
                for worker in self.workers:
                    worker.check_alive()
                time.sleep(0.5)
            time.sleep(2.0)  # a late duplicate would show here
        finally:
            replay.stopping.set()
            for worker in self.workers:
                worker.stop()
            output.stopping.set()
            output.join(30)
        inputs_in_topic = self.topic_size(self.inputs)
        announcements = read_announcements(self.bootstrap, self.updates)
        return self.report(replay, output, announcements, inputs_in_topic, steady_end,
                           replay_end, rss_before, version_a, version_b,
                           retrain=model_b is None)

    def topic_size(self, topic: str) -> int:
        consumer = Consumer({"bootstrap.servers": self.bootstrap, "group.id": "swap-size",
                             "enable.auto.commit": False})
        size = 0
        for p in range(self.args.partitions):
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            size += high - low
        consumer.close()
        return size

    def report(self, replay: Replay, output: OutputReader,
               announcements: list[tuple[float, Announcement]], inputs_in_topic: int,
               steady_end: float, replay_end: float, rss_before: dict[str, int],
               version_a: str, version_b: str, *, retrain: bool) -> dict[str, Any]:
        args = self.args
        rows = sorted(output.rows, key=lambda row: (row[0], row[1]))
        counts = Counter((row[2], row[3]) for row in rows)
        sent = set(replay.sent)
        missing = len(sent - set(counts))
        duplicated = sum(c - 1 for c in counts.values() if c > 1)
        unexpected = len(set(counts) - sent)
        partitions = {}
        for partition in range(args.partitions):
            runs: list[dict[str, Any]] = []
            for row in rows:
                if row[0] != partition:
                    continue
                if runs and runs[-1]["version"] == row[5]:
                    runs[-1]["outputs"] += 1
                else:
                    runs.append({"version": row[5], "first_offset": row[1], "outputs": 1})
            partitions[str(partition)] = {"version_changes": max(0, len(runs) - 1), "runs": runs}
        swaps_total = len(self.swaps)
        # announcement i + 1 made swap i (record 0 is the first publish)
        serving_changes = [a for a in announcements if a[1].reason != "shadow"]
        source_s = np.array([row[4] / 1000.0 for row in rows])
        latency_ms = np.array([row[6] - row[4] for row in rows])

        def window(start: float, end: float) -> dict[str, Any]:
            chosen = latency_ms[(source_s >= start) & (source_s < end)]
            if not len(chosen):
                return {"start_s": start, "end_s": end, "events": 0}
            return {"start_s": start, "end_s": end, "events": len(chosen),
                    "p50_ms": float(np.percentile(chosen, 50)),
                    "p99_ms": float(np.percentile(chosen, 99)), "max_ms": float(chosen.max())}

        steady = window(replay.started_at + args.warmup_s, steady_end)
        for swap in self.swaps:
            index = swap["swap"]
            announced = (serving_changes[index][0] if index < len(serving_changes)
                         else swap["triggered_s"])
            swap["announced_s"] = announced
            known = index < len(serving_changes)
            swap["reason"] = serving_changes[index][1].reason if known else None
            swap["announced_version"] = serving_changes[index][1].version if known else None
            last = max(swap["worker_swapped_s"].values())
            swap["latency"] = window(announced, last + args.settle_s)
            if steady.get("p99_ms") and swap["latency"].get("p99_ms"):
                swap["latency"]["p99_over_steady_p99"] = swap["latency"]["p99_ms"] / steady["p99_ms"]
            swap["seconds_announce_to_last_swap"] = last - announced
        training = None
        if retrain and self.swaps:
            training = window(self.swaps[0]["triggered_s"], self.swaps[0]["announced_s"])
        ratios = [s["latency"].get("p99_over_steady_p99") for s in self.swaps]
        ratios = [r for r in ratios if r is not None]
        rss = {
            w.name: {
                "before_swap_1": rss_before[w.name],
                "after_swap_1": self.swaps[0]["rss_bytes"][w.name],
                "after_last_swap": self.swaps[-1]["rss_bytes"][w.name],
                "last_over_first": self.swaps[-1]["rss_bytes"][w.name]
                / self.swaps[0]["rss_bytes"][w.name],
                "by_swap": [s["rss_bytes"][w.name] for s in self.swaps],
            }
            for w in self.workers
        }
        changes_ok = all(p["version_changes"] == swaps_total for p in partitions.values())
        served_as_announced = all(
            set(swap["serving"].values()) == {swap["announced_version"]} for swap in self.swaps
        )
        correct = (missing == 0 and duplicated == 0 and unexpected == 0 and changes_ok
                   and served_as_announced)
        start = replay.started_at
        return {
            "benchmark": "hot model swaps under a fixed-rate replay, two exactly-once workers",
            "machine": machine_info(),
            "settings": {
                "rate": args.rate, "partitions": args.partitions, "workers": 2,
                "steady_s": args.steady_s, "warmup_s": args.warmup_s, "phase_s": args.phase_s,
                "swaps_after_rollback": args.swaps, "swap_every_s": args.swap_every_s,
                "settle_s": args.settle_s, "slice_lines": args.slice_lines,
                "data": str(args.data), "retrieval": args.retrieval,
                "model": str(args.model) if args.model else "trained by kvrec train",
                "first_swap": "kvrec retrain --once --data" if retrain
                else "kvrec models publish B --serve (no kvrec retrain command in this checkout)",
                "broker": "given" if args.bootstrap_servers else "local launcher",
                "latency": "bench receive time - source_ts (the input message's Kafka "
                           "timestamp), same machine clock",
                "steady_window": "input times from replay start + warmup_s to the start of swap 1",
                "swap_window": "input times from the announcement (announced_ms of its record "
                               "on the updates topic) to settle_s after the last worker counted "
                               "the swap (its kvrec_model_swaps_total, polled every 0.1 s)",
                "rss": "VmRSS of each worker process, 1 s after both counted the swap",
            },
            "versions": {"A": version_a, "B": version_b},
            "correctness": {
                "inputs": len(replay.sent), "inputs_in_topic": inputs_in_topic,
                "outputs": len(rows), "distinct_outputs": len(counts), "missing": missing,
                "duplicated": duplicated, "unexpected": unexpected, "swaps": swaps_total,
                "version_changes_by_partition": {p: v["version_changes"]
                                                 for p, v in partitions.items()},
                "each_partition_switches_once_per_swap": changes_ok,
                "both_workers_serve_each_announced_version": served_as_announced, "ok": correct,
            },
            "latency_ms": {
                "steady": steady, "retrain_training": training,
                "worst_swap_p99_over_steady_p99": max(ratios) if ratios else None,
                "target_p99_within_2x": (max(ratios) <= 2.0) if ratios else None,
            },
            "rss_bytes": rss,
            "rss_worst_last_over_first": max(r["last_over_first"] for r in rss.values()),
            "swaps": self.swaps,
            "partitions": partitions,
            "replay_started_s": start,
            "replay_seconds": replay_end - start,
            "per_second": per_second(source_s - start, latency_ms),
            "series": {  # for the plot: per output, seconds since the replay start and latency
                "input_s": [round(float(s - start), 3) for s in source_s],
                "latency_ms": [round(float(x), 1) for x in latency_ms],
            },
        }


# ------------------------------------------------------------------ output


def per_second(input_s: np.ndarray, latency_ms: np.ndarray) -> dict[str, list[float]]:
    """p50 and p99 of the outputs whose input fell in each second of the replay."""
    second = np.floor(input_s).astype(np.int64)
    found: dict[str, list[float]] = {"second": [], "events": [], "p50_ms": [], "p99_ms": []}
    for value in np.unique(second):
        chosen = latency_ms[second == value]
        found["second"].append(float(value) + 0.5)
        found["events"].append(float(len(chosen)))
        found["p50_ms"].append(round(float(np.percentile(chosen, 50)), 1))
        found["p99_ms"].append(round(float(np.percentile(chosen, 99)), 1))
    return found


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = report["series"]
    t, lat = np.array(series["input_s"]), np.array(series["latency_ms"])
    start = report["replay_started_s"]
    figure, (axis, memory) = plt.subplots(2, 1, figsize=(13, 8), height_ratios=[2, 1])
    axis.scatter(t, np.maximum(lat, 0.1), s=1, alpha=0.15, color="C0", label="one recommendation")
    seconds = report["per_second"]
    axis.plot(seconds["second"], seconds["p99_ms"], color="C3", lw=1, label="p99 per second")
    steady = report["latency_ms"]["steady"]
    axis.axvspan(steady["start_s"] - start, steady["end_s"] - start, color="C2", alpha=0.1,
                 label=f"steady: p99 {steady.get('p99_ms', 0):.0f} ms")
    for swap in report["swaps"]:
        window = swap["latency"]
        axis.axvspan(window["start_s"] - start, window["end_s"] - start, color="C1", alpha=0.15)
        axis.axvline(swap["announced_s"] - start, color="C1", lw=0.8)
        axis.text(swap["announced_s"] - start, 1.01, str(swap["swap"]),
                  transform=axis.get_xaxis_transform(), fontsize=7, ha="center")
    axis.set_yscale("log")
    axis.set_xlabel("input time, s since the replay started (orange: swap windows, numbered)")
    axis.set_ylabel("event to recommendation, ms (log)")
    ratio = report["latency_ms"]["worst_swap_p99_over_steady_p99"]
    axis.set_title(f"latency: worst swap-window p99 / steady p99 = {ratio:.2f}" if ratio else "latency")
    axis.legend(fontsize=8, loc="upper left")
    for name, rss in report["rss_bytes"].items():
        memory.plot(range(1, len(rss["by_swap"]) + 1), np.array(rss["by_swap"]) / 2**20,
                    marker="o", label=f"{name} (last/first {rss['last_over_first']:.3f})")
    memory.set_xticks(range(1, len(report["swaps"]) + 1))
    memory.set_xlabel("swap")
    memory.set_ylabel("worker RSS, MiB")
    memory.legend(fontsize=8)
    settings, machine = report["settings"], report["machine"]
    correctness = report["correctness"]
    figure.suptitle(
        f"kvrec bench swap: {settings['rate']:.0f} ev/s, 2 exactly-once workers, "
        f"{correctness['swaps']} swaps; missing {correctness['missing']}, duplicated "
        f"{correctness['duplicated']}; {machine['cores']} cores, {machine['date_utc'][:10]}"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def summary(report: dict[str, Any]) -> str:
    c, latency = report["correctness"], report["latency_ms"]
    steady = latency["steady"]
    lines = [
        f"inputs {c['inputs']} (topic {c['inputs_in_topic']}), outputs {c['outputs']}, missing "
        f"{c['missing']}, duplicated {c['duplicated']}; version changes per partition "
        f"{c['version_changes_by_partition']} for {c['swaps']} swaps: "
        f"{'OK' if c['ok'] else 'FAILED'}",
        f"steady p50 {steady.get('p50_ms', float('nan')):.1f} ms, p99 "
        f"{steady.get('p99_ms', float('nan')):.1f} ms ({steady['events']} events)",
    ]
    for swap in report["swaps"]:
        w = swap["latency"]
        lines.append(
            f"swap {swap['swap']:2d} {swap['action']:<34} p50 {w.get('p50_ms', float('nan')):7.1f}"
            f"  p99 {w.get('p99_ms', float('nan')):7.1f} ms  ({w['events']} events, "
            f"{swap['seconds_announce_to_last_swap']:.1f}s announce->last swap, p99/steady "
            f"{w.get('p99_over_steady_p99', float('nan')):.2f})"
        )
    if latency["retrain_training"]:
        t = latency["retrain_training"]
        lines.append(f"during the retrain's training (before it announced): p50 "
                     f"{t.get('p50_ms', float('nan')):.1f} ms, p99 {t.get('p99_ms', float('nan')):.1f} ms")
    lines.append(f"worst swap p99 / steady p99: {latency['worst_swap_p99_over_steady_p99']:.2f} "
                 f"(target 2x: {'met' if latency['target_p99_within_2x'] else 'MISSED'})")
    for name, rss in report["rss_bytes"].items():
        lines.append(f"{name} RSS after swap 1 {rss['after_swap_1'] / 2**20:.0f} MiB, after swap "
                     f"{len(rss['by_swap'])} {rss['after_last_swap'] / 2**20:.0f} MiB "
                     f"(x{rss['last_over_first']:.3f})")
    return "\n".join(lines)


# ------------------------------------------------------------------ command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", required=True, help="output JSON")
    parser.add_argument("--plot", default=None, help="output PNG: latency over time, RSS by swap")
    parser.add_argument("--bootstrap-servers", default=None, help="default: start a local broker")
    parser.add_argument("--workdir", default=None, help="default: a temporary directory")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="sasrec-format dataset file")
    parser.add_argument("--slice-lines", type=flags.integer(10), default=30_000,
                        help="the first N lines of --data: trained on and replayed (in laps)")
    parser.add_argument("--model", default=None,
                        help="model A's artifact (default: kvrec train on the slice)")
    parser.add_argument("--swap-with", default="auto", choices=("auto", "retrain", "publish"),
                        help="swap 1: kvrec retrain --once (auto: when the command exists) or "
                             "publish of a second artifact (A trained one more epoch)")
    parser.add_argument("--train-epochs", type=flags.integer(1), default=1)
    parser.add_argument("--d-model", type=flags.integer(8), default=32)
    parser.add_argument("--window", type=flags.integer(2), default=10)
    parser.add_argument("--rate", type=flags.number(above=0), default=400.0, help="events/s")
    parser.add_argument("--partitions", type=flags.integer(1), default=4)
    parser.add_argument("--retrieval", default="exact", choices=("exact", "auto"))
    parser.add_argument("--steady-s", type=flags.number(above=0), default=30.0)
    parser.add_argument("--warmup-s", type=flags.number(0), default=5.0,
                        help="the start of the steady phase left out (cold windows and caches)")
    parser.add_argument("--phase-s", type=flags.number(0), default=10.0,
                        help="between swap 1 and the rollback")
    parser.add_argument("--swaps", type=flags.integer(0), default=10,
                        help="swaps after the rollback, alternating the two versions (promote)")
    parser.add_argument("--swap-every-s", type=flags.number(0), default=10.0)
    parser.add_argument("--settle-s", type=flags.number(0), default=3.0,
                        help="a swap window ends this long after the last worker swapped")
    parser.add_argument("--swap-timeout-s", type=flags.number(above=0), default=300.0)
    parser.add_argument("--ready-timeout-s", type=flags.number(above=0), default=180.0)
    parser.add_argument("--drain-timeout-s", type=flags.number(above=0), default=180.0)


def main(args: argparse.Namespace) -> int:
    data = Path(args.data)
    if not data.is_file():
        raise DataError(f"--data {data}: no such file")
    use_retrain = args.swap_with == "retrain" or (args.swap_with == "auto" and retrain_available())
    if use_retrain and not retrain_available():
        raise ConfigError("--swap-with retrain: this checkout has no `kvrec retrain` command")
    workdir = work_dir(args.workdir, "kvrec-swap-", "kvrec bench swap")
    slice_file = workdir / "slice.txt"
    with data.open() as source, slice_file.open("w") as target:
        for number, line in enumerate(source):
            if number >= args.slice_lines:
                break
            target.write(line)
    events = read_interactions(slice_file, "sasrec")
    train_log = workdir / "train.log"
    started = time.monotonic()
    model_a = Path(args.model) if args.model else train_artifact(slice_file, workdir / "A", train_log, args)
    model_b = None if use_retrain else train_artifact(slice_file, workdir / "B", train_log, args,
                                                      init_from=model_a)
    print(f"models ready in {time.monotonic() - started:.0f}s; {len(events)} events a lap at "
          f"{args.rate:.0f} ev/s; work dir {workdir}", flush=True)
    with broker(args.bootstrap_servers, workdir) as bootstrap:
        report = Bench(args, bootstrap, workdir).run(model_a, model_b, slice_file, events)
    report["workdir"] = str(workdir)
    if args.plot:
        plot(report, Path(args.plot))
    del report["series"]  # every output's latency: the plot's scatter, too big for the JSON
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=1))
    print(summary(report), flush=True)
    return 0 if report["correctness"]["ok"] else 1
