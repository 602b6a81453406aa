"""`kvrec bench swap` with tiny settings against the session broker: two exactly-once workers
swap models under a replay and every input has exactly one recommendation."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.kafka, pytest.mark.slow]
REPO = Path(__file__).parent.parent


def test_bench_swap_loses_and_duplicates_nothing_and_switches_once_per_swap(
    kafka_bootstrap, tmp_path: Path
) -> None:
    out, png = tmp_path / "swap.json", tmp_path / "swap.png"
    log = tmp_path / "bench.log"
    # --settle-s 4: the replay goes on for 4 s after the last swap, so that every partition has
    # outputs from the last version (at 1 s, a loaded run once had two partitions without any)
    with log.open("wb") as output:
        done = subprocess.run(
            [sys.executable, "-m", "kvrec.stream.cli", "bench", "swap", "--json", str(out), "--plot",
             str(png), "--bootstrap-servers", kafka_bootstrap, "--workdir", str(tmp_path / "w"),
             "--slice-lines", "2000", "--rate", "150", "--steady-s", "4", "--warmup-s", "1",
             "--phase-s", "1", "--swaps", "1", "--swap-every-s", "1", "--settle-s", "4"],
            cwd=REPO, stdout=output, stderr=subprocess.STDOUT, timeout=240,  # hang guard
        )
    assert done.returncode == 0, log.read_text()[-4000:]
    report = json.loads(out.read_text())
    correctness = report["correctness"]
    assert correctness["ok"] is True
    assert correctness["inputs"] == correctness["inputs_in_topic"] > 300
    assert correctness["missing"] == correctness["duplicated"] == correctness["unexpected"] == 0
    assert correctness["outputs"] == correctness["inputs"]
    # publish or retrain, rollback, one promote: every partition switches version three times
    assert correctness["swaps"] == 3 == len(report["swaps"])
    assert set(correctness["version_changes_by_partition"].values()) == {3}
    versions = report["versions"]
    assert [s["announced_version"] for s in report["swaps"]] == [versions["B"], versions["A"],
                                                                 versions["B"]]
    assert [s["reason"] for s in report["swaps"]][1:] == ["rollback", "promote"]
    for partition in report["partitions"].values():
        assert [run["version"] for run in partition["runs"]] == [
            versions["A"], versions["B"], versions["A"], versions["B"]]
    assert report["latency_ms"]["steady"]["events"] > 0
    assert all(s["latency"]["events"] > 0 for s in report["swaps"])
    assert all(r["after_last_swap"] > 0 for r in report["rss_bytes"].values())
    assert png.stat().st_size > 10_000
