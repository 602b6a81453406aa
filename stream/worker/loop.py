"""The worker's consume-process-checkpoint loop, on confluent-kafka.

    consume(B, T) ──► validate ──► dead letters (bad input, with reason)
                         │
                         ▼
           per partition: user windows (apply, idempotent by input offset)
                         │ waves: the i-th event of every user in the batch
                         ▼
           Recommender: cache / refill ──► step ──► retrieval ──► produce recommendations
                         │
                         ▼
           checkpoint when due (see checkpoint.py); on revoke: checkpoint, close stores;
           on assign: open stores, restore from the changelog (see recovery.py)
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

from confluent_kafka import Consumer, KafkaError, Message, Producer, TopicPartition

from state.window import Window, WindowEvent
from stream.schema import (
    BecauseEvent,
    InvalidEvent,
    Recommendation,
    ScoredItem,
    encode_recommendation,
    parse_event,
)
from stream.worker.checkpoint import Checkpoint
from stream.worker.inference import Recommender, Scored, WaveInput
from stream.worker.metrics import HealthState, WorkerMetrics
from stream.worker.partitions import PartitionStates
from stream.worker.recovery import recover_partition
from stream.worker.settings import WorkerSettings

log = logging.getLogger(__name__)

DEAD_LETTER_REASON = "kvrec.reason"
DEAD_LETTER_DETAIL = "kvrec.detail"


@dataclass
class _Valid:
    message: Message
    user_id: str
    event: WindowEvent
    event_ts: int


class Worker:
    def __init__(
        self,
        settings: WorkerSettings,
        recommender: Recommender,
        metrics: WorkerMetrics,
        health: HealthState,
        kafka_config: dict[str, object],
    ) -> None:
        self.settings = settings
        self.recommender = recommender
        self.metrics = metrics
        self.health = health
        self.event_type_index = {name: i + 1 for i, name in enumerate(settings.event_types)}
        self.running = True
        self.consumer = Consumer(
            {
                **kafka_config,
                "group.id": settings.group_id,
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "isolation.level": "read_committed",
                "partition.assignment.strategy": "cooperative-sticky",
                "fetch.wait.max.ms": max(1, settings.batch_wait_ms),
            }
        )
        producer_config: dict[str, object] = {
            **kafka_config,
            "linger.ms": settings.linger_ms,
            "enable.idempotence": True,
            "compression.type": "lz4",
        }
        if settings.exactly_once:
            producer_config["transactional.id"] = f"{settings.group_id}-{settings.instance_id}"
        self.producer = Producer(producer_config)
        self.restore_consumer = Consumer(
            {
                **kafka_config,
                "group.id": f"{settings.group_id}-restore",
                "enable.auto.commit": False,
                "enable.partition.eof": True,
                "isolation.level": "read_committed",
            }
        )
        if settings.exactly_once:
            self.producer.init_transactions(30.0)
        self.states = PartitionStates(
            settings.state_dir, settings.input_topic, settings.window_capacity,
            settings.windows_in_memory,
        )
        self.checkpoint = Checkpoint(
            self.consumer,
            self.producer,
            self.states,
            input_topic=settings.input_topic,
            changelog_topic=settings.changelog_topic,
            exactly_once=settings.exactly_once,
            interval_s=settings.commit_interval_ms / 1000.0,
        )
        self.metrics.model_info.labels(recommender.version).set(1)

    # --- rebalance -------------------------------------------------------------------------
    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        committed = {
            tp.partition: tp.offset
            for tp in consumer.committed(
                [TopicPartition(self.settings.input_topic, p.partition) for p in partitions],
                timeout=30.0,
            )
        }
        for tp in partitions:
            state = self.states.open(tp.partition)
            result = recover_partition(
                self.restore_consumer,
                self.settings.changelog_topic,
                state,
                committed.get(tp.partition, -1),
            )
            self.metrics.restored_windows.inc(result.restored)
        consumer.incremental_assign(partitions)
        self.metrics.assigned_partitions.set(len(self.states.by_partition))
        self.health.ready = True
        log.info("assigned %s", sorted(tp.partition for tp in partitions))

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.checkpoint.commit()
        for tp in partitions:
            self.states.close(tp.partition)
            self.checkpoint.pending_offsets.pop(tp.partition, None)
        consumer.incremental_unassign(partitions)
        self.metrics.assigned_partitions.set(len(self.states.by_partition))
        log.info("revoked %s", sorted(tp.partition for tp in partitions))

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        for tp in partitions:  # someone else owns them now: drop unflushed work, keep nothing
            self.states.close(tp.partition)
            self.checkpoint.pending_offsets.pop(tp.partition, None)
        consumer.incremental_unassign(partitions)

    # --- the loop ------------------------------------------------------------------------
    def run(self, should_stop: Callable[[], bool] = lambda: False) -> None:
        self.consumer.subscribe(
            [self.settings.input_topic],
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )
        try:
            while self.running and not should_stop():
                self.health.beat()
                messages = self.consumer.consume(
                    num_messages=self.settings.batch_size,
                    timeout=self.settings.batch_wait_ms / 1000.0,
                )
                if messages:
                    self.process(messages)
                self.producer.poll(0)
                if self.checkpoint.due():
                    self.checkpoint.commit()
                    self.metrics.checkpoints.inc()
            self.checkpoint.commit()
        finally:
            self.close()

    def close(self) -> None:
        try:
            self.consumer.close()  # revokes: the revoke callback checkpoints
        finally:
            self.states.close_all()
            self.restore_consumer.close()
            self.producer.flush(10.0)

    def process(self, messages: list[Message]) -> None:
        now_ms = int(time.time() * 1000)
        valid: list[_Valid] = []
        for message in messages:
            error = message.error()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    continue
                if error.fatal():
                    raise RuntimeError(f"fatal Kafka error: {error}")
                log.warning("consumer error: %s", error)
                continue
            self.metrics.events_in.inc()
            partition = message.partition()
            if partition not in self.states:
                continue  # revoked while in flight; the new owner consumes it
            try:
                event = parse_event(
                    message.value(),
                    message.key(),
                    event_types=self.settings.event_type_set,
                    max_bytes=self.settings.max_event_bytes,
                    now_ms=now_ms,
                    max_future_ms=self.settings.max_future_ms,
                )
            except InvalidEvent as invalid:
                self._dead_letter(message, invalid.reason, invalid.detail)
                self.checkpoint.store_offset(partition, message.offset())
                continue
            window_event = WindowEvent(
                item_id=event.item_id,
                event_type=self.event_type_index[event.event_type],
                ts=event.ts,
                offset=message.offset(),
            )
            valid.append(_Valid(message, event.user_id, window_event, event.ts))
        self.metrics.batch_size.observe(len(messages))
        for wave in _waves(valid, self.recommender.max_events_per_user):
            self._process_wave(wave)
        for item in valid:
            self.checkpoint.store_offset(item.message.partition(), item.message.offset())

    def _process_wave(self, wave: list[_Valid]) -> None:
        """Apply the wave's events to their windows and emit one recommendation per event."""
        inputs: list[WaveInput] = []
        sources: list[_Valid] = []
        by_user: dict[str, tuple[list[WindowEvent], list[WindowEvent], Window, int]] = {}
        for item in wave:
            window = self.states[item.message.partition()].window(item.user_id)
            newest_ts = window.events[-1].ts if window.events else None
            if item.user_id not in by_user:
                first_index = window.total_events - len(window.events)
                by_user[item.user_id] = (list(window.events), [], window, first_index)
            if not window.apply(item.event):
                self.metrics.events_duplicate.inc()
                continue
            if newest_ts is not None and item.event.ts < newest_ts:
                self.metrics.events_out_of_order.inc()
            by_user[item.user_id][1].append(item.event)
            sources.append(item)
        self.metrics.events_applied.inc(len(sources))
        for user_id, (previous, events, window, first_index) in by_user.items():
            if events:
                inputs.append(WaveInput(user_id, previous, events, window.capacity, first_index))
        if not inputs:
            return
        by_position = {id(item.event): item for item in sources}
        ordered = [by_position[id(e)] for user in inputs for e in user.events]
        hits_before = self.recommender.cache.stats.hits
        misses_before = self.recommender.cache.stats.misses
        unknown_before = self.recommender.unknown_items
        started = time.perf_counter()
        scored = self.recommender.recommend(inputs)
        self.metrics.step_seconds.observe(time.perf_counter() - started)
        self.metrics.cache_hits.inc(self.recommender.cache.stats.hits - hits_before)
        self.metrics.cache_misses.inc(self.recommender.cache.stats.misses - misses_before)
        self.metrics.unknown_items.inc(self.recommender.unknown_items - unknown_before)
        self.metrics.cache_bytes.set(self.recommender.cache.bytes_used)
        for source, result in zip(ordered, scored, strict=True):
            self._emit(source, result)

    def _emit(self, source: _Valid, result: Scored) -> None:
        emitted_ms = int(time.time() * 1000)
        _, produced_ms = source.message.timestamp()
        recommendation = Recommendation(
            user_id=result.user_id,
            items=[ScoredItem(item_id, score) for item_id, score in result.items],  # rounded to 6 places
            model_version=self.recommender.version,
            event_ts=source.event_ts,
            emitted_ts=emitted_ms,
            because=[BecauseEvent(b.item_id, b.event_type, b.weight) for b in result.because],
            cold_start=result.cold_start,
            source_ts=produced_ms if produced_ms > 0 else None,
        )
        self.producer.produce(
            self.settings.output_topic,
            key=source.user_id.encode(),
            value=encode_recommendation(recommendation),
            on_delivery=self.checkpoint.on_delivery,
        )
        kind = "cold_start" if result.cold_start else "model"
        self.metrics.recommendations_out.labels(kind).inc()
        if produced_ms > 0:
            self.metrics.event_to_emit_seconds.observe(max(0, emitted_ms - produced_ms) / 1000.0)

    def _dead_letter(self, message: Message, reason: str, detail: str) -> None:
        self.metrics.dead_letters.labels(reason).inc()
        self.producer.produce(
            self.settings.dead_letter_topic,
            key=message.key(),
            value=message.value(),
            headers={
                DEAD_LETTER_REASON: reason.encode(),
                DEAD_LETTER_DETAIL: detail[:1000].encode(),
                "kvrec.source": json.dumps(
                    [message.topic(), message.partition(), message.offset()]
                ).encode(),
            },
            on_delivery=self.checkpoint.on_delivery,
        )


def _waves(valid: list[_Valid], per_user: int) -> list[list[_Valid]]:
    """Split a batch so that each wave holds at most `per_user` events of each user, keeping
    every user's order (the model advances a user by all its events of a wave at once)."""
    by_user: dict[str, list[_Valid]] = defaultdict(list)
    for item in valid:
        by_user[item.user_id].append(item)
    depth = max((len(events) for events in by_user.values()), default=0)
    return [
        [e for events in by_user.values() for e in events[start : start + per_user]]
        for start in range(0, depth, per_user)
    ]
