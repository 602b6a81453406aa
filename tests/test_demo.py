"""`kvrec demo`: it waits for its worker, and never reports success with recommendations missing.

The Kafka tests run the real demo (a worker process, the replay, the watch) against the session's
broker on small synthetic data; each takes seconds to tens of seconds.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from kvrec.errors import RunFailed
from kvrec.stream.demo import train_threads
from kvrec.stream.demo_worker import WorkerProcess, free_port
from kvrec.stream.worker.metrics import HealthState, WorkerMetrics, serve

ROOT = Path(__file__).resolve().parent.parent
SYNTHETIC = [
    "--format", "synthetic", "--synthetic-users", "300", "--synthetic-items", "120",
    "--synthetic-events", "6000",
]
SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]


# --- without a broker ----------------------------------------------------------------------------
def test_training_threads_follow_the_free_cores() -> None:
    assert train_threads(2, 0.1) == 2
    assert train_threads(2, 0.8) == 1  # another process holds most of a core
    assert train_threads(2, 5.0) == 1  # never fewer than one
    assert train_threads(16, 3.2) == 13


def test_a_worker_that_exits_before_ready_is_reported_with_its_last_line() -> None:
    worker = WorkerProcess(
        [sys.executable, "-c", "import sys; print('loading', file=sys.stderr); "
         "sys.exit('kvrec: error: /m/weights.safetensors: sha256 does not match manifest.json')"],
        metrics_port=free_port(),
    )
    try:
        with pytest.raises(RunFailed) as failure:
            worker.wait_until_ready(timeout_s=30)
    finally:
        worker.stop()
    assert str(failure.value) == (
        "the worker exited with status 1 before it was ready: "
        "/m/weights.safetensors: sha256 does not match manifest.json"
    )
    assert failure.value.exit_status == 1


def test_a_worker_that_never_gets_ready_times_out() -> None:
    port = free_port()
    worker = WorkerProcess(SLEEPER, metrics_port=port)
    try:
        with pytest.raises(RunFailed, match=rf"not ready after 0.5 s \(its /ready on port {port}"):
            worker.wait_until_ready(timeout_s=0.5, poll_s=0.05)
        assert worker.process.poll() is None  # it was only waited for, not judged dead
    finally:
        worker.stop()
    assert worker.process.returncode == -signal.SIGTERM


def test_ready_once_the_endpoint_says_so_and_killed_is_named() -> None:
    health = HealthState()
    server = serve(WorkerMetrics(), health, 0)
    worker = WorkerProcess(SLEEPER, metrics_port=server.server_address[1])
    try:
        assert not worker.ready()  # 503 until partitions are assigned
        health.started()
        health.assignment_done()
        assert worker.wait_until_ready(timeout_s=10) < 10
        worker.process.kill()
        worker.process.wait()
        with pytest.raises(RunFailed, match=r"^the worker was killed by SIGKILL after 5 of 9"):
            worker.check_alive("after 5 of 9 recommendations")
    finally:
        worker.stop()
        server.shutdown()


ROUTINE_LINE = (
    "%6|1765142131.123|GETPID|rdkafka#consumer-1| [thrd:main]: Coordinator load in progress: "
    "retrying"
)


def _ended_by(code: str) -> RunFailed:
    """The demo's failure for a worker that logs a routine librdkafka line, then runs `code`."""
    worker = WorkerProcess(
        [sys.executable, "-c", f"import sys; print({ROUTINE_LINE!r}, file=sys.stderr); {code}"],
        metrics_port=free_port(),
    )
    try:
        with pytest.raises(RunFailed) as failure:
            worker.wait_until_ready(timeout_s=30)
    finally:
        worker.stop()
    return failure.value


def test_a_worker_killed_by_a_signal_is_reported_by_the_signal_not_its_last_log_line() -> None:
    failure = _ended_by("import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    assert str(failure) == "the worker was killed by SIGKILL before it was ready"


def test_a_worker_that_exits_without_an_error_line_names_no_log_line() -> None:
    failure = _ended_by("sys.exit(3)")
    assert str(failure) == "the worker exited with status 3 before it was ready"


def test_a_worker_that_crashes_is_reported_with_its_exception() -> None:
    failure = _ended_by("raise RuntimeError('the index is empty')")
    assert str(failure) == (
        "the worker exited with status 1 before it was ready: RuntimeError: the index is empty"
    )


# --- against the broker --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "model"
    subprocess.run(
        [sys.executable, "-m", "kvrec.stream.cli", "train", *SYNTHETIC, "--out", str(out), "--epochs", "1",
         "--d-model", "32", "--layers", "1", "--window", "8", "--max-len", "30", "--threads", "1",
         "--dropout", "0.2", "--lr-schedule", "constant", "--warmup-epochs", "0"],
        cwd=ROOT, check=True, capture_output=True, timeout=300,
    )
    return out


def _demo(bootstrap: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "kvrec.stream.cli", "demo", "--bootstrap-servers", bootstrap,
            *SYNTHETIC, *args]


def _error_line(stderr: str) -> str:
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("kvrec: error: "), stderr[-3000:]
    return last


@pytest.mark.kafka
def test_demo_with_onnx_delivers_every_recommendation(kafka_bootstrap: str, tmp_path: Path) -> None:
    result = subprocess.run(
        _demo(kafka_bootstrap, "--backend", "onnx-cpu", "--train-epochs", "1", "--events", "2000",
              "--rate", "0", "--workdir", str(tmp_path)),
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert re.search(r"^demo: training with \d+ torch threads? \(", result.stdout, re.M)
    ready = result.stdout.index("demo: worker ready in")
    assert ready < result.stdout.index("demo: replaying 2000 events")  # ready before the replay
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["events_replayed"] == 2000
    assert summary["recommendations"] == 2000
    # stamped by the broker when it appended each recommendation; the reader's wait beside it
    assert summary["latency_stamp"] == "LogAppendTime"
    assert 0 <= summary["latency_ms_p50"] <= summary["latency_ms_p99"]
    assert 0 <= summary["reader_ms_p50"] <= summary["reader_ms_p99"]
    assert (tmp_path / "state").is_dir() and any((tmp_path / "state").rglob("step-*.onnx"))


@pytest.mark.kafka
def test_demo_fails_when_the_model_fails_verification(
    kafka_bootstrap: str, small_model: Path, tmp_path: Path
) -> None:
    tampered = tmp_path / "model"
    tampered.mkdir()
    for file in small_model.iterdir():
        (tampered / file.name).write_bytes(file.read_bytes())
    (tampered / "popularity.json").write_text('{"counts": [0]}')
    result = subprocess.run(
        _demo(kafka_bootstrap, "--model", str(tampered), "--events", "500",
              "--workdir", str(tmp_path / "run")),
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 1
    assert _error_line(result.stderr) == (
        "kvrec: error: the worker exited with status 2 before it was ready: "
        f"{tampered / 'popularity.json'}: sha256 does not match manifest.json; the file was "
        "changed or corrupted after export: re-download or retrain it"
    )
    assert "demo: replaying" not in result.stdout


@pytest.mark.kafka
def test_demo_fails_when_its_worker_is_killed_mid_run(
    kafka_bootstrap: str, small_model: Path, tmp_path: Path
) -> None:
    demo = subprocess.Popen(
        _demo(kafka_bootstrap, "--model", str(small_model), "--events", "6000", "--rate", "200",
              "--workdir", str(tmp_path)),
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert demo.stdout is not None
        worker_pid = 0
        for line in demo.stdout:
            found = re.match(r"demo: worker ready in [\d.]+s \(pid (\d+),", line)
            worker_pid = int(found.group(1)) if found else worker_pid
            if worker_pid and re.match(r" +\d+\.\ds  recs +[1-9]", line):  # recommendations flow
                os.kill(worker_pid, signal.SIGKILL)
                break
        assert worker_pid, "the demo never said its worker was ready"
        _, stderr = demo.communicate(timeout=120)
    finally:
        if demo.poll() is None:
            demo.kill()
    assert demo.returncode == 1
    assert re.fullmatch(
        r"kvrec: error: the worker was killed by SIGKILL after \d+ of 6000 recommendations",
        _error_line(stderr),
    )


@pytest.mark.kafka
def test_demo_fails_when_recommendations_fall_short(
    kafka_bootstrap: str, small_model: Path, tmp_path: Path
) -> None:
    # a worker that accepts only views and clicks sends the other ~10% to the dead-letter topic
    env = {**os.environ, "KVREC_WORKER_EVENT_TYPES": "view,click"}
    result = subprocess.run(
        _demo(kafka_bootstrap, "--model", str(small_model), "--events", "1000", "--rate", "0",
              "--settle-timeout", "3", "--workdir", str(tmp_path)),
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=env,
    )
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["events_replayed"] == 1000
    assert 0 < summary["recommendations"] < 1000
    assert re.fullmatch(
        rf"kvrec: error: recommendations fell short: {summary['recommendations']} of 1000 arrived, "
        r"then none for 3 s \(--settle-timeout\); see the worker's output above and the "
        r"demo-[0-9a-f]{8}-events-dead-letter topic",
        _error_line(result.stderr),
    )
