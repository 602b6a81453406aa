"""`kvrec replay` / `kvrec tail` flags and user-facing errors: one line, exit 2, no traceback."""

from __future__ import annotations

import argparse
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
        (["tail", "--sasl-mechanism", "PLAIN"], "kvrec: error: --sasl-mechanism needs"),
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
