"""`kvrec bench freshness`: lists refreshed per event vs frozen at the start of the day."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvrec.bench.freshness import DAY_MS, cut_of, measure, replay
from kvrec.errors import DataError
from kvrec.model.datasets import Interaction
from kvrec.stream.cli import main as kvrec

N_ITEMS = 6


class SuccessorEncoder(torch.nn.Module):
    """Recommends the successor on the cycle 1 -> 2 -> ... -> 6 -> 1 of the last item."""

    def forward(self, items: torch.Tensor, types: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(items, N_ITEMS + 1).float()

    def score(self, vectors: torch.Tensor) -> torch.Tensor:
        successor = torch.zeros(N_ITEMS + 1, N_ITEMS + 1)
        for item in range(1, N_ITEMS + 1):
            successor[item, item % N_ITEMS + 1] = 1.0
        return vectors @ successor


@dataclass
class StubArtifact:
    encoder: torch.nn.Module
    item_index: dict[str, int]
    item_ids: list[str]
    event_types: list[str]


def _artifact() -> StubArtifact:
    ids = [str(i) for i in range(1, N_ITEMS + 1)]
    return StubArtifact(SuccessorEncoder(), {i: int(i) for i in ids}, ["", *ids], ["view"])


def _event(user: str, item: int, day: int, minute: int, kind: str = "view") -> Interaction:
    return Interaction(user, str(item), kind, day * DAY_MS + minute * 60_000)


def _args(**overrides: object) -> argparse.Namespace:
    return argparse.Namespace(**{"test_days": 1, "k": 1, "include_seen": False, **overrides})


def test_refreshed_lists_follow_the_day_and_nightly_ones_do_not() -> None:
    events = [
        _event("a", 1, 0, 0), _event("a", 2, 0, 1), _event("a", 3, 0, 2),
        _event("b", 4, 0, 3), _event("b", 4, 0, 4, "purchase"),
        _event("d", 5, 0, 5), _event("d", 6, 0, 6),  # every item is known before the cut
        _event("a", 4, 1, 0), _event("a", 5, 1, 1), _event("a", 6, 1, 2, "purchase"),
        _event("c", 2, 1, 3),  # c's first event: not judged
    ]
    result = measure(_artifact(), events, _args(), max_len=10)
    assert result["judged_events"] == 3 and result["cut_ms"] == DAY_MS
    rates = result["hit_rates"]["all"]
    assert rates["refreshed_hr@1"] == 1.0  # 4 after 3, 5 after 4, 6 after 5
    assert rates["nightly_hr@1"] == pytest.approx(1 / 3)  # the list of the day's start: [4]
    assert rates["popularity_hr@1"] == pytest.approx(1 / 3)  # 4 (b's) is the top unseen item
    purchase = result["hit_rates"]["type:purchase"]
    assert purchase["events"] == 1 and purchase["refreshed_hr@1"] == 1.0
    assert purchase["nightly_hr@1"] == 0.0
    assert result["hit_rates"]["new_item"]["events"] == 3
    assert result["hit_rates"]["nightly_by_model"]["events"] == 3
    assert "nightly_by_popularity" not in result["hit_rates"]


def test_a_seen_item_is_never_in_an_excluding_list() -> None:
    events = [_event("a", 1, 0, 0), _event("a", 2, 0, 1), _event("a", 1, 1, 0)]
    artifact = _artifact()
    artifact.encoder = type("Back", (SuccessorEncoder,), {
        "score": lambda self, v: v @ torch.eye(N_ITEMS + 1).roll(-1, 1)})()  # predecessor
    excluded = measure(artifact, events, _args(), max_len=10)["hit_rates"]["all"]
    kept = measure(artifact, events, _args(include_seen=True), max_len=10)["hit_rates"]["all"]
    assert excluded["refreshed_hr@1"] == 0.0 and kept["refreshed_hr@1"] == 1.0


def test_a_model_that_knows_a_test_period_item_is_refused() -> None:
    events = [_event("a", 1, 0, 0), _event("a", 2, 1, 0)]  # item 2 first seen on the test day
    with pytest.raises(DataError, match="items first seen in the test period"):
        measure(_artifact(), events, _args(), max_len=10)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(1, 6), st.integers(0, 4 * 1440 - 1)),
                min_size=2, max_size=40), st.integers(1, 3))
def test_the_replay_judges_each_test_event_that_has_an_earlier_one(
    raw: list[tuple[int, int, int]], test_days: int
) -> None:
    events = sorted((_event(f"u{u}", i, 0, m) for u, i, m in raw), key=lambda e: e.ts)
    if events[-1].ts // DAY_MS - test_days + 1 <= events[0].ts // DAY_MS:
        return
    cut = cut_of(events, test_days)
    replayed = replay(events, cut, keep_popular=10)
    expected = []
    for n, event in enumerate(events):
        earlier = [e for e in events[:n] if e.user_id == event.user_id]
        if event.ts >= cut and earlier:
            day_start = event.ts // DAY_MS * DAY_MS
            expected.append((event.user_id, len(earlier),
                             sum(e.ts < day_start for e in earlier), event.item_id))
    assert [(j.user, j.position, j.day_position, j.item) for j in replayed.judged] == expected


def test_the_command_writes_the_training_part_and_needs_a_model(tmp_path: Path) -> None:
    data = tmp_path / "events.csv"
    rows = ["user_id,item_id,event_type,ts"] + [
        f"u{n % 3},{n % 5 + 1},view,{n * DAY_MS // 4}" for n in range(20)]
    data.write_text("\n".join(rows) + "\n")
    train = tmp_path / "train.csv"
    base = ["bench", "freshness", "--data", str(data), "--format", "csv", "--test-days", "2"]
    assert kvrec([*base, "--write-train", str(train)]) == 0
    written = train.read_text().splitlines()
    assert written[0] == "user_id,item_id,event_type,ts" and len(written) == 1 + 12
    assert max(int(line.split(",")[3]) for line in written[1:]) < 3 * DAY_MS
    assert kvrec(base) == 2
    assert kvrec([*base, "--json", str(tmp_path / "out.json")]) == 2
    assert not (tmp_path / "out.json").exists()


def test_a_user_new_that_day_gets_the_days_popularity_as_nightly_list() -> None:
    events = [
        _event("b", 4, 0, 0), _event("b", 4, 0, 1), _event("d", 1, 0, 2), _event("d", 2, 0, 3),
        _event("e", 1, 1, 0), _event("e", 2, 1, 1),  # e's second event: judged, nothing before day 1
    ]
    result = measure(_artifact(), events, _args(), max_len=10)["hit_rates"]
    assert result["nightly_by_popularity"]["events"] == 1 and "nightly_by_model" not in result
    assert result["all"]["refreshed_hr@1"] == 1.0  # the model follows 1 with 2
    assert result["all"]["nightly_hr@1"] == result["all"]["popularity_hr@1"] == 0.0  # [4]
