"""The worker's producer buffer drains before faust commits offsets.

faust flushes its producer before each offset commit so that table changelog records are out
first; its stock buffer stops waiting once no record has gone out for 0.1 s. A send slower than
that (a loaded worker) lets the commit overtake the changelog, and a kill -9 then loses state.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import faust
from faust.transport.producer import ProducerBuffer

from streams.faust_transport import DrainingBuffer

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
