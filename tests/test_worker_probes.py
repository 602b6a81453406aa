"""Probes that tell the truth: `/health`, `/ready`, `/metrics` from the first second, restore
progress, consumer lag, and the README's metric names against a real scrape."""

from __future__ import annotations

import functools
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvrec.state.partition import PartitionWindows
from kvrec.stream.worker.metrics import HealthState, WorkerMetrics, serve
from tests.conftest import create_topics, unique_topic
from tests.test_worker_reliability import OnePartition, _event
from tests.worker_fixtures import make_artifact
from tests.worker_inprocess import ThreadWorker, worker_args

ROOT = Path(__file__).parent.parent


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return make_artifact(tmp_path / "model", n_items=60, window=4, layers=2).path


# --- the endpoints' states, without a broker ---------------------------------------------------

def test_health_and_ready_follow_the_worker_through_its_life() -> None:
    health = HealthState(stale_after_s=0.3)
    server = serve(WorkerMetrics(), health, 0, "127.0.0.1")
    port = server.server_address[1]
    try:
        assert server.server_address[0] == "127.0.0.1"
        # the model is loading: alive, not ready, however long it takes
        time.sleep(0.4)
        assert _get(port, "/health") == (200, "starting\n")
        assert _get(port, "/ready") == (503, "not ready: starting\n")
        health.started()  # the loop runs; no assignment yet
        assert _get(port, "/health") == (200, "ok\n")
        assert _get(port, "/ready") == (503, "not ready: waiting for a partition assignment\n")
        health.assignment_started()
        assert _get(port, "/ready") == (503, "not ready: restoring\n")
        health.assignment_empty()  # owning nothing: a first cooperative round, or idle?
        assert _get(port, "/ready") == (503, "not ready: waiting for a partition assignment\n")
        health.assignment_started()
        health.assignment_done()  # partitions restored (or known to be an idle member)
        assert _get(port, "/ready") == (200, "ready\n")
        health.revoked()
        assert _get(port, "/ready") == (503, "not ready: waiting for a partition assignment\n")
        health.assignment_started()
        health.assignment_done()
        assert _get(port, "/ready") == (200, "ready\n")
        time.sleep(0.4)  # no beat: the loop is stuck
        status, text = _get(port, "/health")
        assert status == 503 and text.startswith("stalled: no progress for")
        assert _get(port, "/ready") == (503, "not ready: stalled\n")
        health.beat()
        assert _get(port, "/health") == (200, "ok\n") and _get(port, "/ready")[0] == 200
    finally:
        server.shutdown()


def test_a_wait_on_kafka_is_alive_up_to_its_limit_and_no_longer() -> None:
    """A checkpoint waiting for Kafka within its limit is alive though the loop does not beat;
    past the limit (the worker should have exited by itself) it is stalled like any silence."""
    health = HealthState(stale_after_s=0.2)
    health.started()
    with health.waiting_on_kafka(0.8):
        time.sleep(0.4)  # past the stall limit, within the wait's
        status, text = health.health_reply()
        assert (status, text.split(" for ")[0]) == (200, "ok: waiting")
        assert text.endswith(", within the outage limit") and health.healthy()
        time.sleep(0.6)  # past the wait's limit: silent since the wait began
        status, text = health.health_reply()
        assert status == 503 and text.startswith("stalled: no progress for 1 s")
        assert not health.healthy()
    assert health.health_reply() == (200, "ok")  # the wait is over: that is progress


def test_the_metrics_server_listens_where_it_is_told() -> None:
    everywhere = serve(WorkerMetrics(), HealthState(), 0)
    loopback = serve(WorkerMetrics(), HealthState(), 0, "127.0.0.1")
    try:
        assert everywhere.server_address[0] == "0.0.0.0"  # the default: probes reach the pod IP
        assert loopback.server_address[0] == "127.0.0.1"
        assert _get(loopback.server_address[1], "/health") == (200, "starting\n")
    finally:
        everywhere.shutdown()
        loopback.shutdown()
    try:
        ipv6 = serve(WorkerMetrics(), HealthState(), 0, "::1")
    except OSError:
        pytest.skip("no IPv6 loopback here")
    try:
        url = f"http://[::1]:{ipv6.server_address[1]}/health"
        with urllib.request.urlopen(url, timeout=5) as reply:
            assert reply.read() == b"starting\n"
    finally:
        ipv6.shutdown()


def test_the_worker_command_serves_its_probes_before_importing_torch() -> None:
    """Parsing the flags and starting the metrics server import neither torch nor faiss (the
    few seconds `import torch` takes are after the server answers)."""
    script = (
        "import sys, tempfile\n"
        "from stream.cli import build_parser\n"
        "from stream.worker.metrics import HealthState, WorkerMetrics, serve\n"
        "from stream.worker.settings import WorkerSettings\n"
        "argv = ['worker', '--model', tempfile.mkdtemp(), '--metrics-port', '0']\n"
        "settings = WorkerSettings.from_args(build_parser(argv).parse_args(argv))\n"
        "serve(WorkerMetrics(), HealthState(), 0, '127.0.0.1').shutdown()\n"
        "print(sorted(m for m in ('torch', 'faiss', 'numpy') if m in sys.modules))\n"
    )
    run = subprocess.run([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"


def test_a_metrics_address_it_cannot_listen_on_is_refused_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    run = subprocess.run(
        [sys.executable, "-m", "kvrec.stream.cli", "worker", "--model", str(tmp_path / "model"),
         "--metrics-host", "203.0.113.7", "--metrics-port", "0"],
        env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=60,
    )
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1].startswith(
        "kvrec: error: --metrics-host 203.0.113.7 --metrics-port 0: cannot listen there"
    )


@pytest.fixture(scope="module")
def fake_worker(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from tests.worker_fixtures import exact_worker_with_model

    model = make_artifact(tmp_path_factory.mktemp("idle") / "model", n_items=60, window=4,
                          layers=1).path
    return exact_worker_with_model(model)


# what the group coordinator and the metadata say when asked: (members, input partitions) or
# an error
IDLE_ANSWERS = st.one_of(
    st.tuples(st.integers(1, 6), st.integers(1, 6)),
    st.sampled_from(["kafka", "timeout"]),
)


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(answers=st.lists(IDLE_ANSWERS, max_size=6))
def test_owning_nothing_is_ready_exactly_when_the_group_outnumbers_the_partitions(
    fake_worker, tmp_path_factory: pytest.TempPathFactory, answers: list[object]
) -> None:
    """After a rebalance that leaves the worker owning nothing, every loop turn's check asks
    the group's size and the input's partitions; the worker turns ready at the first answer
    with more members than partitions, never on an error; partitions assigned later make it
    ready the usual way."""
    from dataclasses import replace

    from confluent_kafka import KafkaError, KafkaException, TopicPartition

    from kvrec.stream.worker.loop import KafkaClients, Worker
    from tests.fake_kafka import FakeConsumer, FakeProducer, FakeRestoreConsumer

    base, recommender = fake_worker
    worker_settings = replace(base, state_dir=tmp_path_factory.mktemp("worker"))
    producer, consumer = FakeProducer(), FakeConsumer()
    worker = Worker(worker_settings, recommender, WorkerMetrics(), HealthState(), {},
                    clients=KafkaClients(consumer, producer, FakeRestoreConsumer(producer)))
    worker.idle_check_s = 0.0
    pending = list(answers)
    asked: list[object] = []

    def members() -> int:
        answer = pending.pop(0)
        asked.append(answer)
        if answer == "kafka":
            raise KafkaException(KafkaError(KafkaError._TRANSPORT, "broker down"))
        if answer == "timeout":
            raise TimeoutError()
        return answer[0]  # type: ignore[index]

    worker._group_members = members  # type: ignore[method-assign]
    worker._input_partitions = lambda: asked[-1][1]  # type: ignore[index]
    worker.health.started()  # as `run` does before it subscribes
    worker._on_assign(consumer, [])
    assert not worker.health.ready
    while pending:
        worker._check_idle()
        final = [a for a in asked if isinstance(a, tuple) and a[0] > a[1]]
        assert worker.health.ready == bool(final), asked
        if final:
            assert asked[-1] == final[0]  # not asked again once ready
            break
    worker._on_assign(consumer, [TopicPartition(worker_settings.input_topic, 0)])
    assert worker.health.ready and len(worker.state) == 1
    worker.state.close_all()


# --- against the broker ------------------------------------------------------------------------

class Recording(HealthState):
    """A HealthState that remembers what the group did to the worker, and whether the worker
    was ready right after."""

    def __init__(self, stale_after_s: float = 60.0) -> None:
        super().__init__(stale_after_s)
        self.events: list[tuple[str, bool]] = []

    def assignment_started(self) -> None:
        super().assignment_started()
        self.events.append(("assign", self.ready))

    def assignment_done(self) -> None:
        super().assignment_done()
        self.events.append(("assigned", self.ready))

    def revoked(self) -> None:
        super().revoked()
        self.events.append(("revoked", self.ready))


def _wait(condition, timeout: float = 60.0, what: str = "") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.mark.kafka
def test_an_idle_member_is_ready_and_a_revocation_resets_readiness(
    kafka_bootstrap, model, tmp_path
) -> None:
    """Three members, two partitions: the third has nothing to do and is ready all the same. A
    member that gives up a partition is not ready until its next assignment completes."""
    events = unique_topic("idle-events")
    group = unique_topic("idle-group")
    create_topics(kafka_bootstrap, {events: 2, unique_topic("idle-recs"): 1})
    create_topics(kafka_bootstrap, {f"{group}-windows-changelog": 2},
                  config={"cleanup.policy": "compact"})

    def args(instance: str):  # type: ignore[no-untyped-def]
        return worker_args(kafka_bootstrap, events=events, recommendations=unique_topic("r"),
                           dead_letters=unique_topic("d"), group=group, model=model,
                           state_dir=tmp_path / instance,
                           extra=("--instance-id", instance, "--no-static-membership"))

    a = ThreadWorker(args("a"), health=Recording())
    b = ThreadWorker(args("b"), health=Recording())
    c = ThreadWorker(args("c"), health=Recording())
    servers = [serve(w.metrics, w.health, 0, "127.0.0.1") for w in (a, b, c)]
    ports = [s.server_address[1] for s in servers]
    try:
        with a:
            _wait(lambda: len(a.worker.state) == 2, what="a owning both partitions")
            _wait(lambda: a.health.ready, what="a ready")
            with b:
                _wait(lambda: len(a.worker.state) == 1 and len(b.worker.state) == 1
                      and a.health.ready and b.health.ready, what="a and b sharing")
                # a gave up one partition: not ready from the revocation to its next assignment
                first_revoke = a.health.events.index(("revoked", False))
                assert a.health.events[first_revoke + 1:][-1] == ("assigned", True)
                with c:
                    _wait(lambda: c.health.ready, what="the idle member c ready")
                    assert len(c.worker.state) == 0  # nothing assigned to it
                    assert c.health.events[-1] == ("assigned", True)
                    for port in ports:
                        assert _get(port, "/ready") == (200, "ready\n")
                        assert _get(port, "/health") == (200, "ok\n")
                    assert c.counter("kvrec_assigned_partitions") == 0
                # c left: it was revoked nothing, but it is out of the group
                assert c.health.events[-1][0] == "revoked" and not c.health.ready
            # b left: a takes its partition back, restores it, and is ready again
            _wait(lambda: len(a.worker.state) == 2 and a.health.ready, what="a owning both again")
        assert not a.health.ready  # closing revoked everything
    finally:
        for server in servers:
            server.shutdown()


@pytest.mark.kafka
def test_a_joining_member_is_not_ready_before_its_partitions_are_assigned_and_restored(
    kafka_bootstrap, model, tmp_path
) -> None:
    """Two members, four partitions: the joining member's first cooperative round hands it
    nothing (the other gives partitions up first), its partitions come a round later. It is
    not ready in between, only once it owns its partitions, restored (before, it was ready
    with nothing for about 3 s)."""
    from confluent_kafka import Producer

    events, recs, dead = (unique_topic(f"join-{t}") for t in ("events", "recs", "dlq"))
    group = unique_topic("join-group")
    create_topics(kafka_bootstrap, {events: 4, recs: 1, dead: 1})
    create_topics(kafka_bootstrap, {f"{group}-windows-changelog": 4},
                  config={"cleanup.policy": "compact"})
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    users = 80
    for i in range(users):  # windows in every partition's changelog: the joiner restores them
        producer.produce(events, key=f"u{i}".encode(), value=_event(f"u{i}"))
    producer.flush(30)

    def args(instance: str):  # type: ignore[no-untyped-def]
        return worker_args(kafka_bootstrap, events=events, recommendations=recs,
                           dead_letters=dead, group=group, model=model,
                           state_dir=tmp_path / instance, extra=("--instance-id", instance))

    a = ThreadWorker(args("a"))
    b = ThreadWorker(args("b"), health=Recording())
    samples: list[tuple[bool, int, list[float]]] = []  # (ready, partitions owned, remaining)
    with a:
        _wait(lambda: a.health.ready and len(a.worker.state) == 4, what="a owning all four")
        _wait(lambda: a.counter("kvrec_checkpoints_total") > 0
              and a.counter("kvrec_events_applied_total") == users, what="a's checkpoint")
        with b:
            deadline = time.monotonic() + 60
            while not (b.health.ready and len(b.worker.state) == 2):
                assert time.monotonic() < deadline, f"b never ready: {b.health.events}"
                ready = b.health.ready  # first: partitions are in place before it turns true
                owned = [p for p, _ in b.worker.state.items()]
                remaining = [b.metrics.registry.get_sample_value(
                    "kvrec_restore_records_remaining", {"partition": str(p)}) for p in owned]
                samples.append((ready, len(owned), remaining))
                time.sleep(0.005)
            server = serve(b.metrics, b.health, 0, "127.0.0.1")
            try:
                assert _get(server.server_address[1], "/ready") == (200, "ready\n")
            finally:
                server.shutdown()
            assert b.counter("kvrec_restored_windows_total") > 0  # it had something to restore
    # the first round did hand b nothing (the case under test happened) ...
    assert ("assign", False) in b.health.events and samples and samples[0][1] == 0
    # ... and b was never ready owning nothing, nor with a restore unfinished
    assert not [s for s in samples if s[0] and (s[1] == 0 or any(r != 0 for r in s[2]))], [
        s for s in samples if s[0]][:5]


@pytest.mark.kafka
def test_health_stays_ok_through_a_long_restore_that_reports_its_progress(
    kafka_bootstrap, model, tmp_path, monkeypatch, caplog
) -> None:
    """The restore runs inside the assignment callback, so the loop does not beat; the restore
    beats instead. Here it lasts several times the liveness limit and /health never fails,
    while /ready says "restoring" and the gauges and the log count the records down."""
    topics = OnePartition(kafka_bootstrap, "restore")
    users = 600
    topics.produce([(f"u{i}".encode(), _event(f"u{i}", "sku-1")) for i in range(users)])
    with ThreadWorker(topics.args(model, tmp_path / "first")):  # writes the changelog
        topics.wait_committed(users)

    stale_after_s = 1.0
    real_restore = PartitionWindows.restore

    def slow_restore(self, windows, changelog_offset):  # type: ignore[no-untyped-def]
        time.sleep(0.1)  # each read's write well inside the limit, the whole restore not
        real_restore(self, windows, changelog_offset)

    monkeypatch.setattr(PartitionWindows, "restore", slow_restore)
    import kvrec.stream.worker.loop as loop

    monkeypatch.setattr(loop, "recover_partition", functools.partial(
        loop.recover_partition, batch_records=20, log_every_s=0.25))
    caplog.set_level("INFO", logger="kvrec.stream.worker.recovery")
    second = ThreadWorker(topics.args(model, tmp_path / "second"),
                          health=HealthState(stale_after_s=stale_after_s))
    server = serve(second.metrics, second.health, 0, "127.0.0.1")
    port = server.server_address[1]
    health_replies: list[tuple[int, str]] = []
    ready_replies: list[tuple[int, str]] = []
    remaining: list[float] = []
    started = time.monotonic()
    restoring_since = None
    try:
        with second:
            while not second.health.ready:
                assert time.monotonic() - started < 90, "the restore did not finish"
                health_replies.append(_get(port, "/health"))
                ready_replies.append(_get(port, "/ready"))
                if ready_replies[-1] == (503, "not ready: restoring\n") and not restoring_since:
                    restoring_since = time.monotonic()
                value = second.metrics.registry.get_sample_value(
                    "kvrec_restore_records_remaining", {"partition": "0"})
                if value is not None:
                    remaining.append(value)
                time.sleep(0.05)
            assert restoring_since is not None, ready_replies
            restore_seconds = time.monotonic() - restoring_since
            total = second.metrics.registry.get_sample_value(
                "kvrec_restore_records", {"partition": "0"})
            done = second.metrics.registry.get_sample_value(
                "kvrec_restore_records_remaining", {"partition": "0"})
            assert second.counter("kvrec_restored_windows_total") == users
    finally:
        server.shutdown()
    assert restore_seconds > 2 * stale_after_s  # long enough to have failed without the beat
    assert set(health_replies) <= {(200, "starting\n"), (200, "ok\n")}
    assert total == users and done == 0  # at-least-once: one changelog offset per window
    assert remaining == sorted(remaining, reverse=True) and 0 < max(remaining) <= users
    assert len(set(remaining)) > 3  # it counted down, not just "all" then "none"
    progress = [r.getMessage() for r in caplog.records
                if re.search(rf"restoring .*: \d+ of {users} records", r.getMessage())]
    assert len(progress) >= 3, [r.getMessage() for r in caplog.records]
    read = [int(re.search(r": (\d+) of", m).group(1)) for m in progress]
    assert read == sorted(read) and len(set(read)) >= 3 and read[-1] <= users


@pytest.mark.kafka
def test_consumer_lag_per_partition_counts_down_to_zero(kafka_bootstrap, model, tmp_path) -> None:
    topics = OnePartition(kafka_bootstrap, "lag")
    backlog = 300
    topics.produce([(f"u{i % 50}".encode(), _event(f"u{i % 50}")) for i in range(backlog)])
    worker = ThreadWorker(topics.args(model, tmp_path / "state", "at-least-once",
                                      "--batch-size", "10"))
    worker.worker.lag_interval_s = 0.05
    real = worker.recommender.recommend

    def slow(wave):  # type: ignore[no-untyped-def]
        time.sleep(0.05)
        return real(wave)

    worker.recommender.recommend = slow  # type: ignore[method-assign]
    seen: list[float] = []
    with worker:
        deadline = time.monotonic() + 90
        while not seen or seen[-1] > 0:
            assert time.monotonic() < deadline, f"the lag never reached 0: {seen[-5:]}"
            value = worker.metrics.registry.get_sample_value(
                "kvrec_consumer_lag", {"partition": "0"})
            if value is not None and (not seen or value != seen[-1]):
                seen.append(value)
            time.sleep(0.02)
        topics.produce([(b"u1", _event("u1"))] * 5)  # new messages: the lag rises, then falls
        topics.wait_committed(backlog + 5)
        time.sleep(0.3)
        assert worker.counter("kvrec_consumer_lag", partition="0") == 0
    assert seen == sorted(seen, reverse=True)  # only ever counting down through the backlog
    assert len(seen) > 3 and 0 < max(seen) <= backlog


# --- the whole process: probes from the first second, the README's names ----------------------

def _readme_metrics() -> dict[str, set[str] | None]:
    """Every metric name the README and docs/ mention in backticks, with the labels it gives
    (None: no braces)."""
    found: dict[str, set[str] | None] = {}
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for name, labels in re.findall(
            r"`((?:kvrec|process|python)_[a-z0-9_]+)(\{[a-z_, ]*\})?`", path.read_text()
        ):
            found[name] = (
                {label.strip() for label in labels.strip("{}").split(",")} if labels else None
            )
    return found


def _scraped(text: str) -> dict[str, set[str]]:
    """Metric families of a scrape (`# TYPE` names) with the labels their samples carry."""
    families = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE))
    labels: dict[str, set[str]] = {name: set() for name in families}
    for sample, label_text in re.findall(r"^([a-z_0-9]+)\{([^}]*)\}", text, re.MULTILINE):
        family = sample if sample in families else re.sub(r"_(bucket|sum|count)$", "", sample)
        labels[family] |= {pair.split("=")[0] for pair in label_text.split(",") if pair} - {"le"}
    return labels


def _listening_address(port: int) -> str | None:
    """The local address a TCP socket listening on `port` is bound to (Linux /proc)."""
    path = Path("/proc/net/tcp")
    if not path.exists():
        return None
    for line in path.read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, port_hex = local.split(":")
        if state == "0A" and int(port_hex, 16) == port:
            return ".".join(str(int(address[i:i + 2], 16)) for i in (6, 4, 2, 0))
    return None


@pytest.mark.kafka
def test_probes_answer_from_the_first_second_and_the_readme_names_every_metric(
    kafka_bootstrap, model, tmp_path
) -> None:
    topics = OnePartition(kafka_bootstrap, "scrape")
    topics.produce([(b"u1", _event("u1")), (b"u1", b"{not json")])
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [
        sys.executable, "-m", "kvrec.stream.cli", "worker", "--bootstrap-servers", kafka_bootstrap,
        "--input-topic", topics.events, "--output-topic", topics.recommendations,
        "--dead-letter-topic", topics.dead_letters, "--group-id", topics.group,
        "--instance-id", "scrape", "--model", str(model), "--state-dir", str(tmp_path / "state"),
        "--k", "5", "--retrieval", "exact", "--commit-interval-ms", "200",
        "--metrics-host", "127.0.0.1", "--metrics-port", str(port),
    ]
    started = time.monotonic()
    process = subprocess.Popen(command, env={**os.environ, "PYTHONPATH": str(ROOT)},
                               stderr=subprocess.PIPE, text=True)
    first = None
    try:
        while first is None:
            assert process.poll() is None, process.stderr.read()[-3000:]
            assert time.monotonic() - started < 30, "the metrics server never answered"
            try:
                first = (time.monotonic() - started, _get(port, "/health"), _get(port, "/ready"),
                         _get(port, "/metrics"))
            except OSError:
                time.sleep(0.02)
        answered_after, health, ready, metrics = first
        print(f"/health answered {answered_after:.2f} s after the process started")
        # before the model is loaded: alive, not ready, and the metrics are there already
        assert health == (200, "starting\n") and ready == (503, "not ready: starting\n")
        assert metrics[0] == 200 and "kvrec_events_in_total 0.0" in metrics[1]
        assert "process_cpu_seconds_total" in metrics[1] and "kvrec_model_info{" not in metrics[1]
        if Path("/proc/net/tcp").exists():  # --metrics-host: loopback only
            assert _listening_address(port) == "127.0.0.1"
        _wait(lambda: _get(port, "/ready") == (200, "ready\n"), 120, "/ready")
        topics.wait_committed(2)
        time.sleep(1.5)  # a lag update after the last fetch
        status, scrape = _get(port, "/metrics")
    finally:
        process.terminate()
        _, stderr = process.communicate(timeout=60)
    assert status == 200 and process.returncode == 0, stderr[-3000:]
    assert 'kvrec_consumer_lag{partition="0"} 0.0' in scrape
    assert 'kvrec_dead_letters_total{reason="malformed_json"} 1.0' in scrape
    assert "_created" not in scrape  # no timestamp series per counter
    scraped = _scraped(scrape)
    documented = _readme_metrics()
    assert set(documented) - set(scraped) == set(), "the README names metrics no scrape shows"
    assert set(scraped) - set(documented) == set(), "metrics the README does not list"
    for name, labels in documented.items():  # and the labels of each, exactly
        assert (labels or set()) == scraped[name], name
