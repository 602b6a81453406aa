"""The names of a model artifact's files, in a module that imports neither torch nor numpy: the
model store (`model/store.py`) and the commands that check an artifact's folder before their
heavy imports use them without loading the model code (`model/artifact.py` reads the files)."""

from __future__ import annotations

from pathlib import Path

from kvrec.errors import ArtifactError

FILES = ("weights.safetensors", "config.json", "vocab.json", "popularity.json", "metrics.json")
MANIFEST = "manifest.json"


def check_artifact_dir(path: str | Path) -> Path:
    """`path` if it is a folder, else the `ArtifactError` that `load_artifact` would give."""
    root = Path(path)
    if not root.is_dir():
        raise ArtifactError(f"{root}: no such model artifact directory (run `kvrec train`)")
    return root
