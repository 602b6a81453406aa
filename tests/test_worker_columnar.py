"""The columnar hot loop against the per-event path, on the same messages (Kafka faked: the
real broker runs the same loop in tests/test_worker_kafka.py, against the offline reference).

- Same batches: the batch wire encoder (stream/worker/wire.py over `ScoredBatch` columns) writes
  byte for byte what the per-event encoder (`Worker._encode`: a `Recommendation` per event,
  `encode_recommendation`) writes of the same results.
- Batches of 64 against one event per batch (every event its own wave: no columns shared by
  events or users): the same recommendations, scores within float noise of batched kernels.
"""

from __future__ import annotations

import json
import random
import tempfile
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
from confluent_kafka import TopicPartition

import kvrec.stream.worker.loop as loop_module
from kvrec.stream.worker.loop import KafkaClients, Worker
from kvrec.stream.worker.metrics import HealthState, WorkerMetrics
from kvrec.stream.worker.settings import WorkerSettings
from tests.fake_kafka import FakeConsumer, FakeMessage, FakeProducer, FakeRestoreConsumer
from tests.worker_fixtures import EVENT_TYPES, exact_worker_with_model, make_artifact

NOW_MS = 1_800_000_000_000


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    model = make_artifact(tmp_path_factory.mktemp("columnar") / "model", n_items=60, window=4,
                          layers=2).path
    return exact_worker_with_model(model)


def _messages(count: int, seed: int) -> list[FakeMessage]:
    rng = random.Random(seed)
    out = []
    for offset in range(count):
        user = f"user-{rng.randrange(9)}" if rng.random() > 0.05 else "ü-😀"
        item = f"sku-{rng.randint(1, 60)}" if rng.random() > 0.15 else f"new-{rng.randint(1, 4)}"
        value = json.dumps({"user_id": user, "item_id": item,
                            "event_type": rng.choice(EVENT_TYPES), "ts": 1_700_000_000_000 + offset})
        if rng.random() < 0.03:
            value = value[:-3]  # malformed: a dead letter, in both paths
        out.append(FakeMessage("events", 0, offset, user.encode(), value.encode(),
                               _timestamp=NOW_MS - 1000 + offset))
    return out


def _run(settings: WorkerSettings, recommender, messages: list[FakeMessage], batch: int,
         per_event_encoder: bool = False) -> list[bytes]:
    recommender.cache.clear()
    with tempfile.TemporaryDirectory() as state_dir:
        producer, consumer = FakeProducer(), FakeConsumer()
        worker = Worker(replace(settings, state_dir=Path(state_dir)), recommender,
                        WorkerMetrics(), HealthState(), {},
                        clients=KafkaClients(consumer, producer, FakeRestoreConsumer(producer)))
        if per_event_encoder:  # what the worker did before the columns: an object per event
            worker._encode_batch = lambda sources, scored, emitted_ms: [  # type: ignore[method-assign]
                worker._encode(source, scored[e], emitted_ms) for e, source in enumerate(sources)
            ]
        worker._on_assign(consumer, [TopicPartition("events", 0)])
        for start in range(0, len(messages), batch):
            worker.process(messages[start : start + batch])
        worker.checkpoint.commit()
        worker.state.close_all()
        return [m.value() for m in producer.topic(settings.output_topic)]


@pytest.fixture
def fixed_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """`emitted_ts` from a fixed clock, so that two runs can be compared byte for byte."""
    real = loop_module.time
    clock = SimpleNamespace(time=lambda: NOW_MS / 1000, monotonic=real.monotonic,
                            perf_counter=real.perf_counter)
    monkeypatch.setattr(loop_module, "time", clock)


@pytest.mark.parametrize("batch", [1, 7, 64])
def test_the_batch_encoder_writes_the_per_event_bytes(setup, fixed_clock, batch: int) -> None:
    settings, recommender = setup
    messages = _messages(250, seed=batch)
    columnar = _run(settings, recommender, messages, batch)
    per_event = _run(settings, recommender, messages, batch, per_event_encoder=True)
    assert len(columnar) > 200
    assert columnar == per_event


def test_batches_give_the_recommendations_of_one_event_at_a_time(setup) -> None:
    settings, recommender = setup
    messages = _messages(300, seed=5)
    # a batch emits by user, each user's in order: match the outputs by event (ts is unique)
    batched = sorted((json.loads(v) for v in _run(settings, recommender, messages, 64)),
                     key=lambda d: d["event_ts"])
    alone = [json.loads(v) for v in _run(settings, recommender, messages, 1)]
    assert len(batched) == len(alone) > 250
    assert any(d["cold_start"] for d in batched) and any(d["because"] for d in batched)
    for got, want in zip(batched, alone, strict=True):
        for field in ("user_id", "model_version", "event_ts", "source_ts", "cold_start", "schema"):
            assert got[field] == want[field]
        assert [i["item_id"] for i in got["items"]] == [i["item_id"] for i in want["items"]]
        assert [i["score"] for i in got["items"]] == pytest.approx(
            [i["score"] for i in want["items"]], abs=1e-4)
        assert [b["item_id"] for b in got["because"]] == [b["item_id"] for b in want["because"]]
        assert [b["event_type"] for b in got["because"]] == [
            b["event_type"] for b in want["because"]]
        assert [b["weight"] for b in got["because"]] == pytest.approx(
            [b["weight"] for b in want["because"]], abs=1e-3)
