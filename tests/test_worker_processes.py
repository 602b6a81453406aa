"""`kvrec worker --processes N`: children in one group split the partitions and all produce;
SIGTERM stops them cleanly; a child that dies takes the parent down with status 1."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from confluent_kafka import Consumer, TopicPartition

from kvrec.stream.worker.metrics import HealthState, WorkerMetrics, serve
from kvrec.stream.worker.processes import aggregate, available_cores, child_command, child_ports
from tests.test_worker_kafka import Topics, _consume, _events, _free_port, _produce_events
from tests.worker_fixtures import make_artifact

ROOT = Path(__file__).parent.parent


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
    except OSError as exc:
        return 0, str(exc)


def _gauge(port: int, name: str) -> float:
    status, text = _get(port, "/metrics")
    assert status == 200, text
    values = [float(line.split()[-1]) for line in text.splitlines()
              if line.startswith(name) and not line.startswith("#")]
    return sum(values)


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def _wait(predicate, timeout: float, what: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        assert process.poll() is None, f"exited {process.returncode}:\n{log.read_text()[-3000:]}"
        time.sleep(0.3)
    raise AssertionError(f"{what} within {timeout}s:\n{log.read_text()[-3000:]}")


# --- without a broker ----------------------------------------------------------------------------

def test_child_settings_come_last_and_ports_follow_the_parents(tmp_path: Path) -> None:
    command = child_command(["worker", "--instance-id", "pod", "--metrics-port", "9464"],
                            "pod-1", 9466)
    assert command[:3] == [sys.executable, "-m", "kvrec.stream.cli"]
    assert command[-6:] == ["--processes", "1", "--instance-id", "pod-1", "--metrics-port", "9466"]
    assert child_ports(9464, 2) == [9465, 9466]
    assert child_ports(-1, 3) == [-1, -1, -1]
    free = child_ports(0, 2)
    assert len(set(free)) == 2 and all(p > 0 for p in free)
    quota = tmp_path / "cpu.max"
    quota.write_text("150000 100000\n")  # a pod limit of 1.5 cores: 2 processes
    assert available_cores(quota) == min(2, len(os.sched_getaffinity(0)))
    quota.write_text("max 100000\n")
    assert available_cores(quota) == len(os.sched_getaffinity(0))


def test_the_parent_is_ready_only_when_every_child_is() -> None:
    states = [HealthState(), HealthState()]
    servers = [serve(WorkerMetrics(), s, 0, "127.0.0.1") for s in states]
    ports = [s.server_address[1] for s in servers]
    try:
        for state in states:
            state.started()
            state.assignment_started()
        states[0].assignment_done()
        status, text = aggregate(ports, "/ready")
        assert status == 503 and "worker 0" in text and "worker 1" in text, text
        assert "not ready: restoring" in text
        states[1].assignment_done()
        assert aggregate(ports, "/ready")[0] == 200
        assert aggregate(ports, "/health")[0] == 200
        assert aggregate([*ports, _free_port()], "/health")[0] == 503  # a child not answering
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()


# --- against the broker --------------------------------------------------------------------------

def _start(kafka_bootstrap: str, topics: Topics, model: Path, state_dir: Path, port: int,
           log: Path) -> subprocess.Popen:
    command = [
        sys.executable, "-m", "kvrec.stream.cli", "worker", "--processes", "2",
        "--bootstrap-servers", kafka_bootstrap, "--input-topic", topics.events,
        "--output-topic", topics.recommendations, "--dead-letter-topic", topics.dead_letters,
        "--group-id", topics.group, "--instance-id", "pod", "--model", str(model),
        "--state-dir", str(state_dir), "--k", "5", "--retrieval", "exact",
        "--batch-size", "64", "--commit-interval-ms", "200", "--metrics-port", str(port),
        "--metrics-host", "127.0.0.1", "--session-timeout-ms", "10000",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with open(log, "w") as out:
        return subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)


@pytest.mark.kafka
def test_two_processes_split_the_partitions_and_stop_cleanly(kafka_bootstrap, tmp_path) -> None:
    model = make_artifact(tmp_path / "model", n_items=60, window=4, layers=2).path
    topics = Topics(kafka_bootstrap, "procs")
    port = _free_port()  # the children take the next two ports
    log = tmp_path / "workers.log"
    parent = _start(kafka_bootstrap, topics, model, tmp_path / "state", port, log)
    try:
        _wait(lambda: _get(port, "/ready")[0] == 200, 120, "both ready", parent, log)
        # the group gave each child some of the 4 partitions
        _wait(lambda: [_gauge(p, "kvrec_assigned_partitions") for p in (port + 1, port + 2)]
              in ([2.0, 2.0], [1.0, 3.0], [3.0, 1.0]), 60, "a split", parent, log)
        events = _events(400, users=40, items=60, seed=3)
        _produce_events(kafka_bootstrap, topics.events, events)
        outputs = _consume(kafka_bootstrap, topics.recommendations, len(events), quiet=0.5)
        assert {(json.loads(m.value())["user_id"], json.loads(m.value())["event_ts"])
                for m in outputs} == {(e["user_id"], e["ts"]) for e in events}
        produced = [_gauge(p, "kvrec_recommendations_out_total") for p in (port + 1, port + 2)]
        assert all(n > 0 for n in produced) and sum(produced) >= len(events), produced
        assert _get(port, "/metrics")[0] == 404
        children = _children(parent.pid)
        assert len(children) == 2
        parent.send_signal(signal.SIGTERM)
        assert parent.wait(timeout=60) == 0, log.read_text()[-3000:]
        assert not any(Path(f"/proc/{pid}").exists() for pid in children)  # reaped
        # each child checkpointed on the way out: every input offset is committed
        reader = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": topics.group})
        try:
            committed = reader.committed([TopicPartition(topics.events, p) for p in range(4)],
                                         timeout=10)
            ends = [reader.get_watermark_offsets(TopicPartition(topics.events, p), timeout=10)[1]
                    for p in range(4)]
        finally:
            reader.close()
        assert [tp.offset for tp in committed] == ends
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()


@pytest.mark.kafka
def test_a_child_that_dies_stops_the_other_and_the_parent_fails(kafka_bootstrap, tmp_path) -> None:
    model = make_artifact(tmp_path / "model", n_items=60, window=4, layers=2).path
    topics = Topics(kafka_bootstrap, "procs-die")
    log = tmp_path / "workers.log"
    parent = _start(kafka_bootstrap, topics, model, tmp_path / "state", -1, log)
    try:
        _wait(lambda: len(_children(parent.pid)) == 2, 30, "two children", parent, log)
        first, second = _children(parent.pid)
        time.sleep(1.0)
        os.kill(first, signal.SIGKILL)
        assert parent.wait(timeout=60) == 1, log.read_text()[-3000:]
        assert not Path(f"/proc/{second}").exists()
        assert "exited with status -9" in log.read_text()
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()


# --- a commit that meets a rebalance --------------------------------------------------------------

def test_a_commit_during_a_rebalance_is_retried_not_fatal(tmp_path: Path) -> None:
    """When the second process joined, the first one's periodic commit failed with
    ILLEGAL_GENERATION and the worker exited: that commit is retried once the client rejoined."""
    from confluent_kafka import KafkaError, KafkaException

    from kvrec.state.partition import WorkerState
    from kvrec.stream.worker.checkpoint import Checkpoint, DeliveryError
    from tests.fake_kafka import FakeConsumer, FakeProducer

    class Rebalancing(FakeConsumer):
        def __init__(self, failures: list[int]) -> None:
            super().__init__()
            self.failures = failures

        def commit(self, offsets, asynchronous=True) -> None:
            if self.failures:
                raise KafkaException(KafkaError(self.failures.pop(0)))
            super().commit(offsets, asynchronous)

    def checkpoint(consumer: FakeConsumer, name: str) -> Checkpoint:
        state = WorkerState(tmp_path / name, "g", "events", window_capacity=4)
        state.open(0)
        point = Checkpoint(consumer, FakeProducer(), state, input_topic="events",
                           changelog_topic="changelog", exactly_once=False, interval_s=0.0,
                           outage_limit_s=5.0)
        point.store_offset(0, 41)
        return point

    consumer = Rebalancing([KafkaError.ILLEGAL_GENERATION, KafkaError.REBALANCE_IN_PROGRESS])
    assert checkpoint(consumer, "a").commit()
    assert [(tp.partition, tp.offset) for tp in consumer.commits[-1]] == [(0, 42)]
    # the coordinator being found again after an outage (librdkafka does not flag it retriable)
    consumer = Rebalancing([KafkaError._WAIT_COORD, KafkaError.COORDINATOR_NOT_AVAILABLE,
                            KafkaError.NOT_COORDINATOR, KafkaError.COORDINATOR_LOAD_IN_PROGRESS])
    assert checkpoint(consumer, "c").commit()
    assert [(tp.partition, tp.offset) for tp in consumer.commits[-1]] == [(0, 42)]
    # any other refusal still fails the checkpoint
    with pytest.raises(DeliveryError):
        checkpoint(Rebalancing([KafkaError.GROUP_AUTHORIZATION_FAILED]), "b").commit()
