"""The local broker launcher: clean stop, background start/status/stop, clear errors.

The tests marked `kafka` start their own brokers (not the session one): a few seconds each.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient

from kvrec.deploy.kafka import launcher
from kvrec.deploy.kafka.launcher import LocalKafka, ensure_jars, jar_cache_dir
from kvrec.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


def _group_gone(pgid: int) -> bool:
    """True when no process of the group is left (zombies waiting for a reaper count as gone)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                return False
    return True


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env or dict(os.environ),
        capture_output=True, text=True, timeout=180,
    )


@pytest.mark.kafka
def test_start_then_stop_leaves_no_java_process_and_no_data_dir() -> None:
    kafka = LocalKafka(port=0)
    with kafka:
        pid = kafka.pid
        assert pid is not None
        assert b"kafka.Kafka" in Path(f"/proc/{pid}/cmdline").read_bytes()
        admin = AdminClient({"bootstrap.servers": kafka.bootstrap_servers, "log_level": 3})
        assert admin.list_topics(timeout=10).brokers  # it answers
        data_dir = kafka.data_dir
        assert data_dir is not None and (data_dir / "broker.log").exists()
    print(f"broker start {kafka.start_seconds:.1f}s, stop {kafka.stop_seconds:.1f}s")
    assert kafka.process is None
    assert _group_gone(pid)  # the JVM and anything it started
    assert not data_dir.exists()  # a temporary data dir goes with the broker
    kafka.stop()  # idempotent


@pytest.mark.kafka
def test_background_broker_start_status_stop_from_the_command_line(tmp_path: Path) -> None:
    data_dir = tmp_path / "broker"
    cli = ["-m", "kvrec.deploy.kafka.launcher"]
    try:
        started = _run(*cli, "start", "--data-dir", str(data_dir), "--port", "0")
        assert started.returncode == 0, started.stderr
        record = launcher.running_broker(data_dir)
        assert record is not None
        assert record["bootstrap_servers"] in started.stdout
        admin = AdminClient({"bootstrap.servers": record["bootstrap_servers"], "log_level": 3})
        assert admin.list_topics(timeout=10).brokers  # outlived the process that started it

        status = _run(*cli, "status", "--data-dir", str(data_dir))
        assert status.returncode == 0 and record["bootstrap_servers"] in status.stdout
        again = _run(*cli, "start", "--data-dir", str(data_dir), "--port", "0")
        assert again.returncode == 2 and "already running" in again.stderr

        stopped = _run(*cli, "stop", "--data-dir", str(data_dir))
        assert stopped.returncode == 0, stopped.stderr
        assert _group_gone(int(record["pid"]))
        status = _run(*cli, "status", "--data-dir", str(data_dir))
        assert status.returncode == 1 and "not running" in status.stdout
    finally:
        launcher.stop_detached(data_dir, grace=5)


@pytest.mark.kafka
def test_a_broker_that_fails_at_start_reports_its_log_and_leaves_nothing() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken, controller = busy.getsockname()[1], launcher.free_port()
        kafka = LocalKafka(overrides={  # listen on a port someone else holds
            "listeners": f"PLAINTEXT://127.0.0.1:{taken},CONTROLLER://127.0.0.1:{controller}",
            "controller.quorum.voters": f"1@127.0.0.1:{controller}",
        })
        with pytest.raises(ConfigError, match="exited at start") as error:
            kafka.start(timeout=60)
    assert "Address already in use" in str(error.value)  # the broker's own words, from its log
    assert kafka.process is None
    assert kafka.data_dir is not None and not kafka.data_dir.exists()


def test_a_port_in_use_is_one_clear_line_before_java_starts() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(ConfigError, match=r"port \d+ on 127.0.0.1 is in use") as error:
            LocalKafka(port=busy.getsockname()[1]).start()
    assert "\n" not in str(error.value)


def test_missing_java_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda tool, *a, **k: None if tool == "java" else real_which(tool))
    with pytest.raises(ConfigError, match=r"`java` not found.*install a Java 17\+ runtime"):
        LocalKafka().start()


def test_missing_java_on_the_command_line_is_one_error_line(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": str(tmp_path)}  # an empty folder: no java, no mvn
    result = _run("-m", "kvrec.stream.cli", "broker", "--port", "0", env=env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvrec: error: `java` not found"), result.stderr


def test_missing_maven_matters_only_when_the_jars_are_not_cached(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda tool, *a, **k: None if tool == "mvn" else real_which(tool))
    if real_which("java") is None:
        pytest.skip("needs java (the check for it comes first)")
    monkeypatch.setenv("KVREC_KAFKA_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ConfigError, match=r"`mvn` not found.*install Maven"):
        ensure_jars()
    assert not (tmp_path / "empty-cache" / jar_cache_dir().name).exists()

    cached = jar_cache_dir()  # a complete cache needs no Maven
    cached.mkdir(parents=True)
    (cached / ".complete").touch()
    assert ensure_jars() == cached


def test_the_jar_cache_is_keyed_on_the_pom(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    pom = tmp_path / "pom.xml"
    pom.write_bytes(launcher.POM.read_bytes())
    monkeypatch.setattr(launcher, "POM", pom)
    monkeypatch.setenv("KVREC_KAFKA_CACHE", str(tmp_path / "cache"))
    before = jar_cache_dir()
    assert before.parent == tmp_path / "cache"
    pom.write_text(pom.read_text().replace("<kafka.version>", "<kafka.version>9"))
    assert jar_cache_dir() != before  # another Kafka version: another folder, fetched afresh


def test_cluster_ids_never_look_like_an_option() -> None:
    ids = [launcher._random_cluster_id() for _ in range(3000)]  # ~47 would start with "-" unfixed
    assert all(len(i) == 22 and not i.startswith("-") for i in ids)
    assert len(set(ids)) == len(ids)
