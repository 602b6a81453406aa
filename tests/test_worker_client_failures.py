"""Kafka clients that fail for good end the worker, to be restarted; a broker that is merely away
does not. `Checkpoint.abort` over every sequence of client answers, and the consumer's errors.

Seen in a loaded CI run (2026-12-02): a broker frozen past the session timeout fenced the static
consumer, the transaction failed, and `abort_transaction` then timed out every 10 s for minutes
while the broker answered everything else, so the worker never caught up. The rule: a
transactional call that times out `STUCK_AFTER_TIMEOUTS` times in a row, then once more after
the cluster answered a metadata request, while it answers again, is stuck in the client (one
answer is not enough: a request sent to a frozen broker is answered when it thaws). An abort
that fails for any reason (stuck, fenced, Kafka away past the outage limit) leaves a producer
that can do nothing more. Both raise `ClientHang`: the worker exits and its restart replays the
work. The real-broker halves of these tests are in `tests/test_worker_faults.py` (they freeze
their own broker).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
from confluent_kafka import KafkaError, KafkaException
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvrec.state.partition import WorkerState
from kvrec.stream.worker import checkpoint as checkpoint_module
from kvrec.stream.worker.checkpoint import (
    RESTART,
    STUCK_AFTER_TIMEOUTS,
    Checkpoint,
    ClientFailed,
    ClientHang,
)
from tests.fake_kafka import FakeConsumer

OUTAGE_LIMIT_S = 30.0
CALL_TIMEOUT_S = 2.0

# what one abort_transaction call does
OK, TIMEOUT, TRANSPORT, FENCED = "ok", "timeout", "transport", "fenced"
ERRORS = {
    TIMEOUT: KafkaError(KafkaError._TIMED_OUT, "timed out", retriable=True),
    TRANSPORT: KafkaError(KafkaError._TRANSPORT, "broker down", retriable=True),
    FENCED: KafkaError(KafkaError._FENCED, "fenced", fatal=True),
}


class FakeClock:
    """time.monotonic and time.sleep for the checkpoint module: a call that times out takes its
    timeout, a retry's pause its pause, and nothing really waits."""

    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class ScriptedProducer:
    """A transactional producer whose abort_transaction answers from `aborts` (the last answer
    repeats) and whose metadata request answers from `cluster` (likewise)."""

    clock: FakeClock
    aborts: list[str]
    cluster: list[bool]
    calls: list[str] = field(default_factory=list)

    def begin_transaction(self) -> None:
        self.calls.append("begin")

    def abort_transaction(self, timeout: float) -> None:
        answer = self.aborts.pop(0) if len(self.aborts) > 1 else self.aborts[0]
        self.calls.append(f"abort:{answer}")
        if answer == TIMEOUT:
            self.clock.now += timeout
        if answer != OK:
            raise KafkaException(ERRORS[answer])

    def list_topics(self, topic: str | None = None, timeout: float = -1) -> object:
        answers = self.cluster.pop(0) if len(self.cluster) > 1 else self.cluster[0]
        self.calls.append(f"metadata:{answers}")
        if not answers:
            self.clock.now += timeout
            raise KafkaException(KafkaError(KafkaError._TRANSPORT, "no broker", retriable=True))
        return object()


def _checkpoint(tmp_path: Path, producer: ScriptedProducer) -> Checkpoint:
    state = WorkerState(tmp_path, "g", "events", window_capacity=4)
    state.open(0)
    point = Checkpoint(FakeConsumer(), producer, state, input_topic="events",  # type: ignore[arg-type]
                       changelog_topic="changelog", exactly_once=True, interval_s=0.0,
                       outage_limit_s=OUTAGE_LIMIT_S, call_timeout_s=CALL_TIMEOUT_S)
    point.store_offset(0, 41)
    producer.calls.clear()
    return point


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(checkpoint_module.time, "monotonic", fake.monotonic)
    monkeypatch.setattr(checkpoint_module.time, "sleep", fake.sleep)
    return fake


def test_an_abort_that_keeps_timing_out_while_the_cluster_answers_exits_soon(
    tmp_path: Path, clock: FakeClock
) -> None:
    producer = ScriptedProducer(clock, [TIMEOUT], [True])
    point = _checkpoint(tmp_path, producer)
    with pytest.raises(ClientHang, match="timed out 4 times in a row") as hang:
        point.abort()
    assert str(hang.value).endswith(RESTART)
    assert producer.calls.count("abort:timeout") == STUCK_AFTER_TIMEOUTS + 1
    assert "begin" not in producer.calls
    assert clock.now < OUTAGE_LIMIT_S / 2  # long before the outage limit
    assert point.pending_offsets == {}


def test_a_broker_that_is_away_is_waited_for_and_the_abort_then_succeeds(
    tmp_path: Path, clock: FakeClock
) -> None:
    # six timeouts (12 s, and the metadata requests that went unanswered) with no answer from
    # the cluster, then the broker is back
    producer = ScriptedProducer(clock, [TIMEOUT] * 6 + [OK], [False])
    point = _checkpoint(tmp_path, producer)
    point.abort()
    assert producer.calls[-2:] == ["abort:ok", "begin"]
    assert producer.calls.count("abort:timeout") == 6


def test_an_abort_that_fails_for_good_exits_whatever_the_reason(
    tmp_path: Path, clock: FakeClock
) -> None:
    for case, (answers, cluster, error, reason) in enumerate((
        # another process took the transactional id: the client failed for good
        ([FENCED], [True], ClientFailed, "failed for good"),
        ([TRANSPORT], [False], ClientHang, "--outage-limit-s"),  # Kafka away past the limit
        ([TIMEOUT], [False], ClientHang, "--outage-limit-s"),
    )):
        producer = ScriptedProducer(clock, answers, cluster)
        point = _checkpoint(tmp_path / str(case), producer)
        with pytest.raises(error, match=reason) as failed:
            point.abort()
        assert str(failed.value).endswith(RESTART)
        assert "begin" not in producer.calls


ANSWER = st.sampled_from([OK, TIMEOUT, TRANSPORT, FENCED])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(aborts=st.lists(ANSWER, min_size=1, max_size=40),
       cluster=st.lists(st.booleans(), min_size=1, max_size=40))
def test_every_abort_ends_in_bounded_time_either_going_on_or_exiting(
    tmp_path_factory: pytest.TempPathFactory, aborts: list[str], cluster: list[bool]
) -> None:
    """Whatever the client answers: abort() returns with a new transaction begun, or raises
    ClientHang or ClientFailed (never another error, never a loop past the outage limit); it
    exits only for a reason (a fatal error, the outage limit, or timeouts in a row while the
    cluster answered), and a cluster that never answers never counts as stuck."""
    clock = FakeClock()
    patch = pytest.MonkeyPatch()
    patch.setattr(checkpoint_module.time, "monotonic", clock.monotonic)
    patch.setattr(checkpoint_module.time, "sleep", clock.sleep)
    try:
        producer = ScriptedProducer(clock, list(aborts), list(cluster))
        point = _checkpoint(tmp_path_factory.mktemp("abort"), producer)
        try:
            point.abort()
        except (ClientHang, ClientFailed) as hang:
            message = str(hang)
            assert message.endswith(RESTART)
            made = [c.removeprefix("abort:") for c in producer.calls if c.startswith("abort:")]
            assert OK not in made and "begin" not in producer.calls
            if "while the cluster answered" in message:
                assert made[-STUCK_AFTER_TIMEOUTS - 1:] == [TIMEOUT] * (STUCK_AFTER_TIMEOUTS + 1)
                # the cluster answered before the last call was sent, and after it timed out
                assert producer.calls[-4:] == ["abort:timeout", "metadata:True",
                                               "abort:timeout", "metadata:True"]
            elif made[-1] == FENCED:
                assert isinstance(hang, ClientFailed) and "fenced" in message
            else:  # retried until the outage limit
                assert clock.now > OUTAGE_LIMIT_S and "--outage-limit-s" in message
        else:
            assert producer.calls[-2:] == ["abort:ok", "begin"]
            assert clock.now <= OUTAGE_LIMIT_S + CALL_TIMEOUT_S
        assert clock.now <= OUTAGE_LIMIT_S + 2 * CALL_TIMEOUT_S + 1.0
        if not any(cluster):
            assert "metadata:True" not in producer.calls
        assert point.pending_offsets == {}
    finally:
        patch.undo()


# --- a consumer that failed for good --------------------------------------------------------------
# Seen in a loaded run of tests/test_worker_faults.py (2026-12-02): after the broker froze past
# the session timeout, the static consumer's rejoin fenced it ("Static consumer fenced by other
# consumer with same group.instance.id"); consume() then returned that error with the code _FATAL
# but fatal() false, the worker logged it as a passing error, and consumed nothing ever after.

@pytest.fixture(scope="module")
def fake_worker_settings(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from tests.worker_fixtures import exact_worker_with_model, make_artifact

    model = make_artifact(tmp_path_factory.mktemp("failures") / "model", n_items=60, window=4,
                          layers=1).path
    return exact_worker_with_model(model)


CONSUMER_ERRORS = st.sampled_from([
    KafkaError._FATAL, KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN,
    KafkaError._TIMED_OUT, KafkaError.FENCED_INSTANCE_ID, KafkaError.UNKNOWN_TOPIC_OR_PART,
    KafkaError._PARTITION_EOF, KafkaError.GROUP_AUTHORIZATION_FAILED,
])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(code=CONSUMER_ERRORS, flagged_fatal=st.booleans(), before=st.integers(0, 3))
def test_a_consumer_error_ends_the_worker_exactly_when_it_is_fatal(
    fake_worker_settings, tmp_path_factory: pytest.TempPathFactory, code: int,
    flagged_fatal: bool, before: int,
) -> None:
    """A fatal consumer error (flagged fatal, or _FATAL, or fenced) raises ClientFailed, a
    one-line error with exit status 1 that says a restart replays the work, and nothing of the
    batch is committed; any other error is passed over and the events around it are applied."""
    import json
    from dataclasses import replace

    from confluent_kafka import TopicPartition

    from kvrec.stream.worker.loop import KafkaClients, Worker
    from kvrec.stream.worker.metrics import HealthState, WorkerMetrics
    from tests.fake_kafka import FakeMessage, FakeProducer, FakeRestoreConsumer

    base, recommender = fake_worker_settings
    settings_ = replace(base, state_dir=tmp_path_factory.mktemp("worker"))
    producer, consumer = FakeProducer(), FakeConsumer()
    worker = Worker(settings_, recommender, WorkerMetrics(), HealthState(), {},
                    clients=KafkaClients(consumer, producer, FakeRestoreConsumer(producer)))
    worker._on_assign(consumer, [TopicPartition("events", 0)])
    events = [FakeMessage("events", 0, offset, b"u1", json.dumps(
        {"user_id": "u1", "item_id": f"sku-{offset + 1}", "event_type": "click",
         "ts": 1_700_000_000_000 + offset}).encode()) for offset in range(before + 1)]
    error = KafkaError(code, "consumer error", fatal=flagged_fatal)
    batch = [*events[:before], FakeMessage("events", 0, -1, None, None, _error=error),
             events[before]]
    # the end of a partition is a notice, whatever its flags
    fatal = ((flagged_fatal or code in (KafkaError._FATAL, KafkaError.FENCED_INSTANCE_ID))
             and code != KafkaError._PARTITION_EOF)
    try:
        if fatal:
            with pytest.raises(ClientFailed) as failed:
                worker.process(batch)
            assert str(failed.value).endswith(RESTART) and failed.value.exit_status == 1
            assert worker.checkpoint.commit() is False or not consumer.commits
        else:
            worker.process(batch)
            assert worker.checkpoint.pending_offsets == {0: before}
            assert len(producer.topic(settings_.output_topic)) == before + 1
    finally:
        worker.state.close_all()
