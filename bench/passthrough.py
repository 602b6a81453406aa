"""A plain confluent-kafka relay for `kvrec bench e2e`: consume a topic, forward each message's
key and value unchanged to another topic, nothing else.

    python -m bench.passthrough BOOTSTRAP INPUT OUTPUT GROUP

SIGTERM stops it (it flushes what it queued). It is the floor any Kafka consumer-producer
loop in Python pays: what kvrec adds on top is the model, the state and the retrieval.
"""

from __future__ import annotations

import signal
import sys

from confluent_kafka import Consumer, Producer


def relay(bootstrap: str, source: str, sink: str, group: str) -> int:
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
    # the same producer latency settings as the worker's defaults (linger 2 ms)
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 2})
    consumer.subscribe([source])
    while running:
        # one blocking poll, then what is already queued without waiting: `consume(n, t)`
        # waits until it has n messages or t passed, which held every message up to t
        first = consumer.poll(0.1)
        if first is None:
            producer.poll(0)
            continue
        for message in [first, *consumer.consume(511, timeout=0)]:
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
    sys.exit(relay(*sys.argv[1:5]))
