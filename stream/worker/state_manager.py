"""The worker's partition state: assignment, revocation and restore (issue 28, lever 7).

The loop (loop.py) only orders the steps; what happens to the state when the group moves
partitions is here:

    assigned  ──► open each partition's store (state/partition.py), restore it from its
                  changelog (recovery.py), then let the input partitions deliver
    revoked   ──► checkpoint (the loop's, unless it failed), close the stores
    lost      ──► close the stores (someone else owns them now: nothing is flushed)
    owning nothing after a rebalance ──► ready only once the group has more members than
                  the input has partitions (`check_idle`)
    every turn    ──► with standby replicas (standby.py): tail the changelog of the partitions
                  placement.py gives this member into their standby stores (`tend`); an
                  assigned partition's standby is handed over before its restore

The manager owns the open stores (`WorkerState`) and the restore consumer; the checkpoint
(checkpoint.py) reads the same `WorkerState`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future

from confluent_kafka import Consumer, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient

from kvrec.state.partition import WorkerState
from kvrec.stream.worker.checkpoint import Checkpoint
from kvrec.stream.worker.metrics import HealthState, WorkerMetrics
from kvrec.stream.worker.placement import Member, standby_partitions
from kvrec.stream.worker.recovery import RecoveryResult, RestoreProgress, recover_partition
from kvrec.stream.worker.settings import WorkerSettings
from kvrec.stream.worker.standby import StandbyReplicas

log = logging.getLogger(__name__)


class StateManager:
    """The stores of the partitions this member owns, through every rebalance."""

    idle_check_s = 1.0  # owning nothing after a rebalance: how often to ask if that is final
    # standby records applied in one turn of the loop at most: a standby catching up (~4,000
    # records/s of 99-event windows here) takes ~0.1 s of a turn, not seconds
    standby_batch_records = 500

    def __init__(
        self,
        settings: WorkerSettings,
        restore_consumer: Consumer,
        metrics: WorkerMetrics,
        health: HealthState,
        recover: Callable[..., RecoveryResult] = recover_partition,
        standby_consumer: Consumer | None = None,
        kafka_config: dict[str, object] | None = None,
    ) -> None:
        self.settings = settings
        self.recover = recover
        self.kafka_config = kafka_config or {}
        self.restore_consumer = restore_consumer
        self.metrics = metrics
        self.health = health
        self.state = WorkerState(
            settings.state_dir, settings.group_id, settings.input_topic, settings.window_capacity,
            settings.windows_in_memory,
        )
        self.checkpoint: Checkpoint | None = None  # set by the loop once it made its checkpoint
        self._idle_check_due: float | None = None  # owning nothing: when to ask if it is final
        self.standbys: StandbyReplicas | None = None
        if standby_consumer is not None and settings.standby_replicas > 0:
            self.standbys = StandbyReplicas(
                standby_consumer, settings.changelog_topic, settings.input_topic, self.state.path,
                batch_records=self.standby_batch_records,
            )
        self._placement: Future | None = None  # the group's description, asked for
        self._placement_due = 0.0
        self._admin: AdminClient | None = None

    # --- the group's callbacks ---------------------------------------------------------------
    def assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Restore each new partition, then let it deliver. Called by the group for every
        round of a rebalance, with the partitions it adds (possibly none). Owning partitions,
        all restored, the worker is ready; owning none, it is ready only once `check_idle`
        finds the group has more members than the input has partitions: a joining member's
        first cooperative round is empty, and its partitions come a round later."""
        self.health.assignment_started()
        self._idle_check_due = None
        committed = {
            tp.partition: tp.offset
            for tp in consumer.committed(
                [TopicPartition(self.settings.input_topic, p.partition) for p in partitions],
                timeout=30.0,
            )
        }
        for tp in partitions:
            self.restore(tp.partition, committed.get(tp.partition, -1))
        consumer.incremental_assign(partitions)
        self.metrics.assigned_partitions.set(len(self.state))
        if len(self.state):
            self.health.assignment_done()
        else:  # an idle member, or the first round of a rebalance that has more to come
            self.health.assignment_empty()
            self._idle_check_due = time.monotonic()
        log.info("assigned %s", sorted(tp.partition for tp in partitions))

    def restore(self, partition: int, committed_input_offset: int) -> None:
        """Open `partition`'s store (take its standby's, open already) and bring it up to the
        end of its changelog."""
        store = None
        if self.standbys is not None:
            store = self.standbys.hand_over(partition)
            if store is not None:
                self.metrics.standby_promotions.inc()
            self._placement_due = 0.0  # the group changed: shadow what it says now
        result = self.recover(
            self.restore_consumer,
            self.settings.changelog_topic,
            self.state.open(partition, store),
            committed_input_offset,
            progress=self._restore_progress,
        )
        self.metrics.restored_windows.inc(result.restored)

    def revoke(self, consumer: Consumer, partitions: list[TopicPartition],
               commit: Callable[[], None] | None) -> None:
        """Checkpoint with `commit` (None after a failure: nothing more is committed, the input
        is replayed), then close the revoked partitions' stores."""
        self.health.revoked()  # ready again when the rebalance's assignment completes
        self._idle_check_due = None
        if commit is not None:
            commit()
        self.drop(consumer, partitions)
        log.info("revoked %s", sorted(tp.partition for tp in partitions))

    def lose(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.health.revoked()
        self._idle_check_due = None
        self.drop(consumer, partitions)  # someone else owns them now: keep nothing unflushed
        log.warning("lost %s", sorted(tp.partition for tp in partitions))

    def drop(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self.state.close(tp.partition)
            if self.checkpoint is not None:
                self.checkpoint.forget(tp.partition)
            self.metrics.forget_partition(tp.partition)
        consumer.incremental_unassign(partitions)
        self.metrics.assigned_partitions.set(len(self.state))
        self._placement_due = 0.0  # the group changed: shadow what it says now

    # --- an idle member ----------------------------------------------------------------------
    def check_idle(self, members: Callable[[], int], input_partitions: Callable[[], int]) -> None:
        """Owning nothing after a rebalance: ready if that is final, the group (`members()`)
        having more members than the input has partitions (`input_partitions()`; the
        cooperative-sticky assignor balances, so a member owns nothing only then); otherwise
        asked again every `idle_check_s` until the next round assigns partitions."""
        if self._idle_check_due is None or time.monotonic() < self._idle_check_due:
            return
        self._idle_check_due = time.monotonic() + self.idle_check_s
        try:
            count, partitions = members(), input_partitions()
        except (KafkaException, TimeoutError) as exc:  # asked again in a second
            log.debug("cannot tell whether this member is idle yet: %s", exc)
            return
        if count > partitions and not len(self.state):
            self._idle_check_due = None
            self.health.assignment_done()
            log.info("idle: %d members, %d input partitions, none for this one", count,
                     partitions)

    def _restore_progress(self, progress: RestoreProgress) -> None:
        self.health.beat()  # the loop does not turn during a restore: the restore is the beat
        partition = str(progress.partition)
        self.metrics.restore_records.labels(partition).set(progress.total)
        self.metrics.restore_records_remaining.labels(partition).set(progress.remaining)

    # --- standby replicas ---------------------------------------------------------------------
    placement_interval_s = 5.0  # how often the group is described again (and after rebalances)

    def tend(self, consumer: Consumer) -> None:
        """One turn's standby work: follow the placement the group's last description gives
        (asked for without waiting), then apply what the changelog has."""
        if self.standbys is None:
            return
        if self._placement is not None and self._placement.done():
            self._place(consumer, self._placement)
            self._placement = None
        if self._placement is None and time.monotonic() >= self._placement_due:
            self._placement_due = time.monotonic() + self.placement_interval_s
            self._placement = self._describe()
        self.standbys.poll()

    def _describe(self) -> Future | None:
        if self._admin is None:
            from kvrec.stream.kafka_config import admin_client

            self._admin = admin_client(self.kafka_config)
        group = self.settings.group_id
        try:
            return self._admin.describe_consumer_groups([group], request_timeout=5.0)[group]
        except KafkaException as exc:  # asked again at the next interval
            log.debug("standby placement: cannot describe the group: %s", exc)
            return None

    def _place(self, consumer: Consumer, described: Future) -> None:
        assert self.standbys is not None
        try:
            members = group_members(described.result(), self.settings.input_topic)
        except (KafkaException, TimeoutError) as exc:
            log.debug("standby placement: cannot describe the group: %s", exc)
            return
        me = self.settings.instance_id if self.settings.static_membership else consumer.memberid()
        owned = {p for p, _ in self.state.items()}
        wanted = standby_partitions(members, me or "", self.settings.standby_replicas) - owned
        if wanted != self.standbys.partitions():
            self.standbys.follow(wanted)
            self.metrics.standby_partitions.set(len(wanted))

    def close(self, *, hung: bool) -> None:
        """Close the stores, and the restore and standby consumers unless the clients hang."""
        self.state.close_all()
        if self.standbys is not None:
            self.standbys.close(close_consumer=not hung)
        if not hung:
            self.restore_consumer.close()


def group_members(description: object, input_topic: str) -> list[Member]:
    """The members of a described consumer group, each with the input partitions it owns; a
    member's id is its group.instance.id (static membership), else its member id."""
    return [
        Member(
            member.group_instance_id or member.member_id,
            frozenset(tp.partition for tp in member.assignment.topic_partitions
                      if tp.topic == input_topic),
        )
        for member in description.members  # type: ignore[attr-defined]
    ]
