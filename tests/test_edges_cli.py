"""Datasets, schemas, `kvrec replay` and `kvrec tail`: the edges of the product."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
from confluent_kafka import Consumer

from model.datasets import SyntheticSpec, generate_synthetic, group_by_user, read_interactions
from model.errors import DataError
from stream.cli import main as kvrec
from stream.schema import (
    InvalidEvent,
    Recommendation,
    ScoredItem,
    decode_recommendation,
    encode_recommendation,
    parse_event,
)
from tests.conftest import create_topics, unique_topic

TYPES = frozenset({"view", "click", "add_to_cart", "purchase"})
NOW = 1_800_000_000_000


def _parse(raw: bytes | None, key: bytes | None = b"u1"):
    return parse_event(raw, key, event_types=TYPES, max_bytes=2000, now_ms=NOW, max_future_ms=60_000)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"x" * 3000, "oversized"),
        (b"{nope", "malformed_json"),
        (b"\xff\xfe", "malformed_json"),
        (None, "malformed_json"),
        (b"[]", "not_an_object"),
        (b'{"user_id": "u1", "item_id": "a", "event_type": "view"}', "missing_field"),
        (b'{"user_id": "u1", "item_id": 3, "event_type": "view", "ts": 1}', "wrong_type"),
        (b'{"user_id": "u1", "item_id": "a", "event_type": "view", "ts": 1.5}', "wrong_type"),
        (b'{"user_id": "u1", "item_id": "a", "event_type": "view", "ts": true}', "wrong_type"),
        (b'{"user_id": "u1", "item_id": "a", "event_type": "view", "ts": 1, "props": 3}', "wrong_type"),
        (b'{"user_id": "u1", "item_id": "", "event_type": "view", "ts": 1}', "empty_id"),
        (b'{"user_id": "u1", "item_id": "a", "event_type": "like", "ts": 1}', "unknown_event_type"),
        (b'{"user_id": "u1", "item_id": "a", "event_type": "view", "ts": 1800000070000}', "future_ts"),
        (b'{"user_id": "u2", "item_id": "a", "event_type": "view", "ts": 1}', "key_mismatch"),
    ],
)
def test_every_reason_code_is_raised(raw: bytes | None, reason: str) -> None:
    with pytest.raises(InvalidEvent) as caught:
        _parse(raw)
    assert caught.value.reason == reason and caught.value.detail


def test_valid_events_pass_and_match_the_json_schema_required_fields() -> None:
    event = _parse(b'{"user_id": "u1", "item_id": "sku-9", "event_type": "click", "ts": 5, "props": {}}')
    assert (event.user_id, event.item_id, event.event_type, event.ts) == ("u1", "sku-9", "click", 5)
    assert _parse(b'{"user_id": "u1", "item_id": "a", "event_type": "view", "ts": 1}', key=None)
    schemas = Path(__file__).resolve().parent.parent / "stream" / "schemas"
    event_schema = json.loads((schemas / "event.v1.json").read_text())
    assert set(event_schema["required"]) == {"user_id", "item_id", "event_type", "ts"}
    assert set(event_schema["properties"]["event_type"]["enum"]) == TYPES
    rec_schema = json.loads((schemas / "recommendation.v1.json").read_text())
    rec = Recommendation("u1", [ScoredItem("a", 0.5)], "v1", 1, 2)
    encoded = json.loads(encode_recommendation(rec))
    assert set(rec_schema["required"]) <= set(encoded)
    assert encoded["schema"] == rec_schema["properties"]["schema"]["const"]
    assert decode_recommendation(encode_recommendation(rec)) == rec


def test_dataset_readers_keep_per_user_order_and_name_bad_lines(tmp_path: Path) -> None:
    sasrec = tmp_path / "seq.txt"
    sasrec.write_text("1 10\n1 11\n2 10\n1 12\n2 13\n")
    data = read_interactions(sasrec, "sasrec")
    assert [i.item_id for i in group_by_user(data)["1"]] == ["10", "11", "12"]
    assert all(a.ts <= b.ts for a, b in itertools.pairwise(data))
    sasrec.write_text("1 10\n1 eleven\n")
    with pytest.raises(DataError, match=r"seq\.txt:2"):
        read_interactions(sasrec, "sasrec")
    movielens = tmp_path / "ratings.dat"
    movielens.write_text("1::5::4::100\n2::6::2::50\n")
    assert [(i.user_id, i.event_type) for i in read_interactions(movielens, "movielens")] == [
        ("2", "view"), ("1", "purchase"),
    ]
    with pytest.raises(DataError, match="no such file"):
        read_interactions(tmp_path / "missing.txt", "sasrec")


def test_synthetic_data_is_deterministic_and_sequential() -> None:
    spec = SyntheticSpec(users=50, items=100, events=3000, seed=4)
    first, second = generate_synthetic(spec), generate_synthetic(spec)
    assert first == second and len(first) == 3000
    # chains: the same item is followed by the same successor far more often than by chance
    pairs: dict[str, dict[str, int]] = {}
    for events in group_by_user(first).values():
        for a, b in itertools.pairwise(events):
            pairs.setdefault(a.item_id, {}).setdefault(b.item_id, 0)
            pairs[a.item_id][b.item_id] += 1
    top_share = sum(max(n.values()) for n in pairs.values()) / sum(sum(n.values()) for n in pairs.values())
    assert top_share > 0.4


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["replay", "--format", "sasrec", "--data", "/nonexistent/file.txt"], "no such file"),
        (["train", "--format", "sasrec", "--out", "/tmp/x", "--data", "BAD"], "no such file"),
        (["replay", "--no-such-flag"], "unrecognized arguments"),
    ],
)
def test_cli_errors_are_one_line_without_traceback(args: list[str], message: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "stream.cli", *args], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_malformed_dataset_line_is_a_one_line_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_text("1 2\n3\n")
    result = subprocess.run(
        [sys.executable, "-m", "stream.cli", "replay", "--data", str(bad)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == f"kvrec: error: {bad}:2: expected `user item` integers, got '3\\n'"


@pytest.mark.kafka
def test_replay_publishes_the_dataset_and_tail_prints_recommendations(
    kafka_bootstrap: str, capsys: pytest.CaptureFixture[str]
) -> None:
    events_topic, recs_topic = unique_topic("replay"), unique_topic("recs")
    create_topics(kafka_bootstrap, {events_topic: 2, recs_topic: 1})
    args = ["--format", "synthetic", "--synthetic-users", "20", "--synthetic-items", "30",
            "--synthetic-events", "400", "--seed", "2"]
    assert kvrec(["replay", *args, "--bootstrap-servers", kafka_bootstrap, "--topic", events_topic]) == 0
    assert "replayed 400 events" in capsys.readouterr().out
    consumer = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": unique_topic("g"),
                         "auto.offset.reset": "earliest"})
    consumer.subscribe([events_topic])
    received = []
    while len(received) < 400:
        batch = consumer.consume(500, timeout=5)
        assert batch, "replayed events did not arrive"
        received += [json.loads(m.value()) for m in batch]
    consumer.close()
    expected = generate_synthetic(SyntheticSpec(20, 30, 400, 2))
    assert sorted((e["user_id"], e["item_id"], e["ts"]) for e in received) == sorted(
        (i.user_id, i.item_id, i.ts) for i in expected
    )
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    rec = Recommendation("u7", [ScoredItem("sku-1", 0.9)], "v-test", 10, 15, source_ts=12)
    producer.produce(recs_topic, key=b"u7", value=encode_recommendation(rec))
    producer.flush(10)
    assert kvrec(["tail", "--bootstrap-servers", kafka_bootstrap, "--topic", recs_topic,
                  "--from-beginning", "--max-messages", "1", "--timeout", "20"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("user u7  [sku-1:0.900]") and "model v-test" in line and "3 ms" in line
