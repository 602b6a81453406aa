"""One retraining run: train a candidate warm-started from the serving model, score both on the
same held-out tail (model/decision.py), then publish and announce it or refuse it.

The serving model is the version the newest announcement of `--model-name` on
`--updates-topic` names, loaded from `--model-store`. With no announcement, the candidate is
trained from scratch with the recipe's shape flags and published (nothing to compare with).
With one, the candidate takes the serving model's shape (the shape flags are not used) and
its weights: known items keep their indices and embeddings, new items get new ones.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from kvrec.errors import ArtifactError
from kvrec.model.artifact import Artifact, load_artifact
from kvrec.model.datasets import Interaction
from kvrec.model.decision import Decision, decide
from kvrec.model.owned import NotOwned, remove_owned
from kvrec.model.store import ModelStore
from kvrec.model.train import SHAPE_FIELDS, TrainSettings, train
from kvrec.stream.model_updates import (
    LIVE_STATS_TOPIC,
    Announcement,
    Candidate,
    announce,
    first_announcement,
    latest_announcement,
    served_versions,
)
from kvrec.stream.retrain.command import REFUSED_EXIT  # noqa: F401 - kvrec retrain's, as before

log = logging.getLogger("kvrec.retrain")



@dataclass(frozen=True)
class JobSettings:
    kafka_config: Mapping[str, object]
    store: ModelStore
    updates_topic: str
    train: TrainSettings
    shape: dict[str, Any]  # ModelConfig overrides for a model trained from scratch
    margin: float
    publish_as: str  # "serve" or "shadow"
    shadow_sample: float
    work_dir: Path  # candidates are written here, then copied into the store
    progress: bool = True
    stats_topic: str = LIVE_STATS_TOPIC  # the workers' reports: what served


@dataclass(frozen=True)
class Outcome:
    decision: Decision
    announcement: Announcement | None  # what was announced (None: refused)
    events: int
    users: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.decision.to_dict(),
            "announced": self.announcement is not None,
            "announced_version": self.announcement.version if self.announcement else None,
            "announced_reason": self.announcement.reason if self.announcement else None,
            "events": self.events,
            "users_in_snapshot": self.users,
            "seconds": round(self.seconds, 1),
        }


def interactions_from_histories(histories: Mapping[str, list[list[Any]]]) -> list[Interaction]:
    """Each user's kept events ([item, event type, ts], oldest first) as interactions, user by
    user in a stable order (training needs each user's own order, nothing across users)."""
    return [
        Interaction(user, str(item), str(kind), int(ts))
        for user in sorted(histories)
        for item, kind, ts in histories[user]
    ]


def serving_model(settings: JobSettings, model_name: str) -> tuple[Announcement | None, Artifact | None]:
    announcement = latest_announcement(settings.kafka_config, model_name, settings.updates_topic)
    if announcement is None:
        return None, None
    try:
        stored = settings.store.get(announcement.version)
    except ArtifactError as exc:
        raise ArtifactError(f"the serving version named on {settings.updates_topic}: {exc}") from None
    return announcement, load_artifact(stored.path)


def run_job(interactions: list[Interaction], settings: JobSettings) -> Outcome:
    started = time.perf_counter()
    model_name = settings.store.model_name
    announcement, serving = serving_model(settings, model_name)
    shape = dict(settings.shape)
    training = settings.train
    if serving is not None:
        shape.update({name: getattr(serving.config, name) for name in SHAPE_FIELDS})
        training = replace(training, init_from=serving.path)
        log.info("warm start from the serving version %s (%d items)", serving.version,
                 serving.config.n_items)
    else:
        log.info("no announcement of model %r on %s: training from scratch", model_name,
                 settings.updates_topic)
    settings.work_dir.mkdir(parents=True, exist_ok=True)
    out = settings.work_dir / f"candidate-{time.time_ns()}"
    try:
        # the curve goes into the artifact folder, and with it into the store
        train(interactions, shape, training, out, plot_path=out / "training_curve.png",
              progress=settings.progress)
        candidate = load_artifact(out)
        decision = decide(candidate, serving, interactions, settings.margin)
        log.info("%s", decision.note())
        announced = None
        if decision.publish:
            announced = _publish(settings, candidate, decision, announcement)
    finally:
        _remove_candidate(out)  # the store holds its own copy
    users = len({i.user_id for i in interactions})
    return Outcome(decision, announced, len(interactions), users, time.perf_counter() - started)


def _remove_candidate(out: Path) -> None:
    """The candidate's folder, written under a fresh name by this job: removed when it is the
    artifact that training wrote (model/owned.py), left with a warning otherwise."""
    try:
        remove_owned(out, kind="artifact")
    except NotOwned as exc:
        log.warning("leaving the candidate folder: %s", exc)


def _publish(settings: JobSettings, candidate: Artifact, decision: Decision,
             current: Announcement | None) -> Announcement:
    stored = settings.store.publish(candidate.path)
    location = str(stored.path)
    metrics = {"tail": decision.candidate, "serving_tail": decision.serving,
               "decision": decision.verdict, **_training_figures(candidate)}
    note = decision.note()
    if current is None:
        announcement = first_announcement(settings.store.model_name, stored.version, location,
                                          stored.manifest_sha256, "retrain", metrics, note)
    elif settings.publish_as == "shadow":
        announcement = current.with_shadow(
            Candidate(stored.version, location, stored.manifest_sha256, settings.shadow_sample), note
        )
    else:
        served = served_versions(settings.kafka_config, settings.store.model_name,
                                 settings.stats_topic)
        announcement = current.serving(stored.version, location, stored.manifest_sha256,
                                       "retrain", metrics=metrics, note=note, served=served)
    announce(settings.kafka_config, announcement, settings.updates_topic)
    log.info("published %s into %s and announced it on %s (%s)", stored.version,
             settings.store.folder, settings.updates_topic,
             "shadow" if announcement.shadow else "serving")
    return announcement


def _training_figures(candidate: Artifact) -> dict[str, Any]:
    metrics = candidate.metrics
    return {key: metrics.get(key) for key in ("test", "validation", "best_epoch", "epochs_run",
                                              "train_seconds", "users")}
