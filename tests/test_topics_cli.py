"""`kvrec topics create`: the worker's topics and the model topics, created once, never altered."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient, ConfigResource

from kvrec.stream.cli import build_parser
from kvrec.stream.topics_cli import wanted_topics
from tests.conftest import create_topics, unique_topic

KVREC = Path(sys.executable).with_name("kvrec")


def _kvrec(*args: str) -> subprocess.CompletedProcess[str]:
    command = [str(KVREC)] if KVREC.exists() else [sys.executable, "-m", "kvrec.stream.cli"]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=120)


def _args(*argv: str) -> object:
    return build_parser(["topics", "create", *argv]).parse_args(["topics", "create", *argv])


def test_the_default_topics_are_the_workers_and_the_model_topics() -> None:
    compacted = {"cleanup.policy": "compact"}
    assert wanted_topics(_args()) == {
        "events": (4, {}),
        "kvrec-worker-windows-changelog": (4, compacted),
        "recommendations": (4, compacted),
        "events-dead-letter": (1, {}),
        "model-updates": (1, compacted),
        "model-live-stats": (1, compacted),
    }


def test_the_changelog_follows_the_group_and_the_partitions_flag() -> None:
    specs = wanted_topics(_args("--group-id", "g7", "--partitions", "12", "--input-topic", "in"))
    assert specs["in"] == (12, {})
    assert specs["g7-windows-changelog"] == (12, {"cleanup.policy": "compact"})
    assert specs["recommendations"][0] == 12
    assert "kvrec-worker-windows-changelog" not in specs
    named = wanted_topics(_args("--changelog-topic", "windows"))
    assert "windows" in named and "kvrec-worker-windows-changelog" not in named


def test_no_kafka_is_one_line_and_exit_1() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = _kvrec("topics", "create", "--bootstrap-servers", f"127.0.0.1:{port}",
                    "--connect-timeout", "1")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"kvrec: error: cannot reach Kafka at 127.0.0.1:{port}")


def test_a_missing_or_unknown_action_is_a_usage_error() -> None:
    for argv in (["topics"], ["topics", "delete"]):
        result = _kvrec(*argv)
        assert result.returncode == 2
        assert result.stderr.startswith("kvrec: error: kvrec topics:"), result.stderr
        assert "Traceback" not in result.stderr


@pytest.mark.kafka
def test_creates_what_is_missing_and_keeps_what_exists(kafka_bootstrap: str) -> None:
    prefix = unique_topic("topics-cli")
    names = {
        "--input-topic": f"{prefix}-events", "--output-topic": f"{prefix}-recs",
        "--dead-letter-topic": f"{prefix}-dead", "--group-id": f"{prefix}-group",
        "--updates-topic": f"{prefix}-updates", "--stats-topic": f"{prefix}-stats",
    }
    flags = [part for pair in names.items() for part in pair]
    create_topics(kafka_bootstrap, {f"{prefix}-recs": 2})  # exists already, 2 partitions, not compacted
    first = _kvrec("topics", "create", "--bootstrap-servers", kafka_bootstrap, "--partitions", "3", *flags)
    assert first.returncode == 0, first.stderr
    changelog = f"{prefix}-group-windows-changelog"
    assert first.stdout.splitlines() == [
        f"{prefix}-events: created, 3 partitions",
        f"{changelog}: created, 3 partitions, cleanup.policy=compact",
        f"{prefix}-recs: exists, kept as it is",
        f"{prefix}-dead: created, 1 partition",
        f"{prefix}-updates: created, 1 partition, cleanup.policy=compact",
        f"{prefix}-stats: created, 1 partition, cleanup.policy=compact",
    ]
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    topics = admin.list_topics(timeout=10).topics
    assert len(topics[f"{prefix}-events"].partitions) == 3
    assert len(topics[changelog].partitions) == 3
    assert len(topics[f"{prefix}-recs"].partitions) == 2  # not altered
    assert len(topics[f"{prefix}-dead"].partitions) == 1
    resources = [ConfigResource("topic", changelog), ConfigResource("topic", f"{prefix}-recs")]
    policies = [future.result(timeout=30)["cleanup.policy"].value
                for future in admin.describe_configs(resources).values()]
    assert policies == ["compact", "delete"]

    again = _kvrec("topics", "create", "--bootstrap-servers", kafka_bootstrap, *flags)
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines() == [
        f"{name}: exists, kept as it is"
        for name in (f"{prefix}-events", changelog, f"{prefix}-recs", f"{prefix}-dead",
                     f"{prefix}-updates", f"{prefix}-stats")
    ]
