"""Which model version serves: the compacted `model-updates` topic, and how both model topics
are read and written.

`model-updates` (one partition, compacted) holds one record per model name: key = the name,
value = an `Announcement` in JSON: the version that serves, where it is, its manifest digest,
its metrics, the reason for the change (retrain, promote, rollback, auto_rollback, shadow),
an optional shadow candidate, and the versions that served before (newest first: what
`kvrec models rollback` goes back to). The newest record is the whole desired state, so a
worker that starts reads it and serves that version, and compaction loses nothing it needs.

`put` and `read_compacted` write and read a one-partition compacted topic: this one and
`model-live-stats` (stream/lifecycle/live_stats.py, the workers' reports).
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
