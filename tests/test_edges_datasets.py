"""Dataset readers and the synthetic generator."""

from __future__ import annotations

import itertools
import time
from collections import Counter
from pathlib import Path

import pytest

from kvrec.errors import DataError
from kvrec.model.datasets import (
    EVENT_TYPES,
    Interaction,
    SyntheticSpec,
    generate_synthetic,
    group_by_user,
    iter_interactions,
    read_interactions,
)


def _write(tmp_path: Path, name: str, text: str | bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def _in_time_order(data: list[Interaction]) -> bool:
    return all(a.ts <= b.ts for a, b in itertools.pairwise(data))


def test_sasrec_keeps_each_users_order_and_interleaves_users(tmp_path: Path) -> None:
    lines = [f"{user} {100 * user + k}" for user in range(1, 41) for k in range(5)]  # users in blocks
    data = read_interactions(_write(tmp_path, "seq.txt", "\n".join(lines) + "\n"), "sasrec")
    assert len(data) == 200 and _in_time_order(data)
    assert {i.event_type for i in data} == {"purchase"}
    for user, events in group_by_user(data).items():
        assert [e.item_id for e in events] == [str(100 * int(user) + k) for k in range(5)]
        assert [b.ts - a.ts for a, b in itertools.pairwise(events)] == [60_000] * 4
    switches = sum(a.user_id != b.user_id for a, b in itertools.pairwise(data))
    assert switches > 100  # the file is blocks of users; the replay is not
    assert read_interactions(tmp_path / "seq.txt", "sasrec") == data  # deterministic


def test_movielens_dat_and_csv(tmp_path: Path) -> None:
    dat = _write(tmp_path, "ratings.dat", "1::5::4::100\n2::6::2::50\n1::7::3::100\n\n")
    assert [(i.user_id, i.item_id, i.event_type, i.ts) for i in read_interactions(dat, "movielens")] == [
        ("2", "6", "view", 50_000), ("1", "5", "click", 100_000), ("1", "7", "view", 100_000),
    ]
    csv = _write(tmp_path, "ratings.csv", "userId,movieId,rating,timestamp\n10,5,4.5,7\n2,6,3.5,7\n")
    assert [(i.user_id, i.event_type) for i in read_interactions(csv, "movielens")] == [
        ("2", "view"), ("10", "click"),  # same time: numeric user order
    ]
    headless = _write(tmp_path, "plain.csv", "3,5,1,9\n3,x,2,10\n")
    with pytest.raises(DataError, match=r"plain\.csv:2: expected user,movie,rating,timestamp"):
        read_interactions(headless, "movielens")


def test_csv_with_and_without_optional_columns(tmp_path: Path) -> None:
    full = _write(tmp_path, "e.csv", "ts,user_id,item_id,event_type\n5,A,x,click\n3,B,y,\n5,A,z,purchase\n")
    assert [(i.user_id, i.item_id, i.event_type, i.ts) for i in read_interactions(full, "csv")] == [
        ("B", "y", "view", 3), ("A", "x", "click", 5), ("A", "z", "purchase", 5),
    ]
    bare = read_interactions(_write(tmp_path, "bare.csv", "user_id,item_id\nA,x\nB,y\n"), "csv")
    assert [i.item_id for i in bare] == ["x", "y"] and bare[1].ts - bare[0].ts == 1


@pytest.mark.parametrize(
    ("fmt", "text", "message"),
    [
        ("sasrec", "1 10\n1 eleven\n", r"bad:2: expected `user item` integers"),
        ("sasrec", "1 10\n\n2 3 4\n", r"bad:3: expected `user item` integers"),
        ("sasrec", b"1 10\n\xff 3\n", "not UTF-8"),
        ("sasrec", "\n\n", "no interactions"),
        ("movielens", "1::2::3\n", r"bad:1: expected user::movie::rating::timestamp"),
        ("csv", "user,item\nA,x\n", r"bad:1: the header must name user_id and item_id"),
        ("csv", "user_id,item_id,ts\nA,x,1\nB,y,soon\n", r"bad:3: ts must be integer epoch ms"),
        ("csv", "user_id,item_id,ts\nA,x,1\nB,y\n", r"bad:3: expected 3 fields, got 2"),
        ("csv", "user_id,item_id\nA,\n", r"bad:2: empty user_id or item_id"),
    ],
)
def test_malformed_files_name_file_and_line(tmp_path: Path, fmt: str, text: str, message: str) -> None:
    with pytest.raises(DataError, match=message):
        read_interactions(_write(tmp_path, "bad", text), fmt)


def test_missing_file_unknown_format_and_missing_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"missing\.txt: no such file"):
        read_interactions(tmp_path / "missing.txt", "sasrec")
    with pytest.raises(DataError, match="no such file"):
        read_interactions(tmp_path, "csv")  # a directory
    with pytest.raises(DataError, match="unknown format"):
        read_interactions(tmp_path / "x", "parquet")
    with pytest.raises(DataError, match="--data is required"):
        read_interactions(None, "movielens")
    with pytest.raises(DataError, match="users >= 1"):
        iter_interactions(None, "synthetic", synthetic=SyntheticSpec(0, 10, 10))  # fails eagerly


def test_iter_and_read_agree(tmp_path: Path) -> None:
    path = _write(tmp_path, "seq.txt", "".join(f"{u} {i}\n" for u in range(1, 30) for i in range(u % 7 + 1)))
    assert list(iter_interactions(path, "sasrec")) == read_interactions(path, "sasrec")
    spec = SyntheticSpec(30, 50, 700, seed=3)
    assert list(iter_interactions(None, "synthetic", synthetic=spec)) == generate_synthetic(spec)


def test_synthetic_is_deterministic_and_realistic() -> None:
    spec = SyntheticSpec(users=200, items=500, events=20_000, seed=4)
    data = generate_synthetic(spec)
    assert data == generate_synthetic(spec) and data != generate_synthetic(SyntheticSpec(200, 500, 20_000, 5))
    assert len(data) == 20_000 and _in_time_order(data)
    assert len({i.user_id for i in data}) == 200
    types = Counter(i.event_type for i in data)
    assert [t for t, _ in types.most_common()] == list(EVENT_TYPES)  # view > click > cart > purchase
    items = Counter(i.item_id for i in data)
    top_share = sum(n for _, n in items.most_common(25)) / len(data)
    assert top_share > 0.2  # Zipf head: 5% of the items, a large share of the events


def test_synthetic_has_sequence_structure_that_popularity_cannot_see() -> None:
    """Predicting the next item: the most frequent successor of the current item (what a sequence
    model can learn) beats the most popular item (what popularity knows) by a wide margin."""
    users = group_by_user(generate_synthetic(SyntheticSpec(users=400, items=400, events=40_000, seed=1)))
    train = [events for user, events in users.items() if int(user[1:]) % 2 == 0]
    test = [events for user, events in users.items() if int(user[1:]) % 2 == 1]  # held-out users
    successors: dict[str, Counter[str]] = {}
    for events in train:
        for a, b in itertools.pairwise(events):
            successors.setdefault(a.item_id, Counter())[b.item_id] += 1
    most_popular = Counter(i.item_id for events in train for i in events).most_common(1)[0][0]
    pairs = [(a, b) for events in test for a, b in itertools.pairwise(events)]
    by_sequence = sum(
        b.item_id == successors[a.item_id].most_common(1)[0][0]
        for a, b in pairs if a.item_id in successors
    ) / len(pairs)
    by_popularity = sum(b.item_id == most_popular for _, b in pairs) / len(pairs)
    assert by_sequence > 0.5 and by_sequence > 5 * by_popularity


def test_synthetic_generation_is_fast() -> None:
    started = time.perf_counter()
    data = generate_synthetic(SyntheticSpec(users=5_000, items=20_000, events=200_000, seed=0))
    assert len(data) == 200_000
    assert time.perf_counter() - started < 5.0  # ~0.4 s alone on one core; generous when shared
