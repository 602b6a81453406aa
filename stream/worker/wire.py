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
from collections.abc import Sequence

from stream.schema import RECOMMENDATION_SCHEMA_VERSION
from stream.worker.because import event_type_name

_string = json.JSONEncoder(separators=(",", ":")).encode  # ensure_ascii, like stream.schema


class WireEncoder:
    """Encodes the recommendations of one model version (`model_version` is fixed) over one
    catalog (`item_ids`, by the model's item index)."""

    def __init__(self, model_version: str, item_ids: Sequence[str],
                 event_type_names: Sequence[str]) -> None:
        self.model_version = model_version
        self.item_ids = item_ids
        self.event_type_names = list(event_type_names)
        self._items: dict[int, str] = {}  # item index -> '{"item_id":"<id>","score":'
        self._because: dict[int, str] = {}  # item index * 256 + event type -> its prefix
        self._users: dict[str, str] = {}  # user id -> '{"user_id":"<id>","items":['
        self._tail = ',"model_version":' + _string(model_version) + ',"event_ts":'
        self._schema = ',"schema":' + _string(RECOMMENDATION_SCHEMA_VERSION) + "}"

    def _item(self, index: int) -> str:
        found = self._items[index] = '{"item_id":' + _string(self.item_ids[index]) + ',"score":'
        return found

    def _user(self, user_id: str) -> str:
        if len(self._users) >= _MAX_USERS:  # bounded: users come and go
            self._users.clear()
        found = self._users[user_id] = '{"user_id":' + _string(user_id) + ',"items":['
        return found

    def _because_prefix(self, key: int) -> str:
        """`{"item_id":"<id>","event_type":"<name>","weight":` (deployment's 1-based type)."""
        if len(self._because) >= _MAX_BECAUSE:
            self._because.clear()
        item, event_type = divmod(key, 256)
        found = self._because[key] = (
            '{"item_id":' + _string(self.item_ids[item]) + ',"event_type":'
            + _string(event_type_name(self.event_type_names, event_type)) + ',"weight":'
        )
        return found

    def encode_batch(
        self,
        user_ids: Sequence[str],
        items: Sequence[Sequence[int]],
        scores: Sequence[Sequence[float]],
        because: Sequence[Sequence[tuple[int, int, float]]],
        cold_start: Sequence[bool],
        event_ts: Sequence[int],
        emitted_ts: int,
        source_ts: Sequence[int | None],
    ) -> list[bytes | None]:
        """One recommendation's bytes per event; None where a score is not finite (the caller
        then uses `encode_recommendation`, which writes JSON's `Infinity`/`NaN`)."""
        known_items, known_users, known_because = self._items, self._users, self._because
        emitted = ',"emitted_ts":' + str(emitted_ts) + ',"because":['
        tail, schema = self._tail, self._schema
        out: list[bytes | None] = []
        for e, user_id in enumerate(user_ids):
            row = items[e]
            listed = ""
            if row:
                # the scores' reprs in one C call: repr of a list of floats is float.__repr__ of
                # each; a finite one has no "n" ("inf", "nan")
                written = repr(scores[e])
                if "n" in written:
                    out.append(None)
                    continue
                prefixes = list(map(known_items.get, row))
                if None in prefixes:
                    prefixes = [p or self._item(i) for p, i in zip(prefixes, row, strict=True)]
                listed = "},".join(map(str.__add__, prefixes, written[1:-1].split(", "))) + "}"
            explained = because[e]
            written_because = ""
            if explained:
                weights = repr([w for _, _, w in explained])
                if "n" in weights:
                    out.append(None)
                    continue
                keys = [i * 256 + t for i, t, _ in explained]
                prefixes = list(map(known_because.get, keys))
                if None in prefixes:
                    prefixes = [p or self._because_prefix(k)
                                for p, k in zip(prefixes, keys, strict=True)]
                written_because = "},".join(map(str.__add__, prefixes,
                                                weights[1:-1].split(", "))) + "}"
            source = source_ts[e]
            out.append((
                (known_users.get(user_id) or self._user(user_id)) + listed + "]" + tail
                + str(event_ts[e]) + emitted + written_because + '],"cold_start":'
                + ("true" if cold_start[e] else "false") + ',"source_ts":'
                + ("null" if source is None else str(source)) + schema
            ).encode())
        return out


_MAX_USERS = 200_000  # a user's prefix is a few dozen bytes
_MAX_BECAUSE = 1_000_000
