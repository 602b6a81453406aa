"""--leave-on-scale-down (stream/worker/scale_down.py): the decision over ordinals and
replicas, the Kubernetes API asked through a fake, and every failure to ask kept as a restart;
--transaction-timeout-ms reaching the producer."""

from __future__ import annotations

import logging
import socket
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvrec.errors import ConfigError
from kvrec.stream.worker.scale_down import (
    KubernetesApi,
    is_scale_down,
    scaled_down,
    split_pod_name,
)
from tests.fake_kubernetes import FakeKubernetes, credentials

names = st.from_regex(r"[a-z]([a-z0-9-]{0,20}[a-z0-9])?", fullmatch=True)


@given(names, st.integers(0, 10_000))
def test_a_pod_name_splits_into_statefulset_and_ordinal(name: str, ordinal: int) -> None:
    assert split_pod_name(f"{name}-{ordinal}") == (name, ordinal)


@pytest.mark.parametrize("name", ["worker", "worker-", "-3", "worker-x3", "worker-٣", ""])
def test_a_name_without_an_ordinal_is_no_statefulset_pod(name: str) -> None:
    assert split_pod_name(name) is None


@given(st.integers(0, 300), st.integers(0, 300))
def test_a_scale_down_removes_exactly_the_pods_past_the_new_count(before: int, after: int) -> None:
    """A StatefulSet scaled from `before` to `after` pods keeps ordinals 0..after-1: each pod it
    stops is a scale-down exactly when it is not among them, whatever the direction."""
    kept = set(range(after))
    for ordinal in range(max(before, after) + 2):
        assert is_scale_down(ordinal, after) == (ordinal not in kept)


def _api(fake: FakeKubernetes, tmp_path: Path, timeout_s: float = 2.0) -> KubernetesApi:
    return KubernetesApi(fake.url, credentials(tmp_path / "sa"), timeout_s)


@pytest.mark.parametrize(("pod", "replicas", "leaving"), [
    ("kvrec-worker-3", 3, True), ("kvrec-worker-2", 3, False), ("kvrec-worker-0", 0, True),
    ("kvrec-worker-0", 1, False), ("kvrec-worker-5", 2, True),
])
def test_the_api_answer_decides(tmp_path: Path, pod: str, replicas: int, leaving: bool) -> None:
    with FakeKubernetes(replicas) as fake:
        assert scaled_down(pod, _api(fake, tmp_path)) is leaving
    assert fake.requests == ["/apis/apps/v1/namespaces/recs/statefulsets/kvrec-worker"]


def test_an_unset_replicas_is_one(tmp_path: Path) -> None:
    with FakeKubernetes(None) as fake:
        assert scaled_down("kvrec-worker-1", _api(fake, tmp_path))
        assert not scaled_down("kvrec-worker-0", _api(fake, tmp_path))


def _one_warning(caplog: pytest.LogCaptureFixture) -> str:
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in caplog.records]
    assert "keeping the static identity" in warnings[0].getMessage()
    return warnings[0].getMessage()


def test_a_forbidden_answer_is_a_restart(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with FakeKubernetes(0) as fake:
        fake.status = 403  # no RoleBinding
        assert not scaled_down("kvrec-worker-3", _api(fake, tmp_path))
    assert "HTTP 403" in _one_warning(caplog)


def test_another_statefulset_is_not_found_and_a_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with FakeKubernetes(0, name="other") as fake:
        assert not scaled_down("kvrec-worker-3", _api(fake, tmp_path))
    assert "HTTP 404" in _one_warning(caplog)


def test_no_api_is_a_restart(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    api = KubernetesApi(f"http://127.0.0.1:{port}", credentials(tmp_path / "sa"))
    assert not scaled_down("kvrec-worker-3", api)
    _one_warning(caplog)


def test_no_credentials_is_a_restart(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with FakeKubernetes(0) as fake:
        assert not scaled_down("kvrec-worker-3", KubernetesApi(fake.url, tmp_path / "none"))
    assert not fake.requests
    _one_warning(caplog)


def test_a_hung_api_is_a_restart_after_the_timeout(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with FakeKubernetes(0) as fake:
        fake.delay_s = 3.0
        started = time.monotonic()
        assert not scaled_down("kvrec-worker-3", _api(fake, tmp_path, timeout_s=0.5))
        assert time.monotonic() - started < 2.0
    _one_warning(caplog)


def test_a_pod_name_without_ordinal_is_a_restart(caplog: pytest.LogCaptureFixture) -> None:
    assert not scaled_down("laptop", KubernetesApi("http://127.0.0.1:9"))
    _one_warning(caplog)


# --- the flags ---------------------------------------------------------------------------------

def _settings(*argv: str):  # type: ignore[no-untyped-def]
    import argparse

    from kvrec.stream.worker.settings import WorkerSettings, add_worker_arguments

    parser = argparse.ArgumentParser()
    add_worker_arguments(parser)
    return WorkerSettings.from_args(parser.parse_args(["--instance-id", "kvrec-worker-0", *argv]))


def test_leave_on_scale_down_needs_a_statefulset_pod_name() -> None:
    with pytest.raises(ConfigError, match="--pod-name"):
        _settings("--leave-on-scale-down", "--pod-name", "laptop")
    assert _settings("--leave-on-scale-down", "--pod-name", "kvrec-worker-2").leave_on_scale_down


def test_the_transaction_timeout_defaults_to_60_s_and_must_exceed_the_commit_interval() -> None:
    assert _settings("--processing-guarantee", "exactly-once").transaction_timeout_ms == 60_000
    with pytest.raises(ConfigError, match="--commit-interval-ms"):
        _settings("--processing-guarantee", "exactly-once", "--commit-interval-ms", "5000",
                  "--transaction-timeout-ms", "5000")


def test_the_producer_gets_the_transaction_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    from kvrec.stream.worker import loop

    made: list[dict] = []
    monkeypatch.setattr(loop, "Producer", lambda config: made.append(config))
    monkeypatch.setattr(loop, "Consumer", lambda config: object())
    settings = _settings("--processing-guarantee", "exactly-once", "--transaction-timeout-ms",
                         "7000")
    loop.KafkaClients.create(settings, {"bootstrap.servers": "127.0.0.1:9"})
    assert made[0]["transaction.timeout.ms"] == 7000
    assert made[0]["transactional.id"] == f"{settings.group_id}-kvrec-worker-0"
