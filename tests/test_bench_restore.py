"""`kvrec bench restore` against the session's broker: it restores every window it wrote."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvrec.stream.cli import main

pytestmark = pytest.mark.kafka


def test_restore_bench_writes_json(kafka_bootstrap: str, tmp_path: Path) -> None:
    out = tmp_path / "restore.json"
    assert main(["bench", "restore", "--json", str(out), "--windows", "5,300",
                 "--events-per-window", "9", "--bootstrap-servers", kafka_bootstrap]) == 0
    report = json.loads(out.read_text())
    assert [r["windows"] for r in report["results"]] == [5, 300]
    assert all(r["seconds"] > 0 and r["bytes"] > 0 for r in report["results"])
    assert report["machine"]["cores"] and report["command"].startswith("kvrec bench restore")


def test_restore_bench_refuses_bad_sizes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["bench", "restore", "--json", str(tmp_path / "x.json"), "--windows", "ten"]) == 2
    assert "--windows" in capsys.readouterr().err
