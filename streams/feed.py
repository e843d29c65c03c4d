"""Keep a search index fed from the ``news-articles`` topic (key = news_id).

A record is an article to insert or replace, or a tombstone (null value) that removes its
key's article. A record that is neither (bad JSON, a key that is not its news_id, a keyless
tombstone) goes to the dead-letter topic with the reason, when a :class:`DeadLetters` is
given, and is logged either way; it never stops the feed.

Two shells around one decoding step: :class:`IndexFollower` (a worker's embedded index:
reads the whole topic from the beginning on every start, no consumer group, so it is
complete after a restart; it therefore dead-letters a bad record again on each start, the
letter's topic/partition/offset telling the copies apart) and :func:`run_indexer`
(``newsrec index``: a consumer group writing into Elasticsearch, committing offsets only
after the write and the dead letters of a batch succeeded, so a crash replays the batch).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Producer, TopicPartition

from index.base import SearchEngine
from streams.contracts import NewsArticle, dead_letter
from streams.kafka_log import with_logger

log = logging.getLogger(__name__)

BATCH = 500
REASON_CHARS = 500


@dataclass
class NewsBatch:
    """One consumed batch, decoded: the last operation per news_id wins."""

    upserts: list[NewsArticle] = field(default_factory=list)
    deletes: list[str] = field(default_factory=list)
    invalid: list[tuple[Any, str]] = field(default_factory=list)  # (message, reason)


def decode_record(key: bytes | None, value: bytes | None) -> tuple[str, NewsArticle | None]:
    """(news_id, article), or (news_id, None) for a tombstone; ``ValueError`` with the reason."""
    try:
        news_id = key.decode("utf-8") if key else ""
    except UnicodeDecodeError:
        news_id = ""
    if value is None:
        if not news_id:
            raise ValueError("tombstone (null value) without a UTF-8 news_id key: nothing to delete")
        return news_id, None
    try:
        article = NewsArticle.model_validate_json(value)
    except ValueError as exc:  # pydantic's ValidationError, on one line
        raise ValueError(" ".join(str(exc).split())[:REASON_CHARS]) from None
    if article.news_id != news_id:
        raise ValueError(f"record key must equal news_id {article.news_id!r} (UTF-8): deletions find articles by key")
    return news_id, article


def decode_news(messages: Sequence[Any]) -> NewsBatch:
    latest: dict[str, NewsArticle | None] = {}
    batch = NewsBatch()
    for msg in messages:
        if msg.error() is not None:
            continue
        try:
            news_id, article = decode_record(msg.key(), msg.value())
        except ValueError as exc:
            log.warning("invalid news record at %s[%d]@%d: %s", msg.topic(), msg.partition(), msg.offset(), exc)
            batch.invalid.append((msg, str(exc)))
            continue
        latest.pop(news_id, None)  # re-inserted: dict order is the order of the last operations
        latest[news_id] = article
    batch.upserts = [a for a in latest.values() if a is not None]
    batch.deletes = [news_id for news_id, a in latest.items() if a is None]
    return batch


class DeadLetters:
    """Unusable news records to the dead-letter topic, with the reason (a confluent-kafka producer)."""

    def __init__(self, producer_config: dict[str, Any], topic: str) -> None:
        self._producer = Producer(with_logger(producer_config))
        self.topic = topic
        self.sent = 0

    def send(self, invalid: Sequence[tuple[Any, str]], timeout: float = 30.0) -> None:
        """Send and wait for every letter; raises if one is not acknowledged."""
        for msg, reason in invalid:
            letter = dead_letter(msg.value() or b"", reason, topic=msg.topic(), partition=msg.partition(),
                                 offset=msg.offset())
            self._producer.produce(self.topic, key=msg.key(), value=letter.to_json_bytes())
        if invalid and (left := self._producer.flush(timeout)):
            raise RuntimeError(f"{left} dead letters not acknowledged by {self.topic} within {timeout}s")
        self.sent += len(invalid)


class IndexFollower:
    """Tails the news topic into an in-process engine from a background thread."""

    def __init__(self, consumer_config: dict[str, Any], topic: str,
                 upsert: Callable[[list[NewsArticle]], int], *, delete: Callable[[list[str]], None] | None = None,
                 dead_letters: DeadLetters | None = None) -> None:
        # Partitions are assigned by hand (no group membership); group.id is only required.
        self._conf = consumer_config | {"enable.auto.commit": False, "enable.partition.eof": True}
        self._topic = topic
        self._upsert = upsert
        self._delete = delete
        self._dead_letters = dead_letters
        self._stop = threading.Event()
        self.caught_up = threading.Event()
        self.indexed = 0
        self.deleted = 0
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
        consumer = Consumer(with_logger(self._conf))
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
                self._apply(decode_news(messages))
                if len(at_eof) == len(partitions) and not self.caught_up.is_set():
                    log.info("news index caught up: %d articles", self.indexed)
                    self.caught_up.set()
        except Exception:
            log.exception("index follower stopped")
            raise
        finally:
            consumer.close()

    def _apply(self, batch: NewsBatch) -> None:
        if batch.upserts:
            self.indexed += self._upsert(batch.upserts)
        if batch.deletes and self._delete is None:
            log.warning("%d tombstones not applied: the follower was given no delete", len(batch.deletes))
        elif batch.deletes:
            self._delete(batch.deletes)
            self.deleted += len(batch.deletes)
        self.invalid += len(batch.invalid)
        if self._dead_letters is not None:
            self._dead_letters.send(batch.invalid)


async def run_indexer(consumer_config: dict[str, Any], topic: str, engine: SearchEngine, *,
                      dead_letters: DeadLetters | None = None, stop: asyncio.Event | None = None,
                      idle_exit_s: float | None = None) -> int:
    """Consume news into ``engine`` until ``stop`` (or ``idle_exit_s`` without news once
    partitions are assigned). Returns the number of articles written. A batch's offsets are
    committed after its writes, deletions and dead letters succeeded: a failure or a crash
    before that replays the batch (writes are idempotent by news_id)."""
    consumer = Consumer(with_logger(consumer_config) | {"enable.auto.commit": False})
    assigned = threading.Event()
    consumer.subscribe([topic], on_assign=lambda _c, _parts: assigned.set())
    loop = asyncio.get_running_loop()
    total, last_data = 0, time.monotonic()
    try:
        while not (stop and stop.is_set()):
            messages = await loop.run_in_executor(None, lambda: consumer.consume(BATCH, timeout=0.5))
            batch = decode_news(messages)
            if batch.upserts:
                total += await engine.upsert(batch.upserts)
            if batch.deletes:
                await engine.delete(batch.deletes)
            if batch.invalid and dead_letters is not None:
                await loop.run_in_executor(None, dead_letters.send, batch.invalid)
            if messages:
                last_data = time.monotonic()
                consumer.commit(asynchronous=False)
                log.info("indexed %d articles (%d deleted, %d invalid in the last batch)", total,
                         len(batch.deletes), len(batch.invalid))
            elif not assigned.is_set():
                last_data = time.monotonic()
            elif idle_exit_s is not None and time.monotonic() - last_data > idle_exit_s:
                break
    finally:
        consumer.close()
    return total
