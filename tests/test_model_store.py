"""The model store: versions published whole (staging + rename), listed, pruned, refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvrec.errors import ArtifactError
from kvrec.model.store import STAGING_PREFIX, ModelStore
from tests.worker_fixtures import make_artifact


def test_publish_list_get_and_a_reader_never_sees_a_staging_folder(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store", "games")
    first = make_artifact(tmp_path / "a", seed=1)
    second = make_artifact(tmp_path / "b", seed=2)
    published = store.publish(first.path)
    assert published.version == first.version
    assert published.path == tmp_path / "store" / "games" / first.version
    # a publisher that died half-way leaves a staging folder: never listed
    (store.folder / f"{STAGING_PREFIX}x-1").mkdir()
    store.publish(second.path)
    assert [v.version for v in store.versions()] == sorted(
        [first.version, second.version], key=lambda v: (v.split("-")[0], v)
    )
    assert store.get(first.version).manifest_sha256 == published.manifest_sha256
    assert store.publish(first.path) == published  # the same version again: a no-op


def test_a_corrupted_artifact_is_refused_before_it_enters_the_store(tmp_path: Path) -> None:
    artifact = make_artifact(tmp_path / "a")
    weights = artifact.path / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    store = ModelStore(tmp_path / "store")
    with pytest.raises(ArtifactError, match="sha256"):
        store.publish(artifact.path)
    assert store.versions() == []
    assert not store.folder.exists() or not any(store.folder.iterdir())  # nothing left behind


def test_an_unknown_version_names_the_ones_there(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store")
    stored = store.publish(make_artifact(tmp_path / "a").path)
    with pytest.raises(ArtifactError, match=stored.version):
        store.get("20990101T000000-deadbeef")
    for bad in ("../x", ".staging-1", ""):
        with pytest.raises(ArtifactError):
            store.get(bad)


def test_prune_keeps_the_newest_and_the_protected(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store")
    versions = []
    for seed in range(4):
        artifact = make_artifact(tmp_path / f"a{seed}", seed=seed)
        versions.append(store.publish(artifact.path).version)
    ordered = [v.version for v in store.versions()]
    assert sorted(ordered) == sorted(versions)
    deleted = store.prune(keep=2, protect=[ordered[0]])
    assert deleted == [ordered[1]]
    assert [v.version for v in store.versions()] == [ordered[0], *ordered[2:]]
