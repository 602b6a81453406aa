"""One namespace: everything kvrec installs lives under `kvrec`, and no code names the design's
folders as top-level packages (in a user's environment another `model` or `state` would break
kvrec, or be broken by it)."""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FOLDERS = ("stream", "model", "state", "deploy", "bench")
SOURCES = (*FOLDERS, "kvrec", "tests")
SKIP = {"cache", "__pycache__"}


def _python_files() -> list[Path]:
    return [path for folder in SOURCES for path in (REPO / folder).rglob("*.py")
            if not SKIP & set(path.relative_to(REPO).parts)]


def _bare_imports(source: str) -> list[str]:
    """The modules a source imports whose first name is one of the design's folders."""
    found = []
    for node in ast.walk(ast.parse(source)):
        names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                 else [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level
                 else [])
        found += [name for name in names if name.split(".")[0] in FOLDERS]
    return found


def test_the_check_sees_a_bare_import() -> None:
    assert _bare_imports("from model.encoder import X\nimport stream.cli as c\n") == [
        "model.encoder", "stream.cli"]
    assert _bare_imports("from kvrec.model.encoder import X\nfrom .x import y\nimport modeling\n") == []


def test_no_code_imports_a_folder_as_a_top_level_package() -> None:
    offenders = {str(path.relative_to(REPO)): bare for path in _python_files()
                 if (bare := _bare_imports(path.read_text()))}
    assert offenders == {}


def test_no_command_runs_a_folder_as_a_top_level_module() -> None:
    run_as_top = re.compile(rf"""-m["',\s]+({"|".join(FOLDERS)})\.\w""")
    texts = [*_python_files(), *REPO.glob("*.md"), *(REPO / "docs").rglob("*.md"),
             *(REPO / "deploy").rglob("*.sh"), *(REPO / "deploy").rglob("*.md"),
             *(REPO / "deploy").rglob("*.yaml"), *(REPO / "deploy").rglob("Dockerfile*"),
             *(REPO / "bench").rglob("*.sh"), REPO / "pyproject.toml"]
    offenders = [f"{path.relative_to(REPO)}: {match.group(0)}" for path in texts
                 if not SKIP & set(path.relative_to(REPO).parts)
                 for match in run_as_top.finditer(path.read_text())]
    assert offenders == []


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Built from a copy of the sources (an in-tree build/ left by an earlier build would hide a
    package the configuration no longer lists)."""
    source, out = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("wheel")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (REPO / name).exists():
            shutil.copy(REPO / name, source / name)
    for folder in (*FOLDERS, "kvrec"):
        shutil.copytree(REPO / folder, source / folder,
                        ignore=shutil.ignore_patterns("cache", "__pycache__", "results", "datasets"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(out), str(source)], check=True, capture_output=True, cwd=out)
    (built,) = out.glob("kvrec-*.whl")
    return built


def test_the_wheel_installs_only_the_kvrec_namespace(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names} == {"kvrec", wheel.name.split("-py3")[0] + ".dist-info"}
    packages = {str(init.parent.relative_to(REPO)).replace("/", ".") for folder in FOLDERS
                for init in (REPO / folder).rglob("__init__.py")
                if not SKIP & set(init.relative_to(REPO).parts)}
    assert {f"kvrec/{package.replace('.', '/')}/__init__.py" for package in packages} <= set(names)
    assert {"kvrec/stream/schemas/event.v1.json", "kvrec/deploy/kafka/pom.xml"} <= set(names)
    entry_points = zipfile.ZipFile(wheel).read(
        next(name for name in names if name.endswith("entry_points.txt"))).decode()
    assert "kvrec = kvrec.stream.cli:main" in entry_points


def test_the_installed_wheel_runs_from_its_own_files(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                    str(wheel)], check=True, capture_output=True)
    env = {**os.environ, "PYTHONPATH": str(target)}
    done = subprocess.run(
        [sys.executable, "-c", "import kvrec.stream.cli as cli, kvrec.state.window as window; "
                               "print(cli.__file__); print(window.__file__); cli.main(['--version'])"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    cli_file, window_file, version = done.stdout.split("\n")[:3]
    assert cli_file.startswith(str(target)) and window_file.startswith(str(target))
    assert version.startswith("kvrec")
