"""`kvrec worker`: serve the probes, load the model, build retrieval, run the loop until SIGTERM.

The metrics server starts first, before torch is imported (this module imports it only when
the model is loaded), so `/health` and `/metrics` answer within a second of the process start:
`/health` says `starting` while the model loads and the index builds, and `/ready` stays 503
until the worker's assignment is restored (`stream/worker/metrics.py`).
"""

from __future__ import annotations

import argparse
import faulthandler
import gc
import logging
import os
import signal
import sys
from typing import TYPE_CHECKING

from kvrec.errors import ConfigError
from kvrec.stream.kafka_config import (
    add_kafka_arguments,
    client_config,
    ensure_topics,
    topic_partitions,
    wait_for_kafka,
)
from kvrec.stream.lifecycle.loading import ModelChoice, ModelRefused, choice_of, load_recommender
from kvrec.stream.logs import add_logging_arguments, setup_logging
from kvrec.stream.worker.checkpoint import ClientHang
from kvrec.stream.worker.metrics import HealthState, WorkerMetrics, serve
from kvrec.stream.worker.settings import WorkerSettings, add_worker_arguments

if TYPE_CHECKING:
    from kvrec.stream.lifecycle.announcements import Announcement
    from kvrec.stream.lifecycle.watcher import ModelWatcher
    from kvrec.stream.worker.cold_start import PopularRecommender
    from kvrec.stream.worker.inference import Recommender
    from kvrec.stream.worker.loop import Worker

CAPACITY_WITHOUT_MODEL = 200  # events kept per user while no model says how many it needs

log = logging.getLogger("kvrec.worker")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_kafka_arguments(parser)
    add_worker_arguments(parser)
    add_logging_arguments(parser)


def build_recommender(settings: WorkerSettings) -> Recommender:
    """Load and check `--model` (refused with a clear error if it fails a check)."""
    if settings.model is None:
        raise ConfigError("--model is required here")
    return load_recommender(settings, ModelChoice(None, settings.model), progress=True)


def starting_model(
    settings: WorkerSettings, kafka_config: dict[str, object], metrics: WorkerMetrics,
    health: HealthState, args: argparse.Namespace,
) -> tuple[Recommender | PopularRecommender, Announcement | None]:
    """What the worker serves at start: the announced version (with --model-store), else
    --model, else nothing (cold-start mode). A refused announced version falls back the same
    way, loudly; a refused --model is an error (fix the flag)."""
    from kvrec.stream.worker.cold_start import PopularRecommender

    announcement = None
    if settings.model_store is not None:
        from kvrec.stream.lifecycle.announcements import ensure_model_topics, latest_announcement

        wait_for_kafka(kafka_config, args.connect_timeout, retry=True, log=log, on_wait=health.beat)
        if args.create_topics:
            ensure_model_topics(kafka_config, settings.updates_topic, settings.stats_topic,
                                args.connect_timeout)
        announcement = latest_announcement(kafka_config, settings.model_name,
                                           settings.updates_topic, args.connect_timeout)
        if announcement is None:
            log.warning("no version of model %r is announced on %s", settings.model_name,
                        settings.updates_topic)
    choice = choice_of(settings, announcement)
    if choice is not None and choice.version is not None:
        try:
            return load_recommender(settings, choice, progress=True), announcement
        except ModelRefused as refused:
            metrics.model_refusals.labels(refused.check).inc()
            log.error("announced model %s refused at start: %s", choice.version, refused)
            choice = choice_of(settings, None)
    if choice is not None:
        return load_recommender(settings, choice, progress=True), None
    log.warning("no model: cold-start mode, every recommendation is live popular items "
                "(cold_start, model_version \"none\") until a model is announced")
    return PopularRecommender(settings.k, settings.exclude_seen), None


def resolve_window_capacity(
    settings: WorkerSettings, recommender: Recommender | PopularRecommender
) -> WorkerSettings:
    """--window-capacity 0: the events the served model needs for exact refills."""
    from dataclasses import replace

    from kvrec.stream.worker.cold_start import PopularRecommender

    if isinstance(recommender, PopularRecommender):  # no model yet: room for the usual ones
        return replace(settings, window_capacity=settings.window_capacity or CAPACITY_WITHOUT_MODEL)
    # a --window-capacity below what the model needs was refused when it loaded (models.py)
    needed = recommender.artifact.config.history_needed
    return replace(settings, window_capacity=settings.window_capacity or needed)


def main(args: argparse.Namespace) -> int:
    setup_logging(args)
    settings = WorkerSettings.from_args(args)
    if args.processes != 1:
        from kvrec.stream.worker.processes import process_count, run_processes

        count = process_count(args.processes)
        if count > 1:  # the children check everything else, each on its own
            return run_processes(getattr(args, "_argv", sys.argv[1:]), count,
                                 settings.instance_id, settings.metrics_port, settings.metrics_host)
    kafka_config = client_config(args)  # its mistakes are refused before the model loads
    metrics = WorkerMetrics()
    health = HealthState()  # /health: "starting" until the worker is built
    if settings.metrics_port >= 0:
        server = serve(metrics, health, settings.metrics_port, settings.metrics_host)
        log.info("metrics on %s:%d (/metrics /health /ready)", settings.metrics_host,
                 server.server_address[1])
    import torch

    from kvrec.stream.lifecycle.watcher import ModelWatcher
    from kvrec.stream.worker.loop import Worker

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    log.info("loading the model and building retrieval")
    recommender, announced = starting_model(settings, kafka_config, metrics, health, args)
    settings = resolve_window_capacity(settings, recommender)
    _reach_topics(settings, kafka_config, args, health)
    watcher = None
    if settings.model_store is not None:  # follow the announcements: hot swaps
        watcher = ModelWatcher(settings, kafka_config, metrics, announced, recommender.version)
        watcher.start()
    worker = Worker(settings, recommender, metrics, health, kafka_config, watcher=watcher)
    log.info(
        "worker %s: model %s, %s, window %d events, %s",
        settings.instance_id,
        recommender.version,
        settings.backend,
        settings.window_capacity,
        "exactly-once" if settings.exactly_once else "at-least-once",
    )
    return _run_until_stopped(worker, watcher, args.release_memory_s)


def _reach_topics(settings: WorkerSettings, kafka_config: dict[str, object],
                  args: argparse.Namespace, health: HealthState) -> None:
    """Wait for Kafka, create the topics if asked, and check they are there."""
    # a Kafka that does not answer: one line after --connect-timeout, then quiet retries
    # (alive on /health, not /ready)
    wait_for_kafka(kafka_config, args.connect_timeout, retry=True, log=log, on_wait=health.beat)
    if args.create_topics:
        ensure_topics(kafka_config, topic_specs(settings, args.partitions), args.connect_timeout)
    # before any client is made: a missing topic is one line, and nothing is committed
    check_topics(settings, topic_partitions(kafka_config, args.connect_timeout))


def _run_until_stopped(worker: Worker, watcher: ModelWatcher | None,
                       release_memory_s: float) -> int:
    """Run the loop until SIGTERM or SIGINT; a hung client call exits at once."""
    freeze_heap()
    trimming = None
    if release_memory_s > 0:
        from kvrec.model.memory import release_periodically

        trimming = release_periodically(release_memory_s)

    settings = worker.settings
    leaving = [settings.leave_group_on_stop]  # a scale-down: the group frees the partitions now
    terminated = [False]  # SIGTERM: a restart or, with --leave-on-scale-down, maybe a scale-down

    def stop(signum: int, frame: object) -> None:
        worker.running = False
        if signum == signal.SIGUSR2:
            leaving[0] = True
        terminated[0] = terminated[0] or signum == signal.SIGTERM

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGUSR2, stop)  # stop for good (a scale-down): leave the group
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1`: where is it stuck?
    try:
        worker.run()  # /health: from "starting" to the loop's beats
        if terminated[0] and not leaving[0]:
            leaving[0] = _scaled_down(settings)
        if leaving[0] and settings.static_membership:  # closed, checkpointed: now leave
            from kvrec.stream.worker.leave import leave_group

            leave_group(worker.kafka_config, settings.group_id, settings.instance_id)
    except ClientHang as hang:
        # a client call hangs in C: exit at once (a normal exit would wait for the clients);
        # nothing was committed, and the restarted worker replays the work
        log.critical("%s", hang)
        print(f"kvrec: error: {hang}", file=sys.stderr, flush=True)
        logging.shutdown()
        os._exit(1)
    finally:
        if trimming is not None:
            trimming.set()
        if watcher is not None:
            watcher.stop()
        gc.unfreeze()  # hand the long-lived objects back to the collector for a clean exit
    return 0


def _scaled_down(settings: WorkerSettings) -> bool:
    """--leave-on-scale-down: whether this SIGTERM is a StatefulSet scale-down (leave)."""
    if not (settings.leave_on_scale_down and settings.static_membership):
        return False
    from kvrec.stream.worker.scale_down import KubernetesApi, scaled_down

    return scaled_down(settings.pod_name,
                       KubernetesApi(settings.kubernetes_api, settings.kubernetes_credentials))


def freeze_heap() -> None:
    """Before the loop: the model, the index and the stored windows are long-lived, so keep
    them out of the cyclic collector's scans, and collect the young generation less often (a
    full collection over the windows' objects stalled the loop for ~250 ms in a profile at
    1,600 events/s). `kvrec bench loop` calls it too, to measure the loop the worker runs."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


def topic_specs(settings: WorkerSettings, partitions: int) -> dict[str, tuple[int, dict[str, str]]]:
    compacted = {"cleanup.policy": "compact"}
    return {
        settings.input_topic: (partitions, {}),
        settings.changelog_topic: (partitions, compacted),
        settings.output_topic: (partitions, compacted),
        settings.dead_letter_topic: (1, {}),
    }


# each topic the worker needs: (its role, the flag that names it)
def topic_roles(settings: WorkerSettings) -> dict[str, tuple[str, str]]:
    return {
        settings.input_topic: ("input", "--input-topic"),
        settings.changelog_topic: ("changelog", "--changelog-topic"),
        settings.output_topic: ("output", "--output-topic"),
        settings.dead_letter_topic: ("dead-letter", "--dead-letter-topic"),
    }


def check_topics(settings: WorkerSettings, partitions: dict[str, int]) -> None:
    """`ConfigError` (one line) unless every topic the worker needs exists (`partitions`: the
    cluster's topics and their partition counts) and the changelog has a partition for each
    input partition (a restore reads the changelog partition of the input partition's number)."""
    roles = topic_roles(settings)
    missing = [name for name in roles if name not in partitions]
    if len(missing) == 1:
        role, flag = roles[missing[0]]
        raise ConfigError(
            f"the {role} topic {missing[0]} does not exist: create it with `--create-topics` "
            f"(or name an existing one with {flag})"
        )
    if missing:
        named = ", ".join(f"{name} ({roles[name][0]}, {roles[name][1]})" for name in missing)
        raise ConfigError(
            f"topics {named} do not exist: create them with `--create-topics` (or name "
            "existing ones with those flags)"
        )
    inputs, changelogs = partitions[settings.input_topic], partitions[settings.changelog_topic]
    if changelogs < inputs:
        raise ConfigError(
            f"the changelog topic {settings.changelog_topic} has {changelogs} partitions, fewer "
            f"than the {inputs} of the input topic {settings.input_topic}: give it {inputs} "
            "(or name another with --changelog-topic)"
        )
