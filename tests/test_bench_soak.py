"""`kvrec bench soak`: its verdict, and a short run against the session broker."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kvrec.bench.soak import ArrivingUsers, judge


def _samples(rss: list[float], cache: list[float], every_s: float = 60.0) -> list[dict]:
    return [{"t_s": (i + 1) * every_s, "rss_bytes": r, "cache_bytes": c}
            for i, (r, c) in enumerate(zip(rss, cache, strict=True))]


def test_the_verdict_judges_rss_from_a_third_of_the_run_and_the_cache_throughout() -> None:
    # growth before minute 10 (warm-up) is allowed, flat after it passes
    rss = [500.0 + 50 * i for i in range(9)] + [1000.0] * 21
    assert judge(_samples(rss, [64.0] * 30), 30, 64, 0.10)["passed"]
    # 20% growth between minute 10 and 30: a leak
    leaking = [1000.0 + 10 * i for i in range(30)]
    verdict = judge(_samples(leaking, [64.0] * 30), 30, 64, 0.10)
    assert not verdict["passed"] and not verdict["rss_flat"] and verdict["cache_within_budget"]
    assert verdict["rss_growth"] == pytest.approx(1290 / 1090 - 1)
    # the cache above its budget once fails the run
    over = judge(_samples([1000.0] * 30, [64.0] * 29 + [65.0]), 30, 64, 0.10)
    assert over["rss_flat"] and not over["passed"]


def test_users_keep_arriving() -> None:
    users = ArrivingUsers(items=100, active=10, new_users_per_s=5.0)
    early = {u for u, _, _ in users.chunk(0.0, 500)}
    late = {u for u, _, _ in users.chunk(100.0, 500)}
    assert early <= {f"s{i}" for i in range(10)} and len(early) == 10
    assert late <= {f"s{i}" for i in range(500, 510)} and len(late) == 10
    items = [int(i[1:]) for _, i, _ in users.chunk(0.0, 2000)]
    assert min(items) >= 1 and max(items) <= 100
    assert items.count(1) > items.count(50)  # Zipf-popular


@pytest.mark.kafka
def test_a_short_soak_samples_memory_cache_throughput_and_latency(kafka_bootstrap, tmp_path) -> None:
    out, png = tmp_path / "soak.json", tmp_path / "soak.png"
    with open(tmp_path / "soak.log", "w") as log:
        done = subprocess.run(
            [sys.executable, "-m", "kvrec.stream.cli", "bench", "soak", "--json", str(out), "--plot",
             str(png), "--minutes", "0.35", "--rate", "200", "--items", "2000", "--window", "8",
             "--active-users", "300", "--cache-bytes", str(1 << 20), "--sample-seconds", "3",
             "--bootstrap-servers", kafka_bootstrap, "--workdir", str(tmp_path / "w")],
            cwd=Path(__file__).parent.parent, stdout=log, stderr=subprocess.STDOUT, timeout=240,
        )
    text = (tmp_path / "soak.log").read_text()
    assert done.returncode in (0, 1), text[-3000:]  # 1: RSS not flat in 20 s of warm-up
    report = json.loads(out.read_text())
    assert png.stat().st_size > 10_000
    assert report["machine"]["cores"] >= 1 and report["settings"]["rate"] == 200
    samples = report["samples"]
    assert len(samples) >= 6
    assert all(s["rss_bytes"] > 50 << 20 for s in samples)
    # a 1 MiB budget that 300 active users overflow: the cache is full, and never above it
    caches = [s["cache_bytes"] for s in samples if s["cache_bytes"] is not None]
    assert max(caches) <= 1 << 20 and max(caches) > (1 << 20) * 0.5
    assert report["verdict"]["cache_within_budget"]
    assert (done.returncode == 0) == report["verdict"]["passed"]
    assert sum(s["delivered_per_s"] for s in samples[2:]) > 0
    late = [s for s in samples[2:] if s["delivered_per_s"] > 0]
    assert all(0 < s["p50_ms"] <= s["p99_ms"] < 30_000 for s in late)
