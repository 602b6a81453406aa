"""`kvrec bench freshness`: recommendations refreshed on every event against a nightly batch.

    kvrec bench freshness --data retailrocket --format csv --test-days 14 \\
        --write-train /tmp/retailrocket-train.csv
    kvrec train --data /tmp/retailrocket-train.csv --format csv --out artifacts/retailrocket
    kvrec bench freshness --data retailrocket --format csv --test-days 14 \\
        --model artifacts/retailrocket --json bench/results/freshness-retailrocket.json

The data are replayed in time order. The test period is the last `--test-days` UTC days (the
day of the last event counts as one); the model must have been trained on the events before it
only (`--write-train` writes them; a model that knows an item first seen in the test period is
refused). Every test-period event of a user who had an earlier event is judged, as the worker's
prequential hit rate judges it: a hit when its item is in the list the user held just before
it. Three lists, each of `--k` items:

- refreshed: the model's list from the user's whole history up to the previous event (what the
  worker publishes after every event; the encoder sees the last max-len events, as `kvrec eval`);
- nightly: the same model's list from the history as it stood at the start of the event's UTC
  day, frozen for the day (a nightly batch); a user with no history before that day gets that
  day's popularity list, as a nightly batch would serve them;
- popularity: the most frequent items over all events before the start of the day.

Each list leaves out the items the user had when it was made (the worker's `--exclude-seen`;
`--include-seen` keeps them), so a repeat of an item seen earlier can be a hit only with
`--include-seen`. Hit rates are reported over all judged events and by the judged event's type
(next-purchase: the `purchase` row), over the events whose item the user had not had before,
and split by whether the nightly list came from the model (the user had events before the day)
or from popularity; the refreshed list's NDCG@k besides. The JSON states the machine and the cut.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kvrec.bench.machine import machine_info
from kvrec.errors import ConfigError, DataError
from kvrec.flags import integer
from kvrec.model.datasets import Interaction, add_dataset_arguments, dataset_from_args
from kvrec.model.evaluate import left_pad
from kvrec.model.progress import progress_bar

DAY_MS = 86_400_000
SYSTEMS = ("refreshed", "nightly", "popularity")
KEEP_POPULAR_MARGIN = 5_000  # popular items kept a day beyond k, for users' seen items to skip


@dataclass
class Judged:
    """One judged event: the user, the event's position in their history, the target."""

    user: str
    position: int  # the user's earlier events: history[:position]
    day_position: int  # of those, the ones before the event's day
    day: int
    item: str
    event_type: str
    new_item: bool


@dataclass
class Replay:
    histories: dict[str, list[Interaction]] = field(default_factory=lambda: defaultdict(list))
    judged: list[Judged] = field(default_factory=list)
    popular_by_day: dict[int, list[str]] = field(default_factory=dict)
    cut_ms: int = 0


def cut_of(interactions: list[Interaction], test_days: int) -> int:
    """The start (epoch ms) of the test period: the last `test_days` UTC days."""
    last_day = interactions[-1].ts // DAY_MS
    cut = (last_day - test_days + 1) * DAY_MS
    if cut <= interactions[0].ts:
        raise ConfigError(f"--test-days {test_days} leaves no events before the test period")
    return cut


def replay(interactions: list[Interaction], cut_ms: int, keep_popular: int) -> Replay:
    """Walk the events in time order: histories, the judged test-period events, and each test
    day's popularity order (counts over the events before the day)."""
    state = Replay(cut_ms=cut_ms)
    counts: dict[str, int] = defaultdict(int)
    day_starts: dict[str, tuple[int, int]] = {}  # user -> (day, events before it)
    for event in interactions:
        history = state.histories[event.user_id]
        day = event.ts // DAY_MS
        if event.ts >= cut_ms:
            if day not in state.popular_by_day:
                ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
                state.popular_by_day[day] = [item for item, _ in ranked[:keep_popular]]
            if day_starts.get(event.user_id, (None, 0))[0] != day:
                day_starts[event.user_id] = (day, len(history))
            if history:
                seen = any(earlier.item_id == event.item_id for earlier in history)
                state.judged.append(Judged(
                    event.user_id, len(history), day_starts[event.user_id][1], day,
                    event.item_id, event.event_type, not seen))
        history.append(event)
        counts[event.item_id] += 1
    return state


def popular_list(ranked: list[str], exclude: set[str], k: int) -> list[str]:
    return [item for item in ranked if item not in exclude][:k]


@torch.inference_mode()
def model_lists(
    artifact: Any, replayed: Replay, states: list[tuple[str, int]], *, k: int, max_len: int,
    exclude_seen: bool, batch_size: int = 256,
) -> dict[tuple[str, int], list[str] | None]:
    """The model's top-k for each (user, number of earlier events) state; None where the
    model knows none of those events' items (the caller serves popularity there)."""
    encoder, index = artifact.encoder.eval(), artifact.item_index
    types = {name: i + 1 for i, name in enumerate(artifact.event_types)}
    out: dict[tuple[str, int], list[str] | None] = {}
    for start in progress_bar(range(0, len(states), batch_size), desc="model lists", unit="batch"):
        chosen = states[start : start + batch_size]
        rows, type_rows, seen_rows = [], [], []
        for user, n in chosen:
            events = [e for e in replayed.histories[user][:n] if e.item_id in index]
            rows.append([index[e.item_id] for e in events][-max_len:] or [0])
            type_rows.append([types.get(e.event_type, 0) for e in events][-max_len:] or [0])
            seen_rows.append({index[e.item_id] for e in events})
        vectors = encoder(left_pad(rows, max_len), left_pad(type_rows, max_len))[:, -1]
        scores = encoder.score(vectors).float()
        scores[:, 0] = float("-inf")
        if exclude_seen:
            for row, seen in enumerate(seen_rows):
                scores[row, list(seen)] = float("-inf")
        top = scores.topk(k, dim=1).indices.tolist()
        for state, items, seen in zip(chosen, top, seen_rows, strict=True):
            out[state] = [artifact.item_ids[i] for i in items] if seen else None
    return out


class Tally:
    """Judged events and hits by system and group (all, each event type, new items)."""

    def __init__(self) -> None:
        self.events: dict[str, int] = defaultdict(int)
        self.hits: dict[tuple[str, str], int] = defaultdict(int)
        self.ndcg: dict[str, float] = defaultdict(float)

    def add(self, judged: Judged, lists: dict[str, list[str]], nightly_by_model: bool) -> None:
        groups = ["all", f"type:{judged.event_type}"] + (["new_item"] if judged.new_item else [])
        groups += ["nightly_by_model"] if nightly_by_model else ["nightly_by_popularity"]
        for group in groups:
            self.events[group] += 1
            for system, items in lists.items():
                self.hits[(system, group)] += judged.item in items
            if judged.item in lists["refreshed"]:
                self.ndcg[group] += 1.0 / np.log2(lists["refreshed"].index(judged.item) + 2)

    def result(self, k: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for group, events in sorted(self.events.items()):
            rates = {f"{system}_hr@{k}": self.hits[(system, group)] / events for system in SYSTEMS}
            out[group] = {"events": events, **rates, f"refreshed_ndcg@{k}": self.ndcg[group] / events,
                          "refreshed_over_nightly": _ratio(rates[f"refreshed_hr@{k}"],
                                                           rates[f"nightly_hr@{k}"]),
                          "refreshed_over_popularity": _ratio(rates[f"refreshed_hr@{k}"],
                                                              rates[f"popularity_hr@{k}"])}
        return out


def _ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else None


def check_trained_before(artifact: Any, interactions: list[Interaction], cut_ms: int) -> None:
    """Refuse a model that knows an item first seen in the test period."""
    first_seen: dict[str, int] = {}
    for event in interactions:
        first_seen.setdefault(event.item_id, event.ts)
    late = [item for item in artifact.item_index if first_seen.get(item, 0) >= cut_ms]
    if late:
        raise DataError(
            f"the model knows {len(late)} items first seen in the test period (e.g. {late[0]}): "
            "train it on the events before the cut (--write-train) only"
        )


def measure(artifact: Any, interactions: list[Interaction], args: argparse.Namespace,
            max_len: int) -> dict[str, Any]:
    cut = cut_of(interactions, args.test_days)
    check_trained_before(artifact, interactions, cut)
    replayed = replay(interactions, cut, keep_popular=args.k + KEEP_POPULAR_MARGIN)
    exclude = not args.include_seen
    states = {(j.user, j.position) for j in replayed.judged}
    states |= {(j.user, j.day_position) for j in replayed.judged if j.day_position}
    started = time.perf_counter()
    lists = model_lists(artifact, replayed, sorted(states), k=args.k, max_len=max_len,
                        exclude_seen=exclude)
    model_seconds = time.perf_counter() - started
    tally = Tally()
    for judged in replayed.judged:
        history = replayed.histories[judged.user]
        popular = replayed.popular_by_day[judged.day]
        day_seen = {e.item_id for e in history[: judged.day_position]} if exclude else set()
        now_seen = {e.item_id for e in history[: judged.position]} if exclude else set()
        nightly = lists.get((judged.user, judged.day_position)) if judged.day_position else None
        tally.add(judged, {
            "refreshed": lists[(judged.user, judged.position)] or popular_list(popular, now_seen, args.k),
            "nightly": nightly or popular_list(popular, day_seen, args.k),
            "popularity": popular_list(popular, day_seen, args.k),
        }, nightly_by_model=nightly is not None)
    return {
        "cut_ms": cut, "test_days": args.test_days, "k": args.k, "exclude_seen": exclude,
        "max_len": max_len, "judged_events": len(replayed.judged),
        "model_lists": len(lists), "model_seconds": round(model_seconds, 1),
        "hit_rates": tally.result(args.k),
    }


def write_train(interactions: list[Interaction], cut_ms: int, path: Path) -> int:
    rows = [e for e in interactions if e.ts < cut_ms]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(("user_id", "item_id", "event_type", "ts"))
        writer.writerows((e.user_id, e.item_id, e.event_type, e.ts) for e in rows)
    return len(rows)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataset_arguments(parser)
    parser.add_argument("--test-days", type=integer(1), default=14,
                        help="the test period: the last N UTC days of the data")
    parser.add_argument("--k", type=integer(1), default=10)
    parser.add_argument("--model", default=None, help="artifact trained on the events before the cut")
    parser.add_argument("--max-len", type=integer(0), default=0, help="0 = the training max length")
    parser.add_argument("--include-seen", action="store_true",
                        help="lists keep the items the user already had (the worker leaves them out)")
    parser.add_argument("--write-train", default=None,
                        help="write the events before the cut here (csv) and stop")
    parser.add_argument("--json", default=None, help="write the result here")
    parser.add_argument("--threads", type=integer(0), default=1, help="torch threads (0 = default)")


def main(args: argparse.Namespace) -> int:
    if args.write_train is None and (args.model is None or args.json is None):
        raise ConfigError("--model and --json are required (or --write-train PATH)")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    interactions = dataset_from_args(args)
    cut = cut_of(interactions, args.test_days)
    if args.write_train is not None:
        count = write_train(interactions, cut, Path(args.write_train))
        print(f"{count:,} events before {cut} ms written to {args.write_train}")
        return 0
    from kvrec.model.artifact import load_artifact

    artifact = load_artifact(args.model)
    training = json.loads((artifact.path / "config.json").read_text()).get("training", {})
    max_len = args.max_len or int(training.get("max_len", 200))
    result = measure(artifact, interactions, args, max_len)
    out = {"benchmark": "freshness", "data": args.data, "format": args.format,
           "model": str(args.model), "model_version": artifact.version, **result,
           "machine": machine_info()}
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    for group, row in out["hit_rates"].items():
        rates = "  ".join(f"{s} {row[f'{s}_hr@{args.k}']:.4f}" for s in SYSTEMS)
        print(f"{group:22s} {row['events']:7,d} events  {rates}")
    return 0
