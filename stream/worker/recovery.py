"""Restore a partition's windows from its changelog when the partition is assigned.

The store knows the changelog offset it reflects. Recovery reads the changelog partition from
the next offset up to its end and writes each record to the store, except records whose input
offset was never committed (produced by a checkpoint that crashed before its commit): the new
owner will process those input events again and write them anew.

The worker calls this from its assignment callback, so the input partitions do not deliver
events before their windows are complete (the same effect as pausing them). The loop does not
turn meanwhile, so the restore reports its progress (records read of total, from the changelog
partition's watermarks) to a callback that keeps the worker's liveness beating and sets the
restore gauges, and logs it every few seconds.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition

from kvrec.errors import ConfigError
from kvrec.state.changelog import read_record
from kvrec.state.partition import PartitionWindows

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


@dataclass(frozen=True)
class RestoreProgress:
    """Where a restore stands, in changelog offsets (from the partition's watermarks: a
    compacted changelog has gaps, so fewer records may be read than offsets covered)."""

    partition: int
    read: int  # offsets covered so far
    total: int  # offsets from the restore's start to the end of the partition when it began
    seconds: float

    @property
    def remaining(self) -> int:
        return max(0, self.total - self.read)


# a changelog partition that is not there (its topic deleted since the start, or with fewer
# partitions than the input): a mistake to fix, not a fault to retry
_NOT_THERE = frozenset({KafkaError._UNKNOWN_PARTITION, KafkaError._UNKNOWN_TOPIC,
                        KafkaError.UNKNOWN_TOPIC_OR_PART})


def _watermarks(restore_consumer: Consumer, tp: TopicPartition) -> tuple[int, int]:
    """The changelog partition's watermarks; `ConfigError` (one line) if it does not exist."""
    try:
        return restore_consumer.get_watermark_offsets(tp, timeout=10.0)
    except KafkaException as exc:
        error = exc.args[0] if exc.args else None
        if getattr(error, "code", lambda: None)() in _NOT_THERE:
            raise ConfigError(
                f"the changelog topic {tp.topic} has no partition {tp.partition} (it does not "
                "exist, or has fewer partitions than the input topic): create it with "
                "`--create-topics` (or name another with --changelog-topic)"
            ) from None
        raise


def recover_partition(
    restore_consumer: Consumer,
    changelog_topic: str,
    windows: PartitionWindows,
    committed_input_offset: int,
    *,
    progress: Callable[[RestoreProgress], None] | None = None,
    stall_timeout_s: float = 120.0,
    log_every_s: float = 5.0,
    batch_records: int = 10_000,
) -> RecoveryResult:
    """Bring `windows`' store up to the end of its changelog partition.

    `committed_input_offset` is the group's committed offset of the input partition (the next
    offset to consume, or a negative value when nothing was committed yet). `progress` is
    called when the restore starts, after every read (at least every 50 ms while it runs, so
    the caller can beat its liveness) and at its end. A restore may take as long as it needs;
    one that reads nothing for `stall_timeout_s` raises TimeoutError. Progress is logged every
    `log_every_s`.
    """
    started = time.monotonic()
    tp = TopicPartition(changelog_topic, windows.partition)
    low, high = _watermarks(restore_consumer, tp)
    stored = windows.changelog_offset()
    start = low if stored is None else max(stored + 1, low)
    total = max(0, high - start)
    restored = skipped = 0

    def report(read: int) -> RestoreProgress:
        state = RestoreProgress(windows.partition, read, total, time.monotonic() - started)
        if progress is not None:
            progress(state)
        return state

    report(0)
    if start >= high:
        report(total)
        return RecoveryResult(windows.partition, 0, 0, time.monotonic() - started)
    log.info("restoring %s[%d]: %d records (offsets %d to %d)",
             changelog_topic, windows.partition, total, start, high - 1)
    tp.offset = start if start > 0 else OFFSET_BEGINNING
    restore_consumer.assign([tp])  # the restore consumer has enable.partition.eof on
    read = 0
    last_read_at = next_log = started
    next_log += log_every_s
    try:
        reached_end = False
        while not reached_end:
            now = time.monotonic()
            if now - last_read_at > stall_timeout_s:
                raise TimeoutError(
                    f"restoring {changelog_topic}[{windows.partition}]: nothing read for "
                    f"{stall_timeout_s:.0f} s ({read} of {total} records)"
                )
            if now >= next_log:
                log.info("restoring %s[%d]: %d of %d records (%.0f%%), %.0f s",
                         changelog_topic, windows.partition, read, total,
                         100.0 * read / total, now - started)
                next_log = now + log_every_s
            batch: dict[str, bytes] = {}
            last_offset: int | None = None
            # a short wait: `consume` returns when the batch is full or the wait is over, and
            # a long wait would be paid by every small partition (it was 1 s per partition)
            for message in restore_consumer.consume(num_messages=batch_records, timeout=0.05):
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
                read = min(total, last_offset + 1 - start)
                last_read_at = time.monotonic()
            report(total if reached_end else read)
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
