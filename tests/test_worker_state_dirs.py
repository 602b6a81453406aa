"""State directories are namespaced by consumer group: two deployments on one volume."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from kvrec.state.partition import WorkerState, group_directory
from kvrec.state.store import WindowStore
from kvrec.state.window import Window
from tests.conftest import create_topics, unique_topic
from tests.test_worker_reliability import OnePartition, _event
from tests.worker_fixtures import make_artifact
from tests.worker_inprocess import ThreadWorker


def test_a_group_id_names_one_directory_inside_the_state_dir(tmp_path: Path) -> None:
    assert group_directory("kvrec-worker") == "kvrec-worker"
    assert group_directory("team.a_b-1") == "team.a_b-1"
    odd = ["a/b", "../x", "..", ".", "a b", "a%2Fb", "ü", "a\\b", "x" * 249]
    names = [group_directory(g) for g in odd]
    assert len(set(names)) == len(odd)  # distinct groups, distinct directories
    for name in names:
        assert "/" not in name and name not in (".", "..") and len(name) <= 200
        assert (tmp_path / name).resolve().parent == tmp_path.resolve()
    with pytest.raises(ValueError):
        group_directory("")
    state = WorkerState(tmp_path, "a/b", "events", window_capacity=4)
    assert state.path(3) == tmp_path / "a%2Fb" / "events-3"


@pytest.mark.kafka
def test_two_groups_on_one_state_dir_keep_separate_stores(kafka_bootstrap, tmp_path) -> None:
    """Two deployments (consumer groups) read the same input with one --state-dir: each keeps
    its own store of every window (before, both opened state_dir/<topic>-<p>)."""
    model = make_artifact(tmp_path / "model", n_items=60, window=4, layers=2).path
    topics = OnePartition(kafka_bootstrap, "groups")
    other_group = unique_topic("groups-other")
    create_topics(kafka_bootstrap, {f"{other_group}-windows-changelog": 1},
                  config={"cleanup.policy": "compact"})
    topics.produce([(b"u1", _event("u1", "sku-1")), (b"u2", _event("u2", "sku-2")),
                    (b"u1", _event("u1", "sku-3"))])
    state_dir = tmp_path / "state"
    first = topics.args(model, state_dir)
    second = topics.args(model, state_dir, "at-least-once", "--group-id", other_group,
                         "--instance-id", "other")
    with ThreadWorker(first) as a, ThreadWorker(second) as b:
        topics.wait_committed(3)
        other = copy.copy(topics)
        other.group = other_group
        other.wait_committed(3)
        assert a.alive and b.alive
    for group in (topics.group, other_group):
        store = WindowStore(state_dir / group / f"{topics.events}-0")
        windows = {user: Window.from_bytes(raw, 7) for user, raw in store.items()}
        store.close()
        assert {u: [e.item_id for e in w] for u, w in windows.items()} == {
            "u1": ["sku-1", "sku-3"], "u2": ["sku-2"],
        }
    assert not (state_dir / f"{topics.events}-0").exists()
