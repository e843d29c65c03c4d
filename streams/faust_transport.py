"""faust transports of the worker: aiokafka with a producer flush that really drains, and a
fetch that skips no stream record around a rebalance.

- ``kafka-newsrec://`` (profile ``kafka``): faust's aiokafka transport whose producer buffer
  is :class:`DrainingBuffer`. faust flushes the producer before it commits offsets, but its
  buffer's flush gives up as soon as no message has gone out for 0.1 s (``flush_atmost``).
  On a busy worker a commit can then go ahead with table changelog records still buffered,
  and a kill -9 right after loses the state of events whose offsets were committed (seen in
  the fault suite: a restarted worker's window missed the events between two commits).
- Both: a fetch with every partition paused returns nothing. faust pauses all partitions
  between the end of changelog recovery and the seek of the stream partitions to their
  committed offsets, and then asks aiokafka for the records of an empty partition set; aiokafka
  reads an empty set as "every partition" and hands over what it prefetched for the paused
  stream partitions, which faust drops. The seek puts back what was committed, but a partition
  with no commit yet (a worker killed before its first commit, a new group) kept the advanced
  position: its events were lost (seen twice in 31 restarts under load: every event sent
  while the worker was down was skipped).
- Both: no stream records are fetched while a rebalance is under way (changelog records are,
  for the recovery). faust resumes the stream partitions, seeks them to their committed
  offsets, and only then resumes its flow control, which empties the agents' queues: records
  fetched during the seek were queued, cleared and never processed, their offsets already
  read (seen once in 23 restarts: the third of four records of one fetched batch was missing
  from its user's window, the records around it were there).
- ``kafka-local://`` (profile ``local``): the same, and Tansu's fetch wait lowered. Tansu
  answers a fetch only when ``fetch_max_wait_ms`` expires, even when records arrive meanwhile
  (Apache Kafka answers as soon as ``fetch_min_bytes`` is there); faust hard-codes 1,500 ms,
  which would put up to 1.5 s on every hop.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from faust.transport import drivers
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.transport.producer import ProducerBuffer
from faust.types.tuples import FutureMessage

SCHEME = "kafka-newsrec"
LOCAL_SCHEME = "kafka-local"
FETCH_MAX_WAIT_MS = 10
PREFETCH_BACKOFF_S = 0.005
ALL_PAUSED_WAIT_S = 0.05  # how long a fetch with every partition paused waits before returning nothing


class DrainingBuffer(ProducerBuffer):
    """A producer buffer whose :meth:`flush` returns only once every record put in it has been
    handed to the Kafka client (the client's own flush then waits for the broker's acks)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.unsent = 0

    def put(self, fut: FutureMessage) -> None:
        super().put(fut)
        if not self.app.conf.producer_threaded:  # threaded: the driver's thread sends, not us
            self.unsent += 1

    async def _send_pending(self, fut: FutureMessage) -> None:
        try:
            await super()._send_pending(fut)
        finally:
            self.unsent -= 1

    async def flush(self) -> None:
        while self.unsent:
            if self.should_stop:  # the sending task is gone: faust's own rule (raises if unsent)
                await super().flush()
                return
            self.message_sent.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.message_sent.wait(), timeout=1.0)


class _Producer(faust_aiokafka.Producer):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.buffer = DrainingBuffer(loop=self.loop, beacon=self.beacon)
        self.buffer.app = self.app


class _ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    async def _fetch_records(self, consumer: Any, active_partitions: Any, timeout: float | None = None,
                             max_records: int | None = None) -> Any:
        if active_partitions and self.app.rebalancing:  # recovery reads changelogs; stream records wait
            changelogs = self.app.tables.changelog_topics
            active_partitions = {tp for tp in active_partitions if tp.topic in changelogs}
        if active_partitions is not None and not active_partitions:  # all paused: aiokafka would read "all"
            await asyncio.sleep(min(timeout or 0.0, ALL_PAUSED_WAIT_S))
            return {}
        return await super()._fetch_records(consumer, active_partitions, timeout=timeout, max_records=max_records)


class _Consumer(faust_aiokafka.Consumer):
    def _new_consumer_thread(self) -> faust_aiokafka.AIOKafkaConsumerThread:
        return _ConsumerThread(self, loop=self.loop, beacon=self.beacon)


class Transport(faust_aiokafka.Transport):
    Producer = _Producer
    Consumer = _Consumer


class _LocalConsumerThread(_ConsumerThread):
    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        consumer._fetch_max_wait_ms = FETCH_MAX_WAIT_MS  # read when its fetcher starts
        start = consumer.start

        async def start_then_tune() -> None:
            await start()
            consumer._fetcher._prefetch_backoff = PREFETCH_BACKOFF_S

        consumer.start = start_then_tune
        return consumer


class _LocalConsumer(_Consumer):
    def _new_consumer_thread(self) -> faust_aiokafka.AIOKafkaConsumerThread:
        return _LocalConsumerThread(self, loop=self.loop, beacon=self.beacon)


class LocalTransport(Transport):
    Consumer = _LocalConsumer


drivers.TRANSPORTS.aliases.setdefault(SCHEME, f"{__name__}:Transport")
drivers.TRANSPORTS.aliases.setdefault(LOCAL_SCHEME, f"{__name__}:LocalTransport")
