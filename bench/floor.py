"""`kvrec bench floor`: the latency floor of `kvrec bench e2e`, taken apart.

    kvrec bench floor --json OUT.json [--rate 2000] [--seconds 8] [--bootstrap-servers HOST:PORT]

Messages are produced at `--rate` (a connected producer, paced), each carrying its produce
time (epoch ms, µs resolution); the reader subtracts it from the time it read the message.
Cases, each on fresh topics:

- `direct`: read the produced topic itself (produce → broker → consume: one hop), producer
  linger 0, 1 and 2 ms (2 ms: the worker's and the bench's default);
- `direct, reader fetch.wait.max.ms 500` (librdkafka's default; the bench reader uses 5, the
  worker its `--batch-wait-ms`): with `fetch.min.bytes` 1 the broker answers a fetch as soon as
  one byte is there, so this bounds only an idle fetch, not a message's wait;
- `direct, reader consume(1000, 50 ms)`: how `kvrec bench e2e` read its outputs before: that
  call returns only with 1,000 messages or after 50 ms, so at any rate below 20,000/s every
  message waits in the reader;
- `passthrough`: through `bench/passthrough.py` (two hops), reading as it does now (one
  `poll`, then what is fetched), linger 2, 1 and 0 ms on both producers;
- `passthrough, relay consume(512, 10 ms)`: the relay as it was (the same wait in the relay).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from confluent_kafka import Consumer, Producer, TopicPartition

from kvrec import flags
from kvrec.bench.e2e import REPO, broker, read_available
from kvrec.bench.machine import machine_info
from kvrec.model.owned import work_dir
from kvrec.stream.kafka_config import ensure_topics

CASES: tuple[dict[str, Any], ...] = (
    {"name": "direct, linger 0", "relay": False, "linger_ms": 0, "reader": "poll"},
    {"name": "direct, linger 1", "relay": False, "linger_ms": 1, "reader": "poll"},
    {"name": "direct, linger 2", "relay": False, "linger_ms": 2, "reader": "poll"},
    {"name": "direct, linger 2, reader fetch.wait.max.ms 500", "relay": False, "linger_ms": 2,
     "reader": "poll", "fetch_wait_ms": 500},
    {"name": "direct, linger 2, reader consume(1000, 50 ms)", "relay": False, "linger_ms": 2,
     "reader": "consume"},
    {"name": "passthrough, linger 2", "relay": True, "linger_ms": 2, "reader": "poll",
     "relay_wait_ms": 0},
    {"name": "passthrough, linger 1", "relay": True, "linger_ms": 1, "reader": "poll",
     "relay_wait_ms": 0},
    {"name": "passthrough, linger 0", "relay": True, "linger_ms": 0, "reader": "poll",
     "relay_wait_ms": 0},
    {"name": "passthrough, linger 2, relay consume(512, 10 ms)", "relay": True, "linger_ms": 2,
     "reader": "poll", "relay_wait_ms": 10},
)


def _produce(producer: Producer, topic: str, count: int, rate: float) -> None:
    started = time.perf_counter()
    for n in range(count):
        delay = started + n / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        producer.produce(topic, key=str(n % 997).encode(), value=f"{time.time() * 1000:.3f}".encode())
        if n % 50 == 0:
            producer.poll(0)
    producer.flush(30)


def run_case(case: dict[str, Any], bootstrap: str, rate: float, seconds: float,
             partitions: int, workdir: Path) -> dict[str, Any]:
    tag = f"floor-{uuid.uuid4().hex[:8]}"
    source, sink = f"{tag}-in", f"{tag}-out"
    ensure_topics({"bootstrap.servers": bootstrap}, {source: (partitions, {}), sink: (partitions, {})})
    relay = None
    if case["relay"]:
        with open(workdir / f"{tag}-relay.log", "w") as log:
            relay = subprocess.Popen(
                [sys.executable, "-m", "kvrec.bench.passthrough", bootstrap, source, sink, f"{tag}-group",
                 str(case["linger_ms"]), str(case["relay_wait_ms"])],
                env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,
            )
    topic = sink if case["relay"] else source
    reader = Consumer({"bootstrap.servers": bootstrap, "group.id": f"{tag}-reader",
                       "enable.auto.commit": False,
                       "fetch.wait.max.ms": case.get("fetch_wait_ms", 5)})
    reader.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": case["linger_ms"],
                         "compression.type": "none"})
    producer.list_topics(source, timeout=10)
    # one message through first: the reader is fetching (and the relay in its group) before
    # the measured ones, so no message waits for a connection, a leader or a join
    producer.produce(source, value=b"warm-up")
    producer.flush(10)
    count = int(rate * seconds)
    latencies: list[float] = []
    try:
        deadline = time.monotonic() + 60
        while not read_available(reader, 0.2):
            if time.monotonic() > deadline or (relay is not None and relay.poll() is not None):
                raise RuntimeError(f"the warm-up message was not read in 60 s: {workdir}")
        thread = threading.Thread(target=_produce, args=(producer, source, count, rate), daemon=True)
        thread.start()
        deadline = time.monotonic() + seconds + 60
        while len(latencies) < count and time.monotonic() < deadline:
            if case["reader"] == "consume":
                messages = reader.consume(1000, timeout=0.05)
            else:
                messages = read_available(reader, 0.05)
            now_ms = time.time() * 1000
            latencies += [now_ms - float(m.value()) for m in messages
                          if m.error() is None and m.value() != b"warm-up"]
        thread.join()
    finally:
        reader.close()
        if relay is not None:
            relay.terminate()
            relay.wait(timeout=20)
    values = np.array(latencies)
    if len(values) < count:
        raise RuntimeError(f"{case['name']}: {len(values)} of {count} messages read")
    result = {
        **case, "rate": rate, "messages": count,
        "latency_ms": {f"p{q}": float(np.percentile(values, q)) for q in (50, 90, 99)},
        "load_average_1m": os.getloadavg()[0],
    }
    latency = result["latency_ms"]
    print(f"{case['name']:50s} p50 {latency['p50']:6.2f}  p90 {latency['p90']:6.2f}  "
          f"p99 {latency['p99']:7.2f} ms  (load {result['load_average_1m']:.2f})", flush=True)
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", required=True, help="output JSON")
    parser.add_argument("--bootstrap-servers", default=None, help="default: start a local broker")
    parser.add_argument("--rate", type=flags.number(above=0), default=2_000.0, help="messages/s")
    parser.add_argument("--seconds", type=flags.number(above=0), default=8.0, help="per case")
    parser.add_argument("--partitions", type=flags.integer(1), default=4)
    parser.add_argument("--workdir", default=None, help="default: a temporary directory")


def main(args: argparse.Namespace) -> int:
    workdir = work_dir(args.workdir, "kvrec-floor-", "kvrec bench floor")
    with broker(args.bootstrap_servers, workdir) as bootstrap:
        results = [run_case(case, bootstrap, args.rate, args.seconds, args.partitions, workdir)
                   for case in CASES]
    report = {
        "benchmark": "latency floor: produce -> (relay) -> read on one machine",
        "machine": machine_info(),
        "settings": {"rate": args.rate, "seconds": args.seconds, "partitions": args.partitions,
                     "broker": "given" if args.bootstrap_servers else "local launcher",
                     "latency": "read time - produce time carried in the message (epoch ms)"},
        "cases": results,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=1))
    return 0
