"""A worker stack on the real local broker for integration and fault tests.

Clients here know only the README contracts (topic names, JSON values, key = user_id).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Self

from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from index.corpus import read_mind_news
from streams.contracts import parse_event
from streams.settings import WorkerSettings
from streams.window import UserState, apply_event
from tools.demo import demo_corpus
from tools.stack import WorkerProcess, get_json

CORPUS = list(read_mind_news(demo_corpus()))
CORPUS_IDS = {a.news_id for a in CORPUS}
TEXTS = ["electric car battery range", "nba playoff injury report", "easy pasta recipe", "stock market rally",
         "cheap flights europe", "marathon training plan", "hurricane forecast coast", "new smartphone launch"]

# Fault tests: the window keeps every event of the run, so "in state" can count each one.
FAULT_ENV = {"NEWSREC_WINDOW_MAX_SIGNALS": "1000", "NEWSREC_REFRESH_MIN_INTERVAL_S": "0.5"}
READY_S = 120.0  # a (re)started worker is ready in ~10-15 s; much more on a loaded CI machine
# Deadlines are generous (a loaded 2-core CI box is slow, never wrong); HTTP answers slower
# than HTTP_TIMEOUT_S count as "not yet" and the poll goes on until its deadline.
WAIT_S = 120.0
HTTP_TIMEOUT_S = 10.0


def stack_env(bootstrap: str, model_dir: Path, name: str, state_dir: Path) -> dict[str, str]:
    """Worker settings with topics unique to ``name``."""
    return {
        "NEWSREC_KAFKA_BOOTSTRAP": bootstrap, "NEWSREC_BROKER_PROFILE": "local",
        "NEWSREC_MODEL_DIR": str(model_dir), "NEWSREC_STATE_DIR": str(state_dir),
        "NEWSREC_APP_ID": f"{name}-worker", "NEWSREC_SEARCH_ENGINE": "embedded",
        "NEWSREC_TOPIC_EVENTS": f"{name}-user-events", "NEWSREC_TOPIC_NEWS": f"{name}-news-articles",
        "NEWSREC_TOPIC_RECOMMENDATIONS": f"{name}-recommendations",
        "NEWSREC_TOPIC_DLQ": f"{name}-user-events-dlq", "NEWSREC_TOPIC_MODEL_UPDATES": f"{name}-mu",
        "NEWSREC_REFRESH_MIN_INTERVAL_S": "0.5", "NEWSREC_MAX_NEW_TOKENS": "16",
    }


class Stack:
    """News published, workers started on demand (stopped by :meth:`close`)."""

    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        self.env, self.log_dir = env, log_dir
        self.producer = Producer({"bootstrap.servers": env["NEWSREC_KAFKA_BOOTSTRAP"],
                                  "partitioner": "murmur2_random"})
        self.workers: list[WorkerProcess] = []
        self.sent: dict[str, list[str]] = {}  # user -> event ids, in send order
        self.events: dict[str, list[dict]] = {}  # user -> events, in send order

    def __getitem__(self, key: str) -> Any:  # the pipeline tests' dict-style access
        return {"env": self.env, "producer": self.producer, "start_worker": self.start_worker}[key]

    @property
    def bootstrap(self) -> str:
        return self.env["NEWSREC_KAFKA_BOOTSTRAP"]

    def topic(self, what: str) -> str:
        return self.env[f"NEWSREC_TOPIC_{what.upper()}"]

    def publish_news(self) -> None:
        for a in CORPUS:
            self.producer.produce(self.topic("news"), key=a.news_id, value=a.model_dump_json())
        assert self.producer.flush(30) == 0

    def start_worker(self, *, wait: bool = True, timeout: float = 120.0, **extra_env: str) -> WorkerProcess:
        w = WorkerProcess(self.env | extra_env, self.log_dir / f"worker{len(self.workers)}.log").start()
        self.workers.append(w)
        if wait:
            w.wait_ready(documents=len(CORPUS), timeout=timeout)
        return w

    def send(self, user: str, i: int, text: str | None = None, **kw: object) -> dict:
        ev = event(user, i, text if text is not None else TEXTS[(hash(user) + i) % len(TEXTS)], **kw)
        self.producer.produce(self.topic("events"), key=user, value=json.dumps(ev))
        self.sent.setdefault(user, []).append(ev["event_id"])
        self.events.setdefault(user, []).append(ev)
        return ev

    def flush(self) -> None:
        assert self.producer.flush(30) == 0

    def close(self) -> None:
        for w in self.workers:
            w.stop()


def event(user: str, i: int, text: str, **kw: object) -> dict:
    base = {"event_id": f"{user}-e{i}", "user_id": user,
            "ts": (datetime(2026, 11, 1, tzinfo=UTC) + timedelta(minutes=i)).isoformat(),
            "domain": ("search", "browse", "app")[i % 3], "text": text, "url": None, "news_id": None, "meta": {}}
    return base | kw


def consume(bootstrap: str, topic: str, until: Callable[[list], bool], timeout: float = WAIT_S) -> list:
    """(key, JSON value) records from the start of ``topic`` until ``until(records)`` or the timeout."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"test-{uuid.uuid4().hex[:6]}",
                         "auto.offset.reset": "earliest", "session.timeout.ms": 6000})
    consumer.subscribe([topic])
    got: list = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and not until(got):
            for msg in consumer.consume(100, timeout=0.5):
                if msg.error() is None:
                    got.append((msg.key(), json.loads(msg.value())))
    finally:
        consumer.close()
    return got


def latest_by_user(records: list) -> dict[str, dict]:
    return {value["user_id"]: value for _, value in records}


def poll_json(url: str) -> Any | None:
    """One GET of a polling loop: the JSON answer, or None when it fails or is slow (not yet)."""
    try:
        return get_json(url, timeout=HTTP_TIMEOUT_S)
    except (OSError, ValueError):  # refused, 404/503, timed out, half-written body
        return None


def wait_until(predicate: Callable[[], object], timeout: float, what: str) -> None:
    """Poll ``predicate`` until it is true; a failed or slow HTTP answer inside it (OSError,
    ValueError, KeyError, TypeError) counts as "not yet". Raises AssertionError at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if predicate():
                return
        except (OSError, ValueError, KeyError, TypeError):
            pass
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f}s waiting for {what}"
        time.sleep(0.3)


def window_ids(url: str, user: str) -> list[str] | None:
    """The event ids in ``user``'s window as the worker at ``url`` serves it (None: unknown user or no answer)."""
    window = served_window(url, user)
    return None if window is None else [s["event_id"] for s in window]


# -- fault tests: traffic that keeps flowing, and what "nothing lost" means ----------------
class Traffic:
    """Background events: every ``interval_s`` one round (the next event of every user),
    flushed before the next, so events keep flowing through crashes and restarts.
    Use as a context manager; a send that fails is raised by :meth:`stop`."""

    def __init__(self, stack: Stack, users: Iterable[str], interval_s: float = 1.0, *, first_round: int = 0) -> None:
        self.stack, self.users, self.interval_s = stack, list(users), interval_s
        self.first_round = self.rounds = first_round  # a round's number is its events' index
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="traffic", daemon=True)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                for user in self.users:
                    self.stack.send(user, self.rounds)
                self.stack.flush()
                self.rounds += 1
                self._stop.wait(self.interval_s)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread by stop()
            self._error = exc

    def wait_rounds(self, rounds: int, timeout: float = WAIT_S) -> None:
        deadline = time.monotonic() + timeout
        while self.rounds < rounds and self._thread.is_alive():
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {self.rounds} of {rounds} rounds sent within {timeout}s")
            time.sleep(0.1)

    def stop(self) -> int:
        """Stop after the round in progress; returns the number of events it sent."""
        self._stop.set()
        self._thread.join(60)
        if self._error is not None:
            raise self._error
        assert not self._thread.is_alive(), "traffic thread did not stop"
        return (self.rounds - self.first_round) * len(self.users)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def worker_settings(env: dict[str, str]) -> WorkerSettings:
    """The settings a worker started with ``env`` runs on."""
    return WorkerSettings(**{k.removeprefix("NEWSREC_").lower(): v for k, v in env.items() if k.startswith("NEWSREC_")})


def expected_window(events: list[dict], settings: WorkerSettings) -> list[dict]:
    """The window's signals a fault-free worker builds: each event applied once, in send order."""
    state = UserState()
    for ev in events:
        state = apply_event(state, parse_event(json.dumps(ev).encode()), 0, max_signals=settings.window_max_signals,
                            max_age_s=settings.window_max_age_s, clicked_memory=settings.clicked_memory)
    return [s.to_json() for s in state.signals]


def served_window(url: str, user: str) -> list[dict] | None:
    """``user``'s window signals as the worker at ``url`` serves them (None: unknown user or no answer)."""
    answer = poll_json(f"{url}/users/{user}")
    return answer.get("signals") if isinstance(answer, dict) else None


def wait_for_windows(url: str, expected: dict[str, list[dict]], timeout: float = WAIT_S) -> dict[str, list[dict] | None]:
    """Poll until every user's served window equals ``expected`` (or the timeout); the last answers."""
    deadline = time.monotonic() + timeout
    while True:
        served = {user: served_window(url, user) for user in expected}
        if served == expected or time.monotonic() > deadline:
            return served
        time.sleep(0.5)


def read_topic(bootstrap: str, topic: str, *, idle_s: float = 2.0, timeout: float = WAIT_S) -> list:
    """Every (key, JSON value) in ``topic``, read from the start until nothing arrives for ``idle_s``.

    Assigned by hand (no group join to wait for) and ended by idleness, not by end offsets,
    which the local broker can report too low."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"read-{uuid.uuid4().hex[:6]}",
                         "enable.auto.commit": False, "fetch.wait.max.ms": 10})
    got: list = []
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        deadline = time.monotonic() + timeout
        last = time.monotonic()
        while time.monotonic() - last < idle_s and time.monotonic() < deadline:
            for msg in consumer.consume(500, timeout=0.2):
                if msg.error() is None:
                    got.append((msg.key(), json.loads(msg.value())))
                    last = time.monotonic()
    finally:
        consumer.close()
    return got


def wait_for_triggers(bootstrap: str, topic: str, triggers: set[str], timeout: float = WAIT_S) -> Counter[str]:
    """How often each trigger_event_id was published to ``topic``, once every one of
    ``triggers`` is there (or at the timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        published = Counter(value["trigger_event_id"] for _, value in read_topic(bootstrap, topic, idle_s=1.0))
        if triggers <= published.keys() or time.monotonic() > deadline:
            return published
        time.sleep(0.5)


@dataclass(frozen=True)
class FaultCounts:
    """One fault scenario's outcome, as reported in the issue."""

    scenario: str
    events_sent: int
    events_in_state: int  # sent events found in the served windows at the end
    recommendations: int  # records on the recommendations topic
    duplicates: int  # records whose trigger_event_id was published before
    dlq: int
    seconds: float

    def line(self) -> str:
        return (f"{self.scenario}: {self.events_sent} events sent, {self.events_in_state} in state, "
                f"{self.recommendations} recommendations published ({self.duplicates} duplicates), "
                f"{self.dlq} dead letters, {self.seconds:.0f} s")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def fault_counts(scenario: str, events: dict[str, list[dict]], served: dict[str, list[dict] | None],
                 published: Counter[str], dlq: int, started: float) -> FaultCounts:
    """The counts as measured: ``events`` sent per user, the ``served`` windows, how often each
    trigger was ``published``, the ``dlq`` records read back."""
    sent = {ev["event_id"] for evs in events.values() for ev in evs}
    in_state = sum(len(sent & {s["event_id"] for s in window or []}) for window in served.values())
    return FaultCounts(scenario, sum(len(evs) for evs in events.values()), in_state, sum(published.values()),
                       sum(n - 1 for n in published.values()), dlq, round(time.monotonic() - started, 1))


def counter(worker: WorkerProcess, name: str) -> int:
    """One of the worker's /stats counters (0 while it does not answer)."""
    answer = poll_json(f"{worker.url}/stats")
    return int(answer.get("counters", {}).get(name, 0)) if isinstance(answer, dict) else 0


def wait_busy(worker: WorkerProcess, events: int, timeout: float = WAIT_S) -> None:
    """Until the worker has applied ``events`` events and published a recommendation since it
    started, so a fault lands while it is consuming and refreshing, not while idle."""
    deadline = time.monotonic() + timeout
    while counter(worker, "events_applied") < events or counter(worker, "recommendations_out") < 1:
        assert time.monotonic() < deadline, f"worker not busy within {timeout}s:\n{worker.log_tail()}"
        time.sleep(0.2)


def check_nothing_lost(scenario: str, stack: Stack, url: str, started: float, *, timeout: float = WAIT_S,
                       report: Callable[[FaultCounts], None] = print) -> FaultCounts:
    """Assert that nothing sent through ``stack`` was lost, reading state through the worker at
    ``url``, and return the scenario's counts. For every user:
    - the served window equals the one a fault-free run builds (apply_event over the sent
      events, in order) and holds every sent event (none skipped);
    - the user's last event has a published recommendation with it as trigger_event_id
      (at-least-once: every triggered refresh is eventually published; duplicates are counted);
    and nothing was dead-lettered (every event sent was valid). The counts go to ``report``
    before the assertions, so a failing run reports them too."""
    settings = worker_settings(stack.env)
    expected = {user: expected_window(events, settings) for user, events in stack.events.items()}
    served = wait_for_windows(url, expected, timeout=timeout)
    last = {user: ids[-1] for user, ids in stack.sent.items()}
    published = wait_for_triggers(stack.bootstrap, stack.topic("recommendations"), set(last.values()), timeout)
    dlq = read_topic(stack.bootstrap, stack.topic("dlq"))
    counts = fault_counts(scenario, stack.events, served, published, len(dlq), started)
    report(counts)

    for user, sent in stack.sent.items():
        ids = [s["event_id"] for s in served[user] or []]
        assert ids and sorted(ids) == sorted(sent), f"{user}: events skipped or unknown: {ids}"
        assert served[user] == expected[user], f"{user}: window differs from the fault-free one"
    missing = {user: event_id for user, event_id in last.items() if event_id not in published}
    assert not missing, f"last events never got a recommendation: {missing}"
    assert dlq == [], f"valid events were dead-lettered: {dlq[:3]}"
    assert counts.events_in_state == counts.events_sent
    return counts


# -- the same scenarios on either search engine ------------------------------------------
ENGINES = ("embedded", "elasticsearch")


def use_engine(stack: Stack, engine: str, es_url: str | None = None) -> str:
    """Point the stack's workers at ``engine``; for Elasticsearch (``es_url``) first index the
    stack's news there with `newsrec index` (the production path), under an alias of its own.
    Returns the suffix of the scenario names ("" or "-es")."""
    if engine == "embedded":
        return ""
    assert es_url, "the elasticsearch variant needs the es_url fixture"
    stack.env.update({"NEWSREC_SEARCH_ENGINE": "elasticsearch", "NEWSREC_ES_URL": es_url,
                      "NEWSREC_ES_ALIAS": f"{stack.env['NEWSREC_APP_ID']}-news"})
    indexed = subprocess.run([sys.executable, "-m", "commands.cli", "index", "--exit-when-idle", "2"],
                             env=os.environ | stack.env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             timeout=WAIT_S, check=False)
    assert indexed.returncode == 0 and f"stopped after {len(CORPUS)} articles" in indexed.stdout, indexed.stdout[-2000:]
    return "-es"


# --- in-process refresher tests (no broker): queue one event the way on_event does ----------

def add_event(worker: Any, user: str, event_id: str, text: str | None = None, news_id: str | None = None) -> None:
    """Apply one event to ``worker``'s users table and schedule the user's refresh."""
    from streams.contracts import UserEvent

    ev = UserEvent(event_id=event_id, user_id=user, ts=datetime.now(UTC),
                   domain="news_click" if news_id else "search", text=text or f"signal {event_id}", news_id=news_id)
    state = apply_event(UserState.from_json(worker.users.get(user)), ev, 0, max_signals=10, max_age_s=1e6,
                        clicked_memory=10)
    worker.users[user] = state.to_json()
    worker.queue.schedule(user, event_id, 0, time.monotonic())
    worker.wakeup.set()


async def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Until ``predicate()`` holds (asyncio; fails after ``timeout`` seconds)."""
    import asyncio

    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)
