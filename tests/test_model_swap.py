"""Hot model swap: the checks a version passes before it serves, the exact pre-warm, event
types mapped by name, cold-start mode, shadow scoring; the worker against the real broker."""

from __future__ import annotations

import itertools
import json
import random
import time
from pathlib import Path

import pytest

from kvrec.errors import ArtifactError
from kvrec.model.artifact import load_artifact
from kvrec.model.backends import make_backend
from kvrec.model.datasets import Interaction
from kvrec.model.retrieval import Retriever
from kvrec.model.store import ModelStore, StoredVersion
from kvrec.model.train import TrainSettings, train
from kvrec.state.window import Window, WindowEvent
from kvrec.stream.cli import main as kvrec
from kvrec.stream.model_updates import (
    Announcement,
    Candidate,
    announce,
    ensure_model_topics,
    first_announcement,
    latest_announcement,
    live_hit_rates,
)
from kvrec.stream.worker.inference import Recommender, WaveInput
from kvrec.stream.worker.models import ModelChoice, ModelRefused, load_recommender
from kvrec.stream.worker.settings import WorkerSettings
from tests.conftest import unique_topic
from tests.test_worker_reliability import OnePartition
from tests.worker_fixtures import EVENT_TYPES, make_artifact
from tests.worker_inprocess import ThreadWorker

CATALOG = 40


def _recommender(path: Path, event_types: list[str] | None = None) -> Recommender:
    artifact = load_artifact(path)
    vectors = artifact.encoder.item_embeddings().detach().float().numpy()
    return Recommender(
        artifact, make_backend("torch-cpu", artifact.encoder), Retriever(vectors, kind="exact"),
        1 << 26, k=5, event_types=event_types,
    )


def _window(rng: random.Random, capacity: int, types: int, offset: int) -> Window:
    window = Window(capacity)
    for j in range(rng.randrange(1, 12)):
        window.apply(WindowEvent(f"sku-{rng.randrange(1, 61)}", rng.randrange(1, types + 1),
                                 1_000 + j, offset + j))
    return window


def _wave(windows: dict[str, Window], rng: random.Random, types: int) -> list[WaveInput]:
    wave = []
    for user, window in windows.items():
        before = window.snapshot()
        new = [WindowEvent(f"sku-{rng.randrange(1, 61)}", rng.randrange(1, types + 1), 9_000 + j,
                           10_000 + j) for j in range(rng.randrange(1, 4))]
        wave.append(WaveInput(user, before.events, new, window.capacity, before.first_index))
    return wave


def _lists(recommender: Recommender, wave: list[WaveInput]) -> list[list[tuple[str, float]]]:
    scored, _ = recommender.recommend(wave)
    return [result.items for result in scored]


# --- event types: by name, never by position ---------------------------------------------------
def test_event_types_are_mapped_by_name_whatever_the_deployment_order(tmp_path: Path) -> None:
    path = make_artifact(tmp_path / "m", n_items=60, window=4, seed=3).path
    reordered = [EVENT_TYPES[i] for i in (3, 0, 2, 1)]
    rng = random.Random(7)
    own_windows = {f"u{u}": _window(rng, 7, 4, 0) for u in range(12)}
    wave_own = _wave(own_windows, rng, 4)

    def to_deployment(event: WindowEvent) -> WindowEvent:  # the same event, stored by position
        index = reordered.index(EVENT_TYPES[event.event_type - 1]) + 1
        return WindowEvent(event.item_id, index, event.ts, event.offset)

    wave_reordered = [
        WaveInput(w.user_id, [to_deployment(e) for e in w.previous],
                  [to_deployment(e) for e in w.events], w.capacity, w.first_index)
        for w in wave_own
    ]
    own = _lists(_recommender(path), wave_own)
    assert _lists(_recommender(path, reordered), wave_reordered) == own
    # read by position, the reordered windows would feed the model other types: other lists
    assert _lists(_recommender(path), wave_reordered) != own
    with pytest.raises(ArtifactError, match="'like'"):
        _recommender(path, ["view", "like"])


# --- pre-warm: exact ------------------------------------------------------------------------
def test_a_prewarmed_cache_gives_the_lists_a_refill_gives_and_saves_the_refill(tmp_path: Path) -> None:
    path = make_artifact(tmp_path / "m", n_items=60, window=4, seed=5).path
    rng = random.Random(11)
    windows = {f"u{u}": _window(rng, 7, 4, 100 * u) for u in range(30)}
    wave = _wave(windows, rng, 4)
    cold = _recommender(path)
    warm = _recommender(path)
    warmed = warm.prewarm([(user, window.snapshot()) for user, window in windows.items()])
    assert warmed == 30
    expected, counters_cold = cold.recommend(wave)
    got, counters_warm = warm.recommend(wave)
    for a, b in zip(expected, got, strict=True):
        assert [i for i, _ in a.items] == [i for i, _ in b.items]
        assert [s for _, s in a.items] == pytest.approx([s for _, s in b.items], abs=1e-5)
    assert counters_warm.cache_hits == 30 and counters_cold.cache_hits == 0
    # a window that moved on after its snapshot: the pre-warmed entry is stale, a miss,
    # refilled exactly
    stale = _recommender(path)
    stale.prewarm([("u0", windows["u0"].snapshot())])
    windows["u0"].apply(WindowEvent("sku-9", 1, 50_000, 99_999))
    now = windows["u0"].snapshot()
    late = [WaveInput("u0", now.events, [WindowEvent("sku-3", 2, 60_000, 100_000)], 7,
                      now.first_index)]
    scored, counters = stale.recommend(late)
    assert (counters.cache_hits, counters.cache_misses) == (0, 1)
    assert [i for i, _ in scored[0].items] == [i for i, _ in _lists(_recommender(path), late)[0]]


# --- the checks a version passes before it serves ------------------------------------------
def _settings(tmp_path: Path, **extra: object) -> WorkerSettings:
    import argparse

    from kvrec.stream.worker.settings import add_worker_arguments

    parser = argparse.ArgumentParser()
    add_worker_arguments(parser)
    args = parser.parse_args(["--state-dir", str(tmp_path / "state"), "--k", "5",
                              "--retrieval", "exact", "--window-capacity", "7"])
    settings = WorkerSettings.from_args(args)
    from dataclasses import replace

    return replace(settings, **extra)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("broken", "check", "message"),
    [
        ("flip", "verify", "sha256"),
        ("truncate", "verify", "sha256"),
        ("event_types", "compatibility", "'purchase'"),
        ("nan", "smoke", "non-finite"),
        ("window", "compatibility", "needs 13 stored events"),
    ],
)
def test_a_broken_or_incompatible_version_is_refused_with_the_check_named(
    tmp_path: Path, broken: str, check: str, message: str
) -> None:
    kwargs: dict[str, object] = {"n_items": 60, "window": 4}
    if broken == "event_types":
        kwargs["event_types"] = ["view", "click", "add_to_cart"]
    if broken == "nan":
        kwargs["nan_weights"] = True
    if broken == "window":
        kwargs["window"] = 7  # needs 2 * 6 + 1 = 13 events; the windows hold 7
    artifact = make_artifact(tmp_path / "m", **kwargs)  # type: ignore[arg-type]
    weights = artifact.path / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    if broken == "flip":
        data[len(data) // 2] ^= 0x01
        weights.write_bytes(bytes(data))
    if broken == "truncate":
        weights.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(ModelRefused, match=message) as refused:
        load_recommender(_settings(tmp_path), ModelChoice(artifact.version, artifact.path))
    assert refused.value.check == check


# --- against the real broker -----------------------------------------------------------------
@pytest.fixture(scope="module")
def good_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model that learned "the next item is the one after": its live hit rate is high."""
    rng = random.Random(0)
    rows = [
        Interaction(f"u{u}", f"sku-{(start + j) % CATALOG + 1}", "view", 1_700_000_000_000 + j)
        for u, start in ((u, rng.randrange(CATALOG)) for u in range(300))
        for j in range(25)
    ]
    out = tmp_path_factory.mktemp("good") / "model"
    train(rows, {"d_model": 32, "n_layers": 2, "n_heads": 2, "window": 4, "dropout": 0.0},
          TrainSettings(epochs=10, max_len=20, patience=10, batch_size=64, lr=5e-3,
                        lr_schedule="constant", warmup_epochs=0.0), out,
          progress=False)
    return out


def _sequence_events(users: range, length: int, start_ts: int) -> list[tuple[bytes, bytes]]:
    """Each user walks the catalog one item at a time, from a start of its own."""
    messages = []
    for j in range(length):
        for u in users:
            item = f"sku-{(u * 7 + j) % CATALOG + 1}"
            event = {"user_id": f"user-{u}", "item_id": item, "event_type": "view",
                     "ts": start_ts + j}
            messages.append((f"user-{u}".encode(), json.dumps(event).encode()))
    return messages


class Lifecycle:
    """A store, the model topics, one input partition, and a worker that follows them."""

    def __init__(self, bootstrap: str, tmp_path: Path) -> None:
        self.topics = OnePartition(bootstrap, "swap")
        self.config = {"bootstrap.servers": bootstrap}
        self.updates, self.stats = unique_topic("model-updates"), unique_topic("model-stats")
        ensure_model_topics(self.config, self.updates, self.stats)
        self.store = ModelStore(tmp_path / "store")
        self.store.root.mkdir()
        self.tmp_path = tmp_path
        self.seen = 0
        self.current: Announcement | None = None

    def publish(self, path: Path) -> StoredVersion:
        return self.store.publish(path)

    def announce(self, stored: StoredVersion, reason: str = "promote",
                 shadow: StoredVersion | None = None) -> None:
        if self.current is None:
            announcement = first_announcement("default", stored.version, str(stored.path),
                                              stored.manifest_sha256, reason)
        else:
            announcement = self.current.serving(stored.version, str(stored.path),
                                                stored.manifest_sha256, reason)
        if shadow is not None:
            announcement = announcement.with_shadow(
                Candidate(shadow.version, str(shadow.path), shadow.manifest_sha256, 1.0))
        announce(self.config, announcement, self.updates)
        self.current = announcement

    def worker(self, *extra: str) -> ThreadWorker:
        args = self.topics.args(
            None, self.tmp_path / "state", "exactly-once",  # type: ignore[arg-type]
            "--model-store", str(self.store.root), "--updates-topic", self.updates,
            "--stats-topic", self.stats, "--window-capacity", "7", "--stats-interval-ms", "200",
            *extra,
        )
        return ThreadWorker(args)

    def send(self, messages: list[tuple[bytes, bytes]]) -> list[dict]:
        """Produce, and return the recommendations they brought (exactly one each)."""
        self.topics.produce(messages)  # type: ignore[arg-type]
        self.seen += len(messages)
        out = self.topics.read(self.topics.recommendations, self.seen, quiet=1.0)
        assert len(out) == self.seen, f"{len(out)} recommendations for {self.seen} events"
        return [json.loads(m.value()) for m in out[self.seen - len(messages):]]


def _wait(condition, what: str, timeout: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.mark.kafka
@pytest.mark.slow
def test_swap_refuse_and_roll_back_under_exactly_once(kafka_bootstrap: str, tmp_path: Path,
                                                      good_model: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    life = Lifecycle(kafka_bootstrap, tmp_path)
    v1 = life.publish(good_model)
    v2 = life.publish(make_artifact(tmp_path / "v2", n_items=CATALOG, window=4, seed=2).path)
    life.announce(v1, "retrain")
    bad = {
        "verify": make_artifact(tmp_path / "flip", n_items=CATALOG, window=4, seed=3),
        "compatibility": make_artifact(tmp_path / "types", n_items=CATALOG, window=4, seed=4,
                                       event_types=["view", "click"]),
        "smoke": make_artifact(tmp_path / "nan", n_items=CATALOG, window=4, seed=5,
                               nan_weights=True),
    }
    with life.worker() as worker:
        worker.wait_ready()
        first = life.send(_sequence_events(range(20), 5, 1_000))
        assert {r["model_version"] for r in first} == {v1.version}

        life.announce(v2)
        _wait(lambda: worker.counter("kvrec_model_swaps_total") == 1, "the swap to v2")
        second = life.send(_sequence_events(range(20), 5, 2_000))
        assert {r["model_version"] for r in second} == {v2.version}

        for attempt, (check, artifact) in enumerate(bad.items()):
            stored = life.publish(artifact.path)
            if check == "verify":  # one byte changed in the store after publication
                weights = stored.path / "weights.safetensors"
                data = bytearray(weights.read_bytes())
                data[len(data) // 3] ^= 0x01
                weights.write_bytes(bytes(data))
            refused_before = worker.counter("kvrec_model_refusals_total", check=check)
            life.announce(stored)
            _wait(lambda c=check, n=refused_before: worker.counter(
                "kvrec_model_refusals_total", check=c) == n + 1, f"the {check} refusal")
            after = life.send(_sequence_events(range(20), 1, 3_000 + attempt))
            assert {r["model_version"] for r in after} == {v2.version}, check
        assert worker.counter("kvrec_model_swaps_total") == 1

        # the worker reports what it serves and what it refused; `kvrec models list` shows it
        from kvrec.stream.model_updates import read_live

        def reported() -> bool:
            reports = read_live(life.config, "default", life.stats).reports
            return bool(reports) and reports[0].status is not None and \
                len(reports[0].status.refused) == len(bad)

        _wait(reported, "the worker's report of its refusals", 30)
        status = read_live(life.config, "default", life.stats).reports[0].status
        assert status is not None and status.serving == v2.version
        assert [r.check for r in status.refused] == list(bad)
        assert kvrec(["models", "list", "--json", "--model-store", str(life.store.root),
                      "--updates-topic", life.updates, "--stats-topic", life.stats,
                      "--bootstrap-servers", life.config["bootstrap.servers"]]) == 0
        listing = json.loads(capsys.readouterr().out)
        rows = {row["version"]: row for row in listing["versions"]}
        assert rows[v2.version]["state"] == "serving" and rows[v2.version]["workers_serving"]
        nan = life.current.version  # type: ignore[union-attr]  # the smoke-refused one, announced
        assert rows[nan]["state"] == "announced"
        assert [r["check"] for r in rows[nan]["refused_by"]] == ["smoke"]

        life.announce(v1, "rollback")
        _wait(lambda: worker.counter("kvrec_model_swaps_total") == 2, "the rollback swap")
        back = life.send(_sequence_events(range(20), 3, 5_000))
        assert {r["model_version"] for r in back} == {v1.version}
    # every input event has exactly one committed recommendation, and the versions change
    # only at the swaps, in input order
    everything = life.topics.read(life.topics.recommendations, life.seen, quiet=1.0)
    versions = [json.loads(m.value())["model_version"] for m in everything]
    assert len(versions) == life.seen
    changes = [b for a, b in itertools.pairwise(versions) if a != b]
    assert changes == [v2.version, v1.version]


@pytest.mark.kafka
@pytest.mark.slow
def test_cold_start_mode_then_the_first_announced_model(kafka_bootstrap: str, tmp_path: Path,
                                                         good_model: Path) -> None:
    life = Lifecycle(kafka_bootstrap, tmp_path)
    with life.worker() as worker:
        worker.wait_ready()
        assert worker.counter("kvrec_model_info", version="none") == 1
        cold = life.send(_sequence_events(range(10), 3, 1_000))
        assert all(r["cold_start"] and r["model_version"] == "none" for r in cold)
        assert any(r["items"] for r in cold)  # live popular items
        life.announce(life.publish(good_model), "retrain")
        _wait(lambda: worker.counter("kvrec_model_swaps_total") == 1, "the first model")
        served = life.send(_sequence_events(range(10), 3, 2_000))
        assert all(not r["cold_start"] for r in served)
        assert worker.counter("kvrec_model_info", version="none") == 0


@pytest.mark.kafka
@pytest.mark.slow
def test_a_worse_shadow_candidate_is_held_back_by_its_live_hit_rate(
    kafka_bootstrap: str, tmp_path: Path, good_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    life = Lifecycle(kafka_bootstrap, tmp_path)
    serving = life.publish(good_model)
    worse = life.publish(make_artifact(tmp_path / "worse", n_items=CATALOG, window=4, seed=9).path)
    life.announce(serving, "retrain", shadow=worse)
    with life.worker() as worker:
        worker.wait_ready()
        _wait(lambda: worker.worker.shadow is not None, "the shadow model")
        life.send(_sequence_events(range(30), 12, 1_000))
        serve = (worker.counter("kvrec_live_hits_total", version=serving.version, role="serve"),
                 worker.counter("kvrec_live_events_total", version=serving.version, role="serve"))
        shadow = (worker.counter("kvrec_live_hits_total", version=worse.version, role="shadow"),
                  worker.counter("kvrec_live_events_total", version=worse.version, role="shadow"))
        assert serve[1] == shadow[1] == 30 * 11  # every event after a user's first, both roles
        assert serve[0] / serve[1] > 0.8  # the good model predicts the next item
        assert shadow[0] / shadow[1] < serve[0] / serve[1] - 0.3
        _wait(lambda: live_hit_rates(life.config, "default", life.stats).get(
            (worse.version, "shadow")) is not None, "the live stats record", 30)
        rates = live_hit_rates(life.config, "default", life.stats)
        assert rates[(worse.version, "shadow")].hit_rate < rates[(serving.version, "serve")].hit_rate
    # the live comparison holds the worse candidate back: `promote --require-live` refuses it
    # from the counters this worker published, and nothing is announced
    flags = ["--model-store", str(life.store.root), "--updates-topic", life.updates,
             "--stats-topic", life.stats, "--bootstrap-servers", kafka_bootstrap,
             "--min-live-events", "100"]
    assert kvrec(["models", "promote", worse.version, "--require-live", *flags]) == 1
    assert "the candidate is worse live" in capsys.readouterr().err
    newest = latest_announcement(life.config, "default", life.updates)
    assert newest is not None and newest.version == serving.version


@pytest.mark.kafka
@pytest.mark.slow
def test_a_version_announced_before_it_reaches_the_mount_is_waited_for_not_refused(
    kafka_bootstrap: str, tmp_path: Path, good_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Shared storage may show a version later than the announcement reaches a worker."""
    from kvrec.stream.worker.watcher import ModelWatcher

    monkeypatch.setattr(ModelWatcher, "missing_retry_s", 0.5)
    life = Lifecycle(kafka_bootstrap, tmp_path)
    first = life.publish(make_artifact(tmp_path / "first", n_items=CATALOG, window=4, seed=2).path)
    life.announce(first, "retrain")
    elsewhere = ModelStore(tmp_path / "elsewhere").publish(good_model)  # not on the mount yet
    with life.worker() as worker:
        worker.wait_ready()
        life.announce(elsewhere)
        time.sleep(2.0)  # several retries find nothing
        assert worker.counter("kvrec_model_swaps_total") == 0
        import shutil

        shutil.copytree(elsewhere.path, life.store.folder / elsewhere.version)
        _wait(lambda: worker.counter("kvrec_model_swaps_total") == 1, "the swap once it is there")
        served = life.send(_sequence_events(range(5), 2, 1_000))
        assert {r["model_version"] for r in served} == {elsewhere.version}
        assert sum(worker.counter("kvrec_model_refusals_total", check=c)
                   for c in ("verify", "compatibility", "build", "smoke", "announcement")) == 0


# --- the watcher against the real broker, with a stand-in for the load and its checks --------
class _Loaded:
    def __init__(self, version: str) -> None:
        self.version = version

    def prewarm(self, windows: object) -> int:
        return 0


class WatcherRig:
    """A ModelWatcher following a real updates topic; `load_recommender` is replaced by a
    stand-in that records each load, refuses the versions in `refuse` and waits on `gates`."""

    def __init__(self, bootstrap: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                 serving: str = "v1") -> None:
        import threading

        from kvrec.stream.worker import watcher as watcher_module
        from kvrec.stream.worker.metrics import WorkerMetrics

        self.config = {"bootstrap.servers": bootstrap}
        self.updates, self.stats = unique_topic("model-updates"), unique_topic("model-stats")
        ensure_model_topics(self.config, self.updates, self.stats)
        root = tmp_path / "store"
        for version in ("v1", "v2", "v3"):
            (root / "default" / version).mkdir(parents=True)
        self.settings = _settings(tmp_path, model_store=root, updates_topic=self.updates,
                                  stats_topic=self.stats, prewarm_users=0)
        self.loads: list[str] = []
        self.refuse: set[str] = set()
        self.gates: dict[str, threading.Event] = {}
        self.taken: list[str] = []
        monkeypatch.setattr(watcher_module, "load_recommender", self._load)
        self.current = first_announcement("default", serving, "", f"d-{serving}", "publish")
        announce(self.config, self.current, self.updates)
        self.metrics = WorkerMetrics()
        self.watcher = watcher_module.ModelWatcher(self.settings, self.config, self.metrics,
                                                   self.current, serving)

    def _load(self, settings: WorkerSettings, choice: ModelChoice, **_: object) -> _Loaded:
        assert choice.version is not None
        self.loads.append(choice.version)
        gate = self.gates.get(choice.version)
        if gate is not None:
            assert gate.wait(30)
        if choice.version in self.refuse:
            raise ModelRefused("verify", f"{choice.path}/weights.safetensors: missing")
        return _Loaded(choice.version)

    def announce(self, version: str, reason: str = "promote") -> None:
        self.current = self.current.serving(version, "", f"d-{version}", reason)
        announce(self.config, self.current, self.updates)

    def take(self) -> list[str]:
        """The loop's turn: what was ready, swapped in."""
        versions = [getattr(p.recommender, "version", None) for p in self.watcher.take()
                    if p.role == "serve"]
        self.taken += [v for v in versions if v is not None]
        return self.taken

    def refusals(self) -> float:
        return self.metrics.model_refusals.labels("verify")._value.get()


@pytest.mark.kafka
def test_a_refused_version_announced_again_is_tried_again(
        kafka_bootstrap: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="kvrec.worker")
    rig = WatcherRig(kafka_bootstrap, tmp_path, monkeypatch)
    rig.watcher.start()
    try:
        rig.refuse.add("v2")  # e.g. its folder half-copied to the mount
        rig.announce("v2")
        _wait(lambda: rig.refusals() == 1, "the refusal")
        assert [r.version for r in rig.watcher.status().refused] == ["v2"]
        # a record that only changes the shadow does not retry it, and the log says so
        rig.current = rig.current.with_shadow(None, note="no shadow")
        announce(rig.config, rig.current, rig.updates)
        _wait(lambda: "was refused for this announcement before: skipped" in caplog.text,
              "the skip in the log", 30)
        assert rig.loads == ["v2"]
        # repaired, announced again: tried again, and it serves
        rig.refuse.clear()
        rig.announce("v2")
        _wait(lambda: rig.take() == ["v2"], "the retried version", 30)
        assert rig.loads == ["v2", "v2"]
        assert "v2 (serve) was refused before and is announced again: trying it again" in caplog.text
        status = rig.watcher.status()
        assert (status.serving, status.served, status.refused) == ("v2", ("v1", "v2"), ())
        # what it serves reaches the stats topic with the live counters
        rig.watcher.publish_stats({("v2", "serve"): (3, 1)})
        rig.watcher.stats_producer.flush(10)
        from kvrec.stream.model_updates import read_live

        view = read_live(rig.config, "default", rig.stats)
        assert [(r.status.serving if r.status else None) for r in view.reports] == ["v2"]
    finally:
        rig.watcher.stop()


@pytest.mark.kafka
def test_a_version_superseded_while_it_is_prepared_is_never_swapped_in(
        kafka_bootstrap: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """Two quick rollbacks (v3 serves; v2, then v1 announced while v2 is prepared): v2 never
    serves; and a version rolled back to the one that serves rebuilds nothing."""
    import threading

    caplog.set_level("INFO", logger="kvrec.worker")
    rig = WatcherRig(kafka_bootstrap, tmp_path, monkeypatch, serving="v3")
    rig.watcher.start()
    try:
        rig.gates["v2"] = threading.Event()
        rig.announce("v2", "rollback")
        _wait(lambda: rig.loads == ["v2"], "the prepare of v2")
        rig.announce("v1", "rollback")
        time.sleep(2.0)  # the newer record reaches the watcher's consumer meanwhile
        rig.gates["v2"].set()
        _wait(lambda: rig.take() == ["v1"], "v1 served", 30)
        assert rig.loads == ["v2", "v1"]
        assert "model v2 (serve) superseded by a newer announcement (v1 serves)" in caplog.text

        # v1 serves; v2 announced, then v1 again before v2 is ready: nothing swaps, nothing
        # is loaded again
        rig.gates["v2"] = threading.Event()
        rig.announce("v2")
        _wait(lambda: rig.loads == ["v2", "v1", "v2"], "the second prepare of v2")
        rig.announce("v1")
        time.sleep(2.0)
        rig.gates["v2"].set()
        time.sleep(2.0)
        assert rig.take() == ["v1"] and rig.loads == ["v2", "v1", "v2"]
        assert rig.watcher.status().serving == "v1"
    finally:
        rig.watcher.stop()
