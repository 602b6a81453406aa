"""Named datasets: files that are part of the project, read by name and checked by sha256.

    kvrec train --data amazon-beauty --format sequences --out artifacts/beauty

A name given to `--data` (one that is not a file) reads the dataset's file; its format must be
the one it is stored in. Whether it was named or given by its path, a named dataset's file is
hashed on every read and refused when its sha256 is not the recorded one, so a figure measured
on it is always measured on the same data. Nothing is downloaded: amazon-beauty and
amazon-toys (sequences) and retailrocket (csv: view, add_to_cart and purchase events with their
times) are committed under bench/datasets/ (bench/datasets/README.md: source, licence, sizes);
amazon-games is read from ../shared/datasets/ beside the checkout, as before.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path

from kvrec.errors import DataError
from kvrec.model.checksums import file_sha256

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLED_DIR = REPO_ROOT / "bench" / "datasets"
SHARED_DIR = REPO_ROOT.parent / "shared" / "datasets"


@dataclass(frozen=True)
class NamedDataset:
    name: str
    path: Path
    format: str
    sha256: str
    users: int
    items: int
    interactions: int


NAMED_DATASETS: dict[str, NamedDataset] = {
    dataset.name: dataset
    for dataset in (
        NamedDataset(
            "amazon-beauty", BUNDLED_DIR / "amazon-beauty.txt", "sequences",
            "226cce9c3105299ca0db9615d7d3fb32b3175e90da43100ae352599f0f0107b8",
            22_363, 12_101, 198_502,
        ),
        NamedDataset(
            "amazon-toys", BUNDLED_DIR / "amazon-toys.txt", "sequences",
            "176c680c688d497598c4a89a03b402c0fe78d795e5db335c2e78dd5f2d778a3f",
            19_412, 11_924, 167_597,
        ),
        NamedDataset(
            "amazon-games", SHARED_DIR / "amazon-games.txt", "sasrec",
            "b7376fe24430743f411dc7f567285657b2adb3f74361cc7ba0aee94f3024b651",
            31_013, 23_715, 287_107,
        ),
        NamedDataset(
            "retailrocket", BUNDLED_DIR / "retailrocket.csv.gz", "csv",
            "4a03cc8fe94455914e13f0dd3fdf19038190fcac537c670ab84351054cb76f20",
            2_174, 29_905, 97_381,
        ),
    )
}


def resolve_named(data: str | Path, fmt: str) -> Path:
    """The file to read for `--data`: the named dataset's file when `data` names one and is
    not itself a file, else `data` as a path. A name with another format is refused."""
    named = NAMED_DATASETS.get(str(data))
    if named is None or Path(data).is_file():
        return Path(data)
    if fmt != named.format:
        raise DataError(
            f"{named.name} is stored in the {named.format} format: pass --format {named.format}"
        )
    if not named.path.is_file():
        raise DataError(f"{named.name}: its file {named.path} is missing")
    return named.path


def no_such_data(data: str | Path) -> DataError:
    """The error for a `--data` that is neither a file nor a named dataset: a bare word may have
    meant a name, so the names are listed (and the closest one offered)."""
    text = str(data)
    if "/" in text:
        return DataError(f"{text}: no such file")
    names = ", ".join(NAMED_DATASETS)
    close = difflib.get_close_matches(text, NAMED_DATASETS, n=1)
    hint = f"; did you mean {close[0]}?" if close else ""
    return DataError(f"{text}: no such file, nor a named dataset ({names}){hint}")


def named_for(file: Path) -> NamedDataset | None:
    """The named dataset whose file `file` is, if any."""
    try:
        resolved = file.resolve()
    except OSError:
        return None
    for named in NAMED_DATASETS.values():
        if named.path.resolve() == resolved:
            return named
    return None


def check_named(file: Path) -> None:
    """Refuse a named dataset's file whose sha256 is not the recorded one."""
    named = named_for(file)
    if named is None:
        return
    actual = file_sha256(file)
    if actual != named.sha256:
        raise DataError(
            f"{file}: sha256 {actual} is not the recorded {named.sha256} of dataset "
            f"{named.name}: the file was changed; restore it (git checkout) before measuring"
        )
