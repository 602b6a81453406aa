"""`kvrec models`: the store and the model-updates topic, in-process against the real broker."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvrec.model.store import ModelStore
from kvrec.stream.cli import main as kvrec
from kvrec.stream.model_policy import promotion_verdict, rollback_verdict
from kvrec.stream.model_updates import (
    LiveRate,
    Refusal,
    WorkerStatus,
    latest_announcement,
    live_stats_value,
    put,
)
from tests.conftest import unique_topic
from tests.worker_fixtures import make_artifact


@dataclass
class Setup:
    store: Path
    updates: str
    stats: str
    bootstrap: str
    artifacts: list[Path]
    model: str = "games"

    def flags(self, model: str | None = None) -> list[str]:
        return ["--model-store", str(self.store), "--model-name", model or self.model,
                "--updates-topic", self.updates, "--stats-topic", self.stats,
                "--bootstrap-servers", self.bootstrap]

    def kafka(self) -> dict[str, object]:
        return {"bootstrap.servers": self.bootstrap}

    def announcement(self, model: str | None = None):  # type: ignore[no-untyped-def]
        return latest_announcement(self.kafka(), model or self.model, self.updates)

    def live(self, instance: str, counts: dict[tuple[str, str], tuple[int, int]],
             status: WorkerStatus | None = None) -> None:
        """A worker's live counters record (and what it serves), as the worker writes it."""
        put(self.kafka(), self.stats, f"{self.model}/{instance}".encode(),
            live_stats_value(instance, counts, status))


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("artifacts")
    return [make_artifact(root / f"a{seed}", seed=seed).path for seed in (1, 2, 3)]


@pytest.fixture
def setup(kafka_bootstrap: str, artifacts: list[Path], tmp_path: Path) -> Setup:
    return Setup(tmp_path / "store", unique_topic("model-updates"), unique_topic("model-stats"),
                 kafka_bootstrap, artifacts)


def run(capsys: pytest.CaptureFixture[str], action: str, *args: str,
        flags: list[str]) -> tuple[int, str, str]:
    code = kvrec(["models", action, *args, *flags])
    out, err = capsys.readouterr()
    return code, out, err


def version_of(artifact: Path) -> str:
    return json.loads((artifact / "manifest.json").read_text())["version"]


def publish(capsys: pytest.CaptureFixture[str], setup: Setup, index: int, *extra: str,
            model: str | None = None) -> str:
    code, _, err = run(capsys, "publish", str(setup.artifacts[index]), *extra,
                         flags=setup.flags(model))
    assert code == 0, err
    return version_of(setup.artifacts[index])


@pytest.mark.kafka
def test_publish_list_promote_and_rollback(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    a = publish(capsys, setup, 0, "--serve")
    first = setup.announcement()
    assert first is not None and (first.version, first.reason, first.history) == (a, "publish", ())
    assert first.location == str((setup.store / "games" / a).resolve())
    assert first.manifest_sha256 == ModelStore(setup.store, "games").get(a).manifest_sha256
    b = publish(capsys, setup, 1)
    assert setup.announcement() == first  # stored, not announced

    code, out, _ = run(capsys, "list", "--json", flags=setup.flags())
    listing = json.loads(out)
    assert code == 0 and listing["serving_state_known"]
    assert {row["version"]: row["state"] for row in listing["versions"]} == {a: "serving", b: "stored"}

    code, out, err = run(capsys, "promote", b, flags=setup.flags())
    assert code == 0, err
    promoted = setup.announcement()
    assert (promoted.version, promoted.reason, promoted.history) == (b, "promote", (a,))
    code, out, _ = run(capsys, "list", flags=setup.flags())
    assert f"serving  {b}" in out and "rollback target" in out

    code, out, err = run(capsys, "rollback", flags=setup.flags())
    assert code == 0, err
    back = setup.announcement()
    # b was rolled back from: it leaves the history (a second rollback goes further back)
    assert (back.version, back.reason, back.history) == (a, "rollback", ())

    code, out, err = run(capsys, "show", b, "--json", flags=setup.flags())
    assert code == 0 and json.loads(out)["state"] == "stored", err

    # a model that served one version only has nothing to roll back to
    c = publish(capsys, setup, 2, "--serve", model="other")
    before = setup.announcement("other")
    assert before.version == c
    code, out, err = run(capsys, "rollback", flags=setup.flags("other"))
    assert code == 2 and err.startswith("kvrec: error: nothing to roll back to") and err.count("\n") == 1
    assert setup.announcement("other") == before


@pytest.mark.kafka
def test_rollbacks_walk_back_through_the_history_and_never_toggle(
        setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    a = publish(capsys, setup, 0, "--serve")
    b = publish(capsys, setup, 1, "--serve")
    c = publish(capsys, setup, 2, "--serve")
    assert setup.announcement().history == (b, a)  # type: ignore[union-attr]
    code, _, err = run(capsys, "rollback", flags=setup.flags())
    assert code == 0, err
    assert (setup.announcement().version, setup.announcement().history) == (b, (a,))  # type: ignore[union-attr]
    code, _, err = run(capsys, "rollback", flags=setup.flags())  # not back to c: on to a
    assert code == 0, err
    assert (setup.announcement().version, setup.announcement().history) == (a, ())  # type: ignore[union-attr]
    before = setup.announcement()
    code, _, err = run(capsys, "rollback", flags=setup.flags())
    assert code == 2 and err.startswith("kvrec: error: nothing to roll back to") and err.count("\n") == 1
    assert setup.announcement() == before
    code, _, err = run(capsys, "rollback", "--to", c, flags=setup.flags())
    assert code == 2 and err.count("\n") == 1 and setup.announcement() == before
    # promoting c again makes a the rollback target, and `--to` skips what is newer
    for version in (c, b):
        code, _, err = run(capsys, "promote", version, flags=setup.flags())
        assert code == 0, err
    assert setup.announcement().history == (c, a)  # type: ignore[union-attr]
    code, _, err = run(capsys, "rollback", "--to", a, flags=setup.flags())
    assert code == 0, err
    assert (setup.announcement().version, setup.announcement().history) == (a, ())  # type: ignore[union-attr]


def _status(serving: str, served: tuple[str, ...] = (), refused: tuple[str, ...] = (),
            check: str = "smoke", shadow: str | None = None) -> WorkerStatus:
    return WorkerStatus(serving, shadow, (*served, serving),
                        tuple(Refusal(v, "d", "serve", check, f"{v} is broken", 1) for v in refused))


@pytest.mark.kafka
def test_list_history_and_live_judgements_follow_what_the_workers_serve(
        setup: Setup, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """Versions every worker refused are shown refused, never serving, never a rollback
    target; `promote --require-live` and `guard` judge the version the workers serve."""
    from tests.worker_fixtures import make_artifact

    z = publish(capsys, setup, 0, "--serve")
    setup.live("w1", {}, _status(z))
    a = publish(capsys, setup, 1, "--serve")
    both = ("w1", "w2")
    for worker in both:
        setup.live(worker, {}, _status(a, (z,)))
    refused: list[str] = []
    for seed in (11, 12, 13):  # three announced versions, each refused by both workers
        artifact = make_artifact(tmp_path / f"bad{seed}", seed=seed).path
        code, _, err = run(capsys, "publish", str(artifact), "--serve", flags=setup.flags())
        assert code == 0, err
        refused.append(version_of(artifact))
        for worker in both:
            setup.live(worker, {(a, "serve"): (1000, 100)}, _status(a, (z,), tuple(refused)))
    announced = setup.announcement()
    assert announced.version == refused[-1]  # type: ignore[union-attr]
    assert announced.history == (a, z)  # type: ignore[union-attr]  # no refused version in it

    code, out, err = run(capsys, "list", "--json", flags=setup.flags())
    assert code == 0, err
    rows = {row["version"]: row for row in json.loads(out)["versions"]}
    assert rows[a]["state"] == "serving" and rows[a]["workers_serving"] == ["w1", "w2"]
    assert rows[a]["history_place"] == 1
    last = rows[refused[-1]]
    assert last["state"] == "announced" and last["workers_serving"] == []
    assert [r["instance"] for r in last["refused_by"]] == ["w1", "w2"]
    assert {w["instance"]: w["serving"] for w in json.loads(out)["workers"]} == {"w1": a, "w2": a}
    code, out, _ = run(capsys, "list", flags=setup.flags())
    assert f"announced {refused[-1]}" in out and "served by 0/2 workers" in out
    assert f"serving  {a}  on 2/2 workers (not the announced version)" in out
    assert f"refused  {refused[-1]} by w1 (smoke check)" in out
    table = {line.split()[0]: line for line in out.splitlines() if line[:8].isdigit()}
    assert "serving on 2/2 workers" in table[a] and "rollback target" in table[a]
    assert "refused by 2/2 workers (smoke)" in table[refused[-1]]
    assert "rollback target" not in table[refused[-1]] and "serving" not in table[refused[-1]]

    # the guard compares what serves (a) with what served before it (z), not the refused one
    setup.live("w1", {(a, "serve"): (1000, 100), (z, "serve"): (2000, 200)}, _status(a, (z,)))
    code, out, err = run(capsys, "guard", "--once", flags=setup.flags())
    assert code == 0, err
    assert out.startswith("no rollback: within the margin") and f"{a} (serve) 0.1000" in out
    setup.live("w1", {(a, "serve"): (1000, 40), (z, "serve"): (2000, 200)}, _status(a, (z,)))
    code, out, err = run(capsys, "guard", "--once", flags=setup.flags())
    assert code == 0, err
    assert out.startswith(f"rolled back {a} to {z}")
    assert (setup.announcement().version, setup.announcement().history) == (z, ())  # type: ignore[union-attr]

    # promote --require-live judges the candidate against what the workers serve
    for worker in both:
        setup.live(worker, {(z, "serve"): (1000, 100), (a, "shadow"): (1000, 99)}, _status(z))
    code, _, err = run(capsys, "promote", a, "--require-live", "--live-margin", "0.05",
                       flags=setup.flags())
    assert code == 0, err
    assert "0.0990 over 2,000 events" in setup.announcement().note  # type: ignore[union-attr]


@pytest.mark.kafka
def test_a_refused_announced_version_can_be_announced_again(
        setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    a = publish(capsys, setup, 0, "--serve")
    setup.live("w1", {}, _status(a))
    b = publish(capsys, setup, 1, "--serve")
    first = setup.announcement()
    setup.live("w1", {}, _status(a, refused=(b,), check="verify"))  # e.g. half-copied
    code, out, err = run(capsys, "promote", b, flags=setup.flags())
    assert code == 0, err
    assert "announced but no worker serves it: announcing it again" in out
    again = setup.announcement()
    assert again.version == b and again.announced_ms > first.announced_ms  # type: ignore[union-attr]
    assert again.history == (a,)  # type: ignore[union-attr]
    setup.live("w1", {}, _status(b, (a,)))  # served now: promoting it again is refused
    code, _, err = run(capsys, "promote", b, flags=setup.flags())
    assert code == 2 and "already serves" in err


def test_a_store_that_does_not_exist_is_refused(capsys: pytest.CaptureFixture[str],
                                                tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such" / "dir"
    for action in (["list"], ["list", "--json"], ["show", "v1"], ["rollback"], ["guard", "--once"]):
        code = kvrec(["models", *action, "--model-store", str(missing),
                      "--bootstrap-servers", "127.0.0.1:1", "--connect-timeout", "1"])
        out, err = capsys.readouterr()
        assert code == 2 and out == "", action
        assert err == (f"kvrec: error: --model-store {missing}: no such directory "
                       "(create it, or mount it)\n")
    assert not missing.exists()


def test_list_labels_each_figure_by_what_it_was_measured_on(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.worker_fixtures import make_artifact

    figures = {"test": {"ndcg@10": 0.0421}, "validation": {"ndcg@10": 0.05}, "users": 1234}
    store = ModelStore(tmp_path / "store", "games")
    stored = store.publish(make_artifact(tmp_path / "measured", metrics=figures).path)
    flags = ["--model-store", str(tmp_path / "store"), "--model-name", "games",
             "--bootstrap-servers", "127.0.0.1:1", "--connect-timeout", "1"]
    assert kvrec(["models", "list", *flags]) == 0
    out = capsys.readouterr().out
    assert "TEST NDCG@10" not in out and "MEASURED ON" in out
    users = stored.metrics["users"]
    row = next(line for line in out.splitlines() if line.startswith(stored.version))
    assert f"0.0421 own test, {users:,} users" in row
    assert "NDCG@10: each version's own test split" in out
    assert kvrec(["models", "list", "--json", *flags]) == 0
    listed = json.loads(capsys.readouterr().out)["versions"][0]
    assert listed["measured_on"]["test_ndcg@10"] == (
        f"own test split: the last event of {users:,} users of its training data")
    assert "second-to-last" in listed["measured_on"]["validation_ndcg@10"]


@pytest.mark.kafka
def test_show_names_state_config_and_live_figures(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    a = publish(capsys, setup, 0, "--serve")
    setup.live("w1", {(a, "serve"): (400, 44)})
    code, out, err = run(capsys, "show", a, "--json", flags=setup.flags())
    assert code == 0, err
    shown = json.loads(out)
    assert shown["state"] == "serving" and shown["integrity"].startswith("ok")
    assert shown["config"]["d_model"] == 32 and shown["config"]["window"] == 4
    assert shown["live"]["serve"] == {"events": 400, "hits": 44, "hit_rate": pytest.approx(0.11)}
    code, out, _ = run(capsys, "show", a, flags=setup.flags())
    assert f"live       {a} (serve) 0.1100 over 400 events" in out
    code, _, err = run(capsys, "show", "20990101T000000-deadbeef", flags=setup.flags())
    assert code == 2 and "is not in the model store" in err


@pytest.mark.kafka
def test_shadow_set_and_stop(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    a = publish(capsys, setup, 0, "--serve")
    b = publish(capsys, setup, 1)
    code, _, err = run(capsys, "shadow", b, "--sample", "0.5", flags=setup.flags())
    assert code == 0, err
    shadowed = setup.announcement()
    assert shadowed.version == a and shadowed.reason == "shadow"
    assert shadowed.shadow is not None and (shadowed.shadow.version, shadowed.shadow.sample) == (b, 0.5)
    _, out, _ = run(capsys, "list", "--json", flags=setup.flags())
    assert {r["version"]: r["state"] for r in json.loads(out)["versions"]}[b] == "shadow"

    code, _, err = run(capsys, "shadow", a, flags=setup.flags())
    assert code == 2 and "cannot shadow itself" in err
    code, _, err = run(capsys, "shadow", flags=setup.flags())
    assert code == 2 and "give a VERSION to shadow, or --stop" in err
    assert setup.announcement() == shadowed

    code, _, err = run(capsys, "shadow", "--stop", flags=setup.flags())
    assert code == 0, err
    stopped = setup.announcement()
    assert stopped.version == a and stopped.shadow is None

    # publish straight into shadow; a promotion ends the shadow
    c = publish(capsys, setup, 2, "--shadow", "--sample", "0.25")
    assert setup.announcement().shadow.version == c  # type: ignore[union-attr]
    code, _, err = run(capsys, "promote", c, flags=setup.flags())
    assert code == 0, err
    assert setup.announcement().shadow is None  # type: ignore[union-attr]


@pytest.mark.kafka
def test_promote_require_live_refuses_a_worse_candidate(setup: Setup,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    a = publish(capsys, setup, 0, "--serve")
    b = publish(capsys, setup, 1, "--shadow")
    shadowed = setup.announcement()
    live = ["--require-live", "--min-live-events", "500", "--live-margin", "0.1"]  # relative
    setup.live("w1", {(a, "serve"): (1000, 100), (b, "shadow"): (300, 20)})
    code, _, err = run(capsys, "promote", b, *live, flags=setup.flags())
    assert code == 1 and "too few live events" in err and "300 events" in err

    setup.live("w2", {(a, "serve"): (1000, 100), (b, "shadow"): (700, 60)})  # b: 80/1000
    code, _, err = run(capsys, "promote", b, *live, flags=setup.flags())
    assert code == 1 and err.count("\n") == 1
    assert f"not promoting {b}: the candidate is worse live" in err
    assert "0.0800 over 1,000 events" in err and "0.1000 over 2,000 events" in err
    assert setup.announcement() == shadowed  # a refusal announces nothing

    setup.live("w2", {(a, "serve"): (1000, 100), (b, "shadow"): (700, 75)})  # b: 95/1000 >= 0.09
    code, _, err = run(capsys, "promote", b, *live, flags=setup.flags())
    assert code == 0, err
    promoted = setup.announcement()
    assert (promoted.version, promoted.reason, promoted.shadow) == (b, "promote", None)
    assert "0.0950 over 1,000 events" in promoted.note


@pytest.mark.kafka
def test_guard_rolls_back_only_past_the_margin(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    a = publish(capsys, setup, 0, "--serve")
    b = publish(capsys, setup, 1, "--serve")
    guard = ["--once", "--margin", "0.01", "--min-live-events", "1000"]
    setup.live("w1", {(a, "serve"): (2000, 200), (b, "serve"): (2000, 185)})  # 0.1 vs 0.0925: noise
    before = setup.announcement()
    code, out, err = run(capsys, "guard", *guard, flags=setup.flags())
    assert code == 0, err
    assert out.startswith("no rollback: within the margin") and setup.announcement() == before

    setup.live("w1", {(a, "serve"): (2000, 200), (b, "serve"): (2000, 150)})  # 0.1 vs 0.075
    code, out, err = run(capsys, "guard", *guard, flags=setup.flags())
    assert code == 0, err
    assert f"rolled back {b} to {a}" in out
    after = setup.announcement()
    assert (after.version, after.reason, after.history) == (a, "auto_rollback", ())
    assert "0.0750 over 2,000 events" in after.note and "0.1000 over 2,000 events" in after.note
    assert "relative margin 0.01" in after.note

    # now a serves again and b, rolled back from, is not its predecessor: nothing more to do
    code, out, _ = run(capsys, "guard", *guard, flags=setup.flags())
    assert code == 0 and out.startswith("no rollback") and setup.announcement() == after


@pytest.mark.kafka
def test_guard_fires_at_low_hit_rates(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    """At live hit rates near 1 % (an absolute margin of 0.01 could never fire)."""
    a = publish(capsys, setup, 0, "--serve")
    b = publish(capsys, setup, 1, "--serve")
    setup.live("w1", {(a, "serve"): (10_000, 92), (b, "serve"): (1000, 0)})  # 0.0092 vs 0
    code, out, err = run(capsys, "guard", "--once", flags=setup.flags())
    assert code == 0, err
    assert out.startswith(f"rolled back {b} to {a}") and setup.announcement().version == a  # type: ignore[union-attr]
    c = publish(capsys, setup, 2, "--serve")
    setup.live("w1", {(a, "serve"): (10_000, 92), (c, "serve"): (1000, 7)})  # 0.0092 vs 0.007
    code, out, err = run(capsys, "guard", "--once", flags=setup.flags())
    assert code == 0, err
    assert out.startswith("no rollback: within the margin: a drop within sampling noise")
    assert setup.announcement().version == c  # type: ignore[union-attr]


@pytest.mark.kafka
def test_a_corrupted_stored_version_is_refused(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    a = publish(capsys, setup, 0, "--serve")
    b = publish(capsys, setup, 1)
    weights = setup.store / "games" / b / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    before = setup.announcement()
    code, _, err = run(capsys, "promote", b, flags=setup.flags())
    assert code == 2 and f"{weights}: sha256 does not match" in err and err.count("\n") == 1
    code, _, err = run(capsys, "shadow", b, flags=setup.flags())
    assert code == 2 and str(weights) in err
    assert setup.announcement() == before

    c = publish(capsys, setup, 2, "--serve")  # a is now the rollback target: corrupt it
    config = setup.store / "games" / a / "config.json"
    config.write_text(config.read_text().replace('"d_model": 32', '"d_model": 64'))
    serving = setup.announcement()
    assert serving.version == c
    code, _, err = run(capsys, "rollback", flags=setup.flags())
    assert code == 2 and f"{config}: sha256 does not match" in err
    assert setup.announcement() == serving
    code, out, _ = run(capsys, "show", a, flags=setup.flags())
    assert code == 0 and "integrity  FAILED" in out


@pytest.mark.kafka
def test_publish_prunes_but_never_an_announced_version(setup: Setup,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    a = publish(capsys, setup, 0, "--serve")
    b = publish(capsys, setup, 1)
    c = publish(capsys, setup, 2, "--keep", "1")
    assert {v.version for v in ModelStore(setup.store, "games").versions()} == {a, c}
    assert b not in (a, c)


def test_list_without_kafka_lists_the_store_and_reads_its_variables(
        artifacts: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    store = ModelStore(tmp_path / "store", "games")
    stored = store.publish(artifacts[0])
    monkeypatch.setenv("KVREC_MODELS_MODEL_STORE", str(tmp_path / "store"))
    monkeypatch.setenv("KVREC_MODELS_MODEL_NAME", "games")
    code = kvrec(["models", "list", "--json", "--bootstrap-servers", "127.0.0.1:1",
                  "--connect-timeout", "1"])
    listing = json.loads(capsys.readouterr().out)
    assert code == 0 and not listing["serving_state_known"]
    assert "cannot reach Kafka at 127.0.0.1:1" in listing["why_unknown"]
    assert [row["version"] for row in listing["versions"]] == [stored.version]
    # a change needs the serving state: exit 1, nothing written
    code = kvrec(["models", "promote", stored.version, "--bootstrap-servers", "127.0.0.1:1",
                  "--connect-timeout", "1"])
    assert code == 1 and "cannot reach Kafka" in capsys.readouterr().err


def test_the_live_verdicts() -> None:
    rates = {("v1", "serve"): LiveRate("v1", "serve", 1000, 100),
             ("v2", "shadow"): LiveRate("v2", "shadow", 1000, 95),
             ("v2", "serve"): LiveRate("v2", "serve", 4000, 320)}
    assert promotion_verdict(rates, "v2", "v1", 0.06, 1000).yes  # relative: 0.095 >= 0.094
    assert not promotion_verdict(rates, "v2", "v1", 0.04, 1000).yes  # 0.095 < 0.096
    assert not promotion_verdict(rates, "v2", "v1", 0.5, 1001).yes  # too few events
    assert not promotion_verdict(rates, "v3", "v1", 0.5, 1).yes  # never shadowed
    assert rollback_verdict(rates, "v2", "v1", 0.05, 1000, confidence=0.95).yes  # z 2.04 >= 1.64
    assert not rollback_verdict(rates, "v2", "v1", 0.25, 1000, confidence=0.95).yes  # not 25 % below
    assert not rollback_verdict(rates, "v2", "v1", 0.05, 1001, confidence=0.95).yes
    assert not rollback_verdict(rates, "v2", "v1", 0.05, 1000).yes  # z 2.04 < 2.33 at 0.99


def _low(now: tuple[int, int], before: tuple[int, int], **kwargs: float) -> bool:
    rates = {("new", "serve"): LiveRate("new", "serve", *now),
             ("old", "serve"): LiveRate("old", "serve", *before)}
    return rollback_verdict(rates, "new", "old", kwargs.get("margin", 0.05), 1000,
                            kwargs.get("confidence", 0.99)).yes


def test_the_guard_verdict_at_low_hit_rates() -> None:
    # live 0/1000 against 0.0092 (an absolute margin of 0.01 never fired here)
    assert _low((1000, 0), (10_000, 92))
    assert _low((1000, 0), (1000, 9))
    assert _low((100_000, 500), (100_000, 920))  # 0.005 vs 0.0092, plenty of events
    # within sampling error: not a rollback
    for hits in (4, 5, 7, 9, 12):
        assert not _low((1000, hits), (10_000, 92)), hits
    assert not _low((1000, 0), (1000, 0))  # nothing hits either: no evidence


@given(before_events=st.integers(1000, 200_000), before_rate=st.floats(0.0, 0.5),
       now_events=st.integers(1000, 200_000), seed=st.integers(0, 2**32 - 1))
@settings(max_examples=200, deadline=None)
def test_the_guard_rarely_fires_on_sampling_noise_and_never_on_a_rise(
        before_events: int, before_rate: float, now_events: int, seed: int) -> None:
    import random

    rng = random.Random(seed)
    before_hits = round(before_events * before_rate)
    rate = before_hits / before_events
    # a version exactly as good as its predecessor: its hits within 2 standard deviations
    spread = 2 * (now_events * rate * (1 - rate)) ** 0.5
    now_hits = max(0, min(now_events, round(now_events * rate + rng.uniform(-spread, spread))))
    assert not _low((now_events, now_hits), (before_events, before_hits))
    # no worse than its predecessor: never a rollback, whatever the margin or confidence
    better = min(now_events, max(now_hits, -(-before_hits * now_events // before_events)))
    assert not _low((now_events, better), (before_events, before_hits), margin=0.0,
                    confidence=0.51)


@pytest.mark.parametrize("action", ["list", "show", "publish", "promote", "shadow", "rollback", "guard"])
def test_every_action_names_its_variables(action: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        kvrec(["models", action, "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert ("--model-store MODEL_STORE the store's root folder "
            "(default: models; env KVREC_MODELS_MODEL_STORE)") in text
    assert "env KVREC_BOOTSTRAP_SERVERS" in text
    if action == "guard":
        assert "env KVREC_MODELS_GUARD_MARGIN" in text and "env KVREC_MODELS_GUARD_MIN_LIVE_EVENTS" in text
    if action == "promote":
        assert "relative hit-rate margin" in text
        assert "(default: 0.0; env KVREC_MODELS_PROMOTE_LIVE_MARGIN)" in text


def test_action_variables_and_range_checks(monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    from kvrec.stream.cli import build_parser

    monkeypatch.setenv("KVREC_MODELS_GUARD_MARGIN", "0.1")
    monkeypatch.setenv("KVREC_MODELS_UPDATES_TOPIC", "updates-x")
    argv = ["models", "guard"]
    args = build_parser(argv).parse_args(argv)
    assert (args.margin, args.updates_topic, args.min_live_events) == (0.1, "updates-x", 1000)
    assert args.confidence == 0.99
    monkeypatch.setenv("KVREC_MODELS_GUARD_MARGIN", "-1")
    assert kvrec(argv) == 2
    assert "KVREC_MODELS_GUARD_MARGIN='-1'" in capsys.readouterr().err
    monkeypatch.delenv("KVREC_MODELS_GUARD_MARGIN")
    parser = build_parser(["models"])
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    models = next(a for a in sub.choices["models"]._actions if isinstance(a, argparse._SubParsersAction))
    for action_parser in models.choices.values():
        for action in action_parser._actions:
            if isinstance(action.default, int | float) and not isinstance(action.default, bool):
                assert getattr(action.type, "__name__", None) in ("integer", "number"), action.dest


@pytest.mark.kafka
def test_an_announcement_that_came_in_meanwhile_is_not_undone(
        setup: Setup, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from kvrec.stream import models_cli
    from kvrec.stream.model_updates import announce

    publish(capsys, setup, 0, "--serve")
    b = publish(capsys, setup, 1, "--serve")
    real_verified = models_cli.Context.verified
    concurrent = setup.announcement().with_shadow(None, note="another operator")  # type: ignore[union-attr]

    def verified_while_someone_announces(self: models_cli.Context, version: str):  # type: ignore[no-untyped-def]
        entry = real_verified(self, version)
        announce(setup.kafka(), concurrent, setup.updates)
        return entry

    monkeypatch.setattr(models_cli.Context, "verified", verified_while_someone_announces)
    code, _, err = run(capsys, "rollback", flags=setup.flags())
    assert code == 1 and "changed while deciding" in err and f"now {b} serves (shadow)" in err
    assert setup.announcement() == concurrent


@pytest.mark.kafka
def test_the_guard_loop_rolls_back_and_logs_why(setup: Setup, capsys: pytest.CaptureFixture[str],
                                                 tmp_path: Path) -> None:
    import subprocess
    import sys
    import time

    a = publish(capsys, setup, 0, "--serve")
    b = publish(capsys, setup, 1, "--serve")
    setup.live("w1", {(a, "serve"): (1000, 100), (b, "serve"): (1000, 100)})
    log_path = tmp_path / "guard.log"
    root = Path(__file__).resolve().parent.parent
    with log_path.open("w") as log:
        guard = subprocess.Popen(
            [sys.executable, "-m", "kvrec.stream.cli", "models", "guard", "--interval-s", "0.5",
             "--margin", "0.02", "--min-live-events", "500", *setup.flags()],
            cwd=root, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while "no rollback: within the margin" not in log_path.read_text():
            assert guard.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.2)
        assert setup.announcement().version == b  # type: ignore[union-attr]
        setup.live("w1", {(a, "serve"): (1000, 100), (b, "serve"): (1000, 70)})
        while (setup.announcement().reason != "auto_rollback"):  # type: ignore[union-attr]
            assert guard.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.5)
        time.sleep(1.0)  # a few more checks: no flip-flop
    finally:
        guard.terminate()
        guard.wait(timeout=30)
    after = setup.announcement()
    assert (after.version, after.history) == (a, ())  # type: ignore[union-attr]
    text = log_path.read_text()
    assert f"WARNING kvrec.models: rolled back {b} to {a}" in text and "0.0700 over 1,000" in text
    assert text.count("rolled back") == 1
