"""The worker's consume-process-checkpoint loop, on confluent-kafka.

    consume(B, T) ──► validate (stream/schema.py) ──► bad: dead letter with its reason
                         │
                         ▼
           waves: up to W events of each user, in log order (what one `extend` advances)
                         │
                         ▼
           per user: check the events (duplicates skipped, each packed for its window)
                         │
                         ▼
           Recommender (inference.py): cache hit or exact refill ──► extend/step ──► top-k
                         │    from each window as it stands; a user that fails: its window
                         ▼    untouched, its events dead letters (processing_error)
           per user: apply the events to the window (state/partition.py), all or nothing
                         │
                         ▼
           produce one recommendation per event (the metrics once per wave)
                         │
                         ▼
           checkpoint when due (checkpoint.py); the group's rebalances go to the state
           manager (state_manager.py: assign and restore, revoke, lose);
           an error that escapes (Kafka, infrastructure): abort, commit nothing

Every turn of the loop, and every read of a restore, beats the liveness that `/health` reports;
a checkpoint (or an abort) waiting for Kafka is alive up to its own limit (`--outage-limit-s`,
past which it gives up and the worker exits); `/ready` follows the assignment (metrics.py:
HealthState). Once a second the loop sets the consumer-lag gauge of each owned partition from
librdkafka's cached watermarks (no request).

One file, one thing: the loop, every step of one event in the order it happens (over 400 lines
because the steps above read best in one place; what is not a step of the loop lives beside it:
the state manager, the checkpoint, the wire format, the model watcher).
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from itertools import chain

import numpy as np
from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient

from kvrec.state.window import Window, WindowEvent, WindowSnapshot, pack_event
from kvrec.stream.kafka_logs import kafka_log
from kvrec.stream.lifecycle.roles import ModelRole
from kvrec.stream.lifecycle.watcher import ModelWatcher, Prepared
from kvrec.stream.schema import (
    BecauseEvent,
    InvalidEvent,
    Recommendation,
    ScoredItem,
    encode_recommendation,
    parse_event,
)
from kvrec.stream.worker.checkpoint import (
    RESTART,
    WAIT_MARGIN_S,
    Checkpoint,
    ClientFailed,
    ClientHang,
    TransactionAborted,
    failed_for_good,
)
from kvrec.stream.worker.dead_letters import DeadLetters
from kvrec.stream.worker.inference import Scored, ScoredBatch, WaveInput
from kvrec.stream.worker.live import LiveHits, Shadow
from kvrec.stream.worker.metrics import HealthState, WorkerMetrics, observe_many
from kvrec.stream.worker.produce import produce
from kvrec.stream.worker.protocols import WaveRecommender
from kvrec.stream.worker.recovery import (
    RecoveryResult,
    recover_partition,
    restore_consumer_config,
)
from kvrec.stream.worker.settings import WorkerSettings
from kvrec.stream.worker.standby import standby_consumer_config
from kvrec.stream.worker.state_manager import StateManager
from kvrec.stream.worker.wire import WireEncoder

log = logging.getLogger(__name__)

_GRAB_S = 0.001  # adaptive batches: how long to gather what follows a batch's first message
MAX_OUTPUT_BYTES = 900_000  # below the producer's default message.max.bytes (1,000,000)


@dataclass
class _Valid:
    message: Message
    user_id: str
    event: WindowEvent
    event_ts: int


@dataclass(frozen=True)
class KafkaClients:
    """The worker's three Kafka clients (tests hand in fakes)."""

    consumer: Consumer
    producer: Producer
    restore_consumer: Consumer
    standby_consumer: Consumer | None = None  # with --standby-replicas (standby.py)

    @classmethod
    def create(cls, settings: WorkerSettings, kafka_config: dict[str, object]) -> KafkaClients:
        membership: dict[str, object] = {"session.timeout.ms": settings.session_timeout_ms}
        if settings.static_membership:  # a restarted replica takes its partitions straight back
            membership["group.instance.id"] = settings.instance_id
        consumer = Consumer(
            {
                **kafka_config,
                **membership,
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
            # a killed member's open transaction blocks read_committed readers until then
            producer_config["transaction.timeout.ms"] = settings.transaction_timeout_ms
        restore_consumer = Consumer(restore_consumer_config(kafka_config, settings.group_id))
        standby = (Consumer(standby_consumer_config(kafka_config, settings.group_id))
                   if settings.standby_replicas else None)
        return cls(consumer, Producer(producer_config), restore_consumer, standby)


class Worker:
    lag_interval_s = 1.0  # how often the consumer-lag gauges are updated

    def __init__(
        self,
        settings: WorkerSettings,
        recommender: WaveRecommender,
        metrics: WorkerMetrics,
        health: HealthState,
        kafka_config: dict[str, object],
        clients: KafkaClients | None = None,
        watcher: ModelWatcher | None = None,
    ) -> None:
        self.settings = settings
        self.recommender = recommender  # swapped between two batches when `watcher` has a new one
        self.watcher = watcher
        self.live = LiveHits(ModelRole.SERVE, settings.live_users)
        self.shadow_live = LiveHits(ModelRole.SHADOW, settings.live_users)
        self.shadow: Shadow | None = None
        self._live_exported: dict[tuple[str, str], tuple[int, int]] = {}
        self._stats_due = 0.0
        self.metrics = metrics
        self.health = health
        self.event_type_index = {name: i + 1 for i, name in enumerate(settings.event_types)}
        self.running = True
        self.failed = False  # an error escaped the loop: commit nothing more
        self.hung = False  # a Kafka client call never returned: do not call the clients again
        clients = clients or KafkaClients.create(settings, kafka_config)
        self.consumer = clients.consumer
        self.producer = clients.producer
        self.restore_consumer = clients.restore_consumer
        if settings.exactly_once:
            self.producer.init_transactions(30.0)
        self.partitions = StateManager(settings, self.restore_consumer, metrics, health,
                                       recover=_recover, standby_consumer=clients.standby_consumer,
                                       kafka_config=kafka_config)
        self.state = self.partitions.state
        self.checkpoint = Checkpoint(
            self.consumer,
            self.producer,
            self.state,
            input_topic=settings.input_topic,
            changelog_topic=settings.changelog_topic,
            exactly_once=settings.exactly_once,
            interval_s=settings.commit_interval_ms / 1000.0,
            outage_limit_s=settings.outage_limit_s,
        )
        self.dead_letters = DeadLetters(
            self.producer, settings.dead_letter_topic, settings.dead_letter_max_bytes, metrics,
            self.checkpoint.on_delivery,
        )
        self.partitions.checkpoint = self.checkpoint
        self.metrics.serving(recommender.version)
        self._lag_due = 0.0
        self._admin: AdminClient | None = None
        self.kafka_config = kafka_config
        self._backlog = True  # the last batch was full: the next waits for a full one
        self._wire: tuple[WaveRecommender, WireEncoder] | None = None  # (recommender, its encoder)

    # --- rebalance: the state manager's (state_manager.py) ----------------------------------
    @property
    def idle_check_s(self) -> float:
        return self.partitions.idle_check_s

    @idle_check_s.setter
    def idle_check_s(self, seconds: float) -> None:
        self.partitions.idle_check_s = seconds

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.partitions.assign(consumer, partitions)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # after an error nothing is committed: the input is replayed
        self.partitions.revoke(consumer, partitions, None if self.failed else self._commit)

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.partitions.lose(consumer, partitions)

    def _check_idle(self) -> None:
        self.partitions.check_idle(self._group_members, self._input_partitions)

    def _group_members(self) -> int:
        """How many members the consumer group has now (the group coordinator's answer)."""
        if self._admin is None:
            from kvrec.stream.kafka_config import admin_client

            self._admin = admin_client(self.kafka_config)
        group = self.settings.group_id
        futures = self._admin.describe_consumer_groups([group], request_timeout=5.0)
        return len(futures[group].result(timeout=10.0).members)

    def _input_partitions(self) -> int:
        metadata = self.consumer.list_topics(self.settings.input_topic, timeout=5.0)
        return len(metadata.topics[self.settings.input_topic].partitions)

    # --- the loop ------------------------------------------------------------------------
    def run(self, should_stop: Callable[[], bool] = lambda: False) -> None:
        """Consume, process and checkpoint until stopped. An exception that escapes (a Kafka
        or infrastructure error: bad messages never get here) commits nothing of the work in
        progress; it is aborted and the input after the last checkpoint is replayed."""
        self.health.started()  # the start is over: from here the loop's beats are the liveness
        self.consumer.subscribe(
            [self.settings.input_topic],
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )
        try:
            while self.running and not should_stop():
                self.health.beat()
                messages = self._consume()
                if messages:
                    self.process(messages)
                self.producer.poll(0)
                if self.checkpoint.due():
                    self._commit()
                if time.monotonic() >= self._lag_due:
                    self._update_lag()
                self._check_idle()
                self.partitions.tend(self.consumer)  # standby replicas, when configured
                if self.watcher is not None:
                    self._model_turn(self.watcher)
            self._commit()
        except ClientHang:
            self.failed = self.hung = True  # its clients may hang again: leave them alone
            raise
        except BaseException as exc:
            self.failed = True
            if failed_for_good(exc):  # from any client call: one line that says what to do
                raise ClientFailed(f"the Kafka client failed for good ({exc}): {RESTART}") from exc
            raise
        finally:
            self.close()

    def _consume(self) -> list[Message]:
        """The next micro-batch. Adaptive (`--adaptive-batch`), from the backlog: after a full
        batch (a backlog) wait up to T for B messages, as a fixed batch does (consume returns
        as soon as B are there); otherwise take the first message (waiting up to T) and what
        follows within a millisecond, up to B. So a high rate still gets full batches, and a
        low one small batches with no wait to fill them. Fixed: wait up to T for B messages."""
        size, wait = self.settings.batch_size, self.settings.batch_wait_ms / 1000.0
        if not self.settings.adaptive_batch or self._backlog:
            messages = self.consumer.consume(num_messages=size, timeout=wait)
        else:  # the first message (waiting up to T), then what is there within a millisecond
            messages = self.consumer.consume(num_messages=1, timeout=wait)
            if messages and size > 1:
                messages += self.consumer.consume(num_messages=size - 1,
                                                  timeout=min(wait, _GRAB_S))
        self._backlog = len(messages) >= size
        return messages

    # --- models ------------------------------------------------------------------------------
    def _model_turn(self, watcher: ModelWatcher) -> None:
        """Between two batches: hand the watcher windows to pre-warm if it waits for them, swap
        in what it has made ready, publish the live hit rates when due."""
        watcher.give_windows(self._recent_windows)
        for prepared in watcher.take():
            self._swap(prepared)
        if time.monotonic() >= self._stats_due:
            self._stats_due = time.monotonic() + self.settings.stats_interval_ms / 1000.0
            watcher.publish_stats({**self.live.snapshot(), **self.shadow_live.snapshot()})

    def _swap(self, prepared: Prepared) -> None:
        if prepared.role == ModelRole.SHADOW:
            self.shadow = None
            if prepared.recommender is not None:
                self.shadow_live.last.clear()
                self.shadow = Shadow(prepared.recommender, prepared.share, self.shadow_live)
                log.info("shadow model %s scores %.0f%% of users", self.shadow.version,
                         100 * prepared.share)
            return
        self._commit()  # the version changes at a checkpoint: no transaction holds two versions
        old = self.recommender
        assert prepared.recommender is not None  # a serving version comes with its recommender
        self.recommender = prepared.recommender
        self.shadow = None
        self.metrics.serving(self.recommender.version, old.version)
        self.metrics.model_swaps.inc()
        announcement = prepared.announcement
        log.info("serving model %s (was %s; %s%s)", self.recommender.version, old.version,
                 announcement.reason, f": {announcement.note}" if announcement.note else "")
        del old, prepared
        from kvrec.model.memory import release_free_memory

        release_free_memory()  # the old model's pages back to the OS: memory stays flat

    def _recent_windows(self, count: int) -> list[tuple[str, WindowSnapshot]]:
        """Snapshots of up to `count` users' windows, changed ones first, then the most recently
        checkpointed (what the watcher pre-warms the new model's caches from)."""
        found: list[tuple[str, WindowSnapshot]] = []
        for _, windows in self.state.items():
            for user_id, window in chain(windows.dirty.items(), reversed(windows.clean.items())):
                if len(found) >= count:
                    return found
                if window.events:
                    found.append((user_id, window.snapshot()))
        return found

    def _export_live(self) -> None:
        for counts in (self.live.counts, self.shadow_live.counts):
            for key, (events, hits) in counts.items():
                done_events, done_hits = self._live_exported.get(key, (0, 0))
                if events > done_events:
                    self.metrics.live_events.labels(*key).inc(events - done_events)
                if hits > done_hits:
                    self.metrics.live_hits.labels(*key).inc(hits - done_hits)
                self._live_exported[key] = (events, hits)

    def _update_lag(self) -> None:
        """kvrec_consumer_lag{partition} = high watermark - position, both known locally (the
        watermark as of the last fetch response); a partition not fetched yet is left out."""
        self._lag_due = time.monotonic() + self.lag_interval_s
        self._export_live()
        owned = [TopicPartition(self.settings.input_topic, p) for p, _ in self.state.items()]
        if not owned:
            return
        for tp in self.consumer.position(owned):
            if tp.offset < 0:
                continue
            try:
                _, high = self.consumer.get_watermark_offsets(tp, cached=True)
            except KafkaException:
                continue
            if high >= 0:
                self.metrics.consumer_lag.labels(str(tp.partition)).set(max(0, high - tp.offset))

    def close(self) -> None:
        self.health.revoked()  # leaving the group: not ready, whatever the callbacks say
        if self.hung:  # the process exits at once (app.py); nothing was committed
            return
        try:
            if self.failed:
                self._abort()
            self.consumer.close()  # revokes: the revoke callback checkpoints unless failed
        finally:
            self.partitions.close(hung=self.hung)  # hung: the clients are left alone
            # after a failure nothing is left to deliver: it is replayed
            if not self.hung and not self.failed:
                self.producer.flush(10.0)

    def _commit(self) -> None:
        """Checkpoint; if the broker aborted the transaction, replay from the last checkpoint."""
        try:
            started = time.perf_counter()
            with self._waiting_on_kafka():
                committed = self.checkpoint.commit()
            if committed:
                self.metrics.checkpoints.inc()
                self.metrics.checkpoint_seconds.observe(time.perf_counter() - started)
        except TransactionAborted as aborted:
            log.warning("%s: replaying from the last checkpoint", aborted)
            self.metrics.transactions_aborted.inc()
            self._rewind()

    def _waiting_on_kafka(self) -> AbstractContextManager[None]:
        """Alive on /health while the checkpoint waits for Kafka within its limit."""
        return self.health.waiting_on_kafka(self.checkpoint.longest_wait_s)

    def _rewind(self) -> None:
        """Drop the work since the last checkpoint and consume again from its offsets."""
        with self._waiting_on_kafka():
            self.checkpoint.abort()
        assigned = [TopicPartition(self.settings.input_topic, p) for p, _ in self.state.items()]
        with self.health.waiting_on_kafka(30.0 + WAIT_MARGIN_S):
            committed = self.consumer.committed(assigned, timeout=30.0)
        for tp in committed:
            tp.offset = tp.offset if tp.offset >= 0 else OFFSET_BEGINNING
            self.consumer.seek(tp)

    def _abort(self) -> None:
        """After a failure: abort the work since the last checkpoint. A transaction that cannot
        be aborted raises `ClientHang` (the process exits at once, app.py)."""
        log.error("the worker failed: the work since the last checkpoint is aborted, not committed")
        try:
            with self._waiting_on_kafka():
                self.checkpoint.abort()
        except ClientHang:
            self.hung = True  # the producer can do nothing more: leave the clients alone
            raise
        except ClientFailed as failed:  # fenced: its transaction is void anyway
            log.error("%s", failed)
        except Exception:  # the error that stopped the worker is the one to report
            log.exception("aborting the work since the last checkpoint failed")

    def process(self, messages: list[Message]) -> None:
        """Every message ends as exactly one of: applied to its user's window (with its
        recommendation), a duplicate of an applied one, or a dead letter with its reason."""
        now_ms = int(time.time() * 1000)
        valid: list[_Valid] = []
        handled: dict[int, int] = {}  # partition -> offset of its newest message in the batch
        consumed = 0
        for message in messages:
            error = message.error()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    continue
                if failed_for_good(error):
                    raise ClientFailed(f"the Kafka consumer failed for good ({error.str()}): "
                                       f"{RESTART}")
                kafka_log.warning("consumer error: %s", error)  # repeats: once a minute
                continue
            consumed += 1
            partition = message.partition()
            if partition not in self.state:
                continue  # revoked while in flight; the new owner consumes it
            handled[partition] = message.offset()
            try:
                valid.append(self._validate(message, now_ms))
            except InvalidEvent as invalid:
                self.dead_letters.invalid(message, invalid.reason, invalid.detail)
            except _INFRASTRUCTURE_ERRORS:
                raise
            except Exception as exc:
                self.dead_letters.processing_error(message, exc)
        self.metrics.events_in.inc(consumed)  # once per batch: a counter's lock per message cost more
        self.metrics.batch_size.observe(len(messages))
        for wave in _waves(valid, self.recommender.max_events_per_user):
            self._process_wave(wave)
        self._report_quarantined()
        for partition, offset in handled.items():
            self.checkpoint.store_offset(partition, offset)

    def _validate(self, message: Message, now_ms: int) -> _Valid:
        event = parse_event(
            message.value(),
            message.key(),
            event_types=self.settings.event_type_set,
            max_bytes=self.settings.max_event_bytes,
            now_ms=now_ms,
            max_future_ms=self.settings.max_future_ms,
        )
        window_event = WindowEvent(
            item_id=event.item_id,
            event_type=self.event_type_index[event.event_type],
            ts=event.ts,
            offset=message.offset(),
        )
        return _Valid(message, event.user_id, window_event, event.ts)

    def _process_wave(self, wave: list[_Valid]) -> None:
        """Emit one recommendation per new event of the wave, then apply them to the windows.

        A user's part of the wave is all or nothing: its events are checked first (a
        duplicate of an applied one is skipped, one that cannot be stored is a dead letter),
        recommended from the window as it stands (no copy of it is made), and applied to it
        only once its recommendations are made; if they cannot be, its window stays as it was
        and its events become dead letters."""
        users: dict[str, _UserWave] = {}
        duplicates = out_of_order = 0
        for item in wave:
            user = users.get(item.user_id)
            if user is None:
                window = self.state[item.message.partition()].window(item.user_id)
                user = users[item.user_id] = _UserWave(
                    window, window.last_offset, window.events[-1].ts if window.events else None)
            event = item.event
            if event.offset <= user.last_offset:  # replayed after a restart: applied already
                duplicates += 1
                continue
            try:
                entry = pack_event(event)
            except ValueError as exc:  # the event cannot be stored: nothing changes
                self.dead_letters.processing_error(item.message, exc)
                continue
            if user.newest_ts is not None and event.ts < user.newest_ts:
                out_of_order += 1
            user.last_offset, user.newest_ts = event.offset, event.ts
            user.sources.append(item)
            user.entries.append(entry)
        if duplicates:
            self.metrics.events_duplicate.inc(duplicates)
        if out_of_order:
            self.metrics.events_out_of_order.inc(out_of_order)
        active = {user_id: user for user_id, user in users.items() if user.sources}
        if not active:
            return
        try:
            outputs = self._recommend(active)
        except _INFRASTRUCTURE_ERRORS:
            raise
        except Exception as exc:  # find the user it belongs to: one at a time
            log.warning("a wave of %d users failed (%r); retrying user by user", len(active), exc)
            self.recommender.forget(active)
            outputs = _Outputs()
            for user_id, user in active.items():
                try:
                    outputs.extend(self._recommend({user_id: user}))
                except _INFRASTRUCTURE_ERRORS:
                    raise
                except Exception as user_exc:
                    self.recommender.forget([user_id])
                    for source in user.sources:  # its window never saw them
                        self.dead_letters.processing_error(source.message, user_exc)
        self._produce(outputs)

    def _produce(self, outputs: _Outputs) -> None:
        """Produce the recommendations in order; the metrics once for all of them."""
        sources = outputs.sources
        self.metrics.events_applied.inc(len(sources))
        if not sources:
            return
        topic, on_delivery, producer = self.settings.output_topic, self.checkpoint.on_delivery, self.producer
        waits = 0
        for source, value in zip(sources, outputs.values, strict=True):
            waits += produce(producer, topic, source.user_id.encode(), value, on_delivery)
        if waits:
            self.metrics.producer_queue_full.inc(waits)
        produced = np.fromiter((source.message.timestamp()[1] for source in sources),
                               dtype=np.int64, count=len(sources))
        stamped = produced > 0  # a message without a timestamp has no latency to observe
        emitted = np.asarray(outputs.emitted_ms, dtype=np.int64)[stamped]
        observe_many(self.metrics.event_to_emit_seconds,
                     np.maximum(0, emitted - produced[stamped]) / 1000.0)
        model = len(sources) - outputs.cold_start
        for kind, count in (("model", model), ("cold_start", outputs.cold_start)):
            if count:
                self.metrics.recommendations_out.labels(kind).inc(count)

    def _recommend(self, users: dict[str, _UserWave]) -> _Outputs:
        """The recommendations of `users`' new events, encoded for the wire, in the order the
        recommender returns them; nothing is produced here."""
        inputs = [
            WaveInput(
                user_id,
                user.window.events,  # as it stands: applied to only once this call is done
                [source.event for source in user.sources],
                user.window.capacity,
                user.window.total_events - len(user.window.events),
            )
            for user_id, user in users.items()
        ]
        ordered = [source for user in users.values() for source in user.sources]
        started = time.perf_counter()
        scored, counters = self.recommender.recommend(inputs)
        self.metrics.step_seconds.observe(time.perf_counter() - started)
        self.live.observe(inputs, scored, self.recommender.version)
        if self.shadow is not None:
            self.shadow.score(inputs)
        self.metrics.cache_hits.inc(counters.cache_hits)
        self.metrics.cache_misses.inc(counters.cache_misses)
        self.metrics.unknown_items.inc(counters.unknown_items)
        self.metrics.cache_bytes.set(self.recommender.cache.bytes_used)
        emitted_ms = int(time.time() * 1000)
        values = self._encode_batch(ordered, scored, emitted_ms)
        cold_start = sum(scored.cold_start)
        for user in users.values():  # made: the events join their windows
            user.window.extend_packed([source.event for source in user.sources], user.entries)
        return _Outputs(ordered, values, cold_start, [emitted_ms] * len(ordered))

    def _encode_batch(self, sources: list[_Valid], batch: ScoredBatch, emitted_ms: int) -> list[bytes]:
        """The batch's recommendations in one pass (stream/worker/wire.py), bytes for bytes what
        `_encode` makes of each."""
        recommender = self.recommender
        if self._wire is None or self._wire[0] is not recommender or \
                self._wire[1].item_ids is not batch.item_ids:  # cold start: a catalog per wave
            self._wire = (recommender, WireEncoder(recommender.version, batch.item_ids,
                                                   batch.event_types))
        source_ts = []
        for source in sources:
            _, produced_ms = source.message.timestamp()
            source_ts.append(produced_ms if produced_ms > 0 else None)
        values = self._wire[1].encode_batch(
            batch.user_ids, batch.items, batch.scores, batch.because, batch.cold_start,
            [source.event_ts for source in sources], emitted_ms, source_ts,
        )
        for e, value in enumerate(values):
            if value is None:  # a non-finite score: the general encoder writes it
                values[e] = value = self._encode(sources[e], batch[e], emitted_ms)
            if len(value) > MAX_OUTPUT_BYTES:
                raise ValueError(f"recommendation of {len(value)} bytes > {MAX_OUTPUT_BYTES}")
        return values  # type: ignore[return-value]

    def _encode(self, source: _Valid, result: Scored, emitted_ms: int) -> bytes:
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
        value = encode_recommendation(recommendation)
        if len(value) > MAX_OUTPUT_BYTES:
            raise ValueError(f"recommendation of {len(value)} bytes > {MAX_OUTPUT_BYTES}")
        return value

    def _report_quarantined(self) -> None:
        for _, windows in self.state.items():
            for bad in windows.take_quarantined():
                self.dead_letters.corrupt_window(bad, self.settings.changelog_topic)


def _recover(*args: object, **kwargs: object) -> RecoveryResult:
    """`recover_partition`, looked up when called (a test slows it down through this module)."""
    return recover_partition(*args, **kwargs)  # type: ignore[arg-type]


# Errors that are not about one message: they stop the worker (and commit nothing).
_INFRASTRUCTURE_ERRORS = (KafkaException, MemoryError)


@dataclass(slots=True)
class _Outputs:
    """Recommendations made and encoded, not yet produced, as columns: one entry per event."""

    sources: list[_Valid] = field(default_factory=list)
    values: list[bytes] = field(default_factory=list)
    cold_start: int = 0  # how many of them are cold-start lists (the rest: the model's)
    emitted_ms: list[int] = field(default_factory=list)

    def extend(self, other: _Outputs) -> None:
        self.sources += other.sources
        self.values += other.values
        self.cold_start += other.cold_start
        self.emitted_ms += other.emitted_ms


@dataclass(slots=True)
class _UserWave:
    """One user's part of a wave: its window (as before the wave until the wave's
    recommendations are made), its new events and their packed entries, and the offset and
    time of the newest event so far (the window's, then the wave's)."""

    window: Window
    last_offset: int
    newest_ts: int | None
    sources: list[_Valid] = field(default_factory=list)
    entries: list[bytes] = field(default_factory=list)


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
