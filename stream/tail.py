"""`kvrec tail`: print the recommendations topic as it arrives.

    kvrec tail --from-beginning            # human-readable, one line per message
    kvrec tail --json --max-messages 10    # the raw JSON values
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from confluent_kafka import Consumer, KafkaError

from stream.kafka_config import add_kafka_arguments, client_config
from stream.schema import decode_recommendation


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_kafka_arguments(parser)
    parser.add_argument("--topic", default="recommendations")
    parser.add_argument("--from-beginning", action="store_true")
    parser.add_argument("--json", action="store_true", help="print each message's JSON value")
    parser.add_argument("--max-messages", type=int, default=0, help="stop after N (0 = never)")
    parser.add_argument("--timeout", type=float, default=0.0, help="stop after S idle seconds")


def describe(value: bytes) -> str:
    rec = decode_recommendation(value)
    items = " ".join(f"{i.item_id}:{i.score:.3f}" for i in rec.items[:5])
    because = ", ".join(f"{b.item_id} ({b.event_type} {b.weight:.2f})" for b in rec.because)
    latency = rec.emitted_ts - rec.source_ts if rec.source_ts else None
    parts = [f"user {rec.user_id}", f"[{items}{' ...' if len(rec.items) > 5 else ''}]"]
    if rec.cold_start:
        parts.append("cold start (popular items)")
    if because:
        parts.append(f"because {because}")
    parts.append(f"model {rec.model_version}")
    if latency is not None:
        parts.append(f"{latency} ms after the event")
    return "  ".join(parts)


def main(args: argparse.Namespace) -> int:
    consumer = Consumer(
        {
            **client_config(args),
            "group.id": f"kvrec-tail-{os.getpid()}-{time.time_ns()}",
            "auto.offset.reset": "earliest" if args.from_beginning else "latest",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
        }
    )
    consumer.subscribe([args.topic])
    shown = 0
    idle_since = time.monotonic()
    try:
        while not args.max_messages or shown < args.max_messages:
            message = consumer.poll(0.5)
            if message is None:
                if args.timeout and time.monotonic() - idle_since > args.timeout:
                    break
                continue
            if message.error() is not None:
                if message.error().code() != KafkaError._PARTITION_EOF:
                    print(f"kvrec tail: {message.error()}", file=sys.stderr)
                continue
            idle_since = time.monotonic()
            try:
                line = message.value().decode() if args.json else describe(message.value())
            except (ValueError, KeyError, TypeError) as exc:
                line = f"(not a recommendation: {exc}) {message.value()[:200]!r}"
            print(line, flush=True)
            shown += 1
    except KeyboardInterrupt:
        pass
    finally:
        consumer.close()
    return 0
