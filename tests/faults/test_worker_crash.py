"""Worker crash: kill -9 mid-stream, restart, and nothing is lost.

"Nothing lost" is :func:`tests.streaming.check_nothing_lost`: every user's served window equals
the fault-free one and holds every sent event, every user's last event gets a recommendation
(at-least-once; duplicates counted), nothing dead-lettered.

Real parts only: the local broker, `newsrec worker` processes, confluent-kafka clients.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from tests.streaming import (
    CORPUS,
    ENGINES,
    FAULT_ENV,
    READY_S,
    FaultCounts,
    Stack,
    Traffic,
    check_nothing_lost,
    served_window,
    use_engine,
    wait_busy,
)
from tools.stack import WorkerProcess, get_json

pytestmark = pytest.mark.integration

USERS = [f"crash-{n}" for n in range(12)]


# Also with NEWSREC_ES_URL: the Elasticsearch engine (the session's search server) under the same crashes.
@pytest.mark.parametrize("engine", ENGINES)
def test_repeated_kill_9_of_the_only_worker_loses_nothing(
        stack: Stack, engine: str, request: pytest.FixtureRequest, fault_report: Callable[[FaultCounts], None]) -> None:
    started = time.monotonic()
    stack.env.update(FAULT_ENV)
    suffix = use_engine(stack, engine, request.getfixturevalue("es_url") if engine == "elasticsearch" else None)
    kills = 3
    worker = stack.start_worker(timeout=READY_S)
    with Traffic(stack, USERS, interval_s=1.0) as traffic:
        for _ in range(kills):
            wait_busy(worker, len(USERS))
            worker.kill()  # SIGKILL: no commit, no flush, refreshes in flight
            worker = stack.start_worker(timeout=READY_S)
        wait_busy(worker, len(USERS))
        traffic.wait_rounds(traffic.rounds + 2)  # some events reach only the last worker
    counts = check_nothing_lost(f"worker-kill-9-x3{suffix}", stack, worker.url, started, report=fault_report)
    assert counts.events_sent >= (kills + 1) * len(USERS)


class MisroutedError(AssertionError):
    """GET /users/{user} answered 404 on both workers for a user that has a window."""


def test_survivor_takes_over_a_killed_workers_partitions(
        stack: Stack, fault_report: Callable[[FaultCounts], None]) -> None:
    started = time.monotonic()
    stack.env.update(FAULT_ENV)
    # Two workers of one app (same NEWSREC_APP_ID), each with its own web port.
    survivor, victim = (stack.start_worker(wait=False) for _ in range(2))
    for w in (survivor, victim):
        w.wait_ready(documents=len(CORPUS), timeout=READY_S)
    with Traffic(stack, USERS, interval_s=1.0) as traffic:
        traffic.wait_rounds(3)
        total = wait_both_own_partitions(survivor, victim)
        # GET /users/{user} on either worker answers for every user: the one that does not
        # own the user's partition routes the request to the one that does (table_route).
        unrouted = wait_both_answer(survivor.url, victim.url)
        wait_busy(victim, len(USERS))
        victim.kill()
        killed_at = time.monotonic()
        # The survivor owns every partition after the rebalance (~14 s on the local broker),
        # while events for the victim's partitions keep coming.
        wait_assigned(survivor, total, timeout=60)
        print(f"survivor holds all {total} partitions {time.monotonic() - killed_at:.1f} s after the kill")
        traffic.wait_rounds(traffic.rounds + 2)
    check_nothing_lost("two-workers-one-killed", stack, survivor.url, started, report=fault_report)
    if unrouted:
        raise MisroutedError(f"{len(unrouted)}/{len(USERS)} users answered 404 on both workers: {unrouted}")


def assigned(worker: WorkerProcess) -> int:
    """Partitions the worker holds (all topics), 0 while it is not ready (e.g. rebalancing)."""
    try:
        return int(get_json(f"{worker.url}/health").get("assigned_partitions", 0))
    except (OSError, ValueError):
        return 0  # 503 while rebalancing


def wait_assigned(worker: WorkerProcess, partitions: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while assigned(worker) < partitions:
        held = assigned(worker)
        assert time.monotonic() < deadline, f"survivor holds {held}/{partitions} partitions:\n{worker.log_tail()}"
        time.sleep(0.5)


def wait_both_own_partitions(a: WorkerProcess, b: WorkerProcess, timeout: float = 60.0) -> int:
    """Until both workers are ready with partitions (no rebalance under way); the number they
    hold together, i.e. all of the app's partitions."""
    deadline = time.monotonic() + timeout
    while not all(counts := (assigned(a), assigned(b))):
        assert time.monotonic() < deadline, f"partitions not shared: {counts}"
        time.sleep(0.5)
    return sum(counts)


def wait_both_answer(url_a: str, url_b: str, timeout: float = 15.0) -> list[str]:
    """Users that at least one of the two workers serves no window for, once there are none or
    at the timeout. Without routing, the worker that does not own a user's partition has no
    row for it (no standby replicas) and answers 404."""
    deadline = time.monotonic() + timeout
    while True:
        missing = [u for u in USERS if not (served_window(url_a, u) and served_window(url_b, u))]
        if not missing or time.monotonic() > deadline:
            return missing
        time.sleep(0.5)
