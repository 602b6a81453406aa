"""Events round-trip through the real broker, with confluent-kafka and with a Faust agent."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from tests.conftest import create_topics, unique_topic

pytestmark = pytest.mark.kafka


def _events(start: int, count: int) -> list[tuple[bytes, bytes]]:
    return [
        (f"user-{i % 7}".encode(), json.dumps({"user_id": f"user-{i % 7}", "item_id": f"sku-{i}",
                                                "event_type": "view", "ts": 1_700_000_000_000 + i}).encode())
        for i in range(start, start + count)
    ]


def _produce(bootstrap: str, topic: str, events: list[tuple[bytes, bytes]]) -> list:
    """Send `events` in order (idempotent producer: no reordering on retry); the delivery
    reports, each with the partition and offset the broker gave the message."""
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    delivered: list = []

    def on_delivery(error: object, message: object) -> None:
        assert error is None, error
        delivered.append(message)

    for key, value in events:
        producer.produce(topic, key=key, value=value, on_delivery=on_delivery)
    assert producer.flush(30) == 0
    assert len(delivered) == len(events)
    return delivered


def _by_partition(messages: list) -> dict[int, list[tuple[int, bytes, bytes]]]:
    """(offset, key, value) per partition, in the order the list holds them."""
    out: dict[int, list[tuple[int, bytes, bytes]]] = {}
    for m in messages:
        out.setdefault(m.partition(), []).append((m.offset(), m.key(), m.value()))
    return out


def _read(bootstrap: str, topic: str, group: str, expected: int, timeout: float = 30) -> list:
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": group, "auto.offset.reset": "earliest",
         "enable.auto.commit": False}
    )
    consumer.subscribe([topic])
    messages = []
    deadline = time.monotonic() + timeout
    while len(messages) < expected and time.monotonic() < deadline:
        for message in consumer.consume(100, timeout=0.5):
            assert message.error() is None, message.error()
            messages.append(message)
    if messages:
        consumer.commit(asynchronous=False)
    consumer.close()
    return messages


def test_confluent_kafka_round_trip_keeps_every_message_and_per_key_order(kafka_bootstrap: str) -> None:
    topic = unique_topic("roundtrip")
    create_topics(kafka_bootstrap, {topic: 3})
    sent = _events(0, 500)
    delivered = _produce(kafka_bootstrap, topic, sent)
    received = _read(kafka_bootstrap, topic, unique_topic("group"), expected=len(sent))
    assert sorted((m.key(), m.value()) for m in received) == sorted(sent)
    expected = _by_partition(delivered)
    assert len(expected) > 1  # the keys spread over the partitions
    # per partition: the same keys and values at the same offsets, in the order sent
    assert _by_partition(received) == expected
    for partition, rows in expected.items():
        assert [offset for offset, _, _ in rows] == list(range(len(rows))), partition
        assert [(k, v) for _, k, v in rows] == [
            (k, v) for k, v in sent if (k, v) in {(key, value) for _, key, value in rows}
        ]
    for user in {k for k, _ in sent}:  # and a key's events stay in the order sent
        assert [m.value() for m in received if m.key() == user] == [v for k, v in sent if k == user]


def test_a_restarted_consumer_group_member_resumes_after_its_commit(kafka_bootstrap: str) -> None:
    topic, group = unique_topic("resume"), unique_topic("group")
    create_topics(kafka_bootstrap, {topic: 2})
    _produce(kafka_bootstrap, topic, _events(0, 100))
    assert len(_read(kafka_bootstrap, topic, group, expected=100)) == 100
    _produce(kafka_bootstrap, topic, _events(100, 40))
    again = _read(kafka_bootstrap, topic, group, expected=40, timeout=10)
    assert sorted(m.value() for m in again) == sorted(v for _, v in _events(100, 40))


def _start_faust(bootstrap: str, app_id: str, source: str, sink: str) -> subprocess.Popen:
    env = {
        **os.environ,
        "KVREC_TEST_APP_ID": app_id, "KVREC_TEST_BOOTSTRAP": bootstrap,
        "KVREC_TEST_IN": source, "KVREC_TEST_OUT": sink,
        "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
    }
    return subprocess.Popen(
        [sys.executable, "-m", "tests.faust_relay"], env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def _stop(process: subprocess.Popen) -> str:
    process.send_signal(signal.SIGTERM)
    try:
        output, _ = process.communicate(timeout=40)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
    return output


def _wait_committed(bootstrap: str, group: str, topic: str, partitions: int, timeout: float = 30) -> None:
    """Wait until `group` has committed the end offset of every partition of `topic`."""
    probe = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        parts = [TopicPartition(topic, p) for p in range(partitions)]
        ends = [probe.get_watermark_offsets(tp, timeout=10)[1] for tp in parts]
        deadline = time.monotonic() + timeout
        while True:
            committed = [tp.offset for tp in probe.committed(parts, timeout=10)]
            if committed == ends:
                return
            assert time.monotonic() < deadline, f"{group} committed {committed}, end offsets {ends}"
            time.sleep(0.3)
    finally:
        probe.close()


def test_faust_agent_in_a_consumer_group_commits_and_resumes(kafka_bootstrap: str) -> None:
    source, sink, app_id = unique_topic("faust-in"), unique_topic("faust-out"), unique_topic("app")
    create_topics(kafka_bootstrap, {source: 2, sink: 2})
    first, second = _events(0, 60), _events(60, 25)
    delivered = _produce(kafka_bootstrap, source, first)
    assert len(_by_partition(delivered)) == 2  # both partitions, so both are assigned and committed
    reader = unique_topic("reader")
    app = _start_faust(kafka_bootstrap, app_id, source, sink)
    output = ""
    try:
        relayed = _read(kafka_bootstrap, sink, reader, expected=len(first), timeout=60)
        _wait_committed(kafka_bootstrap, app_id, source, 2)  # the agent's group (= app id) commits
    finally:
        output = _stop(app)
    assert sorted((m.key(), m.value()) for m in relayed) == sorted(first), output[-2000:]
    _produce(kafka_bootstrap, source, second)
    app = _start_faust(kafka_bootstrap, app_id, source, sink)
    try:
        relayed_after = _read(kafka_bootstrap, sink, reader, expected=len(second), timeout=60)
        _wait_committed(kafka_bootstrap, app_id, source, 2)
        # anything replayed from before the commit would show up by now
        relayed_after += _read(kafka_bootstrap, sink, reader, expected=1, timeout=2)
    finally:
        output = _stop(app)
    assert sorted((m.key(), m.value()) for m in relayed_after) == sorted(second), output[-2000:]
