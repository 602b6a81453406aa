"""`kvrec bench model --quick`: runs in seconds and writes a complete, self-consistent report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvrec.stream.cli import main as kvrec


def test_quick_model_bench_writes_json_and_plot(tmp_path: Path) -> None:
    out, png = tmp_path / "model.json", tmp_path / "model.png"
    code = kvrec(
        ["bench", "model", "--quick", "--backends", "torch-cpu,onnx-cpu",
         "--blocks", "transformer,hstu", "--json", str(out), "--plot", str(png)]
    )
    assert code == 0
    report = json.loads(out.read_text())
    machine = report["machine"]
    assert machine["cores"] >= 1 and machine["cpu"] and machine["versions"]["torch"]
    assert report["settings"]["quick"] is True
    rows = report["results"]
    grid = {(r["block"], r["backend"], r["window"], r["batch"]) for r in rows}
    assert grid == {(k, b, 8, n) for k in ("transformer", "hstu")
                    for b in ("torch-cpu", "onnx-cpu") for n in (1, 16)}
    assert len(rows) == len(grid)
    for row in rows:
        assert row["history_events"] == 2 * (8 - 1) + 1
        assert row["step_us_per_event"] > 0 and row["reencode_us_per_event"] > 0
        ratio = row["reencode_us_per_event"] / row["step_us_per_event"]
        assert row["speedup"] == pytest.approx(ratio, rel=1e-9)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--windows", "8,x"], "--windows"),
        (["--batches", "0"], "--batches"),
        (["--backends", "tpu"], "unknown"),
        (["--blocks", "transformer,lstm"], "--blocks"),
    ],
)
def test_bad_bench_flags_are_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    code = kvrec(["bench", "model", "--json", str(tmp_path / "x.json"), *flags])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kvrec: error:") and message in err and "\n" not in err
    assert not (tmp_path / "x.json").exists()
