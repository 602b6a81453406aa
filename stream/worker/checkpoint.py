"""The checkpoint: the order in which a batch of work becomes durable (Kafka operations only;
the windows' side is `state.partition.PartitionWindows`' prepare / flush / abort).

1. produce the changed windows to the changelog topic (outputs were produced as they were made);
2. flush the producer and confirm every delivery;
3. commit the input offsets (inside the Kafka transaction with exactly-once, which also
   commits the outputs and changelog records atomically);
4. write the windows to RocksDB with the changelog offset in the same WriteBatch.

An error anywhere in the worker (`abort`) commits nothing: with exactly-once the transaction
is aborted (outputs, dead letters and changelog records with it), and the changed windows are
dropped unwritten, so a restart replays the input from the last commit.

A crash before 3 replays the input from the last commit (outputs may repeat under
at-least-once; the changelog records of the lost attempt carry input offsets that were never
committed and are skipped by recovery). A crash between 3 and 4 leaves RocksDB behind its
changelog, and recovery replays the committed changelog records.
"""

from __future__ import annotations

import time

from confluent_kafka import Consumer, KafkaException, Message, Producer, TopicPartition

from state.partition import WorkerState


class DeliveryError(RuntimeError):
    """A record could not be delivered; the checkpoint is abandoned and the worker stops."""


class Checkpoint:
    def __init__(
        self,
        consumer: Consumer,
        producer: Producer,
        state: WorkerState,
        *,
        input_topic: str,
        changelog_topic: str,
        exactly_once: bool,
        interval_s: float,
        flush_timeout_s: float = 30.0,
    ) -> None:
        self.consumer = consumer
        self.producer = producer
        self.state = state
        self.input_topic = input_topic
        self.changelog_topic = changelog_topic
        self.exactly_once = exactly_once
        self.interval_s = interval_s
        self.flush_timeout_s = flush_timeout_s
        self.started = time.monotonic()
        self.pending_offsets: dict[int, int] = {}  # partition -> last processed input offset
        self._changelog_offsets: dict[int, int] = {}
        self._errors: list[str] = []
        if exactly_once:
            self.producer.begin_transaction()

    def store_offset(self, partition: int, offset: int) -> None:
        """`offset` of `partition` is handled (applied, duplicate or dead-lettered). Offsets
        only move forward: storing an older one changes nothing."""
        if offset > self.pending_offsets.get(partition, -1):
            self.pending_offsets[partition] = offset

    def forget(self, partition: int) -> None:
        """The partition is gone (revoked or lost): nothing of it is committed from here."""
        self.pending_offsets.pop(partition, None)
        self._changelog_offsets.pop(partition, None)

    def due(self) -> bool:
        return bool(self.pending_offsets) and time.monotonic() - self.started >= self.interval_s

    def on_delivery(self, error: object, message: Message) -> None:
        """Delivery callback for every record the worker produces."""
        if error is not None:
            self._errors.append(f"{message.topic()}[{message.partition()}]: {error}")
        elif message.topic() == self.changelog_topic:
            partition = message.partition()
            offset = message.offset()
            if offset > self._changelog_offsets.get(partition, -1):
                self._changelog_offsets[partition] = offset

    def commit(self) -> None:
        """Make everything processed so far durable, in the order described above."""
        offsets = dict(self.pending_offsets)
        if not offsets:
            self.started = time.monotonic()
            return
        # 1. changelog records for every changed window
        for partition, windows in self.state.items():
            for record in windows.prepare():
                self.producer.produce(
                    self.changelog_topic,
                    key=record.key,
                    value=record.window,
                    partition=partition,
                    headers=record.headers,
                    on_delivery=self.on_delivery,
                )
        # 2. flush and confirm
        remaining = self.producer.flush(self.flush_timeout_s)
        if remaining or self._errors:
            errors = "; ".join(self._errors[:5]) or f"{remaining} records still in flight"
            raise DeliveryError(f"checkpoint abandoned, deliveries failed: {errors}")
        # 3. commit input offsets (in the transaction with exactly-once)
        commit = [TopicPartition(self.input_topic, p, o + 1) for p, o in offsets.items()]
        if self.exactly_once:
            self.producer.send_offsets_to_transaction(
                commit, self.consumer.consumer_group_metadata()
            )
            self.producer.commit_transaction()
            self.producer.begin_transaction()
        else:
            try:
                self.consumer.commit(offsets=commit, asynchronous=False)
            except KafkaException as exc:
                raise DeliveryError(f"offset commit failed: {exc}") from exc
        # 4. windows + changelog offset into RocksDB, atomically per partition
        for partition, windows in self.state.items():
            windows.flush(self._changelog_offsets.get(partition))
        self.pending_offsets.clear()
        self.started = time.monotonic()

    def abort(self) -> None:
        """Give up everything since the last commit: nothing of it becomes durable."""
        self.pending_offsets.clear()
        for _, windows in self.state.items():
            windows.abort()
        if self.exactly_once:
            self.producer.abort_transaction(self.flush_timeout_s)
