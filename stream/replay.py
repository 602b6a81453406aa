"""`kvrec replay`: publish a dataset to the events topic, paced or as fast as possible.

    kvrec replay --data ../shared/datasets/amazon-games.txt --format sasrec --rate 5000

Events are JSON (`stream/schemas/event.v1.json`) keyed by user id, so a user's events land on
one partition in replay order. Pacing is a token bucket (`--rate` tokens per second, a burst of
at most `BURST_SECONDS` of tokens); `--rate 0` sends as fast as the producer takes them.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from confluent_kafka import KafkaException, Producer

from kvrec.errors import ConfigError
from kvrec.flags import integer, number
from kvrec.model.datasets import Interaction, add_dataset_arguments, dataset_from_args
from kvrec.model.progress import progress_bar
from kvrec.stream.kafka_config import (
    add_kafka_arguments,
    client_config,
    ensure_topics,
    kafka_error_text,
    topic_names,
)
from kvrec.stream.kafka_logs import kafka_log
from kvrec.stream.logs import add_logging_arguments, setup_logging
from kvrec.stream.schema import Event, encode_event

# throughput settings; anything in the caller's config wins
PRODUCER_DEFAULTS: dict[str, object] = {
    "linger.ms": 20,
    "batch.num.messages": 10_000,
    "batch.size": 1_000_000,
    "compression.type": "lz4",
    "queue.buffering.max.messages": 500_000,
    "enable.idempotence": True,  # no duplicates or reordering on retries
}
BURST_SECONDS = 0.05
FLUSH_SECONDS = 60.0


@dataclass
class ReplayStats:
    sent: int  # acknowledged by the broker
    failed: int  # delivery failed, or still unacknowledged after the final flush
    seconds: float
    interrupted: bool = False

    @property
    def rate(self) -> float:
        return self.sent / self.seconds if self.seconds > 0 else 0.0


class TokenBucket:
    """`rate` tokens per second, at most `burst` banked; `take()` sleeps until one is there."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.capacity = rate, max(1.0, burst)
        self.tokens, self.last = 1.0, time.perf_counter()

    def take(self) -> None:
        while True:
            now = time.perf_counter()
            self.tokens = min(self.capacity, self.tokens + (now - self.last) * self.rate)
            self.last = now
            if self.tokens >= 1.0:
                self.tokens -= 1.0
                return
            time.sleep((1.0 - self.tokens) / self.rate)


def replay_events(
    producer_config: Mapping[str, object],
    topic: str,
    interactions: Sequence[Interaction],
    rate: float = 0.0,
    progress: bool = True,
) -> ReplayStats:
    """Produce `interactions` as JSON events keyed by user id; `rate` events/s (0 = max).

    Ctrl-C stops sending, flushes what was queued and returns (`interrupted=True`).
    """
    outcome = {"delivered": 0, "failed": 0}

    def on_delivery(error: object, _message: object) -> None:
        outcome["failed" if error is not None else "delivered"] += 1

    producer = Producer({**PRODUCER_DEFAULTS, **producer_config})
    bucket = TokenBucket(rate, rate * BURST_SECONDS) if rate > 0 else None
    started = time.perf_counter()
    queued = 0
    interrupted = False
    bar = progress_bar(total=len(interactions), enabled=progress, unit="ev", smoothing=0.1)
    try:
        for interaction in interactions:
            if bucket is not None:
                bucket.take()
            value = encode_event(
                Event(interaction.user_id, interaction.item_id, interaction.event_type, interaction.ts)
            )
            key = interaction.user_id.encode()
            while True:
                try:
                    producer.produce(topic, key=key, value=value, on_delivery=on_delivery)
                    break
                except BufferError:  # local queue full: let deliveries drain
                    producer.poll(0.05)
            queued += 1
            if queued % 1000 == 0:
                producer.poll(0)
                bar.update(queued - bar.n)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        remaining = producer.flush(FLUSH_SECONDS)
        bar.update(queued - bar.n)
        bar.close()
    seconds = time.perf_counter() - started
    return ReplayStats(
        sent=outcome["delivered"],
        failed=outcome["failed"] + remaining,
        seconds=seconds,
        interrupted=interrupted,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataset_arguments(parser)
    add_kafka_arguments(parser)
    parser.add_argument("--topic", default="events")
    parser.add_argument("--rate", type=number(0), default=0.0, help="events/s; 0 = as fast as possible")
    parser.add_argument("--limit", type=integer(0), default=0, help="replay at most this many (0 = all)")
    parser.add_argument("--create-topic", action="store_true", help="create the topic if missing")
    parser.add_argument("--partitions", type=integer(1), default=4, help="with --create-topic")
    add_logging_arguments(parser, default_level="WARNING")


def main(args: argparse.Namespace) -> int:
    setup_logging(args)
    interactions = dataset_from_args(args)
    if args.limit:
        interactions = interactions[: args.limit]
    config = client_config(args)
    # a Kafka that cannot be reached within --connect-timeout: one line, exit status 1
    if args.create_topic:
        ensure_topics(config, {args.topic: (args.partitions, {})}, args.connect_timeout)
    elif args.topic not in topic_names(config, args.connect_timeout):
        raise ConfigError(f"topic {args.topic!r} does not exist (add --create-topic to create it)")
    # a broker lost on the way: the producer's errors, once a minute each (kafka_logs.py)
    config["error_cb"] = lambda error: kafka_log.warning("%s", error.str())
    try:
        stats = replay_events(config, args.topic, interactions, args.rate)
    except KafkaException as exc:
        raise ConfigError(f"Kafka: {kafka_error_text(exc)}") from None
    print(
        f"replayed {stats.sent} events in {stats.seconds:.1f} s ({stats.rate:,.0f} events/s)"
        + (f", {stats.failed} FAILED" if stats.failed else "")
        + (" (interrupted)" if stats.interrupted else "")
    )
    if stats.interrupted:
        return 130
    return 1 if stats.failed else 0
