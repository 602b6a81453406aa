"""How `kvrec demo` and `kvrec bench e2e` measure latency (`stream/latency.py`), on the real
broker: the output's broker append time, so a slow reader shows as the reader's share, not as
the system's latency; and a reader that takes an output as soon as it is there."""

from __future__ import annotations

import time
import uuid

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from kvrec.stream.demo import LiveStats
from kvrec.stream.kafka_config import ensure_topics
from kvrec.stream.latency import LOG_APPEND_TIME, Latencies, read_available
from kvrec.stream.schema import Recommendation, ScoredItem, encode_recommendation

pytestmark = pytest.mark.kafka

READER_DELAY_S = 0.8


def _topic(bootstrap: str, config: dict[str, str]) -> str:
    name = f"latency-{uuid.uuid4().hex[:8]}"
    ensure_topics({"bootstrap.servers": bootstrap}, {name: (1, config)})
    return name


def _consumer(bootstrap: str, topic: str) -> Consumer:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"t-{uuid.uuid4().hex[:8]}",
                         "enable.auto.commit": False, "fetch.wait.max.ms": 5})
    consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
    return consumer


def _recommendation(source_ts: int) -> bytes:
    return encode_recommendation(Recommendation(
        user_id="u1", event_ts=source_ts, items=[ScoredItem("sku-1", 1.0)], model_version="v",
        emitted_ts=source_ts, source_ts=source_ts,
    ))


def test_the_demo_stamps_with_the_broker_not_with_its_slow_reader(kafka_bootstrap) -> None:
    """A recommendation appended at once but read `READER_DELAY_S` later: the demo's latency is
    the append's (milliseconds), the delay is the reader's share."""
    topic = _topic(kafka_bootstrap, LOG_APPEND_TIME)
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "linger.ms": 0})
    source_ts = int(time.time() * 1000)
    producer.produce(topic, key=b"u1", value=_recommendation(source_ts))
    assert producer.flush(10) == 0
    time.sleep(READER_DELAY_S)  # the reader is busy elsewhere
    consumer = _consumer(kafka_bootstrap, topic)
    try:
        messages = []
        deadline = time.monotonic() + 10
        while not messages and time.monotonic() < deadline:
            messages = read_available(consumer, 1.0)
        read_ms = time.time() * 1000
    finally:
        consumer.close()
    stats = LiveStats({})
    for message in messages:
        stats.add(message, read_ms)
    assert stats.count == 1
    summary = stats.summary()
    assert summary["latency_stamp"] == "LogAppendTime"
    assert 0 <= summary["latency_ms_p50"] < READER_DELAY_S * 1000 / 2
    assert summary["reader_ms_p50"] >= READER_DELAY_S * 1000 - 50
    assert "(reader +" in stats.line(1.0, 1, 1.0)


def test_create_time_outputs_are_stamped_by_their_producer(kafka_bootstrap) -> None:
    """An output topic that keeps CreateTime (one the demo did not create): the producer's
    stamp, still not the reader's."""
    topic = _topic(kafka_bootstrap, {})
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    producer.produce(topic, value=b"x", timestamp=1_000_500)
    assert producer.flush(10) == 0
    consumer = _consumer(kafka_bootstrap, topic)
    try:
        messages = []
        deadline = time.monotonic() + 10
        while not messages and time.monotonic() < deadline:
            messages = read_available(consumer, 1.0)
    finally:
        consumer.close()
    latencies = Latencies()
    latencies.add(1_000_000, messages[0], 1_002_000)
    assert latencies.stamp == "CreateTime"
    assert latencies.system_ms == [500.0] and latencies.reader_ms == [1_500.0]


def test_the_reader_takes_an_output_without_waiting_for_a_batch(kafka_bootstrap) -> None:
    """`read_available` returns with the first output; `consume(1000, timeout)`, the demo's old
    reader, waits for 1,000 outputs or the whole timeout."""
    topic = _topic(kafka_bootstrap, LOG_APPEND_TIME)
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    for n in range(3):
        producer.produce(topic, value=b"%d" % n)
    assert producer.flush(10) == 0
    fast, batched = _consumer(kafka_bootstrap, topic), _consumer(kafka_bootstrap, topic)
    try:
        for consumer in (fast, batched):  # joined and fetching before the clock starts
            assert consumer.poll(10.0) is not None
        started = time.monotonic()
        got = read_available(fast, 5.0)
        fast_s = time.monotonic() - started
        started = time.monotonic()
        got_batched = batched.consume(1000, timeout=1.0)
        batched_s = time.monotonic() - started
    finally:
        fast.close()
        batched.close()
    assert len(got) == len(got_batched) == 2
    assert fast_s < 0.5 <= 0.9 <= batched_s


COMMIT_DELAY_S = 0.8


def test_under_exactly_once_the_latency_is_when_a_read_committed_reader_sees_the_output(
    kafka_bootstrap,
) -> None:
    """An output produced in a transaction is appended at once but visible only when the
    transaction commits, `COMMIT_DELAY_S` later: a read_committed reader does not get it
    before, and the visible latency (`Latencies(visible=True)`) includes the wait, while the
    append's latency, kept beside it, does not."""
    from kvrec.stream.latency import READ_COMMITTED, VISIBLE

    topic = _topic(kafka_bootstrap, LOG_APPEND_TIME)
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "linger.ms": 0,
                         "transactional.id": f"t-{uuid.uuid4().hex[:8]}"})
    producer.init_transactions(30)
    consumer = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": f"t-{uuid.uuid4().hex[:8]}",
                         "enable.auto.commit": False, "fetch.wait.max.ms": 5, **READ_COMMITTED})
    consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
    try:
        producer.begin_transaction()
        source_ts = int(time.time() * 1000)
        producer.produce(topic, key=b"u1", value=_recommendation(source_ts))
        assert producer.flush(10) == 0  # appended, not committed
        before = read_available(consumer, COMMIT_DELAY_S)  # waits the delay out, sees nothing
        producer.commit_transaction(30)
        messages: list = []
        deadline = time.monotonic() + 10
        while not messages and time.monotonic() < deadline:
            messages = read_available(consumer, 0.05)
        read_ms = time.time() * 1000
    finally:
        consumer.close()
    assert before == [] and len(messages) == 1
    latencies = Latencies(visible=True)
    latencies.add(source_ts, messages[0], read_ms)
    assert latencies.stamp == VISIBLE
    (visible,), (appended,) = latencies.system_ms, latencies.appended_ms
    assert visible == pytest.approx(read_ms - source_ts)
    assert visible >= COMMIT_DELAY_S * 1000 > COMMIT_DELAY_S * 1000 / 2 > appended >= 0
    assert latencies.reader_ms == [pytest.approx(visible - appended)]
    plain = Latencies()  # what the bench measured before: the append, blind to the commit
    plain.add(source_ts, messages[0], read_ms)
    assert plain.system_ms == [appended]
