"""Which model the worker serves, and how a version is made ready to serve.

`ModelSource` says where versions come from: the model store and the `model-updates` topic
(`--model-store`, `--model-name`), with `--model` as the fallback artifact when nothing is
announced. `load_recommender` does every check a version must pass before it serves, at start
and for a hot swap alike (stream/worker/watcher.py runs it off the hot path):

1. the artifact loads and every file matches its manifest's sha256 (model/artifact.py), and the
   manifest is the one the announcement names;
2. it fits the deployment: every accepted event type maps to one of the model's (by name), the
   windows hold the history the model needs for exact refills, `--k` is within its catalog;
3. the backend and the retrieval index are built;
4. a smoke inference: the cached step equals the full pass, every output is finite.
Any failure is an `ArtifactError` that says which check and why.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvrec.errors import ArtifactError, ConfigError
from kvrec.stream.worker.settings import WorkerSettings

if TYPE_CHECKING:
    from kvrec.stream.model_updates import Announcement
    from kvrec.stream.worker.inference import Recommender

log = logging.getLogger("kvrec.worker")


class ModelRefused(ArtifactError):
    """A version that failed one of the checks: `check` names which (a metric label)."""

    def __init__(self, check: str, message: str) -> None:
        super().__init__(message)
        self.check = check


@contextmanager
def _check(name: str) -> Iterator[None]:
    try:
        yield
    except ModelRefused:
        raise
    except Exception as exc:  # every failure of a check refuses the version, whatever it is
        raise ModelRefused(name, str(exc)) from exc


@dataclass(frozen=True)
class ModelChoice:
    """A version to load: its folder and, when announced, the manifest digest it must have."""

    version: str | None  # None: `--model`, whatever version it holds
    path: Path
    manifest_sha256: str | None = None

    @classmethod
    def announced(cls, settings: WorkerSettings, version: str, manifest_sha256: str) -> ModelChoice:
        if settings.model_store is None:
            raise ConfigError("a model announcement needs --model-store")
        return cls(version, settings.model_store / settings.model_name / version, manifest_sha256)


def choice_of(settings: WorkerSettings, announcement: Announcement | None) -> ModelChoice | None:
    """What to serve at start: the announced version, else `--model`, else None (cold start)."""
    if announcement is not None:
        return ModelChoice.announced(settings, announcement.version, announcement.manifest_sha256)
    if settings.model is not None:
        return ModelChoice(None, settings.model)
    return None


def load_recommender(
    settings: WorkerSettings, choice: ModelChoice, *, cache_bytes: int | None = None,
    progress: bool = False,
) -> Recommender:
    """Load, check, build and smoke-test one version (see the module's docstring)."""
    import numpy as np

    from kvrec.model.artifact import event_type_map, load_artifact
    from kvrec.model.backends import make_backend
    from kvrec.model.store import manifest_digest
    from kvrec.state.kvpool import KVPool
    from kvrec.state.partition import group_directory
    from kvrec.stream.worker.inference import Recommender

    with _check("verify"):
        artifact = load_artifact(choice.path)
        if choice.version is not None and artifact.version != choice.version:
            raise ArtifactError(f"{choice.path}: holds version {artifact.version}, not {choice.version}")
        if choice.manifest_sha256 is not None and manifest_digest(choice.path) != choice.manifest_sha256:
            raise ArtifactError(
                f"{choice.path}/manifest.json: its sha256 is not the one announced; the stored "
                "version was replaced or corrupted after it was published"
            )
    with _check("compatibility"):
        if settings.k > artifact.config.n_items:
            raise ArtifactError(
                f"--k {settings.k} is more than the model's catalog of "
                f"{artifact.config.n_items} items"
            )
        needed = artifact.config.history_needed
        if settings.window_capacity and settings.window_capacity < needed:
            raise ArtifactError(
                f"model {artifact.version} needs {needed} stored events per user for exact cache "
                f"refills (N*(W-1)+1); the windows hold {settings.window_capacity} "
                f"(--window-capacity): restart the workers with --window-capacity {needed} or "
                "more before serving it"
            )
        event_type_map(list(settings.event_types), artifact.event_types)
    with _check("build"):
        onnx_path = settings.onnx
        if settings.backend == "onnx-cpu" and onnx_path is None:
            from kvrec.model.export import export_step

            group_dir = settings.state_dir / group_directory(settings.group_id)
            onnx_path = group_dir / f"step-{artifact.version}.onnx"
            if not onnx_path.exists():
                onnx_path.parent.mkdir(parents=True, exist_ok=True)
                export_step(artifact.encoder, onnx_path)
        backend = make_backend(settings.backend, artifact.encoder, onnx_path=onnx_path)
        item_vectors = artifact.encoder.item_embeddings().detach().float().cpu().numpy()
        retriever = build_retriever(settings, np.ascontiguousarray(item_vectors), progress)
        log.info("model %s: retrieval %s", artifact.version, retriever.build_report)
        if settings.unavailable_items is not None:
            ids = Path(settings.unavailable_items).read_text().split()
            retriever.set_unavailable(artifact.item_index[i] for i in ids if i in artifact.item_index)
        cache = KVPool(artifact.config, cache_bytes or settings.cache_bytes, device=backend.device,
                       known_per_user=max(settings.window_capacity, needed))
        recommender = Recommender(
            artifact,
            backend,
            retriever,
            cache,
            k=settings.k,
            exclude_seen=settings.exclude_seen,
            because_count=settings.because,
            reuse_cache=settings.reuse_kv_cache,
            event_types=settings.event_types,
        )
    with _check("smoke"):
        recommender.smoke_check()
    return recommender


def retrieval_kind(settings: WorkerSettings) -> str:
    """The retrieval `--retrieval` names; auto on a CUDA backend is the exact top-k on the GPU."""
    if settings.retrieval == "auto" and settings.backend == "torch-cuda":
        return "torch-exact"
    return settings.retrieval


def build_retriever(settings: WorkerSettings, item_vectors: Any, progress: bool) -> Any:
    """faiss (`model.retrieval`) or, for torch-exact, the exact top-k in torch on the backend's
    device (`model.gpu_retrieval`, imported only then: a CPU worker never loads Triton)."""
    kind = retrieval_kind(settings)
    if kind == "torch-exact":
        from kvrec.model.gpu_retrieval import TorchExactRetriever

        device = "cuda" if settings.backend == "torch-cuda" else "cpu"
        return TorchExactRetriever(item_vectors, device=device)
    from kvrec.model.retrieval import Retriever

    return Retriever(item_vectors, kind=kind, approx_threshold=settings.approx_threshold,
                     progress=progress)
