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
from pathlib import Path
from typing import TYPE_CHECKING

from model.errors import ConfigError
from stream.kafka_config import add_kafka_arguments, client_config, ensure_topics, wait_for_kafka
from stream.logs import add_logging_arguments, setup_logging
from stream.worker.checkpoint import ClientHang
from stream.worker.metrics import HealthState, WorkerMetrics, serve
from stream.worker.settings import WorkerSettings, add_worker_arguments

if TYPE_CHECKING:
    from stream.worker.inference import Recommender

log = logging.getLogger("kvrec.worker")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_kafka_arguments(parser)
    add_worker_arguments(parser)
    add_logging_arguments(parser)


def build_recommender(settings: WorkerSettings) -> Recommender:
    """Load and verify the artifact (refused with a clear error if it fails its manifest)."""
    import numpy as np

    from model.artifact import load_artifact
    from model.backends import make_backend
    from model.retrieval import Retriever
    from state.kvcache import LruByteCache
    from state.partition import group_directory
    from stream.worker.inference import CacheEntry, Recommender

    artifact = load_artifact(settings.model)
    if settings.k > artifact.config.n_items:
        raise ConfigError(
            f"--k {settings.k} is more than the model's catalog of {artifact.config.n_items} items"
        )
    onnx_path = settings.onnx
    if settings.backend == "onnx-cpu" and onnx_path is None:
        from model.export import export_step

        group_dir = settings.state_dir / group_directory(settings.group_id)
        onnx_path = group_dir / f"step-{artifact.version}.onnx"
        if not onnx_path.exists():
            onnx_path.parent.mkdir(parents=True, exist_ok=True)
            export_step(artifact.encoder, onnx_path)
    backend = make_backend(settings.backend, artifact.encoder, onnx_path=onnx_path)
    item_vectors = artifact.encoder.item_embeddings().detach().float().cpu().numpy()
    retriever = Retriever(
        np.ascontiguousarray(item_vectors),
        kind=settings.retrieval,
        approx_threshold=settings.approx_threshold,
        progress=True,
    )
    log.info("retrieval: %s", retriever.build_report)
    if settings.unavailable_items is not None:
        ids = Path(settings.unavailable_items).read_text().split()
        retriever.set_unavailable(artifact.item_index[i] for i in ids if i in artifact.item_index)
    cache: LruByteCache[CacheEntry] = LruByteCache(settings.cache_bytes)
    return Recommender(
        artifact,
        backend,
        retriever,
        cache,
        k=settings.k,
        exclude_seen=settings.exclude_seen,
        because_count=settings.because,
        reuse_cache=settings.reuse_kv_cache,
    )


def resolve_window_capacity(settings: WorkerSettings, recommender: Recommender) -> WorkerSettings:
    needed = recommender.artifact.config.history_needed
    if settings.window_capacity and settings.window_capacity < needed:
        raise ConfigError(
            f"--window-capacity {settings.window_capacity} is below what exact cache refills "
            f"need for this model (N*(W-1)+1 = {needed}); set 0 or at least {needed}"
        )
    from dataclasses import replace

    return replace(settings, window_capacity=settings.window_capacity or needed)


def main(args: argparse.Namespace) -> int:
    setup_logging(args)
    settings = WorkerSettings.from_args(args)
    kafka_config = client_config(args)  # its mistakes are refused before the model loads
    metrics = WorkerMetrics()
    health = HealthState()  # /health: "starting" until the worker is built
    if settings.metrics_port >= 0:
        server = serve(metrics, health, settings.metrics_port, settings.metrics_host)
        log.info("metrics on %s:%d (/metrics /health /ready)", settings.metrics_host,
                 server.server_address[1])
    import torch

    from stream.worker.loop import Worker

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    log.info("loading the model and building retrieval")
    recommender = build_recommender(settings)
    settings = resolve_window_capacity(settings, recommender)
    # a Kafka that does not answer: one line after --connect-timeout, then quiet retries
    # (alive on /health, not /ready)
    wait_for_kafka(kafka_config, args.connect_timeout, retry=True, log=log, on_wait=health.beat)
    if args.create_topics:
        ensure_topics(kafka_config, topic_specs(settings, args.partitions), args.connect_timeout)
    worker = Worker(settings, recommender, metrics, health, kafka_config)
    # the model, the index and the stored windows are long-lived: keep them out of the cyclic
    # collector's scans, and collect the young generation less often (a full collection over
    # the windows' objects stalled the loop for ~250 ms in a profile at 1,600 events/s)
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)

    def stop(signum: int, frame: object) -> None:
        worker.running = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1`: where is it stuck?
    log.info(
        "worker %s: model %s, %s, window %d events, %s",
        settings.instance_id,
        recommender.version,
        settings.backend,
        settings.window_capacity,
        "exactly-once" if settings.exactly_once else "at-least-once",
    )
    try:
        worker.run()  # /health: from "starting" to the loop's beats
    except ClientHang as hang:
        # a client call hangs in C: exit at once (a normal exit would wait for the clients);
        # nothing was committed, and the restarted worker replays the work
        log.critical("%s", hang)
        print(f"kvrec: error: {hang}", file=sys.stderr, flush=True)
        logging.shutdown()
        os._exit(1)
    finally:
        gc.unfreeze()  # hand the long-lived objects back to the collector for a clean exit
    return 0


def topic_specs(settings: WorkerSettings, partitions: int) -> dict[str, tuple[int, dict[str, str]]]:
    compacted = {"cleanup.policy": "compact"}
    return {
        settings.input_topic: (partitions, {}),
        settings.changelog_topic: (partitions, compacted),
        settings.output_topic: (partitions, compacted),
        settings.dead_letter_topic: (1, {}),
    }
