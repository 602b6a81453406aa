"""Full-ranking evaluation, leave-one-out.

Each user's last event is the test target, the one before it the validation target. The
target is ranked against every item of the catalog; the items the user had before the target
are left out of the ranking, the target itself never is. Metrics: HR@K and NDCG@K for K in
(10, 20), for the model and for a popularity baseline (counts over the training events).

    kvrec eval --model DIR --data PATH --format sasrec --json
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field

import numpy as np
import torch

from kvrec.model.datasets import Interaction, dataset_from_args, group_by_user
from kvrec.model.encoder import Encoder
from kvrec.model.events import sequence_time_codes

CUTOFFS = (10, 20)


@dataclass
class Split:
    """Sequences as item/type indices. `inputs[u]` predicts `targets[u]`."""

    users: list[str]
    inputs: list[list[int]]
    input_types: list[list[int]]
    targets: list[int]
    input_times: list[list[int]] = field(default_factory=list)  # time codes (model/events.py)


@dataclass
class Prepared:
    train_items: list[list[int]]  # per user: the events before validation (training sequence)
    train_types: list[list[int]]
    validation: Split
    test: Split
    popularity: np.ndarray  # [n_items + 1] counts over training events
    skipped_unknown: int = 0
    train_times: list[list[int]] = field(default_factory=list)  # time codes (model/events.py)


def prepare(
    interactions: list[Interaction], item_index: dict[str, int], type_index: dict[str, int]
) -> Prepared:
    """Leave-one-out split. Users with fewer than 3 events only train. Events whose item the
    vocabulary lacks are dropped and counted (`skipped_unknown`). Each kept event's time code
    is made from its time and the kept event before it (`sequence_time_codes`)."""
    n_items = max(item_index.values(), default=0)
    prepared = Prepared([], [], Split([], [], [], []), Split([], [], [], []),
                        np.zeros(n_items + 1, dtype=np.int64))
    for user, events in group_by_user(interactions).items():
        kept = [e for e in events if e.item_id in item_index]
        prepared.skipped_unknown += len(events) - len(kept)
        items = [item_index[e.item_id] for e in kept]
        types = [type_index.get(e.event_type, 0) for e in kept]
        times = sequence_time_codes([e.ts for e in kept]) if kept else []
        _add_user(prepared, user, items, types, times)
    return prepared


def _add_user(prepared: Prepared, user: str, items: list[int], types: list[int],
              times: list[int]) -> None:
    """One user's events: all but the last two train; those are validation and test targets."""
    held_out = 2 if len(items) >= 3 else 0
    end = len(items) - held_out
    prepared.train_items.append(items[:end])
    prepared.train_types.append(types[:end])
    prepared.train_times.append(times[:end])
    np.add.at(prepared.popularity, items[:end], 1)
    if held_out:
        for split, cut in ((prepared.validation, -2), (prepared.test, -1)):
            split.users.append(user)
            split.inputs.append(items[:cut])
            split.input_types.append(types[:cut])
            split.input_times.append(times[:cut])
            split.targets.append(items[cut])


def left_pad(rows: list[list[int]], max_len: int) -> torch.Tensor:
    length = max(1, min(max_len, max((len(r) for r in rows), default=1)))
    out = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        row = row[-length:]
        if row:
            out[i, length - len(row) :] = torch.tensor(row)
    return out


def metrics_from_ranks(ranks: np.ndarray) -> dict[str, float]:
    out: dict[str, float] = {}
    for k in CUTOFFS:
        hit = ranks < k
        out[f"hr@{k}"] = float(hit.mean()) if len(ranks) else 0.0
        out[f"ndcg@{k}"] = float((hit / np.log2(ranks + 2)).mean()) if len(ranks) else 0.0
    return out


def evaluate_split(
    encoder: Encoder, split: Split, *, max_len: int, batch_size: int = 512, device: str = "cpu"
) -> dict[str, float]:
    return metrics_from_ranks(
        rank_split(encoder, split, max_len=max_len, batch_size=batch_size, device=device)
    )


@torch.inference_mode()
def rank_split(
    encoder: Encoder, split: Split, *, max_len: int, batch_size: int = 512, device: str = "cpu"
) -> np.ndarray:
    """The 0-based rank of each user's target (`rank_targets`), in the split's order."""
    encoder.eval()
    # kvrec's encoder with time features reads each event's time code; any other model ranked
    # here (bench reference's SASRec) takes items and types only
    config = getattr(encoder, "config", None)
    timed = bool(config is not None and config.time_features)
    # users of similar length share a batch, so little of it is padding
    order = sorted(range(len(split.targets)), key=lambda u: len(split.inputs[u]))
    ranks = np.zeros(len(order), dtype=np.int64)
    for start in range(0, len(order), batch_size):
        chosen = order[start : start + batch_size]
        inputs = [split.inputs[u] for u in chosen]
        items = left_pad(inputs, max_len).to(device)
        types = left_pad([split.input_types[u] for u in chosen], max_len).to(device)
        if timed:
            times = left_pad([split.input_times[u] for u in chosen], max_len).to(device)
            vectors = encoder(items, types, times)[:, -1]
        else:
            vectors = encoder(items, types)[:, -1]
        scores = encoder.score(vectors).float()
        targets = torch.tensor([split.targets[u] for u in chosen], device=scores.device)
        ranks[chosen] = rank_targets(scores, inputs, targets)
    return ranks


def rank_targets(
    scores: torch.Tensor, histories: list[list[int]], targets: torch.Tensor
) -> np.ndarray:
    """0-based rank of each target among all items; the user's history (never the target)
    is left out, and so is the padding index 0."""
    target_scores = scores.gather(1, targets.view(-1, 1)).clone()
    scores = scores.clone()
    scores[:, 0] = float("-inf")
    rows = [r for r, h in enumerate(histories) for _ in h]
    cols = [i for h in histories for i in h]
    if rows:
        device = scores.device
        scores[torch.tensor(rows, device=device), torch.tensor(cols, device=device)] = float("-inf")
    scores.scatter_(1, targets.view(-1, 1), target_scores)  # the target is never left out
    return (scores > target_scores).sum(dim=1).cpu().numpy()


def evaluate_popularity(popularity: np.ndarray, split: Split) -> dict[str, float]:
    base = torch.tensor(popularity, dtype=torch.float32)
    all_ranks = []
    for start in range(0, len(split.targets), 2048):
        histories = split.inputs[start : start + 2048]
        scores = base.expand(len(histories), -1)
        targets = torch.tensor(split.targets[start : start + 2048])
        all_ranks.append(rank_targets(scores, histories, targets))
    return metrics_from_ranks(np.concatenate(all_ranks) if all_ranks else np.zeros(0))


def main(args: argparse.Namespace) -> int:
    from kvrec.model.artifact import load_artifact

    artifact = load_artifact(args.model)
    interactions = dataset_from_args(args)
    type_index = {name: i + 1 for i, name in enumerate(artifact.event_types)}
    prepared = prepare(interactions, artifact.item_index, type_index)
    split = prepared.test if args.split == "test" else prepared.validation
    training = json.loads((artifact.path / "config.json").read_text()).get("training", {})
    max_len = args.max_len or int(training.get("max_len", 200))
    result: dict[str, object] = evaluate_split(artifact.encoder, split, max_len=max_len)
    result["popularity"] = evaluate_popularity(prepared.popularity, split)
    result["users"] = len(split.targets)
    result["skipped_unknown_items"] = prepared.skipped_unknown
    result["model_version"] = artifact.version
    result["split"] = args.split
    if args.json:
        print(json.dumps(result))
    else:
        pop = result["popularity"]
        for key in ("hr@10", "ndcg@10", "hr@20", "ndcg@20"):
            model_value = float(result[key])  # type: ignore[arg-type]
            pop_value = float(pop[key])  # type: ignore[index]
            print(f"{key:8s} model {model_value:.4f}   popularity {pop_value:.4f}")
        print(f"users {result['users']}  model {artifact.version}")
    return 0

