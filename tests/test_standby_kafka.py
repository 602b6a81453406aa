"""Standby replicas against the real broker: a member killed mid-transaction, its partitions
taken over from the survivor's standby copies, exactly once (stream/worker/standby.py)."""

from __future__ import annotations

import re
import time
from collections import Counter, defaultdict

import pytest

from stream.schema import decode_recommendation
from tests.test_worker_kafka import (
    PARTITIONS,
    Topics,
    _committed_total,
    _consume,
    _events,
    _expected_windows,
    _produce_events,
    _start_worker,
    _stop,
    _stored_windows,
    _wait_committed,
    artifact,  # noqa: F401 (a fixture)
)
from tests.worker_fixtures import EVENT_TYPES
from tests.worker_reference import ReferenceEvent, assert_same_ranking, reference_recommendations

pytestmark = pytest.mark.kafka

_PROMOTED = re.compile(r"partition (\d+): standby at changelog offset (\d+) promoted")
_RESTORING = re.compile(r"restoring \S+\[(\d+)\]: (\d+) records \(offsets (\d+) to (\d+)\)")


def _wait(condition, what: str, timeout: float = 90.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def test_a_member_killed_mid_transaction_is_taken_over_from_standbys_exactly_once(
    kafka_bootstrap, artifact, tmp_path  # noqa: F811
):
    topics = Topics(kafka_bootstrap, "standby")
    events = _events(3000, users=40, items=60, seed=11)
    first, second = events[:1500], events[1500:]
    extra = ("--session-timeout-ms", "6000", "--standby-replicas", "1")
    logs = {name: tmp_path / f"{name}.log" for name in "ab"}
    a = _start_worker(kafka_bootstrap, topics, artifact.path, tmp_path / "a", "a",
                      "exactly-once", -1, *extra, log=logs["a"])
    b = _start_worker(kafka_bootstrap, topics, artifact.path, tmp_path / "b", "b",
                      "exactly-once", -1, *extra, log=logs["b"])
    try:
        _wait(lambda: (tmp_path / "a").exists() and (tmp_path / "b").exists(),
              "the two workers did not share the partitions")
        _produce_events(kafka_bootstrap, topics.events, first)
        _wait_committed(kafka_bootstrap, topics, len(first))
        # b shadows a's partitions (and a b's)
        _wait(lambda: "standby for" in logs["b"].read_text(), "b keeps no standby")
        time.sleep(2.0)  # the standbys catch up with the first half
        _produce_events(kafka_bootstrap, topics.events, second)
        _wait(lambda: _committed_total(kafka_bootstrap, topics) > len(first) + 200,
              "the second half is not being processed")
        a.kill()  # SIGKILL, most likely inside a transaction (one every 200 ms)
        a.wait()
        assert _committed_total(kafka_bootstrap, topics) < len(events), "killed too late"
        _wait_committed(kafka_bootstrap, topics, len(events))
    finally:
        stderr_b = _stop(b)
        if a.poll() is None:
            _stop(a)
    assert b.returncode == 0, stderr_b[-3000:]
    log_b = logs["b"].read_text()
    promoted = {int(p): int(offset) for p, offset in _PROMOTED.findall(log_b)}
    assert promoted, log_b[-3000:]  # a's partitions came to b through its standbys
    assert set(promoted) <= set(range(PARTITIONS))
    for partition, start in ((int(p), int(s)) for p, _, s, _ in _RESTORING.findall(log_b)):
        if partition in promoted:  # the restore read only the tail past the standby
            assert start > promoted[partition], log_b[-3000:]
    capacity = artifact.config.history_needed
    expected = _expected_windows(events, kafka_bootstrap, topics.events, capacity)
    assert _stored_windows([tmp_path / "b"], topics.events, capacity) == expected  # windows exact
    # exactly one committed recommendation per event (a's open transaction is aborted by the
    # broker when it times out: read_committed sees b's output past it only then)
    recs = _consume(kafka_bootstrap, topics.recommendations, expected=len(events), timeout=150)
    got = [decode_recommendation(m.value()) for m in recs]
    assert Counter((r.user_id, r.event_ts) for r in got) == Counter(
        (e["user_id"], e["ts"]) for e in events)
    # never served from stale state: each recommendation is the one of the complete window
    reference = reference_recommendations(
        artifact,
        [ReferenceEvent(e["user_id"], e["item_id"], EVENT_TYPES.index(e["event_type"]) + 1)
         for e in events],
        k=5, window_capacity=capacity,
    )
    want = {(e["user_id"], e["ts"]): ranking for e, ranking in zip(events, reference, strict=True)}
    by_user: dict[str, int] = defaultdict(int)
    for recommendation in got:
        by_user[recommendation.user_id] += 1
        assert_same_ranking([i.item_id for i in recommendation.items],
                            [i.score for i in recommendation.items],
                            want[(recommendation.user_id, recommendation.event_ts)])
    assert sum(by_user.values()) == len(events)
    print(f"promoted {promoted}")

