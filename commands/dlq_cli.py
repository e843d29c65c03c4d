"""``newsrec dlq``: read the dead-letter topic, one line per record (or one JSON object)."""

from __future__ import annotations

import argparse
import base64
import json
import uuid
from typing import Any

from confluent_kafka import Consumer, Message, TopicPartition
from pydantic import ValidationError

from streams.contracts import DeadLetter
from streams.kafka_log import require_broker, with_logger
from streams.settings import CommonSettings, load

EXCERPT_CHARS = 80
POLL_S = 0.5


def add_dlq_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dlq", help="read the dead-letter topic (NEWSREC_TOPIC_DLQ)",
                       description="Print dead letters, oldest first: where the record came from "
                                   "(topic[partition]@offset, -1 for a file record), the reason and the "
                                   "start of the raw value.")
    p.add_argument("-n", "--last", type=int, default=20, metavar="N",
                   help="the latest N dead letters (default: 20; 0 with --follow: only new ones)")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new dead letters until Ctrl-C")
    p.add_argument("--json", action="store_true", help="one JSON object per line (the dead letter, plus dlq_*)")
    p.set_defaults(func=_cmd_dlq)


def _cmd_dlq(args: argparse.Namespace) -> int:
    settings = load(CommonSettings)
    require_broker(settings.kafka_config())
    conf = with_logger(settings.consumer_config(f"newsrec-dlq-{uuid.uuid4().hex[:8]}")) | {
        "enable.auto.commit": False}
    consumer = Consumer(conf)
    try:
        partitions = consumer.list_topics(settings.topic_dlq, timeout=10).topics[settings.topic_dlq].partitions
        ends: dict[int, int] = {}
        starts = []
        for p in partitions or {}:
            low, high = consumer.get_watermark_offsets(TopicPartition(settings.topic_dlq, p), timeout=10)
            ends[p] = high
            starts.append(TopicPartition(settings.topic_dlq, p, max(low, high - max(args.last, 0))))
        consumer.assign(starts)
        # Up to the end offsets seen at start, then (with --follow) whatever comes next.
        backlog = sorted(_read_backlog(consumer, starts, ends), key=lambda m: m.timestamp()[1])
        for msg in backlog[len(backlog) - max(args.last, 0):]:
            print(render(msg, as_json=args.json), flush=True)
        while args.follow:
            for msg in consumer.consume(100, timeout=POLL_S):
                if msg.error() is None:
                    print(render(msg, as_json=args.json), flush=True)
    finally:
        consumer.close()
    return 0


def _read_backlog(consumer: Consumer, starts: list[TopicPartition], ends: dict[int, int]) -> list[Message]:
    """Records from ``starts`` until each partition's position reaches its end offset."""
    got: list[Message] = []
    pending = {tp.partition for tp in starts if tp.offset < ends[tp.partition]}
    while pending:
        got.extend(m for m in consumer.consume(500, timeout=POLL_S) if m.error() is None)
        done = {tp.partition for tp in consumer.position([TopicPartition(starts[0].topic, p) for p in pending])
                if tp.offset >= ends[tp.partition]}
        pending -= done
    return got


def render(msg: Message, *, as_json: bool = False) -> str:
    """One dead letter as a readable line, or as JSON (the record's fields plus where it sits in the DLQ)."""
    key = msg.key().decode("utf-8", "replace") if msg.key() else None
    try:
        letter: DeadLetter | None = DeadLetter.model_validate_json(msg.value() or b"")
    except ValidationError:
        letter = None
    where = {"dlq_partition": msg.partition(), "dlq_offset": msg.offset(), "dlq_key": key}
    if as_json:
        body: dict[str, Any] = (letter.model_dump(mode="json") if letter is not None
                                else {"unreadable": (msg.value() or b"").decode("utf-8", "replace")})
        return json.dumps(body | where, ensure_ascii=False)
    if letter is None:
        return f"dlq[{msg.partition()}]@{msg.offset()}  not a dead letter: {_excerpt(msg.value() or b'')}"
    raw = base64.b64decode(letter.raw) if letter.raw_encoding == "base64" else letter.raw.encode("utf-8")
    return (f"{letter.topic}[{letter.partition}]@{letter.offset}  {letter.failed_at:%Y-%m-%dT%H:%M:%SZ}  "
            f"{_one_line(letter.error)}  | raw: {_excerpt(raw)}")


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _excerpt(raw: bytes) -> str:
    text = _one_line(raw.decode("utf-8", "replace"))
    return text if len(text) <= EXCERPT_CHARS else text[:EXCERPT_CHARS - 1] + "…"
