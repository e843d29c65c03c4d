"""Keep a search index fed from the ``news-articles`` topic.

Two shells around one loop: :class:`IndexFollower` (a worker's embedded index: reads the
whole topic from the beginning on every start, no consumer group, so it is complete
after a restart) and :func:`run_indexer` (``newsrec index``: a consumer group writing into
Elasticsearch, committing only after a bulk write succeeded).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

from index.base import SearchEngine
from streams.contracts import NewsArticle

log = logging.getLogger(__name__)

BATCH = 500


def decode_articles(messages: Sequence[Any]) -> tuple[list[NewsArticle], int]:
    """Valid articles (latest per news_id wins) and the number of unusable records."""
    latest: dict[str, NewsArticle] = {}
    bad = 0
    for msg in messages:
        if msg.error() is not None:
            continue
        try:
            article = NewsArticle.model_validate_json(msg.value() or b"")
        except ValueError as exc:
            bad += 1
            log.warning("skipping invalid article at %s[%d]@%d: %s", msg.topic(), msg.partition(), msg.offset(),
                        str(exc)[:200])
            continue
        latest[article.news_id] = article
    return list(latest.values()), bad


class IndexFollower:
    """Tails the news topic into an in-process engine from a background thread."""

    def __init__(self, consumer_config: dict[str, Any], topic: str,
                 upsert: Callable[[list[NewsArticle]], int]) -> None:
        # Partitions are assigned by hand (no group membership); group.id is only required.
        self._conf = consumer_config | {"enable.auto.commit": False, "enable.partition.eof": True}
        self._topic = topic
        self._upsert = upsert
        self._stop = threading.Event()
        self.caught_up = threading.Event()
        self.indexed = 0
        self.invalid = 0
        self._thread = threading.Thread(target=self._run, name="index-follower", daemon=True)

    def start(self) -> IndexFollower:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def wait_caught_up(self, timeout: float) -> bool:
        return self.caught_up.wait(timeout)

    def _run(self) -> None:
        consumer = Consumer(self._conf)
        try:
            meta = consumer.list_topics(self._topic, timeout=10).topics[self._topic]
            partitions = sorted(meta.partitions)
            consumer.assign([TopicPartition(self._topic, p, OFFSET_BEGINNING) for p in partitions])
            at_eof: set[int] = set()
            while not self._stop.is_set():
                messages = consumer.consume(BATCH, timeout=0.5)
                for msg in messages:
                    if msg.error() is not None and msg.error().code() == KafkaError._PARTITION_EOF:
                        at_eof.add(msg.partition())
                articles, bad = decode_articles(messages)
                self.invalid += bad
                if articles:
                    self.indexed += self._upsert(articles)
                if len(at_eof) == len(partitions) and not self.caught_up.is_set():
                    log.info("news index caught up: %d articles", self.indexed)
                    self.caught_up.set()
        except Exception:
            log.exception("index follower stopped")
            raise
        finally:
            consumer.close()


async def run_indexer(consumer_config: dict[str, Any], topic: str, engine: SearchEngine, *,
                      stop: asyncio.Event | None = None, idle_exit_s: float | None = None) -> int:
    """Consume news into ``engine`` until ``stop`` (or ``idle_exit_s`` without news once
    partitions are assigned). Returns the number of articles written."""
    consumer = Consumer(consumer_config | {"enable.auto.commit": False})
    assigned = threading.Event()
    consumer.subscribe([topic], on_assign=lambda _c, _parts: assigned.set())
    loop = asyncio.get_running_loop()
    total, last_data = 0, time.monotonic()
    try:
        while not (stop and stop.is_set()):
            messages = await loop.run_in_executor(None, lambda: consumer.consume(BATCH, timeout=0.5))
            articles, _ = decode_articles(messages)
            if articles:
                total += await engine.upsert(articles)
            if messages:
                last_data = time.monotonic()
                consumer.commit(asynchronous=False)
                log.info("indexed %d articles", total)
            elif not assigned.is_set():
                last_data = time.monotonic()
            elif idle_exit_s is not None and time.monotonic() - last_data > idle_exit_s:
                break
    finally:
        consumer.close()
    return total
