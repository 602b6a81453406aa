"""What the workers report: live hit rates by version and role, and what each one serves.

`model-live-stats` (one partition, compacted) holds each worker's report: key =
`<model>/<instance id>`, value = per version and role (serve or shadow), the events scored and
how many of them hit the user's previous list (the prequential hit rate), and what the worker
serves: the version it serves, its shadow, the versions it served since it started, and the
announced versions it refused (with the check that failed). `live_hit_rates` sums the
counters over the workers for `kvrec models promote --require-live` and the rollback guard;
`read_live` reads what each worker serves, so `kvrec models list` shows what serves, not only
what was announced, and the rollback history holds only versions that served.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from kvrec.errors import ConfigError
from kvrec.stream.lifecycle.announcements import LIVE_STATS_TOPIC, now_ms, read_compacted


@dataclass(frozen=True)
class LiveRate:
    """Live counters of one version in one role, summed over the workers."""

    version: str
    role: str  # a ModelRole (as read from the topic)
    events: int
    hits: int

    @property
    def hit_rate(self) -> float:
        return self.hits / self.events if self.events else 0.0


@dataclass(frozen=True)
class Refusal:
    """An announced version a worker refused: the check that failed and why."""

    version: str
    manifest_sha256: str
    role: str  # a ModelRole (as read from the topic)
    check: str  # verify, compatibility, build, smoke
    error: str
    announced_ms: int  # the announcement that asked for it


@dataclass(frozen=True)
class WorkerStatus:
    """What a worker serves, as it reports it with its live counters."""

    serving: str  # the version it serves ("none": cold-start mode)
    shadow: str | None = None
    served: tuple[str, ...] = ()  # the versions it served since it started, oldest first
    refused: tuple[Refusal, ...] = ()  # announced versions it refused, oldest first


@dataclass(frozen=True)
class WorkerReport:
    instance: str
    ts_ms: int  # when the worker wrote it
    status: WorkerStatus | None  # None: a worker that does not report what it serves

    def age_s(self, now: int | None = None) -> float:
        return max(0.0, ((now if now is not None else now_ms()) - self.ts_ms) / 1000)


def live_stats_value(instance: str, counts: Mapping[tuple[str, str], tuple[int, int]],
                     status: WorkerStatus | None = None) -> bytes:
    """A worker's record: {(version, role): (events, hits)} since the worker started, and what
    it serves."""
    rows = [{"version": v, "role": r, "events": e, "hits": h} for (v, r), (e, h) in counts.items()]
    document: dict[str, Any] = {"instance": instance, "ts": now_ms(), "rates": rows}
    if status is not None:
        document.update(serving=status.serving, shadow=status.shadow, served=list(status.served),
                        refused=[asdict(r) for r in status.refused])
    return json.dumps(document).encode()


@dataclass(frozen=True)
class LiveView:
    """The workers' newest records of one model: counters summed, and each worker's report."""

    rates: dict[tuple[str, str], LiveRate]
    reports: list[WorkerReport]

    def current(self, max_age_s: float, now: int | None = None) -> list[WorkerReport]:
        """The reports of workers that say what they serve and reported within `max_age_s`."""
        return [r for r in self.reports
                if r.status is not None and r.age_s(now) <= max_age_s]

    def ever_served(self) -> set[str]:
        """Every version a worker reported serving, in any of the newest records."""
        served: set[str] = set()
        for report in self.reports:
            if report.status is not None:
                served.update(report.status.served)
                served.add(report.status.serving)
        return served

    def reporting(self) -> bool:
        """Some worker reports what it serves (else the CLI cannot tell what served)."""
        return any(r.status is not None for r in self.reports)


def read_live(kafka_config: Mapping[str, object], model: str, topic: str = LIVE_STATS_TOPIC,
              timeout_s: float = 30.0) -> LiveView:
    totals: dict[tuple[str, str], list[int]] = {}
    reports: list[WorkerReport] = []
    prefix = f"{model}/".encode()
    for key, value in read_compacted(kafka_config, topic, timeout_s).items():
        if not key.startswith(prefix):
            continue
        try:
            document = json.loads(value)
            for row in document["rates"]:
                counts = totals.setdefault((str(row["version"]), str(row["role"])), [0, 0])
                counts[0] += int(row["events"])
                counts[1] += int(row["hits"])
        except (ValueError, KeyError, TypeError):
            continue  # a record of another format: not ours to judge
        instance = key[len(prefix):].decode("utf-8", "replace")
        reports.append(WorkerReport(instance, _int(document.get("ts")), _status(document)))
    rates = {key: LiveRate(key[0], key[1], e, h) for key, (e, h) in totals.items()}
    return LiveView(rates, sorted(reports, key=lambda r: r.instance))


def _int(value: object) -> int:
    return value if isinstance(value, int) else 0


def _status(document: Mapping[str, Any]) -> WorkerStatus | None:
    """The serving part of a worker's record; None when it has none (an older worker)."""
    serving = document.get("serving")
    if not isinstance(serving, str):
        return None
    try:
        refused = tuple(Refusal(str(r["version"]), str(r["manifest_sha256"]), str(r["role"]),
                                str(r["check"]), str(r["error"]), int(r["announced_ms"]))
                        for r in document.get("refused") or ())
        shadow = document.get("shadow")
        return WorkerStatus(serving, str(shadow) if shadow else None,
                            tuple(str(v) for v in document.get("served") or ()), refused)
    except (KeyError, TypeError, ValueError):
        return WorkerStatus(serving)


def served_versions(kafka_config: Mapping[str, object], model: str,
                    topic: str = LIVE_STATS_TOPIC, timeout_s: float = 30.0) -> set[str] | None:
    """The versions the workers reported serving; None when none reports (or the topic cannot
    be read): then the announcer cannot tell, and takes the announced version to have served."""
    try:
        view = read_live(kafka_config, model, topic, timeout_s)
    except ConfigError:
        return None
    return view.ever_served() if view.reporting() else None


def live_hit_rates(kafka_config: Mapping[str, object], model: str,
                   topic: str = LIVE_STATS_TOPIC, timeout_s: float = 30.0) -> dict[tuple[str, str], LiveRate]:
    """{(version, role): LiveRate} summed over every worker's newest record of `model`."""
    return read_live(kafka_config, model, topic, timeout_s).rates
