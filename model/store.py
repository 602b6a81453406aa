"""The model store: one folder per model version, on a local disk or a mounted shared volume.

    <root>/<model name>/<version>/   a model artifact (model/artifact.py) with its manifest
    <root>/<model name>/.staging-*   a version being written (readers never look inside)

A version is published by copying the artifact into a staging folder and renaming it to its
version: on a POSIX filesystem (a local disk, NFS, a Kubernetes volume) the rename is atomic,
so a reader sees the whole version or none of it. On storage where a rename is a copy (an S3
bucket mounted with s3fs or mountpoint-s3), `manifest.json` is written last and every file's
sha256 is checked against it when the version is loaded, so a half-copied version is refused,
never served. The store keeps the last N versions; the versions named by the current
announcement (what serves, its shadow and its rollback history) are never pruned. Pruning
deletes only what kvrec wrote (model/owned.py): a version folder holding other files, or a
`.staging-*` folder without kvrec's marker, is left alone.

Which version serves is not decided here: the `model-updates` topic says it
(stream/model_updates.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvrec.errors import ArtifactError
from kvrec.model.artifact_files import FILES, MANIFEST
from kvrec.model.owned import MARKER, NotOwned, check_replaceable, mark, remove_owned

log = logging.getLogger(__name__)

STAGING_PREFIX = ".staging-"


@dataclass(frozen=True)
class StoredVersion:
    """One complete version in the store (its manifest is there)."""

    version: str
    path: Path
    created: str  # the manifest's creation time, %Y%m%dT%H%M%S UTC
    manifest_sha256: str  # digest of manifest.json, which holds the digest of every other file
    metrics: dict[str, Any] = field(default_factory=dict, compare=False)


def manifest_digest(artifact_dir: Path) -> str:
    return hashlib.sha256((artifact_dir / MANIFEST).read_bytes()).hexdigest()


class ModelStore:
    def __init__(self, root: str | Path, model_name: str = "default") -> None:
        if not model_name or "/" in model_name or model_name.startswith("."):
            raise ArtifactError(f"model name {model_name!r}: use letters, digits, '-' or '_'")
        self.root = Path(root)
        self.model_name = model_name
        self.folder = self.root / model_name

    def versions(self) -> list[StoredVersion]:
        """Complete versions, oldest first (by creation time, then name)."""
        if not self.folder.is_dir():
            return []
        found = []
        for path in self.folder.iterdir():
            if path.name.startswith(".") or not (path / MANIFEST).is_file():
                continue
            try:
                found.append(self._read(path))
            except ArtifactError:
                continue  # unreadable manifest: not a version (`kvrec models show` says why)
        return sorted(found, key=lambda v: (v.created, v.version))

    def get(self, version: str) -> StoredVersion:
        path = self.folder / version
        if not version or "/" in version or version.startswith(".") or not path.is_dir():
            known = ", ".join(v.version for v in self.versions()[-5:]) or "none"
            raise ArtifactError(
                f"version {version!r} is not in the model store {self.folder} "
                f"(newest: {known}; see `kvrec models list`)"
            )
        return self._read(path)

    def latest(self) -> StoredVersion | None:
        versions = self.versions()
        return versions[-1] if versions else None

    def publish(self, artifact_dir: str | Path) -> StoredVersion:
        """Copy a verified artifact in as its version (the manifest's). Publishing a version
        that is already there with the same manifest is a no-op; a different one is refused."""
        from kvrec.model.artifact import load_artifact

        source = Path(artifact_dir)
        artifact = load_artifact(source)  # refuses a corrupted or incomplete artifact
        target = self.folder / artifact.version
        if target.exists():
            stored = self._read(target)
            if stored.manifest_sha256 != manifest_digest(source):
                raise ArtifactError(f"{target} already holds a different artifact of that version")
            return stored
        self.folder.mkdir(parents=True, exist_ok=True)
        staging = self.folder / f"{STAGING_PREFIX}{artifact.version}-{time.time_ns()}"
        staging.mkdir()
        try:
            mark(staging, "kvrec model store: publish")
            for name in (*FILES, *_extra_files(source)):
                shutil.copyfile(source / name, staging / name)
            shutil.copyfile(source / MANIFEST, staging / MANIFEST)  # last: the done marker
            (staging / MARKER).unlink()  # a version is an artifact: its manifest proves it ours
            staging.rename(target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return self._read(target)

    def prune(self, keep: int, protect: Iterable[str] = ()) -> list[str]:
        """Delete all but the newest `keep` versions, never one in `protect`; also staging
        folders left by a publisher that died. Returns the versions deleted."""
        protected = set(protect)
        versions = self.versions()
        doomed = [v for v in versions[: max(0, len(versions) - keep)] if v.version not in protected]
        deleted = []
        for stored in doomed:
            try:
                check_replaceable(stored.path, kind="artifact")
            except NotOwned as exc:
                log.warning("model store: not pruning version %s: %s", stored.version, exc)
                continue
            trash = stored.path.with_name(f"{STAGING_PREFIX}deleted-{stored.version}-{time.time_ns()}")
            stored.path.rename(trash)  # gone from readers at once, then removed
            shutil.rmtree(trash, ignore_errors=True)
            deleted.append(stored.version)
        if self.folder.is_dir():
            day_ago = time.time() - 86_400
            for path in self.folder.glob(f"{STAGING_PREFIX}*"):
                if path.is_dir() and not path.is_symlink() and path.stat().st_mtime < day_ago:
                    self._remove_stale(path)
        return deleted

    def _remove_stale(self, path: Path) -> None:
        """A staging folder left by a publisher or a prune that died, if kvrec's marker (or a
        complete artifact) proves it kvrec's."""
        try:
            remove_owned(path, kind="artifact")
        except NotOwned as exc:
            log.warning("model store: leaving %s: %s", path, exc)

    def _read(self, path: Path) -> StoredVersion:
        try:
            manifest = json.loads((path / MANIFEST).read_text())
            version, created = str(manifest["version"]), str(manifest["created"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ArtifactError(f"{path / MANIFEST}: unreadable manifest ({exc})") from None
        if version != path.name:
            raise ArtifactError(f"{path}: its manifest says version {version}, not {path.name}")
        try:
            metrics = json.loads((path / "metrics.json").read_text())
        except (OSError, ValueError):
            metrics = {}
        return StoredVersion(version, path, created, manifest_digest(path), metrics)


def _extra_files(source: Path) -> list[str]:
    """Files beside the artifact's own that travel with it (its training curve)."""
    return [name for name in ("training_curve.png",) if (source / name).is_file()]
