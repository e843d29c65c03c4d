"""Faust consumer transport for the local Tansu broker (profile ``local`` only).

Tansu answers a fetch only when ``fetch_max_wait_ms`` expires, even when records arrive
meanwhile (Apache Kafka answers as soon as ``fetch_min_bytes`` is there). faust hard-codes
1,500 ms, which would put up to 1.5 s on every hop; this transport lowers it.
Selected by the broker URL scheme ``kafka-local://``.
"""

from __future__ import annotations

from typing import Any

from faust.transport import drivers
from faust.transport.drivers import aiokafka as faust_aiokafka

SCHEME = "kafka-local"
FETCH_MAX_WAIT_MS = 10
PREFETCH_BACKOFF_S = 0.005


class _ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        consumer._fetch_max_wait_ms = FETCH_MAX_WAIT_MS  # read when its fetcher starts
        start = consumer.start

        async def start_then_tune() -> None:
            await start()
            consumer._fetcher._prefetch_backoff = PREFETCH_BACKOFF_S

        consumer.start = start_then_tune
        return consumer


class _Consumer(faust_aiokafka.Consumer):
    def _new_consumer_thread(self) -> faust_aiokafka.AIOKafkaConsumerThread:
        return _ConsumerThread(self, loop=self.loop, beacon=self.beacon)


class Transport(faust_aiokafka.Transport):
    Consumer = _Consumer


drivers.TRANSPORTS.aliases.setdefault(SCHEME, f"{__name__}:Transport")
