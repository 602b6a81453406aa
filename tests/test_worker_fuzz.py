"""Property-based: arbitrary bytes, arbitrary JSON and near-valid events through the worker's
whole path (parse -> apply -> recommend -> dead letters -> checkpoint -> restore).

Whatever arrives, the worker never raises; every message ends as exactly one of a
recommendation or a dead letter with a known reason; the windows equal the valid events applied
in log order, in RocksDB and again after a restore from the changelog. Kafka is faked here
(thousands of cases); tests/test_worker_reliability.py runs the same classes of input against
the real broker. KVREC_FUZZ_EXAMPLES sets the number of cases (default 2,000).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import pytest
from confluent_kafka import TopicPartition
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvrec.state.partition import WorkerState
from kvrec.state.window import Window, WindowEvent
from kvrec.stream.schema import InvalidEvent, parse_event
from kvrec.stream.worker.loop import KafkaClients, Worker
from kvrec.stream.worker.metrics import HealthState, WorkerMetrics
from kvrec.stream.worker.recovery import recover_partition
from kvrec.stream.worker.settings import WorkerSettings
from tests.fake_kafka import FakeConsumer, FakeMessage, FakeProducer, FakeRestoreConsumer
from tests.worker_fixtures import EVENT_TYPES, exact_worker_with_model, make_artifact

EXAMPLES = int(os.environ.get("KVREC_FUZZ_EXAMPLES", "2000"))
REASONS = {"oversized", "malformed_json", "not_an_object", "missing_field", "wrong_type",
           "empty_id", "invalid_unicode", "unknown_event_type", "ts_out_of_range", "future_ts",
           "missing_key", "key_mismatch", "processing_error"}
NOW = 1_800_000_000_000
PAST = 1_700_000_000_000  # before the worker's clock, whenever the test runs

USERS = st.sampled_from(["u1", "u2", "ü-3", "😀"])
ITEMS = st.one_of(st.sampled_from([f"sku-{i}" for i in range(1, 61)]),
                  st.text(min_size=1, max_size=8))  # mostly unknown to the model
SURROGATES = st.characters(categories=["Cs"])


@st.composite
def valid_events(draw: st.DrawFn) -> tuple[bytes | None, bytes, bool]:
    user = draw(USERS)
    data = {"user_id": user, "item_id": draw(ITEMS), "event_type": draw(st.sampled_from(EVENT_TYPES)),
            "ts": draw(st.integers(0, PAST))}
    return user.encode(), json.dumps(data).encode(), True


@st.composite
def near_valid_events(draw: st.DrawFn) -> tuple[bytes | None, bytes, bool]:
    """A valid event with one field or the key bent out of shape (it may stay valid)."""
    key, raw, _ = draw(valid_events())
    data = json.loads(raw)
    field = draw(st.sampled_from(["user_id", "item_id", "event_type", "ts", "key", "props"]))
    json_values = st.one_of(
        st.none(), st.booleans(), st.floats(), st.integers(-(2**80), 2**80),
        st.text(max_size=4) | st.text(SURROGATES, min_size=1, max_size=3),
        st.lists(st.integers(), max_size=2),
    )
    if field == "key":
        key = draw(st.none() | st.binary(max_size=6) | st.just(b"k" * 5000))
    elif field == "ts":
        data["ts"] = draw(st.integers(-(2**70), 2**70) | json_values)
    elif field in ("user_id", "item_id"):
        data[field] = draw(json_values | st.text(min_size=250, max_size=260)
                           | st.just("i" * 1_100_000))
    else:
        data[field] = draw(json_values)
    return key, json.dumps(data).encode(), False  # ensure_ascii: surrogates become \udxxx


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)
MESSAGES = st.one_of(
    valid_events(),
    valid_events(),
    near_valid_events(),
    st.tuples(st.none() | st.binary(max_size=8), st.binary(max_size=40), st.just(False)),
    st.tuples(st.just(b"u1"), JSON.map(lambda v: json.dumps(v).encode()), st.just(False)),
    st.tuples(st.just(b"u1"), st.sampled_from([b"x" * 20_000, b"{" * 2_000_000]), st.just(False)),
    st.tuples(st.just(b"u1"), st.just(None), st.just(False)),  # a tombstone
)


@pytest.fixture(scope="module")
def worker_settings(tmp_path_factory: pytest.TempPathFactory) -> tuple[WorkerSettings, object]:
    model = make_artifact(tmp_path_factory.mktemp("fuzz") / "model", n_items=60, window=4,
                          layers=2).path
    return exact_worker_with_model(model)


def _reference(messages: list[tuple[bytes | None, bytes | None]], rejected: set[int],
               capacity: int) -> dict[str, Window]:
    """Every message not dead-lettered, applied in log order to fresh windows."""
    windows: dict[str, Window] = {}
    for offset, (key, value) in enumerate(messages):
        if offset in rejected:
            continue
        event = parse_event(value, key, event_types=frozenset(EVENT_TYPES), max_bytes=16_384,
                            now_ms=int(time.time() * 1000), max_future_ms=300_000)
        window = windows.setdefault(event.user_id, Window(capacity))
        window.apply(WindowEvent(event.item_id, EVENT_TYPES.index(event.event_type) + 1,
                                 event.ts, offset))
    return windows


def _stored(state: WorkerState, capacity: int) -> dict[str, Window]:
    return {user: Window.from_bytes(raw, capacity) for user, raw in state[0].store.items()}


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])
@given(st.lists(MESSAGES, min_size=1, max_size=14), st.data())
def test_any_input_is_applied_exactly_or_dead_lettered_and_never_raises(
    worker_settings, generated, data
) -> None:
    base_settings, recommender = worker_settings
    recommender.cache.clear()
    messages = [(key, value) for key, value, _ in generated]
    with tempfile.TemporaryDirectory() as state_dir:
        run_settings = replace(base_settings, state_dir=Path(state_dir) / "worker")
        producer, consumer = FakeProducer(), FakeConsumer()
        clients_restore = FakeRestoreConsumer(producer)
        worker = Worker(run_settings, recommender, WorkerMetrics(), HealthState(), {},
                        clients=KafkaClients(consumer, producer, clients_restore))
        worker._on_assign(consumer, [TopicPartition("events", 0)])
        inputs = [FakeMessage("events", 0, offset, key, value)
                  for offset, (key, value) in enumerate(messages)]
        position = 0
        while position < len(inputs):  # batches of any size, checkpoints at any point
            size = data.draw(st.integers(1, len(inputs) - position))
            worker.process(inputs[position : position + size])
            position += size
            if data.draw(st.booleans()):
                worker.checkpoint.commit()
        worker.checkpoint.commit()

        dead = producer.topic(run_settings.dead_letter_topic)
        recs = producer.topic(run_settings.output_topic)
        rejected = [json.loads(dict(m.headers())["kvrec.source"])[2] for m in dead]
        assert {dict(m.headers())["kvrec.reason"].decode() for m in dead} <= REASONS
        assert len(set(rejected)) == len(rejected)  # one dead letter per message at most
        assert len(recs) + len(rejected) == len(messages)  # and exactly one of the two
        for offset, (_, _, made_valid) in enumerate(generated):
            assert not (made_valid and offset in rejected), dead
        capacity = run_settings.window_capacity
        expected = _reference(messages, set(rejected), capacity)
        assert _stored(worker.state, capacity) == expected
        assert consumer.committed([TopicPartition("events", 0)])[0].offset == len(messages)

        restored = WorkerState(Path(state_dir) / "restored", run_settings.group_id, "events", capacity)
        recover_partition(clients_restore, run_settings.changelog_topic, restored.open(0),
                          len(messages))
        assert _stored(restored, capacity) == expected
        restored.close_all()
        worker.state.close_all()


def test_a_bad_value_never_passes_validation_into_later_stages() -> None:
    """The validator's domain is what later stages accept: whatever it lets through packs into
    a window and encodes as a key."""

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True)
    @given(MESSAGES)
    def check(message: tuple[bytes | None, bytes | None, bool]) -> None:
        key, value, _ = message
        try:
            event = parse_event(value, key, event_types=frozenset(EVENT_TYPES), max_bytes=16_384,
                                now_ms=NOW, max_future_ms=300_000)
        except InvalidEvent as invalid:
            assert invalid.reason in REASONS
            return
        event.user_id.encode()
        window = Window(7)
        assert window.apply(WindowEvent(event.item_id, 1, event.ts, 0))
        assert Window.from_bytes(window.to_bytes(), 7) == window

    check()
