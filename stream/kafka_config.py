"""Kafka client settings from flags (and so from `KVREC_<FLAG>` variables, shared by every
Kafka command), topic creation."""

from __future__ import annotations

import argparse
import re
from collections.abc import Mapping

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from model.errors import ConfigError
from stream.cli import SHARED_GROUP

# librdkafka settings that have a flag of their own: `-X` refuses them (one way to set each)
NAMED_SETTINGS = {
    "bootstrap.servers": "--bootstrap-servers",
    "metadata.broker.list": "--bootstrap-servers",
    "client.id": "--client-id",
    "security.protocol": "--security-protocol",
    "sasl.mechanism": "--sasl-mechanism",
    "sasl.mechanisms": "--sasl-mechanism",
    "sasl.username": "--sasl-username",
    "sasl.password": "--sasl-password",
    "ssl.ca.location": "--ssl-ca-location",
    "ssl.certificate.location": "--ssl-certificate-location",
    "ssl.key.location": "--ssl-key-location",
}
# mechanisms that log in with --sasl-username and --sasl-password (OAUTHBEARER and GSSAPI
# take their settings from -X: sasl.oauthbearer.*, sasl.kerberos.*)
PASSWORD_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
_SETTING_NAME = re.compile(r"[a-z][a-z0-9_.]*")


def kafka_option(text: str) -> tuple[str, str]:
    """`-X key=value`: one librdkafka setting (the value is not echoed: it may be a secret)."""
    key, equals, value = text.partition("=")
    key = key.strip()
    if not equals or not _SETTING_NAME.fullmatch(key):
        raise argparse.ArgumentTypeError(
            "expected KEY=VALUE with KEY a librdkafka setting such as sasl.oauthbearer.config"
        )
    if key in NAMED_SETTINGS:
        raise argparse.ArgumentTypeError(f"{key} has its own flag: use {NAMED_SETTINGS[key]}")
    return key, value


def add_kafka_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(SHARED_GROUP)
    group.add_argument("--bootstrap-servers", default="localhost:9092")
    group.add_argument(
        "--security-protocol",
        default=None,
        choices=("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"),
    )
    group.add_argument(
        "--sasl-mechanism", default=None,
        help="PLAIN, SCRAM-SHA-256, SCRAM-SHA-512 (with --sasl-username and --sasl-password), "
             "OAUTHBEARER or GSSAPI (their settings with -X)",
    )
    group.add_argument("--sasl-username", default=None)
    group.add_argument("--sasl-password", default=None, help="prefer KVREC_SASL_PASSWORD")
    group.add_argument("--ssl-ca-location", default=None)
    group.add_argument("--ssl-certificate-location", default=None)
    group.add_argument("--ssl-key-location", default=None)
    group.add_argument("--client-id", default="kvrec")
    group.add_argument(
        "-X", "--kafka-option", dest="kafka_options", metavar="KEY=VALUE", action="append",
        type=kafka_option, default=[],
        help="any librdkafka setting the flags above do not cover, e.g. "
             "-X sasl.oauthbearer.config=... (repeatable; KVREC_KAFKA_OPTIONS holds a list "
             "separated by ';', or by ',' when it has no ';'; -X adds to it, and wins for the "
             "same key)",
    )


def client_config(args: argparse.Namespace) -> dict[str, object]:
    """confluent-kafka settings shared by every client of a command (each command then adds
    the settings it needs, e.g. its group and isolation level, which win over -X)."""
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
    mechanism = (args.sasl_mechanism or "").upper()
    if mechanism in PASSWORD_MECHANISMS and not (args.sasl_username and args.sasl_password):
        raise ConfigError(f"--sasl-mechanism {mechanism} needs --sasl-username and --sasl-password")
    config.update(dict(args.kafka_options))  # in order: the command line's after the variable's
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
