"""The refresher loop with in-memory stand-ins for the model, the index and the topics."""

import asyncio
import json
import time

from index.base import Hit
from streams.app import Worker, run_refresher
from streams.metrics import Metrics
from streams.refresh import RefreshQueue
from streams.rollout import ActiveModel
from streams.settings import WorkerSettings
from tests.streaming import add_event, wait_for


class SlowModel:
    version = "fake-1"

    def __init__(self, delay: float, fail_first: int = 0) -> None:
        self.delay, self.fail_first, self.calls = delay, fail_first, []

    def generate(self, prompts, *, max_new_tokens):
        self.calls.append(len(prompts))
        time.sleep(self.delay)
        if self.fail_first:
            self.fail_first -= 1
            raise RuntimeError("model fell over")
        return ["1. electric cars\n2. battery range"] * len(prompts)


class Engine:
    name = "fake"

    async def search_many(self, queries, *, k=10, exclude=None, within=None):
        return [[Hit(f"N{abs(hash(q)) % 7}", q, 1.0), Hit("N-clicked", "x", 0.5)] for q in queries]


class Topic:
    def __init__(self) -> None:
        self.sent: list[dict] = []

    async def send(self, *, key, value, partition=None):
        self.sent.append(json.loads(value))


def make_worker(model, min_interval=0.0) -> Worker:
    settings = WorkerSettings(refresh_min_interval_s=min_interval, batch_max_wait_ms=0)
    return Worker(app=None, settings=settings, active_model=ActiveModel(model), engine=Engine(),
                  queue=RefreshQueue(min_interval), metrics=Metrics(), users={}, latest={}, recommendations=Topic(),
                  refresh_done=Topic())


async def test_event_arriving_during_refresh_is_published_without_further_events():
    worker = make_worker(SlowModel(delay=0.2), min_interval=0.1)
    task = asyncio.create_task(run_refresher(worker))
    try:
        add_event(worker, "u1", "e1")
        await wait_for(lambda: worker.active_model.current.calls)  # e1 is in the model now
        add_event(worker, "u1", "e2")
        sent = worker.recommendations.sent
        await wait_for(lambda: any(r["trigger_event_id"] == "e2" for r in sent))
        assert [r["trigger_event_id"] for r in sent] == ["e1", "e2"]
        assert worker.refresh_done.sent == sent  # completions mirror the publications
    finally:
        task.cancel()


async def test_batch_gathers_users_and_drops_clicked_items():
    worker = make_worker(SlowModel(delay=0.0))
    for n in range(5):
        add_event(worker, f"u{n}", f"e{n}", news_id="N-clicked")
    task = asyncio.create_task(run_refresher(worker))
    try:
        await wait_for(lambda: len(worker.recommendations.sent) == 5)
        assert worker.active_model.current.calls == [5]
        for rec in worker.recommendations.sent:
            assert rec["queries"] == ["electric cars", "battery range"]
            assert rec["items"] and "N-clicked" not in {i["news_id"] for i in rec["items"]}
            assert rec["model_version"] == "fake-1"
    finally:
        task.cancel()


async def test_failed_batch_is_retried_and_nothing_is_lost():
    worker = make_worker(SlowModel(delay=0.0, fail_first=1))
    add_event(worker, "u1", "e1")
    task = asyncio.create_task(run_refresher(worker))
    try:
        await wait_for(lambda: worker.recommendations.sent, timeout=5)
        assert worker.recommendations.sent[0]["trigger_event_id"] == "e1"
        assert worker.metrics.counters["batches_failed"] == 1
    finally:
        task.cancel()
