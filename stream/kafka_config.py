"""Kafka client settings from flags (and so from `KVREC_<FLAG>` variables, shared by every
Kafka command), topic creation."""

from __future__ import annotations

import argparse
from collections.abc import Mapping

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from model.errors import ConfigError
from stream.cli import SHARED_GROUP


def add_kafka_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(SHARED_GROUP)
    group.add_argument("--bootstrap-servers", default="localhost:9092")
    group.add_argument(
        "--security-protocol",
        default=None,
        choices=("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"),
    )
    group.add_argument("--sasl-mechanism", default=None, help="PLAIN, SCRAM-SHA-256, SCRAM-SHA-512")
    group.add_argument("--sasl-username", default=None)
    group.add_argument("--sasl-password", default=None, help="prefer KVREC_SASL_PASSWORD")
    group.add_argument("--ssl-ca-location", default=None)
    group.add_argument("--ssl-certificate-location", default=None)
    group.add_argument("--ssl-key-location", default=None)
    group.add_argument("--client-id", default="kvrec")


def client_config(args: argparse.Namespace) -> dict[str, object]:
    """confluent-kafka settings shared by every client of a command."""
    config: dict[str, object] = {
        "bootstrap.servers": args.bootstrap_servers,
        "client.id": args.client_id,
    }
    optional = {
        "security.protocol": args.security_protocol,
        "sasl.mechanism": args.sasl_mechanism,
        "sasl.username": args.sasl_username,
        "sasl.password": args.sasl_password,
        "ssl.ca.location": args.ssl_ca_location,
        "ssl.certificate.location": args.ssl_certificate_location,
        "ssl.key.location": args.ssl_key_location,
    }
    config.update({k: v for k, v in optional.items() if v})
    if args.sasl_mechanism and not (args.sasl_username and args.sasl_password):
        raise ConfigError("--sasl-mechanism needs --sasl-username and --sasl-password")
    return config


METADATA_TIMEOUT_S = 10.0


def kafka_error_text(exc: KafkaException) -> str:
    """The readable part of a KafkaException (its KafkaError's text)."""
    error = exc.args[0] if exc.args else exc
    return error.str() if hasattr(error, "str") else str(error)


def topic_names(config: Mapping[str, object]) -> set[str]:
    """The cluster's topic names; `ConfigError` if the settings are wrong or nobody answers."""
    quiet = {**config, "log_level": 0}  # one error line instead of librdkafka's retry log
    try:
        return set(AdminClient(quiet).list_topics(timeout=METADATA_TIMEOUT_S).topics)
    except KafkaException as exc:
        raise ConfigError(
            f"cannot reach Kafka at {config.get('bootstrap.servers')}: {kafka_error_text(exc)}"
        ) from None


def ensure_topics(
    config: Mapping[str, object], topics: Mapping[str, tuple[int, Mapping[str, str]]]
) -> None:
    """Create the missing ones of `topics` ({name: (partitions, topic config)}); keep the rest."""
    existing = topic_names(config)
    wanted = [
        NewTopic(name, num_partitions=partitions, replication_factor=-1, config=dict(settings))
        for name, (partitions, settings) in topics.items()
        if name not in existing
    ]
    if not wanted:
        return
    admin = AdminClient(dict(config))
    for name, future in admin.create_topics(wanted, operation_timeout=30).items():
        try:
            future.result(timeout=60)
        except KafkaException as exc:
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise ConfigError(
                    f"could not create topic {name}: {kafka_error_text(exc)}"
                ) from None
