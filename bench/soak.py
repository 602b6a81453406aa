"""`kvrec bench soak`: one worker for `--minutes` at a fixed offered rate, new users arriving
all the time, sampling its resident memory, its key/value cache, throughput and latency.

    kvrec bench soak --json OUT.json --plot OUT.png [--minutes 30] [--rate R] [--cache-bytes B]

The model and catalog are `kvrec bench e2e`'s synthetic ones (random weights, a clustered
catalog of `--items` items, W=`--window`). The offered rate is `--rate`, else half the peak
measured first on a backlog of `--peak-events` (as `kvrec bench e2e` measures it).

The stream: at time t the active users are ids `[a*t, a*t + --active-users)` with a =
`--new-users-per-s` (default: rate / 20, so a user sends ~20 events while it is active); each
event picks one of them at random and a Zipf-popular item. Users keep arriving, so the worker
keeps creating windows, evicting key/value cache entries (`--cache-bytes`, about what the
active users need, far below all users') and dropping windows from memory
(`--windows-in-memory`, `--live-users`: the worker's bounded per-user structures, set here so
they fill within the first minutes; with the worker's defaults, 40,000 windows and 100,000
users, they would still be filling at minute 30 at these arrival rates, growth by design).

Every `--sample-seconds` it records the worker's resident memory (VmRSS, /proc), the
`kvrec_cache_bytes` gauge (its /metrics), the outputs read in the interval (throughput), their
latency (the time the bench read the recommendation minus its `source_ts`, the input
message's Kafka timestamp) and the load average. It passes (exit 0, else 1) when the RSS
between a third of the run and its end (minute 10 to 30 of 30) stays within `--rss-tolerance`
(10%: max / min - 1) and the cache gauge never exceeds `--cache-bytes`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from confluent_kafka import Producer

from kvrec import flags
from kvrec.bench.e2e import Run, broker, build_artifact, measure, read_available, reader
from kvrec.bench.machine import machine_info
from kvrec.deploy.kafka.launcher import free_port
from kvrec.errors import ConfigError
from kvrec.model.owned import work_dir
from kvrec.stream.replay import BURST_SECONDS, TokenBucket
from kvrec.stream.schema import Event, encode_event

EVENT_TYPES = ("view", "click", "add_to_cart", "purchase")
EVENT_TYPE_SHARES = (0.7, 0.2, 0.07, 0.03)
STEADY_FROM = 1 / 3  # RSS judged from minute 10 of 30 on


class ArrivingUsers:
    """The soak's event stream: users arriving at `new_users_per_s`, `active` at a time,
    Zipf-popular items from a catalog of `items` ("i1".."iN", `bench.e2e`'s ids)."""

    def __init__(self, items: int, active: int, new_users_per_s: float, seed: int = 11) -> None:
        self.active, self.new_users_per_s = active, new_users_per_s
        self.rng = np.random.default_rng(seed)
        popularity = np.arange(1, items + 1, dtype=np.float64) ** -1.1
        self.item_cdf = np.cumsum(popularity / popularity.sum())
        self.type_cdf = np.cumsum(EVENT_TYPE_SHARES)

    def chunk(self, elapsed_s: float, n: int) -> Iterator[tuple[str, str, str]]:
        """`n` events (user, item, type) for the moment `elapsed_s` into the run."""
        base = int(elapsed_s * self.new_users_per_s)
        users = base + self.rng.integers(0, self.active, size=n)
        items = np.searchsorted(self.item_cdf, self.rng.random(n), side="right") + 1
        types = np.searchsorted(self.type_cdf, self.rng.random(n), side="right")
        for user, item, kind in zip(users.tolist(), items.tolist(), types.tolist(), strict=True):
            yield f"s{user}", f"i{min(item, len(self.item_cdf))}", EVENT_TYPES[min(kind, 3)]


def produce_stream(producer: Producer, topic: str, users: ArrivingUsers, rate: float,
                   stop: threading.Event, produced: list[int], started: float) -> None:
    """Produce `users`' events at `rate` per second until `stop` is set; `produced[0]` counts."""
    bucket = TokenBucket(rate, rate * BURST_SECONDS)
    chunk = max(1, int(rate // 20))
    while not stop.is_set():
        for user, item, kind in users.chunk(time.monotonic() - started, chunk):
            bucket.take()
            value = encode_event(Event(user, item, kind, int(time.time() * 1000)))
            while True:
                try:
                    producer.produce(topic, key=user.encode(), value=value)
                    break
                except BufferError:
                    producer.poll(0.01)
            produced[0] += 1
        producer.poll(0)
    producer.flush(30)


def rss_bytes(pid: int) -> int | None:
    """Resident set size of process `pid` (VmRSS), None once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def scrape_gauge(port: int, name: str) -> float | None:
    """One unlabelled metric's value from the worker's /metrics, None if it does not answer."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
            text = response.read().decode()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def judge(samples: list[dict[str, Any]], minutes: float, cache_bytes: int,
          tolerance: float) -> dict[str, Any]:
    """The soak's verdict: RSS flat (max/min - 1 <= tolerance) from a third of the run on, and
    the cache gauge never above the budget."""
    steady_from_s = minutes * 60 * STEADY_FROM
    steady = [s["rss_bytes"] for s in samples if s["t_s"] >= steady_from_s and s["rss_bytes"]]
    caches = [s["cache_bytes"] for s in samples if s["cache_bytes"] is not None]
    growth = (max(steady) / min(steady) - 1.0) if steady else None
    rss_ok = growth is not None and growth <= tolerance
    cache_ok = bool(caches) and max(caches) <= cache_bytes
    return {
        "steady_from_s": steady_from_s, "steady_samples": len(steady),
        "rss_steady_min_bytes": min(steady) if steady else None,
        "rss_steady_max_bytes": max(steady) if steady else None,
        "rss_growth": growth, "rss_tolerance": tolerance, "rss_flat": rss_ok,
        "cache_max_bytes": max(caches) if caches else None, "cache_budget_bytes": cache_bytes,
        "cache_within_budget": cache_ok, "passed": rss_ok and cache_ok,
    }


def soak(run: Run, *, model: Path, state_dir: Path, args: argparse.Namespace, rate: float,
         metrics_port: int) -> list[dict[str, Any]]:
    """Run the worker at `rate` for `args.minutes`, one sample every `args.sample_seconds`."""
    users = ArrivingUsers(args.items, args.active_users, args.new_users_per_s or rate / 20)
    worker_args = ["--cache-bytes", str(args.cache_bytes), "--metrics-port", str(metrics_port),
                   "--metrics-host", "127.0.0.1", "--windows-in-memory", str(args.windows_in_memory),
                   "--live-users", str(args.live_users), *args.worker_arg]
    run.start(model, state_dir, worker_args)
    assert run.process is not None
    consumer = reader(run.bootstrap, run.outputs, run.partitions)
    producer = Producer({"bootstrap.servers": run.bootstrap, "linger.ms": 2,
                         "compression.type": "none"})
    producer.list_topics(run.events, timeout=10)
    _wait_ready(metrics_port, run, timeout=args.timeout)
    stop, produced = threading.Event(), [0]
    started = time.monotonic()
    thread = threading.Thread(target=produce_stream, daemon=True,
                              args=(producer, run.events, users, rate, stop, produced, started))
    thread.start()
    samples: list[dict[str, Any]] = []
    latencies: list[float] = []
    read, last_produced, due = 0, 0, started + args.sample_seconds
    end = started + args.minutes * 60
    try:
        while True:
            now = time.monotonic()
            if now >= due:
                interval = args.sample_seconds
                lat = np.array(latencies) if latencies else np.array([np.nan])
                samples.append({
                    "t_s": round(now - started, 2),
                    "rss_bytes": rss_bytes(run.process.pid),
                    "cache_bytes": scrape_gauge(metrics_port, "kvrec_cache_bytes"),
                    "offered_per_s": (produced[0] - last_produced) / interval,
                    "delivered_per_s": read / interval,
                    "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
                    "load_average_1m": os.getloadavg()[0],
                })
                s = samples[-1]
                print(f"{s['t_s']:7.0f}s rss {s['rss_bytes'] / 2**20 if s['rss_bytes'] else 0:7.1f} MiB"
                      f" cache {(s['cache_bytes'] or 0) / 2**20:6.1f} MiB offered "
                      f"{s['offered_per_s']:7.0f}/s delivered {s['delivered_per_s']:7.0f}/s "
                      f"p50 {s['p50_ms']:7.1f} p99 {s['p99_ms']:7.1f} ms load {s['load_average_1m']:.2f}",
                      flush=True)
                read, last_produced, latencies = 0, produced[0], []
                due += interval
                if now >= end:
                    break
            messages = read_available(consumer, 0.05)
            read_ms = time.time() * 1000.0
            for message in messages:
                if message.error() is None:
                    read += 1
                    source_ts = json.loads(message.value()).get("source_ts")
                    if source_ts is not None:
                        latencies.append(read_ms - source_ts)
            if not messages:
                run.check_alive()
    finally:
        stop.set()
        thread.join(timeout=60)
        consumer.close()
        run.stop()
    return samples


def _wait_ready(port: int, run: Run, timeout: float) -> None:
    """Until the worker's /ready answers 200 (model loaded, assignment restored)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        run.check_alive()
        time.sleep(0.5)
    raise RuntimeError(f"the soak worker was not ready within {timeout:.0f}s")


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = report["samples"]
    minutes = np.array([s["t_s"] for s in samples]) / 60
    figure, (memory, rates, latency) = plt.subplots(3, 1, figsize=(10, 9), sharex=True)
    memory.plot(minutes, [(s["rss_bytes"] or 0) / 2**20 for s in samples], label="worker RSS")
    memory.plot(minutes, [(s["cache_bytes"] or 0) / 2**20 for s in samples],
                label="kvrec_cache_bytes")
    memory.axhline(report["settings"]["cache_bytes"] / 2**20, color="C1", linestyle=":",
                   label="--cache-bytes")
    memory.axvline(report["verdict"]["steady_from_s"] / 60, color="grey", linestyle="--",
                   label="judged from here")
    memory.set_ylabel("MiB")
    memory.legend(fontsize=8)
    verdict = report["verdict"]
    growth = verdict["rss_growth"]
    memory.set_title(f"memory (steady RSS max/min - 1 = {growth:.1%})" if growth is not None
                     else "memory")
    rates.plot(minutes, [s["offered_per_s"] for s in samples], label="offered")
    rates.plot(minutes, [s["delivered_per_s"] for s in samples], label="delivered")
    rates.set_ylabel("events/s")
    rates.legend(fontsize=8)
    latency.plot(minutes, [s["p50_ms"] for s in samples], label="p50")
    latency.plot(minutes, [s["p99_ms"] for s in samples], label="p99")
    latency.set_yscale("log")
    latency.set_ylabel("event to recommendation, ms")
    latency.set_xlabel("minutes")
    latency.legend(fontsize=8)
    settings, machine = report["settings"], report["machine"]
    figure.suptitle(
        f"kvrec bench soak: {settings['rate']:,.0f} ev/s, {settings['items']:,} items, "
        f"W={settings['window']}, cache {settings['cache_bytes'] / 2**20:.0f} MiB, "
        f"{machine['cpu']} ({machine['cores']} cores), {machine['date_utc']}", fontsize=9,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", required=True, help="output JSON")
    parser.add_argument("--plot", default=None, help="output PNG")
    parser.add_argument("--bootstrap-servers", default=None, help="default: start a local broker")
    parser.add_argument("--minutes", type=flags.number(above=0), default=30.0)
    parser.add_argument("--rate", type=flags.number(low=0), default=0.0,
                        help="offered events/s (0: half the peak, measured first)")
    parser.add_argument("--peak-events", type=flags.integer(1), default=20_000,
                        help="backlog the peak is measured on (without --rate)")
    parser.add_argument("--items", type=flags.integer(2), default=100_000)
    parser.add_argument("--window", type=flags.integer(1), default=50)
    parser.add_argument("--active-users", type=flags.integer(1), default=1_000,
                        help="users active at any moment")
    parser.add_argument("--new-users-per-s", type=flags.number(low=0), default=0.0,
                        help="users arriving per second (0: rate / 20)")
    parser.add_argument("--cache-bytes", type=flags.integer(1), default=64 << 20,
                        help="the worker's key/value cache budget: about the active users' entries "
                             "(~51 KB each at W=50), far below every user's, so departed users "
                             "are evicted all the time")
    parser.add_argument("--windows-in-memory", type=flags.integer(0), default=1_000,
                        help="the worker's flag (per partition): with --live-users, the bounded "
                             "per-user structures, sized to fill within the first minutes so "
                             "that growth after minute 10 is not an LRU still filling")
    parser.add_argument("--live-users", type=flags.integer(1), default=5_000,
                        help="the worker's flag: users whose last list is kept for the live hit rate")
    parser.add_argument("--sample-seconds", type=flags.number(above=0), default=10.0)
    parser.add_argument("--rss-tolerance", type=flags.number(low=0), default=0.10)
    parser.add_argument("--partitions", type=flags.integer(1), default=4)
    parser.add_argument("--timeout", type=flags.number(above=0), default=300.0,
                        help="seconds for the worker to become ready, and per peak phase")
    parser.add_argument("--worker-arg", action="append", default=[],
                        help="an extra `kvrec worker` argument (repeatable)")
    parser.add_argument("--workdir", default=None, help="default: a temporary directory")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM unwinds like Ctrl-C: the worker is stopped, not orphaned


def main(args: argparse.Namespace) -> int:
    signal.signal(signal.SIGTERM, _interrupt)
    if args.active_users < 1 or args.items < 2:
        raise ConfigError("--active-users must be >= 1 and --items >= 2")
    workdir = work_dir(args.workdir, "kvrec-soak-", "kvrec bench soak")
    model = build_artifact(workdir / "model", n_items=args.items, window=args.window)
    peak = None
    with broker(args.bootstrap_servers, workdir) as bootstrap:
        rate = args.rate
        if rate <= 0:
            users = ArrivingUsers(args.items, args.active_users, 1.0)
            backlog = [
                _interaction(user, item, kind, n)
                for n, (user, item, kind) in enumerate(users.chunk(0.0, args.peak_events))
            ]
            run = Run("kvrec", bootstrap, args.partitions, workdir / "peak.log")
            result = measure(run, backlog, [], model=model, state_dir=workdir / "peak-state",
                             worker_args=["--cache-bytes", str(args.cache_bytes)], seconds=1.0,
                             rate_fractions=[], max_rate=1e9, timeout=args.timeout)
            peak = result["peak_events_per_s"]
            rate = peak / 2
        run = Run("kvrec", bootstrap, args.partitions, workdir / "soak.log")
        print(f"soak: {rate:,.0f} events/s for {args.minutes:g} min (worker log {run.log_path})",
              flush=True)
        samples = soak(run, model=model, state_dir=workdir / "soak-state", args=args,
                       rate=rate, metrics_port=free_port())
    verdict = judge(samples, args.minutes, args.cache_bytes, args.rss_tolerance)
    report: dict[str, Any] = {
        "benchmark": "memory soak",
        "machine": machine_info(),
        "settings": {
            "minutes": args.minutes, "rate": rate, "peak_events_per_s": peak,
            "rate_source": "--rate" if args.rate > 0 else "half the measured peak",
            "items": args.items, "window": args.window, "d_model": 64, "layers": 2,
            "active_users": args.active_users,
            "new_users_per_s": args.new_users_per_s or rate / 20,
            "cache_bytes": args.cache_bytes, "sample_seconds": args.sample_seconds,
            "windows_in_memory_per_partition": args.windows_in_memory,
            "live_users": args.live_users,
            "partitions": args.partitions, "worker_args": args.worker_arg,
            "broker": "given" if args.bootstrap_servers else "local launcher",
            "latency": "bench read time - recommendation source_ts (input Kafka timestamp)",
        },
        "verdict": verdict,
        "samples": samples,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=1))
    if args.plot:
        plot(report, Path(args.plot))
    growth = verdict["rss_growth"]
    print(f"soak {'PASSED' if verdict['passed'] else 'FAILED'}: steady RSS growth "
          f"{growth if growth is None else f'{growth:.1%}'} (limit {args.rss_tolerance:.0%}), cache max "
          f"{verdict['cache_max_bytes']} of {args.cache_bytes} bytes", flush=True)
    return 0 if verdict["passed"] else 1


def _interaction(user: str, item: str, kind: str, n: int) -> Any:
    from kvrec.model.datasets import Interaction

    return Interaction(user, item, kind, int(time.time() * 1000) - 60_000 + n % 60_000)
