"""What the model reads of each event, as one bundle: `EventInputs`.

Every feature of an event the encoder embeds is one field here, a [B, T] int64 tensor (0 =
padding, left-padded for a full pass, right-padded for new events against a cache). The
serving path carries the bundle whole: the worker builds it from a window's known events
(stream/worker/inference.py), a backend moves it (model/backends.py), the encoder's pool
primitives (`Encoder.encode_into`, `extend_into`) take it, and `Encoder.embed` is the one
place that reads its fields. A new event feature is a new field, and its embedding.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class EventInputs:
    items: Tensor  # [B, T] the model's item index
    event_types: Tensor  # [B, T] the model's event-type index

    @property
    def shape(self) -> torch.Size:
        """[B, T]: every field's shape."""
        return self.items.shape

    def tensors(self) -> tuple[Tensor, ...]:
        """The fields in their order (the ONNX graph's event inputs, model/export.py)."""
        return tuple(getattr(self, f.name) for f in fields(self))

    def to(self, device: torch.device | str) -> EventInputs:
        return EventInputs(*(t.to(device) for t in self.tensors()))

    def columns(self, index: slice) -> EventInputs:
        """Columns `index` of every field (`events.columns(slice(None, -1))`: all but the last)."""
        return EventInputs(*(t[:, index] for t in self.tensors()))

    def arrays(self) -> dict[str, np.ndarray]:
        """Every field as int64 numpy, by name: the feeds of an exported graph."""
        return {f.name: getattr(self, f.name).numpy().astype(np.int64) for f in fields(self)}
