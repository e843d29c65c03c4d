"""GET /metrics: the worker's counts in the Prometheus text format.

The unit tests wire :class:`streams.metrics.Metrics` to a registry and read it back with
prometheus_client's own text parser; the integration test scrapes a real worker on the
real local broker before and after sending events (waits on conditions, no fixed sleeps).
"""

from __future__ import annotations

import time
import urllib.request
from typing import Any

import pytest
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from streams.metrics import (
    DEAD_LETTER_REASONS,
    Live,
    Metrics,
    channel_label,
    dead_letter_reason,
    prometheus_registry,
)
from streams.settings import CHANNELS

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> tuple[Samples, dict[str, str]]:
    """(sample name, labels) -> value, and family name -> type."""
    samples: Samples = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples, types


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def labelled(samples: Samples, name: str, label: str) -> dict[str, float]:
    return {dict(lbls)[label]: v for (n, lbls), v in samples.items() if n == name and label in dict(lbls)}


# -- the registry wiring (pure) --------------------------------------------------------------


def test_registry_reads_the_same_numbers_as_stats() -> None:
    m = Metrics()
    live = {"value": Live(queued=3, in_flight=2, model_failures=4, model_timeouts=1, degraded_batches=4,
                          model_version="bootstrap-1", consumer_lag=7)}
    registry = prometheus_registry(m, lambda: live["value"])
    samples, types = parse(generate_latest(registry).decode())
    # Before anything happened: the main counters exist at 0, histograms are empty.
    assert value(samples, "newsrec_events_consumed_total") == 0
    assert value(samples, "newsrec_refreshes_published_total") == 0
    assert value(samples, "newsrec_refresh_latency_seconds_count") == 0
    assert types["newsrec_refresh_latency_seconds"] == "histogram" and types["newsrec_dead_letters"] == "counter"

    for _ in range(5):
        m.inc("events_in")
    m.inc("recommendations_out", 2)
    m.inc("batches_failed_search/publish")  # odd characters in an internal name are sanitised
    m.inc_label("dead_letters", dead_letter_reason("ts: Input should be a valid datetime"))
    m.inc_label("dead_letters", dead_letter_reason("value: Invalid JSON: EOF while parsing"))
    m.inc_label("dead_letters", dead_letter_reason("value: Invalid JSON: key must be a string"))
    for ch in ("signals", "signals", "model", "trending"):
        m.inc_label("recommended_items", channel_label(ch))
    for ms in (3.0, 40.0, 40.0, 1_500.0, 500_000.0):
        m.observe("refresh_latency_ms", ms)
    m.observe("model_batch_ms", 120.0)
    m.observe("search_batch_ms", 8.0)
    m.observe("dense_batch_ms", 2.0)

    samples, types = parse(generate_latest(registry).decode())
    snap = m.snapshot()
    assert value(samples, "newsrec_events_consumed_total") == snap["counters"]["events_in"] == 5
    assert value(samples, "newsrec_refreshes_published_total") == snap["counters"]["recommendations_out"] == 2
    assert value(samples, "newsrec_batches_failed_search_publish_total") == 1
    assert labelled(samples, "newsrec_dead_letters_total", "reason") == {"ts": 1, "invalid_json": 2}
    assert snap["labeled"]["dead_letters"] == {"ts": 1, "invalid_json": 2}
    assert labelled(samples, "newsrec_recommended_items_total", "channel") == {"signals": 2, "model": 1,
                                                                               "trending": 1}
    # Histograms in seconds: cumulative buckets, count and sum match the /stats summary.
    assert value(samples, "newsrec_refresh_latency_seconds_count") == snap["summaries"]["refresh_latency_ms"]["count"]
    assert value(samples, "newsrec_refresh_latency_seconds_sum") == pytest.approx(501.583)
    assert value(samples, "newsrec_refresh_latency_seconds_bucket", le="0.005") == 1
    assert value(samples, "newsrec_refresh_latency_seconds_bucket", le="0.05") == 3
    assert value(samples, "newsrec_refresh_latency_seconds_bucket", le="2.5") == 4
    assert value(samples, "newsrec_refresh_latency_seconds_bucket", le="120.0") == 4
    assert value(samples, "newsrec_refresh_latency_seconds_bucket", le="+Inf") == 5
    assert value(samples, "newsrec_model_batch_seconds_bucket", le="0.25") == 1
    assert value(samples, "newsrec_model_batch_seconds_bucket", le="0.1") == 0
    assert value(samples, "newsrec_search_batch_seconds_count") == 1
    assert value(samples, "newsrec_dense_batch_seconds_sum") == pytest.approx(0.002)
    # Live values: queue, model channel, version, lag.
    assert value(samples, "newsrec_refresh_queue_size") == 3 and types["newsrec_refresh_queue_size"] == "gauge"
    assert value(samples, "newsrec_refresh_in_flight") == 2
    assert value(samples, "newsrec_model_failures_total") == 4 and value(samples, "newsrec_model_timeouts_total") == 1
    assert value(samples, "newsrec_degraded_batches_total") == 4
    assert value(samples, "newsrec_model_version", version="bootstrap-1") == 1
    assert value(samples, "newsrec_consumer_lag") == 7

    live["value"] = Live(model_version="v2", consumer_lag=None)  # read on every scrape
    samples, _ = parse(generate_latest(registry).decode())
    assert labelled(samples, "newsrec_model_version", "version") == {"v2": 1}
    assert not any(n == "newsrec_consumer_lag" for n, _ in samples)  # unknown: absent, not 0


def test_registries_are_per_worker_not_global() -> None:
    a, b = Metrics(), Metrics()
    a.inc("events_in", 3)
    ra, rb = prometheus_registry(a), prometheus_registry(b)
    assert value(parse(generate_latest(ra).decode())[0], "newsrec_events_consumed_total") == 3
    assert value(parse(generate_latest(rb).decode())[0], "newsrec_events_consumed_total") == 0
    assert CONTENT_TYPE_LATEST.startswith("text/plain")


@pytest.mark.parametrize(("error", "reason"), [
    ("value is not valid UTF-8: 'utf-8' codec can't decode byte 0xff", "not_utf8"),
    ("value: Invalid JSON: EOF while parsing an object at line 1 column 1", "invalid_json"),
    ("value: Input should be an object", "not_an_object"),
    ("value: Value error, an impression event needs the news_id of the article shown", "invalid_event"),
    ("ts: Input should be a valid datetime; domain: Input should be 'search'", "ts"),
    ("meta.app: Input should be a valid string", "meta"),
    ("my-secret-user-text: Extra inputs are not permitted", "unknown_field"),
    ("record key must equal user_id (UTF-8): it decides the user's partition", "key_mismatch"),
    ("cannot apply event: KeyError: 'x'", "apply_failed"),
    ("value cannot be parsed: RecursionError", "unparseable"),
    ("anything else the user typed", "other"),
])
def test_dead_letter_reasons_are_a_bounded_set(error: str, reason: str) -> None:
    assert dead_letter_reason(error) == reason
    assert reason in DEAD_LETTER_REASONS


def test_channel_labels_come_from_the_fixed_list() -> None:
    assert [channel_label(c) for c in CHANNELS] == list(CHANNELS)
    assert channel_label("free text") == "other"


# -- a real worker on the real local broker --------------------------------------------------


def scrape(url: str) -> tuple[Samples, dict[str, str]] | None:
    """One scrape of ``url``/metrics; None when it fails or is slow (a poll tries again)."""
    try:
        with urllib.request.urlopen(f"{url}/metrics", timeout=10) as resp:
            assert resp.headers["Content-Type"] == CONTENT_TYPE_LATEST
            return parse(resp.read().decode("utf-8"))
    except OSError:
        return None


def wait_for(predicate: Any, timeout: float, what: str, worker: Any) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = predicate()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}\n{worker.log_tail()}"
        time.sleep(0.2)


@pytest.mark.integration
def test_metrics_endpoint_counters_move_on_a_real_worker(stack) -> None:
    worker = stack.start_worker()
    before = wait_for(lambda: scrape(worker.url), 60, "a first /metrics scrape", worker)[0]
    assert value(before, "newsrec_model_version", version=worker.stats()["model_version"]) == 1
    base = {name: value(before, name) for name in
            ("newsrec_events_consumed_total", "newsrec_refreshes_published_total",
             "newsrec_refresh_latency_seconds_count", "newsrec_search_batch_seconds_count")}
    base_dlq = labelled(before, "newsrec_dead_letters_total", "reason").get("invalid_json", 0)
    base_items = sum(labelled(before, "newsrec_recommended_items_total", "channel").values())

    users = ["prom-a", "prom-b"]
    for n, user in enumerate(users):
        stack.send(user, 0, ["electric car battery range", "nba playoff injury report"][n])
    stack.producer.produce(stack.topic("events"), key="prom-bad", value=b'{"event_id": "broken')
    stack.flush()

    def moved() -> Samples | None:
        got = scrape(worker.url)
        if got is None:
            return None
        s = got[0]
        ok = (value(s, "newsrec_events_consumed_total") >= base["newsrec_events_consumed_total"] + 3
              and value(s, "newsrec_refreshes_published_total") >= base["newsrec_refreshes_published_total"] + 2
              and labelled(s, "newsrec_dead_letters_total", "reason").get("invalid_json", 0) >= base_dlq + 1
              and sum(labelled(s, "newsrec_recommended_items_total", "channel").values()) > base_items)
        return s if ok else None

    after = wait_for(moved, 120, "/metrics counters to move", worker)
    assert value(after, "newsrec_refresh_latency_seconds_count") >= base["newsrec_refresh_latency_seconds_count"] + 2
    assert value(after, "newsrec_search_batch_seconds_count") > base["newsrec_search_batch_seconds_count"]
    channels = labelled(after, "newsrec_recommended_items_total", "channel")
    assert set(channels) <= set(CHANNELS) and channels.get("signals", 0) > 0, channels
    assert set(labelled(after, "newsrec_dead_letters_total", "reason")) <= DEAD_LETTER_REASONS
    assert ("newsrec_refresh_queue_size", frozenset()) in after
    assert ("newsrec_model_failures_total", frozenset()) in after

    # Once the worker is idle, /stats and /metrics give the same numbers (one source).
    def agree() -> bool:
        got, stats = scrape(worker.url), worker.stats()
        if got is None:
            return False
        s = got[0]
        return (value(s, "newsrec_events_consumed_total") == stats["counters"].get("events_in", 0)
                and value(s, "newsrec_refreshes_published_total") == stats["counters"].get("recommendations_out", 0)
                and labelled(s, "newsrec_dead_letters_total", "reason") == stats["labeled"].get("dead_letters", {})
                and value(s, "newsrec_refresh_queue_size") == stats["queued"]
                and ("newsrec_consumer_lag", frozenset()) in s
                and value(s, "newsrec_consumer_lag") == stats["consumer_lag"] == 0)

    wait_for(agree, 60, "/stats and /metrics to agree with the consumer lag drained to 0", worker)
