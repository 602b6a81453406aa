"""The model artifact: a directory with weights, config, vocabulary, popularity and a manifest.

    weights.safetensors   encoder weights (safetensors: no pickle anywhere)
    config.json           ModelConfig plus the training settings
    vocab.json            item ids (index i -> item_ids[i]; item_ids[0] = "" is padding),
                          event type names (index i + 1 -> event_types[i])
    popularity.json       interaction count per item index (cold start)
    metrics.json          validation and test metrics, training time
    manifest.json         sha256 of every other file, created time, version

`load_artifact` refuses a directory whose files do not match the manifest, with a message
that names the file. Artifacts are written to a temporary directory and renamed into place,
so a reader never sees half of one. The directory they replace must be absent, empty or an
earlier artifact (model/owned.py): a directory holding anything else is refused, not deleted.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from kvrec.errors import ArtifactError, KvrecError
from kvrec.model.artifact_files import FILES, MANIFEST, check_artifact_dir
from kvrec.model.checksums import file_sha256
from kvrec.model.config import ModelConfig
from kvrec.model.encoder import Encoder
from kvrec.model.owned import NotOwned, check_replaceable, remove_owned


@dataclass
class Artifact:
    path: Path
    version: str
    config: ModelConfig
    encoder: Encoder
    item_ids: list[str]
    item_index: dict[str, int]
    event_types: list[str]
    popularity: np.ndarray
    metrics: dict[str, Any]


def save_artifact(
    out_dir: str | Path,
    encoder: Encoder,
    *,
    item_ids: list[str],
    event_types: list[str],
    popularity: np.ndarray,
    metrics: dict[str, Any],
    settings: dict[str, Any] | None = None,
) -> Artifact:
    out = check_replaceable(out_dir, kind="artifact")
    config = encoder.config
    if len(item_ids) != config.n_items + 1 or item_ids[0] != "":
        raise ValueError("item_ids must have n_items + 1 entries with item_ids[0] == ''")
    staging = out.with_name(out.name + f".tmp-{time.time_ns()}")
    staging.mkdir(parents=True)
    try:
        _write_files(staging, encoder, item_ids, event_types, popularity, metrics, settings)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # made above under a fresh name: ours
        raise
    try:
        remove_owned(out, kind="artifact")  # checked again: it may have changed meanwhile
    except NotOwned as exc:
        raise NotOwned(f"{exc} (the new artifact is kept in {staging})") from None
    staging.rename(out)
    return load_artifact(out)


def _write_files(
    staging: Path,
    encoder: Encoder,
    item_ids: list[str],
    event_types: list[str],
    popularity: np.ndarray,
    metrics: dict[str, Any],
    settings: dict[str, Any] | None,
) -> None:
    config = encoder.config
    weights = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
    save_file(weights, str(staging / "weights.safetensors"))
    documents = {
        "config.json": {"model": config.to_dict(), "training": settings or {}},
        "vocab.json": {"item_ids": item_ids, "event_types": list(event_types)},
        "popularity.json": {"counts": [int(c) for c in popularity]},
        "metrics.json": metrics,
    }
    for name, document in documents.items():
        (staging / name).write_text(json.dumps(document, indent=1))
    hashes = {name: file_sha256(staging / name) for name in FILES}
    created = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    version = f"{created}-{hashes['weights.safetensors'][:8]}"
    manifest = {"version": version, "created": created, "sha256": hashes}
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=1))


def load_artifact(path: str | Path, verify: bool = True) -> Artifact:
    root = check_artifact_dir(path)
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise ArtifactError(f"{root}: {MANIFEST} is missing; not a kvrec model artifact")
    try:
        manifest = json.loads(manifest_path.read_text())
        hashes: dict[str, str] = manifest["sha256"]
        version = str(manifest["version"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ArtifactError(f"{manifest_path}: unreadable manifest ({exc})") from None
    for name in FILES:
        file = root / name
        if not file.is_file():
            raise ArtifactError(
                f"{root}: {name} is missing, so this is not a whole model artifact: copy the "
                "whole directory again, or write a new one with `kvrec train --out DIR` "
                "(`kvrec export` writes only an ONNX file)"
            )
        if verify and file_sha256(file) != hashes.get(name):
            raise ArtifactError(
                f"{file}: sha256 does not match {MANIFEST}; the file was changed or corrupted "
                "after export: re-download or retrain it"
            )
    try:
        config = ModelConfig.from_dict(json.loads((root / "config.json").read_text())["model"])
        vocab = json.loads((root / "vocab.json").read_text())
        counts = json.loads((root / "popularity.json").read_text())["counts"]
        metrics = json.loads((root / "metrics.json").read_text())
        item_ids: list[str] = vocab["item_ids"]
        event_types: list[str] = vocab["event_types"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ArtifactError(f"{root}: malformed artifact file ({exc})") from None
    except KvrecError as exc:
        raise ArtifactError(f"{root}/config.json: {exc}") from None
    if len(item_ids) != config.n_items + 1 or len(counts) != config.n_items + 1:
        raise ArtifactError(f"{root}: vocabulary or popularity size does not match n_items")
    encoder = Encoder(config)
    try:
        weights = load_file(str(root / "weights.safetensors"))
        encoder.load_state_dict(weights, strict=True)
    except (SafetensorError, RuntimeError) as exc:
        raise ArtifactError(f"{root}/weights.safetensors does not fit config.json: {exc}") from None
    encoder.eval()
    return Artifact(
        path=root,
        version=version,
        config=config,
        encoder=encoder,
        item_ids=item_ids,
        item_index={item: i for i, item in enumerate(item_ids) if i > 0},
        event_types=event_types,
        popularity=np.asarray(counts, dtype=np.int64),
        metrics=metrics,
    )



def event_type_map(deployment: list[str], model_types: list[str]) -> list[int]:
    """Index i (1-based position in the deployment's event types, as windows store it) -> the
    model's own index of that name; 0 stays 0. Refuses a model that lacks one of them."""
    own = {name: i + 1 for i, name in enumerate(model_types)}
    missing = [name for name in deployment if name not in own]
    if missing:
        raise ArtifactError(
            f"the model knows the event types {model_types}, not {missing}, which this deployment "
            "accepts (--event-types): retrain with them, or stop accepting them"
        )
    return [0, *(own[name] for name in deployment)]
