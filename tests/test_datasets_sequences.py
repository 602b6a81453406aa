"""The `sequences` format: one line per user, `user item item ...` (the S3-Rec files)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvrec.errors import DataError
from kvrec.model.datasets import group_by_user, read_interactions


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_sequences_read_as_the_same_events_in_sasrec_form(tmp_path: Path) -> None:
    rows = {1: [5, 6, 7], 2: [6, 9], 10: [1, 2, 3, 4, 5, 6], 3: [7]}
    sequences = _write(
        tmp_path, "seq.txt", "".join(f"{u} {' '.join(map(str, items))}\n" for u, items in rows.items())
    )
    sasrec = _write(
        tmp_path, "pairs.txt", "".join(f"{u} {i}\n" for u, items in rows.items() for i in items)
    )
    data = read_interactions(sequences, "sequences")
    assert data == read_interactions(sasrec, "sasrec")  # same events, times and replay order
    by_user = group_by_user(data)
    assert {u: [int(e.item_id) for e in events] for u, events in by_user.items()} == {
        str(u): items for u, items in rows.items()
    }
    assert {e.event_type for e in data} == {"purchase"}


def test_sequences_skip_blank_lines(tmp_path: Path) -> None:
    data = read_interactions(_write(tmp_path, "s.txt", "\n1 2 3\n\n2 3\n"), "sequences")
    assert sorted((e.user_id, e.item_id) for e in data) == [("1", "2"), ("1", "3"), ("2", "3")]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1 2 3\n4\n", r"s\.txt:2: expected `user item item \.\.\.` integers"),
        ("1 2 x\n", r"s\.txt:1: expected `user item item \.\.\.` integers"),
        ("1 2 3\n2 5\n1 7\n", r"s\.txt:3: user 1 already had a line"),
        ("1 -2\n", r"s\.txt:1: expected"),
    ],
)
def test_sequences_refuse_malformed_lines(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(DataError, match=message):
        read_interactions(_write(tmp_path, "s.txt", text), "sequences")


def test_sequences_refuse_an_empty_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no interactions"):
        read_interactions(_write(tmp_path, "s.txt", "\n"), "sequences")
