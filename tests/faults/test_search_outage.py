"""Search outage: the worker keeps consuming, backs off, serves the last recommendation marked
stale, reports the outage, and catches every user up once search is back.

The integration test runs a real worker on the real broker with the Elasticsearch engine on
its own noida-db server (stopped and restarted mid-stream). The refresher tests use the real
Elasticsearch client against real sockets: a closed port and a server that never answers.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from index.elastic import ElasticEngine
from streams.app import (
    RETRY_BACKOFF_S,
    RefreshHealth,
    Worker,
    run_refresher,
    search_status,
    served_recommendation,
)
from streams.metrics import Metrics
from streams.refresh import RefreshQueue
from streams.rollout import ActiveModel
from streams.settings import WorkerSettings
from tests.streaming import (
    CORPUS,
    HTTP_TIMEOUT_S,
    WAIT_S,
    add_event,
    consume,
    counter,
    fault_counts,
    poll_json,
    read_topic,
    served_window,
    wait_for_triggers,
    wait_until,
    window_ids,
)
from tools.infra import LocalInfra
from tools.stack import free_port, get_json

API_KEY = "outage-apikey-Hq93vT"  # configured on the worker; must never show up anywhere


# --- pure parts ----------------------------------------------------------------------------


def test_served_recommendation_is_marked_stale_while_newer_events_wait() -> None:
    rec = {"user_id": "u", "trigger_event_id": "e1", "items": [], "stale": False}
    assert served_recommendation(rec, {"pending_trigger": None}) == rec | {"pending_trigger": None}
    assert served_recommendation(rec, {"pending_trigger": "e1"})["stale"] is False  # e1 is what it covers
    behind = served_recommendation(rec, {"pending_trigger": "e3"})
    assert behind == rec | {"stale": True, "pending_trigger": "e3"}
    assert served_recommendation(rec, None)["stale"] is False
    assert served_recommendation(None, {"pending_trigger": "e3"}) is None
    assert served_recommendation(rec | {"stale": True}, None)["stale"] is True  # published stale stays stale
    assert rec["stale"] is False  # the stored row is not modified


def test_refresh_health_backs_off_and_recovers() -> None:
    health = RefreshHealth(secrets=[API_KEY])
    delays = [health.failed("search/publish", ConnectionError(f"refused, key {API_KEY}"), now=100.0)
              for _ in range(len(RETRY_BACKOFF_S) + 2)]
    assert delays == [*RETRY_BACKOFF_S, RETRY_BACKOFF_S[-1], RETRY_BACKOFF_S[-1]]  # grows, then caps
    assert health.paused_until == 100.0 + RETRY_BACKOFF_S[-1]
    snap = health.snapshot()
    assert snap["ok"] is False and snap["failures_in_row"] == len(delays)
    assert snap["last_error"]["stage"] == "search/publish" and "ConnectionError: refused" in snap["last_error"]["error"]
    assert API_KEY not in json.dumps(snap)
    health.succeeded()
    assert health.snapshot()["ok"] is True and health.paused_until == 0.0 and health.next_delay() == RETRY_BACKOFF_S[0]


# --- the refresher against a failing search server (real client, real sockets) -------------


class Model:
    version = "fake-1"

    def generate(self, prompts: Any, *, max_new_tokens: int) -> list[str]:
        return ["1. electric cars\n2. battery range"] * len(prompts)


class Topic:
    """In-memory stand-in for the output topics: what would have been published."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    async def send(self, *, key: bytes, value: bytes, partition: int | None = None) -> None:
        self.sent.append(json.loads(value))


def refresher_worker(engine: Any) -> Worker:
    settings = WorkerSettings(refresh_min_interval_s=0.0, batch_max_wait_ms=0)
    return Worker(app=None, settings=settings, active_model=ActiveModel(Model()), engine=engine,
                  queue=RefreshQueue(0.0), metrics=Metrics(), users={}, latest={}, recommendations=Topic(),
                  refresh_done=Topic(), health=RefreshHealth([API_KEY]))


@dataclass
class SilentServer:
    url: str
    connections: int = 0


@pytest.fixture
async def silent_server() -> AsyncIterator[SilentServer]:
    """A TCP server that accepts connections and never answers (a hung search node)."""
    stop = asyncio.Event()
    silent = SilentServer("")

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        silent.connections += 1
        await stop.wait()
        writer.close()

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    silent.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    yield silent
    stop.set()
    server.close()
    await server.wait_closed()


async def test_a_silent_search_server_costs_one_timeout_not_forever(silent_server: SilentServer) -> None:
    engine = ElasticEngine(silent_server.url, "news", request_timeout=0.5, max_retries=2)
    try:
        # Bounded by the request timeout, not by the WAIT_S guard around it.
        with pytest.raises(Exception, match="(?i)timeout|timed out"):
            await asyncio.wait_for(engine.search_many(["electric cars"]), WAIT_S)
        assert silent_server.connections == 1  # timeouts are not retried: one request, not max_retries + 1
        status = await asyncio.wait_for(search_status(engine, [], timeout=0.3), WAIT_S)  # what /health does
        assert status == {"ok": False, "documents": None, "error": "no answer within 0.3s"}

        worker = refresher_worker(engine)
        add_event(worker, "u1", "e1", "electric cars")
        task = asyncio.create_task(run_refresher(worker))
        try:
            deadline = time.monotonic() + WAIT_S
            while worker.metrics.counters["batches_failed"] < 2:  # the loop is not stuck on one request
                assert time.monotonic() < deadline, "refresher hung on the silent server"
                await asyncio.sleep(0.05)
        finally:
            task.cancel()
        assert worker.recommendations.sent == [] and len(worker.queue) == 1  # nothing lost, still pending
        assert worker.health.last_error is not None and worker.health.last_error["stage"] == "search/publish"
    finally:
        await engine.close()


async def test_backoff_holds_every_refresh_while_search_is_down() -> None:
    """New users keep arriving during the outage: the pause applies to all of them, so the
    server is probed on the backoff schedule instead of once per new batch."""
    engine = ElasticEngine(f"http://127.0.0.1:{free_port()}", "news", request_timeout=1.0)  # nothing listens
    worker = refresher_worker(engine)
    task = asyncio.create_task(run_refresher(worker))
    n = 0
    try:
        t0 = time.monotonic()
        deadline = t0 + WAIT_S
        # A new user every 50 ms until the server was probed 3 times and 40 users arrived.
        while worker.metrics.counters["batches_failed"] < 3 or n < 40:
            assert time.monotonic() < deadline, f"{worker.metrics.counters['batches_failed']} probes, {n} users"
            add_event(worker, f"u{n}", f"e{n}", "electric cars")
            n += 1
            await asyncio.sleep(0.05)
        elapsed = time.monotonic() - t0
    finally:
        task.cancel()
        await engine.close()
    failures = worker.metrics.counters["batches_failed"]
    # Probes only on the backoff schedule: a slow machine probes less often, never more
    # (one batch per new user would fail ~once per 50 ms).
    assert failures <= backoff_bound(elapsed), (failures, elapsed)
    assert worker.recommendations.sent == []
    assert len(worker.queue) + worker.queue.in_flight == n  # every user still pending, none dropped


# --- a real worker through a real outage ---------------------------------------------------


def backoff_bound(seconds: float) -> int:
    """The most failed batches the backoff allows in ``seconds`` (+1: two batches in flight)."""
    elapsed, n = 0.0, 0
    while elapsed <= seconds:
        elapsed += RETRY_BACKOFF_S[min(n, len(RETRY_BACKOFF_S) - 1)]
        n += 1
    return n + 1


def served(url: str, user: str) -> dict[str, Any] | None:
    return poll_json(f"{url}/recommendations/{user}")


@pytest.mark.integration
def test_worker_rides_out_a_search_outage(stack: Any, kafka_bootstrap: str, unique_name: str, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch, fault_report: Any) -> None:
    from commands.cli import main

    t_start = time.monotonic()
    # Its own search server, so the session one stays up for other tests.
    with LocalInfra(tmp_path / "search-infra") as infra:
        es_url = infra.start_search(0)
        port = int(es_url.rsplit(":", 1)[1])
        stack.env.update({"NEWSREC_ES_URL": es_url, "NEWSREC_ES_ALIAS": f"{unique_name}-news",
                          "NEWSREC_SEARCH_ENGINE": "elasticsearch", "NEWSREC_ES_API_KEY": API_KEY,
                          "NEWSREC_ES_REQUEST_TIMEOUT_S": "3"})
        for key, value in stack.env.items():
            monkeypatch.setenv(key, value)
        assert main(["index", "--exit-when-idle", "2"]) == 0  # the production indexing path
        worker = stack.start_worker()
        assert get_json(f"{worker.url}/health", timeout=HTTP_TIMEOUT_S)["engine"] == "elasticsearch"
        users = [f"o-{n}" for n in range(6)]

        # 1. healthy: every user gets a fresh recommendation
        for user in users:
            stack.send(user, 0)
        stack.flush()
        wait_until(lambda: all((r := served(worker.url, u)) and r["trigger_event_id"] == f"{u}-e0"
                               and not r["stale"] for u in users), WAIT_S, "first recommendations")

        # 2. outage: stop the search server mid-stream
        infra.stop()
        t_down = time.monotonic()
        for i in (1, 2):
            for user in users:
                stack.send(user, i)
            stack.flush()
        wait_until(lambda: all(sorted(window_ids(worker.url, u) or []) == sorted(stack.sent[u]) for u in users),
                   WAIT_S, "the windows to take the events sent during the outage")
        wait_until(lambda: counter(worker, "batches_failed") >= 4, WAIT_S, "retries with backoff")
        during = {u: served(worker.url, u) for u in users}
        for user, rec in during.items():  # the last good recommendation, marked stale
            assert rec is not None and rec["trigger_event_id"] == f"{user}-e0", rec
            assert rec["stale"] is True and rec["pending_trigger"] == f"{user}-e2" and rec["items"]
        health = get_json(f"{worker.url}/health", timeout=HTTP_TIMEOUT_S)
        stats = get_json(f"{worker.url}/stats", timeout=HTTP_TIMEOUT_S)
        assert health["status"] == "degraded" and health["search"]["ok"] is False and health["documents"] is None
        assert re.search("(?i)connect", health["search"]["error"]), health["search"]
        assert stats["refresh"]["ok"] is False and stats["refresh"]["last_error"]["stage"] == "search/publish"
        failed = stats["counters"]["batches_failed"]
        assert failed <= backoff_bound(time.monotonic() - t_down), (failed, time.monotonic() - t_down)
        assert worker.proc is not None and worker.proc.poll() is None  # alive: no crash, no restart loop
        outage_s = time.monotonic() - t_down

        # 3. search is back (same port, same data dir: the index persisted)
        infra.start_search(port)
        last = {u: stack.sent[u][-1] for u in users}

        def caught_up(records: list) -> bool:
            return {v["user_id"] for _, v in records if last.get(v["user_id"]) == v["trigger_event_id"]} == set(users)

        recs = consume(kafka_bootstrap, stack.topic("recommendations"), caught_up)
        assert caught_up(recs), "some users never got a recommendation for their last event"
        for key, rec in recs:
            assert key == rec["user_id"].encode() and {i["news_id"] for i in rec["items"]} <= {a.news_id for a in CORPUS}
        wait_until(lambda: all((r := served(worker.url, u)) and r["trigger_event_id"] == last[u] and not r["stale"]
                               for u in users), WAIT_S, "the served recommendations to be fresh again")
        windows = {user: window_ids(worker.url, user) or [] for user in users}
        for user in users:  # no event lost
            assert sorted(windows[user]) == sorted(stack.sent[user])
        health = get_json(f"{worker.url}/health", timeout=HTTP_TIMEOUT_S)
        stats = get_json(f"{worker.url}/stats", timeout=HTTP_TIMEOUT_S)
        assert health["status"] == "ok" and health["documents"] == len(CORPUS)  # the index persisted
        assert stats["refresh"]["ok"] is True and stats["refresh"]["last_error"] is not None  # history kept
        assert worker.proc.poll() is None

        log = worker.log_path.read_text(errors="replace")
        for text in (json.dumps(health), json.dumps(stats), log):
            assert API_KEY not in text
        assert log.count("stage failed for a batch") == 1  # one traceback per outage, then one-liners
        print(f"\nsearch down {outage_s:.1f}s: {failed} failed batches, retried with backoff")
        # The counts, measured: what the topics and the served windows hold now.
        published = wait_for_triggers(kafka_bootstrap, stack.topic("recommendations"), set(last.values()))
        dlq = read_topic(kafka_bootstrap, stack.topic("dlq"))
        fault_report(fault_counts("search-outage", stack.events, {u: served_window(worker.url, u) for u in users},
                                  published, len(dlq), t_start))
        assert dlq == [], f"valid events were dead-lettered: {dlq[:3]}"
