"""End to end on the real local broker: plain confluent-kafka clients in, worker process, recommendations out.

The clients here know only the README contracts (topic names, JSON values, key = user_id).
"""

from __future__ import annotations

import json
import time
from datetime import datetime

import pytest

from tests.streaming import (
    CORPUS_IDS,
    TEXTS,
    consume,
    event,
    latest_by_user,
    window_ids,
)
from tools.stack import get_json

pytestmark = pytest.mark.integration


def test_every_user_gets_recommendations_from_the_index(stack, kafka_bootstrap):
    env, producer = stack["env"], stack["producer"]
    stack["start_worker"]()
    users = [f"user-{n}" for n in range(20)]
    last: dict[str, str] = {}
    for n, user in enumerate(users):
        for i in range(3):
            ev = event(user, i, TEXTS[(n + i) % len(TEXTS)])
            producer.produce(env["NEWSREC_TOPIC_EVENTS"], key=user, value=json.dumps(ev))
            last[user] = ev["event_id"]
    assert producer.flush(30) == 0

    def covered(records: list) -> bool:
        return sum(1 for _, v in records if last.get(v["user_id"]) == v["trigger_event_id"]) >= len(users)

    records = consume(kafka_bootstrap, env["NEWSREC_TOPIC_RECOMMENDATIONS"], covered)
    recs = latest_by_user(records)
    assert set(recs) == set(users)
    for key, value in records:
        assert key == value["user_id"].encode()
    for user, rec in recs.items():
        assert rec["items"], f"{user} got no items"
        assert {i["news_id"] for i in rec["items"]} <= CORPUS_IDS
        assert rec["model_version"] and rec["latency_ms"] >= 0
        datetime.fromisoformat(rec["generated_at"])


def test_bad_events_go_to_dlq_with_reason_and_worker_keeps_going(stack, kafka_bootstrap):
    env, producer = stack["env"], stack["producer"]
    worker = stack["start_worker"]()
    topic = env["NEWSREC_TOPIC_EVENTS"]
    bad = {
        "malformed": b'{"event_id": "x", ',
        "wrong-type": json.dumps(event("u-bad", 1, "text") | {"ts": 17}).encode(),
        "missing-field": json.dumps({k: v for k, v in event("u-bad", 2, "t").items() if k != "text"}).encode(),
        "unknown-domain": json.dumps(event("u-bad", 3, "text") | {"domain": "email"}).encode(),
        "huge-text": json.dumps(event("u-bad", 4, "x" * 100_000)).encode(),
        "empty-text": json.dumps(event("u-bad", 5, "")).encode(),
        "invalid-utf8": b'{"text": "\xff\xfe"}',
    }
    for name, raw in bad.items():
        producer.produce(topic, key=b"u-bad", value=raw, headers={"case": name})
    good = event("u-good", 1, "electric car battery range")
    producer.produce(topic, key="u-good", value=json.dumps(good))
    assert producer.flush(30) == 0

    letters = consume(kafka_bootstrap, env["NEWSREC_TOPIC_DLQ"], lambda got: len(got) >= len(bad))
    assert len(letters) == len(bad)
    for _, letter in letters:
        assert letter["error"] and letter["topic"] == topic and letter["offset"] >= 0
    errors = " | ".join(letter["error"] for _, letter in letters)
    for fragment in ["JSON", "ts", "text", "domain", "more than", "empty", "UTF-8"]:
        assert fragment in errors, f"no DLQ reason mentions {fragment!r}: {errors}"
    raws = {letter["raw"] for _, letter in letters}
    assert bad["malformed"].decode() in raws  # kept whole

    recs = consume(kafka_bootstrap, env["NEWSREC_TOPIC_RECOMMENDATIONS"],
                   lambda got: any(v["user_id"] == "u-good" for _, v in got))
    assert any(v["trigger_event_id"] == good["event_id"] for _, v in recs)
    assert worker.proc is not None and worker.proc.poll() is None
    assert worker.stats()["counters"]["events_dlq"] == len(bad)


def test_worker_restart_mid_stream_keeps_every_window(stack, kafka_bootstrap):
    env, producer = stack["env"], stack["producer"]
    worker = stack["start_worker"]()
    users = [f"r-{n}" for n in range(10)]
    sent: dict[str, list[str]] = {u: [] for u in users}

    def send(i: int) -> None:
        for n, user in enumerate(users):
            ev = event(user, i, TEXTS[(n + i) % len(TEXTS)])
            producer.produce(env["NEWSREC_TOPIC_EVENTS"], key=user, value=json.dumps(ev))
            sent[user].append(ev["event_id"])
        assert producer.flush(30) == 0

    for i in range(3):
        send(i)
    deadline = time.monotonic() + 60
    while worker.stats()["counters"].get("events_applied", 0) < 30 and time.monotonic() < deadline:
        time.sleep(0.2)
    worker.kill()  # mid-stream, no clean shutdown
    send(3)
    restarted = stack["start_worker"]()
    send(4)

    deadline = time.monotonic() + 90
    windows: dict[str, list[str]] = {}
    while time.monotonic() < deadline:
        windows = {u: ids for u in users if (ids := window_ids(restarted.url, u)) is not None}
        if all(sorted(windows.get(u, [])) == sorted(sent[u]) for u in users):
            break
        time.sleep(0.5)
    lost = {u: sorted(set(sent[u]) - set(windows.get(u, []))) for u in users}
    if any(lost.values()):  # say where the events went: never read, or read and dead-lettered
        dlq = consume(kafka_bootstrap, env["NEWSREC_TOPIC_DLQ"], lambda got: False, timeout=5)
        pytest.fail(f"lost from the windows: {lost}; worker counters {restarted.stats()['counters']}; "
                    f"dead letters {[v for _, v in dlq]}")


def test_outside_client_with_elasticsearch_engine(stack, kafka_bootstrap, es_url, unique_name, monkeypatch):
    """Broker and Elasticsearch given by env only; news indexed by `newsrec index`; plain clients."""
    from commands.cli import main

    env = stack["env"] | {"NEWSREC_ES_URL": es_url, "NEWSREC_ES_ALIAS": f"{unique_name}-news",
                          "NEWSREC_SEARCH_ENGINE": "auto"}
    stack["env"].update(env)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert main(["index", "--exit-when-idle", "3"]) == 0
    worker = stack["start_worker"]()
    assert get_json(f"{worker.url}/health")["engine"] == "elasticsearch"

    producer = stack["producer"]
    users = ["es-a", "es-b", "es-c"]
    for n, user in enumerate(users):
        producer.produce(env["NEWSREC_TOPIC_EVENTS"], key=user, value=json.dumps(event(user, 0, TEXTS[n])))
    assert producer.flush(30) == 0
    records = consume(kafka_bootstrap, env["NEWSREC_TOPIC_RECOMMENDATIONS"],
                      lambda got: {v["user_id"] for _, v in got} >= set(users))
    recs = latest_by_user(records)
    assert set(recs) == set(users)
    for user in users:
        assert recs[user]["items"] and {i["news_id"] for i in recs[user]["items"]} <= CORPUS_IDS
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the web view is fed through the refresh-done topic
        try:
            served = get_json(f"{worker.url}/recommendations/es-a")
            break
        except OSError:
            time.sleep(0.3)
    assert served["user_id"] == "es-a" and served["trigger_event_id"] == recs["es-a"]["trigger_event_id"]


def test_produce_cli_publishes_events_file_and_rejects_bad_lines(kafka_bootstrap, unique_name, tmp_path,
                                                                  monkeypatch, capsys):
    from commands.cli import main

    monkeypatch.setenv("NEWSREC_KAFKA_BOOTSTRAP", kafka_bootstrap)
    monkeypatch.setenv("NEWSREC_TOPIC_EVENTS", f"{unique_name}-events")
    good = tmp_path / "events.jsonl"
    good.write_text("\n".join(json.dumps(event(f"p{n}", n, "some text")) for n in range(5)) + "\n")
    assert main(["produce", "events", str(good)]) == 0
    got = consume(kafka_bootstrap, f"{unique_name}-events", lambda g: len(g) >= 5, timeout=30)
    assert sorted(k for k, _ in got) == [f"p{n}".encode() for n in range(5)]

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(event("p", 0, "ok")) + "\n" + '{"event_id": 1}\n')
    capsys.readouterr()
    assert main(["produce", "events", str(bad)]) == 3  # the valid line is sent, the bad one dead-lettered
    assert f"{bad}:2: " in capsys.readouterr().err
