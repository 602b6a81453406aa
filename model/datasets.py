"""Interaction datasets: readers for the supported formats and a synthetic generator.

Every reader yields interactions in global replay order (time order; ties broken by user, then
by file order), with each user's own order preserved.

Formats:
    sasrec     `user item` lines (1-based integers), time-ordered per user, no timestamps and
               no event types (the SASRec preprocessing of Amazon reviews). Every line is a
               review, that is a purchase, so the event type is "purchase". Times are
               synthetic and deterministic, one session per user: user u's k-th event is at
               BASE_TS_MS + start(u) + k minutes, where start(u) = blake2b(u) mod span and
               span = events x 1 minute / CONCURRENT_USERS, so that about CONCURRENT_USERS
               users are mid-session at any moment whatever the file's size. The file is then
               sorted by (time, user's first line, k): each user's order is kept and a replay
               interleaves many users instead of playing them one after another.
    sequences  one line per user, `user item item ...` (1-based integers), the items in time
               order (the S3-Rec preprocessing of Amazon reviews, bench/datasets/). Read as
               sasrec: every event a "purchase", with the same synthetic times (a file in
               this form and its sasrec form, one `user item` line per event, give the same
               interactions). A user on two lines is refused.
    movielens  `ratings.dat` (`user::movie::rating::seconds`) or MovieLens CSV
               (`userId,movieId,rating,timestamp`, header optional); integer ids.
               rating >= 4 -> "click" (liked), otherwise "view". Ties in time are broken by
               user id (numeric), then file order.
    csv        header naming `user_id,item_id` and optionally `event_type` (default "view")
               and `ts` (epoch ms; without the column, rows are 1 ms apart in file order).
               Ties in time keep file order. A file whose name ends in `.gz` is gzip-read.
    synthetic  `SyntheticSpec`: Zipf item popularity plus real sequential structure: the items
               sit on one random cycle (each item has exactly one successor); a user's next
               event follows that successor with probability `follow_probability`, otherwise
               it is a fresh Zipf-popular draw. A sequence model can learn the successors,
               popularity cannot. Event types mix view 70%, click 20%, add_to_cart 7%,
               purchase 3%. Users' activity is Pareto-tailed; times as for sasrec.

`iter_interactions` parses eagerly (so a bad file fails at the call, naming file and line) but
holds the data as compact integer columns and builds `Interaction` objects one at a time;
`read_interactions` is its list.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np

from kvrec.errors import DataError
from kvrec.flags import integer
from kvrec.model.named_datasets import check_named, no_such_data, resolve_named

FORMATS = ("sasrec", "sequences", "movielens", "csv", "synthetic")
EVENT_TYPES = ("view", "click", "add_to_cart", "purchase")
SYNTHETIC_TYPE_MIX = (0.7, 0.2, 0.07, 0.03)
BASE_TS_MS = 1_700_000_000_000  # 2023-11-14T22:13:20Z, the epoch of synthetic times
GAP_MS = 60_000  # one minute between a user's consecutive synthetic events
CONCURRENT_USERS = 100  # synthetic times: about this many users mid-session at any moment
LIKED_RATING = 4.0  # movielens: rating >= this -> "click", else "view"


@dataclass(frozen=True, slots=True)
class Interaction:
    user_id: str
    item_id: str
    event_type: str
    ts: int  # epoch milliseconds


@dataclass(frozen=True)
class SyntheticSpec:
    users: int
    items: int
    events: int
    seed: int = 0
    follow_probability: float = 0.6
    zipf_exponent: float = 1.1


class _Columns:
    """Interactions as integer columns plus the string tables they index, in replay order."""

    def __init__(self) -> None:
        self.users: dict[str, int] = {}
        self.items: dict[str, int] = {}
        self.types: dict[str, int] = {}
        self.user: list[int] = []
        self.item: list[int] = []
        self.type: list[int] = []
        self.ts: list[int] = []

    def add(self, user: str, item: str, event_type: str, ts: int) -> int:
        """Append one row; return the user's code (codes follow first appearance)."""
        code = self.users.setdefault(user, len(self.users))
        self.user.append(code)
        self.item.append(self.items.setdefault(item, len(self.items)))
        self.type.append(self.types.setdefault(event_type, len(self.types)))
        self.ts.append(ts)
        return code

    def iterate(self, order: np.ndarray) -> Iterator[Interaction]:
        users, items, types = list(self.users), list(self.items), list(self.types)
        user, item, kind, ts = self.user, self.item, self.type, self.ts
        for row in order.tolist():
            yield Interaction(users[user[row]], items[item[row]], types[kind[row]], ts[row])


def iter_interactions(
    path: str | Path | None, fmt: str, *, synthetic: SyntheticSpec | None = None
) -> Iterator[Interaction]:
    """Interactions in replay order, built lazily from compact columns (see module doc)."""
    if fmt not in FORMATS:
        raise DataError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    if fmt == "synthetic":
        if synthetic is None:
            raise DataError("the synthetic format needs users, items and events")
        return _iter_synthetic(synthetic)
    if path is None:
        raise DataError(f"--data is required for --format {fmt}")
    file = resolve_data(path, fmt)
    check_named(file)
    reader = {
        "sasrec": _read_sasrec, "sequences": _read_sequences,
        "movielens": _read_movielens, "csv": _read_csv,
    }[fmt]
    try:
        columns, order = reader(file)
    except UnicodeDecodeError as exc:
        raise DataError(f"{file}: not UTF-8 text ({exc.reason})") from None
    except OSError as exc:
        raise DataError(f"{file}: {exc.strerror or exc}") from None
    except EOFError as exc:  # a gzip file cut short
        raise DataError(f"{file}: {exc}") from None
    if not len(order):
        raise DataError(f"{file}: no interactions")
    return columns.iterate(order)


def resolve_data(path: str | Path, fmt: str) -> Path:
    """The file `--data` names (a path, or a named dataset's file); `DataError` if there is
    none, listing the named datasets when `path` could have meant one. Reads nothing."""
    file = resolve_named(path, fmt)
    if not file.is_file():
        raise no_such_data(path)
    return file


def read_interactions(
    path: str | Path | None, fmt: str, *, synthetic: SyntheticSpec | None = None
) -> list[Interaction]:
    """All interactions in replay order; `DataError` names the file and line of a bad one."""
    return list(iter_interactions(path, fmt, synthetic=synthetic))


def group_by_user(interactions: Iterable[Interaction]) -> dict[str, list[Interaction]]:
    """Each user's interactions, in the order given (replay order keeps per-user time order)."""
    users: dict[str, list[Interaction]] = defaultdict(list)
    for interaction in interactions:
        users[interaction.user_id].append(interaction)
    return dict(users)


def _session_starts(user_ids: Iterable[str], total_events: int) -> np.ndarray:
    """Each user's synthetic start offset (ms): a hash of the id, spread over a span sized so
    that about CONCURRENT_USERS one-event-a-minute sessions overlap at any moment."""
    span = max(GAP_MS, total_events * GAP_MS // CONCURRENT_USERS)
    return np.array(
        [int.from_bytes(hashlib.blake2b(u.encode(), digest_size=8).digest(), "little") % span
         for u in user_ids],
        dtype=np.int64,
    )


def _read_sasrec(file: Path) -> tuple[_Columns, np.ndarray]:
    columns = _Columns()
    position: list[int] = []  # k: index of the row within its user's sequence
    seen: list[int] = []  # events so far per user code
    with file.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2 or not (parts[0].isdigit() and parts[1].isdigit()):
                raise DataError(f"{file}:{number}: expected `user item` integers, got {line!r}")
            code = columns.add(parts[0], parts[1], "purchase", 0)
            if code == len(seen):
                seen.append(0)
            position.append(seen[code])
            seen[code] += 1
    return _synthetic_times(columns, position)


def _read_sequences(file: Path) -> tuple[_Columns, np.ndarray]:
    columns = _Columns()
    position: list[int] = []  # k: index of the row within its user's sequence
    with file.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) < 2 or not all(part.isdigit() for part in parts):
                raise DataError(
                    f"{file}:{number}: expected `user item item ...` integers, got {line!r}"
                )
            if parts[0] in columns.users:
                raise DataError(f"{file}:{number}: user {parts[0]} already had a line")
            for k, item in enumerate(parts[1:]):
                columns.add(parts[0], item, "purchase", 0)
                position.append(k)
    return _synthetic_times(columns, position)


def _synthetic_times(columns: _Columns, position: list[int]) -> tuple[_Columns, np.ndarray]:
    """Set the sasrec synthetic times (module doc) from each row's index within its user's
    sequence, and return the replay order: by time, then user's first line, then index."""
    starts = _session_starts(columns.users, len(columns.user))
    user = np.asarray(columns.user, dtype=np.int64)
    k = np.asarray(position, dtype=np.int64)
    ts = BASE_TS_MS + starts[user] + k * GAP_MS
    columns.ts = ts.tolist()
    return columns, np.lexsort((k, user, ts))


def _read_movielens(file: Path) -> tuple[_Columns, np.ndarray]:
    columns = _Columns()
    user_number: list[int] = []
    with file.open(encoding="utf-8", newline="") as lines:
        separator = None
        for number, line in enumerate(lines, start=1):
            text = line.strip()
            if not text:
                continue
            if separator is None:
                separator = "::" if "::" in text else ","
                if separator == "," and text.lower().startswith("userid"):
                    continue  # the MovieLens CSV header
            parts = text.split(separator)
            try:
                if len(parts) != 4:
                    raise ValueError
                user, movie = int(parts[0]), int(parts[1])
                rating, seconds = float(parts[2]), int(parts[3])
            except ValueError:
                fields = separator.join(("user", "movie", "rating", "timestamp"))
                raise DataError(f"{file}:{number}: expected {fields}, got {text!r}") from None
            event_type = "click" if rating >= LIKED_RATING else "view"
            columns.add(str(user), str(movie), event_type, seconds * 1000)
            user_number.append(user)
    order = np.lexsort((np.asarray(user_number, dtype=np.int64), np.asarray(columns.ts)))
    return columns, order


def _open_text(file: Path) -> TextIO:
    """The file as text; gzip-read when its name ends in `.gz`."""
    if file.suffix == ".gz":
        return gzip.open(file, "rt", encoding="utf-8", newline="")
    return file.open(encoding="utf-8", newline="")


def _read_csv(file: Path) -> tuple[_Columns, np.ndarray]:
    columns = _Columns()
    with _open_text(file) as handle:
        reader = csv.reader(handle)
        header = [name.strip() for name in next(reader, [])]
        if not {"user_id", "item_id"} <= set(header):
            raise DataError(
                f"{file}:1: the header must name user_id and item_id (and may name event_type, ts)"
            )
        where = {name: header.index(name) for name in ("user_id", "item_id", "event_type", "ts")
                 if name in header}
        for row in reader:
            number = reader.line_num
            if not row or all(not cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                raise DataError(f"{file}:{number}: expected {len(header)} fields, got {len(row)}")
            user, item = row[where["user_id"]].strip(), row[where["item_id"]].strip()
            if not user or not item:
                raise DataError(f"{file}:{number}: empty user_id or item_id")
            event_type = row[where["event_type"]].strip() if "event_type" in where else ""
            if "ts" in where:
                raw_ts = row[where["ts"]].strip()
                try:
                    ts = int(raw_ts)
                except ValueError:
                    raise DataError(
                        f"{file}:{number}: ts must be integer epoch ms, got {raw_ts!r}"
                    ) from None
            else:
                ts = BASE_TS_MS + len(columns.ts)
            columns.add(user, item, event_type or "view", ts)
    return columns, np.argsort(np.asarray(columns.ts, dtype=np.int64), kind="stable")


def generate_synthetic(spec: SyntheticSpec) -> list[Interaction]:
    """The synthetic dataset of `spec` in replay order (deterministic for a seed)."""
    return list(_iter_synthetic(spec))


def _iter_synthetic(spec: SyntheticSpec) -> Iterator[Interaction]:
    if spec.users < 1 or spec.items < 2 or spec.events < 1:
        raise DataError("synthetic data needs users >= 1, items >= 2 and events >= 1")
    if not 0.0 <= spec.follow_probability <= 1.0:
        raise DataError("synthetic follow_probability must be in [0, 1]")
    rng = np.random.default_rng(spec.seed)
    ranks = np.arange(1, spec.items + 1, dtype=np.float64)
    popularity = ranks**-spec.zipf_exponent
    popularity /= popularity.sum()
    item_of_rank = rng.permutation(spec.items) + 1  # popular ranks land on random item ids
    chain = rng.permutation(spec.items) + 1  # successor of chain[j] is chain[j + 1] (a cycle)
    place_in_chain = np.empty(spec.items + 1, dtype=np.int64)
    place_in_chain[chain] = np.arange(spec.items)
    # events per user: a long tail, every user at least one event
    weights = rng.pareto(1.5, spec.users) + 1.0
    counts = np.maximum(1, np.floor(weights / weights.sum() * spec.events)).astype(np.int64)
    counts[np.argmax(counts)] += max(0, spec.events - int(counts.sum()))
    total = int(counts.sum())
    popular_draws = item_of_rank[rng.choice(spec.items, size=total, p=popularity)]
    follow = rng.random(total) < spec.follow_probability
    types = rng.choice(len(EVENT_TYPES), size=total, p=SYNTHETIC_TYPE_MIX)

    row = np.arange(total, dtype=np.int64)
    user = np.repeat(np.arange(spec.users, dtype=np.int64), counts)
    k = row - np.repeat(np.cumsum(counts) - counts, counts)  # index within the user's sequence
    # a run starts at a user's first event or a fresh draw, then walks the chain step by step
    run_start = np.maximum.accumulate(np.where(~follow | (k == 0), row, 0))
    steps = row - run_start
    item = chain[(place_in_chain[popular_draws[run_start]] + steps) % spec.items]

    user_ids = [f"u{u}" for u in range(spec.users)]
    starts = _session_starts(user_ids, total)
    ts = BASE_TS_MS + starts[user] + k * GAP_MS
    order = np.lexsort((k, user, ts))[: spec.events]
    columns = [a[order].tolist() for a in (user, item, types, ts)]

    def rows() -> Iterator[Interaction]:
        for u, i, t, stamp in zip(*columns, strict=True):
            yield Interaction(user_ids[u], f"i{i}", EVENT_TYPES[t], stamp)

    return rows()


def add_dataset_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("dataset")
    group.add_argument(
        "--data", default=None,
        help="dataset file, or a named dataset (amazon-beauty, amazon-toys, amazon-games), "
        "read from its committed file and sha256-checked (not for synthetic)",
    )
    group.add_argument("--format", default="sasrec", choices=FORMATS, help="dataset format")
    group.add_argument("--synthetic-users", type=integer(1), default=2_000)
    group.add_argument("--synthetic-items", type=integer(2), default=1_000)
    group.add_argument("--synthetic-events", type=integer(1), default=50_000)
    group.add_argument(
        "--seed", type=integer(0, 2**32 - 1), default=0, help="synthetic data (and training) seed"
    )


def spec_from_args(args: argparse.Namespace) -> SyntheticSpec | None:
    if args.format != "synthetic":
        return None
    return SyntheticSpec(args.synthetic_users, args.synthetic_items, args.synthetic_events, args.seed)


def check_dataset_arguments(args: argparse.Namespace) -> None:
    """What `dataset_from_args` would refuse without reading the file: a --format that needs
    --data without it, a --data that is neither a file nor a named dataset (or one stored in
    another format). Commands call it before their heavy imports."""
    if args.format == "synthetic":
        return
    if args.data is None:
        raise DataError(f"--data is required for --format {args.format}")
    resolve_data(args.data, args.format)


def dataset_from_args(args: argparse.Namespace) -> list[Interaction]:
    return read_interactions(args.data, args.format, synthetic=spec_from_args(args))
