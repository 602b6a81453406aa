"""Training on top of an earlier model (`kvrec train --init-from`, `kvrec retrain`): the
vocabularies grow (every earlier item and event type keeps its index, new ones follow) and the
earlier weights are copied into the grown model, whose shape must be the earlier one's.
"""

from __future__ import annotations

from pathlib import Path

from kvrec.errors import ConfigError
from kvrec.model.artifact import Artifact
from kvrec.model.encoder import Encoder


def grown_vocabulary(
    interactions: list, item_ids: list[str], event_types: list[str]
) -> tuple[list[str], list[str]]:
    """The item and event-type vocabularies of `interactions` grown from earlier ones: every
    earlier entry keeps its index (also one the new data lacks), new ones follow in order of
    first appearance. A fresh model starts from `[""]` (padding) and `EVENT_TYPES`."""
    item_ids, event_types = list(item_ids), list(event_types)
    known_items, known_types = set(item_ids), set(event_types)
    for interaction in interactions:
        if interaction.item_id not in known_items:
            known_items.add(interaction.item_id)
            item_ids.append(interaction.item_id)
        if interaction.event_type not in known_types:
            known_types.add(interaction.event_type)
            event_types.append(interaction.event_type)
    return item_ids, event_types


def load_earlier(source: Path) -> Artifact:
    from kvrec.model.artifact import load_artifact

    earlier = load_artifact(source)
    if earlier.item_ids[:1] != [""]:
        raise ConfigError(f"--init-from {source}: its item vocabulary does not start with padding")
    return earlier


# the hyper-parameters that shape the weights or what they mean (how a user vector scores an
# item); dropout does not: it may differ
SHAPE_FIELDS = ("d_model", "n_layers", "n_heads", "window", "mlp_ratio", "rope_base",
                "similarity", "temperature", "block")
EMBEDDINGS = {"item_embedding.weight": "n_items", "type_embedding.weight": "n_event_types"}


def warm_start(encoder: Encoder, earlier: Artifact) -> float:
    """Start `encoder` from the weights of the earlier artifact `earlier`, whose item and event
    type vocabularies are prefixes of `encoder`'s (see `grown_vocabulary`): the embedding rows
    of known items and types are copied (the output layer is tied to the item embedding), the
    rows of new ones keep their fresh initialisation, and every other weight is copied and
    must have the same shape. Returns the earlier runs' recorded training seconds."""
    config, source = encoder.config, earlier.path
    differs = [n for n in SHAPE_FIELDS if getattr(earlier.config, n) != getattr(config, n)]
    shrunk = [n for n in EMBEDDINGS.values() if getattr(earlier.config, n) > getattr(config, n)]
    if differs or shrunk:
        raise ConfigError(
            f"--init-from {source}: model shape differs ({', '.join(differs + shrunk)}); "
            "use its flags"
        )
    state = encoder.state_dict()
    earlier_state = earlier.encoder.state_dict()
    if set(state) != set(earlier_state):
        raise ConfigError(f"--init-from {source}: its weights are not this encoder's")
    merged = {}
    for name, weights in earlier_state.items():
        if name in EMBEDDINGS:
            grown = state[name].clone()
            grown[: weights.shape[0]] = weights
            merged[name] = grown
        elif weights.shape != state[name].shape:
            raise ConfigError(f"--init-from {source}: {name} has shape {tuple(weights.shape)}, "
                              f"this model's is {tuple(state[name].shape)}")
        else:
            merged[name] = weights
    encoder.load_state_dict(merged, strict=True)
    metrics = earlier.metrics
    return float(metrics.get("train_seconds_with_earlier_runs", metrics.get("train_seconds", 0.0)))
