"""Nothing is deleted that kvrec did not make (model/owned.py and every command that removes or
replaces a path its user named): foreign content survives, the refusal is one line, exit 2."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvrec.deploy.kafka import launcher
from kvrec.model.artifact import FILES, MANIFEST, save_artifact
from kvrec.model.config import ModelConfig
from kvrec.model.encoder import Encoder
from kvrec.model.owned import ARTIFACT_NAMES, MARKER, NotOwned, claim_dir, remove_owned
from kvrec.model.store import STAGING_PREFIX, ModelStore
from kvrec.state.store import WindowStore
from kvrec.stream.cli import main as kvrec

REPO = Path(__file__).resolve().parent.parent


def _tiny_encoder() -> Encoder:
    torch.manual_seed(0)
    config = ModelConfig(n_items=3, n_event_types=1, d_model=8, n_layers=1, n_heads=1, window=2,
                         dropout=0.0)
    return Encoder(config).eval()


ENCODER = _tiny_encoder()


def _save(out: Path) -> None:
    save_artifact(out, ENCODER, item_ids=["", "a", "b", "c"], event_types=["view"],
                  popularity=np.zeros(4, dtype=np.int64), metrics={})


def test_the_artifact_files_are_the_ones_owned_py_knows() -> None:
    assert {*FILES, MANIFEST, "training_curve.png"} <= ARTIFACT_NAMES


# --- the property: random directory contents, every remover ----------------------------------
NAME = st.one_of(
    st.sampled_from(sorted({*ARTIFACT_NAMES, "logs", "notes.txt", "server.properties"})),
    st.text(st.characters(blacklist_characters="/\0", blacklist_categories=("Cs",)),
            min_size=1, max_size=6).filter(lambda n: n not in (".", "..")),
)
KIND = st.sampled_from(["file", "dir", "link-to-file", "link-to-dir", "dangling-link"])
TREE = st.dictionaries(NAME, KIND, max_size=5)
TARGET = st.sampled_from(["dir", "absent", "file", "link-to-dir"])


def _build(root: Path, target: str, tree: dict[str, str], manifest: bool) -> Path:
    outside = root / "outside"
    (outside / "dir").mkdir(parents=True)
    (outside / "file").write_text("the user's")
    (outside / "dir" / "inner").write_text("the user's too")
    path = root / "target"
    if target == "absent":
        return path
    if target == "file":
        path.write_text("a file of the user's")
        return path
    if target == "link-to-dir":
        path.symlink_to(outside / "dir")
        return path
    path.mkdir()
    for name, kind in tree.items():
        entry = path / name
        if kind == "file":
            entry.write_text(f"content of {name!r}")
        elif kind == "dir":
            entry.mkdir()
            (entry / "nested").write_text("nested")
        elif kind == "link-to-file":
            entry.symlink_to(outside / "file")
        elif kind == "link-to-dir":
            entry.symlink_to(outside / "dir")
        else:
            entry.symlink_to(root / "nowhere")
    if manifest and MANIFEST not in tree:
        (path / MANIFEST).write_text(json.dumps({"version": "v", "sha256": {}}))
    return path


def _snapshot(path: Path) -> dict[str, object]:
    """Everything under `path`, symbolic links as links (never followed)."""
    if path.is_symlink():
        return {".": ("link", os.readlink(path))}
    if not path.exists():
        return {}
    if path.is_file():
        return {".": ("file", path.read_bytes())}
    found: dict[str, object] = {".": ("dir",)}
    for entry in path.rglob("*"):
        key = str(entry.relative_to(path))
        if entry.is_symlink():
            found[key] = ("link", os.readlink(entry))
        elif entry.is_dir():
            found[key] = ("dir",)
        else:
            found[key] = ("file", entry.read_bytes())
    return found


def _regular_file(path: Path) -> bool:
    return path.is_file() and not path.is_symlink()


def _provably_kvrecs(path: Path, kind: str) -> bool:
    """The oracle: absent, an empty directory, kvrec's marker, or (artifacts) a kvrec manifest
    with nothing but an artifact's files beside it."""
    if path.is_symlink():
        return False
    if not path.exists():
        return True
    if not path.is_dir():
        return False
    entries = set(os.listdir(path))
    if not entries or _regular_file(path / MARKER):
        return True
    if kind != "artifact" or not _regular_file(path / MANIFEST):
        return False
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except ValueError:
        return False
    valid = isinstance(manifest, dict) and isinstance(manifest.get("sha256"), dict) and (
        "version" in manifest)
    return valid and entries <= ARTIFACT_NAMES


# each: (what it is for, the call, "dir" or "artifact", whether success replaces the contents)
REMOVERS: dict[str, tuple[Callable[[Path], object], str, bool]] = {
    "remove_owned": (remove_owned, "dir", True),
    "remove_owned artifact": (lambda p: remove_owned(p, kind="artifact"), "artifact", True),
    "save_artifact (kvrec train --out)": (_save, "artifact", True),
    "claim_dir (--workdir)": (lambda p: claim_dir(p, "--workdir", "test"), "dir", False),
    "claim_data_dir (broker --data-dir)": (lambda p: launcher.claim_data_dir(p), "dir", False),
}


@pytest.mark.parametrize("remover", list(REMOVERS))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(target=TARGET, tree=TREE, manifest=st.booleans())
def test_foreign_content_is_never_deleted(
    remover: str, target: str, tree: dict[str, str], manifest: bool
) -> None:
    call, kind, replaces = REMOVERS[remover]
    root = Path(tempfile.mkdtemp(prefix="kvrec-test-owned-"))
    try:
        path = _build(root, target, tree, manifest)
        before, outside = _snapshot(path), _snapshot(root / "outside")
        ours = _provably_kvrecs(path, kind)
        try:
            call(path)
        except NotOwned as exc:
            assert not ours, f"refused a path kvrec may replace: {exc}"
            assert len(str(exc).splitlines()) == 1
            assert str(path) in str(exc)
            assert _snapshot(path) == before  # nothing touched
        else:
            assert ours, f"{remover} accepted {before}"
            if not replaces:  # a claimed directory keeps all it held and gains the marker
                after = {k: v for k, v in _snapshot(path).items() if k != MARKER}
                assert after == {k: v for k, v in (before or {".": ("dir",)}).items() if k != MARKER}
                assert _regular_file(path / MARKER)
        assert _snapshot(root / "outside") == outside  # links are removed, never followed
        assert not list(root.glob("target.tmp-*"))  # save_artifact leaves no staging behind
    finally:
        shutil.rmtree(root)


# --- each command ------------------------------------------------------------------------------
def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "kvrec.stream.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("kvrec: error: "), (
        result.stderr[-3000:])
    return result.stderr.strip()


def test_train_refuses_an_out_dir_with_a_foreign_file_and_keeps_it(tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    result = _cli("train", "--format", "synthetic", "--out", str(out), "--epochs", "1",
                  "--d-model", "16", "--layers", "1", "--threads", "1")
    assert _one_line_error(result) == (
        f"kvrec: error: --out {out} holds files kvrec did not write ('thesis.tex'): kvrec "
        "replaces only a model artifact it made; choose a new or empty directory, or remove "
        "them yourself"
    )
    assert (out / "thesis.tex").read_text() == "years of work"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no staging folder either


def test_train_refuses_the_out_dir_before_reading_the_data(tmp_path: Path, capsys) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    code = kvrec(["train", "--data", str(tmp_path / "missing.txt"), "--format", "sasrec",
                  "--out", str(out)])
    assert code == 2
    assert "--out" in capsys.readouterr().err  # not the missing data file: nothing was read


def test_train_replaces_an_earlier_artifact_in_place(tmp_path: Path) -> None:
    out = tmp_path / "model"
    flags = ["train", "--format", "synthetic", "--synthetic-users", "30", "--synthetic-items",
             "20", "--synthetic-events", "400", "--epochs", "1", "--d-model", "16", "--layers",
             "1", "--threads", "1", "--out", str(out)]
    assert kvrec(flags) == 0
    first = json.loads((out / MANIFEST).read_text())["version"]
    assert (out / "training_curve.png").is_file()
    assert kvrec([*flags, "--seed", "7"]) == 0
    assert json.loads((out / MANIFEST).read_text())["version"] != first


def test_an_artifact_with_a_foreign_file_is_refused_and_the_new_one_kept(tmp_path: Path) -> None:
    out = tmp_path / "model"
    _save(out)
    (out / "step.onnx").write_text("put here by the user")
    with pytest.raises(NotOwned, match=r"^" + str(out) + r" holds files kvrec did not write "
                       r"\('step.onnx'\)"):
        _save(out)
    assert (out / "step.onnx").is_file()
    assert not list(tmp_path.glob("model.tmp-*"))  # refused before anything was written


def test_export_refuses_to_overwrite_a_foreign_file_and_replaces_its_own(tmp_path: Path) -> None:
    model = tmp_path / "model"
    _save(model)
    foreign = tmp_path / "report.docx"
    foreign.write_text("not an ONNX file")
    assert kvrec(["export", "--model", str(model), "--out", str(foreign)]) == 2
    assert foreign.read_text() == "not an ONNX file"
    onnx = tmp_path / "step.onnx"
    assert kvrec(["export", "--model", str(model), "--out", str(onnx)]) == 0
    assert kvrec(["export", "--model", str(model), "--out", str(onnx)]) == 0  # its own export


def test_store_prune_deletes_only_what_kvrec_wrote(tmp_path: Path) -> None:
    store = ModelStore(tmp_path, "m")
    for seed in range(3):
        torch.manual_seed(seed)
        encoder = Encoder(ENCODER.config).eval()
        source = tmp_path / f"a{seed}"
        save_artifact(source, encoder, item_ids=["", "a", "b", "c"], event_types=["view"],
                      popularity=np.zeros(4, dtype=np.int64), metrics={})
        store.publish(source)
    versions = [v.version for v in store.versions()]  # oldest first
    (store.folder / versions[0] / "notes.txt").write_text("the operator's")
    day_ago = time.time() - 2 * 86_400
    foreign = store.folder / f"{STAGING_PREFIX}mine"
    foreign.mkdir()
    (foreign / "data.csv").write_text("the operator's")
    ours = store.folder / f"{STAGING_PREFIX}died"
    ours.mkdir()
    (ours / MARKER).write_text("{}")
    (ours / "weights.safetensors").write_text("half")
    for path in (foreign, ours):
        os.utime(path, (day_ago, day_ago))
    assert store.prune(keep=1) == [versions[1]]  # the oldest holds a file kvrec did not write
    assert (store.folder / versions[0] / "notes.txt").is_file()
    assert (foreign / "data.csv").is_file()
    assert not ours.exists()
    assert [v.version for v in store.versions()] == [versions[0], versions[2]]


def _add_foreign(folder: Path, tree: dict[str, str], outside: Path) -> None:
    for name, kind in tree.items():
        entry = folder / name
        if kind == "file":
            entry.write_text("the operator's")
        elif kind == "dir":
            entry.mkdir()
            (entry / "nested").write_text("the operator's")
        else:
            entry.symlink_to(outside)


FOREIGN_TREE = st.dictionaries(
    NAME.filter(lambda n: n not in ARTIFACT_NAMES and n != "LOCK" and not n.startswith("LOG")),
    st.sampled_from(["file", "dir", "link"]), min_size=1, max_size=4,
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tree=FOREIGN_TREE, publish_foreign_version=st.booleans())
def test_store_prune_never_deletes_foreign_content(
    tree: dict[str, str], publish_foreign_version: bool
) -> None:
    root = Path(tempfile.mkdtemp(prefix="kvrec-test-prune-"))
    try:
        outside = root / "outside"
        outside.mkdir()
        (outside / "keep").write_text("the user's")
        store = ModelStore(root / "store", "m")
        for seed in range(2):
            torch.manual_seed(seed)
            source = root / f"a{seed}"
            save_artifact(source, Encoder(ENCODER.config).eval(), item_ids=["", "a", "b", "c"],
                          event_types=["view"], popularity=np.zeros(4, dtype=np.int64),
                          metrics={})
            store.publish(source)
        oldest = store.versions()[0].path
        stale = store.folder / f"{STAGING_PREFIX}someone-elses"
        stale.mkdir()
        folder = oldest if publish_foreign_version else stale
        _add_foreign(folder, tree, outside)
        day_ago = time.time() - 2 * 86_400
        os.utime(stale, (day_ago, day_ago), follow_symlinks=False)
        before = _snapshot(folder)
        store.prune(keep=1)
        assert _snapshot(folder) == before
        assert _snapshot(outside) == {".": ("dir",), "keep": ("file", b"the user's")}
    finally:
        shutil.rmtree(root)


@settings(max_examples=25, deadline=None)
@given(tree=FOREIGN_TREE.map(lambda t: {n: k for n, k in t.items() if not n[:1].isdigit()}))
def test_state_destroy_never_deletes_foreign_content(tree: dict[str, str]) -> None:
    root = Path(tempfile.mkdtemp(prefix="kvrec-test-destroy-"))
    try:
        outside = root / "outside"
        outside.mkdir()
        path = root / "events-0"
        store = WindowStore(path)
        store.write({"u": b"w"}, changelog_offset=1)
        _add_foreign(path, tree, outside)
        before = {k: v for k, v in _snapshot(path).items() if k.split("/")[0] in tree}
        store.destroy()
        after = _snapshot(path)
        assert {k: v for k, v in after.items() if k != "."} == before
    finally:
        shutil.rmtree(root)


def test_state_destroy_leaves_files_rocksdb_did_not_write(tmp_path: Path) -> None:
    path = tmp_path / "events-0"
    store = WindowStore(path)
    store.write({"u": b"w"}, changelog_offset=1)
    (path / "README").write_text("the operator's")
    store.destroy()
    assert sorted(p.name for p in path.iterdir()) == ["README"]


@pytest.mark.parametrize("command", [
    ["demo", "--format", "synthetic", "--bootstrap-servers", "127.0.0.1:1"],
    ["bench", "e2e", "--json", "OUT", "--bootstrap-servers", "127.0.0.1:1"],
    ["bench", "loop", "--json", "OUT"],
    ["bench", "soak", "--json", "OUT", "--bootstrap-servers", "127.0.0.1:1"],
    ["bench", "swap", "--json", "OUT", "--bootstrap-servers", "127.0.0.1:1", "--data", "DATA"],
    ["bench", "floor", "--json", "OUT", "--bootstrap-servers", "127.0.0.1:1"],
    ["bench", "restore", "--json", "OUT", "--bootstrap-servers", "127.0.0.1:1"],
], ids=lambda c: " ".join(c[:2]))
def test_a_workdir_with_foreign_files_is_refused_at_once(tmp_path: Path, command: list[str]) -> None:
    workdir = tmp_path / "work"
    workdir.mkdir()
    (workdir / "model").mkdir()
    (workdir / "model" / "mine.txt").write_text("the user's")
    data = tmp_path / "data.txt"
    data.write_text("".join(f"{u} {i}\n" for u in range(1, 4) for i in range(1, 6)))
    args = [str(tmp_path / "out.json") if a == "OUT" else str(data) if a == "DATA" else a
            for a in command]
    result = _cli(*args, "--workdir", str(workdir), timeout=60)
    assert _one_line_error(result).startswith(
        f"kvrec: error: --workdir {workdir} holds files kvrec did not write ('model')")
    assert (workdir / "model" / "mine.txt").read_text() == "the user's"


def test_broker_refuses_a_data_dir_it_did_not_make(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    (data_dir / "logs").mkdir(parents=True)
    (data_dir / "logs" / "app.log").write_text("the user's logs")
    try:
        result = _cli("broker", "start", "--data-dir", str(data_dir), "--port", "0", timeout=120)
        assert _one_line_error(result) == (
            f"kvrec: error: --data-dir {data_dir} holds files kvrec did not write ('logs'): kvrec "
            "replaces only a directory it made; choose a new or empty directory, or remove them "
            "yourself (the broker formats its data dir afresh at each start)"
        )
    finally:
        _cli("broker", "stop", "--data-dir", str(data_dir))  # only if the old code started one
    assert (data_dir / "logs" / "app.log").read_text() == "the user's logs"


def test_broker_takes_back_a_data_dir_formatted_before_the_marker(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "server.properties").write_text(f"node.id=1\nlog.dirs={data_dir / 'logs'}\n")
    (data_dir / "broker.log").write_text("")
    launcher.claim_data_dir(data_dir)
    assert (data_dir / MARKER).is_file()
