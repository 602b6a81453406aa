"""Transactions on the session broker, as the exactly-once worker will use them (confluent-kafka)."""

from __future__ import annotations

import time

import pytest
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition

from tests.conftest import create_topics, unique_topic

pytestmark = pytest.mark.kafka


def _transactional_producer(bootstrap: str, transactional_id: str) -> Producer:
    producer = Producer({"bootstrap.servers": bootstrap, "transactional.id": transactional_id})
    producer.init_transactions(30)
    return producer


def _read_all(bootstrap: str, topic: str, isolation: str, expected: int, timeout: float = 20) -> list:
    """Every message of `topic` from the start, in a fresh group, until `expected` arrived and
    one more second passed without news (so that extra messages would be seen too)."""
    consumer = Consumer({
        "bootstrap.servers": bootstrap, "group.id": unique_topic("reader"),
        "auto.offset.reset": "earliest", "enable.auto.commit": False,
        "isolation.level": isolation,
    })
    consumer.subscribe([topic])
    messages: list = []
    deadline = time.monotonic() + timeout
    quiet_until = None
    while time.monotonic() < deadline:
        batch = consumer.consume(100, timeout=0.3)
        for message in batch:
            assert message.error() is None, message.error()
            messages.append(message)
        if len(messages) >= expected:
            quiet_until = quiet_until or time.monotonic() + 1.0
            if time.monotonic() > quiet_until:
                break
    consumer.close()
    return messages


def test_committed_transactions_are_visible_and_aborted_ones_are_not(kafka_bootstrap: str) -> None:
    topic = unique_topic("txn")
    create_topics(kafka_bootstrap, {topic: 2})
    producer = _transactional_producer(kafka_bootstrap, unique_topic("txn-id"))
    producer.begin_transaction()
    for i in range(10):
        producer.produce(topic, key=f"u{i % 3}".encode(), value=f"committed-{i}".encode())
    producer.commit_transaction(30)
    producer.begin_transaction()
    for i in range(5):
        producer.produce(topic, key=f"u{i % 3}".encode(), value=f"aborted-{i}".encode())
    producer.flush(30)  # the aborted records really reach the log
    producer.abort_transaction(30)

    committed = _read_all(kafka_bootstrap, topic, "read_committed", expected=10)
    assert sorted(m.value() for m in committed) == sorted(f"committed-{i}".encode() for i in range(10))
    everything = _read_all(kafka_bootstrap, topic, "read_uncommitted", expected=15)
    assert sorted(m.value() for m in everything) == sorted(
        [f"committed-{i}".encode() for i in range(10)] + [f"aborted-{i}".encode() for i in range(5)]
    )


def test_consume_transform_produce_commits_offsets_inside_the_transaction(kafka_bootstrap: str) -> None:
    source, sink, group = unique_topic("txn-in"), unique_topic("txn-out"), unique_topic("txn-group")
    create_topics(kafka_bootstrap, {source: 2, sink: 2})
    plain = Producer({"bootstrap.servers": kafka_bootstrap, "enable.idempotence": True})
    for i in range(30):
        plain.produce(source, key=f"u{i % 4}".encode(), value=str(i).encode(), partition=i % 2)
    assert plain.flush(30) == 0

    consumer = Consumer({
        "bootstrap.servers": kafka_bootstrap, "group.id": group, "auto.offset.reset": "earliest",
        "enable.auto.commit": False, "isolation.level": "read_committed",
    })
    consumer.subscribe([source])
    producer = _transactional_producer(kafka_bootstrap, unique_topic("txn-id"))
    seen = 0
    deadline = time.monotonic() + 30
    while seen < 30 and time.monotonic() < deadline:
        batch = [m for m in consumer.consume(50, timeout=0.5) if m.error() is None]
        if not batch:
            continue
        producer.begin_transaction()
        for message in batch:
            producer.produce(sink, key=message.key(), value=b"x" + message.value())
        producer.send_offsets_to_transaction(
            consumer.position(consumer.assignment()), consumer.consumer_group_metadata(), 30
        )
        producer.commit_transaction(30)
        seen += len(batch)
    assert seen == 30
    committed = consumer.committed([TopicPartition(source, p) for p in range(2)], timeout=10)
    ends = [consumer.get_watermark_offsets(TopicPartition(source, p), timeout=10)[1] for p in range(2)]
    consumer.close()
    assert [tp.offset for tp in committed] == ends  # the group's offsets moved with the commit
    assert ends == [15, 15]

    out = _read_all(kafka_bootstrap, sink, "read_committed", expected=30)
    assert sorted(m.value() for m in out) == sorted(b"x%d" % i for i in range(30))


def test_a_second_producer_with_the_same_transactional_id_fences_the_first(kafka_bootstrap: str) -> None:
    topic, transactional_id = unique_topic("txn-fence"), unique_topic("txn-id")
    create_topics(kafka_bootstrap, {topic: 1})
    zombie = _transactional_producer(kafka_bootstrap, transactional_id)
    zombie.begin_transaction()
    zombie.produce(topic, value=b"from the zombie")
    zombie.flush(30)
    successor = _transactional_producer(kafka_bootstrap, transactional_id)  # aborts the zombie's
    successor.begin_transaction()
    successor.produce(topic, value=b"from the successor")
    successor.commit_transaction(30)
    with pytest.raises(KafkaException):
        zombie.commit_transaction(10)
    assert [m.value() for m in _read_all(kafka_bootstrap, topic, "read_committed", expected=1)] == [
        b"from the successor"
    ]
