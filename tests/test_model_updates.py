"""Announcements on the compacted model-updates topic, against the real broker."""

from __future__ import annotations

import pytest

from kvrec.stream.model_updates import (
    Announcement,
    Candidate,
    Refusal,
    WorkerStatus,
    announce,
    ensure_model_topics,
    first_announcement,
    latest_announcement,
    live_hit_rates,
    live_stats_value,
    put,
    read_live,
)
from tests.conftest import unique_topic


def test_an_announcement_survives_json_and_keeps_a_rollback_history() -> None:
    first = first_announcement("games", "v1", "/store/games/v1", "d1", "retrain", {"ndcg@10": 0.06})
    second = first.serving("v2", "/store/games/v2", "d2", "retrain")
    third = second.serving("v3", "/store/games/v3", "d3", "promote")
    assert third.history == ("v2", "v1")
    back = third.serving("v2", "/store/games/v2", "d2", "rollback")
    assert back.history == ("v3", "v1")  # v2 is serving again, not in its own history
    shadowed = back.with_shadow(Candidate("v4", "/store/games/v4", "d4", 0.5))
    assert Announcement.from_json(shadowed.to_json()) == shadowed
    for bad in (b"{}", b"[]", b"not json", b'{"model": "m", "version": "../x", "location": "",'
                b' "manifest_sha256": "", "reason": "retrain"}'):
        with pytest.raises(ValueError):
            Announcement.from_json(bad)


def test_the_history_holds_only_versions_that_served_and_rollbacks_walk_back() -> None:
    first = first_announcement("games", "v1", "/s/v1", "d1", "publish")
    second = first.serving("v2", "/s/v2", "d2", "promote", served={"v1"})
    refused = second.serving("v3", "/s/v3", "d3", "promote", served={"v1"})  # v2 never served
    assert refused.history == ("v1",)
    assert refused.serving("v4", "/s/v4", "d4", "promote", served={"v1"}).history == ("v1",)
    assert refused.serving("v4", "/s/v4", "d4", "promote", served=None).history == ("v3", "v1")
    served = first.serving("v2", "/s/v2", "d2", "p").serving("v3", "/s/v3", "d3", "p")
    assert served.history == ("v2", "v1")
    back = served.rolled_back("v2", "/s/v2", "d2", "rollback")
    assert (back.version, back.history) == ("v2", ("v1",))
    assert back.rolled_back("v1", "/s/v1", "d1", "rollback").history == ()
    assert served.rolled_back("v1", "/s/v1", "d1", "rollback").history == ()
    with pytest.raises(ValueError):
        back.rolled_back("v3", "/s/v3", "d3", "rollback")


@pytest.mark.kafka
def test_the_workers_reports_are_read_back(kafka_bootstrap: str) -> None:
    config = {"bootstrap.servers": kafka_bootstrap}
    updates, stats = unique_topic("model-updates"), unique_topic("model-stats")
    ensure_model_topics(config, updates, stats)
    status = WorkerStatus("v2", "v3", ("v1", "v2"),
                          (Refusal("v4", "d4", "serve", "smoke", "non-finite output", 17),))
    put(config, stats, b"games/w1", live_stats_value("w1", {("v2", "serve"): (10, 1)}, status))
    put(config, stats, b"games/w0", live_stats_value("w0", {}))  # an older worker: no status
    put(config, stats, b"other/w1", live_stats_value("w1", {}, WorkerStatus("x")))
    view = read_live(config, "games", stats)
    assert [(r.instance, r.status) for r in view.reports] == [("w0", None), ("w1", status)]
    assert view.ever_served() == {"v1", "v2"} and view.reporting()
    assert [r.instance for r in view.current(60)] == ["w1"]
    assert view.current(60, now=view.reports[1].ts_ms + 61_000) == []
    assert view.rates[("v2", "serve")].events == 10


@pytest.mark.kafka
def test_the_newest_announcement_of_each_model_is_read_back(kafka_bootstrap: str) -> None:
    config = {"bootstrap.servers": kafka_bootstrap}
    updates, stats = unique_topic("model-updates"), unique_topic("model-stats")
    ensure_model_topics(config, updates, stats)
    assert latest_announcement(config, "games", updates) is None
    first = first_announcement("games", "v1", "/s/v1", "d1", "retrain")
    announce(config, first, updates)
    announce(config, first_announcement("other", "x1", "/s/x1", "dx", "retrain"), updates)
    second = first.serving("v2", "/s/v2", "d2", "promote")
    announce(config, second, updates)
    assert latest_announcement(config, "games", updates) == second
    assert latest_announcement(config, "other", updates).version == "x1"  # type: ignore[union-attr]

    put(config, stats, b"games/w1", live_stats_value("w1", {("v2", "serve"): (100, 10)}))
    put(config, stats, b"games/w2", live_stats_value("w2", {("v2", "serve"): (50, 5),
                                                             ("v3", "shadow"): (20, 1)}))
    put(config, stats, b"games/w1", live_stats_value("w1", {("v2", "serve"): (200, 30)}))
    rates = live_hit_rates(config, "games", stats)
    assert rates[("v2", "serve")].events == 250 and rates[("v2", "serve")].hits == 35
    assert rates[("v3", "shadow")].hit_rate == pytest.approx(0.05)
