"""`kvrec bench loop`: the worker loop on real encoded events, in memory, measured and profiled."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_bench_loop_measures_and_profiles_the_worker_loop(tmp_path: Path) -> None:
    out = tmp_path / "loop.json"
    done = subprocess.run(
        [sys.executable, "-m", "kvrec.stream.cli", "bench", "loop", "--json", str(out), "--items", "500",
         "--users", "40", "--batch", "64", "--batches", "3", "--warmup-batches", "2",
         "--profile", "--workdir", str(tmp_path / "w"), "--", "--k", "5"],
        cwd=Path(__file__).parent.parent, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["events"] == 3 * 64 and report["events_per_s"] > 0
    assert report["cpu_us_per_event"] > 0
    assert report["settings"]["worker_flags"] == ["--k", "5"]
    assert report["settings"]["retrieval"]["kind"] == "exact"  # 500 items: below the threshold
    shares = report["profiled_stage_shares"]
    assert 0.5 < shares["process (whole batch)"] <= 1.0
    assert 0.0 < shares["recommend (model + retrieval)"] < shares["process (whole batch)"]
    assert 0.0 < shares["  model: extend/step"] < shares["recommend (model + retrieval)"]
    assert 0.0 < shares["  retrieval"] < shares["recommend (model + retrieval)"]
    # each share also in µs an event of the unprofiled pass, as docs/e2e.md's tables give them
    us = report["profiled_stage_us_per_event"]
    assert us.keys() == shares.keys()
    for stage, share in shares.items():
        assert abs(us[stage] - share * report["us_per_event"]) <= 0.06, stage


def test_bench_loop_runs_the_process_as_the_worker_does(tmp_path: Path) -> None:
    """The worker runs torch on `--threads` threads (1 by default) and freezes the long-lived
    heap with a higher collector threshold (app.py): the bench measures that loop, not one
    that spins extra torch threads or scans every window object in full collections."""
    out = tmp_path / "loop.json"
    done = subprocess.run(
        [sys.executable, "-m", "kvrec.stream.cli", "bench", "loop", "--json", str(out), "--items", "500",
         "--users", "20", "--batch", "16", "--batches", "2", "--warmup-batches", "1",
         "--workdir", str(tmp_path / "w")],
        cwd=Path(__file__).parent.parent, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["machine"]["torch_threads"] == 1
    assert report["settings"]["gc_threshold"] == [50_000, 20, 100]
    assert report["settings"]["gc_frozen_objects"] > 0
