"""`--retrieval torch-exact`: the exact top-k in torch on the backend's device, exclusions applied
there (the GPU worker's retrieval; on CPU here). Its recommendations equal the offline
full-forward reference, and `auto` picks it for the CUDA backend."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from kvrec.stream.worker.app import add_arguments, build_recommender
from kvrec.stream.worker.models import retrieval_kind
from kvrec.stream.worker.settings import WorkerSettings
from tests.test_worker_inference import _run, _stream
from tests.worker_fixtures import make_artifact
from tests.worker_reference import assert_matches_reference


def _settings(*flags: str) -> WorkerSettings:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return WorkerSettings.from_args(parser.parse_args(
        ["--input-topic", "events", "--metrics-port", "-1", "--k", "5", *flags]
    ))


@pytest.mark.parametrize(("per_user", "wave_size"), [(1, 7), (4, 30)])
def test_torch_exact_retrieval_matches_the_full_forward_reference(
    tmp_path: Path, per_user: int, wave_size: int
) -> None:
    artifact = make_artifact(tmp_path / "model", layers=2, window=4, n_items=300)
    recommender = build_recommender(_settings("--model", str(tmp_path / "model"),
                                              "--retrieval", "torch-exact"))
    assert recommender.retriever.build_report["kind"] == "torch-exact"
    capacity = artifact.config.history_needed
    events = list(_stream(n_users=6, n_events=150, n_items=300, seed=per_user))
    got = _run(recommender, events, capacity, wave_size, per_user=per_user)
    assert_matches_reference(got, events, artifact, capacity)


def test_auto_retrieval_is_torch_exact_on_the_cuda_backend_only() -> None:
    assert retrieval_kind(_settings("--backend", "torch-cuda")) == "torch-exact"
    assert retrieval_kind(_settings("--backend", "torch-cpu")) == "auto"
    assert retrieval_kind(_settings("--backend", "torch-cuda", "--retrieval", "ivfpq")) == "ivfpq"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_torch_exact_on_cuda_matches_cpu(tmp_path: Path) -> None:
    make_artifact(tmp_path / "model", layers=2, window=4, n_items=300)
    events = list(_stream(n_users=6, n_events=80, n_items=300, seed=5))
    answers = []
    for backend in ("torch-cpu", "torch-cuda"):
        recommender = build_recommender(_settings("--model", str(tmp_path / "model"),
                                                  "--backend", backend))
        answers.append(_run(recommender, events, 7, wave_size=9, per_user=3))
    for cpu, cuda in zip(*answers, strict=True):
        assert [i for i, _ in cpu.items] == [i for i, _ in cuda.items]
