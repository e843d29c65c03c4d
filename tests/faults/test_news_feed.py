"""News ingestion under bad input, live changes and a crash (streams/feed.py).

Malformed ``news-articles`` records go to the dead-letter topic with the reason; updates and
tombstones (null value: remove that news_id) are applied live, by the worker's follower
(embedded engine) and by the indexer (Elasticsearch API); the indexer commits a batch only
after writing it, so a kill -9 mid-run loses nothing. Real broker, real search server.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from index.corpus import read_mind_news
from index.elastic import ElasticEngine
from index.embedded import EmbeddedEngine
from streams.contracts import NewsArticle
from streams.feed import DeadLetters, IndexFollower, run_indexer
from streams.settings import CommonSettings
from tests.streaming import WAIT_S, read_topic, wait_until
from tools.infra import create_topics

pytestmark = pytest.mark.integration

PARTITIONS = 2
WORDS = ["alpha", "bravo", "charlie", "delta", "echo"]  # one distinct title word per article


def article(n: int, word: str) -> NewsArticle:
    return NewsArticle(news_id=f"N{n}", title=f"{word} headline", category="news")


# (case, key, value, reason expected in the dead letter)
MALFORMED: list[tuple[str, bytes | None, bytes | None, str]] = [
    ("bad-json", b"N7", b"{not json", "Invalid JSON"),
    ("key-is-not-news-id", b"N8", article(9, "zulu").to_json_bytes(), "record key must equal news_id"),
    ("keyless-tombstone", None, None, "tombstone"),
    ("no-title", b"N10", b'{"news_id": "N10", "category": "news"}', "title"),
]
# N1..N3 indexed, N1 updated (new title), N2 deleted: bravo and alpha are gone, N3 stays.
FIRST: list[tuple[bytes | None, bytes | None]] = [
    *[(f"N{n}".encode(), article(n, WORDS[n - 1]).to_json_bytes()) for n in (1, 2, 3)],
    (b"N1", article(1, "delta").to_json_bytes()), (b"N2", None),
    *[(key, value) for _, key, value, _ in MALFORMED],
]
# Then, live: N3 deleted, N4 added.
LIVE: list[tuple[bytes | None, bytes | None]] = [(b"N3", None), (b"N4", article(4, "echo").to_json_bytes())]


def settings(bootstrap: str) -> CommonSettings:
    return CommonSettings(kafka_bootstrap=bootstrap, broker_profile="local")


def produce(bootstrap: str, topic: str, records: list[tuple[bytes | None, bytes | None]]) -> None:
    producer = Producer(settings(bootstrap).producer_config())
    for key, value in records:
        producer.produce(topic, key=key, value=value)
    assert producer.flush(30) == 0


def titles_found(search: list[list]) -> dict[str, list[str]]:
    return {word: [hit.news_id for hit in hits] for word, hits in zip(WORDS, search)}


def check_dead_letters(bootstrap: str, dlq: str, news: str) -> None:
    letters = read_topic(bootstrap, dlq)
    assert len(letters) == len(MALFORMED), [v["error"][:80] for _, v in letters]
    for (case, key, value, reason), (got_key, letter) in zip(MALFORMED, sorted(letters, key=lambda r: r[1]["offset"])):
        assert got_key == key and letter["raw"] == (value or b"").decode(), case
        assert reason in letter["error"] and letter["topic"] == news, (case, letter["error"])


@pytest.fixture
def topics(kafka_bootstrap: str, unique_name: str) -> tuple[str, str]:
    news, dlq = f"{unique_name}-news", f"{unique_name}-dlq"
    # One partition for news: the dead letters' offsets follow the produce order checked above.
    create_topics(kafka_bootstrap, [news], partitions=1)
    create_topics(kafka_bootstrap, [dlq], partitions=PARTITIONS)
    return news, dlq


def test_follower_applies_updates_and_tombstones_live_and_dead_letters_malformed_records(
        kafka_bootstrap: str, topics: tuple[str, str]) -> None:
    news, dlq = topics
    produce(kafka_bootstrap, news, FIRST)
    engine = EmbeddedEngine()
    conf = settings(kafka_bootstrap)
    follower = IndexFollower(conf.consumer_config(f"follower-{uuid.uuid4().hex[:6]}"), news, engine.upsert_sync,
                             delete=engine.delete_sync, dead_letters=DeadLetters(conf.producer_config(), dlq)).start()
    try:
        assert follower.wait_caught_up(WAIT_S), "follower never caught up"
        assert titles_found(engine.search_many_sync(WORDS)) == {
            "alpha": [], "bravo": [], "charlie": ["N3"], "delta": ["N1"], "echo": []}
        assert engine.count_sync() == 2 and follower.invalid == len(MALFORMED)
        check_dead_letters(kafka_bootstrap, dlq, news)

        produce(kafka_bootstrap, news, LIVE)
        # The follower counts a deletion after applying it: wait for the count too, not only the index.
        wait_until(lambda: follower.deleted == 2 and titles_found(engine.search_many_sync(WORDS)) == {
            "alpha": [], "bravo": [], "charlie": [], "delta": ["N1"], "echo": ["N4"]}, WAIT_S, "live changes")
        assert engine.count_sync() == 2 and follower.invalid == len(MALFORMED)
    finally:
        follower.stop()


async def test_indexer_applies_tombstones_and_dead_letters_malformed_records(
        kafka_bootstrap: str, es_url: str, topics: tuple[str, str], unique_name: str) -> None:
    news, dlq = topics
    conf = settings(kafka_bootstrap)
    group = f"indexer-{unique_name}"
    async with ElasticEngine(es_url, f"{unique_name}-idx") as engine:
        await engine.ensure_index()
        for records, expected in ((FIRST, {"charlie": ["N3"], "delta": ["N1"]}), (LIVE, {"delta": ["N1"], "echo": ["N4"]})):
            produce(kafka_bootstrap, news, records)
            await run_indexer(conf.consumer_config(group), news, engine, idle_exit_s=3,
                              dead_letters=DeadLetters(conf.producer_config(), dlq))
            deadline = time.monotonic() + WAIT_S  # writes become searchable on the next index refresh
            while (found := {w: ids for w, ids in titles_found(await engine.search_many(WORDS)).items() if ids}) \
                    != expected or await engine.count() != 2:
                assert time.monotonic() < deadline, found
                await asyncio.sleep(0.5)
    check_dead_letters(kafka_bootstrap, dlq, news)


def committed(bootstrap: str, topic: str, group: str) -> int:
    """The offset ``group`` committed on partition 0 of ``topic`` (negative: none)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        return consumer.committed([TopicPartition(topic, 0)], timeout=10)[0].offset
    finally:
        consumer.close()


def test_indexer_killed_mid_run_loses_no_article(kafka_bootstrap: str, es_url: str, mind_news_path: Path,
                                                 unique_name: str, tmp_path: Path) -> None:
    news = f"{unique_name}-news"
    create_topics(kafka_bootstrap, [news], partitions=1)
    articles = list(read_mind_news(mind_news_path))
    # 3 distinct copies of each (more batches, so a kill lands mid-run); a lost batch shows in the count.
    copies = [a.model_copy(update={"news_id": f"{a.news_id}-{n}"}) for n in range(3) for a in articles]
    records = [(a.news_id.encode(), a.to_json_bytes()) for a in copies]
    produce(kafka_bootstrap, news, records)
    total = len({a.news_id for a in copies})
    env = {**os.environ, "NEWSREC_KAFKA_BOOTSTRAP": kafka_bootstrap, "NEWSREC_BROKER_PROFILE": "local",
           "NEWSREC_TOPIC_NEWS": news, "NEWSREC_ES_URL": es_url, "NEWSREC_ES_ALIAS": f"{unique_name}-idx"}
    command = [sys.executable, "-m", "commands.cli", "index", "--exit-when-idle", "3"]

    async def count() -> int:
        async with ElasticEngine(es_url, f"{unique_name}-idx") as engine:
            return await engine.count()

    with (tmp_path / "indexer.log").open("wb") as log:
        proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            # Kill -9 once a batch was committed (so written) and before the last one was.
            wait_until(lambda: committed(kafka_bootstrap, news, "newsrec-indexer") > 0 or proc.poll() is not None,
                       WAIT_S, "a first committed batch")
            os.killpg(proc.pid, signal.SIGKILL)
        finally:
            proc.wait(30)
    at_kill = committed(kafka_bootstrap, news, "newsrec-indexer")
    assert proc.returncode == -signal.SIGKILL, f"indexer ended by itself:\n{(tmp_path / 'indexer.log').read_text()}"
    assert 0 < at_kill < len(records), f"killed at committed offset {at_kill}/{len(records)}: not mid-run"

    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    wait_until(lambda: asyncio.run(count()) == total, WAIT_S, f"all {total} articles indexed after the restart")
    assert committed(kafka_bootstrap, news, "newsrec-indexer") == len(records)
