"""Nothing lost, nothing crash-loops: the adversarial repros against the real broker.

Each test feeds one input partition a sequence that once crashed the worker or lost an event,
and then accounts for every message: a recommendation, or a dead letter with its reason.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition

from kvrec.state.store import WindowStore
from kvrec.state.window import Window, WindowEvent
from kvrec.stream.schema import decode_recommendation
from tests.conftest import create_topics, unique_topic
from tests.worker_fixtures import make_artifact
from tests.worker_inprocess import ThreadWorker, worker_args

pytestmark = pytest.mark.kafka

BIG = 4 * 1024 * 1024  # what the test's input topic and producer accept


class OnePartition:
    """Fresh topics with one input partition, so offsets are the order of the sequence."""

    def __init__(self, bootstrap: str, prefix: str) -> None:
        self.bootstrap = bootstrap
        self.events = unique_topic(f"{prefix}-events")
        self.recommendations = unique_topic(f"{prefix}-recs")
        self.dead_letters = unique_topic(f"{prefix}-dlq")
        self.group = unique_topic(f"{prefix}-group")
        create_topics(bootstrap, {self.events: 1}, config={"max.message.bytes": str(BIG)})
        create_topics(bootstrap, {self.recommendations: 1, self.dead_letters: 1})
        create_topics(bootstrap, {f"{self.group}-windows-changelog": 1},
                      config={"cleanup.policy": "compact"})

    def produce(self, messages: list[tuple[bytes | None, bytes | None]]) -> None:
        producer = Producer({"bootstrap.servers": self.bootstrap, "message.max.bytes": BIG})
        for key, value in messages:
            producer.produce(self.events, key=key, value=value)
        assert producer.flush(30) == 0

    def args(self, model: Path, state_dir: Path, guarantee: str = "at-least-once", *extra: str):
        return worker_args(
            self.bootstrap, events=self.events, recommendations=self.recommendations,
            dead_letters=self.dead_letters, group=self.group, model=model, state_dir=state_dir,
            guarantee=guarantee, extra=extra,
        )

    def read(self, topic: str, expected: int, timeout: float = 60.0, quiet: float = 1.5) -> list:
        """Committed messages of `topic`: until `expected` arrived, then `quiet` s for extras."""
        consumer = Consumer({
            "bootstrap.servers": self.bootstrap, "group.id": unique_topic("reader"),
            "auto.offset.reset": "earliest", "isolation.level": "read_committed",
            "enable.auto.commit": False,
        })
        consumer.assign([TopicPartition(topic, 0, 0)])
        messages: list = []
        deadline = time.monotonic() + timeout
        quiet_until = None
        while time.monotonic() < deadline:
            messages += [m for m in consumer.consume(500, timeout=0.2) if m.error() is None]
            if len(messages) >= expected:
                quiet_until = quiet_until or time.monotonic() + quiet
                if time.monotonic() > quiet_until:
                    break
        consumer.close()
        return messages

    def committed(self) -> int:
        consumer = Consumer({"bootstrap.servers": self.bootstrap, "group.id": self.group})
        try:
            for attempt in range(50):
                try:
                    (tp,) = consumer.committed([TopicPartition(self.events, 0)], timeout=10)
                    return tp.offset
                except KafkaException:  # the group coordinator is still being elected
                    if attempt == 49:
                        raise
                    time.sleep(0.2)
        finally:
            consumer.close()
        raise AssertionError("unreachable")

    def wait_committed(self, offset: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while self.committed() < offset:
            assert time.monotonic() < deadline, f"offset {offset} was never committed"
            time.sleep(0.2)


def _event(user: str, item: str = "sku-1", ts: int | None = None, **fields: object) -> bytes:
    data = {"user_id": user, "item_id": item, "event_type": "view",
            "ts": int(time.time() * 1000) - 1000 if ts is None else ts, **fields}
    return json.dumps(data).encode()


def _reasons(dead: list) -> list[str]:
    return [dict(m.headers())["kvrec.reason"].decode() for m in dead]


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return make_artifact(tmp_path / "model", n_items=60, window=4, layers=2).path


TRUNCATED = b'{"user_id": "u1", "item_id": "sku-2", "event_ty'


# --- 1. offsets never move backwards -----------------------------------------------------------

@pytest.mark.parametrize("guarantee", ["at-least-once", "exactly-once"])
def test_a_batch_ending_in_dead_letters_commits_past_them(kafka_bootstrap, model, tmp_path, guarantee):
    topics = OnePartition(kafka_bootstrap, "offsets")
    topics.produce([(b"u1", _event("u1")), (b"u1", TRUNCATED)])
    with ThreadWorker(topics.args(model, tmp_path / "state", guarantee)):
        topics.wait_committed(2)
    assert topics.committed() == 2
    with ThreadWorker(topics.args(model, tmp_path / "state", guarantee)) as again:
        again.wait_ready()
        time.sleep(1.5)  # long enough to consume anything left uncommitted
        assert again.counter("kvrec_events_in_total") == 0
    assert _reasons(topics.read(topics.dead_letters, 1)) == ["malformed_json"]  # once, not twice
    assert len(topics.read(topics.recommendations, 1)) == 1


# --- 2. messages too large for the dead-letter topic ------------------------------------------

def test_messages_too_large_to_dead_letter_whole_are_cut_and_the_worker_goes_on(
    kafka_bootstrap, model, tmp_path
):
    topics = OnePartition(kafka_bootstrap, "huge")
    two_mb = b"x" * (2 * 1024 * 1024)
    huge_item = _event("u1", item="i" * (1024 * 1024))
    topics.produce([(b"u1", two_mb), (b"u1", huge_item), (b"k" * 5000, _event("u1")),
                    (b"u1", _event("u1"))])
    with ThreadWorker(topics.args(model, tmp_path / "state")) as worker:
        topics.wait_committed(4)
        assert worker.alive
    dead = topics.read(topics.dead_letters, 3)
    assert _reasons(dead) == ["oversized", "oversized", "key_mismatch"]
    for message, original in zip(dead[:2], (two_mb, huge_item), strict=True):
        headers = dict(message.headers())
        assert headers["kvrec.truncated"] == b"value"
        assert int(headers["kvrec.original_bytes"]) == len(original)
        assert message.value() == original[: 262_144]  # the first bytes, unchanged
    headers = dict(dead[2].headers())
    assert headers["kvrec.truncated"] == b"key" and headers["kvrec.original_key_bytes"] == b"5000"
    assert len(topics.read(topics.recommendations, 1)) == 1


# --- 3, 4. values that pass JSON but not later stages -----------------------------------------

def test_lone_surrogates_and_out_of_range_ts_are_dead_letters(kafka_bootstrap, model, tmp_path):
    topics = OnePartition(kafka_bootstrap, "domain")
    bad = [
        (b"u1", b'{"user_id": "\\ud800", "item_id": "sku-1", "event_type": "view", "ts": 1}'),
        (b"u1", b'{"user_id": "u1", "item_id": "\\udfff", "event_type": "view", "ts": 1}'),
        (b"u1", _event("u1", ts=-(2**70))),
        (b"u1", _event("u1", ts=2**64)),
        (b"u1", _event("u1", ts=-1)),
    ]
    topics.produce([*bad, (b"u1", _event("u1", item="sku-3"))])
    with ThreadWorker(topics.args(model, tmp_path / "state")) as worker:
        topics.wait_committed(len(bad) + 1)
        assert worker.alive
    assert _reasons(topics.read(topics.dead_letters, len(bad))) == [
        "invalid_unicode", "invalid_unicode", "ts_out_of_range", "ts_out_of_range",
        "ts_out_of_range",
    ]
    (rec,) = topics.read(topics.recommendations, 1)
    assert decode_recommendation(rec.value()).user_id == "u1"


# --- 5. the crash path commits nothing --------------------------------------------------------

@pytest.mark.parametrize("guarantee", ["at-least-once", "exactly-once"])
def test_the_repro_sequence_accounts_for_every_message(kafka_bootstrap, model, tmp_path, guarantee):
    """[valid@0, truncated@1, crasher@2, valid@3]: two recommendations, two dead letters."""
    topics = OnePartition(kafka_bootstrap, "repro5")
    crasher = b'{"user_id": "u1", "item_id": "\\ud800", "event_type": "view", "ts": 5}'
    topics.produce([(b"u1", _event("u1", "sku-1")), (b"u1", TRUNCATED), (b"u1", crasher),
                    (b"u1", _event("u1", "sku-4"))])
    with ThreadWorker(topics.args(model, tmp_path / "state", guarantee)):
        topics.wait_committed(4)
    recs = [decode_recommendation(m.value()) for m in topics.read(topics.recommendations, 2)]
    assert len(recs) == 2 and {r.user_id for r in recs} == {"u1"}
    assert _reasons(topics.read(topics.dead_letters, 2)) == ["malformed_json", "invalid_unicode"]


def test_an_infrastructure_error_mid_batch_commits_nothing_and_the_restart_loses_nothing(
    kafka_bootstrap, model, tmp_path
):
    topics = OnePartition(kafka_bootstrap, "abort")
    topics.produce([(b"u1", _event("u1", "sku-1")), (b"u1", TRUNCATED),
                    (b"u2", _event("u2", "sku-2"))])
    state_dir = tmp_path / "state"
    failing = ThreadWorker(topics.args(model, state_dir, "exactly-once"), expect_failure=True)

    def broken(*args: object, **kwargs: object) -> None:
        raise KafkaException("the broker went away (injected)")

    failing.recommender.recommend = broken  # type: ignore[method-assign]
    with failing:
        deadline = time.monotonic() + 60
        while failing.alive:
            assert time.monotonic() < deadline, "the injected error did not stop the worker"
            time.sleep(0.1)
    assert isinstance(failing.error, KafkaException)
    assert topics.committed() < 0  # nothing committed: not the dead letter, not the offsets
    assert topics.read(topics.dead_letters, 0, quiet=1.0) == []
    with ThreadWorker(topics.args(model, state_dir, "exactly-once")):
        topics.wait_committed(3)
    recs = [decode_recommendation(m.value()) for m in topics.read(topics.recommendations, 2)]
    assert sorted(r.user_id for r in recs) == ["u1", "u2"]
    assert _reasons(topics.read(topics.dead_letters, 1)) == ["malformed_json"]
    store = WindowStore(state_dir / topics.group / f"{topics.events}-0")
    windows = {user: Window.from_bytes(raw, 7) for user, raw in store.items()}
    store.close()
    assert {u: [e.offset for e in w] for u, w in windows.items()} == {"u1": [0], "u2": [2]}


def test_an_error_on_one_user_dead_letters_its_events_and_spares_the_rest(
    kafka_bootstrap, model, tmp_path
):
    """Any exception while processing a message (not a Kafka one) makes it a dead letter with
    reason processing_error; the user's window is left as it was before."""
    topics = OnePartition(kafka_bootstrap, "poison")
    topics.produce([(b"good", _event("good", "sku-1")), (b"poison", _event("poison", "sku-2")),
                    (b"good", _event("good", "sku-3")), (b"poison", _event("poison", "sku-4"))])
    state_dir = tmp_path / "state"
    with_poison = ThreadWorker(topics.args(model, state_dir))
    real = with_poison.recommender.recommend

    def fails_on_poison(wave):  # type: ignore[no-untyped-def]
        if any(user.user_id == "poison" for user in wave):
            raise RuntimeError("model blew up on this user (injected)")
        return real(wave)

    with_poison.recommender.recommend = fails_on_poison  # type: ignore[method-assign]
    with with_poison as worker:
        topics.wait_committed(4)
        assert worker.alive
        assert worker.counter("kvrec_dead_letters_total", reason="processing_error") == 2
    dead = topics.read(topics.dead_letters, 2)
    assert _reasons(dead) == ["processing_error", "processing_error"]
    assert [json.loads(dict(m.headers())["kvrec.source"])[2] for m in dead] == [1, 3]  # offsets
    assert b"RuntimeError: model blew up" in dict(dead[0].headers())["kvrec.detail"]
    recs = [decode_recommendation(m.value()) for m in topics.read(topics.recommendations, 2)]
    assert [r.user_id for r in recs] == ["good", "good"]
    store = WindowStore(state_dir / topics.group / f"{topics.events}-0")
    poison = store.get("poison")  # its window never held the failed events
    assert poison is None or len(Window.from_bytes(poison, 7)) == 0
    assert len(Window.from_bytes(store.get("good"), 7)) == 2
    store.close()


# --- 6. a stored window that does not decode is quarantined -----------------------------------

def test_an_undecodable_stored_window_is_quarantined_not_fatal(kafka_bootstrap, model, tmp_path):
    topics = OnePartition(kafka_bootstrap, "corrupt")
    state_dir = tmp_path / "state"
    window = Window(7)
    window.apply(WindowEvent("sku-1", 1, 5, 0))
    half_written = bytearray(window.to_bytes())
    half_written[1] = 2  # the header counts two events, the value holds one (the old bug)
    store = WindowStore(state_dir / topics.group / f"{topics.events}-0")
    store.write({"u1": bytes(half_written), "u2": b"\x01garbage"}, None)
    store.close()
    topics.produce([(b"u1", _event("u1", "sku-3")), (b"u2", _event("u2", "sku-4")),
                    (b"u1", _event("u1", "sku-5"))])
    with ThreadWorker(topics.args(model, state_dir)) as worker:
        topics.wait_committed(3)
        assert worker.alive and worker.counter("kvrec_windows_quarantined_total") == 2
    dead = topics.read(topics.dead_letters, 2)
    assert _reasons(dead) == ["corrupt_window", "corrupt_window"]
    assert sorted(m.value() for m in dead) == sorted([bytes(half_written), b"\x01garbage"])
    assert len(topics.read(topics.recommendations, 3)) == 3
    store = WindowStore(state_dir / topics.group / f"{topics.events}-0")
    restarted = Window.from_bytes(store.get("u1"), 7)
    store.close()
    assert [e.item_id for e in restarted] == ["sku-3", "sku-5"]  # started again from empty


# --- messages without a key -------------------------------------------------------------------

def test_a_message_without_a_key_is_a_dead_letter(kafka_bootstrap, model, tmp_path):
    topics = OnePartition(kafka_bootstrap, "keyless")
    topics.produce([(None, _event("u1")), (b"u1", _event("u1"))])
    with ThreadWorker(topics.args(model, tmp_path / "state")):
        topics.wait_committed(2)
    (dead,) = topics.read(topics.dead_letters, 1)
    assert _reasons([dead]) == ["missing_key"] and dead.key() is None
    assert len(topics.read(topics.recommendations, 1)) == 1


# --- a full producer queue slows the worker down, it does not stop it ------------------------

def test_a_full_producer_queue_is_backpressure_not_a_crash(kafka_bootstrap, model, tmp_path):
    topics = OnePartition(kafka_bootstrap, "queue")
    events = [(f"u{i % 7}".encode(), _event(f"u{i % 7}", f"sku-{1 + i % 50}")) for i in range(400)]
    topics.produce(events + [(b"u1", TRUNCATED)] * 20)
    tiny_queue = ("-X", "queue.buffering.max.messages=3", "--linger-ms", "20")
    with ThreadWorker(topics.args(model, tmp_path / "state", "at-least-once", *tiny_queue)) as worker:
        topics.wait_committed(len(events) + 20, timeout=120)
        assert worker.alive
        assert worker.counter("kvrec_producer_queue_full_total") > 0  # it did have to wait
    assert len(topics.read(topics.recommendations, len(events))) == len(events)
    assert len(topics.read(topics.dead_letters, 20)) == 20


# --- a restore interrupted midway (revoked, killed) leaves a consistent store ------------------

def test_an_interrupted_restore_leaves_a_consistent_store_and_resumes(kafka_bootstrap, tmp_path):
    """The restore writes each batch of changelog records together with its changelog offset
    (one RocksDB batch). Cut it off after its first batch, as a revocation or a kill mid-restore
    would, and the store holds exactly a prefix of the changelog; the next restore goes on from
    there and ends equal to a restore that was never interrupted."""
    from kvrec.bench.restore import _fill
    from kvrec.state.partition import WorkerState
    from kvrec.stream.worker.recovery import recover_partition, restore_consumer_config

    changelog = unique_topic("interrupted-changelog")
    create_topics(kafka_bootstrap, {changelog: 1}, config={"cleanup.policy": "compact"})
    windows = 2_500
    _fill(kafka_bootstrap, changelog, windows, events=3)

    class CutOff(Exception):
        pass

    class InterruptedConsumer:
        """The restore consumer, cut off after its first batch of records."""

        def __init__(self, consumer: Consumer) -> None:
            self.consumer, self.batches = consumer, 0

        def consume(self, num_messages: int, timeout: float) -> list:
            batch = self.consumer.consume(num_messages, timeout)
            if any(m.error() is None for m in batch):
                self.batches += 1
                if self.batches == 2:
                    raise CutOff
            return batch

        def __getattr__(self, name: str) -> object:
            return getattr(self.consumer, name)

    def restore(state_dir: Path, consumer: object) -> dict[str, bytes]:
        state = WorkerState(state_dir, "g", "events", window_capacity=3)
        try:
            recover_partition(consumer, changelog, state.open(0), windows + 1,  # type: ignore[arg-type]
                              batch_records=1_000)
        finally:
            result = {"@offset": str(state[0].changelog_offset()).encode(),
                      **dict(state[0].store.items())}
            state.close_all()
        return result

    config = restore_consumer_config({"bootstrap.servers": kafka_bootstrap}, unique_topic("g"))
    whole = restore(tmp_path / "whole", Consumer(config))
    assert len(whole) == windows + 1
    interrupted = InterruptedConsumer(Consumer(config))
    with pytest.raises(CutOff):
        restore(tmp_path / "cut", interrupted)
    partial = restore(tmp_path / "cut", _NoRestore())  # reopen: what the cut-off left
    first = {k: v for k, v in whole.items() if k != "@offset"}
    cut = {k: v for k, v in partial.items() if k != "@offset"}
    offset = int(partial["@offset"])
    assert 0 < len(cut) < windows  # cut off midway
    assert cut == {k: first[k] for k in cut}  # every window it holds is whole and right
    assert len(cut) == offset + 1  # ... and exactly the changelog up to its stored offset
    assert restore(tmp_path / "cut", Consumer(config)) == whole  # the next restore completes it


class _NoRestore:
    """A restore consumer whose changelog is already read to the end (reads nothing)."""

    def get_watermark_offsets(self, tp: TopicPartition, timeout: float = 0) -> tuple[int, int]:
        return 0, 0
