"""The worker's faust transport: the producer buffer drains before faust commits offsets, and
a fetch with every partition paused returns nothing.

faust flushes its producer before each offset commit so that table changelog records are out
first; its stock buffer stops waiting once no record has gone out for 0.1 s. A send slower than
that (a loaded worker) lets the commit overtake the changelog, and a kill -9 then loses state.

After changelog recovery faust pauses every partition for a moment and still fetches with the
(empty) set of active ones; aiokafka reads an empty set as "all" and faust drops what comes back.
Then it resumes the stream partitions before it seeks them and resumes its flow control, which
empties the agents' queues: stream records are fetched only once the rebalance is over.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import faust
from faust.transport.producer import ProducerBuffer

from streams.faust_transport import DrainingBuffer, _ConsumerThread

SLOW_SEND_S = 0.3  # longer than the stock buffer's 0.1 s patience


class SlowChannel:
    """Stands in for a topic whose client takes SLOW_SEND_S to accept each record."""

    def __init__(self) -> None:
        self.published: list[int] = []

    async def publish_message(self, fut: SimpleNamespace, wait: bool = False) -> None:
        await asyncio.sleep(SLOW_SEND_S)
        self.published.append(fut.n)


async def buffered_then_flushed(buffer_type: type[ProducerBuffer], records: int) -> list[int]:
    """Put ``records`` records in a running buffer, flush it, and return what went out by then."""
    app = faust.App("flush-test", broker="memory://")
    buffer = buffer_type()
    buffer.app = app
    channel = SlowChannel()
    await buffer.start()
    try:
        for n in range(records):
            buffer.put(SimpleNamespace(n=n, message=SimpleNamespace(channel=channel)))
        await buffer.flush()
        flushed = list(channel.published)
        while len(channel.published) < records:  # let the rest go out: stopping with unsent records raises
            await asyncio.sleep(0.05)
        return flushed
    finally:
        await buffer.stop()


def test_flush_returns_only_when_every_record_was_handed_over() -> None:
    assert asyncio.run(buffered_then_flushed(DrainingBuffer, 5)) == [0, 1, 2, 3, 4]


def test_faust_stock_buffer_still_gives_up_early() -> None:
    """Why DrainingBuffer exists: if this starts failing, faust fixed its flush and the
    worker can use the stock aiokafka transport again."""
    assert len(asyncio.run(buffered_then_flushed(ProducerBuffer, 5))) < 5


def test_empty_buffer_flushes_at_once() -> None:
    assert asyncio.run(buffered_then_flushed(DrainingBuffer, 0)) == []


async def prefetched_consumer(bootstrap: str, topic: str) -> tuple[Any, list[Any]]:
    """An aiokafka consumer of both partitions of ``topic`` from the start, once its background
    fetcher holds records of both (what it prefetches while faust has them paused)."""
    from aiokafka import AIOKafkaConsumer
    from aiokafka.structs import TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, fetch_max_wait_ms=10)
    await consumer.start()
    tps = [TopicPartition(topic, 0), TopicPartition(topic, 1)]
    consumer.assign(tps)
    await consumer.seek_to_beginning(*tps)
    deadline = asyncio.get_running_loop().time() + 60
    while not set(tps) <= set(consumer._fetcher._records) and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)
    assert set(tps) <= set(consumer._fetcher._records), "the fetcher never prefetched both partitions"
    return consumer, tps


def test_a_fetch_with_every_partition_paused_takes_nothing(kafka_bootstrap: str, unique_name: str) -> None:
    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient, NewTopic
    from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread

    topic = f"{unique_name}-paused"
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    admin.create_topics([NewTopic(topic, 2, 1)])[topic].result(30)
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    for partition in (0, 1):
        for n in range(3):
            producer.produce(topic, value=f"{partition}-{n}".encode(), partition=partition)
    assert producer.flush(30) == 0
    thread = object.__new__(_ConsumerThread)  # only _fetch_records is exercised: it reads these
    thread.consumer = SimpleNamespace(flow_active=True)
    thread.app = SimpleNamespace(rebalancing=False, tables=SimpleNamespace(changelog_topics=set()))

    async def scenario() -> None:
        consumer, (tp0, tp1) = await prefetched_consumer(kafka_bootstrap, topic)
        try:
            assert await thread._fetch_records(consumer, set(), timeout=0.2) == {}
            got = await thread._fetch_records(consumer, {tp0}, timeout=5)  # tp0 resumed: all of it, in order
            assert [r.offset for r in got[tp0]] == [0, 1, 2] and tp1 not in got
            got = await thread._fetch_records(consumer, {tp1}, timeout=5)  # nothing of tp1 was skipped
            assert [r.offset for r in got[tp1]] == [0, 1, 2]
        finally:
            await consumer.stop()
        # Why the override exists: the stock fetch hands over the paused partitions' records (faust
        # then drops them). If this starts failing, faust fixed it and the override can go.
        consumer, tps = await prefetched_consumer(kafka_bootstrap, topic)
        try:
            stock = await AIOKafkaConsumerThread._fetch_records(thread, consumer, set(), timeout=0.2)
            assert set(stock) == set(tps)
        finally:
            await consumer.stop()

    asyncio.run(scenario())


def test_no_stream_records_are_fetched_while_rebalancing(kafka_bootstrap: str, unique_name: str) -> None:
    """Partition 0 plays a changelog (read for the recovery), partition 1 a stream partition."""
    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient, NewTopic

    changelog, stream = f"{unique_name}-changelog", f"{unique_name}-events"
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    for topic in (changelog, stream):
        admin.create_topics([NewTopic(topic, 1, 1)])[topic].result(30)
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    for topic in (changelog, stream):
        for n in range(3):
            producer.produce(topic, value=f"{topic}-{n}".encode(), partition=0)
    assert producer.flush(30) == 0
    thread = object.__new__(_ConsumerThread)
    thread.consumer = SimpleNamespace(flow_active=True)
    thread.app = SimpleNamespace(rebalancing=True, tables=SimpleNamespace(changelog_topics={changelog}))

    async def scenario() -> None:
        from aiokafka import AIOKafkaConsumer
        from aiokafka.structs import TopicPartition

        consumer = AIOKafkaConsumer(bootstrap_servers=kafka_bootstrap, enable_auto_commit=False, fetch_max_wait_ms=10)
        await consumer.start()
        log_tp, stream_tp = TopicPartition(changelog, 0), TopicPartition(stream, 0)
        consumer.assign([log_tp, stream_tp])
        await consumer.seek_to_beginning(log_tp, stream_tp)
        try:
            got: dict = {}
            deadline = asyncio.get_running_loop().time() + 60
            while log_tp not in got and asyncio.get_running_loop().time() < deadline:
                got = await thread._fetch_records(consumer, {log_tp, stream_tp}, timeout=0.5)
                assert stream_tp not in got  # never while rebalancing, even when asked for
            assert [r.offset for r in got[log_tp]] == [0, 1, 2]
            assert await thread._fetch_records(consumer, {stream_tp}, timeout=0.2) == {}
            thread.app.rebalancing = False  # the rebalance is over: the stream partition from its start
            got = {}
            while stream_tp not in got and asyncio.get_running_loop().time() < deadline:
                got = await thread._fetch_records(consumer, {log_tp, stream_tp}, timeout=0.5)
            assert [r.offset for r in got[stream_tp]] == [0, 1, 2]
        finally:
            await consumer.stop()

    asyncio.run(scenario())
