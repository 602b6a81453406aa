"""`kvrec retrain` connects Faust with the same security settings as every other kvrec client
(the shared Kafka flags and KVREC_* variables): SASL PLAIN/SCRAM, SSL, SASL_SSL, PLAINTEXT. What
Faust's client is given is checked here through Faust's own translation to its Kafka client's
settings; no SASL broker runs in the tests (the shared one is PLAINTEXT), so the SASL handshake
itself is not exercised."""

from __future__ import annotations

import pytest
from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth

from kvrec.errors import ConfigError
from kvrec.stream.cli import build_parser
from kvrec.stream.retrain.app import AppSettings, build_app
from kvrec.stream.retrain.command import _faust_brokers, _faust_credentials

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _args(*flags: str):
    argv = ["retrain", "--bootstrap-servers", "b1:9092,b2:9092", "--model-store", "/models", *flags]
    return build_parser(argv).parse_args(argv)


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN"])
def test_sasl_settings_reach_faust(mechanism):
    args = _args("--security-protocol", "SASL_PLAINTEXT", "--sasl-mechanism", mechanism,
                 "--sasl-username", "kvrec", "--sasl-password", "secret")
    auth = credentials_to_aiokafka_auth(_faust_credentials(args))
    assert {k: auth[k] for k in ("security_protocol", "sasl_mechanism", "sasl_plain_username",
                                 "sasl_plain_password")} == {
        "security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": mechanism,
        "sasl_plain_username": "kvrec", "sasl_plain_password": "secret"}
    assert _faust_brokers(args) == ["kafka://b1:9092", "kafka://b2:9092"]


def test_sasl_ssl_and_ssl_carry_a_tls_context():
    sasl = _args("--security-protocol", "SASL_SSL", "--sasl-mechanism", "SCRAM-SHA-512",
                 "--sasl-username", "u", "--sasl-password", "p")
    auth = credentials_to_aiokafka_auth(_faust_credentials(sasl))
    assert auth["security_protocol"] == "SASL_SSL" and auth["ssl_context"] is not None
    auth = credentials_to_aiokafka_auth(_faust_credentials(_args("--security-protocol", "SSL")))
    assert auth["security_protocol"] == "SSL" and auth["ssl_context"] is not None


def test_plaintext_stays_plaintext():
    assert _faust_credentials(_args()) is None
    assert credentials_to_aiokafka_auth(None)["security_protocol"] == "PLAINTEXT"


@pytest.mark.parametrize(("flags", "expected"), [
    (("--security-protocol", "SASL_PLAINTEXT", "--sasl-mechanism", "OAUTHBEARER"),
     "not SASL_PLAINTEXT OAUTHBEARER"),
    (("--security-protocol", "SASL_PLAINTEXT", "--sasl-mechanism", "GSSAPI"), "not SASL_PLAINTEXT GSSAPI"),
    (("--security-protocol", "SASL_PLAINTEXT", "--sasl-mechanism", "SCRAM-SHA-512",
      "--sasl-username", "u"), "needs --sasl-username and --sasl-password"),
])
def test_what_faust_cannot_do_is_refused_in_one_line(flags, expected):
    with pytest.raises(ConfigError, match=expected):
        _faust_brokers(_args(*flags))


def test_the_app_is_built_with_the_credentials(tmp_path):
    args = _args("--security-protocol", "SASL_PLAINTEXT", "--sasl-mechanism", "SCRAM-SHA-512",
                 "--sasl-username", "kvrec", "--sasl-password", "secret")
    credentials = _faust_credentials(args)
    settings = AppSettings(
        group_id="g", brokers=_faust_brokers(args), credentials=credentials, input_topic="events",
        partitions=1, state_dir=str(tmp_path), history=10, interval_s=60.0, once=True, web_port=0,
        web_host="127.0.0.1", event_types=frozenset({"view"}), max_event_bytes=1024,
        max_future_ms=1000, progress=False)
    app, _ = build_app(settings, {0: 0}, lambda data: None, lambda: None)
    assert app.conf.broker_credentials is credentials
