"""Standby replicas: warm copies of partitions other members own (`--standby-replicas N`).

Each standby partition has its own RocksDB store, in the place its active store has when the
member owns it (`state_dir/<group>/<topic>-<p>`: a member holds one store per partition, active
while it owns the partition, standby while it shadows it), that a separate consumer keeps up to
date by tailing the partition's changelog (assigned by hand, never a group member,
read_committed). When the group assigns the partition to this member, the state manager takes
the open store over (`hand_over`: no close, no reopen, which cost seconds for a store just
filled, RocksDB waiting for its compactions), and the ordinary restore (recovery.py) reads only
the changelog past its offset, up to the end, before the partition delivers: a standby that is
behind catches up before it serves.

Exactness. A store reflects exactly one changelog offset, as a full restore would have built
it: recovery applies a record only if its input offset was committed (a checkpoint that
crashed before its commit leaves records the next owner writes again). A standby applies the
same rule in changelog order, and a record whose input offset is not committed yet (at-least-
once: produced before the commit; exactly-once: the commit's offsets not visible yet) waits,
with everything after it, until the group's committed offset passes it (asked again every
`refresh_s` while something waits). Committed offsets only grow, so each record the standby
applied is one a full restore at any later moment applies too, and the tail past its offset is
restored by the same code: standby + tail = full restore (tests/test_standby.py checks it).

Which partitions to shadow: placement.py. A partition this member owned and gives up becomes
its standby from the store it had, so a member that gets it back later restores only the
tail.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition

from kvrec.state.changelog import ChangelogRecord, read_record
from kvrec.state.store import WindowStore
from kvrec.stream.kafka_logs import kafka_log

log = logging.getLogger(__name__)


def standby_consumer_config(kafka_config: dict[str, object], group_id: str) -> dict[str, object]:
    """The standby consumer's settings: assigned partitions by hand (it never subscribes, so it
    never joins the group), committed records only. Its group id is the workers' own: it reads
    the group's committed input offsets (and never commits any)."""
    return {
        **kafka_config,
        "group.id": group_id,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "isolation.level": "read_committed",
        "auto.offset.reset": "earliest",
        "fetch.wait.max.ms": 100,
    }


@dataclass
class _Shadow:
    """One standby partition: its store, the changelog offset it reflects, and the records
    read past it that wait for their input offset to be committed."""

    store: WindowStore
    offset: int | None
    pending: deque[tuple[int, ChangelogRecord | None]] = field(default_factory=deque)


class StandbyReplicas:
    """The standby stores of one member and the consumer that keeps them up to date."""

    def __init__(
        self,
        consumer: Consumer,
        changelog_topic: str,
        input_topic: str,
        path: Callable[[int], Path],
        *,
        refresh_s: float = 0.5,
        batch_records: int = 5_000,
    ) -> None:
        self.consumer = consumer
        self.changelog_topic = changelog_topic
        self.input_topic = input_topic
        self.path = path  # a partition's store (WorkerState.path: where the active one is)
        self.refresh_s = refresh_s
        self.batch_records = batch_records
        self._shadows: dict[int, _Shadow] = {}
        self._committed: dict[int, int] = {}
        self._refresh_due = 0.0

    def partitions(self) -> frozenset[int]:
        return frozenset(self._shadows)

    def offsets(self) -> dict[int, int | None]:
        """The changelog offset each standby store reflects."""
        return {p: shadow.offset for p, shadow in self._shadows.items()}

    # --- which partitions ----------------------------------------------------------------------
    def follow(self, partitions: Iterable[int]) -> None:
        """Shadow exactly `partitions` (none of them owned by this member: their stores are
        closed)."""
        wanted = set(partitions)
        for partition in sorted(set(self._shadows) - wanted):
            self.unfollow(partition)
        started = []
        for partition in sorted(wanted - set(self._shadows)):
            store = WindowStore(self.path(partition))  # one this member gave up: as it left it
            offset = store.changelog_offset()
            self._shadows[partition] = _Shadow(store, offset)
            start = OFFSET_BEGINNING if offset is None else offset + 1
            started.append(TopicPartition(self.changelog_topic, partition, start))
        if started:
            self.consumer.incremental_assign(started)
            log.info("standby for %s", sorted(tp.partition for tp in started))

    def _stop(self, partition: int) -> _Shadow | None:
        shadow = self._shadows.pop(partition, None)
        if shadow is not None:
            self.consumer.incremental_unassign([TopicPartition(self.changelog_topic, partition)])
        return shadow

    def unfollow(self, partition: int) -> None:
        """Stop shadowing `partition` and close its store (kept on disk: a later standby or
        takeover starts from it)."""
        shadow = self._stop(partition)
        if shadow is not None:
            shadow.store.close()

    def hand_over(self, partition: int) -> WindowStore | None:
        """The group assigned `partition` to this member: stop shadowing it and hand its open
        store over (None if it was not shadowed). Its records that wait for their input
        offset are dropped: the restore reads them again past the store's offset."""
        shadow = self._stop(partition)
        if shadow is None:
            return None
        log.info("partition %d: standby at changelog offset %s promoted", partition,
                 shadow.offset)
        return shadow.store

    # --- tailing ---------------------------------------------------------------------------------
    def poll(self) -> int:
        """Read what the changelog has (without waiting) and apply what is committed; how many
        records were read."""
        if not self._shadows:
            return 0
        messages = self.consumer.consume(num_messages=self.batch_records, timeout=0)
        for message in messages:
            error = message.error()
            if error is not None:
                if error.code() != KafkaError._PARTITION_EOF:
                    kafka_log.warning("standby consumer error: %s", error)
                continue
            shadow = self._shadows.get(message.partition())
            if shadow is None:
                continue  # no longer shadowed
            offset = message.offset()
            newest = shadow.pending[-1][0] if shadow.pending else shadow.offset
            if newest is not None and offset <= newest:
                continue  # read again after a re-assignment
            record = read_record(message.key(), message.value(), message.headers())
            shadow.pending.append((offset, record))
        self.apply()
        return len(messages)

    def apply(self) -> None:
        """Write each standby's pending records whose input offsets are committed, in changelog
        order, up to the first that is not (asking the group again when one waits)."""
        waiting = [p for p, shadow in self._shadows.items() if not self._apply(p, shadow)]
        if waiting and time.monotonic() >= self._refresh_due:
            self._refresh_due = time.monotonic() + self.refresh_s
            self._refresh_committed(waiting)
            for partition in waiting:
                self._apply(partition, self._shadows[partition])

    def _apply(self, partition: int, shadow: _Shadow) -> bool:
        """Apply the committed prefix of `shadow`'s pending records; False if some still wait."""
        committed = self._committed.get(partition, -1)
        windows: dict[str, bytes] = {}
        last = None
        pending = shadow.pending
        while pending:
            offset, record = pending[0]
            if record is not None and record.input_offset >= committed:
                break  # not committed yet: it and everything after it wait
            if record is not None:
                windows[record.user_id] = record.window
            last = offset
            pending.popleft()
        if last is not None:
            shadow.store.write(windows, last)
            shadow.offset = last
        return not pending

    def _refresh_committed(self, partitions: list[int]) -> None:
        asked = [TopicPartition(self.input_topic, p) for p in partitions]
        try:
            answer = self.consumer.committed(asked, timeout=5.0)
        except KafkaException as exc:  # asked again later
            log.debug("standby: the committed offsets are not known yet: %s", exc)
            return
        for tp in answer:
            if tp.offset >= 0:
                self._committed[tp.partition] = max(tp.offset, self._committed.get(tp.partition, -1))

    def close(self, *, close_consumer: bool = True) -> None:
        for partition in list(self._shadows):
            self._shadows.pop(partition).store.close()
        if close_consumer:  # not when the clients hang (the process exits)
            self.consumer.close()
