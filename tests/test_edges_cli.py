"""`kvrec replay` / `kvrec tail` flags and user-facing errors: one line, exit 2, no traceback."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import pytest

from model.errors import ConfigError
from stream.cli import main as kvrec
from stream.kafka_config import add_kafka_arguments, client_config

KVREC = Path(sys.executable).with_name("kvrec")


def _run_kvrec(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    command = [str(KVREC)] if KVREC.exists() else [sys.executable, "-m", "stream.cli"]
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
    assert client_config(args) == {"bootstrap.servers": "localhost:9092", "client.id": "kvrec"}
    args = parser.parse_args([
        "--bootstrap-servers", "b1:9093,b2:9093", "--security-protocol", "SASL_SSL",
        "--sasl-mechanism", "SCRAM-SHA-512", "--sasl-username", "app", "--sasl-password", "secret",
        "--ssl-ca-location", "/etc/ca.pem", "--client-id", "replayer",
    ])
    assert client_config(args) == {
        "bootstrap.servers": "b1:9093,b2:9093", "client.id": "replayer",
        "security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "app", "sasl.password": "secret", "ssl.ca.location": "/etc/ca.pem",
    }
    with pytest.raises(ConfigError):
        client_config(parser.parse_args(["--sasl-mechanism", "PLAIN", "--sasl-username", "a"]))
    from stream.cli import build_parser

    monkeypatch.setenv("KVREC_SASL_PASSWORD", "from-env")
    monkeypatch.setenv("KVREC_BOOTSTRAP_SERVERS", "envhost:1")
    argv = ["tail", "--sasl-mechanism", "PLAIN", "--sasl-username", "u"]
    config = client_config(build_parser(argv).parse_args(argv))
    assert config["sasl.password"] == "from-env" and config["bootstrap.servers"] == "envhost:1"


def _parse(argv: list[str]) -> argparse.Namespace:
    from stream.cli import build_parser

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


@pytest.mark.parametrize(
    "command",
    [["replay"], ["tail"], ["train"], ["eval"], ["export"], ["worker"], ["demo"], ["broker"],
     ["bench", "model"], ["bench", "retrieval"], ["bench", "gpu"], ["bench", "e2e"],
     ["bench", "train"], ["bench", "restore"]],
)
def test_every_help_shows_each_flags_default_and_variable(
    command: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(SystemExit) as exit_:
        kvrec([*command, "--help"])
    assert exit_.value.code == 0
    entries = _help_entries(capsys.readouterr().out)
    assert entries
    prefix = "KVREC_" + "_".join(c.upper() for c in command) + "_"
    for option, line in entries.items():
        variable = re.search(r"env (KVREC_[A-Z0-9_]+)\)$", line)
        assert variable, line
        if not variable.group(1).startswith(prefix):  # only the Kafka connection flags are shared
            assert option in {"--bootstrap-servers", "--security-protocol", "--sasl-mechanism",
                              "--sasl-username", "--sasl-password", "--ssl-ca-location",
                              "--ssl-certificate-location", "--ssl-key-location", "--client-id",
                              "--connect-timeout", "--kafka-option"}, line
        if option not in {"--sasl-password", "--kafka-option"}:  # secrets: no default shown
            assert "(default: " in line or "(required; env" in line, line


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
    }
    # librdkafka takes them (a client is created; nothing is sent)
    Producer({**config, "bootstrap.servers": "127.0.0.1:9", "log_level": 0}).flush(0)
    monkeypatch.setenv("KVREC_KAFKA_OPTIONS", "linger.ms=5,acks=all")  # no ';': ',' separates
    assert client_config(_parse(["tail"])) == {
        "bootstrap.servers": "localhost:9092", "client.id": "kvrec", "linger.ms": "5", "acks": "all"
    }
    monkeypatch.setenv("KVREC_KAFKA_OPTIONS", "linger.ms")
    with pytest.raises(ConfigError, match=re.escape("KVREC_KAFKA_OPTIONS='linger.ms': expected KEY=VALUE")):
        _parse(["tail"])
