"""Producer library for services that publish user events and news (confluent-kafka).

Idempotent and keyed (user_id / news_id) with the murmur2 partitioner, so one user's
events always reach the same worker shard and per-user order is kept.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from confluent_kafka import KafkaException, Producer

from streams.contracts import NewsArticle, UserEvent
from streams.settings import CommonSettings

log = logging.getLogger(__name__)


class ProduceError(RuntimeError):
    pass


class NewsrecProducer:
    def __init__(self, settings: CommonSettings, **overrides: Any) -> None:
        self.settings = settings
        self._producer = Producer(settings.producer_config() | overrides)
        self._errors: list[str] = []
        self.delivered = 0

    def _on_delivery(self, err: Any, msg: Any) -> None:
        if err is not None:
            self._errors.append(f"{msg.topic()}: {err}")
        else:
            self.delivered += 1

    def _send(self, topic: str, key: str, value: bytes) -> None:
        while True:
            try:
                self._producer.produce(topic, key=key.encode("utf-8"), value=value, on_delivery=self._on_delivery)
                break
            except BufferError:  # local queue full: let deliveries drain
                self._producer.poll(0.1)
        self._producer.poll(0)

    def send_event(self, event: UserEvent) -> None:
        self._send(self.settings.topic_events, event.user_id, event.to_json_bytes())

    def send_article(self, article: NewsArticle) -> None:
        self._send(self.settings.topic_news, article.news_id, article.to_json_bytes())

    def flush(self, timeout: float = 30.0) -> int:
        """Wait for delivery; raises if any record failed. Returns records delivered so far."""
        remaining = self._producer.flush(timeout)
        if remaining:
            raise ProduceError(f"{remaining} records not delivered within {timeout}s")
        if self._errors:
            errors, self._errors = self._errors, []
            raise ProduceError(f"{len(errors)} records failed, first: {errors[0]}")
        return self.delivered

    def __enter__(self) -> NewsrecProducer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.flush()


def read_events_jsonl(path: Path) -> Iterator[UserEvent]:
    """Events from a JSON-lines file; a bad line raises with file:line and the reason."""
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                yield UserEvent.model_validate_json(line)
            except ValueError as exc:
                raise ValueError(f"{path}:{lineno}: invalid event: {exc}") from None


def produce_all(producer: NewsrecProducer, records: Iterable[UserEvent | NewsArticle]) -> int:
    count = 0
    for record in records:
        if isinstance(record, UserEvent):
            producer.send_event(record)
        else:
            producer.send_article(record)
        count += 1
    producer.flush()
    return count


def ensure_topics(settings: CommonSettings, extra: Iterable[str] = ()) -> None:
    """Create the contract topics if missing (news and recommendations compacted)."""
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient(settings.kafka_config())
    compacted = {"cleanup.policy": "compact"}
    wanted = {
        settings.topic_events: {}, settings.topic_dlq: {}, settings.topic_news: compacted,
        settings.topic_recommendations: compacted, **{t: {} for t in extra},
    }
    existing = set(admin.list_topics(timeout=10).topics)
    new = [NewTopic(t, num_partitions=settings.topic_partitions, replication_factor=-1, config=cfg)
           for t, cfg in wanted.items() if t not in existing]
    if settings.topic_model_updates not in existing:
        new.append(NewTopic(settings.topic_model_updates, num_partitions=1, replication_factor=-1))
    for topic, future in (admin.create_topics(new) if new else {}).items():
        try:
            future.result(timeout=10)
        except KafkaException as exc:
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise
        log.info("created topic %s", topic)
