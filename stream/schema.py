"""Wire schemas: events in, recommendations out (JSON; JSON Schema files in `schemas/`).

The worker validates every input message with `parse_event`. Its fast path decodes the JSON
straight into a typed struct with msgspec (compiled: the types are checked while parsing, no dict
in between) and checks the few rules msgspec cannot express (the configured event types, the clock,
the key) in one expression. Anything that does not pass them all - every bad message, and the rare
good one msgspec is stricter about (a non-finite number such as `1e400`, a lone surrogate escape
outside the ids) - goes through `parse_event_stdlib`, the standard-library decoder and the checks
in order, which name the reason; so the accepted events and the reasons are exactly that
function's (tests/test_schema_decoder.py checks it on arbitrary input). A message that fails
raises `InvalidEvent` with a reason code; the worker sends it to the dead-letter topic with that
reason. Reason codes:

    oversized            the payload is larger than the configured limit
    malformed_json       not valid UTF-8 JSON (also: a null value, nesting too deep)
    not_an_object        JSON, but not an object
    missing_field        user_id, item_id, event_type or ts is absent
    wrong_type           a field has the wrong type (ids and event_type strings, ts an integer
                         (not a float, not a boolean), props an object)
    empty_id             user_id or item_id is empty or longer than 256 characters
    invalid_unicode      a string holds a lone surrogate escape such as "\\ud800" (JSON allows
                         it, but it is not text: it cannot be encoded, stored or sent on)
    unknown_event_type   event_type is not one of the configured types
    ts_out_of_range      ts is negative or beyond a signed 64-bit integer
    future_ts            ts is further in the future than allowed (clock skew limit)
    missing_key          the message has no key (a keyless message lands on any partition, and
                         would split the user's window over several partitions' stores)
    key_mismatch         the message key differs from user_id

Besides these, the worker dead-letters a message with `processing_error` when any later stage
raises on it (see `stream/worker/loop.py`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import msgspec

EVENT_SCHEMA_VERSION = "kvrec.event.v1"
RECOMMENDATION_SCHEMA_VERSION = "kvrec.recommendation.v1"
MAX_ID_LENGTH = 256
MAX_TS = 2**63 - 1  # epoch ms are stored as signed 64-bit integers
REQUIRED_FIELDS = ("user_id", "item_id", "event_type", "ts")


class InvalidEvent(ValueError):
    """A message the worker cannot apply; `reason` is one of the codes above."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class Event(msgspec.Struct, frozen=True, gc=False):
    """An input event. A msgspec struct: `parse_event` decodes the JSON straight into it (unknown
    fields skipped, a repeated field's last value wins, as `json.loads`), and making one is a C
    call (a frozen dataclass's `__init__` took longer than decoding the JSON)."""

    user_id: str
    item_id: str
    event_type: str
    ts: int  # epoch milliseconds; msgspec takes any size, the range is checked after
    props: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class ScoredItem:
    item_id: str
    score: float


@dataclass(frozen=True, slots=True)
class BecauseEvent:
    item_id: str
    event_type: str
    weight: float


@dataclass(frozen=True)
class Recommendation:
    user_id: str
    items: list[ScoredItem]
    model_version: str
    event_ts: int  # the `ts` of the event this answers
    emitted_ts: int  # when the worker produced it (epoch ms)
    because: list[BecauseEvent] = field(default_factory=list)
    cold_start: bool = False
    source_ts: int | None = None  # Kafka timestamp of the input message (for latency)
    schema: str = RECOMMENDATION_SCHEMA_VERSION


def encode_event(event: Event) -> bytes:
    data: dict[str, Any] = {
        "user_id": event.user_id,
        "item_id": event.item_id,
        "event_type": event.event_type,
        "ts": event.ts,
    }
    if event.props is not None:
        data["props"] = event.props
    return json.dumps(data, separators=(",", ":")).encode()


def encode_recommendation(recommendation: Recommendation) -> bytes:
    # field by field: `dataclasses.asdict` deep-copies and was a fifth of the worker's time
    r = recommendation
    data = {
        "user_id": r.user_id,
        "items": [{"item_id": i.item_id, "score": i.score} for i in r.items],
        "model_version": r.model_version,
        "event_ts": r.event_ts,
        "emitted_ts": r.emitted_ts,
        "because": [
            {"item_id": b.item_id, "event_type": b.event_type, "weight": b.weight}
            for b in r.because
        ],
        "cold_start": r.cold_start,
        "source_ts": r.source_ts,
        "schema": r.schema,
    }
    return _compact_json(data)


_compact_json_encoder = json.JSONEncoder(separators=(",", ":"))


def _compact_json(data: dict[str, Any]) -> bytes:
    return _compact_json_encoder.encode(data).encode()


def decode_recommendation(raw: bytes) -> Recommendation:
    """Parse a recommendation; unknown fields are ignored. `ValueError` if it is not one."""
    data = json.loads(raw)
    if not isinstance(data, dict):
        raise ValueError(f"a recommendation is a JSON object, got {type(data).__name__}")
    known = Recommendation.__dataclass_fields__
    try:
        return Recommendation(
            **{
                **{k: v for k, v in data.items() if k in known},
                "items": [ScoredItem(i["item_id"], i["score"]) for i in data["items"]],
                "because": [
                    BecauseEvent(b["item_id"], b["event_type"], b["weight"])
                    for b in data.get("because", [])
                ],
            }
        )
    except KeyError as exc:
        raise ValueError(f"missing field {exc}") from None
    except TypeError as exc:
        raise ValueError(f"malformed field ({exc})") from None


def parse_event(
    raw: bytes | None,
    key: bytes | None,
    *,
    event_types: frozenset[str],
    max_bytes: int,
    now_ms: int,
    max_future_ms: int,
    require_key: bool = True,
) -> Event:
    """Validate one input message; raise `InvalidEvent` with a reason code if it is bad.

    What passes is within everything later stages accept: ids are encodable text of bounded
    length, `ts` fits a signed 64-bit integer. `require_key=False` checks the value alone.
    The result, and the reason of a bad message, are `parse_event_stdlib`'s for every input."""
    if raw is not None and len(raw) <= max_bytes:
        try:
            # msgspec skips unknown fields without checking their UTF-8: a str checks it all
            event = _decode_event(raw if raw.isascii() else raw.decode("utf-8"))
        except (msgspec.MsgspecError, ValueError, RecursionError):  # the reason: below
            event = None
        if event is not None:
            user_id, item_id, event_type, ts = event.user_id, event.item_id, event.event_type, event.ts
            # msgspec's strings are valid Unicode (it refuses a lone surrogate), so each encodes
            if (
                0 < len(user_id) <= MAX_ID_LENGTH and 0 < len(item_id) <= MAX_ID_LENGTH
                and event_type in event_types and 0 <= ts <= MAX_TS
                and ts <= now_ms + max_future_ms
                and (key == user_id.encode() if key is not None else not require_key)
            ):
                return event
    return parse_event_stdlib(raw, key, event_types=event_types, max_bytes=max_bytes,
                              now_ms=now_ms, max_future_ms=max_future_ms, require_key=require_key)


_decode_event = msgspec.json.Decoder(Event).decode


def parse_event_stdlib(
    raw: bytes | None,
    key: bytes | None,
    *,
    event_types: frozenset[str],
    max_bytes: int,
    now_ms: int,
    max_future_ms: int,
    require_key: bool = True,
) -> Event:
    """`parse_event` with the standard library's `json` and every check in order: the reference
    that defines the reasons (and the path of every message the fast path does not accept)."""
    if raw is None:
        raise InvalidEvent("malformed_json", "empty message (null value)")
    if len(raw) > max_bytes:
        raise InvalidEvent("oversized", f"{len(raw)} bytes > limit {max_bytes}")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise InvalidEvent("malformed_json", str(exc)[:200]) from None
    if type(data) is dict:  # the common case, checked in one pass; anything else below
        user_id, item_id = data.get("user_id"), data.get("item_id")
        event_type, ts, props = data.get("event_type"), data.get("ts"), data.get("props")
        if (
            type(user_id) is str and type(item_id) is str and type(event_type) is str
            and type(ts) is int and (props is None or type(props) is dict)
            and 0 < len(user_id) <= MAX_ID_LENGTH and 0 < len(item_id) <= MAX_ID_LENGTH
            and event_type in event_types and 0 <= ts <= MAX_TS and ts <= now_ms + max_future_ms
            and key is not None and user_id.isascii() and item_id.isascii()
            and key == user_id.encode()
        ):
            return Event(user_id, item_id, event_type, ts, props)
    return _checked_event(data, key, event_types=event_types, now_ms=now_ms,
                          max_future_ms=max_future_ms, require_key=require_key)


def _checked_event(
    data: Any, key: bytes | None, *, event_types: frozenset[str], now_ms: int,
    max_future_ms: int, require_key: bool,
) -> Event:
    """Every check of a decoded event, in order: the first that fails names the reason."""
    if not isinstance(data, dict):
        raise InvalidEvent("not_an_object", f"got {type(data).__name__}")
    missing = [name for name in REQUIRED_FIELDS if name not in data]
    if missing:
        raise InvalidEvent("missing_field", ", ".join(missing))
    user_id, item_id, event_type, ts = (data[name] for name in REQUIRED_FIELDS)
    for name, value in (("user_id", user_id), ("item_id", item_id), ("event_type", event_type)):
        if not isinstance(value, str):
            raise InvalidEvent("wrong_type", f"{name} must be a string, got {type(value).__name__}")
    if isinstance(ts, bool) or not isinstance(ts, int):
        raise InvalidEvent("wrong_type", f"ts must be integer epoch ms, got {type(ts).__name__}")
    props = data.get("props")
    if props is not None and not isinstance(props, dict):
        raise InvalidEvent("wrong_type", "props must be an object")
    for name, value in (("user_id", user_id), ("item_id", item_id)):
        if not value or len(value) > MAX_ID_LENGTH:
            raise InvalidEvent("empty_id", f"{name} must have 1..{MAX_ID_LENGTH} characters")
        try:
            value.encode()
        except UnicodeEncodeError as exc:
            raise InvalidEvent("invalid_unicode", f"{name}: {exc.reason} at {exc.start}") from None
    if event_type not in event_types:
        raise InvalidEvent(
            "unknown_event_type", f"{event_type[:100]!r} not in {sorted(event_types)}"
        )
    if not 0 <= ts <= MAX_TS:
        raise InvalidEvent("ts_out_of_range", f"ts must be in 0..{MAX_TS} epoch ms, got {ts}")
    if ts > now_ms + max_future_ms:
        raise InvalidEvent("future_ts", f"ts {ts} is {ts - now_ms} ms in the future")
    if key is None:
        if require_key:
            raise InvalidEvent("missing_key", "the message has no key; key it by user_id")
    elif key != user_id.encode():
        raise InvalidEvent("key_mismatch", "message key differs from user_id")
    return Event(user_id, item_id, event_type, ts, props)
