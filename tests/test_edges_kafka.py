"""`kvrec replay` and `kvrec tail` against the real broker."""

from __future__ import annotations

import argparse
import json
import logging
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Message, Producer

from kvrec.model.datasets import SyntheticSpec, generate_synthetic
from kvrec.stream.cli import main as kvrec
from kvrec.stream.kafka_config import add_kafka_arguments, client_config, wait_for_kafka
from kvrec.stream.replay import replay_events
from kvrec.stream.schema import BecauseEvent, Recommendation, ScoredItem, encode_recommendation
from tests.conftest import create_topics, unique_topic

pytestmark = pytest.mark.kafka
SYNTHETIC = ["--format", "synthetic", "--synthetic-users", "20", "--synthetic-items", "30",
             "--synthetic-events", "400", "--seed", "2"]


def _consume(bootstrap: str, topic: str, expected: int, timeout: float = 30) -> list[Message]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": unique_topic("g"),
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})
    consumer.subscribe([topic])
    received: list[Message] = []
    deadline = time.monotonic() + timeout
    while len(received) < expected and time.monotonic() < deadline:
        for message in consumer.consume(500, timeout=0.5):
            assert message.error() is None, message.error()
            received.append(message)
    consumer.close()
    return received


def test_replay_publishes_the_dataset_keyed_by_user_in_order(
    kafka_bootstrap: str, capsys: pytest.CaptureFixture[str]
) -> None:
    topic = unique_topic("replay")
    code = kvrec(["replay", *SYNTHETIC, "--bootstrap-servers", kafka_bootstrap, "--topic", topic,
                  "--create-topic", "--partitions", "3"])
    assert code == 0
    assert capsys.readouterr().out.startswith("replayed 400 events in ")
    received = _consume(kafka_bootstrap, topic, 400)
    assert len(received) == 400
    assert len({m.partition() for m in received}) == 3
    expected = generate_synthetic(SyntheticSpec(20, 30, 400, 2))
    as_tuples = [tuple(json.loads(m.value()).values()) for m in received]
    assert sorted(as_tuples) == sorted((i.user_id, i.item_id, i.event_type, i.ts) for i in expected)
    for user in {i.user_id for i in expected}:  # keyed by user: one partition, replay order
        mine = [m for m in received if m.key() == user.encode()]
        assert len({m.partition() for m in mine}) == 1
        assert [json.loads(m.value())["ts"] for m in mine] == [i.ts for i in expected if i.user_id == user]


def test_replay_limit_and_a_missing_topic(kafka_bootstrap: str, capsys: pytest.CaptureFixture[str]) -> None:
    topic = unique_topic("limit")
    create_topics(kafka_bootstrap, {topic: 1})
    assert kvrec(["replay", *SYNTHETIC, "--limit", "25", "--bootstrap-servers", kafka_bootstrap,
                  "--topic", topic]) == 0
    assert "replayed 25 events" in capsys.readouterr().out
    assert len(_consume(kafka_bootstrap, topic, 26, timeout=3)) == 25
    missing = unique_topic("missing")
    assert kvrec(["replay", *SYNTHETIC, "--bootstrap-servers", kafka_bootstrap, "--topic", missing]) == 2
    err = capsys.readouterr().err
    assert err == f"kvrec: error: topic '{missing}' does not exist (add --create-topic to create it)\n"


def test_replay_rate_is_paced(kafka_bootstrap: str) -> None:
    topic = unique_topic("paced")
    create_topics(kafka_bootstrap, {topic: 1})
    data = generate_synthetic(SyntheticSpec(10, 20, 300, 1))
    stats = replay_events({"bootstrap.servers": kafka_bootstrap}, topic, data, rate=500, progress=False)
    assert (stats.sent, stats.failed) == (300, 0)
    assert stats.seconds >= (300 - 25) / 500 * 0.95  # the bucket holds a 25-event burst at most
    # rate 0 (no pacing) is not timed here: under load it can be as slow as the paced run,
    # and speed belongs in benchmarks, not in tests
    fast = replay_events({"bootstrap.servers": kafka_bootstrap}, topic, data, rate=0, progress=False)
    assert (fast.sent, fast.failed) == (300, 0)


def test_ctrl_c_flushes_what_was_sent_and_reports_it(kafka_bootstrap: str) -> None:
    topic = unique_topic("interrupt")
    create_topics(kafka_bootstrap, {topic: 2})
    kvrec_command = Path(sys.executable).with_name("kvrec")
    process = subprocess.Popen(
        # 20,000 events at 100/s: still running (for minutes) whenever the interrupt lands,
        # however slowly a loaded machine gets the consumer below going
        [str(kvrec_command), "replay", *SYNTHETIC[:-4], "--synthetic-events", "20000",
         "--seed", "2", "--rate", "100", "--bootstrap-servers", kafka_bootstrap, "--topic", topic],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        consumer = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": unique_topic("g"),
                             "auto.offset.reset": "earliest"})
        consumer.subscribe([topic])
        deadline = time.monotonic() + 60
        while not consumer.consume(1, timeout=0.5) and time.monotonic() < deadline:
            pass  # wait until the replay is under way
        consumer.close()
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, err
    assert "Traceback" not in err
    line = out.strip().splitlines()[-1]
    assert line.startswith("replayed ") and line.endswith("(interrupted)")
    sent = int(line.split()[1])
    assert 0 < sent < 20000
    assert len(_consume(kafka_bootstrap, topic, sent + 1, timeout=8)) == sent


def _recommendation(user: str, emitted: int) -> bytes:
    return encode_recommendation(Recommendation(
        user, [ScoredItem(f"sku-{n}", 1.0 - n / 10) for n in range(7)], "v-test", 10, emitted,
        because=[BecauseEvent("sku-42", "click", 0.6)], source_ts=emitted - 3,
    ))


def test_tail_prints_what_was_produced(kafka_bootstrap: str, capsys: pytest.CaptureFixture[str]) -> None:
    topic = unique_topic("recs")
    create_topics(kafka_bootstrap, {topic: 1})
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    values = [_recommendation("u7", 1000), _recommendation("u8", 2000)]
    for user, value in zip(("u7", "u8"), values, strict=True):
        producer.produce(topic, key=user.encode(), value=value)
    producer.produce(topic, key=b"u9", value=b"not json")
    producer.produce(topic, key=b"u7", value=None)  # tombstone
    assert producer.flush(10) == 0
    common = ["tail", "--bootstrap-servers", kafka_bootstrap, "--topic", topic, "--from-beginning",
              "--timeout", "20"]
    assert kvrec([*common, "--max-messages", "4"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == ("user u7  [sku-0:1.000 sku-1:0.900 sku-2:0.800 sku-3:0.700 sku-4:0.600 ...]"
                        "  because sku-42 (click 0.60)  model v-test  3 ms after the event")
    assert lines[1].startswith("user u8  [sku-0:1.000")
    assert lines[2].startswith("(not a recommendation:") and "not json" in lines[2]
    assert lines[3] == "user u7  (deleted)"
    assert kvrec([*common, "--json", "--max-messages", "2"]) == 0
    assert capsys.readouterr().out.strip().splitlines() == [v.decode() for v in values]
    started = time.monotonic()  # --timeout: stops when idle
    assert kvrec([*common[:-1], "2", "--max-messages", "10"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 4
    assert time.monotonic() - started < 30


def _pipe(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        source.close()
        sink.close()


def _forward(listener: socket.socket, broker: str, stop: threading.Event) -> None:
    """Accept on `listener` and relay each connection to `broker` (a broker that 'comes up')."""
    host, port = broker.split(",")[0].rsplit(":", 1)
    listener.settimeout(0.2)
    while not stop.is_set():
        try:
            client, _ = listener.accept()
        except TimeoutError:
            continue
        upstream = socket.create_connection((host, int(port)))
        for source, sink in ((client, upstream), (upstream, client)):
            threading.Thread(target=_pipe, args=(source, sink), daemon=True).start()
    listener.close()


def test_an_unreachable_kafka_is_one_line_then_a_quiet_wait_until_it_answers(
    kafka_bootstrap: str, caplog: pytest.LogCaptureFixture
) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()  # nobody listens: connection refused, until the relay starts below
    stop = threading.Event()

    def come_up() -> None:
        relay = socket.create_server(("127.0.0.1", port))
        threading.Thread(target=_forward, args=(relay, kafka_bootstrap, stop), daemon=True).start()

    timer = threading.Timer(5.0, come_up)
    timer.start()
    log = logging.getLogger("test.reach")
    started = time.monotonic()
    try:
        with caplog.at_level(logging.INFO):
            wait_for_kafka(client_config(_kafka_args(f"127.0.0.1:{port}")), 1.0, retry=True, log=log)
    finally:
        timer.cancel()
        stop.set()
    waited = time.monotonic() - started
    assert 5.0 <= waited < 40
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == (
        f"cannot reach Kafka at 127.0.0.1:{port} within 1 s (Connect to ipv4#127.0.0.1:{port} "
        "failed: Connection refused); retrying quietly, at most 30 s apart"
    )
    assert re.fullmatch(rf"reached Kafka at 127.0.0.1:{port} after \d+ s", lines[1])
    assert len(lines) == 2  # nothing from the client in between


def _kafka_args(bootstrap: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_kafka_arguments(parser)
    return parser.parse_args(["--bootstrap-servers", bootstrap])
