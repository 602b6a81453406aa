"""`parse_event`'s msgspec fast path against `parse_event_stdlib`, the standard-library decoder
with every check in order that defines the dead-letter reasons: on any input (valid events, odd
Unicode, big and non-finite numbers, repeated, missing and extra fields, wrong types, mutated
bytes, deep nesting) both accept the same event, field for field and type for type, or refuse it
with the same reason and detail."""

from __future__ import annotations

import json
import sys
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvrec.stream.schema import Event, InvalidEvent, encode_event, parse_event, parse_event_stdlib

TYPES = frozenset({"view", "click", "add_to_cart", "purchase"})
NOW = 1_800_000_000_000
FUTURE_MS = 60_000
FIELDS = ("user_id", "item_id", "event_type", "ts", "props")


def _outcome(parse: Any, raw: bytes | None, key: bytes | None, require_key: bool,
             max_bytes: int) -> tuple[str, str]:
    try:
        event = parse(raw, key, event_types=TYPES, max_bytes=max_bytes, now_ms=NOW,
                      max_future_ms=FUTURE_MS, require_key=require_key)
    except InvalidEvent as invalid:
        return ("dead letter", f"{invalid.reason}: {invalid.detail}")
    assert type(event) is Event
    # repr tells 1 from 1.0 and True, -0.0 from 0.0, and shows the keys' order
    return ("event", repr(tuple(getattr(event, name) for name in FIELDS)))


def _assert_same(raw: bytes | None, key: bytes | None, require_key: bool = True,
                 max_bytes: int = 4096) -> tuple[str, str]:
    expected = _outcome(parse_event_stdlib, raw, key, require_key, max_bytes)
    assert _outcome(parse_event, raw, key, require_key, max_bytes) == expected, raw
    return expected


# every character, lone surrogates included (json.dumps writes them as \ud800 escapes)
TEXT = st.text(st.characters(codec=None, categories=None), max_size=12)
IDS = st.one_of(st.sampled_from(["u1", "u2", "a", "", "u" * 256, "u" * 257, "é", "😀"]), TEXT)
NUMBERS = st.one_of(
    st.integers(), st.integers(min_value=-(2**70), max_value=2**70),
    st.integers(min_value=NOW - 10, max_value=NOW + 2 * FUTURE_MS),
    st.floats(), st.sampled_from([0, -1, 2**63 - 1, 2**63, 2**64, -(2**63) - 1, 0.0, -0.0, 1.5]),
)
JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), NUMBERS, TEXT),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(TEXT, inner, max_size=3)),
    max_leaves=8,
)
# JSON text json.dumps never writes, or writes only in one form
ODD_TOKENS = st.sampled_from([
    "1e400", "-1e400", "1E5", "1e3", "0e0", "-0", "1.0", "10000000000000000000000000000",
    "1.0000000000000000000000001", "5e-324", "1e-400", "NaN", "Infinity", "-Infinity", "01",
    "true", "false", "null", "[]", "{}", '"\\ud800"', '"\\udfff\\ud800"', '"\\ud83d\\ude00"',
    '"\\u00e9"', '"\\u0000"', '"a\\/b"', '"\\x"', '"\\u12"', '"\u00e9"', '"\x01"', '"view"',
    '"u1"', "[[[[[[]]]]]]", '{"a":{"b":[1,{"c":null}]}}', "tru", '"unterminated',
])
VALUE_TEXT = st.one_of(
    JSON_VALUES.map(json.dumps),
    JSON_VALUES.map(lambda v: json.dumps(v, ensure_ascii=False)),
    ODD_TOKENS,
)
FIELD_NAMES = st.one_of(st.sampled_from(FIELDS), TEXT)
GOOD_VALUES = {
    "user_id": st.sampled_from(["u1", "u2", "é", "😀", "a" * 256, "a" * 257, "", "u\ud800"]).map(
        json.dumps),
    "item_id": IDS.map(json.dumps),
    "event_type": st.sampled_from([*sorted(TYPES), "like", "VIEW"]).map(json.dumps),
    "ts": st.one_of(st.integers(-3, 3), st.integers(NOW - 3, NOW + FUTURE_MS + 3),
                    st.sampled_from([2**63 - 1, 2**63])).map(str),
    "props": st.one_of(st.just("null"), st.dictionaries(TEXT, JSON_VALUES, max_size=3).map(
        json.dumps)),
}


@st.composite
def _object_text(draw: st.DrawFn) -> str:
    """An object's JSON text: the schema's fields in any order, some of them missing, wrong,
    odd or repeated, and extra fields."""
    pairs: list[tuple[str, str]] = []
    for name in FIELDS:
        if draw(st.integers(0, 19)) == 0:
            continue  # missing
        odd = draw(st.integers(0, 4)) == 0
        pairs.append((name, draw(VALUE_TEXT if odd else GOOD_VALUES[name])))
    pairs += draw(st.lists(st.tuples(FIELD_NAMES, VALUE_TEXT), max_size=3))
    order = draw(st.permutations(pairs))
    space = draw(st.sampled_from(["", " ", "\n\t "]))
    return "{" + space + ",".join(f"{json.dumps(k)}{space}:{v}" for k, v in order) + space + "}"


@st.composite
def _mutated(draw: st.DrawFn, raw: bytes) -> bytes:
    """Bytes cut, dropped, inserted or replaced."""
    data = bytearray(raw)
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(data)))
        match draw(st.sampled_from(["cut", "drop", "insert", "replace"])):
            case "cut":
                del data[at:]
            case "drop":
                del data[at:at + 1]
            case "insert":
                data[at:at] = draw(st.binary(min_size=1, max_size=3))
            case "replace":
                data[at:at + 1] = draw(st.binary(min_size=1, max_size=1))
    return bytes(data)


@st.composite
def _message(draw: st.DrawFn) -> tuple[bytes | None, bytes | None, bool]:
    text = draw(_object_text())
    raw = draw(st.sampled_from([
        text.encode("utf-8", "surrogatepass"),  # a lone surrogate written raw: not UTF-8
        text.encode("utf-8", "replace"),
        text.encode("utf-16", "surrogatepass"),
    ]) if draw(st.integers(0, 4)) == 0 else st.just(text.encode("utf-8", "surrogatepass")))
    match draw(st.integers(0, 7)):
        case 4:
            raw = draw(_mutated(raw))
        case 5:  # not an object
            raw = draw(VALUE_TEXT).encode("utf-8", "surrogatepass")
        case 6:
            raw = draw(st.binary(max_size=40))
        case 7:
            raw = None
    try:
        user_id = json.loads(text).get("user_id")
    except ValueError:
        user_id = None
    keys = [b"u1", b"u2", None, "é".encode(), "😀".encode(), b"\xff"]
    if isinstance(user_id, str):
        keys.append(user_id.encode("utf-8", "surrogatepass"))
    key = draw(st.one_of(st.sampled_from(keys[-1:]), st.sampled_from(keys), st.none(),
                         st.binary(max_size=4)))
    return raw, key, draw(st.booleans())


def test_fast_path_agrees_with_the_stdlib_decoder_on_any_input() -> None:
    outcomes: set[str] = set()

    @settings(max_examples=2500, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(_message())
    def agree(message) -> None:
        raw, key, require_key = message
        kind, text = _assert_same(raw, key, require_key)
        outcomes.add(kind if kind == "event" else text.split(":")[0])

    agree()
    # not vacuous: the inputs are accepted, and refused for what is wrong with their JSON
    # (the reasons of the rules on the values: the test below)
    assert outcomes >= {"event", "malformed_json", "not_an_object", "missing_field",
                        "wrong_type"}, outcomes


EDGES = {
    "user_id": ["", "u" * 256, "u" * 257, "u\ud800", "é", "\x00"],
    "item_id": ["", "i" * 256, "i" * 257, "\udfff", "😀", 5, None],
    "event_type": ["like", "", "click", "VIEW", 1],
    "ts": [-1, 0, -(2**63), 2**63 - 1, 2**63, NOW + FUTURE_MS, NOW + FUTURE_MS + 1, 1.0, True, "1"],
    "props": [None, {}, [], "x", {"a": float("inf")}, {"a": [1, {"b": "\ud800"}]}, {"a": 2**70}],
}


@st.composite
def _near_valid(draw: st.DrawFn) -> tuple[bytes, bytes | None, bool]:
    """A valid event with one or two fields at an edge of a rule, keyed by its user id or not."""
    fields: dict[str, Any] = {"user_id": draw(st.sampled_from(["u1", "é"])), "item_id": "a",
                              "event_type": "view", "ts": draw(st.integers(0, NOW))}
    for name in draw(st.lists(st.sampled_from(sorted(EDGES)), min_size=1, max_size=2)):
        fields[name] = draw(st.sampled_from(EDGES[name]))
    raw = json.dumps(fields, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")
    user_id = fields["user_id"]
    own = user_id.encode("utf-8", "surrogatepass") if isinstance(user_id, str) else None
    key = draw(st.sampled_from([own, own, None, b"u2"]))
    return raw, key, draw(st.booleans())


def test_fast_path_agrees_at_the_edge_of_every_rule() -> None:
    outcomes: set[str] = set()

    @settings(max_examples=800, deadline=None, derandomize=True, database=None)
    @given(_near_valid())
    def agree(message) -> None:
        raw, key, require_key = message
        kind, text = _assert_same(raw, key, require_key)
        outcomes.add(kind if kind == "event" else text.split(":")[0])

    agree()
    assert outcomes >= {"event", "wrong_type", "empty_id", "invalid_unicode", "unknown_event_type",
                        "ts_out_of_range", "future_ts", "missing_key", "key_mismatch"}, outcomes


@pytest.mark.parametrize("raw", [
    # msgspec skips an unknown field without checking its UTF-8; json refuses the message
    b'{"user_id":"u1","item_id":"a","event_type":"view","ts":1,"x":"\xff"}',
    b'{"user_id":"u1","item_id":"a","event_type":"view","ts":1,"x":"\xed\xa0\x80"}',
    # accepted by json only: a lone surrogate outside the ids, a non-finite number
    b'{"user_id":"u1","item_id":"a","event_type":"view","ts":1,"x":"\\ud800"}',
    b'{"user_id":"u1","item_id":"a","event_type":"view","ts":1,"props":{"a":"\\udfff"}}',
    b'{"user_id":"u1","item_id":"a","event_type":"view","ts":1,"props":{"a":1e400}}',
    b'{"user_id":"u1","item_id":"a","event_type":"view","ts":1,"props":{"a":NaN}}',
    # repeated fields: the last value wins, in the first one's place
    b'{"user_id":"u2","item_id":"a","event_type":"view","ts":1,"user_id":"u1"}',
    b'{"user_id":"u1","item_id":"a","event_type":"view","ts":1,"props":{"a":1,"b":2,"a":3}}',
    b'{"user_id":"u1","item_id":"a","event_type":"view","ts":"1","ts":1}',
    b'{"user_id":"u1","item_id":"a","event_type":"view","ts":1,"props":{"a":1e5,"b":-0}}',
    b'{"user_id":"u1","item_id":"a","event_type":"view","ts":1,"props":{"a":18446744073709551616}}',
    b'\xef\xbb\xbf{"user_id":"u1","item_id":"a","event_type":"view","ts":1}',
    '{"user_id":"u1","item_id":"é😀","event_type":"view","ts":1}'.encode(),
    b'{"user_id":"u1","item_id":"a","event_type":"view","ts":9223372036854775807}',
    b'{"user_id":"u1","item_id":"a","event_type":"view","ts":1e3}',
])
def test_the_known_differences_of_the_two_decoders_end_the_same(raw: bytes) -> None:
    _assert_same(raw, b"u1")


@pytest.mark.parametrize("depth", [10, 200, *range(900, 1100, 10), 1500, 3000])
def test_deep_nesting_is_refused_at_the_same_depth(depth: int) -> None:
    """Both decoders stop at the interpreter's recursion limit; the fast path may only stop
    earlier (its message then takes the stdlib path)."""
    nested = "[" * depth + "]" * depth
    for field in ("props", "extra"):
        value = nested if field == "extra" else '{"a":' + nested + "}"
        raw = ('{"user_id":"u1","item_id":"a","event_type":"view","ts":1,'
               f'"{field}":{value}}}').encode()
        _, reason = _assert_same(raw, b"u1", max_bytes=10_000)
        if depth > sys.getrecursionlimit():
            assert reason.startswith("malformed_json"), reason


def test_a_valid_event_takes_the_fast_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The stdlib decoder is only for messages the fast path does not accept."""
    import stream.schema

    def refuse(*args: Any, **kwargs: Any) -> Event:
        raise AssertionError("a valid event took the stdlib path")

    monkeypatch.setattr(stream.schema, "parse_event_stdlib", refuse)
    for event in (Event("u1", "a", "view", 1), Event("u1", "é", "click", NOW, {"x": [1.5]})):
        assert parse_event(encode_event(event), b"u1", event_types=TYPES, max_bytes=4096,
                           now_ms=NOW, max_future_ms=FUTURE_MS) == event
