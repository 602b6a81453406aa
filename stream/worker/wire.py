"""A batch's recommendations on the wire in one pass: the bytes `encode_recommendation` makes,
built from precomputed JSON fragments instead of a dict per event and item.

Every string that repeats (an item's `{"item_id":...,"score":` prefix, a `because` entry's item
and event type, a user id, the model version) is escaped once with the same `json` encoder
settings as `stream.schema` (compact separators, ASCII escapes) and kept; a score is written
with `float.__repr__`, as `json` writes finite floats. A non-finite score (never made by the
model path) falls back to `encode_recommendation` for that event. tests/test_wire.py checks the
bytes against `encode_recommendation`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

from stream.schema import RECOMMENDATION_SCHEMA_VERSION
from stream.worker.because import event_type_name

_string = json.JSONEncoder(separators=(",", ":")).encode  # ensure_ascii, like stream.schema


class ItemFragments:
    """`{"item_id":"<id>","score":` of each item index of one catalog, made when first used."""

    def __init__(self, item_ids: Sequence[str]) -> None:
        self.item_ids = item_ids
        self._made: dict[int, str] = {}

    def __getitem__(self, index: int) -> str:
        found = self._made.get(index)
        if found is None:
            found = self._made[index] = '{"item_id":' + _string(self.item_ids[index]) + ',"score":'
        return found


class WireEncoder:
    """Encodes the recommendations of one model version (`model_version` is fixed)."""

    def __init__(self, model_version: str, item_ids: Sequence[str],
                 event_type_names: Sequence[str]) -> None:
        self.model_version = model_version
        self.items = ItemFragments(item_ids)
        self.event_type_names = list(event_type_names)
        self._because: dict[tuple[int, int], str] = {}
        self._users: dict[str, str] = {}
        self._tail = (',"model_version":' + _string(model_version) + ',"event_ts":')
        self._schema = ',"schema":' + _string(RECOMMENDATION_SCHEMA_VERSION) + "}"

    def user(self, user_id: str) -> str:
        found = self._users.get(user_id)
        if found is None:
            if len(self._users) > 200_000:  # bounded: a user id costs a few dozen bytes
                self._users.clear()
            found = self._users[user_id] = '{"user_id":' + _string(user_id) + ',"items":['
        return found

    def because_prefix(self, item: int, event_type: int) -> str:
        """`{"item_id":"<id>","event_type":"<name>","weight":` (deployment's 1-based type)."""
        key = (item, event_type)
        found = self._because.get(key)
        if found is None:
            name = event_type_name(self.event_type_names, event_type)
            found = self._because[key] = (
                '{"item_id":' + _string(self.items.item_ids[item]) + ',"event_type":'
                + _string(name) + ',"weight":'
            )
            if len(self._because) > 1_000_000:
                self._because.clear()
        return found

    def encode(
        self,
        user_id: str,
        items: Sequence[int],
        scores: Sequence[float],
        because: Sequence[tuple[int, int, float]],
        cold_start: bool,
        event_ts: int,
        emitted_ts: int,
        source_ts: int | None,
    ) -> bytes | None:
        """One recommendation's bytes; None when a score is not finite (the caller then uses
        `encode_recommendation`, which writes them as JSON's `Infinity`/`NaN`)."""
        fragments = self.items
        try:
            listed = ",".join([fragments[i] + _float(s) + "}" for i, s in zip(items, scores, strict=True)])
            explained = ",".join([self.because_prefix(i, t) + _float(w) + "}"
                                  for i, t, w in because])
        except _NotFinite:
            return None
        return (
            self.user(user_id) + listed + "]" + self._tail + str(event_ts) + ',"emitted_ts":'
            + str(emitted_ts) + ',"because":[' + explained + '],"cold_start":'
            + ("true" if cold_start else "false") + ',"source_ts":'
            + ("null" if source_ts is None else str(source_ts)) + self._schema
        ).encode()


class _NotFinite(ValueError):
    pass


def _float(value: float) -> str:
    if value != value or value in (math.inf, -math.inf):
        raise _NotFinite
    return float.__repr__(value)
