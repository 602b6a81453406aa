"""`kvrec tail`: print the recommendations topic as it arrives.

    kvrec tail --from-beginning            # human-readable, one line per message
    kvrec tail --json --max-messages 10    # the raw JSON values

A human-readable line reads
    user u7  [sku-1:0.912 sku-9:0.871 ...]  because sku-3 (click 0.41)  model 20261123-ab12  8 ms
where the last figure is event -> emit latency (the worker's emit time minus the Kafka timestamp
of the input event), shown when the recommendation carries `source_ts`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

from confluent_kafka import Consumer, KafkaError, KafkaException

from kvrec.errors import ConfigError, RunFailed
from kvrec.flags import integer, number
from kvrec.stream.kafka_config import (
    add_kafka_arguments,
    client_config,
    kafka_error_text,
    topic_names,
    wait_for_kafka,
)
from kvrec.stream.kafka_logs import kafka_log
from kvrec.stream.logs import add_logging_arguments, setup_logging
from kvrec.stream.schema import decode_recommendation

SHOWN_ITEMS = 5
TOPIC_POLL_S = 1.0  # how often a missing topic is looked for
log = logging.getLogger("kvrec.tail")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_kafka_arguments(parser)
    parser.add_argument("--topic", default="recommendations")
    parser.add_argument("--from-beginning", action="store_true")
    parser.add_argument("--json", action="store_true", help="print each message's JSON value")
    parser.add_argument("--max-messages", type=integer(0), default=0, help="stop after N (0 = never)")
    parser.add_argument(
        "--timeout", type=number(0), default=0.0,
        help="stop after S idle seconds (0 = never); with it, a Kafka that cannot be reached "
             "within S seconds (or --connect-timeout, if shorter), or a --topic that does not "
             "exist after S seconds, is an error, exit status 1",
    )
    add_logging_arguments(parser, default_level="WARNING")


def describe(value: bytes) -> str:
    """One human-readable line for a recommendation message value."""
    rec = decode_recommendation(value)
    items = " ".join(f"{i.item_id}:{i.score:.3f}" for i in rec.items[:SHOWN_ITEMS])
    more = " ..." if len(rec.items) > SHOWN_ITEMS else ""
    because = ", ".join(f"{b.item_id} ({b.event_type} {b.weight:.2f})" for b in rec.because)
    parts = [f"user {rec.user_id}", f"[{items}{more}]"]
    if rec.cold_start:
        parts.append("cold start (popular items)")
    if because:
        parts.append(f"because {because}")
    parts.append(f"model {rec.model_version}")
    if rec.source_ts:
        parts.append(f"{rec.emitted_ts - rec.source_ts} ms after the event")
    return "  ".join(parts)


def render(key: bytes | None, value: bytes | None, as_json: bool) -> str:
    if value is None:  # a tombstone on the compacted topic: the user's list was deleted
        user = key.decode(errors="replace") if key else "?"
        return json.dumps({"user_id": user, "deleted": True}) if as_json else f"user {user}  (deleted)"
    try:
        return value.decode() if as_json else describe(value)
    except ValueError as exc:  # includes UnicodeDecodeError and json's errors
        return f"(not a recommendation: {exc}) {value[:200]!r}"


def wait_for_topic(config: dict[str, object], topic: str, timeout_s: float | None) -> None:
    """Return once `topic` exists. Within `timeout_s` (None: forever, saying so once), else
    `RunFailed` (exit status 1): a tail of a topic that is not there shows nothing, and
    that is not success."""
    started = time.monotonic()
    said = False
    while topic not in topic_names(config):
        waited = time.monotonic() - started
        if timeout_s is not None and waited >= timeout_s:
            raise RunFailed(
                f"topic {topic!r} does not exist at {config.get('bootstrap.servers')} "
                f"(waited {timeout_s:g} s, --timeout); the worker's --output-topic is "
                "`recommendations` unless it was given another"
            )
        if not said:
            log.warning("topic %r does not exist yet; waiting for it", topic)
            said = True
        time.sleep(TOPIC_POLL_S if timeout_s is None else min(TOPIC_POLL_S, timeout_s - waited))


def main(args: argparse.Namespace) -> int:
    setup_logging(args)
    config = client_config(args)
    # nothing to read until a broker answers: with --timeout, give up (one line, exit 1);
    # without, say so once and retry quietly
    if args.timeout:
        wait_for_kafka(config, min(args.timeout, args.connect_timeout))
    else:
        wait_for_kafka(config, args.connect_timeout, retry=True, log=log)
    wait_for_topic(config, args.topic, args.timeout or None)
    try:
        consumer = Consumer(
            {
                **config,
                "group.id": f"kvrec-tail-{os.getpid()}-{time.time_ns()}",
                "auto.offset.reset": "earliest" if args.from_beginning else "latest",
                "enable.auto.commit": False,
                "isolation.level": "read_committed",
            }
        )
    except KafkaException as exc:
        raise ConfigError(f"Kafka: {kafka_error_text(exc)}") from None
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
            error = message.error()
            if error is not None:
                if error.code() != KafkaError._PARTITION_EOF:
                    kafka_log.warning("%s", error.str())  # the same problem once a minute
                continue
            idle_since = time.monotonic()
            print(render(message.key(), message.value(), args.json), flush=True)
            shown += 1
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:  # `kvrec tail | head`
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the interpreter's final flush
    finally:
        consumer.close()
    return 0
