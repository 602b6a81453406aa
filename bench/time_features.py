"""Next-item and next-purchase quality of models trained with and without event types and time
features (issue 31, item 3), side by side on one dataset, as JSON.

    python -m kvrec.bench.time_features --data retailrocket --format csv \\
        --model items=DIR:items-only --model types=DIR --model time=DIR --json OUT

Each model ranks every test target of `kvrec eval`'s leave-one-out split (each user's last
event; the items the user had before it left out, as `kvrec eval` does). A model marked
`:items-only` reads every event as one type (`view`), as it was trained. Figures: HR@10 and
NDCG@10 over all users, over the users whose last event is a purchase (next purchase) and over
those whose last item is new to them (not a repeat); each model's training record
(`metrics.json`: epochs, validation history, best epoch) is copied in.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from kvrec.bench.machine import machine_info
from kvrec.model.artifact import load_artifact
from kvrec.model.datasets import add_dataset_arguments, dataset_from_args, group_by_user
from kvrec.model.evaluate import metrics_from_ranks, prepare, rank_split

PURCHASE = "purchase"


def _last_types(interactions: list, item_index: dict[str, int]) -> dict[str, str]:
    """Each user's last kept event's type: what the test target is."""
    out = {}
    for user, events in group_by_user(interactions).items():
        kept = [e for e in events if e.item_id in item_index]
        if len(kept) >= 3:
            out[user] = kept[-1].event_type
    return out


def _run(spec: str, interactions: list) -> dict[str, object]:
    name, _, rest = spec.partition("=")
    path, _, mode = rest.partition(":")
    artifact = load_artifact(path)
    data = ([replace(e, event_type="view") for e in interactions] if mode == "items-only"
            else interactions)
    type_index = {t: i + 1 for i, t in enumerate(artifact.event_types)}
    test = prepare(data, artifact.item_index, type_index).test
    training = json.loads((Path(path) / "config.json").read_text()).get("training", {})
    ranks = rank_split(artifact.encoder, test, max_len=int(training.get("max_len", 200)))
    last = _last_types(interactions, artifact.item_index)
    purchase = np.array([last[u] == PURCHASE for u in test.users], dtype=bool)
    new = np.array([t not in set(h) for t, h in zip(test.targets, test.inputs, strict=True)],
                   dtype=bool)
    return {"name": name, "model": path, "items_only": mode == "items-only",
            "time_features": artifact.config.time_features,
            "next_item": {**metrics_from_ranks(ranks), "users": len(ranks)},
            "next_purchase": {**metrics_from_ranks(ranks[purchase]), "users": int(purchase.sum())},
            "next_new_item": {**metrics_from_ranks(ranks[new]), "users": int(new.sum())},
            "training": json.loads((Path(path) / "metrics.json").read_text())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_dataset_arguments(parser)
    parser.add_argument("--model", action="append", required=True,
                        help="NAME=DIR or NAME=DIR:items-only (repeat)")
    parser.add_argument("--json", required=True, help="where the results go")
    args = parser.parse_args(argv)
    interactions = dataset_from_args(args)
    runs = [_run(spec, interactions) for spec in args.model]
    result = {"data": args.data, "runs": runs, "machine": machine_info()}
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    for run in runs:
        item, buy = run["next_item"], run["next_purchase"]
        print(f"{run['name']:8s} next item NDCG@10 {item['ndcg@10']:.4f} HR@10 {item['hr@10']:.4f}"
              f"   next purchase NDCG@10 {buy['ndcg@10']:.4f} HR@10 {buy['hr@10']:.4f}"
              f" ({buy['users']} users)   new item NDCG@10 {run['next_new_item']['ndcg@10']:.4f}"
              f" ({run['next_new_item']['users']} users)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
