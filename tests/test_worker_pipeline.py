"""The pipelined loop (`--pipeline on`: a batch is handled on a second thread while the loop
decodes the next) against the sequential one, on the same messages (Kafka faked):

- the same bytes out (recommendations and dead letters, in the same order), the same windows
  and the same offsets to commit, whatever the batch sizes;
- nothing of a batch in flight is lost or half-done at a checkpoint or a rebalance: both wait
  for it, so a checkpoint covers whole batches (its outputs produced, its offsets stored);
- a batch that fails in flight fails the next `feed` (or `settle`), and nothing after it is
  handled.
"""

from __future__ import annotations

import json
import random
import tempfile
import threading
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from confluent_kafka import TopicPartition
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import stream.worker.loop as loop_module
from stream.worker.loop import KafkaClients, Worker
from stream.worker.metrics import HealthState, WorkerMetrics
from tests.fake_kafka import FakeConsumer, FakeMessage, FakeProducer, FakeRestoreConsumer
from tests.worker_fixtures import EVENT_TYPES, exact_worker_with_model, make_artifact

NOW_MS = 1_800_000_000_000


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    model = make_artifact(tmp_path_factory.mktemp("pipeline") / "model", n_items=60, window=4,
                          layers=2).path
    return exact_worker_with_model(model)


@pytest.fixture(scope="module", autouse=True)
def fixed_clock() -> Any:
    """`emitted_ts` from a fixed clock, so that two runs can be compared byte for byte."""
    real = loop_module.time
    loop_module.time = SimpleNamespace(  # type: ignore[assignment]
        time=lambda: NOW_MS / 1000, monotonic=real.monotonic, perf_counter=real.perf_counter)
    yield
    loop_module.time = real


def _messages(count: int, seed: int, partitions: int = 2) -> list[FakeMessage]:
    rng = random.Random(seed)
    out = []
    for offset in range(count):
        user = f"user-{rng.randrange(9)}"
        item = f"sku-{rng.randint(1, 60)}" if rng.random() > 0.15 else f"new-{rng.randint(1, 4)}"
        value = json.dumps({"user_id": user, "item_id": item,
                            "event_type": rng.choice(EVENT_TYPES), "ts": 1_700_000_000_000 + offset})
        if rng.random() < 0.05:
            value = value[:-3]  # malformed: a dead letter
        out.append(FakeMessage("events", hash(user) % partitions, offset, user.encode(),
                               value.encode(), _timestamp=NOW_MS - 1000 + offset))
    return out


def _worker(setup: Any, state_dir: str, pipeline: bool) -> tuple[Worker, FakeProducer]:
    base, recommender = setup
    recommender.cache.clear()
    producer, consumer = FakeProducer(), FakeConsumer()
    worker = Worker(replace(base, state_dir=Path(state_dir), pipeline=pipeline), recommender,
                    WorkerMetrics(), HealthState(), {},
                    clients=KafkaClients(consumer, producer, FakeRestoreConsumer(producer)))
    worker._on_assign(consumer, [TopicPartition("events", 0), TopicPartition("events", 1)])
    return worker, producer


def _run(setup: Any, messages: list[FakeMessage], sizes: list[int], pipeline: bool,
         checkpoint_every: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as state_dir:
        worker, producer = _worker(setup, state_dir, pipeline)
        start = n = 0
        while start < len(messages):
            size = sizes[n % len(sizes)]
            worker.feed(messages[start : start + size])
            start, n = start + size, n + 1
            if n % checkpoint_every == 0:
                worker._commit()
        worker._commit()
        committed = [[(tp.partition, tp.offset) for tp in c] for c in worker.consumer.commits]
        windows = {p: {u: [e.offset for e in w.events] for u, w in windows.dirty.items()}
                   | {u: [e.offset for e in w.events] for u, w in windows.clean.items()}
                   for p, windows in worker.state.items()}
        worker.close()
        return {
            "outputs": [m.value() for m in producer.topic(worker.settings.output_topic)],
            "dead": [m.value() for m in producer.topic(worker.settings.dead_letter_topic)],
            "committed": committed,
            "windows": windows,
        }


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 10**6), sizes=st.lists(st.integers(1, 40), min_size=1, max_size=4),
       every=st.integers(1, 5))
def test_pipelined_is_the_sequential_loop(setup, seed: int, sizes: list[int], every: int) -> None:
    messages = _messages(150, seed)
    pipelined = _run(setup, messages, sizes, True, every)
    sequential = _run(setup, messages, sizes, False, every)
    assert len(pipelined["outputs"]) > 100
    assert pipelined == sequential


class _Slow:
    """The recommender, held on the inference thread until released."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.release = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def recommend(self, wave: Any) -> Any:
        assert threading.current_thread() is not threading.main_thread()
        self.release.wait(10)
        return self.inner.recommend(wave)


def test_a_checkpoint_and_a_rebalance_wait_for_the_batch_in_flight(setup) -> None:
    messages = _messages(40, seed=1)
    with tempfile.TemporaryDirectory() as state_dir:
        worker, producer = _worker(setup, state_dir, pipeline=True)
        slow = worker.recommender = _Slow(worker.recommender)
        worker.feed(messages[:20])
        assert worker._inflight is not None and not worker.checkpoint.pending_offsets
        threading.Timer(0.3, slow.release.set).start()
        worker._commit()  # waits for the batch: its outputs and offsets are in the checkpoint
        outputs = len(producer.topic(worker.settings.output_topic))
        dead = len(producer.topic(worker.settings.dead_letter_topic))
        assert outputs + dead == 20
        assert worker.consumer.commits  # the batch's offsets, committed
        slow.release.clear()
        worker.feed(messages[20:])
        threading.Timer(0.3, slow.release.set).start()
        seen: list[int] = []
        revoke = worker._settled(lambda consumer, partitions: seen.append(
            len(producer.topic(worker.settings.output_topic))))
        revoke(worker.consumer, [])
        assert seen and seen[0] > outputs  # the batch in flight was produced first
        worker.close()


def test_a_batch_that_fails_in_flight_fails_the_next_feed(setup) -> None:
    messages = _messages(40, seed=2)
    with tempfile.TemporaryDirectory() as state_dir:
        worker, _ = _worker(setup, state_dir, pipeline=True)
        broken = loop_module.Worker._handle

        def failing(self: Worker, batch: Any) -> None:
            raise loop_module.KafkaException("the producer is gone")

        worker._handle = failing.__get__(worker)  # type: ignore[method-assign]
        worker.feed(messages[:20])
        with pytest.raises(loop_module.KafkaException):
            worker.feed(messages[20:])
        assert worker._inflight is None  # the second batch was never handed over
        assert not worker.checkpoint.pending_offsets
        worker._handle = broken.__get__(worker)  # type: ignore[method-assign]
        worker.failed = True
        worker.close()
