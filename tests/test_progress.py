"""Progress output: bars on a terminal, one line per epoch in a log (model/progress.py)."""

from __future__ import annotations

import json
import os
import pty
import re
import subprocess
import sys
import termios
import threading
from pathlib import Path

from kvrec.model.progress import progress_bar

ROOT = Path(__file__).resolve().parent.parent
TRAIN = [
    sys.executable, "-m", "kvrec.stream.cli", "train", "--format", "synthetic",
    "--synthetic-users", "300", "--synthetic-items", "120", "--synthetic-events", "6000",
    "--epochs", "3", "--patience", "10", "--d-model", "32", "--layers", "1", "--window", "8",
    "--max-len", "30", "--batch-size", "32", "--threads", "1",
]


def test_training_writes_one_line_per_epoch_to_a_log_file(tmp_path: Path) -> None:
    log = tmp_path / "train.log"
    with log.open("w") as out:  # stdout and stderr both a file, as under nohup or in CI
        result = subprocess.run(
            [*TRAIN, "--out", str(tmp_path / "model")], cwd=ROOT, stdout=out,
            stderr=subprocess.STDOUT, timeout=300,
        )
    text = log.read_text()
    assert result.returncode == 0, text
    assert "\r" not in text and "batch/s" not in text  # no progress bar updates at all
    lines = text.splitlines()
    epochs = [line for line in lines if re.match(r"epoch +\d+ \(\d+s\): loss ", line)]
    assert [int(line.split()[1]) for line in epochs] == [1, 2, 3]
    assert json.loads(lines[-1])["best_epoch"] in (1, 2, 3)
    assert len(lines) == len(epochs) + 1, text  # nothing else: one line per epoch and the result


def test_training_keeps_its_bar_on_a_terminal(tmp_path: Path) -> None:
    controller, terminal = pty.openpty()
    termios.tcsetwinsize(terminal, (24, 100))  # a new pseudo-terminal is 0 columns wide
    chunks: list[bytes] = []

    def read() -> None:
        while True:
            try:
                chunk = os.read(controller, 4096)
            except OSError:  # the terminal closed
                return
            if not chunk:
                return
            chunks.append(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    result = subprocess.run(
        [*TRAIN, "--epochs", "1", "--out", str(tmp_path / "model")], cwd=ROOT,
        stdout=subprocess.PIPE, stderr=terminal, timeout=300,
    )
    os.close(terminal)
    reader.join(timeout=10)
    os.close(controller)
    drawn = b"".join(chunks).decode(errors="replace")
    assert result.returncode == 0, drawn
    assert "epoch 1" in drawn and "batch" in drawn and "\r" in drawn


def test_a_disabled_bar_still_iterates_and_counts() -> None:
    bar = progress_bar(range(5), enabled=False, desc="quiet")
    assert list(bar) == [0, 1, 2, 3, 4]
    with progress_bar(total=3, enabled=False) as counted:
        counted.update(3)
