"""Kafka client settings from flags (and so from `KVREC_<FLAG>` variables, shared by every
Kafka command), topic creation."""

from __future__ import annotations

import argparse
import logging
import re
import time
from collections.abc import Callable, Mapping

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from kvrec.errors import ConfigError, RunFailed
from kvrec.flags import number
from kvrec.stream.cli import SHARED_GROUP
from kvrec.stream.kafka_logs import kafka_log, kafka_log_filter

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
        "--connect-timeout", type=number(above=0), default=CONNECT_TIMEOUT_S,
        help="seconds to wait for a broker to answer before saying, in one line, that none "
             "does; then the worker and tail retry quietly, and replay and tail --timeout stop "
             "(exit status 1)",
    )
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
    config["logger"] = kafka_log  # librdkafka's lines through Python logging (kafka_logs.py)
    return config


CONNECT_TIMEOUT_S = 10.0  # --connect-timeout's default
RETRY_MAX_S = 30.0  # the longest quiet wait between two tries to reach Kafka


class KafkaUnreachable(RunFailed):
    """No broker answered in time: the command cannot go on (exit status 1)."""


def kafka_error_text(exc: KafkaException) -> str:
    """The readable part of a KafkaException (its KafkaError's text)."""
    error = exc.args[0] if exc.args else exc
    return error.str() if hasattr(error, "str") else str(error)


def admin_client(config: Mapping[str, object]) -> AdminClient:
    """An admin client; `ConfigError` for settings librdkafka refuses (e.g. an unknown -X).
    It logs errors only (a failed connection's reason; not that it ignores a consumer's -X),
    and nothing with a config without kvrec's logger (the demo's, the benchmarks')."""
    settings = {**config, "log_level": 3 if "logger" in config else 0}
    try:
        return AdminClient(settings)
    except KafkaException as exc:
        raise ConfigError(f"Kafka: {kafka_error_text(exc)}") from None


def _probe(admin: AdminClient, timeout_s: float) -> str | None:
    """None if a broker answered a metadata request within `timeout_s`, else why not."""
    try:
        admin.list_topics(timeout=timeout_s)
        return None
    except KafkaException as exc:
        return kafka_error_text(exc)
    finally:
        admin.poll(0)  # hand over the client's log lines (the failed connections' reason)


def _unreachable(config: Mapping[str, object], timeout_s: float, problem: str) -> str:
    reason = kafka_log_filter.connection_problem or problem
    return f"cannot reach Kafka at {config.get('bootstrap.servers')} within {timeout_s:g} s ({reason})"


def wait_for_kafka(
    config: Mapping[str, object],
    timeout_s: float = CONNECT_TIMEOUT_S,
    *,
    retry: bool = False,
    log: logging.Logger = kafka_log,
    on_wait: Callable[[], None] = lambda: None,
) -> None:
    """Return once a broker answers. If none does within `timeout_s`: `KafkaUnreachable` (one
    line), or with `retry`, one warning, then a quiet wait until one answers: the client keeps
    reconnecting with librdkafka's backoff, and it is asked again after 1, 2, 4 ... at most
    `RETRY_MAX_S` seconds (`on_wait` is called between two asks), then one line that it answered."""
    admin = admin_client(config)
    kafka_log_filter.connection_problem = None
    started = time.monotonic()
    problem = _probe(admin, timeout_s)
    if problem is None:
        return
    message = _unreachable(config, timeout_s, problem)
    if not retry:
        raise KafkaUnreachable(message)
    log.warning("%s; retrying quietly, at most %.0f s apart", message, RETRY_MAX_S)
    wait_s = 1.0
    while problem is not None:
        on_wait()
        problem = _probe(admin, wait_s)
        wait_s = min(2 * wait_s, RETRY_MAX_S)
    log.warning("reached Kafka at %s after %.0f s", config.get("bootstrap.servers"),
                time.monotonic() - started)


def topic_names(config: Mapping[str, object], timeout_s: float = CONNECT_TIMEOUT_S) -> set[str]:
    """The cluster's topic names; `KafkaUnreachable` if no broker answers within `timeout_s`."""
    admin = admin_client(config)
    kafka_log_filter.connection_problem = None
    try:
        return set(admin.list_topics(timeout=timeout_s).topics)
    except KafkaException as exc:
        admin.poll(0)
        raise KafkaUnreachable(_unreachable(config, timeout_s, kafka_error_text(exc))) from None


def topic_partitions(config: Mapping[str, object],
                     timeout_s: float = CONNECT_TIMEOUT_S) -> dict[str, int]:
    """The cluster's topics and their partition counts; `KafkaUnreachable` if no broker answers
    within `timeout_s`."""
    admin = admin_client(config)
    kafka_log_filter.connection_problem = None
    try:
        topics = admin.list_topics(timeout=timeout_s).topics
    except KafkaException as exc:
        admin.poll(0)
        raise KafkaUnreachable(_unreachable(config, timeout_s, kafka_error_text(exc))) from None
    return {name: len(topic.partitions) for name, topic in topics.items()}


def ensure_topics(
    config: Mapping[str, object],
    topics: Mapping[str, tuple[int, Mapping[str, str]]],
    timeout_s: float = CONNECT_TIMEOUT_S,
) -> None:
    """Create the missing ones of `topics` ({name: (partitions, topic config)}); keep the rest."""
    existing = topic_names(config, timeout_s)
    wanted = [
        NewTopic(name, num_partitions=partitions, replication_factor=-1, config=dict(settings))
        for name, (partitions, settings) in topics.items()
        if name not in existing
    ]
    if not wanted:
        return
    admin = admin_client(config)
    for name, future in admin.create_topics(wanted, operation_timeout=30).items():
        try:
            future.result(timeout=60)
        except KafkaException as exc:
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise ConfigError(
                    f"could not create topic {name}: {kafka_error_text(exc)}"
                ) from None
