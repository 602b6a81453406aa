"""The Faust app of `kvrec retrain`: an agent that keeps each user's last events in a table, a
timer (or one run once caught up) that retrains from a snapshot of it, and a web view.

    agent    consumer group --group-id (the app id) on --input-topic; each event is parsed with
             stream/schema.py (a bad one is counted and skipped: the worker dead-letters it)
             and appended to its user's list in the table `history`, cut to --history events
    table    `history`: user id -> [[item, event type, ts], ...], oldest first; the rocksdb
             store (Faust's rocksdb store on the rocksdict library) under --state-dir, with its
             changelog topic `<group id>-history-changelog` (as many partitions as the input
             topic), so a new pod with an empty disk restores it
    timer    every --interval-s: snapshot the table and run the job (stream/retrain/job.py) in
             a thread, so the agent keeps consuming while it trains
    --once   wait until every assigned partition is read up to the input topic's end offsets
             as of the start, run the job once, stop
    web      GET /retrain/ on --web-port: JSON with the progress and the last decision
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import faust
from faust.types import TP

from kvrec.errors import KvrecError
from kvrec.model.progress import progress_bar
from kvrec.stream.retrain.job import REFUSED_EXIT, Outcome, interactions_from_histories
from kvrec.stream.schema import InvalidEvent, parse_event

log = logging.getLogger("kvrec.retrain")


@dataclass
class Status:
    """What the web view shows and `--once` returns."""

    mode: str  # "once" or "timer"
    phase: str = "starting"  # starting, catching up, idle, training, stopping
    started_ms: int = field(default_factory=lambda: int(time.time() * 1000))
    events_seen: int = 0
    bad_events: dict[str, int] = field(default_factory=dict)
    users: int = 0
    positions: dict[int, int] = field(default_factory=dict)  # partition -> next offset read
    end_offsets: dict[int, int] = field(default_factory=dict)  # as of the start (--once)
    caught_up: bool = False
    runs: int = 0
    last_decision: dict[str, Any] | None = None
    last_error: str | None = None
    exit_status: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode, "phase": self.phase, "started_ms": self.started_ms,
            "events_seen": self.events_seen, "bad_events": dict(self.bad_events),
            "bad_events_total": sum(self.bad_events.values()), "users": self.users,
            "positions": {str(p): o for p, o in sorted(self.positions.items())},
            "end_offsets": {str(p): o for p, o in sorted(self.end_offsets.items())},
            "caught_up": self.caught_up, "runs": self.runs,
            "last_decision": self.last_decision, "last_error": self.last_error,
        }


@dataclass(frozen=True)
class AppSettings:
    group_id: str
    brokers: list[str]  # kafka://host:port
    credentials: Any  # faust.SASLCredentials / SSLCredentials, None for PLAINTEXT
    input_topic: str
    partitions: int  # the input topic's
    state_dir: str
    history: int
    interval_s: float
    once: bool
    web_port: int  # 0: no web server
    web_host: str
    event_types: frozenset[str]
    max_event_bytes: int
    max_future_ms: int
    progress: bool


def build_app(settings: AppSettings, end_offsets: dict[int, int],
              job: Callable[[list], Outcome], stop: Callable[[], None]) -> tuple[faust.App, Status]:
    """The app, and the status it keeps up to date. `job` runs in a thread on a snapshot's
    interactions; `end_offsets` (partition -> end offset at the start) is what --once reads
    up to; `stop` stops the worker that runs the app (--once calls it when done)."""
    status = Status(mode="once" if settings.once else "timer", end_offsets=dict(end_offsets))
    app = faust.App(
        settings.group_id,
        broker=settings.brokers,
        broker_credentials=settings.credentials,
        store="rocksdb://",
        datadir=settings.state_dir,
        key_serializer="raw",
        value_serializer="raw",
        topic_partitions=settings.partitions,
        topic_disable_leader=True,
        consumer_auto_offset_reset="earliest",
        broker_commit_interval=2.0,
        table_standby_replicas=0,
        web_enabled=settings.web_port > 0,
        web_port=max(settings.web_port, 1),
        web_bind=settings.web_host,
        web_in_thread=False,
    )
    source = app.topic(settings.input_topic, key_serializer="raw", value_serializer="raw")
    # keys: the user id's bytes (raw); values: JSON lists
    history = app.Table("history", default=list, partitions=settings.partitions, key_type=bytes)
    running = asyncio.Lock()

    @app.agent(source, name="kvrec-retrain-history")
    async def keep_history(stream: faust.StreamT) -> None:
        async for event in stream.events():
            message = event.message
            status.positions[message.partition] = message.offset + 1
            status.events_seen += 1
            try:
                parsed = parse_event(
                    message.value, message.key, event_types=settings.event_types,
                    max_bytes=settings.max_event_bytes, now_ms=int(time.time() * 1000),
                    max_future_ms=settings.max_future_ms,
                )
            except InvalidEvent as bad:
                status.bad_events[bad.reason] = status.bad_events.get(bad.reason, 0) + 1
                continue
            key = parsed.user_id.encode()
            kept = history[key]
            if not kept:
                status.users += 1
            kept.append([parsed.item_id, parsed.event_type, parsed.ts])
            history[key] = kept[-settings.history:]

    async def retrain() -> None:
        if running.locked():
            log.warning("the previous retraining run is still going: this one is skipped")
            return
        async with running:
            snapshot = {key.decode(): list(value) for key, value in history.items()}
            status.users = len(snapshot)
            interactions = interactions_from_histories(snapshot)
            status.phase, status.runs = "training", status.runs + 1
            log.info("retraining on %d events of %d users", len(interactions), len(snapshot))
            try:
                outcome = await asyncio.get_running_loop().run_in_executor(None, job, interactions)
            except KvrecError as exc:
                status.last_error, status.exit_status = str(exc), exc.exit_status
                log.error("retraining failed: %s", exc)
            except Exception as exc:  # the timer keeps going; --once exits 1
                status.last_error, status.exit_status = repr(exc), 1
                log.exception("retraining failed")
            else:
                status.last_decision, status.last_error = outcome.to_dict(), None
                status.exit_status = 0 if outcome.decision.publish else REFUSED_EXIT
            status.phase = "idle"

    @app.page("/retrain/")
    async def view(web: Any, request: Any) -> Any:
        return web.json(status.to_dict())

    if settings.once:
        @app.task
        async def once() -> None:
            await _caught_up(app, settings, status)
            await retrain()
            status.phase = "stopping"
            await app.commit(set(app.consumer.assignment()))
            stop()
    else:
        @app.task
        async def watch_progress() -> None:
            await app.tables.recovery.completed.wait()
            status.phase = "idle"

        @app.timer(interval=settings.interval_s, name="kvrec-retrain-timer")
        async def every_interval() -> None:
            if not app.tables.recovery.completed.is_set():
                log.info("the history table is still being restored: retraining waits")
                return
            await retrain()

    return app, status


async def _caught_up(app: faust.App, settings: AppSettings, status: Status) -> None:
    """Return once every input partition assigned here is read up to its end offset at the
    start: its last event processed, or nothing left to fetch (the group's committed offset is
    there already, or only transaction markers follow) and no event for a second."""
    status.phase = "catching up"
    await app.tables.recovery.completed.wait()
    bar = progress_bar(total=sum(status.end_offsets.values()), enabled=settings.progress,
                       desc="catching up", unit="event")
    seen: dict[int, tuple[int, int]] = {}  # partition -> (processed, fetched) last time
    changed: dict[int, float] = {}  # partition -> when that last changed
    try:
        while True:
            assigned = [tp for tp in app.consumer.assignment() if tp.topic == settings.input_topic]
            done, read, now = bool(assigned), 0, time.monotonic()
            for tp in assigned:
                end = status.end_offsets.get(tp.partition, 0)
                processed = status.positions.get(tp.partition, 0)
                fetched = await app.consumer.position(TP(tp.topic, tp.partition)) or 0
                if seen.get(tp.partition) != (processed, fetched):
                    seen[tp.partition], changed[tp.partition] = (processed, fetched), now
                quiet = now - changed[tp.partition] >= 1.0
                caught_up = processed >= end or (fetched >= end and quiet)
                read += end if caught_up else min(end, processed)
                done = done and caught_up
            bar.n = read
            bar.refresh()
            if done:
                status.caught_up = True
                log.info("caught up with %s: %d events read in this run, %d users in the table",
                         settings.input_topic, status.events_seen, status.users)
                return
            await asyncio.sleep(0.5)
    finally:
        bar.close()
