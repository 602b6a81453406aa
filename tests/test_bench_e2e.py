"""`kvrec bench e2e --quick` against the session broker: every system measured for real."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.e2e import SYSTEMS

pytestmark = pytest.mark.kafka


def test_bench_e2e_quick_measures_every_system(kafka_bootstrap, tmp_path: Path) -> None:
    out, png = tmp_path / "e2e.json", tmp_path / "e2e.png"
    done = subprocess.run(
        [sys.executable, "-m", "stream.cli", "bench", "e2e", "--quick", "--json", str(out),
         "--plot", str(png), "--bootstrap-servers", kafka_bootstrap, "--workdir", str(tmp_path / "w")],
        cwd=Path(__file__).parent.parent, capture_output=True, text=True, timeout=300,  # hang guard
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert png.stat().st_size > 10_000
    assert report["machine"]["cores"] >= 1
    assert report["settings"]["quick"] is True and report["settings"]["events"] == 2000
    assert set(report["systems"]) == set(SYSTEMS)
    for name, result in report["systems"].items():
        assert result["events"] == 2000, name
        assert 0 < result["peak_events_per_s"] < float("inf"), name
        assert 0 < result["offered_rate"] <= result["peak_events_per_s"], name
        latency = result["latency_ms"]
        assert 0 <= latency["p50"] <= latency["p95"] <= latency["p99"] <= latency["max"], name
        assert latency["max"] < 30_000, name
        assert len(result["latencies_ms"]) == result["rate_phase_events"] > 0, name
    assert report["kvrec_over_no_cache"]["peak_events_per_s"] > 0
