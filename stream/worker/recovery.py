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

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

from state.changelog import read_record
from state.partition import PartitionWindows

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
    windows: PartitionWindows,
    committed_input_offset: int,
    *,
    timeout_s: float = 120.0,
) -> RecoveryResult:
    """Bring `windows`' store up to the end of its changelog partition.

    `committed_input_offset` is the group's committed offset of the input partition (the next
    offset to consume, or a negative value when nothing was committed yet).
    """
    started = time.monotonic()
    tp = TopicPartition(changelog_topic, windows.partition)
    low, high = restore_consumer.get_watermark_offsets(tp, timeout=10.0)
    stored = windows.changelog_offset()
    start = low if stored is None else max(stored + 1, low)
    restored = skipped = 0
    if start >= high:
        return RecoveryResult(windows.partition, 0, 0, time.monotonic() - started)
    tp.offset = start if start > 0 else OFFSET_BEGINNING
    restore_consumer.assign([tp])  # the restore consumer has enable.partition.eof on
    deadline = started + timeout_s
    try:
        reached_end = False
        while not reached_end:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"restoring {changelog_topic}[{windows.partition}] took over {timeout_s:.0f}s"
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
                record = read_record(message.key(), message.value(), message.headers())
                if record is None or record.input_offset >= committed_input_offset:
                    skipped += 1  # not a worker's record, or its checkpoint never committed
                else:
                    batch[record.user_id] = record.window
                    restored += 1
            if last_offset is not None:
                windows.restore(batch, last_offset)
    finally:
        restore_consumer.unassign()
    seconds = time.monotonic() - started
    log.info(
        "restored %s[%d]: %d windows, %d uncommitted records skipped, %.2fs",
        changelog_topic,
        windows.partition,
        restored,
        skipped,
        seconds,
    )
    return RecoveryResult(windows.partition, restored, skipped, seconds)

