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

    def poll(self, timeout: float = 0.5) -> Iterator[tuple[Recommendation, float]]:
        """Recommendations that arrived within ``timeout``, each with its arrival time (monotonic)."""
        for msg in self._consumer.consume(500, timeout=timeout):
            if msg.error() is None and msg.value():
                yield Recommendation.model_validate_json(msg.value()), time.monotonic()

    def close(self) -> None:
        self._consumer.close()

    def __enter__(self) -> RecommendationReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
