"""`kvrec bench e2e --quick` against the session broker: every system measured for real."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvrec.bench.e2e import DEFAULT_SYSTEMS, _event_key
from kvrec.stream.schema import Recommendation, ScoredItem, encode_recommendation

pytestmark = pytest.mark.kafka


def test_bench_e2e_quick_measures_every_system(kafka_bootstrap, tmp_path: Path) -> None:
    out, png = tmp_path / "e2e.json", tmp_path / "e2e.png"
    done = subprocess.run(
        [sys.executable, "-m", "kvrec.stream.cli", "bench", "e2e", "--quick", "--json", str(out),
         "--plot", str(png), "--bootstrap-servers", kafka_bootstrap, "--workdir", str(tmp_path / "w")],
        cwd=Path(__file__).parent.parent, capture_output=True, text=True, timeout=300,  # hang guard
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert png.stat().st_size > 10_000
    assert report["machine"]["cores"] >= 1
    assert report["settings"]["quick"] is True and report["settings"]["events"] == 2000
    assert set(report["systems"]) == set(DEFAULT_SYSTEMS)
    for name, result in report["systems"].items():
        assert result["events"] == 2000, name
        assert 0 < result["peak_events_per_s"] < float("inf"), name
        assert 0 < result["offered_rate"] <= result["peak_events_per_s"], name
        latency = result["latency_ms"]
        assert 0 <= latency["p50"] <= latency["p95"] <= latency["p99"] <= latency["max"], name
        assert latency["max"] < 30_000, name
        assert len(result["latencies_ms"]) == result["rate_phase_events"] > 0, name
        (phase,) = result["phases"]  # quick: one phase at half the peak
        assert phase["fraction"] == 0.5 and phase["achieved_events_per_s"] > 0, name
        if name.startswith("kvrec"):  # the worker's own timings over the phase, from /metrics
            steps = phase["worker_timings"]["kvrec_step_seconds"]
            assert steps["count"] > 0 and 0 < steps["mean_ms"] < 30_000, name
            assert "kvrec_checkpoint_seconds" in phase["worker_timings"], name
        else:
            assert phase["worker_timings"] == {}, name
    assert report["kvrec_over_no_cache"]["peak_events_per_s"] > 0


def test_sweep_covers_every_axis_and_the_no_cache_worker() -> None:
    from kvrec.bench.e2e import SWEEP_BATCHES, SWEEP_ITEMS, SWEEP_WINDOWS, sweep_points

    points = sweep_points(100_000, 50)
    kvrec = [p for p in points if p["system"] == "kvrec"]
    assert {p["window"] for p in kvrec} == set(SWEEP_WINDOWS)
    assert {p["items"] for p in kvrec} == set(SWEEP_ITEMS)
    assert {p["batch_size"] for p in kvrec} == set(SWEEP_BATCHES)
    assert len({tuple(sorted(p.items())) for p in points}) == len(points)  # no point twice
    assert {p["window"] for p in points if p["system"] == "kvrec-no-cache"} == set(SWEEP_WINDOWS)


def test_bench_e2e_measures_kvrec_with_one_and_two_processes(kafka_bootstrap, tmp_path: Path) -> None:
    out = tmp_path / "e2e.json"
    with open(tmp_path / "bench.log", "w") as log:
        done = subprocess.run(
            [sys.executable, "-m", "kvrec.stream.cli", "bench", "e2e", "--quick", "--json", str(out),
             "--systems", "kvrec", "--processes", "1,2", "--bootstrap-servers", kafka_bootstrap,
             "--workdir", str(tmp_path / "w")],
            cwd=Path(__file__).parent.parent, stdout=log, stderr=subprocess.STDOUT, timeout=300,
        )
    assert done.returncode == 0, (tmp_path / "bench.log").read_text()[-3000:]
    report = json.loads(out.read_text())
    assert set(report["systems"]) == {"kvrec", "kvrec-2proc"}
    assert report["settings"]["processes"] == [1, 2]
    for result in report["systems"].values():
        assert result["events"] == 2000 and result["peak_events_per_s"] > 0
    assert report["process_scaling"]["2"] == pytest.approx(
        report["systems"]["kvrec-2proc"]["peak_events_per_s"]
        / report["systems"]["kvrec"]["peak_events_per_s"])


@settings(max_examples=200, deadline=None, derandomize=True)
@given(user_id=st.text(min_size=1, max_size=20), event_ts=st.integers(0, 2**62),
       cold_start=st.booleans())
def test_the_readers_shortcut_finds_the_same_key_as_decoding(
    user_id: str, event_ts: int, cold_start: bool
) -> None:
    """The bench reads (user id, event ts) of a recommendation without decoding all of it; for
    any id (quotes, backslashes, non-ASCII) it must find what `json.loads` finds."""
    value = encode_recommendation(Recommendation(
        user_id=user_id, items=[ScoredItem("i1", 0.5)], model_version="v1", event_ts=event_ts,
        emitted_ts=1, because=[], cold_start=cold_start, source_ts=None,
    ))
    data = json.loads(value)
    assert _event_key("kvrec", value) == (data["user_id"], data["event_ts"]) == (user_id, event_ts)


def test_the_sweep_reads_the_retrieval_report_the_worker_logs(tmp_path: Path) -> None:
    """`kvrec worker` logs `model V: retrieval {...}` (stream/worker/models.py); the sweep's
    table takes kind, settings and recall from it (a format change once left them empty)."""
    from kvrec.bench.e2e import _retrieval_report

    log = tmp_path / "worker.log"
    log.write_text(
        "2026-12-02 05:59:42,623 INFO kvrec.worker: loading the model and building retrieval\n"
        "2026-12-02 05:59:47,382 INFO kvrec.worker: model 20261202T055939-49a14eaa: retrieval "
        "{'kind': 'ivfpq', 'factory': 'IVF256,PQ64x4fs,RFlat', 'nprobe': 8, 'k_factor': 4, "
        "'recall@10': 0.9787}\n"
    )
    report = _retrieval_report(log)
    assert report is not None and report["kind"] == "ivfpq" and report["recall@10"] == 0.9787
    assert 'log.info("model %s: retrieval %s"' in (
        Path(__file__).parent.parent / "stream" / "worker" / "models.py").read_text()


def test_each_commit_interval_and_width_is_its_own_row() -> None:
    """kvrec-eos once per commit interval, every kvrec system once per width (`-d<D>` unless
    64); the measured worker runs exactly-once with that interval, its warm-up at-least-once."""
    from kvrec.bench.e2e import _variants

    eos = _variants("kvrec-eos", [1], [100, 250, 500, 1000], [64, 128])
    assert [v.name for v in eos] == [
        "kvrec-eos-100ms", "kvrec-eos-250ms", "kvrec-eos-500ms", "kvrec-eos-1000ms",
        "kvrec-eos-100ms-d128", "kvrec-eos-250ms-d128", "kvrec-eos-500ms-d128",
        "kvrec-eos-1000ms-d128"]
    for variant in eos:
        assert variant.exactly_once and variant.worker_args == []
        assert variant.args == ["--processing-guarantee", "exactly-once", "--commit-interval-ms",
                                str(variant.commit_interval_ms)]
    assert [v.d_model for v in eos] == [64] * 4 + [128] * 4
    kvrec = _variants("kvrec", [1, 2], [100], [64, 128])
    assert [(v.name, v.args, v.d_model, v.exactly_once) for v in kvrec] == [
        ("kvrec", [], 64, False), ("kvrec-2proc", ["--processes", "2"], 64, False),
        ("kvrec-d128", [], 128, False), ("kvrec-2proc-d128", ["--processes", "2"], 128, False)]
    assert [v.name for v in _variants("kvrec-no-cache", [1], [100], [128])] == ["kvrec-no-cache-d128"]
    assert [v.name for v in _variants("faust-passthrough", [1, 2], [100], [64, 128])] == [
        "faust-passthrough"]


@pytest.mark.parametrize("flags", [
    ["--eos-commit-intervals", "0"], ["--eos-commit-intervals", "100,x"],
    ["--eos-commit-intervals", ""], ["--d-models", "65"], ["--d-models", "64,64"],
    ["--d-models", "1"], ["--systems", "kvrec-eos2"],
])
def test_bad_eos_and_width_lists_are_one_line(flags: list[str], tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "kvrec.stream.cli", "bench", "e2e", "--json", str(tmp_path / "x.json"),
         "--systems", "kvrec-eos", *flags, "--workdir", str(tmp_path / "w")],
        cwd=Path(__file__).parent.parent, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("kvrec: error: ") and done.stderr.count("\n") == 1, done.stderr
    assert not (tmp_path / "w").exists()


def test_bench_e2e_measures_exactly_once_visibly_and_the_d128_model(kafka_bootstrap,
                                                                  tmp_path: Path) -> None:
    """One quick run: kvrec and kvrec-eos at 100 ms, each at d 64 and d 128 (`kvrec train`'s
    default width). The exactly-once rows are read `read_committed` and their latency is the
    visible one, after the append by the wait for the commit."""
    out, png = tmp_path / "e2e.json", tmp_path / "e2e.png"
    with open(tmp_path / "bench.log", "w") as log:
        done = subprocess.run(
            [sys.executable, "-m", "kvrec.stream.cli", "bench", "e2e", "--quick", "--json", str(out),
             "--plot", str(png), "--systems", "kvrec,kvrec-eos", "--eos-commit-intervals", "100",
             "--d-models", "64,128", "--bootstrap-servers", kafka_bootstrap,
             "--workdir", str(tmp_path / "w")],
            cwd=Path(__file__).parent.parent, stdout=log, stderr=subprocess.STDOUT, timeout=400,
        )
    assert done.returncode == 0, (tmp_path / "bench.log").read_text()[-3000:]
    report = json.loads(out.read_text())
    assert png.stat().st_size > 10_000
    assert report["settings"]["d_models"] == [64, 128]
    assert report["settings"]["eos_commit_intervals_ms"] == [100]
    rows = report["systems"]
    assert set(rows) == {"kvrec", "kvrec-d128", "kvrec-eos-100ms", "kvrec-eos-100ms-d128"}
    for name, row in rows.items():
        eos = name.startswith("kvrec-eos")
        assert row["d_model"] == (128 if name.endswith("-d128") else 64), name
        assert row["processing_guarantee"] == ("exactly-once" if eos else "at-least-once"), name
        assert row["commit_interval_ms"] == (100 if eos else None), name
        assert row["events"] == 2000 and row["peak_events_per_s"] > 0, name
        (phase,) = row["phases"]
        assert phase["latency_stamp"] == ("read time (read_committed)" if eos else "LogAppendTime")
        if eos:  # visible = appended + the wait for the commit (+ the reader's share)
            appended = phase["appended_latency_ms"]
            assert appended["p50"] <= phase["latency_ms"]["p50"], name
            assert appended["p99"] <= phase["latency_ms"]["p99"], name
            assert phase["reader_ms"]["p50"] >= 0, name
            assert phase["worker_timings"]["kvrec_checkpoint_seconds"]["count"] > 0, name
        else:
            assert "appended_latency_ms" not in phase, name
    width = json.loads((tmp_path / "w" / "model-d128" / "config.json").read_text())
    assert width["model"]["d_model"] == 128
    assert report["peak_over_d64"]["128"] == pytest.approx(
        rows["kvrec-d128"]["peak_events_per_s"] / rows["kvrec"]["peak_events_per_s"])
    curve = report["exactly_once_curve"]
    assert [(p["system"], p["d_model"], p["commit_interval_ms"]) for p in curve] == [
        ("kvrec-eos-100ms", 64, 100), ("kvrec-eos-100ms-d128", 128, 100)]
    for point in curve:
        assert point["visible_ms"]["p99"] == rows[point["system"]]["latency_ms"]["p99"]
        assert point["commit_wait_ms"]["p99"] == rows[point["system"]]["reader_ms"]["p99"]
        # offered = min(--max-rate, fraction x peak); --quick caps --max-rate at 5,000 ev/s
        assert point["offered_rate"] == pytest.approx(
            min(report["settings"]["max_rate"], 0.5 * point["peak_events_per_s"]))
