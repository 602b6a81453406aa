"""`kvrec replay`: publish a dataset to the events topic, paced or as fast as possible.

    kvrec replay --data ../shared/datasets/amazon-games.txt --format sasrec --rate 5000
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from confluent_kafka import KafkaException, Producer
from tqdm import tqdm

from model.datasets import Interaction, add_dataset_arguments, dataset_from_args
from model.errors import ConfigError
from stream.kafka_config import add_kafka_arguments, client_config, ensure_topics
from stream.schema import Event, encode_event


@dataclass
class ReplayStats:
    sent: int
    failed: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.sent / self.seconds if self.seconds > 0 else 0.0


def replay_events(
    producer_config: Mapping[str, object],
    topic: str,
    interactions: Sequence[Interaction],
    rate: float = 0.0,
    progress: bool = True,
) -> ReplayStats:
    """Produce `interactions` as JSON events keyed by user id; `rate` events/s (0 = max)."""
    failures: list[str] = []

    def on_delivery(error: object, message: object) -> None:
        if error is not None:
            failures.append(str(error))

    producer = Producer(
        {"linger.ms": 20, "batch.num.messages": 10_000, "compression.type": "lz4",
         **producer_config}
    )
    started = time.perf_counter()
    sent = 0
    bar = tqdm(total=len(interactions), unit="ev", disable=not progress, smoothing=0.1)
    try:
        for interaction in interactions:
            if rate > 0:
                due = started + sent / rate
                delay = due - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
            value = encode_event(
                Event(interaction.user_id, interaction.item_id, interaction.event_type, interaction.ts)
            )
            while True:
                try:
                    producer.produce(
                        topic, key=interaction.user_id.encode(), value=value, on_delivery=on_delivery
                    )
                    break
                except BufferError:  # local queue full: let deliveries drain
                    producer.poll(0.05)
            sent += 1
            if sent % 1000 == 0:
                producer.poll(0)
                bar.update(1000)
    except KeyboardInterrupt:
        pass
    finally:
        remaining = producer.flush(60)
        bar.update(sent - bar.n)
        bar.close()
    seconds = time.perf_counter() - started
    return ReplayStats(sent=sent - remaining, failed=len(failures) + remaining, seconds=seconds)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataset_arguments(parser)
    add_kafka_arguments(parser)
    parser.add_argument("--topic", default="events")
    parser.add_argument("--rate", type=float, default=0.0, help="events/s; 0 = as fast as possible")
    parser.add_argument("--limit", type=int, default=0, help="replay at most this many (0 = all)")
    parser.add_argument("--create-topic", action="store_true", help="create the topic if missing")
    parser.add_argument("--partitions", type=int, default=4, help="with --create-topic")


def main(args: argparse.Namespace) -> int:
    if args.rate < 0 or args.limit < 0:
        raise ConfigError("--rate and --limit must be >= 0")
    interactions = dataset_from_args(args)
    if args.limit:
        interactions = interactions[: args.limit]
    config = client_config(args)
    if args.create_topic:
        ensure_topics(config, {args.topic: (args.partitions, {})})
    try:
        stats = replay_events(config, args.topic, interactions, args.rate)
    except KafkaException as exc:
        raise ConfigError(f"Kafka: {exc}") from exc
    print(
        f"replayed {stats.sent} events in {stats.seconds:.1f} s ({stats.rate:,.0f} events/s)"
        + (f", {stats.failed} FAILED" if stats.failed else "")
    )
    return 1 if stats.failed else 0
