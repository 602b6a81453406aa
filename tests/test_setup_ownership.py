"""deploy/setup.sh removes only what it made: the shared environment and a checkout's `.venv`.

Each case runs the real script on a copy of the checkout's `deploy/` (same lock, so the same
shared-environment name) with the cache and the checkout in temporary folders; none installs
anything: a refusal happens before pip, and the accepted cases reuse the complete environment.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _checkout(tmp_path: Path) -> Path:
    root = tmp_path / "checkout"
    (root / "deploy").mkdir(parents=True)
    for name in ("setup.sh", "requirements.lock"):
        shutil.copy(REPO / "deploy" / name, root / "deploy" / name)
    return root


def _run(root: Path, cache: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KVREC_CACHE": str(cache)}
    return subprocess.run(["bash", str(root / "deploy" / "setup.sh")], env=env,
                          capture_output=True, text=True, timeout=120)


def _deps_name() -> str:
    # the shared environment this checkout's .venv points at: `venv-<lock hash>`
    return Path((REPO / ".venv" / ".kvrec-deps").read_text().strip()).name


def test_a_foreign_folder_where_the_shared_environment_goes_is_refused(tmp_path: Path) -> None:
    root, cache = _checkout(tmp_path), tmp_path / "cache"
    foreign = cache / _deps_name()
    foreign.mkdir(parents=True)
    (foreign / "thesis.tex").write_text("years of work")
    result = _run(root, cache)
    assert result.returncode == 2, result.stderr
    assert (foreign / "thesis.tex").read_text() == "years of work"
    lines = result.stderr.strip().splitlines()
    assert "was not made by kvrec setup" in lines[-1] and "KVREC_CACHE" in lines[-1], lines
    assert not (root / ".venv").exists()


def test_a_foreign_venv_in_the_checkout_is_refused_and_setups_own_is_renewed(tmp_path: Path) -> None:
    root = _checkout(tmp_path)
    cache = Path((REPO / ".venv" / ".kvrec-deps").read_text().strip()).parent  # complete: no pip
    venv = root / ".venv"
    venv.mkdir()
    (venv / "mine.txt").write_text("a person's own environment")
    result = _run(root, cache)
    assert result.returncode == 2, result.stderr
    assert "was not made by kvrec setup" in result.stderr.strip().splitlines()[-1]
    assert (venv / "mine.txt").read_text() == "a person's own environment"

    shutil.rmtree(venv)
    assert _run(root, cache).returncode == 0  # absent: made
    (venv / ".kvrec-deps").write_text("/an/older/lock\n")  # setup's own, for another lock
    result = _run(root, cache)
    assert result.returncode == 0, result.stderr
    assert (venv / ".kvrec-deps").read_text().strip().endswith(_deps_name())
    assert (venv / "bin" / "kvrec").is_file()
