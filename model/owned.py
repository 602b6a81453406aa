"""What kvrec may delete: only what it provably made.

Every command that removes or replaces a path the person running it named (`kvrec train --out`,
a bench's or the demo's `--workdir`, the broker's `--data-dir`, the model store's staging
folders) asks this module first. A path may go when it is

    absent, or an empty directory,
    a directory kvrec made: it holds the marker file `.kvrec-owned` (written by `claim_dir`),
    a model artifact (`kind="artifact"`): a kvrec `manifest.json` and nothing but the files of
    an artifact beside it.

Anything else (a file, a symbolic link, a directory with other content) is refused with a
`NotOwned` error, one line that names what is there and what to do, exit status 2: kvrec never
deletes a file it did not write.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from kvrec.errors import ConfigError

MARKER = ".kvrec-owned"
ARTIFACT_MANIFEST = "manifest.json"
# the files `save_artifact` writes, and the training curve `kvrec train` puts beside them
ARTIFACT_NAMES = frozenset({
    "weights.safetensors", "config.json", "vocab.json", "popularity.json", "metrics.json",
    ARTIFACT_MANIFEST, "training_curve.png", MARKER,
})
_SHOWN = 3  # foreign names a refusal lists


class NotOwned(ConfigError):
    """A path kvrec was asked to remove or replace holds something kvrec did not write."""


def _label(path: Path, flag: str | None) -> str:
    return f"{flag} {path}" if flag else str(path)


def _has_marker(path: Path) -> bool:
    marker = path / MARKER
    return marker.is_file() and not marker.is_symlink()


def _is_artifact_manifest(path: Path) -> bool:
    manifest = path / ARTIFACT_MANIFEST
    if manifest.is_symlink() or not manifest.is_file():
        return False
    try:
        document = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(document, dict) and isinstance(document.get("sha256"), dict) and (
        "version" in document
    )


def foreign_entries(path: Path, kind: str = "dir") -> list[str]:
    """The names in directory `path` that keep it from being kvrec's own; [] if it is."""
    entries = sorted(entry.name for entry in path.iterdir())
    if not entries or _has_marker(path):
        return []
    if kind == "artifact" and _is_artifact_manifest(path):
        return [name for name in entries if name not in ARTIFACT_NAMES]
    return entries


def check_replaceable(path: str | Path, flag: str | None = None, kind: str = "dir") -> Path:
    """Refuse (NotOwned) unless `path` is absent, an empty directory or kvrec's own."""
    path = Path(path)
    label = _label(path, flag)
    if path.is_symlink():
        raise NotOwned(
            f"{label} is a symbolic link: kvrec does not replace it; name a new directory"
        )
    if not path.exists():
        return path
    if not path.is_dir():
        raise NotOwned(
            f"{label} is a file kvrec did not write: name a new or empty directory, "
            "or remove it yourself"
        )
    try:
        foreign = foreign_entries(path, kind)
    except OSError as exc:
        raise NotOwned(f"{label} cannot be read ({exc.strerror}): name another directory") from None
    if foreign:
        shown = ", ".join(repr(name) for name in foreign[:_SHOWN])
        more = f" and {len(foreign) - _SHOWN} more" if len(foreign) > _SHOWN else ""
        what = "a model artifact" if kind == "artifact" else "a directory"
        raise NotOwned(
            f"{label} holds files kvrec did not write ({shown}{more}): kvrec replaces only "
            f"{what} it made; choose a new or empty directory, or remove them yourself"
        )
    return path


def remove_owned(path: str | Path, flag: str | None = None, kind: str = "dir") -> None:
    """Delete `path` if `check_replaceable` allows it (symbolic links inside are removed, never
    followed); refuse with NotOwned otherwise. An absent path is fine."""
    path = check_replaceable(path, flag, kind)
    if path.exists():
        shutil.rmtree(path)


def mark(path: Path, made_by: str) -> None:
    """Write the marker into directory `path`, which kvrec made (or found empty)."""
    marker = path / MARKER
    if not marker.is_file():
        marker.write_text(json.dumps({"made_by": made_by, "at": time.time()}) + "\n")


def claim_dir(path: str | Path, flag: str | None, made_by: str) -> Path:
    """The working directory `path`, made (or taken when empty or already kvrec's) and marked
    as kvrec's; refuses one that holds anything else."""
    path = check_replaceable(path, flag, "dir")
    path.mkdir(parents=True, exist_ok=True)
    mark(path, made_by)
    return path


def work_dir(workdir: str | None, prefix: str, made_by: str) -> Path:
    """A command's `--workdir`: made and marked (a fresh temporary one when not given), or
    taken when empty or kvrec's own; refused when it holds anything else."""
    import tempfile

    path = workdir or tempfile.mkdtemp(prefix=prefix)
    return claim_dir(path, "--workdir", made_by)
