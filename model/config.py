"""The encoder's hyper-parameters, stored as JSON in every model artifact."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from kvrec.errors import ConfigError

SIMILARITIES = ("dot", "cosine")
BLOCKS = ("transformer", "hstu")


@dataclass(frozen=True)
class ModelConfig:
    """The shape defaults are the measured recipe's, `kvrec train`'s defaults (model/train.py)."""

    n_items: int  # item indices 1..n_items; 0 = padding
    n_event_types: int = 4  # event type indices 1..n; 0 = none / padding
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 2
    window: int = 50  # W: each position attends to the last W positions, itself included
    dropout: float = 0.5
    rope_base: float = 10000.0
    mlp_ratio: int = 4
    # how a user vector scores an item: "dot" = inner product of the final hidden state with
    # the item embedding; "cosine" = both L2-normalised, divided by `temperature`
    similarity: str = "dot"
    temperature: float = 0.05
    # the layer: "transformer" = softmax attention and a feed-forward network; "hstu" = HSTU's
    # gated pointwise (SiLU) attention with a learned bias by the age of each key (model/hstu.py)
    block: str = "transformer"
    # time features (model/events.py `time_codes`): each event's hour of day, day of week (UTC)
    # and log-bucketed gap to the user's previous event, embedded and added like its type.
    # Off in artifacts written before the field (they load and score as they did).
    time_features: bool = False

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def history_needed(self) -> int:
        """Events a cache refill needs to be exact: a layer-l output sees l*(W-1)+1 events."""
        return self.n_layers * (self.window - 1) + 1

    def validate(self) -> ModelConfig:
        problems = []
        if self.n_items < 1:
            problems.append("n_items must be >= 1")
        if self.n_event_types < 0:
            problems.append("n_event_types must be >= 0")
        if self.n_layers < 1 or self.n_heads < 1 or self.window < 1:
            problems.append("n_layers, n_heads and window must be >= 1")
        if self.d_model < 2 or self.d_model % self.n_heads:
            problems.append("d_model must be a multiple of n_heads")
        elif self.head_dim % 2:
            problems.append("d_model / n_heads must be even (rotary positions rotate pairs)")
        if not 0.0 <= self.dropout < 1.0:
            problems.append("dropout must be in [0, 1)")
        if self.rope_base <= 1.0:
            problems.append("rope_base must be > 1")
        if self.similarity not in SIMILARITIES:
            problems.append(f"similarity must be one of {SIMILARITIES}, not {self.similarity!r}")
        if self.block not in BLOCKS:
            problems.append(f"block must be one of {BLOCKS}, not {self.block!r}")
        if not self.temperature > 0.0:
            problems.append("temperature must be > 0")
        if problems:
            raise ConfigError("invalid model config: " + "; ".join(problems))
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"invalid model config: unknown keys {unknown}")
        data = {"similarity": "dot", **data}  # artifacts written before the field scored by dot
        try:
            return cls(**data).validate()
        except TypeError as exc:
            raise ConfigError(f"invalid model config: {exc}") from exc
