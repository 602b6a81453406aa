"""Standby replicas, offline: placement on the ring of members, and standby + tail restore
equal to a full restore whatever the changelog and the commits (stream/worker/standby.py).
The real-broker takeover is in tests/test_standby_kafka.py."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from confluent_kafka import TopicPartition
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from state.changelog import ChangelogRecord
from state.partition import WorkerState
from state.store import WindowStore
from stream.worker.placement import Member, standby_partitions
from stream.worker.recovery import recover_partition
from stream.worker.standby import StandbyReplicas
from tests.fake_kafka import FakeMessage, FakeProducer, FakeRestoreConsumer

CHANGELOG = "g-windows-changelog"


# --- placement -------------------------------------------------------------------------------

@st.composite
def groups(draw: st.DrawFn) -> tuple[list[Member], int]:
    """Members with distinct ids, the partitions split between them (some may own none)."""
    keys = draw(st.lists(st.text("abcdefgh-0123", min_size=1, max_size=6), min_size=1,
                         max_size=7, unique=True))
    partitions = draw(st.integers(1, 16))
    owners = draw(st.lists(st.sampled_from(keys), min_size=partitions, max_size=partitions))
    members = [Member(k, frozenset(p for p, o in enumerate(owners) if o == k)) for k in keys]
    return members, draw(st.integers(0, 8))


def _assert_covered(members: list[Member], replicas: int) -> None:
    copies: dict[int, int] = {}
    for member in members:
        shadowed = standby_partitions(members, member.key, replicas)
        assert not shadowed & member.partitions  # never its own
        for p in shadowed:
            copies[p] = copies.get(p, 0) + 1
    for member in members:
        for p in member.partitions:
            assert copies.get(p, 0) == min(replicas, len(members) - 1)


@given(groups())
def test_each_partition_has_min_n_members_minus_one_standbys_never_its_owner(group) -> None:
    _assert_covered(*group)


@given(groups(), st.data())
def test_a_restart_under_the_same_id_changes_nothing_a_join_or_leave_only_the_ring(group, data):
    members, replicas = group
    before = {m.key: standby_partitions(members, m.key, replicas) for m in members}
    restarted = data.draw(st.sampled_from(members))  # same id, same partitions (sticky)
    again = [m for m in members if m is not restarted] + [Member(restarted.key,
                                                                 restarted.partitions)]
    assert {m.key: standby_partitions(again, m.key, replicas) for m in members} == before
    # a member that leaves: its partitions moved to others; the survivors' copies still cover
    # every owned partition min(N, n - 1) times (the invariant above, on the new group)
    if len(members) > 1:
        gone = data.draw(st.sampled_from(members))
        heir = data.draw(st.sampled_from([m for m in members if m is not gone]))
        left = [Member(m.key, m.partitions | gone.partitions) if m is heir else m
                for m in members if m is not gone]
        _assert_covered(left, replicas)
    joined = [*members, Member("zz-new", frozenset())]  # owns nothing yet: shadows, is not shadowed
    assert standby_partitions(joined, "zz-new", replicas) <= frozenset().union(
        *(m.partitions for m in members))
    assert standby_partitions(members, "not-a-member", replicas) == frozenset()


def test_two_members_one_replica_shadow_each_other() -> None:
    a, b = Member("a", frozenset({0, 2})), Member("b", frozenset({1, 3}))
    assert standby_partitions([a, b], "a", 1) == {1, 3}
    assert standby_partitions([a, b], "b", 1) == {0, 2}
    c = Member("c", frozenset())
    # the ring a -> b -> c -> a: b shadows c, which owns nothing (yet), c shadows a
    assert standby_partitions([a, b, c], "a", 1) == {1, 3}
    assert standby_partitions([a, b, c], "b", 1) == set()
    assert standby_partitions([a, b, c], "c", 1) == {0, 2}
    assert standby_partitions([c, b, a], "c", 2) == {0, 1, 2, 3}


# --- exactness ---------------------------------------------------------------------------------

@dataclass
class FakeStandbyConsumer:
    """The standby consumer: reads the changelog a FakeProducer holds from each assigned
    partition's position; `committed` answers the group's committed input offsets."""

    producer: FakeProducer
    committed_offsets: dict[int, int]
    positions: dict[int, int] = field(default_factory=dict)
    asked: int = 0

    def incremental_assign(self, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self.positions[tp.partition] = max(tp.offset, 0)

    def incremental_unassign(self, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self.positions.pop(tp.partition, None)

    def consume(self, num_messages: int = 1, timeout: float = 0) -> list[FakeMessage]:
        out: list[FakeMessage] = []
        for partition, position in self.positions.items():
            log = self.producer.log.get((CHANGELOG, partition), [])
            taken = log[position : position + num_messages - len(out)]
            self.positions[partition] = position + len(taken)
            out += taken
        return out

    def committed(self, partitions: list[TopicPartition], timeout: float = 0) -> list:
        self.asked += 1
        return [TopicPartition(tp.topic, tp.partition, self.committed_offsets.get(tp.partition,
                                                                                  -1001))
                for tp in partitions]

    def close(self) -> None:
        pass


# a step: a changelog record (user, its input offset), the group committing up to an input
# offset, or the standby polling
steps = st.lists(
    st.one_of(
        st.tuples(st.just("record"), st.sampled_from("abcd"), st.integers(0, 40)),
        st.tuples(st.just("commit"), st.integers(0, 45)),
        st.tuples(st.just("poll"), st.integers(1, 4)),
    ),
    max_size=60,
)


def _append(producer: FakeProducer, user: str, input_offset: int, value: bytes) -> None:
    log = producer.log.setdefault((CHANGELOG, 0), [])
    record = ChangelogRecord(user, value, input_offset)
    log.append(FakeMessage(CHANGELOG, 0, len(log), record.key, value,
                           list(record.headers.items())))


def _contents(state_dir: Path) -> tuple[int | None, dict[str, bytes]]:
    state = WorkerState(state_dir, "g", "events", window_capacity=3)
    try:
        windows = state.open(0)
        return windows.changelog_offset(), dict(windows.store.items())
    finally:
        state.close_all()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps, st.integers(0, 60), st.booleans())
def test_standby_then_tail_restore_equals_a_full_restore(tmp_path_factory, steps, start, owned):
    """Whatever records the changelog holds (some from checkpoints never committed, input
    offsets in any order) and whenever the group commits and the standby polls, the promoted
    standby plus the restore of the tail past it equals a full restore at the same moment. The
    standby starts at step `start`, from this member's own store if it `owned` the partition
    until then."""
    base = tmp_path_factory.mktemp("standby")
    producer, committed = FakeProducer(), {0: -1001}
    consumer = FakeStandbyConsumer(producer, committed)
    standby_dir, full_dir = base / "standby", base / "full"
    state = WorkerState(standby_dir, "g", "events", window_capacity=3)
    standbys = StandbyReplicas(consumer, CHANGELOG, "events", state.group_dir / "standby",
                               state.path, refresh_s=0.0, batch_records=3)
    for n, step in enumerate(steps):
        if n == start:
            _follow(standbys, producer, state, committed[0], owned)
        if step[0] == "record":
            _append(producer, step[1], step[2], f"{step[1]}@{n}".encode())
        elif step[0] == "commit":
            committed[0] = max(committed[0], step[1])  # committed offsets only grow
        elif standbys.partitions():
            for _ in range(step[1]):
                standbys.poll()
    if start >= len(steps):
        _follow(standbys, producer, state, committed[0], owned)
    final = max(committed[0], -1)
    standbys.hand_over(0)
    standbys.close()
    for state_dir in (standby_dir, full_dir):
        restore(producer, WorkerState(state_dir, "g", "events", window_capacity=3), final)
    assert _contents(standby_dir) == _contents(full_dir)


def restore(producer: FakeProducer, state: WorkerState, committed: int) -> None:
    recover_partition(FakeRestoreConsumer(producer), CHANGELOG, state.open(0),  # type: ignore[arg-type]
                      max(committed, -1))
    state.close_all()


def _follow(standbys: StandbyReplicas, producer: FakeProducer, state: WorkerState,
            committed: int, owned: bool) -> None:
    if owned:  # this member owned the partition until now: its store is restored to here
        restore(producer, state, committed)
    standbys.follow([0])


def test_a_standby_holds_back_records_whose_input_offset_is_not_committed(tmp_path: Path) -> None:
    producer, committed = FakeProducer(), {0: 5}
    consumer = FakeStandbyConsumer(producer, committed)
    state = WorkerState(tmp_path, "g", "events", window_capacity=3)
    standbys = StandbyReplicas(consumer, CHANGELOG, "events", state.group_dir / "standby",
                               state.path, refresh_s=0.0)
    standbys.follow([0])
    _append(producer, "a", 3, b"a3")
    _append(producer, "b", 7, b"b7")  # past the committed offset: waits
    _append(producer, "c", 4, b"c4")  # committed, but after one that waits: waits too
    standbys.poll()
    assert standbys.offsets() == {0: 0}
    committed[0] = 8
    standbys.poll()
    assert standbys.offsets() == {0: 2}
    standbys.close()
    store = WindowStore(standbys.path(0))
    assert dict(store.items()) == {"a": b"a3", "b": b"b7", "c": b"c4"}
    store.close()


def test_hand_over_keeps_the_store_that_is_further_along(tmp_path: Path) -> None:
    state = WorkerState(tmp_path, "g", "events", window_capacity=3)
    standbys = StandbyReplicas(FakeStandbyConsumer(FakeProducer(), {}), CHANGELOG, "events",
                               state.group_dir / "standby", state.path)
    state.open(0).restore({"a": b"active"}, 9)
    state.close_all()
    behind = WindowStore(standbys.path(0))
    behind.write({"a": b"standby"}, 4)  # behind the active store
    behind.close()
    assert standbys.hand_over(0) is None
    assert not standbys.path(0).exists()
    assert _contents(tmp_path) == (9, {"a": b"active"})
    # a partition this member gave up becomes its standby, and comes back promoted
    standbys.follow([0])
    assert standbys.offsets() == {0: 9} and not state.path(0).exists()
    assert standbys.hand_over(0) == 9
    assert _contents(tmp_path) == (9, {"a": b"active"})
