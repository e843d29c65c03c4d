"""Producer library for services that publish user events and news (confluent-kafka).

Idempotent and keyed (user_id / news_id) with the murmur2 partitioner, so one user's
events always reach the same worker shard and per-user order is kept.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from confluent_kafka import KafkaException, Producer

# _parse_row: one MIND row -> NewsArticle (CorpusError naming the reason), as read_mind_news does.
from index.corpus import CorpusError, ReadStats, read_rows
from index.corpus import _parse_row as parse_mind_row
from streams.contracts import DeadLetter, NewsArticle, UserEvent, dead_letter, parse_event
from streams.kafka_log import BrokerRefused, require_broker, with_logger
from streams.settings import CommonSettings

log = logging.getLogger(__name__)


class ProduceError(RuntimeError):
    pass


class NewsrecProducer:
    def __init__(self, settings: CommonSettings, **overrides: Any) -> None:
        self.settings = settings
        self._producer = Producer(with_logger(settings.producer_config()) | overrides)
        self._errors: list[str] = []
        self.delivered = 0

    def _on_delivery(self, err: Any, msg: Any) -> None:
        if err is not None:
            self._errors.append(f"{msg.topic()}: {err}")
        else:
            self.delivered += 1

    def _send(self, topic: str, key: str | None, value: bytes) -> None:
        while True:
            try:
                self._producer.produce(topic, key=None if key is None else key.encode("utf-8"), value=value,
                                       on_delivery=self._on_delivery)
                break
            except BufferError:  # local queue full: let deliveries drain
                self._producer.poll(0.1)
        self._producer.poll(0)

    def send_event(self, event: UserEvent) -> None:
        self._send(self.settings.topic_events, event.user_id, event.to_json_bytes())

    def send_article(self, article: NewsArticle) -> None:
        self._send(self.settings.topic_news, article.news_id, article.to_json_bytes())

    def send(self, record: UserEvent | NewsArticle) -> None:
        if isinstance(record, UserEvent):
            self.send_event(record)
        else:
            self.send_article(record)

    def send_dead_letter(self, letter: DeadLetter, key: str | None = None) -> None:
        self._send(self.settings.topic_dlq, key, letter.to_json_bytes())

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


@dataclass(slots=True)
class FileRecord:
    """One non-blank line of an input file: the record, or why it cannot be one."""

    line: int
    raw: bytes
    record: UserEvent | NewsArticle | None
    error: str | None


def _event_row(raw: bytes, path: Path, line: int) -> FileRecord:
    try:
        return FileRecord(line, raw, parse_event(raw), None)
    except ValueError as exc:
        return FileRecord(line, raw, None, str(exc))


def _news_row(raw: bytes, path: Path, line: int) -> FileRecord:
    try:
        return FileRecord(line, raw, parse_mind_row(raw, path, line), None)
    except CorpusError as exc:
        return FileRecord(line, raw, None, exc.reason)


def read_file_records(path: Path, kind: Literal["events", "news"]) -> Iterator[FileRecord]:
    """Every non-blank line of a JSON-lines events file or a MIND news.tsv, validated."""
    yield from read_rows(path, _event_row if kind == "events" else _news_row, errors="raise", stats=ReadStats())


@dataclass(slots=True)
class ProduceReport:
    """What ``produce_file`` did with a file; ``rejected`` keeps the first few reasons."""

    path: Path
    kind: str
    sent: int = 0
    dead_lettered: int = 0
    skipped: int = 0  # valid records not sent (--strict with invalid ones in the file)
    invalid: int = 0
    rejected: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"{self.path}: sent {self.sent} {self.kind} records, dead-lettered {self.dead_lettered}, "
                f"skipped {self.skipped}")


def produce_file(producer: NewsrecProducer, path: Path, kind: Literal["events", "news"], *,
                 strict: bool = False, keep_reasons: int = 5) -> ProduceReport:
    """Send every valid record of ``path`` and dead-letter each invalid one with file:line and
    the reason; ``strict`` checks the whole file first and sends nothing if any line is bad."""
    report = ProduceReport(path, kind)
    target = producer.settings.topic_events if kind == "events" else producer.settings.topic_news
    if strict:
        for row in read_file_records(path, kind):
            if row.error is None:
                report.skipped += 1
            else:
                _count_invalid(report, path, row, keep_reasons)
        if report.invalid:
            return report
        report.skipped = 0
    for row in read_file_records(path, kind):
        if row.record is not None:
            producer.send(row.record)
            report.sent += 1
            continue
        reason = _count_invalid(report, path, row, keep_reasons)
        # Never on a topic: partition and offset -1; error says where it came from.
        producer.send_dead_letter(dead_letter(row.raw.rstrip(b"\r\n"), reason, topic=target, partition=-1, offset=-1))
        report.dead_lettered += 1
    producer.flush()
    return report


def _count_invalid(report: ProduceReport, path: Path, row: FileRecord, keep: int) -> str:
    reason = f"{path}:{row.line}: {row.error}"
    report.invalid += 1
    if len(report.rejected) < keep:
        report.rejected.append(reason)
    return reason


def ensure_topics(settings: CommonSettings, extra: Iterable[str] = ()) -> None:
    """Create the contract topics if missing (news and recommendations compacted); raises
    :class:`~streams.kafka_log.BrokerUnavailable` within seconds when no broker answers."""
    from confluent_kafka.admin import AdminClient, NewTopic

    require_broker(settings.kafka_config())
    admin = AdminClient(with_logger(settings.kafka_config()))
    compacted = {"cleanup.policy": "compact"}
    wanted = {
        settings.topic_events: {}, settings.topic_dlq: {}, settings.topic_news: compacted,
        settings.topic_recommendations: compacted, **{t: {} for t in extra},
    }
    try:
        existing = set(admin.list_topics(timeout=10).topics)
    except KafkaException as exc:
        admin.poll(0)  # deliver librdkafka's queued log lines (why it failed: TLS, SASL) before raising
        raise BrokerRefused(settings.kafka_bootstrap, exc.args[0].str() if exc.args else str(exc)) from None
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
