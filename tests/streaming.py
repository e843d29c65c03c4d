"""A worker stack on the real local broker for integration and fault tests.

Clients here know only the README contracts (topic names, JSON values, key = user_id).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, Producer

from index.corpus import read_mind_news
from streams.demo import demo_corpus
from streams.stack import WorkerProcess, get_json

CORPUS = list(read_mind_news(demo_corpus()))
CORPUS_IDS = {a.news_id for a in CORPUS}
TEXTS = ["electric car battery range", "nba playoff injury report", "easy pasta recipe", "stock market rally",
         "cheap flights europe", "marathon training plan", "hurricane forecast coast", "new smartphone launch"]


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


def consume(bootstrap: str, topic: str, until: Callable[[list], bool], timeout: float = 90.0) -> list:
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


def window_ids(url: str, user: str) -> list[str] | None:
    """The event ids in ``user``'s window as the worker at ``url`` serves it (None: unknown user)."""
    try:
        return [s["event_id"] for s in get_json(f"{url}/users/{user}")["signals"]]
    except OSError:
        return None
