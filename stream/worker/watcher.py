"""The model watcher: follows the `model-updates` topic and prepares each new version off the
hot path, so that the loop only has to swap between two micro-batches.

For each new announcement of the worker's model (`--model-name`), in a background thread:
load the version from the store and run every check (stream/worker/models.py: sha256 of every
file against the announced manifest, event types and history against the deployment, backend
and retrieval index, smoke inference), then pre-warm the key/value caches of the most recently
active users from their stored windows (the loop hands it snapshots between two batches), and
hand the ready recommender to the loop. A shadow candidate is prepared the same way, without
the pre-warm. A version that fails is refused: logged, counted in
`kvrec_model_refusals{check}`, and never retried for the same announcement; the serving model
stays. A version whose folder is not on this worker's mount yet (shared storage that shows it
later) is not refused: it is tried again every `missing_retry_s`. Only the newest
announcement counts: intermediate ones that arrive during a prepare are skipped.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, Producer, TopicPartition

from state.window import WindowSnapshot
from stream.model_updates import Announcement, Candidate, live_stats_value
from stream.worker.metrics import WorkerMetrics
from stream.worker.models import ModelChoice, ModelRefused, load_recommender
from stream.worker.settings import WorkerSettings

log = logging.getLogger("kvrec.worker")

WindowsProvider = Callable[[int], list[tuple[str, WindowSnapshot]]]


@dataclass(frozen=True)
class Prepared:
    """A version ready to swap in: `role` serve (it replaces the serving model) or shadow."""

    role: str
    recommender: object | None  # a Recommender; None for "stop the shadow"
    announcement: Announcement
    share: float = 0.0  # shadow: the share of users it scores


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
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.serving_key = _serve_key(serving)  # what serves now, as announced
        self.shadow_key: tuple[str, str] | None = None  # no shadow until one is prepared
        self.refused: set[tuple[str, str]] = set()
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
        return ready

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
                                        value=live_stats_value(self.settings.instance_id, counts))
            self.stats_producer.poll(0)
        except (KafkaException, BufferError) as exc:  # statistics only: the next one catches up
            log.warning("could not publish the live hit rates: %s", exc)

    # --- the thread ----------------------------------------------------------------------------
    def _run(self) -> None:
        newest: Announcement | None = None
        while not self._stop.is_set():
            try:
                message = self.consumer.poll(self.poll_s)
            except Exception as exc:  # never let the watcher die: log, wait, go on
                log.warning("model watcher: %r", exc)
                time.sleep(self.poll_s)
                continue
            if message is not None:
                if message.error() is not None:
                    log.warning("model watcher: %s", message.error())
                    continue
                if (message.key() or b"") != self.settings.model_name.encode() or message.value() is None:
                    continue
                try:
                    newest, self._acted = Announcement.from_json(message.value()), False
                except ValueError as exc:
                    log.error("model watcher: %s: offset %d: %s", self.settings.updates_topic,
                              message.offset(), exc)
                    self.metrics.model_refusals.labels("announcement").inc()
                continue  # read on: only the newest counts
            retry_due = self._retry_at is not None and time.monotonic() >= self._retry_at
            if newest is not None and (not self._acted or retry_due):  # caught up
                self._acted, self._retry_at = True, None
                self._act(newest)

    def _act(self, announcement: Announcement) -> None:
        serve_key = _serve_key(announcement)
        new_serving = serve_key != self.serving_key and serve_key not in self.refused
        if new_serving and self._prepare_serving(announcement):
            self.serving_key = serve_key
            self.shadow_key = None  # the new serving model starts without a shadow
        shadow_key = _shadow_key(announcement)
        new_shadow = shadow_key != self.shadow_key and shadow_key not in self.refused
        if new_shadow and self._prepare_shadow(announcement):
            self.shadow_key = shadow_key

    def _prepare_serving(self, announcement: Announcement) -> bool:
        started = time.perf_counter()
        choice = ModelChoice.announced(self.settings, announcement.version,
                                       announcement.manifest_sha256)
        log.info("model %s announced (%s%s): preparing it", announcement.version,
                 announcement.reason, f": {announcement.note}" if announcement.note else "")
        recommender = self._load(choice, _serve_key(announcement))
        if recommender is None:
            return False
        warmed = recommender.prewarm(self._recent_windows())  # type: ignore[attr-defined]
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
            _candidate_key(candidate), cache_bytes,
        )
        if recommender is None:
            return False
        self._hand_over(Prepared("shadow", recommender, announcement, share))
        return True

    def _load(
        self, choice: ModelChoice, key: tuple[str, str], cache_bytes: int | None = None
    ) -> object | None:
        if not choice.path.is_dir():  # not visible on this mount yet (shared storage): wait
            log.warning("model %s is announced but %s is not there yet: retrying in %.0f s",
                        choice.version, choice.path, self.missing_retry_s)
            self._retry_at = time.monotonic() + self.missing_retry_s
            return None
        try:
            return load_recommender(self.settings, choice, cache_bytes=cache_bytes)
        except ModelRefused as refused:
            self.refused.add(key)
            self.metrics.model_refusals.labels(refused.check).inc()
            log.error("model %s refused (%s check), the serving model stays: %s", choice.version,
                      refused.check, refused)
            return None

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
