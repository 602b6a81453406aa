"""What every `kvrec models` action reads: the store, the newest announcement and the
workers' reports (read once per command), and how it announces a change (refused when another
announcement came in meanwhile). Also the figures an announcement carries of a version.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kvrec.errors import ConfigError, RunFailed
from kvrec.model.store import ModelStore, StoredVersion
from kvrec.stream.kafka_config import topic_names
from kvrec.stream.lifecycle.announcements import (
    Announcement,
    announce,
    ensure_model_topics,
    latest_announcement,
)
from kvrec.stream.lifecycle.live_stats import LiveRate, LiveView, WorkerReport, read_live

READ_TIMEOUT_S = 30.0  # reading a topic from a broker that answered
SUMMARY_KEYS = ("test", "validation", "popularity_test", "best_epoch", "users")


@dataclass
class Context:
    args: argparse.Namespace
    store: ModelStore
    kafka: dict[str, object]
    _live: LiveView | None = None

    def state(self) -> Announcement | None:
        """The newest announcement of the model (None: none yet); `KafkaUnreachable` (exit 1)
        when no broker answers within --connect-timeout."""
        if self.args.updates_topic not in topic_names(self.kafka, self.args.connect_timeout):
            return None
        return latest_announcement(self.kafka, self.store.model_name, self.args.updates_topic,
                                   READ_TIMEOUT_S)

    def required_state(self) -> Announcement:
        announcement = self.state()
        if announcement is None:
            raise self.nothing_serves()
        return announcement

    def nothing_serves(self) -> ConfigError:
        return ConfigError(
            f"nothing serves model {self.store.model_name!r} yet ({self.args.updates_topic} "
            "has no announcement of it): `kvrec models publish DIR --serve` first"
        )

    def live(self) -> LiveView:
        """The workers' newest reports and counters (read once per command)."""
        if self._live is None:
            if self.args.stats_topic not in topic_names(self.kafka, self.args.connect_timeout):
                self._live = LiveView({}, [])
            else:
                self._live = read_live(self.kafka, self.store.model_name, self.args.stats_topic,
                                       READ_TIMEOUT_S)
        return self._live

    def forget_live(self) -> None:
        self._live = None

    def live_rates(self) -> dict[tuple[str, str], LiveRate]:
        return self.live().rates

    def current_reports(self) -> list[WorkerReport]:
        return self.live().current(self.args.report_max_age_s)

    def served(self) -> set[str] | None:
        """The versions workers reported serving; None when no worker reports (unknown)."""
        view = self.live()
        return view.ever_served() if view.reporting() else None

    def serving_now(self, announcement: Announcement) -> str:
        """The version the workers serve (the announced one when none reported lately);
        refused (exit 1) while they serve different versions (a swap under way)."""
        versions = sorted({r.status.serving for r in self.current_reports() if r.status})
        if not versions:
            return announcement.version
        if len(versions) > 1:
            raise RunFailed(f"the workers of model {self.store.model_name!r} serve different "
                            f"versions ({', '.join(versions)}): a swap is under way, try again")
        return versions[0]

    def verified(self, version: str) -> StoredVersion:
        """The stored version, after every file's sha256 was checked against its manifest."""
        from kvrec.model.artifact import load_artifact

        stored = self.store.get(version)
        load_artifact(stored.path)  # ArtifactError naming the file that does not match
        return stored

    def announce(self, announcement: Announcement, based_on: Announcement | None) -> None:
        """Publish `announcement`, decided from `based_on`; refused (exit 1) if another
        announcement came in meanwhile (another operator, the guard), so neither undoes the
        other unseen. (Two announcers at the very same instant can still race: last one wins.)"""
        ensure_model_topics(self.kafka, self.args.updates_topic, self.args.stats_topic,
                            self.args.connect_timeout)
        newest = self.state()
        if newest != based_on:
            now = f"{newest.version} serves ({newest.reason})" if newest else "nothing serves"
            raise RunFailed(f"the announcement of model {self.store.model_name!r} changed while "
                            f"deciding (now {now}): nothing announced, run it again")
        announce(self.kafka, announcement, self.args.updates_topic, READ_TIMEOUT_S)


def summary_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The figures an announcement carries (not the per-epoch history)."""
    return {key: metrics[key] for key in SUMMARY_KEYS if key in metrics}


def key_figure(metrics: Mapping[str, Any], split: str, name: str = "ndcg@10") -> float | None:
    value = metrics.get(split)
    if isinstance(value, Mapping) and isinstance(value.get(name), int | float):
        return float(value[name])
    return None


def named_versions(announcement: Announcement | None) -> set[str]:
    """Versions an announcement names: never pruned."""
    if announcement is None:
        return set()
    named = {announcement.version, *announcement.history}
    if announcement.shadow is not None:
        named.add(announcement.shadow.version)
    return named


