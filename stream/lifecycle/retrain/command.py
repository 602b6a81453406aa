"""`kvrec retrain`: flags, and the three ways it runs (a timer, `--once`, `--data`)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from confluent_kafka import Consumer, KafkaException, TopicPartition

from kvrec.errors import ConfigError
from kvrec.flags import PORT, integer, number
from kvrec.model.datasets import add_dataset_arguments, check_dataset_arguments, dataset_from_args
from kvrec.model.store import ModelStore
from kvrec.model.train_command import add_training_arguments, settings_from_args, shape_from_args
from kvrec.stream.kafka_config import add_kafka_arguments, client_config, kafka_error_text, wait_for_kafka
from kvrec.stream.lifecycle.announcements import LIVE_STATS_TOPIC, UPDATES_TOPIC, ensure_model_topics
from kvrec.stream.lifecycle.roles import ModelRole
from kvrec.stream.logs import add_logging_arguments, setup_logging

if TYPE_CHECKING:
    from kvrec.stream.lifecycle.retrain.job import JobSettings, Outcome

log = logging.getLogger("kvrec.retrain")

DEFAULT_EVENT_TYPES = "view,click,add_to_cart,purchase"  # as `kvrec worker --event-types`
RETRAIN_EPOCHS = 5  # a side job's default: a few epochs on top of the serving weights


REFUSED_EXIT = 3  # `kvrec retrain --once` / `--data`: the candidate was refused (0: published)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Keep each user's recent events from the input topic in a Faust table and retrain from "
        "it, warm-started from the serving model; publish the candidate into the model store "
        "and announce it only if its NDCG@10 on the held-out tail (each user's last event) is "
        "not below the serving model's by more than --margin. Exit status with --once or "
        f"--data: 0 published, {REFUSED_EXIT} refused, 2 a usage or data error, 1 a failure."
    )
    add_kafka_arguments(parser)
    source = parser.add_argument_group("source")
    source.add_argument("--input-topic", default="events", help="as `kvrec worker`'s")
    source.add_argument("--group-id", default="kvrec-retrain",
                        help="the Faust app id and consumer group (never the workers')")
    source.add_argument("--history", type=integer(3), default=200,
                        help="events kept per user in the table")
    source.add_argument("--state-dir", default="./retrain-state",
                        help="the table's RocksDB files and the candidates being trained")
    source.add_argument("--event-types", default=DEFAULT_EVENT_TYPES,
                        help="event types accepted (others are counted as bad and skipped)")
    source.add_argument("--max-event-bytes", type=integer(1), default=16_384)
    source.add_argument("--max-future-ms", type=integer(0), default=300_000)
    add_dataset_arguments(parser)  # --data: train from a file instead of the topic

    schedule = parser.add_argument_group("schedule")
    schedule.add_argument("--interval-s", type=number(above=0), default=3600.0,
                          help="retrain this often (the first run one interval after the start)")
    schedule.add_argument(
        "--once", action="store_true",
        help="read the input topic up to its end offsets as of the start, retrain once, exit "
             f"(0 published, {REFUSED_EXIT} refused): for a Kubernetes CronJob",
    )
    schedule.add_argument("--web-port", type=PORT, default=6066,
                          help="the Faust web server: GET /retrain/ (0 = off)")
    schedule.add_argument("--web-host", default="0.0.0.0")

    models = parser.add_argument_group("model store and decision")
    models.add_argument("--model-store", required=True, help="the model store's root folder")
    models.add_argument("--model-name", default="default")
    models.add_argument("--updates-topic", default=UPDATES_TOPIC)
    models.add_argument("--stats-topic", default=LIVE_STATS_TOPIC,
                        help="the workers' reports: the rollback history keeps only versions "
                             "that served")
    models.add_argument(
        "--margin", type=number(0), default=0.0,
        help="refuse a candidate whose NDCG@10 on the held-out tail is below the serving "
             "model's by more than this (absolute, e.g. 0.002; 0 = refuse any drop)",
    )
    models.add_argument(
        "--publish-as", default=ModelRole.SERVE.value, choices=[role.value for role in ModelRole],
        help="serve: announce it as the serving version; shadow: as the serving version's "
             "shadow candidate (with no serving version it serves)",
    )
    models.add_argument("--shadow-sample", type=number(above=0, high=1), default=0.1,
                        help="share of users a shadow candidate scores")

    training = parser.add_argument_group(
        "training (the model shape flags apply only with no serving model: a warm start "
        "takes the serving model's shape)"
    )
    add_training_arguments(training)  # type: ignore[arg-type]
    parser.set_defaults(epochs=RETRAIN_EPOCHS)
    add_logging_arguments(parser)


def _job_settings(args: argparse.Namespace, kafka_config: dict[str, object]) -> JobSettings:
    from kvrec.stream.lifecycle.retrain.job import JobSettings

    return JobSettings(
        kafka_config=kafka_config,
        store=ModelStore(args.model_store, args.model_name),
        updates_topic=args.updates_topic,
        stats_topic=args.stats_topic,
        train=settings_from_args(args),
        shape=shape_from_args(args),
        margin=args.margin,
        publish_as=args.publish_as,
        shadow_sample=args.shadow_sample,
        work_dir=Path(args.state_dir) / "candidates",
        progress=args.once or args.data is not None or args.format == "synthetic",
    )


def _report(outcome: Outcome) -> int:
    print(outcome.decision.note(), flush=True)
    return 0 if outcome.decision.publish else REFUSED_EXIT


def main(args: argparse.Namespace) -> int:
    setup_logging(args)
    kafka_config = client_config(args)
    settings_from_args(args)  # the training flags, and --data, before torch and Kafka
    if args.time_features == "on":
        raise ConfigError("--time-features on: the worker does not serve time models yet")
    if args.data is not None:
        check_dataset_arguments(args)
    from kvrec.model.train import configure_torch
    from kvrec.stream.lifecycle.retrain.job import run_job

    configure_torch(args)
    settings = _job_settings(args, kafka_config)
    wait_for_kafka(kafka_config, args.connect_timeout)
    ensure_model_topics(kafka_config, args.updates_topic, args.stats_topic)
    if args.data is not None or args.format == "synthetic":
        return _report(run_job(dataset_from_args(args), settings))
    return _run_app(args, kafka_config, settings)


def _faust_brokers(args: argparse.Namespace) -> list[str]:
    _faust_credentials(args)  # refuses what Faust's client cannot do, before anything starts
    return [f"kafka://{server.strip()}" for server in args.bootstrap_servers.split(",")]


FAUST_SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


def _faust_credentials(args: argparse.Namespace) -> Any:
    """The same security settings as every other client of the command (the shared Kafka
    flags), as Faust's credentials: None for PLAINTEXT, SSL with the CA and client
    certificate given, SASL PLAIN or SCRAM with a username and password (over SSL for
    SASL_SSL). `ConfigError` for what Faust's client cannot do (GSSAPI, OAUTHBEARER)."""
    import ssl

    import faust

    protocol = (args.security_protocol or "PLAINTEXT").upper()
    mechanism = (args.sasl_mechanism or "").upper()
    if protocol == "PLAINTEXT" and not mechanism:
        return None
    context = None
    if protocol in ("SSL", "SASL_SSL"):
        context = ssl.create_default_context(cafile=args.ssl_ca_location)
        if args.ssl_certificate_location:
            context.load_cert_chain(args.ssl_certificate_location, args.ssl_key_location)
    if protocol == "SSL" and not mechanism:
        return faust.SSLCredentials(context)
    if protocol not in ("SASL_PLAINTEXT", "SASL_SSL") or mechanism not in FAUST_SASL_MECHANISMS:
        raise ConfigError(
            f"kvrec retrain reads the topic with Faust, which takes --security-protocol PLAINTEXT, "
            f"SSL, SASL_PLAINTEXT or SASL_SSL with --sasl-mechanism {', '.join(FAUST_SASL_MECHANISMS)}; "
            f"not {protocol}{' ' + mechanism if mechanism else ''}: use --data, or one of those"
        )
    if not (args.sasl_username and args.sasl_password):
        raise ConfigError(f"--sasl-mechanism {mechanism} needs --sasl-username and --sasl-password")
    return faust.SASLCredentials(username=args.sasl_username, password=args.sasl_password,
                                 mechanism=mechanism, ssl_context=context)


def input_end_offsets(kafka_config: dict[str, object], topic: str,
                      timeout_s: float) -> dict[int, int]:
    """partition -> end offset of `topic` now; `ConfigError` if it does not exist."""
    consumer = Consumer({**kafka_config, "group.id": "kvrec-retrain-probe",
                         "enable.auto.commit": False})
    try:
        metadata = consumer.list_topics(topic, timeout=timeout_s).topics.get(topic)
        if metadata is None or metadata.error is not None or not metadata.partitions:
            raise ConfigError(f"input topic {topic} does not exist (see --input-topic)")
        return {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout_s)[1]
            for p in sorted(metadata.partitions)
        }
    except KafkaException as exc:
        raise ConfigError(f"cannot read {topic}: {kafka_error_text(exc)}") from None
    finally:
        consumer.close()


def _run_app(args: argparse.Namespace, kafka_config: dict[str, object], settings: JobSettings) -> int:
    import faust

    from kvrec.stream.lifecycle.retrain import lz4
    from kvrec.stream.lifecycle.retrain.app import AppSettings, build_app

    if not lz4.install():
        log.warning("no LZ4 decoder for Faust's Kafka client (neither cramjam nor liblz4): an "
                    "LZ4-compressed batch on %s will stop this app", args.input_topic)

    end_offsets = input_end_offsets(kafka_config, args.input_topic, args.connect_timeout)
    app_settings = AppSettings(
        group_id=args.group_id, brokers=_faust_brokers(args), credentials=_faust_credentials(args),
        input_topic=args.input_topic,
        partitions=len(end_offsets), state_dir=str(Path(args.state_dir).resolve()),
        history=args.history, interval_s=args.interval_s, once=args.once,
        web_port=args.web_port, web_host=args.web_host,
        event_types=frozenset(t.strip() for t in args.event_types.split(",") if t.strip()),
        max_event_bytes=args.max_event_bytes, max_future_ms=args.max_future_ms,
        progress=args.once,
    )
    holder: dict[str, Any] = {}

    def stop() -> None:  # as SIGTERM would: the worker's own shutdown path
        holder["worker"]._schedule_shutdown(signal.SIGTERM)

    from kvrec.stream.lifecycle.retrain.job import run_job

    app, status = build_app(app_settings, end_offsets, lambda data: run_job(data, settings), stop)
    if args.log_level != "DEBUG":
        for name in ("faust", "mode", "aiokafka", "kafka"):
            logging.getLogger(name).setLevel(logging.WARNING)
    worker = faust.Worker(app, loglevel=args.log_level, quiet=True, redirect_stdouts=False,
                          override_logging=False)
    # no Faust spinner: where stdout is not a terminal it still writes a backspace and a
    # cursor escape into the log (`\b\x1b[?25h`); the logs and the progress bar say enough
    worker.spinner = None
    holder["worker"] = worker
    log.info("kvrec retrain: group %s on %s (%d partitions), %s, web view %s",
             args.group_id, args.input_topic, len(end_offsets),
             "once" if args.once else f"every {args.interval_s:g} s",
             f"http://{args.web_host}:{args.web_port}/retrain/" if args.web_port else "off")
    with contextlib.suppress(SystemExit):  # it always ends with one
        worker.execute_from_commandline()
    if not args.once:
        return 0
    if status.last_decision is not None:
        print(status.last_decision["note"], flush=True)
    elif status.last_error is None:
        print("kvrec: error: stopped before it caught up and retrained", file=sys.stderr)
        return 1
    if status.last_error is not None:
        print(f"kvrec: error: {status.last_error}", file=sys.stderr)
    return status.exit_status
