"""The README's "Quickstart by hand": its bash block, run exactly as it stands.

The block is found by its marker comment and run with bash from the checkout's root, as a user
pastes it: it starts its own broker (never the session's), creates the topics, trains, runs a
worker, replays and tails. Only the ports and the broker's data folder are moved, through the
variables the README names, so that the run clashes with nothing; its scratch folder
(`mktemp -d`) lands in the test's temporary folder. Whatever happens, the test stops what the
block started: the worker (in the block's process group) and the background broker.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest

from kvrec.deploy.kafka.launcher import free_port, running_broker, stop_detached

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MARKER = "<!-- quickstart: tests/test_readme_quickstart.py runs this block exactly as it is -->"
MAX_LINES = 15
# one line of `kvrec tail`: the user, then items with their scores
RECOMMENDATION = re.compile(r"^user \S+  \[\S+:-?\d+\.\d{3}( \S+:-?\d+\.\d{3})*( \.\.\.)?\]  .*model \S+")
RUN_TIMEOUT_S = 480


def quickstart_block(readme: str) -> str:
    """The fenced bash block right after the marker comment."""
    assert readme.count(MARKER) == 1, "the README must hold the quickstart marker exactly once"
    match = re.match(r"\s*```bash\n(.*?)\n```\n", readme.split(MARKER, 1)[1], re.S)
    assert match, "the quickstart marker must be followed by a ```bash block"
    return match.group(1)


def test_the_quickstart_is_one_short_block() -> None:
    lines = quickstart_block(README.read_text()).splitlines()
    assert 0 < len(lines) <= MAX_LINES
    commands = " ".join(lines)
    for step in ("kvrec broker start", "kvrec topics create", "kvrec train", "kvrec worker",
                 "kvrec replay", "kvrec tail", "kvrec broker stop"):
        assert step in commands, step


def _stop_group(process: subprocess.Popen[str]) -> None:
    """SIGTERM the block's process group (bash and the worker it left), SIGKILL what stays."""
    for signum in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signum)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=20)


def _worker_log(scratch_root: Path) -> str:
    logs = sorted(scratch_root.glob("*/worker.log"))
    return logs[0].read_text(errors="replace")[-3000:] if logs else "(no worker.log)"


@pytest.mark.kafka
@pytest.mark.slow
def test_the_readme_quickstart_runs_as_written(tmp_path: Path) -> None:
    block = quickstart_block(README.read_text())
    port, metrics_port = free_port(), free_port()
    data_dir = tmp_path / "kafka"
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVREC_")}
    if "KVREC_KAFKA_CACHE" in os.environ:  # the broker's jars, fetched once per machine
        env["KVREC_KAFKA_CACHE"] = os.environ["KVREC_KAFKA_CACHE"]
    env.update({
        "TMPDIR": str(tmp_path),  # the block's `mktemp -d`
        "KVREC_BROKER_PORT": str(port),
        "KVREC_BOOTSTRAP_SERVERS": f"127.0.0.1:{port}",
        "KVREC_WORKER_METRICS_PORT": str(metrics_port),
        "KVREC_BROKER_DATA_DIR": str(data_dir),
        # one torch thread: on a shared, loaded machine more threads only spin against each other
        "KVREC_TRAIN_THREADS": "1",
    })
    # -x: the report shows each command; -e: the first one that fails ends the run with its status
    process = subprocess.Popen(
        ["bash", "-xeuo", "pipefail", "-c", block], cwd=ROOT, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        _stop_group(process)
        output = process.communicate()[0] + f"\n(timed out after {RUN_TIMEOUT_S} s)"
    finally:
        _stop_group(process)
        left_running = running_broker(data_dir)
        stop_detached(data_dir)
    report = f"{output[-6000:]}\n--- worker.log ---\n{_worker_log(tmp_path)}"
    assert process.returncode == 0, report
    assert left_running is None, f"the block left its broker running\n{report}"
    assert "replayed 2000 events" in output, report
    recommendations = [line for line in output.splitlines() if RECOMMENDATION.match(line)]
    assert len(recommendations) == 5, report
