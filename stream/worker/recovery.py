"""Restore a partition's windows from its changelog when the partition is assigned.

The store knows the changelog offset it reflects. Recovery reads the changelog partition from
the next offset up to its end and writes each record to the store, except records whose input
offset was never committed (produced by a checkpoint that crashed before its commit): the new
owner will process those input events again and write them anew.

The worker calls this from its assignment callback, so the input partitions do not deliver
events before their windows are complete (the same effect as pausing them).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Message, TopicPartition

from stream.worker.checkpoint import INPUT_OFFSET_HEADER
from stream.worker.partitions import PartitionState

log = logging.getLogger(__name__)


def restore_consumer_config(kafka_config: dict[str, object], group_id: str) -> dict[str, object]:
    """The restore consumer's settings: it is assigned partitions (never subscribes), reads
    committed records only, and learns it reached the end from a PARTITION_EOF event. A short
    fetch wait: at the end of a partition the broker holds the last fetch that long."""
    return {
        **kafka_config,
        "group.id": f"{group_id}-restore",
        "enable.auto.commit": False,
        "enable.partition.eof": True,
        "isolation.level": "read_committed",
        "fetch.wait.max.ms": 10,
    }


@dataclass
class RecoveryResult:
    partition: int
    restored: int  # windows written from the changelog
    skipped: int  # records whose input offset was never committed
    seconds: float


def recover_partition(
    restore_consumer: Consumer,
    changelog_topic: str,
    state: PartitionState,
    committed_input_offset: int,
    *,
    timeout_s: float = 120.0,
) -> RecoveryResult:
    """Bring `state.store` up to the end of its changelog partition.

    `committed_input_offset` is the group's committed offset of the input partition (the next
    offset to consume, or a negative value when nothing was committed yet).
    """
    started = time.monotonic()
    tp = TopicPartition(changelog_topic, state.partition)
    low, high = restore_consumer.get_watermark_offsets(tp, timeout=10.0)
    stored = state.store.changelog_offset()
    start = low if stored is None else max(stored + 1, low)
    restored = skipped = 0
    if start >= high:
        return RecoveryResult(state.partition, 0, 0, time.monotonic() - started)
    tp.offset = start if start > 0 else OFFSET_BEGINNING
    restore_consumer.assign([tp])  # the restore consumer has enable.partition.eof on
    deadline = started + timeout_s
    try:
        reached_end = False
        while not reached_end:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"restoring {changelog_topic}[{state.partition}] took over {timeout_s:.0f}s"
                )
            batch: dict[str, bytes] = {}
            last_offset: int | None = None
            # a short wait: `consume` returns when the batch is full or the wait is over, and
            # a long wait would be paid by every small partition (it was 1 s per partition)
            for message in restore_consumer.consume(num_messages=10_000, timeout=0.05):
                error = message.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        reached_end = True
                        continue
                    raise RuntimeError(f"changelog read failed: {error}")
                last_offset = message.offset()
                user_id = _user_id(message)
                if user_id is None or message.value() is None:
                    skipped += 1  # not a window record this worker wrote
                elif _input_offset(message) >= committed_input_offset:
                    skipped += 1
                else:
                    batch[user_id] = message.value()
                    restored += 1
            if last_offset is not None:
                state.store.write(batch, last_offset)
    finally:
        restore_consumer.unassign()
    seconds = time.monotonic() - started
    log.info(
        "restored %s[%d]: %d windows, %d uncommitted records skipped, %.2fs",
        changelog_topic,
        state.partition,
        restored,
        skipped,
        seconds,
    )
    return RecoveryResult(state.partition, restored, skipped, seconds)


def _user_id(message: Message) -> str | None:
    key = message.key()
    if not key:
        return None
    try:
        return key.decode()
    except UnicodeDecodeError:
        return None


def _input_offset(message: Message) -> int:
    """The input offset a changelog record carries; a record without a readable one counts as
    uncommitted, so it is skipped and its input is processed again."""
    for name, value in message.headers() or []:
        if name == INPUT_OFFSET_HEADER:
            try:
                return int(value)
            except (TypeError, ValueError):
                break
    return 2**63 - 1
