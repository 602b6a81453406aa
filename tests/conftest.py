"""The one Kafka broker of a test session.

`kafka_bootstrap` yields bootstrap servers from, in order:
1. `KAFKA_BOOTSTRAP_SERVERS`, an existing cluster;
2. testcontainers' Kafka container (KRaft; `KVREC_KAFKA_IMAGE` picks the image), when a Docker
   daemon answers;
3. the project's local launcher (`deploy/kafka/launcher.py`): a real KRaft broker from the
   Apache Kafka jars.
The broker starts only when a test asks for it, once per session.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest


def _docker_answers() -> bool:
    try:
        import docker

        client = docker.from_env(timeout=3)
        return bool(client.ping())
    except Exception:  # no daemon, no socket, no permission: all mean "no Docker"
        return False


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    external = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if external:
        yield external
        return
    if _docker_answers():
        from testcontainers.community.kafka import KafkaContainer

        image = os.environ.get("KVREC_KAFKA_IMAGE", "confluentinc/cp-kafka:7.6.0")
        container = (
            KafkaContainer(image)
            .with_kraft()
            .with_env("KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR", "1")
            .with_env("KAFKA_TRANSACTION_STATE_LOG_MIN_ISR", "1")
            .with_env("KAFKA_AUTO_CREATE_TOPICS_ENABLE", "false")
        )
        with container:
            yield container.get_bootstrap_server()
        return
    from kvrec.deploy.kafka.launcher import LocalKafka

    # die_with_parent: a pytest killed with SIGKILL takes its broker with it
    with LocalKafka(die_with_parent=True) as kafka:
        yield kafka.bootstrap_servers


def unique_topic(prefix: str) -> str:
    """A fresh name, so tests never share topics or consumer groups."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def create_topics(
    bootstrap: str, partitions_by_topic: dict[str, int], config: dict[str, str] | None = None
) -> None:
    """Create topics with the partition counts asked for, and wait until they exist."""
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.create_topics(
        [
            NewTopic(name, num_partitions=partitions, replication_factor=1, config=config or {})
            for name, partitions in partitions_by_topic.items()
        ],
        operation_timeout=30,
    )
    for future in futures.values():
        future.result(timeout=60)
