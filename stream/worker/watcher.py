"""The model watcher: follows the `model-updates` topic and prepares each new version off the
hot path, so that the loop only has to swap between two micro-batches.

For each new announcement of the worker's model (`--model-name`), in a background thread:
load the version from the store and run every check (stream/worker/models.py: sha256 of every
file against the announced manifest, event types and history against the deployment, backend
and retrieval index, smoke inference), then pre-warm the key/value caches of the most recently
active users from their stored windows (the loop hands it snapshots between two batches), and
hand the ready recommender to the loop. A shadow candidate is prepared the same way, without
the pre-warm. A version that fails is refused: logged, counted in
`kvrec_model_refusals{check}`, reported, and not tried again for the same announcement (a
record that only changes the shadow does not retry a refused serving version, nor the other
way round: it is skipped, and the log says so); the serving model stays. Announced again (a
new record that names it: a repaired folder, `kvrec models promote` again), it is tried
again, and the log says which way it went. A version whose folder is not on this worker's
mount yet (shared storage that shows it later) is not refused: it is tried again every
`missing_retry_s`. Only the newest announcement counts: the ones that arrive while another
is read are skipped, and a version being prepared that a newer announcement replaces before
it is ready is dropped, never swapped in (two quick rollbacks do not serve the version in
between).

With its live counters (every `--stats-interval-ms`), the worker reports what it serves on the
stats topic: the version, the shadow, the versions it served since it started, the versions
it refused and why (stream/model_updates.py `WorkerStatus`): what `kvrec models list` shows.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)

from kvrec.state.window import WindowSnapshot
from kvrec.stream.model_updates import (
    Announcement,
    Candidate,
    Refusal,
    WorkerStatus,
    live_stats_value,
)
from kvrec.stream.worker.metrics import WorkerMetrics
from kvrec.stream.worker.models import ModelChoice, ModelRefused, load_recommender
from kvrec.stream.worker.settings import WorkerSettings

log = logging.getLogger("kvrec.worker")

WindowsProvider = Callable[[int], list[tuple[str, WindowSnapshot]]]


@dataclass(frozen=True)
class Prepared:
    """A version ready to swap in: `role` serve (it replaces the serving model) or shadow."""

    role: str
    recommender: object | None  # a Recommender; None for "stop the shadow"
    announcement: Announcement
    share: float = 0.0  # shadow: the share of users it scores


class _Superseded(Exception):
    """A newer announcement replaced the one being prepared: drop what was prepared."""


REPORTED = 20  # served and refused versions a worker's report keeps (the newest)


class ModelWatcher:
    poll_s = 0.5
    missing_retry_s = 10.0  # an announced version whose folder is not on the mount yet
    windows_wait_s = 30.0  # how long a prepare waits for the loop to hand over windows

    def __init__(
        self,
        settings: WorkerSettings,
        kafka_config: Mapping[str, object],
        metrics: WorkerMetrics,
        serving: Announcement | None,
        serving_version: str | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.serving_key = _serve_key(serving)  # what serves now, as announced
        self.shadow_key: tuple[str, str] | None = None  # no shadow until one is prepared
        # refused versions: the `announced_ms` of the announcement that asked for each
        self.refused: dict[tuple[str, str], int] = {}
        # what the loop serves, as taken (reported with the live counters)
        live = serving_version or (serving.version if serving is not None else "none")
        self._live_serving, self._live_shadow = live, None
        self._served: list[str] = [live]
        self._refusals: list[Refusal] = []
        self._newest: Announcement | None = None
        self.consumer = Consumer({
            **kafka_config,
            "group.id": f"{settings.group_id}-model-watcher",  # assign() only: never commits
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
        })
        self.stats_producer = Producer({**kafka_config, "linger.ms": 100})
        self._ready: list[Prepared] = []
        self._lock = threading.Lock()
        self._windows_wanted = 0
        self._windows: list[tuple[str, WindowSnapshot]] | None = None
        self._windows_given = threading.Event()
        self._stop = threading.Event()
        self._acted = False  # the newest announcement read has been acted on
        self._retry_at: float | None = None  # when to try an announced version not there yet
        self._thread = threading.Thread(target=self._run, name="kvrec-model-watcher", daemon=True)

    # --- the loop's side ---------------------------------------------------------------------
    def start(self) -> None:
        self.consumer.assign([TopicPartition(self.settings.updates_topic, 0, OFFSET_BEGINNING)])
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._windows_given.set()
        self._thread.join(timeout=60.0)
        self.consumer.close()
        self.stats_producer.flush(5.0)

    def take(self) -> list[Prepared]:
        """The versions ready to swap in, in the order they became ready (the loop's turn)."""
        if not self._ready:
            return []
        with self._lock:
            ready, self._ready = self._ready, []
        for prepared in ready:  # the loop swaps each in now
            version = getattr(prepared.recommender, "version", None)
            if prepared.role == "serve" and version is not None:
                self._live_serving, self._live_shadow = str(version), None
                self._served = [v for v in self._served if v != version][-(REPORTED - 1):]
                self._served.append(str(version))
            elif prepared.role == "shadow":
                self._live_shadow = str(version) if version is not None else None
        return ready

    def status(self) -> WorkerStatus:
        """What this worker serves (the loop's view, once it took what was ready)."""
        with self._lock:
            refusals = tuple(self._refusals)
        return WorkerStatus(self._live_serving, self._live_shadow, tuple(self._served), refusals)

    def give_windows(self, provider: WindowsProvider) -> None:
        """If a prepare waits for windows to pre-warm, hand it the most recent ones (the loop's
        turn: the windows are the loop's, so it takes the snapshots)."""
        wanted = self._windows_wanted
        if wanted:
            self._windows_wanted = 0
            self._windows = provider(wanted)
            self._windows_given.set()

    def publish_stats(self, counts: Mapping[tuple[str, str], tuple[int, int]]) -> None:
        key = f"{self.settings.model_name}/{self.settings.instance_id}".encode()
        try:
            self.stats_producer.produce(self.settings.stats_topic, key=key,
                                        value=live_stats_value(self.settings.instance_id, counts,
                                                               self.status()))
            self.stats_producer.poll(0)
        except (KafkaException, BufferError) as exc:  # statistics only: the next one catches up
            log.warning("could not publish the live hit rates: %s", exc)

    # --- the thread ----------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                message = self.consumer.poll(self.poll_s)
            except Exception as exc:  # never let the watcher die: log, wait, go on
                log.warning("model watcher: %r", exc)
                time.sleep(self.poll_s)
                continue
            if message is not None:
                self._read(message)
                continue  # read on: only the newest counts
            retry_due = self._retry_at is not None and time.monotonic() >= self._retry_at
            newest = self._newest
            if newest is not None and (not self._acted or retry_due):  # caught up
                self._acted, self._retry_at = True, None
                with contextlib.suppress(_Superseded):  # the newest is acted on next turn
                    self._act(newest)

    def _read(self, message: Message) -> None:
        if message.error() is not None:
            log.warning("model watcher: %s", message.error())
            return
        key, value = message.key(), message.value()
        if (key or b"") != self.settings.model_name.encode() or value is None:
            return
        try:
            self._newest, self._acted = Announcement.from_json(value), False
        except ValueError as exc:
            log.error("model watcher: %s: offset %d: %s", self.settings.updates_topic,
                      message.offset(), exc)
            self.metrics.model_refusals.labels("announcement").inc()

    def _check_current(self, announcement: Announcement, role: str) -> None:
        """Read what came in meanwhile; raise `_Superseded` if a newer announcement changes
        what `role` should be (the version being prepared would serve for nothing)."""
        while True:
            message = self.consumer.poll(0)
            if message is None:
                break
            self._read(message)
        newest = self._newest
        if newest is None or newest is announcement:
            return
        key = _serve_key if role == "serve" else _shadow_key
        if key(newest) != key(announcement):
            version = (announcement.version if role == "serve"
                       else announcement.shadow.version if announcement.shadow else "none")
            log.info("model %s (%s) superseded by a newer announcement (%s serves%s) before it "
                     "was ready: dropped", version, role, newest.version,
                     f", {newest.shadow.version} shadows" if newest.shadow else "")
            raise _Superseded

    def _may_try(self, key: tuple[str, str] | None, announcement: Announcement, role: str) -> bool:
        """A version refused before is tried again only for a new announcement that names it
        for this role; otherwise it is skipped, and the log says so."""
        if key is None or key not in self.refused:
            return True
        decided = (announcement.reason == "shadow") == (role == "shadow")
        if decided and self.refused[key] != announcement.announced_ms:
            log.info("model %s (%s) was refused before and is announced again: trying it again",
                     key[0], role)
            return True
        log.info("model %s (%s) was refused for this announcement before: skipped (announce it "
                 "again to retry)", key[0], role)
        return False

    def _act(self, announcement: Announcement) -> None:
        serve_key = _serve_key(announcement)
        new_serving = serve_key != self.serving_key and self._may_try(serve_key, announcement, "serve")
        if new_serving and self._prepare_serving(announcement):
            self.serving_key = serve_key
            self.shadow_key = None  # the new serving model starts without a shadow
        shadow_key = _shadow_key(announcement)
        new_shadow = (shadow_key != self.shadow_key
                      and self._may_try(shadow_key, announcement, "shadow"))
        if new_shadow and self._prepare_shadow(announcement):
            self.shadow_key = shadow_key

    def _prepare_serving(self, announcement: Announcement) -> bool:
        started = time.perf_counter()
        choice = ModelChoice.announced(self.settings, announcement.version,
                                       announcement.manifest_sha256)
        log.info("model %s announced (%s%s): preparing it", announcement.version,
                 announcement.reason, f": {announcement.note}" if announcement.note else "")
        recommender = self._load(choice, _serve_key(announcement), announcement, "serve")
        if recommender is None:
            return False
        self._check_current(announcement, "serve")
        warmed = recommender.prewarm(self._recent_windows())  # type: ignore[attr-defined]
        self._check_current(announcement, "serve")
        self.metrics.model_prepare_seconds.observe(time.perf_counter() - started)
        log.info("model %s ready in %.1f s (%d users' caches pre-warmed): swapping",
                 announcement.version, time.perf_counter() - started, warmed)
        self._hand_over(Prepared("serve", recommender, announcement))
        return True

    def _prepare_shadow(self, announcement: Announcement) -> bool:
        candidate = announcement.shadow
        if candidate is None:
            self._hand_over(Prepared("shadow", None, announcement))
            return True
        log.info("shadow model %s announced (%.0f%% of users): preparing it", candidate.version,
                 100 * candidate.sample)
        share = min(1.0, max(0.0, candidate.sample))
        cache_bytes = max(16 << 20, int(self.settings.cache_bytes * share))
        recommender = self._load(
            ModelChoice.announced(self.settings, candidate.version, candidate.manifest_sha256),
            _candidate_key(candidate), announcement, "shadow", cache_bytes,
        )
        if recommender is None:
            return False
        self._check_current(announcement, "shadow")
        self._hand_over(Prepared("shadow", recommender, announcement, share))
        return True

    def _load(
        self, choice: ModelChoice, key: tuple[str, str], announcement: Announcement, role: str,
        cache_bytes: int | None = None,
    ) -> object | None:
        if not choice.path.is_dir():  # not visible on this mount yet (shared storage): wait
            log.warning("model %s is announced but %s is not there yet: retrying in %.0f s",
                        choice.version, choice.path, self.missing_retry_s)
            self._retry_at = time.monotonic() + self.missing_retry_s
            return None
        try:
            recommender = load_recommender(self.settings, choice, cache_bytes=cache_bytes)
        except ModelRefused as refused:
            self.refused[key] = announcement.announced_ms
            self.metrics.model_refusals.labels(refused.check).inc()
            log.error("model %s refused (%s check), the serving model stays: %s", choice.version,
                      refused.check, refused)
            with self._lock:
                self._refusals = [r for r in self._refusals if (r.version, r.manifest_sha256) != key]
                self._refusals = [*self._refusals[-(REPORTED - 1):], Refusal(
                    key[0], key[1], role, refused.check, str(refused), announcement.announced_ms)]
            return None
        with self._lock:  # it passed: no longer a refused version
            self._refusals = [r for r in self._refusals if (r.version, r.manifest_sha256) != key]
        self.refused.pop(key, None)
        return recommender

    def _recent_windows(self) -> Sequence[tuple[str, WindowSnapshot]]:
        if not self.settings.prewarm_users:
            return []
        self._windows_given.clear()
        self._windows_wanted = self.settings.prewarm_users
        if not self._windows_given.wait(self.windows_wait_s):
            self._windows_wanted = 0
            log.warning("the loop did not hand over windows to pre-warm within %.0f s: none warmed",
                        self.windows_wait_s)
            return []
        windows, self._windows = self._windows or [], None
        return windows

    def _hand_over(self, prepared: Prepared) -> None:
        with self._lock:
            self._ready.append(prepared)


def _serve_key(announcement: Announcement | None) -> tuple[str, str] | None:
    return (announcement.version, announcement.manifest_sha256) if announcement else None


def _candidate_key(candidate: Candidate) -> tuple[str, str]:
    return (candidate.version, candidate.manifest_sha256)


def _shadow_key(announcement: Announcement | None) -> tuple[str, str] | None:
    if announcement is None or announcement.shadow is None:
        return None
    return _candidate_key(announcement.shadow)
