"""Which model version serves: the compacted `model-updates` topic, and the live hit rates.

`model-updates` (one partition, compacted) holds one record per model name: key = the name,
value = an `Announcement` in JSON: the version that serves, where it is, its manifest digest,
its metrics, the reason for the change (retrain, promote, rollback, auto_rollback, shadow),
an optional shadow candidate, and the versions that served before (newest first: what
`kvrec models rollback` goes back to). The newest record is the whole desired state, so a
worker that starts reads it and serves that version, and compaction loses nothing it needs.

`model-live-stats` (one partition, compacted) holds each worker's report: key =
`<model>/<instance id>`, value = per version and role (serve or shadow), the events scored and
how many of them hit the user's previous list (the prequential hit rate), and what the worker
serves: the version it serves, its shadow, the versions it served since it started, and the
announced versions it refused (with the check that failed). `live_hit_rates` sums the
counters over the workers for `kvrec models promote --require-live` and the rollback guard;
`worker_reports` reads what each worker serves, so `kvrec models list` shows what serves,
not only what was announced, and the rollback history holds only versions that served.
"""

from __future__ import annotations

import json
import time
from collections.abc import Container, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Producer,
    TopicPartition,
)

from kvrec.errors import ConfigError
from kvrec.stream.kafka_config import ensure_topics, kafka_error_text

UPDATES_TOPIC = "model-updates"
LIVE_STATS_TOPIC = "model-live-stats"
REASONS = ("retrain", "promote", "rollback", "auto_rollback", "shadow", "publish")
HISTORY_LENGTH = 10  # served versions remembered for rollbacks


@dataclass(frozen=True)
class Candidate:
    """A version scored beside the serving one on a sample of live events, never published."""

    version: str
    location: str
    manifest_sha256: str
    sample: float = 0.1  # share of users it scores


@dataclass(frozen=True)
class Announcement:
    model: str
    version: str
    location: str  # the version folder as the announcer saw it (workers use their own mount)
    manifest_sha256: str
    reason: str
    metrics: dict[str, Any] = field(default_factory=dict)
    note: str = ""  # why, in words (the refusal figures of a guard, the operator's comment)
    shadow: Candidate | None = None
    history: tuple[str, ...] = ()  # versions that served before this one, newest first
    announced_ms: int = 0

    def to_json(self) -> bytes:
        document = asdict(self)
        document["history"] = list(self.history)
        return json.dumps(document, sort_keys=True).encode()

    @classmethod
    def from_json(cls, value: bytes) -> Announcement:
        """Raises ValueError on anything that is not an announcement."""
        try:
            document = json.loads(value)
            shadow = document.get("shadow")
            announcement = cls(
                model=str(document["model"]),
                version=str(document["version"]),
                location=str(document["location"]),
                manifest_sha256=str(document["manifest_sha256"]),
                reason=str(document["reason"]),
                metrics=dict(document.get("metrics") or {}),
                note=str(document.get("note", "")),
                shadow=Candidate(**shadow) if shadow else None,
                history=tuple(str(v) for v in document.get("history", ())),
                announced_ms=int(document.get("announced_ms", 0)),
            )
        except (TypeError, KeyError, AttributeError) as exc:
            raise ValueError(f"not a model announcement: {exc!r}") from None
        if not announcement.version or "/" in announcement.version:
            raise ValueError(f"not a model announcement: version {announcement.version!r}")
        return announcement

    def serving(self, version: str, location: str, manifest_sha256: str, reason: str, *,
                metrics: Mapping[str, Any] | None = None, note: str = "",
                served: Container[str] | None = None) -> Announcement:
        """The announcement that makes `version` serve after this one (the shadow ends).

        The history holds the versions that served: this one's version enters it only if it
        is in `served` (the versions the workers reported serving; None: unknown, it is taken
        to have served). A version every worker refused never becomes a rollback target."""
        history = self.history
        if version != self.version:
            came = served is None or self.version in served
            history = (*((self.version,) if came else ()),
                       *[v for v in self.history if v != version])[:HISTORY_LENGTH]
        return Announcement(self.model, version, location, manifest_sha256, reason,
                            dict(metrics or {}), note, None, history, now_ms())

    def rolled_back(self, version: str, location: str, manifest_sha256: str, reason: str, *,
                    metrics: Mapping[str, Any] | None = None, note: str = "") -> Announcement:
        """Serve `version`, one of the history, again: it and every version newer than it leave
        the history, and so does the version rolled back from, so the next rollback goes
        further back (it never toggles between two versions)."""
        place = self.history.index(version)  # ValueError: not in the history
        return Announcement(self.model, version, location, manifest_sha256, reason,
                            dict(metrics or {}), note, None, self.history[place + 1:], now_ms())

    def with_shadow(self, candidate: Candidate | None, note: str = "") -> Announcement:
        return Announcement(self.model, self.version, self.location, self.manifest_sha256,
                            "shadow", self.metrics, note, candidate, self.history, now_ms())


def first_announcement(model: str, version: str, location: str, manifest_sha256: str,
                       reason: str, metrics: Mapping[str, Any] | None = None,
                       note: str = "") -> Announcement:
    return Announcement(model, version, location, manifest_sha256, reason, dict(metrics or {}),
                        note, None, (), now_ms())


def now_ms() -> int:
    return int(time.time() * 1000)


def topic_specs(updates_topic: str = UPDATES_TOPIC,
                stats_topic: str = LIVE_STATS_TOPIC) -> dict[str, tuple[int, dict[str, str]]]:
    compacted = {"cleanup.policy": "compact"}
    return {updates_topic: (1, compacted), stats_topic: (1, compacted)}


def ensure_model_topics(kafka_config: Mapping[str, object], updates_topic: str = UPDATES_TOPIC,
                        stats_topic: str = LIVE_STATS_TOPIC, timeout_s: float = 30.0) -> None:
    ensure_topics(kafka_config, topic_specs(updates_topic, stats_topic), timeout_s)


def announce(kafka_config: Mapping[str, object], announcement: Announcement,
             topic: str = UPDATES_TOPIC, timeout_s: float = 30.0) -> None:
    """Publish and wait until the broker has it; raises ConfigError if it cannot."""
    put(kafka_config, topic, announcement.model.encode(), announcement.to_json(), timeout_s)


def put(kafka_config: Mapping[str, object], topic: str, key: bytes, value: bytes,
        timeout_s: float = 30.0) -> None:
    producer = Producer({**kafka_config, "enable.idempotence": True, "linger.ms": 0})
    errors: list[str] = []

    def delivered(error: object, message: object) -> None:
        if error is not None:
            errors.append(str(error))

    producer.produce(topic, key=key, value=value, on_delivery=delivered)
    left = producer.flush(timeout_s)
    if errors or left:
        raise ConfigError(f"could not publish to {topic}: {errors[0] if errors else 'timed out'}")


def read_compacted(kafka_config: Mapping[str, object], topic: str,
                   timeout_s: float = 30.0) -> dict[bytes, bytes]:
    """The newest value of every key of a one-partition topic (read from the start to its end)."""
    consumer = Consumer({
        **kafka_config,
        "group.id": "kvrec-model-updates-reader",  # never commits: assign() needs a group id
        "enable.auto.commit": False,
        "enable.partition.eof": True,
        "isolation.level": "read_committed",
    })
    latest: dict[bytes, bytes] = {}
    deadline = time.monotonic() + timeout_s
    try:
        low, high = _watermarks(consumer, topic, deadline)
        if high <= low:
            return latest
        consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
        position = low
        while position < high:
            if time.monotonic() > deadline:
                raise ConfigError(f"reading {topic} timed out at offset {position} of {high}")
            message = consumer.poll(0.5)
            if message is None:
                continue
            if message.error() is not None:
                if message.error().code() == -191:  # _PARTITION_EOF: past a transaction marker
                    break
                raise ConfigError(f"cannot read {topic}: {message.error()}")
            position = message.offset() + 1
            key = message.key() or b""
            if message.value() is None:
                latest.pop(key, None)  # a tombstone
            else:
                latest[key] = message.value()
    finally:
        consumer.close()
    return latest


# a partition just created (or moving) has no leader for a moment: asked again until the deadline
# (a topic that does not exist is refused at once)
TRANSIENT = frozenset({KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.LEADER_NOT_AVAILABLE,
                       KafkaError._TRANSPORT})


def _watermarks(consumer: Consumer, topic: str, deadline: float) -> tuple[int, int]:
    while True:
        try:
            left = max(0.1, deadline - time.monotonic())
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, 0), timeout=left)
            return int(low), int(high)
        except KafkaException as exc:
            error = exc.args[0] if exc.args else None
            transient = isinstance(error, KafkaError) and error.code() in TRANSIENT
            if not transient or time.monotonic() + 0.2 > deadline:
                raise ConfigError(f"cannot read {topic}: {kafka_error_text(exc)}") from None
            time.sleep(0.2)


def latest_announcement(kafka_config: Mapping[str, object], model: str,
                        topic: str = UPDATES_TOPIC, timeout_s: float = 30.0) -> Announcement | None:
    value = read_compacted(kafka_config, topic, timeout_s).get(model.encode())
    if value is None:
        return None
    try:
        return Announcement.from_json(value)
    except ValueError as exc:
        raise ConfigError(f"{topic}: the record of model {model!r} is unreadable: {exc}") from None


@dataclass(frozen=True)
class LiveRate:
    """Live counters of one version in one role, summed over the workers."""

    version: str
    role: str  # "serve" or "shadow"
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
    role: str  # "serve" or "shadow"
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
