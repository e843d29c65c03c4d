"""Security basics: secrets never leak, TLS/auth settings reach every client, bad security
settings stop start-up with a message that says how to fix them.

Unit tests build the real client objects (faust app, AsyncElasticsearch, librdkafka config)
without a server; one integration test starts a real worker process whose broker login fails.
"""

from __future__ import annotations

import logging
import os
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import certifi
import faust
import pytest
from pydantic import ValidationError

from commands.cli import main
from index.elastic import client_options
from streams.app import _faust_broker_options, create_worker, error_summary
from streams.settings import (
    REDACTED,
    CommonSettings,
    ConfigError,
    WorkerSettings,
    load,
    redact,
)

KAFKA_PASSWORD = "kafka-pw-Zq81xT"  # distinctive, so any leak is found by substring search
ES_API_KEY = "es-apikey-Vb27pL"
SECRETS = (KAFKA_PASSWORD, ES_API_KEY)
CA_FILE = Path(certifi.where())  # a real PEM bundle: the clients load it for real


def secure_env(**extra: str) -> dict[str, str]:
    return {
        "NEWSREC_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "NEWSREC_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
        "NEWSREC_KAFKA_SASL_USERNAME": "svc-newsrec", "NEWSREC_KAFKA_SASL_PASSWORD": KAFKA_PASSWORD,
        "NEWSREC_KAFKA_SSL_CA_LOCATION": str(CA_FILE), "NEWSREC_ES_URL": "https://es.internal:9200",
        "NEWSREC_ES_API_KEY": ES_API_KEY, "NEWSREC_ES_CA_CERTS": str(CA_FILE), **extra,
    }


@pytest.fixture
def secure(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> WorkerSettings:
    for key, value in secure_env(NEWSREC_STATE_DIR=str(tmp_path)).items():
        monkeypatch.setenv(key, value)
    return load(WorkerSettings)


def assert_no_secret(text: str, where: str) -> None:
    for secret in SECRETS:
        assert secret not in text, f"secret leaked in {where}: ...{text[max(0, text.find(secret) - 80):][:200]}"


# --- secrets stay secret -------------------------------------------------------------------


def test_settings_never_print_their_secrets(secure: WorkerSettings) -> None:
    for text in (repr(secure), str(secure), secure.model_dump_json(), str(secure.model_dump())):
        assert_no_secret(text, "settings rendering")
    # ...while the clients still get the real values.
    assert secure.kafka_config()["sasl.password"] == KAFKA_PASSWORD
    assert secure.es_api_key_value() == ES_API_KEY
    assert sorted(secure.secret_values()) == sorted(SECRETS)


@pytest.mark.parametrize("bad", [
    # model-level error: pydantic would quote the whole input dict, secrets included
    {"NEWSREC_KAFKA_SASL_MECHANISM": ""},
    # field error next to the secrets
    {"NEWSREC_BATCH_MAX_USERS": "0"},
    # an invalid secret field itself
    {"NEWSREC_KAFKA_BOOTSTRAP": "nohost"},
])
def test_config_error_never_quotes_secrets(monkeypatch: pytest.MonkeyPatch, bad: dict[str, str]) -> None:
    for key, value in (secure_env() | bad).items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError) as err:
        load(WorkerSettings)
    assert "NEWSREC_" in str(err.value)
    assert_no_secret(str(err.value), "ConfigError")
    # Built directly (tests, other tools), the pydantic error must not quote them either.
    with pytest.raises(ValidationError) as raw:
        WorkerSettings()
    assert_no_secret(str(raw.value), "ValidationError")


def test_overrides_and_url_credentials_are_masked_too() -> None:
    with pytest.raises(ConfigError) as err:
        load(CommonSettings, kafka_security_protocol="SASL_SSL", kafka_sasl_password=KAFKA_PASSWORD,
             es_api_key=ES_API_KEY)
    assert_no_secret(str(err.value), "ConfigError from overrides")
    with pytest.raises(ConfigError) as err:
        load(CommonSettings, es_url=f"https://elastic:{KAFKA_PASSWORD}@es.internal:9200")
    message = str(err.value)
    assert "NEWSREC_ES_URL" in message and "NEWSREC_ES_API_KEY" in message  # says how to fix it
    assert_no_secret(message, "ConfigError for a URL with credentials")


def test_cli_reports_bad_security_config_without_secrets(monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    for key, value in secure_env(NEWSREC_KAFKA_SSL_CA_LOCATION="/nonexistent/ca.pem").items():
        monkeypatch.setenv(key, value)
    assert main(["topics"]) == 2  # the user-facing path: a message and exit code 2, no traceback
    err = capsys.readouterr().err
    assert "NEWSREC_KAFKA_SSL_CA_LOCATION" in err and "PEM" in err
    assert_no_secret(err, "CLI stderr")


def test_redact_masks_secrets_and_url_credentials() -> None:
    text = f"GET https://bob:{KAFKA_PASSWORD}@es:9200/x failed; header ApiKey {ES_API_KEY}; ftp://u:p@h/"
    clean = redact(text, [ES_API_KEY, None, ""])
    assert_no_secret(clean, "redact")
    assert clean == f"GET https://{REDACTED}@es:9200/x failed; header ApiKey {REDACTED}; ftp://{REDACTED}@h/"
    assert redact("nothing to hide", []) == "nothing to hide"
    # An error summary shown on /stats goes through the same masking.
    summary = error_summary(RuntimeError(f"auth failed for key {ES_API_KEY}\nat line 2"), [ES_API_KEY])
    assert summary == f"RuntimeError: auth failed for key {REDACTED} at line 2"


# --- validation with fix-it messages -------------------------------------------------------


@pytest.mark.parametrize("env, variable, hint", [
    ({"NEWSREC_KAFKA_SSL_CA_LOCATION": "/nonexistent/ca.pem"}, "NEWSREC_KAFKA_SSL_CA_LOCATION", "PEM"),
    ({"NEWSREC_ES_CA_CERTS": "/nonexistent/es-ca.pem"}, "NEWSREC_ES_CA_CERTS", "PEM"),
    ({"NEWSREC_KAFKA_SECURITY_PROTOCOL": "PLAINTEXT"}, "NEWSREC_KAFKA_SASL_", "SASL_SSL"),
    ({"NEWSREC_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT"}, "NEWSREC_KAFKA_SSL_CA_LOCATION", "SSL or SASL_SSL"),
    ({"NEWSREC_ES_URL": "http://es.internal:9200"}, "NEWSREC_ES_CA_CERTS", "https"),
    ({"NEWSREC_KAFKA_SASL_USERNAME": ""}, "NEWSREC_KAFKA_SASL_USERNAME", "SASL needs"),
])
def test_inconsistent_security_settings_say_how_to_fix(monkeypatch: pytest.MonkeyPatch, env: dict[str, str],
                                                       variable: str, hint: str) -> None:
    for key, value in (secure_env() | env).items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError) as err:
        load(WorkerSettings)
    assert variable in str(err.value) and hint in str(err.value), str(err.value)


def test_empty_ca_variable_means_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEWSREC_ES_CA_CERTS", "")
    monkeypatch.setenv("NEWSREC_KAFKA_SSL_CA_LOCATION", "")
    s = load(CommonSettings)
    assert s.es_ca_certs is None and s.kafka_ssl_ca_location is None


def test_risky_but_legal_settings_are_warned_about_without_secrets() -> None:
    s = load(CommonSettings, kafka_security_protocol="SASL_PLAINTEXT", kafka_sasl_mechanism="PLAIN",
             kafka_sasl_username="svc", kafka_sasl_password=KAFKA_PASSWORD, es_url="http://es:9200",
             es_api_key=ES_API_KEY, es_verify_certs=False)
    warnings = s.security_warnings()
    assert len(warnings) == 3
    assert any("NEWSREC_ES_API_KEY" in w and "https" in w for w in warnings)
    assert any("NEWSREC_ES_VERIFY_CERTS" in w for w in warnings)
    assert any("SASL_PLAINTEXT" in w and "in clear" in w for w in warnings)
    assert_no_secret(" ".join(warnings), "security warnings")
    assert load(CommonSettings).security_warnings() == []  # the local default: nothing to warn about


# --- the clients get the security settings -------------------------------------------------


def test_confluent_configs_carry_sasl_and_tls(secure: WorkerSettings) -> None:
    expected = {"security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512",
                "sasl.username": "svc-newsrec", "sasl.password": KAFKA_PASSWORD, "ssl.ca.location": str(CA_FILE)}
    for conf in (secure.kafka_config(), secure.producer_config(), secure.consumer_config("g")):
        assert expected.items() <= conf.items()


def test_faust_app_gets_sasl_credentials_with_the_ca(secure: WorkerSettings, tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    creds = _faust_broker_options(secure)["broker_credentials"]
    assert isinstance(creds, faust.SASLCredentials)
    assert (creds.username, creds.password, creds.mechanism.value) == ("svc-newsrec", KAFKA_PASSWORD,
                                                                        "SCRAM-SHA-512")
    assert creds.protocol.value == "SASL_SSL"
    # The CA file was really loaded into the TLS context (certifi's bundle has >100 roots).
    assert isinstance(creds.ssl_context, ssl.SSLContext) and len(creds.ssl_context.get_ca_certs()) > 100
    assert creds.ssl_context.verify_mode == ssl.CERT_REQUIRED


    # The real app built by the worker factory, with its start-up logging captured.
    from index.embedded import EmbeddedEngine

    class NoModel:
        version = "none"

        def generate(self, prompts: Any, *, max_new_tokens: int) -> list[str]:
            return [""] * len(prompts)

    http_key = secure.model_copy(update={"es_url": "http://es.internal:9200", "es_ca_certs": None})
    with caplog.at_level(logging.DEBUG):
        worker = create_worker(http_key, NoModel(), EmbeddedEngine(), lambda _dir: NoModel())
    assert worker.app.conf.broker_credentials.password == KAFKA_PASSWORD
    assert_no_secret(caplog.text, "worker start-up logs")
    assert_no_secret(repr(worker.app.conf.broker_credentials), "faust credentials repr")


def test_faust_tls_only_and_plaintext() -> None:
    ssl_only = load(CommonSettings, kafka_security_protocol="SSL", kafka_ssl_ca_location=CA_FILE)
    creds = _faust_broker_options(ssl_only)["broker_credentials"]
    assert isinstance(creds, faust.SSLCredentials) and len(creds.context.get_ca_certs()) > 100
    assert "broker_credentials" not in _faust_broker_options(load(CommonSettings))


def test_elasticsearch_client_gets_api_key_tls_and_timeouts(secure: WorkerSettings) -> None:
    options = client_options("https://es:9200", api_key=ES_API_KEY, ca_certs=str(CA_FILE), request_timeout=3,
                             max_retries=1)
    assert options == {"hosts": ["https://es:9200"], "api_key": ES_API_KEY, "ca_certs": str(CA_FILE),
                       "verify_certs": True, "request_timeout": 3, "max_retries": 1, "retry_on_timeout": False}
    plain = client_options("http://127.0.0.1:9200")
    assert "api_key" not in plain and "ca_certs" not in plain and plain["request_timeout"] > 0
    assert client_options("https://es:9200", verify_certs=False)["verify_certs"] is False
    with pytest.raises(ValueError, match="request_timeout"):
        client_options("http://es:9200", request_timeout=0)

    # The engine the worker builds from settings: the real client object carries them.
    engine = (secure.model_copy(update={"es_request_timeout_s": 4.0})).elastic_engine()
    es = engine._es
    assert es._headers["authorization"] == f"ApiKey {ES_API_KEY}"
    node = es.transport.node_pool.all()[0].config
    assert (node.scheme, node.verify_certs, node.ca_certs) == ("https", True, str(CA_FILE))
    assert es._request_timeout == 4.0 and es._retry_on_timeout is False


# --- a real worker process whose broker login fails ----------------------------------------


@pytest.mark.integration
def test_worker_failing_to_authenticate_never_logs_its_secrets(kafka_bootstrap: str, tiny_model_dir: Path,
                                                                 tmp_path: Path) -> None:
    """The local broker does not do SASL: the worker's start-up fails on authentication,
    and nothing it prints (warnings, librdkafka errors, the traceback) quotes a secret."""
    env = {"NEWSREC_KAFKA_BOOTSTRAP": kafka_bootstrap, "NEWSREC_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
           "NEWSREC_KAFKA_SASL_MECHANISM": "PLAIN", "NEWSREC_KAFKA_SASL_USERNAME": "svc",
           "NEWSREC_KAFKA_SASL_PASSWORD": KAFKA_PASSWORD, "NEWSREC_ES_URL": "http://127.0.0.1:9",
           "NEWSREC_ES_API_KEY": ES_API_KEY, "NEWSREC_MODEL_DIR": str(tiny_model_dir),
           "NEWSREC_STATE_DIR": str(tmp_path), "NEWSREC_APP_ID": "sec-worker"}
    proc = subprocess.run([sys.executable, "-m", "commands.cli", "-v", "worker"], env=os.environ | env,
                          capture_output=True, text=True, timeout=90, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-2000:]
    assert "SASL PLAIN mechanism handshake failed" in output  # it failed on the login, not earlier
    assert "SASL_PLAINTEXT" in output and "in clear" in output  # the start-up warning
    assert_no_secret(output, "worker output")
