"""`kvrec topics create`: create the topics a worker and `kvrec models` use, before the first worker.

    kvrec topics create --partitions 4

Creates what is missing, exactly as `kvrec worker --create-topics` (with `--model-store`) would:
the input topic with `--partitions`, the windows changelog (`<group id>-windows-changelog`) with
the same count and compacted, the output topic with the same count and compacted, the
dead-letter topic with one partition, and the compacted `model-updates` and `model-live-stats`
topics with one each. A topic that exists is kept as it is, never altered; each topic gets one
line saying which. The topic flags are the worker's, so one set of names means one set of topics.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from kvrec.flags import integer
from kvrec.stream.kafka_config import add_kafka_arguments, client_config, ensure_topics, topic_names
from kvrec.stream.logs import add_logging_arguments, setup_logging
from kvrec.stream.model_updates import topic_specs as model_topic_specs
from kvrec.stream.worker.app import topic_specs as worker_topic_specs
from kvrec.stream.worker.settings import add_topic_arguments

TopicSpecs = dict[str, tuple[int, dict[str, str]]]


@dataclass(frozen=True)
class WorkerTopics:
    """The topic names of a worker (the fields of `WorkerSettings` that `topic_specs` reads)."""

    input_topic: str
    output_topic: str
    dead_letter_topic: str
    changelog_topic: str


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["create"], help="create: the missing topics")
    add_kafka_arguments(parser)
    topics = parser.add_argument_group("topics (the worker's flags of the same names)")
    add_topic_arguments(topics)
    topics.add_argument("--updates-topic", default="model-updates")
    topics.add_argument("--stats-topic", default="model-live-stats")
    topics.add_argument(
        "--partitions", type=integer(1), default=4,
        help="of the input, changelog and output topics (the worker's --partitions)",
    )
    add_logging_arguments(parser, default_level="WARNING")


def wanted_topics(args: argparse.Namespace) -> TopicSpecs:
    """{name: (partitions, topic config)}: the worker's topics, then the model topics."""
    names = WorkerTopics(
        input_topic=args.input_topic,
        output_topic=args.output_topic,
        dead_letter_topic=args.dead_letter_topic,
        changelog_topic=args.changelog_topic or f"{args.group_id}-windows-changelog",
    )
    specs = worker_topic_specs(names, args.partitions)  # type: ignore[arg-type]
    specs.update(model_topic_specs(args.updates_topic, args.stats_topic))
    return specs


def describe(name: str, partitions: int, config: dict[str, str], existed: bool) -> str:
    if existed:
        return f"{name}: exists, kept as it is"
    settings = "".join(f", {key}={value}" for key, value in config.items())
    return f"{name}: created, {partitions} partition{'s' if partitions != 1 else ''}{settings}"


def main(args: argparse.Namespace) -> int:
    setup_logging(args)
    config = client_config(args)
    specs = wanted_topics(args)
    # a Kafka that cannot be reached within --connect-timeout: one line, exit status 1
    existing = topic_names(config, args.connect_timeout)
    ensure_topics(config, specs, args.connect_timeout)
    for name, (partitions, settings) in specs.items():
        print(describe(name, partitions, settings, name in existing))
    return 0
