"""Interaction datasets: readers for the supported formats and a synthetic generator.

Every reader returns interactions in global replay order (time order, ties broken by user and
then file order), with each user's own order preserved.

Formats:
    sasrec     `user item` lines, time-ordered per user, no timestamps and no event types
               (the SASRec preprocessing of Amazon reviews: every line is a review, so the
               event type is "purchase"). Times are synthetic and deterministic: user u's
               events are spread one minute apart from a start time drawn from a hash of u
               over a 30-day span, so a replay interleaves users instead of playing them one
               after another.
    movielens  `ratings.dat` (`user::movie::rating::seconds`) or MovieLens CSV (header
               `userId,movieId,rating,timestamp`); rating >= 4 -> "purchase", else "view".
    csv        header with `user_id,item_id` and optionally `event_type` (default "view") and
               `ts` (epoch ms; default: file order).
    synthetic  `SyntheticSpec`: Zipf item popularity plus real sequential structure (items sit
               on random chains; the next event follows the chain with probability 0.6), so a
               sequence model can beat popularity on it.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model.errors import DataError

FORMATS = ("sasrec", "movielens", "csv", "synthetic")
BASE_TS_MS = 1_700_000_000_000
SPAN_MS = 30 * 24 * 3600 * 1000
GAP_MS = 60_000
EVENT_TYPES = ("view", "click", "add_to_cart", "purchase")


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


def read_interactions(
    path: str | Path | None, fmt: str, *, synthetic: SyntheticSpec | None = None
) -> list[Interaction]:
    if fmt not in FORMATS:
        raise DataError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    if fmt == "synthetic":
        if synthetic is None:
            raise DataError("the synthetic format needs users, items and events")
        return generate_synthetic(synthetic)
    if path is None:
        raise DataError(f"--data is required for --format {fmt}")
    file = Path(path)
    if not file.is_file():
        raise DataError(f"{file}: no such file")
    reader = {"sasrec": _read_sasrec, "movielens": _read_movielens, "csv": _read_csv}[fmt]
    interactions = reader(file)
    if not interactions:
        raise DataError(f"{file}: no interactions")
    return interactions


def group_by_user(interactions: Iterable[Interaction]) -> dict[str, list[Interaction]]:
    """Each user's interactions, in the order given (replay order keeps per-user time order)."""
    users: dict[str, list[Interaction]] = defaultdict(list)
    for interaction in interactions:
        users[interaction.user_id].append(interaction)
    return dict(users)


def _sort(records: list[tuple[int, int, int, Interaction]]) -> list[Interaction]:
    records.sort(key=lambda r: (r[0], r[1], r[2]))
    return [r[3] for r in records]


def _user_start(user_id: str) -> int:
    digest = hashlib.blake2b(user_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % SPAN_MS


def _read_sasrec(file: Path) -> list[Interaction]:
    per_user: dict[str, list[str]] = defaultdict(list)
    with file.open() as lines:
        for number, line in enumerate(lines, start=1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2 or not (parts[0].isdigit() and parts[1].isdigit()):
                raise DataError(f"{file}:{number}: expected `user item` integers, got {line!r}")
            per_user[parts[0]].append(parts[1])
    records = []
    for rank, (user, items) in enumerate(per_user.items()):
        start = BASE_TS_MS + _user_start(user)
        for k, item in enumerate(items):
            ts = start + k * GAP_MS
            records.append((ts, rank, k, Interaction(user, item, "purchase", ts)))
    return _sort(records)


def _read_movielens(file: Path) -> list[Interaction]:
    records = []
    with file.open(newline="") as lines:
        first = lines.readline()
        csv_mode = "," in first
        if not (csv_mode and first.lower().startswith("userid")):
            lines.seek(0)
        for number, line in enumerate(lines, start=1 if not csv_mode else 2):
            if not line.strip():
                continue
            parts = line.strip().split("," if csv_mode else "::")
            try:
                user, movie, rating, seconds = parts[0], parts[1], float(parts[2]), int(parts[3])
            except (IndexError, ValueError):
                raise DataError(
                    f"{file}:{number}: expected user{',' if csv_mode else '::'}movie"
                    f"{',' if csv_mode else '::'}rating{',' if csv_mode else '::'}timestamp, "
                    f"got {line.strip()!r}"
                ) from None
            event_type = "purchase" if rating >= 4 else "view"
            interaction = Interaction(user, movie, event_type, seconds * 1000)
            records.append((interaction.ts, int(user), number, interaction))
    return _sort(records)


def _read_csv(file: Path) -> list[Interaction]:
    records = []
    with file.open(newline="") as handle:
        reader = csv.DictReader(handle)
        fields = set(reader.fieldnames or [])
        if not {"user_id", "item_id"} <= fields:
            raise DataError(
                f"{file}:1: the header must name user_id and item_id (and may name event_type, ts)"
            )
        for number, row in enumerate(reader, start=2):
            user, item = (row.get("user_id") or "").strip(), (row.get("item_id") or "").strip()
            if not user or not item:
                raise DataError(f"{file}:{number}: empty user_id or item_id")
            event_type = (row.get("event_type") or "view").strip()
            try:
                ts = int(row["ts"]) if row.get("ts") else BASE_TS_MS + number
            except ValueError:
                raise DataError(
                    f"{file}:{number}: ts must be integer epoch ms, got {row['ts']!r}"
                ) from None
            records.append((ts, 0, number, Interaction(user, item, event_type, ts)))
    return _sort(records)


def generate_synthetic(spec: SyntheticSpec) -> list[Interaction]:
    if spec.users < 1 or spec.items < 2 or spec.events < 1:
        raise DataError("synthetic data needs users >= 1, items >= 2 and events >= 1")
    rng = np.random.default_rng(spec.seed)
    ranks = np.arange(1, spec.items + 1, dtype=np.float64)
    popularity = ranks ** -spec.zipf_exponent
    popularity /= popularity.sum()
    item_of_rank = rng.permutation(spec.items) + 1  # popular ranks land on random item ids
    successor = np.empty(spec.items + 1, dtype=np.int64)
    chain = rng.permutation(spec.items) + 1
    successor[chain] = np.roll(chain, -1)
    # events per user: a long tail, every user at least one event
    weights = rng.pareto(1.5, spec.users) + 1.0
    counts = np.maximum(1, np.floor(weights / weights.sum() * spec.events)).astype(np.int64)
    counts[np.argmax(counts)] += max(0, spec.events - int(counts.sum()))
    popular_draws = item_of_rank[rng.choice(spec.items, size=int(counts.sum()), p=popularity)]
    follow = rng.random(int(counts.sum())) < spec.follow_probability
    types = rng.choice(len(EVENT_TYPES), size=int(counts.sum()), p=(0.7, 0.2, 0.07, 0.03))
    records = []
    position = 0
    for user in range(spec.users):
        user_id = f"u{user}"
        start = BASE_TS_MS + _user_start(user_id)
        current = int(popular_draws[position])
        for k in range(int(counts[user])):
            if k > 0:
                chained = follow[position]
                current = int(successor[current] if chained else popular_draws[position])
            event_type = EVENT_TYPES[types[position]]
            interaction = Interaction(user_id, f"i{current}", event_type, start + k * GAP_MS)
            records.append((interaction.ts, user, k, interaction))
            position += 1
    return _sort(records)[: spec.events]


def add_dataset_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("dataset")
    group.add_argument("--data", default=None, help="dataset file (not for synthetic)")
    group.add_argument("--format", default="sasrec", choices=FORMATS)
    group.add_argument("--synthetic-users", type=int, default=2_000)
    group.add_argument("--synthetic-items", type=int, default=1_000)
    group.add_argument("--synthetic-events", type=int, default=50_000)
    group.add_argument("--seed", type=int, default=0)


def dataset_from_args(args: argparse.Namespace) -> list[Interaction]:
    spec = None
    if args.format == "synthetic":
        spec = SyntheticSpec(
            args.synthetic_users, args.synthetic_items, args.synthetic_events, args.seed
        )
    return read_interactions(args.data, args.format, synthetic=spec)
