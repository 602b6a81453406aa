"""Named datasets: the committed files, their sha256, and a changed copy refused."""

from __future__ import annotations

import hashlib
import shutil
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from kvrec.errors import DataError
from kvrec.model import named_datasets
from kvrec.model.datasets import read_interactions
from kvrec.model.named_datasets import BUNDLED_DIR, NAMED_DATASETS

COMMITTED = [d for d in NAMED_DATASETS.values() if d.path.parent == BUNDLED_DIR]


def test_two_or_more_datasets_are_committed() -> None:
    assert {d.name for d in COMMITTED} >= {"amazon-beauty", "amazon-toys", "retailrocket"}
    readme = (BUNDLED_DIR / "README.md").read_text()
    for dataset in COMMITTED:
        assert dataset.sha256 in readme and dataset.path.name in readme


@pytest.mark.parametrize("dataset", COMMITTED, ids=lambda d: d.name)
def test_committed_file_has_its_recorded_sha256_and_size(dataset: named_datasets.NamedDataset) -> None:
    assert hashlib.sha256(dataset.path.read_bytes()).hexdigest() == dataset.sha256
    data = read_interactions(dataset.name, dataset.format)
    assert len(data) == dataset.interactions
    assert len({e.user_id for e in data}) == dataset.users
    assert len({e.item_id for e in data}) == dataset.items
    if dataset.format == "sequences":
        assert min(Counter(e.user_id for e in data).values()) >= 5  # 5-core


def test_retailrocket_is_a_time_ordered_clickstream_of_three_event_types() -> None:
    data = read_interactions("retailrocket", "csv")
    assert Counter(e.event_type for e in data) == {
        "view": 75_374, "add_to_cart": 12_456, "purchase": 9_551}
    times = [e.ts for e in data]
    assert times == sorted(times)
    # Unix seconds as epoch ms, May to September 2015
    assert 1_430_000_000_000 < times[0] < times[-1] < 1_443_000_000_000
    assert all(t % 1000 == 0 for t in times)


def test_a_gzip_csv_is_read_and_a_broken_one_is_a_clear_error(tmp_path: Path) -> None:
    import gzip

    text = "user_id,item_id,event_type,ts\n1,7,view,2000\n1,8,purchase,1000\n"
    good = tmp_path / "events.csv.gz"
    good.write_bytes(gzip.compress(text.encode()))
    plain = tmp_path / "events.csv"
    plain.write_text(text)
    assert read_interactions(good, "csv") == read_interactions(plain, "csv")
    cut = tmp_path / "cut.csv.gz"
    cut.write_bytes(good.read_bytes()[:-12])
    not_gzip = tmp_path / "not.csv.gz"
    not_gzip.write_text(text)
    for bad in (cut, not_gzip):
        with pytest.raises(DataError, match=str(bad.name)):
            read_interactions(bad, "csv")


def test_reading_by_name_and_by_path_agree() -> None:
    beauty = NAMED_DATASETS["amazon-beauty"]
    assert read_interactions("amazon-beauty", "sequences") == read_interactions(
        beauty.path, "sequences"
    )


def test_a_name_with_another_format_is_refused() -> None:
    with pytest.raises(DataError, match="amazon-beauty is stored in the sequences format"):
        read_interactions("amazon-beauty", "sasrec")


def test_a_changed_copy_is_refused_naming_the_file_and_both_hashes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    beauty = NAMED_DATASETS["amazon-beauty"]
    copy = tmp_path / "amazon-beauty.txt"
    shutil.copyfile(beauty.path, copy)
    monkeypatch.setitem(NAMED_DATASETS, beauty.name, replace(beauty, path=copy))
    assert len(read_interactions("amazon-beauty", "sequences")) == beauty.interactions  # intact
    text = copy.read_text()
    changed = text.replace("1 1 2 3 4 5\n", "1 1 2 3 4 6\n", 1)  # one item of user 1
    assert changed != text
    copy.write_text(changed)
    actual = hashlib.sha256(copy.read_bytes()).hexdigest()
    for data in ("amazon-beauty", copy):  # by name and by path
        with pytest.raises(DataError) as refused:
            read_interactions(data, "sequences")
        message = str(refused.value)
        assert str(copy) in message and actual in message and beauty.sha256 in message


def test_a_missing_named_file_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    games = NAMED_DATASETS["amazon-games"]
    monkeypatch.setitem(NAMED_DATASETS, games.name, replace(games, path=tmp_path / "gone.txt"))
    with pytest.raises(DataError, match=r"amazon-games: its file .*gone\.txt is missing"):
        read_interactions("amazon-games", "sasrec")


@given(st.text(alphabet=st.characters(blacklist_characters="/\x00", blacklist_categories=("Cs",)),
               min_size=1, max_size=30))
def test_a_word_that_is_neither_a_file_nor_a_name_lists_the_names(word: str) -> None:
    assume(word not in NAMED_DATASETS and not Path(word).exists())
    with pytest.raises(DataError) as refused:
        read_interactions(word, "sasrec")
    message = str(refused.value)
    assert message.startswith(f"{word}: no such file, nor a named dataset (")
    assert all(name in message for name in NAMED_DATASETS)


def test_a_misspelt_name_is_offered_the_closest_one() -> None:
    with pytest.raises(DataError) as refused:
        read_interactions("amazon-gamez", "sasrec")
    assert str(refused.value) == (
        "amazon-gamez: no such file, nor a named dataset (amazon-beauty, amazon-toys, "
        "amazon-games, retailrocket); did you mean amazon-games?"
    )


def test_a_missing_path_is_only_a_missing_file() -> None:
    with pytest.raises(DataError, match=r"^/no/such/file.txt: no such file$"):
        read_interactions("/no/such/file.txt", "sasrec")
