"""`kvrec replay` / `kvrec tail` flags and user-facing errors: one line, exit 2, no traceback."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from kvrec.bench.cli import BENCHMARKS
from kvrec.errors import ConfigError
from kvrec.stream.cli import COMMANDS
from kvrec.stream.cli import main as kvrec
from kvrec.stream.kafka_config import add_kafka_arguments, client_config
from kvrec.stream.kafka_logs import kafka_log

KVREC = Path(sys.executable).with_name("kvrec")


def _run_kvrec(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    command = [str(KVREC)] if KVREC.exists() else [sys.executable, "-m", "kvrec.stream.cli"]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=120, env=env)


def test_malformed_dataset_line_is_one_line_from_the_installed_command(tmp_path: Path) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_text("1 2\n3\n")
    result = _run_kvrec("replay", "--data", str(bad))
    assert result.returncode == 2, result.stderr
    assert result.stderr == f"kvrec: error: {bad}:2: expected `user item` integers, got '3\\n'\n"
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["replay", "--format", "sasrec", "--data", "/nonexistent/file.txt"],
         "kvrec: error: /nonexistent/file.txt: no such file"),
        (["replay", "--format", "movielens"], "kvrec: error: --data is required for --format movielens"),
        (["replay", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
        (["replay", "--format", "parquet"], "invalid choice: 'parquet'"),
        (["replay", "--format", "synthetic", "--rate", "-1"],
         "kvrec: error: kvrec replay: argument --rate: must be a number >= 0, got '-1'"),
        (["replay", "--format", "synthetic", "--synthetic-users", "0"],
         "kvrec: error: kvrec replay: argument --synthetic-users: must be an integer >= 1, got '0'"),
        (["train", "--format", "synthetic", "--out", "/nonexistent/m", "--epochs", "2",
          "--warmup-epochs", "3"], "kvrec: error: --warmup-epochs must be between 0 and --epochs"),
        (["train", "--format", "synthetic", "--out", "/nonexistent/m", "--min-lr-ratio", "1.5"],
         "kvrec: error: kvrec train: argument --min-lr-ratio: must be a number between 0 and 1"),
        (["train", "--format", "synthetic", "--out", "/nonexistent/m", "--lr", "-1"],
         "kvrec: error: kvrec train: argument --lr: must be a number > 0, got '-1'"),
        (["train", "--format", "synthetic", "--out", "/nonexistent/m", "--lr", "nan"],
         "kvrec: error: kvrec train: argument --lr: must be a number > 0, got 'nan'"),
        (["train", "--format", "synthetic", "--out", "/nonexistent/m", "--dropout", "1"],
         "kvrec: error: kvrec train: argument --dropout: must be a number >= 0 and < 1, got '1'"),
        (["train", "--format", "synthetic", "--out", "/nonexistent/m", "--lr-schedule", "step"],
         "invalid choice: 'step'"),
        (["tail", "--max-messages", "-3"],
         "kvrec: error: kvrec tail: argument --max-messages: must be an integer >= 0, got '-3'"),
        (["tail", "--timeout", "-1"],
         "kvrec: error: kvrec tail: argument --timeout: must be a number >= 0, got '-1'"),
        (["tail", "--sasl-mechanism", "PLAIN"], "kvrec: error: --sasl-mechanism PLAIN needs"),
        (["tail", "-X", "linger.ms"],
         "kvrec: error: kvrec tail: argument -X/--kafka-option: expected KEY=VALUE with KEY a "
         "librdkafka setting such as sasl.oauthbearer.config (see kvrec tail --help)"),
        (["tail", "-X", "=1"], "argument -X/--kafka-option: expected KEY=VALUE"),
        (["tail", "-X", "bootstrap.servers=b:9092"],
         "kvrec: error: kvrec tail: argument -X/--kafka-option: bootstrap.servers has its own "
         "flag: use --bootstrap-servers"),
        (["tail", "-X", "no.such.setting=1"],
         'kvrec: error: Kafka: No such configuration property: "no.such.setting"'),
        (["worker", "--model", "/nonexistent", "--session-timeout-ms", "10"],
         "argument --session-timeout-ms: must be an integer between 1000 and 3600000, got '10'"),
        (["worker", "--model", "/nonexistent", "--dead-letter-max-bytes", "2000000"],
         "argument --dead-letter-max-bytes: must be an integer between 1 and 900000"),
        (["worker", "--model", "/nonexistent", "--dead-letter-max-bytes", "0"],
         "argument --dead-letter-max-bytes: must be an integer between 1 and 900000"),
        (["worker", "--model", "/nonexistent", "--because", "-1"],
         "kvrec: error: kvrec worker: argument --because: must be an integer >= 0, got '-1'"),
        (["worker", "--model", "/nonexistent", "--threads", "-3"],
         "kvrec: error: kvrec worker: argument --threads: must be an integer >= 0, got '-3'"),
        (["worker", "--model", "/nonexistent", "--approx-threshold", "-1"],
         "kvrec: error: kvrec worker: argument --approx-threshold: must be an integer >= 0"),
        (["worker", "--model", "/nonexistent", "--metrics-port", "70000"],
         "kvrec: error: kvrec worker: argument --metrics-port: must be an integer between -1 and 65535"),
        (["worker", "--model", "/nonexistent", "--k", "0"],
         "kvrec: error: kvrec worker: argument --k: must be an integer >= 1, got '0'"),
        (["worker", "--model", "/nonexistent", "--batch-size", "many"],
         "kvrec: error: kvrec worker: argument --batch-size: must be an integer >= 1, got 'many'"),
        (["broker", "--port", "70000"],
         "kvrec: error: kvrec broker: argument --port: must be an integer between 0 and 65535"),
        (["demo", "--settle-timeout", "0"],
         "kvrec: error: kvrec demo: argument --settle-timeout: must be a number > 0, got '0'"),
        (["worker", "--model", "/nonexistent", "--instance-id", " "],
         "kvrec: error: --instance-id must not be empty"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    try:
        code = kvrec(args)
    except SystemExit as exit_:  # argparse's own errors (unknown flag, bad choice)
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err
    assert message in err.strip().splitlines()[-1]  # the error itself is one line (after usage)
    if message.startswith("kvrec: error:"):
        assert err.count("\n") == 1


def test_unknown_flag_from_the_installed_command_has_no_traceback() -> None:
    result = _run_kvrec("tail", "--no-such-flag")
    assert result.returncode == 2
    assert "unrecognized arguments: --no-such-flag" in result.stderr
    assert "Traceback" not in result.stderr


def test_kafka_flags_and_their_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    parser = argparse.ArgumentParser()
    add_kafka_arguments(parser)
    args = parser.parse_args([])
    assert client_config(args) == {
        "bootstrap.servers": "localhost:9092", "client.id": "kvrec", "logger": kafka_log
    }
    args = parser.parse_args([
        "--bootstrap-servers", "b1:9093,b2:9093", "--security-protocol", "SASL_SSL",
        "--sasl-mechanism", "SCRAM-SHA-512", "--sasl-username", "app", "--sasl-password", "secret",
        "--ssl-ca-location", "/etc/ca.pem", "--client-id", "replayer",
    ])
    assert client_config(args) == {
        "bootstrap.servers": "b1:9093,b2:9093", "client.id": "replayer",
        "security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "app", "sasl.password": "secret", "ssl.ca.location": "/etc/ca.pem",
        "logger": kafka_log,  # librdkafka's lines through Python logging
    }
    with pytest.raises(ConfigError):
        client_config(parser.parse_args(["--sasl-mechanism", "PLAIN", "--sasl-username", "a"]))
    from kvrec.stream.cli import build_parser

    monkeypatch.setenv("KVREC_SASL_PASSWORD", "from-env")
    monkeypatch.setenv("KVREC_BOOTSTRAP_SERVERS", "envhost:1")
    argv = ["tail", "--sasl-mechanism", "PLAIN", "--sasl-username", "u"]
    config = client_config(build_parser(argv).parse_args(argv))
    assert config["sasl.password"] == "from-env" and config["bootstrap.servers"] == "envhost:1"


def _parse(argv: list[str]) -> argparse.Namespace:
    from kvrec.stream.cli import build_parser

    return build_parser(argv).parse_args(argv)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("false", False), ("FALSE", False), ("0", False), ("no", False),
     ("true", True), ("1", True), ("Yes", True)],
)
def test_booleans_from_the_environment_mean_what_they_say(
    raw: str, expected: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KVREC_WORKER_EXCLUDE_SEEN", raw)  # a --flag/--no-flag pair
    monkeypatch.setenv("KVREC_WORKER_NO_KV_CACHE", raw)  # a plain switch
    args = _parse(["worker", "--model", "m"])
    assert args.exclude_seen is expected
    assert args.no_kv_cache is expected
    assert _parse(["worker", "--model", "m", "--exclude-seen"]).exclude_seen is True  # flag wins


@pytest.mark.parametrize(
    ("name", "raw", "message"),
    [
        ("KVREC_WORKER_EXCLUDE_SEEN", "nope",
         "kvrec: error: KVREC_WORKER_EXCLUDE_SEEN='nope': expected true, false, 1, 0, yes or no"),
        ("KVREC_WORKER_NO_KV_CACHE", "nope",
         "kvrec: error: KVREC_WORKER_NO_KV_CACHE='nope': expected true, false, 1, 0, yes or no"),
        ("KVREC_WORKER_NO_KV_CACHE", "on",
         "kvrec: error: KVREC_WORKER_NO_KV_CACHE='on': expected true, false, 1, 0, yes or no"),
        ("KVREC_WORKER_K", "0", "kvrec: error: KVREC_WORKER_K='0': must be an integer >= 1, got '0'"),
        ("KVREC_WORKER_BACKEND", "tpu", "kvrec: error: KVREC_WORKER_BACKEND='tpu': choose from"),
        ("KVREC_BATCH_SIZE", "64",
         "kvrec: error: KVREC_BATCH_SIZE is not read: this command's --batch-size is "
         "KVREC_WORKER_BATCH_SIZE"),
    ],
)
def test_a_bad_environment_variable_is_one_line_and_exit_2(
    name: str, raw: str, message: str, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv(name, raw)
    assert kvrec(["worker", "--model", "/nonexistent"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1, err


def test_each_command_reads_its_own_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVREC_WORKER_BATCH_SIZE", "64")
    monkeypatch.setenv("KVREC_TRAIN_BATCH_SIZE", "32")
    monkeypatch.setenv("KVREC_BENCH_E2E_EVENTS", "123")
    monkeypatch.setenv("KVREC_BOOTSTRAP_SERVERS", "shared:9092")  # a connection flag: shared
    worker = _parse(["worker", "--model", "m"])
    assert (worker.batch_size, worker.bootstrap_servers) == (64, "shared:9092")
    assert _parse(["train", "--out", "o"]).batch_size == 32
    assert _parse(["tail"]).bootstrap_servers == "shared:9092"
    assert _parse(["bench", "e2e", "--json", "o.json"]).events == 123
    # the demo's --bootstrap-servers is its own flag (default: start a broker), not the shared one
    assert _parse(["demo"]).bootstrap_servers is None


def _help_entries(help_text: str) -> dict[str, str]:
    """{long option: its whole help entry, joined into one line} of a --help text."""
    entries: dict[str, str] = {}
    current = ""
    for line in help_text.splitlines():
        found = re.match(r"^ {2}(?:-\w(?: \S+)?, )?(--[a-z0-9-]+)", line)
        if found:
            current = found.group(1)
            entries[current] = line.strip()
        elif current and line.startswith("    ") and line.strip():
            entries[current] += " " + line.strip()
        else:
            current = ""
    entries.pop("--help", None)
    return entries


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def _command_parser(command: list[str]) -> argparse.ArgumentParser:
    """The parser of `kvrec <command...>`, with its variables applied, as `--help` renders it."""
    from kvrec.stream.cli import build_parser

    parser = build_parser(command)
    for name in command:
        parser = _subparser(parser, name)
    return parser


def _every_command() -> list[list[str]]:
    """Every command of COMMANDS, and every sub-command below it (`bench model`, `models list`)."""
    found: list[list[str]] = []

    def walk(command: list[str], parser: argparse.ArgumentParser) -> None:
        found.append(command)
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    walk([*command, name], child)

    for name in COMMANDS:
        walk([name], _command_parser([name]))
    return found


HELP_COMMANDS = _every_command()
SECRET_FLAGS = {"--sasl-password", "--kafka-option"}  # no default shown: it may be a secret


def _variable(command: list[str], option: str, group: str | None) -> str:
    """The variable a flag must name: KVREC_<FLAG> for the Kafka connection flags, the command's
    for the flags every action of a command shares, else KVREC_<COMMAND>_<SUB-COMMAND>_<FLAG>."""
    from kvrec.stream.cli import COMMAND_GROUP, SHARED_GROUP, env_name

    if group == SHARED_GROUP:
        return env_name(option)
    words = command[:1] if group == COMMAND_GROUP else command
    return env_name(option, "KVREC_" + "".join(w.replace("-", "_").upper() + "_" for w in words))


def _shows_a_default(action: argparse.Action, entry: str) -> bool:
    """`(default: ...)`, `(required; ...)`, or for a flag that is None unless given, its help's
    own words for what happens then (`default: start a local broker`)."""
    if "(default: " in entry or "(required; env" in entry:
        return True
    words = re.sub(r" \([^()]*env KVREC_[A-Z0-9_]+\)$", "", entry)  # without the final note
    return action.default is None and "default" in words


@pytest.mark.parametrize("command", HELP_COMMANDS, ids=" ".join)
def test_every_help_shows_each_flags_default_and_variable(
    command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        kvrec([*command, "--help"])
    assert exit_.value.code == 0
    entries = _help_entries(capsys.readouterr().out)
    parser = _command_parser(command)
    groups = {id(a): g.title for g in parser._action_groups for a in g._group_actions}
    flags = [a for a in parser._actions if a.option_strings and a.dest not in ("help", "version")]
    long_options = [next((o for o in a.option_strings if o.startswith("--")), None) for a in flags]
    assert None not in long_options, flags  # a flag with no long form would have no variable
    assert set(long_options) == set(entries)  # --help lists each flag, and this reads each
    for action, option in zip(flags, long_options, strict=True):
        entry = entries[option]
        variable = re.search(r"env (KVREC_[A-Z0-9_]+)\)$", entry)
        assert variable, entry
        assert variable.group(1) == _variable(command, option, groups.get(id(action))), entry
        if option in SECRET_FLAGS:
            assert "(default: " not in entry, entry
        else:
            assert _shows_a_default(action, entry), entry


def test_the_help_check_covers_every_command_and_sub_command() -> None:
    assert ["train"] in HELP_COMMANDS and ["bench", "restore"] in HELP_COMMANDS
    assert [c[1] for c in HELP_COMMANDS if c[0] == "bench" and len(c) == 2] == list(BENCHMARKS)
    assert len(HELP_COMMANDS) > len(COMMANDS) + len(BENCHMARKS)  # and `kvrec models` actions


def test_a_flag_without_a_shown_default_fails_the_help_check() -> None:
    plot = argparse.Action(["--plot"], "plot", default=None)
    assert not _shows_a_default(plot, "--plot PLOT  output PNG (env KVREC_BENCH_MODEL_PLOT)")
    assert not _shows_a_default(plot, "--plot PLOT  output PNG (no default; env KVREC_X_PLOT)")
    assert _shows_a_default(plot, "--plot PLOT  output PNG (default: None; env KVREC_X_PLOT)")
    assert _shows_a_default(plot, "--plot PLOT  default: none (env KVREC_X_PLOT)")
    events = argparse.Action(["--events"], "events", default=5)
    assert not _shows_a_default(events, "--events EVENTS  default: five (env KVREC_X_EVENTS)")
    assert _shows_a_default(events, "--events EVENTS  (default: 5; env KVREC_X_EVENTS)")


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    import tomllib

    with pytest.raises(SystemExit) as exit_:
        kvrec(["--version"])
    assert exit_.value.code == 0
    expected = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())
    assert capsys.readouterr().out == f"kvrec {expected['project']['version']}\n"
    result = _run_kvrec("--version")
    assert (result.returncode, result.stdout) == (0, f"kvrec {expected['project']['version']}\n")


def test_kafka_options_pass_any_librdkafka_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    from confluent_kafka import Producer

    monkeypatch.setenv(
        "KVREC_KAFKA_OPTIONS",
        "sasl.oauthbearer.config=principal=admin scope=a;sasl.oauthbearer.extensions=a=1,b=2;"
        "linger.ms=7",
    )
    argv = ["tail", "--security-protocol", "SASL_PLAINTEXT", "--sasl-mechanism", "OAUTHBEARER",
            "-X", "linger.ms=9", "-X", "enable.sasl.oauthbearer.unsecure.jwt=true"]
    config = client_config(_parse(argv))
    assert config == {
        "bootstrap.servers": "localhost:9092", "client.id": "kvrec",
        "security.protocol": "SASL_PLAINTEXT", "sasl.mechanism": "OAUTHBEARER",
        "sasl.oauthbearer.config": "principal=admin scope=a",  # OAUTHBEARER: no password needed
        "sasl.oauthbearer.extensions": "a=1,b=2",  # ';' separates, so a value keeps its commas
        "linger.ms": "9",  # the command line wins over the variable
        "enable.sasl.oauthbearer.unsecure.jwt": "true",
        "logger": kafka_log,
    }
    # librdkafka takes them (a client is created; nothing is sent)
    Producer({**config, "bootstrap.servers": "127.0.0.1:9", "log_level": 0}).flush(0)
    monkeypatch.setenv("KVREC_KAFKA_OPTIONS", "linger.ms=5,acks=all")  # no ';': ',' separates
    assert client_config(_parse(["tail"])) == {
        "bootstrap.servers": "localhost:9092", "client.id": "kvrec", "linger.ms": "5", "acks": "all",
        "logger": kafka_log,
    }
    monkeypatch.setenv("KVREC_KAFKA_OPTIONS", "linger.ms")
    with pytest.raises(ConfigError, match=re.escape("KVREC_KAFKA_OPTIONS='linger.ms': expected KEY=VALUE")):
        _parse(["tail"])


# --- errors that used to end in a traceback -------------------------------------------------

@pytest.fixture(scope="module")
def small_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.worker_fixtures import make_artifact

    path = tmp_path_factory.mktemp("model") / "m"
    make_artifact(path, n_items=60)
    return path


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["worker", "--model", "m", "--log-level", "loud"],
         "kvrec: error: kvrec worker: argument --log-level: invalid choice: 'LOUD'"),
        (["tail", "--log-format", "yaml"],
         "kvrec: error: kvrec tail: argument --log-format: invalid choice: 'yaml'"),
        (["export", "--model", "m", "--out", "/nonexistent/folder/step.onnx"],
         "kvrec: error: --out /nonexistent/folder/step.onnx: the folder /nonexistent/folder does "
         "not exist"),
        (["export", "--model", "m", "--out", "/"], "kvrec: error: --out / is a folder"),
        (["tail", "--connect-timeout", "0"],
         "kvrec: error: kvrec tail: argument --connect-timeout: must be a number > 0, got '0'"),
    ],
)
def test_what_used_to_be_a_traceback_is_one_line_and_exit_2(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert kvrec(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1, err


def test_worker_k_larger_than_the_catalog_and_a_metrics_port_in_use(
    small_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    common = ["worker", "--model", str(small_model), "--state-dir", str(tmp_path),
              "--bootstrap-servers", f"127.0.0.1:{_closed_port()}"]
    assert kvrec([*common, "--k", "61", "--metrics-port", "-1"]) == 2  # 9464 may be taken
    assert capsys.readouterr().err == (
        "kvrec: error: --k 61 is more than the model's catalog of 60 items\n"
    )
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert kvrec([*common, "--metrics-port", str(port)]) == 2
    assert capsys.readouterr().err == f"kvrec: error: --metrics-port {port}: port {port} in use\n"


# --- a Kafka that cannot be reached ----------------------------------------------------------

def test_tail_timeout_and_replay_stop_with_one_line_when_kafka_cannot_be_reached() -> None:
    port = _closed_port()
    reason = f"(Connect to ipv4#127.0.0.1:{port} failed: Connection refused)"
    started = time.monotonic()
    tail = _run_kvrec("tail", "--bootstrap-servers", f"127.0.0.1:{port}", "--timeout", "3")
    assert time.monotonic() - started < 60
    assert tail.returncode == 1
    assert tail.stderr == f"kvrec: error: cannot reach Kafka at 127.0.0.1:{port} within 3 s {reason}\n"
    replay = _run_kvrec("replay", "--format", "synthetic", "--synthetic-events", "50",
                        "--bootstrap-servers", f"127.0.0.1:{port}", "--connect-timeout", "1")
    assert replay.returncode == 1
    assert replay.stderr == (
        f"kvrec: error: cannot reach Kafka at 127.0.0.1:{port} within 1 s {reason}\n"
    )
    assert tail.stdout == replay.stdout == ""


@pytest.mark.kafka
def test_tail_of_a_topic_that_does_not_exist_fails_after_its_timeout(kafka_bootstrap: str) -> None:
    topic = f"no-such-topic-{uuid.uuid4().hex[:8]}"
    started = time.monotonic()
    tail = _run_kvrec("tail", "--bootstrap-servers", kafka_bootstrap, "--topic", topic,
                      "--timeout", "2")
    assert 2 <= time.monotonic() - started < 60
    assert tail.returncode == 1, tail.stderr
    assert tail.stderr.splitlines()[-1] == (
        f"kvrec: error: topic '{topic}' does not exist at {kafka_bootstrap} (waited 2 s, "
        "--timeout); the worker's --output-topic is `recommendations` unless it was given another"
    )
    assert tail.stdout == ""


class _Stderr:
    """A child's stderr lines, collected by a thread (the child is never blocked on it)."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        assert process.stderr is not None
        stream = process.stderr
        self.thread = threading.Thread(target=lambda: self.lines.extend(stream), daemon=True)
        self.thread.start()

    def wait_for(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.lines):
            assert time.monotonic() < deadline, f"no {text!r} in {self.lines[-20:]}"
            time.sleep(0.1)


def _interrupt_after_quiet_wait(process: subprocess.Popen[str], stderr: _Stderr) -> list[str]:
    stderr.wait_for("cannot reach Kafka", timeout=180)
    time.sleep(5)  # it used to print ~37 client lines a second here
    process.send_signal(signal.SIGINT)
    process.wait(timeout=60)
    stderr.thread.join(timeout=10)
    return [line.rstrip("\n") for line in stderr.lines]


def test_a_worker_that_cannot_reach_kafka_says_so_once_then_waits_quietly(
    small_model: Path, tmp_path: Path
) -> None:
    port = _closed_port()
    command = [str(KVREC)] if KVREC.exists() else [sys.executable, "-m", "kvrec.stream.cli"]
    process = subprocess.Popen(
        [*command, "worker", "--model", str(small_model), "--state-dir", str(tmp_path),
         "--bootstrap-servers", f"127.0.0.1:{port}", "--connect-timeout", "1",
         "--metrics-port", "-1", "--log-format", "json"],
        stderr=subprocess.PIPE, text=True,
    )
    try:
        lines = _interrupt_after_quiet_wait(process, _Stderr(process))
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130
    assert lines[-1] == "kvrec: interrupted"
    records = [json.loads(line) for line in lines[:-1]]  # every log line is JSON
    assert {r["logger"] for r in records} <= {"kvrec.worker", "kvrec.kafka"}
    unreachable = [r for r in records if "cannot reach Kafka" in r["message"]]
    assert len(unreachable) == 1
    assert unreachable[0]["level"] == "WARNING"
    assert unreachable[0]["message"] == (
        f"cannot reach Kafka at 127.0.0.1:{port} within 1 s (Connect to ipv4#127.0.0.1:{port} "
        "failed: Connection refused); retrying quietly, at most 30 s apart"
    )
    assert records[-1] == unreachable[0]  # and nothing more in the 5 s after it


def test_tail_without_timeout_says_so_once_then_waits_quietly() -> None:
    port = _closed_port()
    command = [str(KVREC)] if KVREC.exists() else [sys.executable, "-m", "kvrec.stream.cli"]
    process = subprocess.Popen(
        [*command, "tail", "--bootstrap-servers", f"127.0.0.1:{port}", "--connect-timeout", "1"],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
    )
    try:
        lines = _interrupt_after_quiet_wait(process, _Stderr(process))
    finally:
        if process.poll() is None:
            process.kill()
    assert len(lines) == 2, lines
    assert re.fullmatch(
        rf"\S+ \S+ WARNING kvrec.tail: cannot reach Kafka at 127.0.0.1:{port} within 1 s "
        rf"\(Connect to ipv4#127.0.0.1:{port} failed: Connection refused\); retrying quietly, "
        r"at most 30 s apart",
        lines[0],
    )
    assert lines[1] == "kvrec: interrupted"


def test_librdkafka_lines_go_through_python_logging_without_the_flood() -> None:
    from confluent_kafka import Consumer

    from kvrec.stream.kafka_logs import kafka_log_filter
    from kvrec.stream.logs import JsonFormatter

    class Keep(logging.Handler):
        def __init__(self) -> None:
            super().__init__()
            self.lines: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.lines.append(self.format(record))

    keep = Keep()
    keep.setFormatter(JsonFormatter())
    kafka_log.addHandler(keep)
    port = _closed_port()
    try:
        # a producer setting on a consumer: librdkafka warns (CONFWARN); nobody listens on the
        # port: it fails to connect about 20 times a second
        config = client_config(_parse(["tail", "--bootstrap-servers", f"127.0.0.1:{port}",
                                       "-X", "linger.ms=5"]))
        consumer = Consumer({**config, "group.id": "g"})
        consumer.subscribe(["t"])
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            consumer.consume(10, timeout=0.2)
        consumer.close()
        kafka_log.warning("consumer error: %s", "same text")
        kafka_log.warning("consumer error: %s", "same text")  # a repeat within a minute
    finally:
        kafka_log.removeHandler(keep)
    records = [json.loads(line) for line in keep.lines]
    assert [r.get("facility") for r in records] == ["CONFWARN", None]
    assert records[0]["client"].startswith("kvrec#consumer")
    assert "is a producer property and will be ignored" in records[0]["message"]
    assert records[1]["message"] == "consumer error: same text"
    assert kafka_log_filter.connection_problem == (
        f"Connect to ipv4#127.0.0.1:{port} failed: Connection refused"
    )


def test_a_transaction_error_the_worker_handles_is_a_warning_not_an_error() -> None:
    """librdkafka logs a transaction fenced by a rebalance as an error (TXNERR); the worker
    aborts it and replays (a person need not act): WARNING. Other transaction errors stay."""
    from kvrec.stream.kafka_logs import LIBRDKAFKA_FORMAT

    class Keep(logging.Handler):
        def __init__(self) -> None:
            super().__init__(level=logging.WARNING)
            self.records: list[logging.LogRecord] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.records.append(record)

    keep = Keep()
    kafka_log.addHandler(keep)
    rebalanced = ("[thrd:main]: Current transaction failed in state InTransaction: Failed to "
                  "commit offsets to transaction on broker localhost:9092/1: Broker: Specified "
                  "group generation id is not valid (ILLEGAL_GENERATION) (after 3ms in state "
                  f"{time.monotonic_ns()})")  # a text the repeat filter has not seen
    fenced = (f"[thrd:main]: Fatal transaction error: Producer fenced by newer instance "
              f"(PRODUCER_FENCED) {time.monotonic_ns()}")
    try:
        kafka_log.log(logging.ERROR, LIBRDKAFKA_FORMAT, "TXNERR", "kvrec#producer-1", rebalanced)
        kafka_log.log(logging.ERROR, LIBRDKAFKA_FORMAT, "TXNERR", "kvrec#producer-1", fenced)
    finally:
        kafka_log.removeHandler(keep)
    assert [(r.levelname, "ILLEGAL_GENERATION" in r.getMessage()) for r in keep.records] == [
        ("WARNING", True), ("ERROR", False)]


def _all_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    actions: list[argparse.Action] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                actions += _all_actions(child)
        else:
            actions.append(action)
    return actions


@pytest.mark.parametrize("command", ["replay", "tail", "train", "eval", "export", "worker", "demo",
                                     "broker", "bench"])
def test_no_numeric_flag_escapes_its_range_check(command: str) -> None:
    from kvrec.stream.cli import build_parser

    parser = build_parser([command])
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for action in _all_actions(sub.choices[command]):
        if isinstance(action.default, int | float) and not isinstance(action.default, bool):
            assert getattr(action.type, "__name__", None) in ("integer", "number"), action.dest


# --- arguments are checked before the heavy imports ----------------------------------------

# run `kvrec ARGS`, then say on stdout whether torch was imported (after its error line)
_IMPORT_PROBE = (
    "import sys\n"
    "from stream.cli import main\n"
    "code = main(sys.argv[1:])\n"
    "print('torch imported' if 'torch' in sys.modules else 'torch not imported')\n"
    "sys.exit(code)\n"
)
NO_FILE, NO_MODEL = "/no/such/events.txt", "/no/such/model"
BAD_ARGUMENTS = [
    (["replay", "--data", NO_FILE], f"{NO_FILE}: no such file"),
    (["tail", "--timeout", "-1"], "argument --timeout: must be a number >= 0"),
    (["train", "--data", NO_FILE, "--out", "/tmp/m"], f"{NO_FILE}: no such file"),
    (["train", "--data", "amazon-gamez", "--out", "/tmp/m"], "did you mean amazon-games?"),
    (["train", "--format", "synthetic", "--out", "/tmp/m", "--epochs", "2", "--warmup-epochs", "3"],
     "--warmup-epochs must be between 0 and --epochs"),
    (["eval", "--model", NO_MODEL, "--format", "synthetic"], f"{NO_MODEL}: no such model artifact"),
    (["eval", "--model", "tests", "--data", NO_FILE], f"{NO_FILE}: no such file"),
    (["export", "--model", NO_MODEL, "--out", "/tmp/step.onnx"], f"{NO_MODEL}: no such model"),
    (["export", "--model", NO_MODEL, "--out", "/no/such/step.onnx"], "the folder /no/such does not"),
    (["worker", "--model", NO_MODEL], f"--model {NO_MODEL}: no such model artifact directory"),
    (["demo", "--backend", "nosuch"], "argument --backend: invalid choice: 'nosuch'"),
    (["demo", "--data", NO_FILE], f"{NO_FILE}: no such file"),
    (["demo", "--format", "synthetic", "--model", NO_MODEL], f"{NO_MODEL}: no such model"),
    (["topics", "create", "--partitions", "0"], "argument --partitions: must be an integer"),
    (["broker", "--port", "70000"], "argument --port: must be an integer between 0 and 65535"),
    (["models", "list", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["retrain", "--model-store", "/tmp/s", "--margin", "-1"], "argument --margin: must be a number"),
    (["retrain", "--model-store", "/tmp/s", "--data", NO_FILE], f"{NO_FILE}: no such file"),
    (["retrain", "--model-store", "/tmp/s", "--format", "synthetic", "--epochs", "1",
      "--warmup-epochs", "2"], "--warmup-epochs must be between 0 and --epochs"),
    (["retrain", "--model-store", "/tmp/s", "--format", "synthetic", "--time-features", "on"],
     "--time-features on: the worker does not serve time models yet"),
    (["train", "--format", "synthetic", "--out", "/tmp/m", "--time-features", "maybe"],
     "argument --time-features: invalid choice: 'maybe'"),
]


@pytest.mark.parametrize(("args", "message"), BAD_ARGUMENTS, ids=lambda a: " ".join(a)
                         if isinstance(a, list) else "")
def test_a_bad_argument_is_refused_before_torch_is_imported(args: list[str], message: str) -> None:
    """Every command checks its arguments (files there, choices valid, numbers in range) before
    it imports torch: a mistake is reported in a fraction of a second, not after 5-10 s of
    imports (or, for the demo, after training and starting a broker)."""
    env = {**os.environ, "KVREC_BOOTSTRAP_SERVERS": "127.0.0.1:1", "KVREC_CONNECT_TIMEOUT": "1"}
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", _IMPORT_PROBE, *args], capture_output=True,
                            text=True, timeout=120, env=env, cwd=Path(__file__).resolve().parent.parent)
    seconds = time.monotonic() - started
    assert result.returncode == 2, result.stderr[-2000:]
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("kvrec: error: ") and message in error, result.stderr[-2000:]
    assert result.stdout.splitlines()[-1] == "torch not imported"
    assert seconds < 10  # about 0.3 s on a quiet machine; torch's import alone takes 3-10 s


def test_the_bad_arguments_cover_every_command() -> None:
    # but `kvrec bench`: each benchmark's module imports torch where it defines its flags
    assert {args[0] for args, _ in BAD_ARGUMENTS} == set(COMMANDS) - {"bench"}
