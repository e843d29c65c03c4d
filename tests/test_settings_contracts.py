import json

import pytest

from streams.contracts import UserEvent, dead_letter, parse_event
from streams.settings import CommonSettings, ConfigError, WorkerSettings, load

GOOD = {"event_id": "e1", "user_id": "u1", "ts": "2026-11-01T10:00:00+00:00", "domain": "search",
        "text": "nba playoffs", "url": None, "news_id": None, "meta": {}}


def test_valid_event_parses():
    ev = parse_event(json.dumps(GOOD).encode())
    assert isinstance(ev, UserEvent) and ev.domain == "search" and ev.ts.tzinfo is not None


@pytest.mark.parametrize("raw, reason", [
    (b"{not json", "Invalid JSON"),
    (b"\xff\xfe\x00", "UTF-8"),
    (json.dumps(GOOD | {"domain": "email"}).encode(), "domain"),
    (json.dumps({k: v for k, v in GOOD.items() if k != "user_id"}).encode(), "user_id"),
    (json.dumps(GOOD | {"ts": 12345}).encode(), "ts"),
    (json.dumps(GOOD | {"ts": "2026-11-01T10:00:00"}).encode(), "timezone"),
    (json.dumps(GOOD | {"text": "   "}).encode(), "empty"),
    (json.dumps(GOOD | {"text": "x" * 5000}).encode(), "more than"),
    (json.dumps(GOOD | {"extra": 1}).encode(), "extra"),
    (b"[1, 2]", "value"),
])
def test_bad_events_raise_readable_errors(raw, reason):
    with pytest.raises(ValueError, match=reason):
        parse_event(raw)


def test_dead_letter_keeps_invalid_bytes_as_base64():
    letter = dead_letter(b"\xff\x00", "bad", topic="t", partition=1, offset=7)
    assert letter.raw_encoding == "base64" and letter.raw == "/wA="


def test_settings_from_env(monkeypatch):
    monkeypatch.setenv("NEWSREC_KAFKA_BOOTSTRAP", "10.0.0.1:9092, 10.0.0.2:9092")
    monkeypatch.setenv("NEWSREC_ES_URL", "http://es:9200/")
    s = load(CommonSettings)
    assert s.kafka_bootstrap == "10.0.0.1:9092,10.0.0.2:9092"
    assert s.engine == "elasticsearch" and s.es_url == "http://es:9200"
    assert s.producer_config()["enable.idempotence"] is True


def test_bad_settings_name_the_variable(monkeypatch):
    monkeypatch.setenv("NEWSREC_KAFKA_BOOTSTRAP", "localhost")
    monkeypatch.setenv("NEWSREC_BATCH_MAX_USERS", "0")
    with pytest.raises(ConfigError) as err:
        load(WorkerSettings)
    assert "NEWSREC_KAFKA_BOOTSTRAP" in str(err.value) and "NEWSREC_BATCH_MAX_USERS" in str(err.value)


def test_sasl_needs_credentials_and_secret_is_hidden(monkeypatch):
    monkeypatch.setenv("NEWSREC_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    with pytest.raises(ConfigError, match="SASL"):
        load(CommonSettings)
    monkeypatch.setenv("NEWSREC_KAFKA_SASL_MECHANISM", "PLAIN")
    monkeypatch.setenv("NEWSREC_KAFKA_SASL_USERNAME", "svc")
    monkeypatch.setenv("NEWSREC_KAFKA_SASL_PASSWORD", "s3cret")
    s = load(CommonSettings)
    assert "s3cret" not in repr(s) and s.kafka_config()["sasl.password"] == "s3cret"
