"""A worker run in a thread of the test process, against the real broker: what a subprocess
worker does, without paying for a Python start and a torch import each time, and with the
recommender at hand to break on purpose."""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path

from kvrec.stream.kafka_config import client_config
from kvrec.stream.worker.app import (
    add_arguments,
    build_recommender,
    resolve_window_capacity,
    starting_model,
)
from kvrec.stream.worker.loop import Worker
from kvrec.stream.worker.metrics import HealthState, WorkerMetrics
from kvrec.stream.worker.settings import WorkerSettings
from kvrec.stream.worker.watcher import ModelWatcher


def worker_args(
    bootstrap: str,
    *,
    events: str,
    recommendations: str,
    dead_letters: str,
    group: str,
    model: Path | None,
    state_dir: Path,
    guarantee: str = "at-least-once",
    extra: tuple[str, ...] = (),
) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args([
        "--bootstrap-servers", bootstrap,
        "--input-topic", events,
        "--output-topic", recommendations,
        "--dead-letter-topic", dead_letters,
        "--group-id", group,
        "--instance-id", "in-process",
        *(["--model", str(model)] if model is not None else []),
        "--state-dir", str(state_dir),
        "--k", "5",
        "--retrieval", "exact",
        "--batch-size", "64",
        "--commit-interval-ms", "200",
        "--processing-guarantee", guarantee,
        "--metrics-port", "-1",
        *extra,
    ])


class ThreadWorker:
    """`with ThreadWorker(args) as w:` runs the loop in a thread; leaving stops it cleanly (as
    SIGTERM does) and re-raises what the loop raised, unless `expect_failure`."""

    def __init__(
        self,
        args: argparse.Namespace,
        *,
        expect_failure: bool = False,
        health: HealthState | None = None,
    ) -> None:
        settings = WorkerSettings.from_args(args)
        kafka_config = client_config(args)
        self.metrics = WorkerMetrics()
        self.health = health or HealthState()
        self.watcher: ModelWatcher | None = None
        if settings.model_store is None:
            self.recommender = build_recommender(settings)
            self.settings = resolve_window_capacity(settings, self.recommender)
        else:  # as `kvrec worker` does: the announced version, hot swaps
            self.recommender, announced = starting_model(
                settings, kafka_config, self.metrics, self.health, args
            )
            self.settings = resolve_window_capacity(settings, self.recommender)
            self.watcher = ModelWatcher(self.settings, kafka_config, self.metrics, announced,
                                        self.recommender.version)
        self.worker = Worker(
            self.settings, self.recommender, self.metrics, self.health, kafka_config,
            watcher=self.watcher,
        )
        self.expect_failure = expect_failure
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            self.worker.run()
        except BaseException as exc:  # reported to the test by `stop`
            self.error = exc

    def __enter__(self) -> ThreadWorker:
        if self.watcher is not None:
            self.watcher.start()
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def stop(self) -> None:
        self.worker.running = False
        self._thread.join(timeout=60)
        assert not self._thread.is_alive(), "the worker did not stop"
        if self.watcher is not None:
            self.watcher.stop()
        if self.error is not None and not self.expect_failure:
            raise self.error

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Until the worker owns its partitions, restored."""
        deadline = time.monotonic() + timeout
        while not self.worker.health.ready:
            assert self.alive and time.monotonic() < deadline, "the worker never became ready"
            time.sleep(0.05)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def counter(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels or None) or 0.0
