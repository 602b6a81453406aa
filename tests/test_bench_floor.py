"""`kvrec bench floor` against the session broker: every case measured, and the cause of the
old ~35 ms floor visible (a reader that waits for 1,000 messages or 50 ms)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kvrec.bench.floor import CASES

pytestmark = pytest.mark.kafka


def test_bench_floor_measures_every_case(kafka_bootstrap, tmp_path: Path) -> None:
    out = tmp_path / "floor.json"
    with open(tmp_path / "floor.log", "w") as log:
        done = subprocess.run(
            [sys.executable, "-m", "kvrec.stream.cli", "bench", "floor", "--json", str(out),
             "--rate", "200", "--seconds", "1", "--bootstrap-servers", kafka_bootstrap,
             "--workdir", str(tmp_path / "w")],
            cwd=Path(__file__).parent.parent, stdout=log, stderr=subprocess.STDOUT, timeout=240,
        )
    assert done.returncode == 0, (tmp_path / "floor.log").read_text()[-3000:]
    report = json.loads(out.read_text())
    assert report["machine"]["cores"] >= 1
    cases = {case["name"]: case for case in report["cases"]}
    assert set(cases) == {case["name"] for case in CASES}
    for case in cases.values():
        latency = case["latency_ms"]
        assert case["messages"] == 200
        assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"] < 30_000
    # at 200 messages/s, consume(1000, 50 ms) never fills: every message waits for the timer,
    # on average half of it, whatever the machine's load
    assert cases["direct, linger 2, reader consume(1000, 50 ms)"]["latency_ms"]["p50"] >= 20
