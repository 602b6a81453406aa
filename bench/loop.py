"""`kvrec bench loop`: the worker's own ceiling, without a broker: `Worker.process` on
micro-batches of real encoded events, in this process, with in-memory stand-ins for its three
Kafka clients (the ones the property tests use), real RocksDB windows, the real model and
retrieval. It separates the loop from the broker and the client: what `kvrec bench e2e`
measures on top of this is Kafka's.

    kvrec bench loop --json OUT.json [--items 100000] [--users 1000] [--batch 512]
                     [--profile] [-- worker flags...]

The model is `kvrec bench e2e`'s (random weights, a clustered catalog, d=64, 2 layers, W=50).
The process is set up as `kvrec worker` sets up its own: torch on `--threads` threads (1 by
default; pass `-- --threads N` to change it) and the cyclic garbage collector's long-lived
objects frozen, with its higher threshold, before the timed batches (`app.freeze_heap`).
`--warmup-batches` batches fill the windows and caches first; then `--batches` batches are
timed (a checkpoint every 10, as a 1 s commit interval does at a few thousand events/s). With
`--profile`, a second pass runs under cProfile and the JSON gets each stage's share of the
profiled time (the profiler's overhead inflates Python-heavy stages; the shares are for
finding the largest, the throughput comes from the unprofiled pass); each share is also given in
µs an event of the unprofiled pass (share x its µs an event), as docs/e2e.md's tables do.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import json
import pstats
import time
from pathlib import Path
from typing import Any

import numpy as np

from kvrec import flags
from kvrec.bench.e2e import build_artifact
from kvrec.bench.machine import machine_info
from kvrec.model.owned import work_dir

# (stage, (file, function) pairs whose cumulative profiled time is that stage's); indented
# stages are parts of the one above them
STAGES = (
    ("process (whole batch)", (("stream/worker/loop.py", "process"),)),
    ("validate and decode JSON", (("stream/worker/loop.py", "_validate"),)),
    ("recommend (model + retrieval)", (("stream/worker/inference.py", "recommend"),)),
    # the worker's calls on its cache pool (`extend_into` runs `_extend`, never `extend`)
    ("  model: extend/step", (("model/encoder.py", "extend"), ("model/encoder.py", "extend_into"))),
    ("  model: refill encode", (("model/encoder.py", "encode"),)),
    ("  retrieval", (("model/retrieval.py", "search"), ("model/gpu_retrieval.py", "search"))),
    ("encode outputs (wire)", (("stream/worker/loop.py", "_encode_batch"),)),
    ("windows: apply", (("state/window.py", "apply"),)),
    ("produce", (("stream/worker/produce.py", "produce"),)),
    ("checkpoint", (("stream/worker/checkpoint.py", "commit"),)),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", required=True, help="write the result here")
    parser.add_argument("--items", type=flags.integer(2), default=100_000)
    parser.add_argument("--window", type=flags.integer(1), default=50)
    parser.add_argument("--users", type=flags.integer(1), default=1_000)
    parser.add_argument("--batch", type=flags.integer(1), default=512, help="events per batch")
    parser.add_argument("--batches", type=flags.integer(1), default=40, help="timed batches")
    parser.add_argument("--warmup-batches", type=flags.integer(0), default=60)
    parser.add_argument("--profile", action="store_true", help="add a profiled pass")
    parser.add_argument("--workdir", default=None, help="default: a temporary directory")
    parser.add_argument("worker_flags", nargs=argparse.REMAINDER,
                        help="after --: flags for the worker (e.g. --backend onnx-cpu)")


def _worker(model: Path, state_dir: Path, worker_flags: list[str]) -> Any:
    from confluent_kafka import TopicPartition

    from kvrec.stream.worker.app import add_arguments as worker_arguments
    from kvrec.stream.worker.app import build_recommender, resolve_window_capacity
    from kvrec.stream.worker.loop import KafkaClients, Worker
    from kvrec.stream.worker.metrics import HealthState, WorkerMetrics
    from kvrec.stream.worker.settings import WorkerSettings
    from tests.fake_kafka import FakeConsumer, FakeProducer, FakeRestoreConsumer

    parser = argparse.ArgumentParser()
    worker_arguments(parser)
    args = parser.parse_args(["--model", str(model), "--input-topic", "events",
                              "--metrics-port", "-1", "--state-dir", str(state_dir),
                              *worker_flags])
    if args.threads > 0:  # as `kvrec worker` does (app.py): 1 torch thread unless --threads
        import torch

        torch.set_num_threads(args.threads)
    settings = WorkerSettings.from_args(args)
    recommender = build_recommender(settings)
    settings = resolve_window_capacity(settings, recommender)
    producer, consumer = FakeProducer(), FakeConsumer()
    worker = Worker(settings, recommender, WorkerMetrics(), HealthState(), {},
                    clients=KafkaClients(consumer, producer, FakeRestoreConsumer(producer)))
    worker._on_assign(consumer, [TopicPartition("events", 0)])
    return worker


def _batches(args: argparse.Namespace, count: int, first_offset: int) -> list[list[Any]]:
    from kvrec.stream.schema import Event, encode_event
    from tests.fake_kafka import FakeMessage

    rng = np.random.default_rng(first_offset)
    popularity = np.arange(1, args.items + 1, dtype=np.float64) ** -1.1
    total = count * args.batch
    users = rng.integers(0, args.users, total)
    items = rng.choice(args.items, total, p=popularity / popularity.sum()) + 1
    now = int(time.time() * 1000) - 3_600_000
    messages = []
    for n in range(total):
        offset = first_offset + n
        user = f"u{users[n]}"
        value = encode_event(Event(user, f"i{items[n]}", "view", now + offset))
        messages.append(FakeMessage("events", 0, offset, user.encode(), value,
                                    _timestamp=now + offset))
    return [messages[i : i + args.batch] for i in range(0, total, args.batch)]


def _timed(worker: Any, batches: list[list[Any]]) -> tuple[float, float]:
    """Wall-clock and CPU seconds of the process (all its threads) for the batches."""
    started, cpu = time.perf_counter(), time.process_time()
    for n, batch in enumerate(batches):
        worker.process(batch)
        if n % 10 == 9:
            worker.checkpoint.commit()
    return time.perf_counter() - started, time.process_time() - cpu


def _stage_shares(profile: cProfile.Profile) -> dict[str, float]:
    stats = pstats.Stats(profile).stats  # type: ignore[attr-defined]
    total = sum(entry[3] for (file, _, name), entry in stats.items()
                if file.endswith("bench/loop.py") and name == "_timed")
    shares = {}
    for stage, names in STAGES:
        cumulative = sum(entry[3] for (file, _, name), entry in stats.items()
                         if any(file.endswith(f) and name == n for f, n in names))
        shares[stage] = round(cumulative / total, 4) if total else 0.0
    # what no stage names: the loop's own bookkeeping (waves, windows, metrics, results), and
    # recommend's own work around the model and retrieval (pool, exclusions, columns, because)
    model = sum(shares[s] for s in ("  model: extend/step", "  model: refill encode", "  retrieval"))
    shares["recommend less model and retrieval"] = round(
        shares["recommend (model + retrieval)"] - model, 4)
    shares["process less the stages above"] = round(shares["process (whole batch)"] - sum(
        shares[s] for s in ("validate and decode JSON", "recommend (model + retrieval)",
                            "encode outputs (wire)", "windows: apply", "produce")), 4)
    return shares


def main(args: argparse.Namespace) -> int:
    worker_flags = [f for f in args.worker_flags if f != "--"]
    workdir = work_dir(args.workdir, "kvrec-bench-loop-", "kvrec bench loop")
    model = workdir / f"model-{args.items}-w{args.window}"
    if not (model / "manifest.json").exists():
        build_artifact(model, n_items=args.items, window=args.window)
    worker = _worker(model, workdir / "state", worker_flags)
    offset = 0
    warmup = _batches(args, args.warmup_batches, offset)
    offset += args.warmup_batches * args.batch
    for batch in warmup:  # windows fill (and their caches), as in a worker's steady state
        worker.process(batch)
    worker.checkpoint.commit()
    from kvrec.stream.worker.app import freeze_heap

    freeze_heap()  # the worker's collector settings (app.py), as it has them when it runs
    timed = _batches(args, args.batches, offset)
    offset += args.batches * args.batch
    seconds, cpu_seconds = _timed(worker, timed)
    events = args.batches * args.batch
    result: dict[str, Any] = {
        "benchmark": "worker loop without a broker (in-memory Kafka clients)",
        "machine": machine_info(),
        "settings": {"items": args.items, "window": args.window, "users": args.users,
                     "batch": args.batch, "batches": args.batches,
                     "warmup_batches": args.warmup_batches, "worker_flags": worker_flags,
                     "retrieval": worker.recommender.retriever.build_report,
                     "gc_threshold": list(gc.get_threshold()),
                     "gc_frozen_objects": gc.get_freeze_count()},
        "events": events, "seconds": seconds, "events_per_s": events / seconds,
        "us_per_event": seconds / events * 1e6,
        # the process's CPU time: on a shared machine, less sensitive to the others' load than
        # the wall clock (the worker runs torch and faiss on one thread: one core's time)
        "cpu_seconds": cpu_seconds, "cpu_us_per_event": cpu_seconds / events * 1e6,
    }
    line = (f"loop: {events / seconds:,.0f} events/s, {seconds / events * 1e6:.1f} us/event "
            f"({cpu_seconds / events * 1e6:.1f} us of CPU)")
    if args.profile:
        profile = cProfile.Profile()
        profiled = _batches(args, args.batches, offset)
        profile.enable()
        _timed(worker, profiled)
        profile.disable()
        result["profiled_stage_shares"] = shares = _stage_shares(profile)
        # a share of the unprofiled pass's time: what docs/e2e.md's tables give
        result["profiled_stage_us_per_event"] = {
            stage: round(share * seconds / events * 1e6, 1) for stage, share in shares.items()}
        line += "\n" + "\n".join(
            f"  {stage:32s} {share:6.1%} {share * seconds / events * 1e6:7.1f} us/event"
            for stage, share in shares.items())
    worker.state.close_all()
    gc.unfreeze()  # as the worker does: a clean exit (frozen objects leak warnings at exit)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(line)
    return 0
