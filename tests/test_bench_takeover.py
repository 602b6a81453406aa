"""`kvrec bench takeover` against the session's broker: the promoted standby equals the full
restore, and both takeovers are timed in the same run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvrec.stream.cli import main

pytestmark = pytest.mark.kafka


def test_takeover_bench_writes_json(kafka_bootstrap: str, tmp_path: Path) -> None:
    out = tmp_path / "takeover.json"
    assert main(["bench", "takeover", "--json", str(out), "--windows", "300,2000",
                 "--events-per-window", "9", "--tail", "50",
                 "--bootstrap-servers", kafka_bootstrap]) == 0
    report = json.loads(out.read_text())
    assert [r["windows"] for r in report["results"]] == [300, 2000]
    for row in report["results"]:
        assert row["promoted_equals_full_restore"] and row["windows_compared"] == row["windows"]
        assert row["takeover_with_standby_s"] > 0 and row["takeover_without_standby_s"] > 0
        assert row["standby_disk_mib"] > 0 and row["changelog_bytes"] > 0
    assert report["command"].startswith("kvrec bench takeover") and report["load_average"]


def test_takeover_bench_refuses_bad_sizes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["bench", "takeover", "--json", str(tmp_path / "x.json"), "--windows", "x"]) == 2
    assert "--windows" in capsys.readouterr().err
