"""`kvrec bench retrieval` on a tiny catalog: JSON written, figures measured, bad flags refused."""

from __future__ import annotations

import json
import subprocess
import sys

from kvrec.bench.retrieval import run_retrieval_bench


def test_bench_writes_measured_rows(tmp_path):
    out = tmp_path / "retrieval.json"
    report = run_retrieval_bench(
        [3000], d=16, batch=64, kinds=("exact", "ivfflat", "torch-exact"), exclude=20,
        seconds=0.05, json_path=out,
    )
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    rows = {row["kind"]: row for row in report["results"]}
    assert set(rows) == {"exact", "ivfflat", "torch-exact"}
    assert rows["exact"]["recall@10_vs_exact"] == 1.0
    assert rows["torch-exact"]["recall@10_vs_exact"] == 1.0
    assert rows["ivfflat"]["build_report"]["recall@10"] >= 0.9
    assert all(row["queries_per_s"] > 0 for row in rows.values())


def test_cli_bad_kind_is_one_line_error(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "kvrec.stream.cli", "bench", "retrieval", "--json", str(tmp_path / "x.json"),
         "--kinds", "exact,annoy"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().startswith("kvrec: error: --kinds")
    assert "Traceback" not in result.stderr
