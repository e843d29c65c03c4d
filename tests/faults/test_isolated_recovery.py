"""Recovery that no later traffic can hide.

1. All producers stop, the only worker dies (an injected ``os._exit``, like kill -9) between
   the model call and the publish, and restarts with no new event: only the pending sweep
   (``sweep_pending``, from the refresh still pending in the users table) can publish.
2. The publish fails part way through a batch: every user of the batch is published exactly
   once more, none lost (the refresher with the real embedded engine; the topic records).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest
from confluent_kafka import Consumer, TopicPartition

from index.embedded import EmbeddedEngine
from streams.app import run_refresher
from tests.faults.test_search_outage import Topic, refresher_worker
from tests.streaming import (
    CORPUS,
    FAULT_ENV,
    READY_S,
    WAIT_S,
    FaultCounts,
    Stack,
    add_event,
    check_nothing_lost,
    counter,
    read_topic,
    wait_until,
)

USERS = [f"pending-{n}" for n in range(6)]
# The crashing worker gathers its first batch this long: enough for faust to commit the
# events' offsets first (every 2.8 s), so its successor replays none of them.
GATHER_MS = "8000"


def committed_events(stack: Stack) -> int:
    """Events the worker's group (its app id) committed on the events topic, all partitions."""
    topic = stack.topic("events")
    consumer = Consumer({"bootstrap.servers": stack.bootstrap, "group.id": stack.env["NEWSREC_APP_ID"],
                         "enable.auto.commit": False})
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        offsets = consumer.committed([TopicPartition(topic, p) for p in partitions], timeout=10)
        return sum(max(tp.offset, 0) for tp in offsets)
    finally:
        consumer.close()


@pytest.mark.integration
def test_refreshes_pending_at_a_crash_are_published_after_a_restart_with_no_new_events(
        stack: Stack, fault_report: Callable[[FaultCounts], None]) -> None:
    started = time.monotonic()
    stack.env.update(FAULT_ENV)
    crashing = stack.start_worker(timeout=READY_S, NEWSREC_FAULT_KILL_BEFORE_PUBLISH="true",
                                  NEWSREC_BATCH_MAX_WAIT_MS=GATHER_MS)
    for user in USERS:
        stack.send(user, 0)
    stack.flush()  # the last event of the test: every producer stops here
    wait_until(lambda: crashing.proc is not None and crashing.proc.poll() is not None, WAIT_S,
               "the injected crash before the publish")
    assert crashing.proc is not None and crashing.proc.returncode == 137, crashing.log_tail()
    assert read_topic(stack.bootstrap, stack.topic("recommendations")) == [], "published before the crash"
    # Every event committed: the successor replays none, so only the pending sweep can publish.
    assert committed_events(stack) == len(USERS)

    worker = stack.start_worker(timeout=READY_S)
    check_nothing_lost("crash-before-publish-no-traffic", stack, worker.url, started, report=fault_report)
    assert counter(worker, "events_applied") == 0  # nothing replayed
    assert counter(worker, "refreshes_recovered") == len(USERS)  # each one found pending in the table


class FailingTopic(Topic):
    """The recommendations topic whose ``fail_at``-th send (1-based) fails, once."""

    def __init__(self, fail_at: int) -> None:
        super().__init__()
        self.fail_at, self.calls = fail_at, 0

    async def send(self, *, key: bytes, value: bytes, partition: int | None = None) -> None:
        self.calls += 1
        if self.calls == self.fail_at:
            raise ConnectionError("broker connection lost mid-batch")
        await super().send(key=key, value=value, partition=partition)


async def test_a_publish_failing_part_way_republishes_every_user_of_the_batch_once() -> None:
    engine = EmbeddedEngine()
    engine.upsert_sync(CORPUS)
    worker = refresher_worker(engine)
    topic = worker.recommendations = FailingTopic(fail_at=3)  # 2 users out, then the failure
    users = [f"u{n}" for n in range(5)]
    for user in users:  # queued before the refresher starts: one batch
        add_event(worker, user, f"{user}-e1", "electric cars")
    task = asyncio.create_task(run_refresher(worker))
    try:
        deadline = time.monotonic() + WAIT_S
        while len(worker.queue) or worker.queue.in_flight or len(topic.sent) < 2 + len(users):
            assert time.monotonic() < deadline, f"published {[r['user_id'] for r in topic.sent]}"
            await asyncio.sleep(0.05)
    finally:
        task.cancel()
        await engine.close()
    published: list[dict[str, Any]] = topic.sent
    before, after = published[:2], published[2:]
    assert worker.metrics.counters["batches_failed"] == 1
    assert {r["user_id"] for r in before} < set(users)  # the failure left part of the batch unpublished
    assert sorted(r["user_id"] for r in after) == sorted(users)  # then each user exactly once more
    assert all(r["trigger_event_id"] == f"{r['user_id']}-e1" for r in published)
