"""Event and recommendation schemas: the hot-path validator and the JSON Schema files agree."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from kvrec.stream.schema import (
    BecauseEvent,
    Event,
    InvalidEvent,
    Recommendation,
    ScoredItem,
    decode_recommendation,
    encode_event,
    encode_recommendation,
    parse_event,
)

TYPES = frozenset({"view", "click", "add_to_cart", "purchase"})
NOW = 1_800_000_000_000
SCHEMAS = Path(__file__).resolve().parent.parent / "stream" / "schemas"
REASONS = {"oversized", "malformed_json", "not_an_object", "missing_field", "wrong_type",
           "empty_id", "invalid_unicode", "unknown_event_type", "ts_out_of_range", "future_ts",
           "missing_key", "key_mismatch"}
# reasons about the transport, the clock or the text encoding, which a JSON Schema of the value
# cannot express
TRANSPORT_REASONS = {"oversized", "malformed_json", "invalid_unicode", "future_ts", "missing_key",
                     "key_mismatch"}


def _parse(raw: bytes | None, key: bytes | None = b"u1", *, require_key: bool = True) -> Event:
    return parse_event(raw, key, event_types=TYPES, max_bytes=2000, now_ms=NOW, max_future_ms=60_000,
                       require_key=require_key)


def _event(**fields: Any) -> bytes:
    base: dict[str, Any] = {"user_id": "u1", "item_id": "a", "event_type": "view", "ts": 1}
    base.update(fields)
    return json.dumps({k: v for k, v in base.items() if v is not DROP}).encode()


DROP = object()
BAD_EVENTS = [
    (b"x" * 3000, "oversized"),
    (b"{nope", "malformed_json"),
    (b"\xff\xfe", "malformed_json"),
    (b"[" * 1900, "malformed_json"),
    (None, "malformed_json"),
    (b"[]", "not_an_object"),
    (b'"u1"', "not_an_object"),
    (_event(ts=DROP), "missing_field"),
    (_event(user_id=DROP), "missing_field"),
    (_event(item_id=3), "wrong_type"),
    (_event(user_id=None), "wrong_type"),
    (_event(event_type=["view"]), "wrong_type"),
    (_event(ts=1.5), "wrong_type"),
    (_event(ts="1"), "wrong_type"),
    (_event(ts=True), "wrong_type"),
    (_event(props=3), "wrong_type"),
    (_event(item_id=""), "empty_id"),
    (_event(user_id="", ts=1), "empty_id"),
    (_event(user_id="u" * 257), "empty_id"),
    (_event(event_type="like"), "unknown_event_type"),
    (_event(event_type="VIEW"), "unknown_event_type"),
    (_event(user_id="\ud800"), "invalid_unicode"),
    (_event(item_id="a\udfff"), "invalid_unicode"),
    (b'{"user_id": "u1", "item_id": "\\udc80x", "event_type": "view", "ts": 1}', "invalid_unicode"),
    (_event(ts=-1), "ts_out_of_range"),
    (_event(ts=-(2**70)), "ts_out_of_range"),
    (_event(ts=2**63), "ts_out_of_range"),
    (_event(ts=NOW + 60_001), "future_ts"),
    (_event(user_id="u2"), "key_mismatch"),
]
GOOD_EVENTS = [
    _event(),
    _event(item_id="sku-9", event_type="click", ts=5, props={}),
    _event(event_type="purchase", props={"price": 9.5, "tags": ["a"]}),
    _event(ts=NOW + 60_000),
    _event(extra="ignored"),
    _event(user_id="ü" * 5, item_id="i" * 256),
]


@pytest.mark.parametrize(("raw", "reason"), BAD_EVENTS)
def test_every_bad_event_gets_its_reason_code(raw: bytes | None, reason: str) -> None:
    with pytest.raises(InvalidEvent) as caught:
        _parse(raw)
    assert caught.value.reason == reason
    assert caught.value.detail


def test_the_bad_examples_cover_every_reason_code() -> None:
    # missing_key is about the key, not the value: test_a_message_without_a_key_is_refused
    assert {reason for _, reason in BAD_EVENTS} | {"missing_key"} == REASONS


@pytest.mark.parametrize("raw", GOOD_EVENTS)
def test_valid_events_pass(raw: bytes) -> None:
    data = json.loads(raw)
    event = _parse(raw, key=data["user_id"].encode())
    assert (event.user_id, event.item_id, event.event_type, event.ts) == (
        data["user_id"], data["item_id"], data["event_type"], data["ts"],
    )
    assert event.props == data.get("props")
    assert _parse(raw, key=None, require_key=False) == event  # the value alone


@pytest.mark.parametrize("raw", GOOD_EVENTS)
def test_a_message_without_a_key_is_refused(raw: bytes) -> None:
    with pytest.raises(InvalidEvent) as caught:
        _parse(raw, key=None)
    assert caught.value.reason == "missing_key"


def test_event_types_are_configurable() -> None:
    raw = _event(event_type="like")
    event = parse_event(raw, b"u1", event_types=frozenset({"like"}), max_bytes=2000, now_ms=NOW,
                        max_future_ms=0)
    assert event.event_type == "like"
    with pytest.raises(InvalidEvent, match="unknown_event_type"):
        parse_event(_event(), b"u1", event_types=frozenset({"like"}), max_bytes=2000, now_ms=NOW,
                     max_future_ms=0)


def test_encode_event_round_trips_through_the_validator() -> None:
    event = Event("u1", "sku-1", "add_to_cart", 123, {"source": "web"})
    assert _parse(encode_event(event)) == event
    assert "props" not in json.loads(encode_event(Event("u1", "a", "view", 1)))


# --- the JSON Schema files, checked with a small interpreter of the keywords they use ---------

def _type_ok(value: Any, kind: str) -> bool:
    checks = {
        "object": lambda v: isinstance(v, dict),
        "array": lambda v: isinstance(v, list),
        "string": lambda v: isinstance(v, str),
        "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
        "boolean": lambda v: isinstance(v, bool),
        "null": lambda v: v is None,
    }
    return checks[kind](value)


def schema_errors(value: Any, schema: dict[str, Any], path: str = "$") -> list[str]:
    """Violations of the draft 2020-12 keywords our schema files use (and only those)."""
    known = {"$schema", "$id", "title", "description", "type", "required", "properties",
             "additionalProperties", "items", "minLength", "maxLength", "enum", "const",
             "minimum", "maximum"}
    assert set(schema) <= known, f"schema uses keywords this checker does not know: {set(schema) - known}"
    kinds = schema.get("type")
    if kinds is not None:
        kinds = [kinds] if isinstance(kinds, str) else kinds
        if not any(_type_ok(value, kind) for kind in kinds):
            return [f"{path}: not {kinds}"]
    errors = []
    if "const" in schema and value != schema["const"]:
        errors.append(f"{path}: != {schema['const']!r}")
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: not in enum")
    if isinstance(value, str) and not (
        schema.get("minLength", 0) <= len(value) <= schema.get("maxLength", 1 << 62)
    ):
        errors.append(f"{path}: length")
    if _type_ok(value, "number") and not (
        schema.get("minimum", float("-inf")) <= value <= schema.get("maximum", float("inf"))
    ):
        errors.append(f"{path}: range")
    if isinstance(value, dict):
        errors += [f"{path}.{name}: missing" for name in schema.get("required", []) if name not in value]
        for name, sub in schema.get("properties", {}).items():
            if name in value:
                errors += schema_errors(value[name], sub, f"{path}.{name}")
        assert schema.get("additionalProperties", True) is True
    if isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            errors += schema_errors(item, schema["items"], f"{path}[{index}]")
    return errors


def _schema(name: str) -> dict[str, Any]:
    schema = json.loads((SCHEMAS / name).read_text())
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$id"].endswith(name.removesuffix(".json").replace(".", ":"))  # versioned
    return schema


@pytest.mark.parametrize(
    "raw", GOOD_EVENTS + [raw for raw, reason in BAD_EVENTS if reason not in TRANSPORT_REASONS]
)
def test_event_schema_file_agrees_with_the_validator(raw: bytes) -> None:
    schema = _schema("event.v1.json")
    data = json.loads(raw)
    try:
        _parse(raw, key=None, require_key=False)
        accepted = True
    except InvalidEvent:
        accepted = False
    assert accepted == (schema_errors(data, schema) == []), schema_errors(data, schema)


def _full_recommendation() -> Recommendation:
    return Recommendation(
        user_id="u1",
        items=[ScoredItem("a", 0.5), ScoredItem("b", -1.25)],
        model_version="20261123-abc",
        event_ts=1,
        emitted_ts=2,
        because=[BecauseEvent("x", "click", 0.75)],
        cold_start=False,
        source_ts=None,
    )


def test_recommendations_match_their_schema_file_and_round_trip() -> None:
    schema = _schema("recommendation.v1.json")
    for rec in (_full_recommendation(), Recommendation("u2", [], "v", 3, 4, cold_start=True, source_ts=3)):
        encoded = encode_recommendation(rec)
        assert schema_errors(json.loads(encoded), schema) == []
        assert decode_recommendation(encoded) == rec
        assert json.loads(encoded) == dataclasses.asdict(rec)  # every field, none invented
    data = json.loads(encode_recommendation(_full_recommendation()))
    for broken in ({**data, "items": [{"item_id": "a", "score": "high"}]},
                   {k: v for k, v in data.items() if k != "model_version"},
                   {**data, "schema": "kvrec.recommendation.v0"},
                   {**data, "because": [{"item_id": "x", "event_type": "click", "weight": 2}]}):
        assert schema_errors(broken, schema)


def test_decoding_ignores_unknown_fields_and_rejects_non_recommendations() -> None:
    data = json.loads(encode_recommendation(_full_recommendation()))
    assert decode_recommendation(json.dumps({**data, "new_field": 1}).encode()) == _full_recommendation()
    for bad in (b"[]", b"{}", b'{"items": [1]}', b"nope"):
        with pytest.raises(ValueError):
            decode_recommendation(bad)
