"""In-process counters and latency summaries for ``GET /stats`` and the benchmarks."""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterable
from typing import Any


def percentile(values: Iterable[float], q: float) -> float | None:
    """Nearest-rank percentile (q in [0, 100]); None for no values."""
    ordered = sorted(values)
    if not ordered:
        return None
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


class Summary:
    """The last ``size`` observations of one quantity (bounded memory)."""

    def __init__(self, size: int = 10_000) -> None:
        self._values: deque[float] = deque(maxlen=size)
        self.count = 0
        self.total = 0.0

    def observe(self, value: float) -> None:
        self._values.append(value)
        self.count += 1
        self.total += value

    def snapshot(self) -> dict[str, Any]:
        vals = list(self._values)
        return {"count": self.count, "mean": self.total / self.count if self.count else None,
                "p50": percentile(vals, 50), "p90": percentile(vals, 90), "p99": percentile(vals, 99),
                "max": max(vals) if vals else None}


class Metrics:
    def __init__(self) -> None:
        self.counters: Counter[str] = Counter()
        self.summaries: dict[str, Summary] = {}

    def inc(self, name: str, by: int = 1) -> None:
        self.counters[name] += by

    def observe(self, name: str, value: float) -> None:
        self.summaries.setdefault(name, Summary()).observe(value)

    def snapshot(self) -> dict[str, Any]:
        return {"counters": dict(self.counters),
                "summaries": {k: v.snapshot() for k, v in sorted(self.summaries.items())}}
