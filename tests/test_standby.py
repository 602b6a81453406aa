"""Standby replicas, offline: placement on the ring of members, and standby + tail restore
equal to a full restore whatever the changelog and the commits (stream/worker/standby.py).
The real-broker takeover is in tests/test_standby_kafka.py."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from confluent_kafka import TopicPartition
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvrec.state.changelog import ChangelogRecord
from kvrec.state.partition import WorkerState
from kvrec.state.store import WindowStore
from kvrec.stream.worker.placement import Member, standby_partitions
from kvrec.stream.worker.recovery import recover_partition
from kvrec.stream.worker.standby import StandbyReplicas
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


# a worker's history, simulated: events arrive, are processed (each user's window: the input
# offsets applied to it), checkpoints write the changed windows to the changelog and then
# commit, a crash writes them without the commit (the worker restarts from its last commit
# with the windows a restore gives), and the standby polls in between
steps = st.lists(
    st.one_of(
        st.tuples(st.just("event"), st.sampled_from("abcd")),
        st.tuples(st.just("process"), st.integers(1, 5)),
        st.tuples(st.just("checkpoint")),
        st.tuples(st.just("crash")),
        st.tuples(st.just("poll"), st.integers(1, 4)),
    ),
    max_size=80,
)


@dataclass
class SimulatedWorker:
    """The partition's owner, as far as its changelog and commits go."""

    producer: FakeProducer
    committed: dict[int, int]
    inputs: list[str] = field(default_factory=list)
    position: int = 0
    windows: dict[str, list[int]] = field(default_factory=dict)
    dirty: set[str] = field(default_factory=set)

    def process(self, count: int) -> None:
        for offset in range(self.position, min(len(self.inputs), self.position + count)):
            window = self.windows.setdefault(self.inputs[offset], [])
            if not window or offset > window[-1]:  # a replayed event applied already: skipped
                window.append(offset)
                self.dirty.add(self.inputs[offset])
            self.position = offset + 1

    def checkpoint(self, commit: bool) -> None:
        for user in sorted(self.dirty):
            window = self.windows[user]
            _append(self.producer, user, window[-1], ",".join(map(str, window)).encode())
        self.dirty.clear()
        if commit:
            self.committed[0] = self.position
        else:  # crashed before the commit: restart from it, windows as a restore gives them
            self.position = max(self.committed[0], 0)
            self.windows = {}
            for message in self.producer.log.get((CHANGELOG, 0), []):
                offset = int(dict(message.headers())["kvrec.input_offset"])
                if offset < self.committed[0]:
                    self.windows[message.key().decode()] = [
                        int(o) for o in message.value().decode().split(",")]


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
@given(steps, st.integers(0, 80), st.booleans())
def test_standby_then_tail_restore_equals_a_full_restore(tmp_path_factory, steps, start, owned):
    """Whatever a worker's history (checkpoints, crashes between a checkpoint's changelog
    records and its commit, replays) and whenever the standby polls, the promoted standby plus
    the restore of the tail past it equals a full restore at the same moment. The standby
    starts at step `start`, from this member's own store if it `owned` the partition until
    then (restored as of then)."""
    base = tmp_path_factory.mktemp("standby")
    producer, committed = FakeProducer(), {0: -1001}
    worker = SimulatedWorker(producer, committed)
    consumer = FakeStandbyConsumer(producer, committed)
    standby_dir, full_dir = base / "standby", base / "full"
    state = WorkerState(standby_dir, "g", "events", window_capacity=3)
    standbys = StandbyReplicas(consumer, CHANGELOG, "events", state.path, refresh_s=0.0,
                               batch_records=3)
    for n, step in enumerate(steps):
        if n == start:
            _follow(standbys, producer, state, committed[0], owned)
        if step[0] == "event":
            worker.inputs.append(step[1])
        elif step[0] == "process":
            worker.process(step[1])
        elif step[0] in ("checkpoint", "crash"):
            worker.checkpoint(commit=step[0] == "checkpoint")
        elif standbys.partitions():
            for _ in range(step[1]):
                standbys.poll()
    if start >= len(steps):
        _follow(standbys, producer, state, committed[0], owned)
    final = max(committed[0], -1)
    promoted = standbys.hand_over(0)  # the assignment: the open store, then its tail
    assert promoted is not None
    standbys.close()
    restore(producer, state, final, promoted)
    restore(producer, WorkerState(full_dir, "g", "events", window_capacity=3), final)
    assert _contents(standby_dir) == _contents(full_dir)


def restore(producer: FakeProducer, state: WorkerState, committed: int,
            store: WindowStore | None = None) -> None:
    recover_partition(FakeRestoreConsumer(producer), CHANGELOG, state.open(0, store),  # type: ignore[arg-type]
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
    standbys = StandbyReplicas(consumer, CHANGELOG, "events", state.path, refresh_s=0.0)
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


def test_a_partition_given_up_is_shadowed_from_its_store_and_handed_back_open(
    tmp_path: Path
) -> None:
    state = WorkerState(tmp_path, "g", "events", window_capacity=3)
    standbys = StandbyReplicas(FakeStandbyConsumer(FakeProducer(), {}), CHANGELOG, "events",
                               state.path)
    assert standbys.hand_over(0) is None  # not shadowed: the restore opens the store itself
    state.open(0).restore({"a": b"active"}, 9)
    state.close(0)  # revoked
    standbys.follow([0])
    assert standbys.offsets() == {0: 9}  # from the store it had, not from nothing
    store = standbys.hand_over(0)
    assert store is not None and standbys.partitions() == frozenset()
    windows = state.open(0, store)  # the same open store, active again
    assert windows.changelog_offset() == 9 and windows.store.get("a") == b"active"
    state.close_all()


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps)
def test_a_full_restore_holds_exactly_the_committed_work(tmp_path_factory, steps):
    """The restore's own rule (stream/worker/recovery.py): whatever the history (checkpoints,
    crashes between a checkpoint's changelog records and its commit, replays), a restore gives
    each user the window of exactly the events below the committed input offset; a record of
    a checkpoint that never committed is left out, and so is nothing else."""
    producer, committed = FakeProducer(), {0: -1001}
    worker = SimulatedWorker(producer, committed)
    for step in steps:
        if step[0] == "event":
            worker.inputs.append(step[1])
        elif step[0] == "process":
            worker.process(step[1])
        elif step[0] in ("checkpoint", "crash"):
            worker.checkpoint(commit=step[0] == "checkpoint")
    final = max(committed[0], -1)
    state_dir = tmp_path_factory.mktemp("restore")
    restore(producer, WorkerState(state_dir, "g", "events", window_capacity=3), final)
    expected: dict[str, list[int]] = {}
    for offset in range(max(final, 0)):
        expected.setdefault(worker.inputs[offset], []).append(offset)
    _, stored = _contents(state_dir)
    assert {user.decode() if isinstance(user, bytes) else user: [int(o) for o in value.decode().split(",")]
            for user, value in stored.items()} == expected
