"""A topic the worker needs that is not there is one line that names it and the flag that creates
it, and nothing is committed: at the start (every topic, against the real broker's metadata),
and on the error path (a changelog partition missing when a partition is assigned)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from hypothesis import given, settings
from hypothesis import strategies as st

from kvrec.errors import ConfigError
from kvrec.stream.kafka_config import topic_partitions
from kvrec.stream.worker.app import check_topics, topic_roles
from kvrec.stream.worker.settings import WorkerSettings
from tests.conftest import create_topics, unique_topic
from tests.worker_fixtures import make_artifact
from tests.worker_inprocess import ThreadWorker, worker_args

ROOT = Path(__file__).parent.parent
ROLES = ("input", "changelog", "output", "dead-letter")


class Names:
    """A fresh name for each topic of a worker, and its group."""

    def __init__(self, prefix: str) -> None:
        self.group = unique_topic(f"{prefix}-group")
        self.by_role = {
            "input": unique_topic(f"{prefix}-events"),
            "changelog": f"{self.group}-windows-changelog",
            "output": unique_topic(f"{prefix}-recs"),
            "dead-letter": unique_topic(f"{prefix}-dlq"),
        }

    def create(self, bootstrap: str, roles: tuple[str, ...], partitions: int = 2) -> None:
        if not roles:
            return
        wanted = {self.by_role[role]: partitions for role in roles}
        create_topics(bootstrap, wanted)
        deadline = time.monotonic() + 30  # until the cluster's metadata has them all
        while any(topic_partitions({"bootstrap.servers": bootstrap}, 10).get(name) != count
                  for name, count in wanted.items()):
            assert time.monotonic() < deadline, f"{wanted} not in the metadata"
            time.sleep(0.2)

    def command(self, bootstrap: str, model: Path, state_dir: Path) -> list[str]:
        return [
            "--bootstrap-servers", bootstrap,
            "--input-topic", self.by_role["input"],
            "--output-topic", self.by_role["output"],
            "--dead-letter-topic", self.by_role["dead-letter"],
            "--group-id", self.group,
            "--model", str(model),
            "--state-dir", str(state_dir),
            "--metrics-port", "-1",
        ]


def _settings(names: Names, tmp_path: Path) -> WorkerSettings:
    return WorkerSettings.from_args(worker_args(
        "127.0.0.1:1", events=names.by_role["input"], recommendations=names.by_role["output"],
        dead_letters=names.by_role["dead-letter"], group=names.group, model=None,
        state_dir=tmp_path,
    ))


def _committed(bootstrap: str, group: str, topic: str, partitions: int) -> list[int]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        return [tp.offset for tp in consumer.committed(
            [TopicPartition(topic, p) for p in range(partitions)], timeout=10)]
    finally:
        consumer.close()


@settings(max_examples=40, deadline=None)
@given(present=st.sets(st.sampled_from(ROLES)), extra=st.integers(0, 2))
def test_every_missing_topic_is_named_with_its_flag(present: set[str], extra: int) -> None:
    """Over every set of topics present (no broker: the metadata is made up), the check names
    exactly the missing ones, each with the flag that names it, in one line."""
    names = Names("prop")
    worker = _settings(names, Path("/nonexistent"))
    cluster = {names.by_role[role]: 2 for role in present}
    cluster["someone-elses-topic"] = 3
    if "changelog" in present:
        cluster[names.by_role["changelog"]] = 2 + extra  # as many as the input, or more: fine
    missing = [role for role in ROLES if role not in present]
    if not missing:
        check_topics(worker, cluster)
        return
    with pytest.raises(ConfigError) as refused:
        check_topics(worker, cluster)
    message = str(refused.value)
    assert "\n" not in message and "`--create-topics`" in message
    roles = topic_roles(worker)
    for role in ROLES:
        name = names.by_role[role]
        assert (name in message) == (role in missing), (role, message)
        if role in missing:
            assert roles[name] == (role, f"--{role}-topic")
            assert f"--{role}-topic" in message
    assert "someone-elses-topic" not in message


@pytest.mark.kafka
@pytest.mark.parametrize("missing", ROLES)
def test_the_real_broker_s_metadata_finds_the_missing_topic(kafka_bootstrap, tmp_path,
                                                              missing: str) -> None:
    names = Names(f"missing-{missing}")
    names.create(kafka_bootstrap, tuple(role for role in ROLES if role != missing))
    with pytest.raises(ConfigError, match=(
        rf"^the {missing} topic {names.by_role[missing]} does not exist: create it with "
        rf"`--create-topics` \(or name an existing one with --{missing}-topic\)$"
    )):
        check_topics(_settings(names, tmp_path), topic_partitions({
            "bootstrap.servers": kafka_bootstrap}, 10))


@pytest.mark.kafka
def test_a_changelog_with_fewer_partitions_than_the_input_is_refused(kafka_bootstrap,
                                                                      tmp_path) -> None:
    names = Names("short-changelog")
    names.create(kafka_bootstrap, ("input", "output", "dead-letter"), partitions=4)
    names.create(kafka_bootstrap, ("changelog",), partitions=1)
    with pytest.raises(ConfigError, match=(
        rf"^the changelog topic {names.by_role['changelog']} has 1 partitions, fewer than the "
        rf"4 of the input topic {names.by_role['input']}: give it 4"
    )):
        check_topics(_settings(names, tmp_path), topic_partitions({
            "bootstrap.servers": kafka_bootstrap}, 10))


@pytest.mark.kafka
def test_a_worker_whose_changelog_does_not_exist_says_so_in_one_line(kafka_bootstrap,
                                                                      tmp_path) -> None:
    """The issue's case: a new --group-id, its changelog not created, no --create-topics. The
    command exits 2 with one line (no traceback) and commits nothing, though events wait."""
    model = make_artifact(tmp_path / "model", n_items=60, window=4, layers=2).path
    names = Names("no-changelog")
    names.create(kafka_bootstrap, ("input", "output", "dead-letter"))
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    for i in range(20):
        producer.produce(names.by_role["input"], key=f"u{i}".encode(),
                         value=b'{"user_id": "u%d", "item_id": "sku-1", "event_type": "view", '
                               b'"ts": 1700000000000}' % i)
    producer.flush(30)
    run = subprocess.run(
        [sys.executable, "-m", "kvrec.stream.cli", "worker",
         *names.command(kafka_bootstrap, model, tmp_path / "state")],
        env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=180,
    )
    changelog = names.by_role["changelog"]
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr, run.stderr
    assert run.stderr.strip().splitlines()[-1] == (
        f"kvrec: error: the changelog topic {changelog} does not exist: create it with "
        "`--create-topics` (or name an existing one with --changelog-topic)"
    )
    assert _committed(kafka_bootstrap, names.group, names.by_role["input"], 2) == [-1001, -1001]


@pytest.mark.kafka
def test_a_changelog_partition_missing_at_assignment_is_one_error_and_nothing_is_committed(
    kafka_bootstrap, tmp_path
) -> None:
    """Past the start's check (here the worker runs in-process, without it): the changelog
    has one partition, the input two. The assignment's restore finds partition 1 missing: the
    worker stops with that one error, commits nothing, and leaves its group."""
    model = make_artifact(tmp_path / "model", n_items=60, window=4, layers=2).path
    names = Names("short-at-assign")
    names.create(kafka_bootstrap, ("input", "output", "dead-letter"))
    names.create(kafka_bootstrap, ("changelog",), partitions=1)
    args = worker_args(kafka_bootstrap, events=names.by_role["input"],
                       recommendations=names.by_role["output"],
                       dead_letters=names.by_role["dead-letter"], group=names.group,
                       model=model, state_dir=tmp_path / "state")
    worker = ThreadWorker(args, expect_failure=True)
    with worker:
        deadline = time.monotonic() + 60
        while worker.alive:
            assert time.monotonic() < deadline, "the worker did not stop"
            time.sleep(0.1)
    assert isinstance(worker.error, ConfigError), repr(worker.error)
    assert str(worker.error) == (
        f"the changelog topic {names.by_role['changelog']} has no partition 1 (it does not "
        "exist, or has fewer partitions than the input topic): create it with "
        "`--create-topics` (or name another with --changelog-topic)"
    )
    assert _committed(kafka_bootstrap, names.group, names.by_role["input"], 2) == [-1001, -1001]
