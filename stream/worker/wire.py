"""A batch's recommendations on the wire in one pass: the bytes `encode_recommendation` makes,
built from precomputed JSON fragments instead of a dict per event and item.

Every string that repeats (an item's `{"item_id":...,"score":` prefix, a `because` entry's item
and event type, a user id, the model version) is escaped once with the same `json` encoder
settings as `stream.schema` (compact separators, ASCII escapes) and kept. The batch's scores
and weights are written by msgspec in one call each: the shortest digits that read back to the
float, which is what `json` writes (`float.__repr__`) except in exponent notation and below 1e-4,
so a row with one of those is written with `repr` instead (`_number_texts`). A non-finite score
(never made by the model path) falls back to `encode_recommendation` for that event.
tests/test_wire.py checks the bytes against `encode_recommendation`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

import msgspec

from kvrec.stream.schema import RECOMMENDATION_SCHEMA_VERSION
from kvrec.stream.worker.because import event_type_name

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
        # every score and weight of the batch written in two C calls
        score_rows = _number_texts(scores, len(user_ids))
        weight_rows = _number_texts([[w for _, _, w in row] for row in because], len(user_ids))
        out: list[bytes | None] = []
        for e, user_id in enumerate(user_ids):
            row = items[e]
            listed = ""
            if row:
                written = score_rows[e] or _repr_row(scores[e])
                if written is None:
                    out.append(None)
                    continue
                prefixes = list(map(known_items.get, row))
                if None in prefixes:
                    prefixes = [p or self._item(i) for p, i in zip(prefixes, row, strict=True)]
                listed = "},".join(map(str.__add__, prefixes, written.split(","))) + "}"
            explained = because[e]
            written_because = ""
            if explained:
                weights = weight_rows[e] or _repr_row([w for _, _, w in explained])
                if weights is None:
                    out.append(None)
                    continue
                keys = [i * 256 + t for i, t, _ in explained]
                prefixes = list(map(known_because.get, keys))
                if None in prefixes:
                    prefixes = [p or self._because_prefix(k)
                                for p, k in zip(prefixes, keys, strict=True)]
                written_because = "},".join(map(str.__add__, prefixes, weights.split(","))) + "}"
            source = source_ts[e]
            out.append((
                (known_users.get(user_id) or self._user(user_id)) + listed + "]" + tail
                + str(event_ts[e]) + emitted + written_because + '],"cold_start":'
                + ("true" if cold_start[e] else "false") + ',"source_ts":'
                + ("null" if source is None else str(source)) + schema
            ).encode())
        return out


def _number_texts(rows: Sequence[Sequence[float]], count: int) -> list[str | None]:
    """Each row's numbers as JSON, comma-separated, from one msgspec call over the batch; None
    for a row with a number msgspec may write differently from `json` (`float.__repr__`): one
    with an exponent (msgspec "1e-7", repr "1e-07"), one below 1e-4 (msgspec "0.00001", repr
    "1e-05") or a non-finite one (msgspec "null"). Otherwise both write the shortest digits that
    read back to the float, in plain notation (tests/test_wire.py checks any float)."""
    if not count:
        return []
    text = _encode_json(rows).decode()  # '[[0.5,0.25],[],[0.125]]'
    found: list[str | None] = text[2:-2].split("],[")  # type: ignore[assignment]
    if "e" in text or "n" in text or "0.0000" in text:
        found = [None if _UNLIKE_REPR.search(r) else r for r in found]  # type: ignore[arg-type]
    return found


def _repr_row(numbers: Sequence[float]) -> str | None:
    """A row's numbers as `json` writes them, comma-separated; None if one is not finite (the
    caller leaves the event to `encode_recommendation`, which writes `Infinity`/`NaN`)."""
    written = repr(list(numbers))  # float.__repr__ of each, in one C call
    if "n" in written:  # "inf", "nan": a finite float's repr has no "n"
        return None
    return written[1:-1].replace(", ", ",")


_encode_json = msgspec.json.encode
_UNLIKE_REPR = re.compile(r"e|n|0\.0000")
_MAX_USERS = 200_000  # a user's prefix is a few dozen bytes
_MAX_BECAUSE = 1_000_000
