"""What the model reads of each event, as one bundle: `EventInputs`.

Every feature of an event the encoder embeds is one field here, a [B, T] int64 tensor (0 =
padding, left-padded for a full pass, right-padded for new events against a cache). The
serving path carries the bundle whole: the worker builds it from a window's known events
(stream/worker/inference.py), a backend moves it (model/backends.py), the encoder's pool
primitives (`Encoder.encode_into`, `extend_into`) take it, and `Encoder.embed` is the one
place that reads its fields. A new event feature is a new field, and its embedding.

`times` (optional: None unless the model's `time_features` is on) is each event's time code,
made once from the event's own time and its predecessor's (`time_codes`): hour of day and day
of week (UTC) and the log2-bucketed gap to the user's previous event (a bucket of its own for a
user's first event). A code depends only on the event and the one before it, never on where a
window starts, so a cache refilled from stored codes equals the one built event by event; the
code must therefore be computed when the event arrives (with its true predecessor) and kept,
not recomputed from a truncated window whose first event has lost its predecessor.
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
    times: Tensor | None = None  # [B, T] time codes (`time_codes`), 0 = padding; or none

    @property
    def shape(self) -> torch.Size:
        """[B, T]: every field's shape."""
        return self.items.shape

    def tensors(self) -> tuple[Tensor, ...]:
        """The fields in their order (the ONNX graph's event inputs, model/export.py)."""
        return tuple(getattr(self, name) for name in self._present())

    def _present(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]

    def to(self, device: torch.device | str) -> EventInputs:
        return EventInputs(**{name: getattr(self, name).to(device) for name in self._present()})

    def columns(self, index: slice) -> EventInputs:
        """Columns `index` of every field (`events.columns(slice(None, -1))`: all but the last)."""
        return EventInputs(**{name: getattr(self, name)[:, index] for name in self._present()})

    def arrays(self) -> dict[str, np.ndarray]:
        """Every field as int64 numpy, by name: the feeds of an exported graph."""
        return {name: getattr(self, name).numpy().astype(np.int64) for name in self._present()}


HOURS, DAYS = 24, 7
GAP_BUCKETS = 24  # 0: no previous event; 1: under 1 s; k >= 2: 2^(k-2) s <= gap < 2^(k-1) s
TIME_CODES = GAP_BUCKETS * DAYS * HOURS  # codes 1..TIME_CODES; 0 = padding
_MS_PER_HOUR = 3_600_000
_EPOCH_WEEKDAY = 3  # 1970-01-01 was a Thursday: day 0 = Monday


def time_codes(ts_ms: np.ndarray, previous_ms: np.ndarray | None) -> np.ndarray:
    """Each event's time code (int64, 1..TIME_CODES) from its time and its predecessor's
    (epoch milliseconds; `previous_ms` None, or negative where the event is the user's first)."""
    ts = np.asarray(ts_ms, dtype=np.int64)
    hours = np.floor_divide(ts, _MS_PER_HOUR)
    hour = np.remainder(hours, HOURS)
    day = np.remainder(np.floor_divide(hours, HOURS) + _EPOCH_WEEKDAY, DAYS)
    gap = gap_buckets(ts, previous_ms)
    return 1 + (gap * DAYS + day) * HOURS + hour


def gap_buckets(ts: np.ndarray, previous_ms: np.ndarray | None) -> np.ndarray:
    """The log2 bucket of each gap to the previous event (0 where there is none)."""
    if previous_ms is None:
        return np.zeros(ts.shape, dtype=np.int64)
    previous = np.asarray(previous_ms, dtype=np.int64)
    seconds = np.maximum(ts - previous, 0) / 1000.0
    bucket = np.where(seconds < 1.0, 1, np.floor(np.log2(np.maximum(seconds, 1.0))) + 2)
    bucket = np.minimum(bucket, GAP_BUCKETS - 1).astype(np.int64)
    return np.where(previous < 0, 0, bucket)


def sequence_time_codes(ts_ms: list[int], before_ms: int = -1) -> list[int]:
    """The time codes of one user's consecutive events, the first one's predecessor at
    `before_ms` (-1: none, the user's first event)."""
    ts = np.asarray(ts_ms, dtype=np.int64)
    previous = np.concatenate([np.array([before_ms], dtype=np.int64), ts[:-1]])
    return time_codes(ts, previous).tolist()
