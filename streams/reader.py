"""Read ``recommendations`` as a feed service would (plain confluent-kafka consumer)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from confluent_kafka import Consumer

from streams.contracts import Recommendation


class RecommendationReader:
    def __init__(self, consumer_config: dict[str, Any], topic: str) -> None:
        self._consumer = Consumer(consumer_config)
        self._consumer.subscribe([topic])

    def wait_assigned(self, timeout: float = 30.0) -> list[tuple[Recommendation, float]]:
        """Join the group (so nothing published from now on is missed); returns what arrived meanwhile."""
        got: list[tuple[Recommendation, float]] = []
        deadline = time.monotonic() + timeout
        while not self._consumer.assignment():
            if time.monotonic() > deadline:
                raise TimeoutError(f"no partitions assigned within {timeout}s")
            got.extend(self.poll(0.2))
        return got

    def poll(self, timeout: float = 0.5) -> Iterator[tuple[Recommendation, float]]:
        """Recommendations that arrived within ``timeout``, each with its arrival time (monotonic).

        Returns as soon as anything arrives (a batch consume would hold for the whole timeout)."""
        first = self._consumer.consume(1, timeout=timeout)
        for msg in first + (self._consumer.consume(500, timeout=0) if first else []):
            if msg.error() is None and msg.value():
                yield Recommendation.model_validate_json(msg.value()), time.monotonic()

    def close(self) -> None:
        self._consumer.close()

    def __enter__(self) -> RecommendationReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
