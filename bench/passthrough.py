"""A plain confluent-kafka relay for `kvrec bench e2e`: consume a topic, forward each message's
key and value unchanged to another topic, nothing else.

    python -m kvrec.bench.passthrough BOOTSTRAP INPUT OUTPUT GROUP [LINGER_MS [BATCH_WAIT_MS]]

It reads with one blocking `poll`, then takes what is already fetched without waiting
(`consume(511, 0)`); BATCH_WAIT_MS > 0 reads with `consume(512, BATCH_WAIT_MS)` instead, as it
did before: that call returns only with 512 messages or after the wait, so below 512 messages
per wait every message waits it out (`kvrec bench floor` measures both). LINGER_MS (default 2,
the worker's default) is the producer's linger. SIGTERM stops it (it flushes what it queued).
It is the floor any Kafka consumer-producer loop in Python pays: what kvrec adds on top is the
model, the state and the retrieval.
"""

from __future__ import annotations

import signal
import sys

from confluent_kafka import Consumer, Message, Producer


def read(consumer: Consumer, batch_wait_ms: int) -> list[Message]:
    if batch_wait_ms > 0:
        return consumer.consume(512, timeout=batch_wait_ms / 1000.0)
    first = consumer.poll(0.1)
    return [] if first is None else [first, *consumer.consume(511, timeout=0)]


def relay(bootstrap: str, source: str, sink: str, group: str, linger_ms: int = 2,
          batch_wait_ms: int = 0) -> int:
    running = True

    def stop(signum: int, frame: object) -> None:
        nonlocal running
        running = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": True,
        }
    )
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": linger_ms})
    consumer.subscribe([source])
    while running:
        for message in read(consumer, batch_wait_ms):
            if message.error() is not None:
                continue
            while True:
                try:
                    producer.produce(sink, key=message.key(), value=message.value())
                    break
                except BufferError:
                    producer.poll(0.05)
        producer.poll(0)
    producer.flush(10)
    consumer.close()
    return 0


if __name__ == "__main__":
    bootstrap, source, sink, group, *numbers = sys.argv[1:7]
    sys.exit(relay(bootstrap, source, sink, group, *(int(n) for n in numbers)))
