"""Producing under backpressure: a full producer queue makes the worker wait, never fail."""

from __future__ import annotations

from collections.abc import Callable

from confluent_kafka import Message, Producer

DeliveryCallback = Callable[[object, Message], None]


def produce(
    producer: Producer, topic: str, key: bytes | None, value: bytes | None,
    on_delivery: DeliveryCallback, headers: dict[str, bytes] | None = None,
    partition: int = -1,
) -> int:
    """Produce, waiting for deliveries while the producer's queue is full (backpressure: the
    loop consumes nothing meanwhile); returns how many times it had to wait."""
    waits = 0
    while True:
        try:
            producer.produce(topic, key=key, value=value, headers=headers, partition=partition,
                             on_delivery=on_delivery)
            return waits
        except BufferError:
            waits += 1
            producer.poll(0.1)
