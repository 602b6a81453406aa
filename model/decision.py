"""Publish or refuse a retrained model: the candidate and the serving model on one held-out tail.

The held-out tail is the leave-one-out test split of the retraining data (model/evaluate.py):
for every user with 3 or more events, the last event is the target and every event before it
is the input. The candidate never trained on it (training uses all but each user's last two
events; the second-to-last picks its best epoch). The serving model is scored on the same
inputs and targets; the tail is new to it when those events arrived after it was trained.

Both are ranked against their whole catalog, the user's earlier items left out, ties counted
against the target (`rank_targets`). A target the serving model does not know is a miss for
it, and so is a user none of whose earlier items it knows; input items it does not know are
left out of its input. The candidate is refused when its NDCG@10 is below the serving
model's by more than `margin` (absolute): `candidate < serving - margin`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from kvrec.model.artifact import Artifact
from kvrec.model.datasets import Interaction, group_by_user
from kvrec.model.evaluate import Split, metrics_from_ranks, rank_split

TAIL = "each user's last event (users with 3 or more events), after all the events before it"
MISS = 2**40  # the rank of a target a model cannot score: never a hit (log2 stays finite)


@dataclass(frozen=True)
class TailCase:
    user: str
    inputs: list[tuple[str, str]]  # (item id, event type), oldest first
    target: str


@dataclass(frozen=True)
class Decision:
    publish: bool
    reason: str
    candidate: dict[str, float]  # hr@10, ndcg@10, hr@20, ndcg@20 on the tail
    serving: dict[str, float] | None  # None: no serving model to compare with
    serving_version: str | None
    candidate_version: str
    margin: float
    users: int
    serving_unknown_targets: int = 0  # targets the serving model does not know (misses)
    tail: str = TAIL

    @property
    def verdict(self) -> str:
        return "publish" if self.publish else "refuse"

    def note(self) -> str:
        """One line with both figures and the reason."""
        figures = (f"candidate {self.candidate_version} NDCG@10 {self.candidate['ndcg@10']:.4f} "
                   f"HR@10 {self.candidate['hr@10']:.4f}")
        if self.serving is not None:
            figures += (f", serving {self.serving_version} NDCG@10 {self.serving['ndcg@10']:.4f} "
                        f"HR@10 {self.serving['hr@10']:.4f}")
        return f"{self.verdict}: {self.reason} ({figures}; {self.users} users' last events)"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "decision": self.verdict, "note": self.note()}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def held_out_tail(interactions: list[Interaction]) -> list[TailCase]:
    cases = []
    for user, events in group_by_user(interactions).items():
        if len(events) >= 3:
            inputs = [(e.item_id, e.event_type) for e in events[:-1]]
            cases.append(TailCase(user, inputs, events[-1].item_id))
    return cases


def training_max_len(artifact: Artifact, default: int = 200) -> int:
    training = json.loads((artifact.path / "config.json").read_text()).get("training", {})
    return int(training.get("max_len") or default)


def score_tail(artifact: Artifact, tail: list[TailCase]) -> tuple[dict[str, float], int]:
    """Full-ranking metrics of `artifact` on `tail`, and how many targets it does not know."""
    type_index = {name: i + 1 for i, name in enumerate(artifact.event_types)}
    index = artifact.item_index
    ranks = np.full(len(tail), MISS, dtype=np.int64)
    scored: list[int] = []
    split = Split([], [], [], [])
    unknown_targets = 0
    for position, case in enumerate(tail):
        if case.target not in index:
            unknown_targets += 1
            continue
        known = [(index[item], type_index.get(kind, 0)) for item, kind in case.inputs if item in index]
        if not known:
            continue  # nothing it can encode: a miss
        scored.append(position)
        split.users.append(case.user)
        split.inputs.append([item for item, _ in known])
        split.input_types.append([kind for _, kind in known])
        split.targets.append(index[case.target])
    if scored:
        ranks[scored] = rank_split(artifact.encoder, split, max_len=training_max_len(artifact))
    return metrics_from_ranks(ranks), unknown_targets


def decide(candidate: Artifact, serving: Artifact | None, interactions: list[Interaction],
           margin: float = 0.0) -> Decision:
    """Score both on the same held-out tail of `interactions`; refuse a candidate whose
    NDCG@10 is below the serving model's by more than `margin`."""
    tail = held_out_tail(interactions)
    candidate_metrics, _ = score_tail(candidate, tail)
    if serving is None:
        return Decision(True, "no serving model to compare with", candidate_metrics, None, None,
                        candidate.version, margin, len(tail))
    serving_metrics, unknown = score_tail(serving, tail)
    gap = candidate_metrics["ndcg@10"] - serving_metrics["ndcg@10"]
    if candidate_metrics["ndcg@10"] < serving_metrics["ndcg@10"] - margin:
        reason = f"candidate NDCG@10 is {-gap:.4f} below the serving model's (margin {margin:g})"
        publish = False
    else:
        limit = f"more than {margin:g} below it" if margin else "below it"
        reason = f"candidate NDCG@10 is {gap:+.4f} against the serving model's (refused only {limit})"
        publish = True
    return Decision(publish, reason, candidate_metrics, serving_metrics, serving.version,
                    candidate.version, margin, len(tail), unknown)
