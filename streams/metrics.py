"""In-process counters and latency summaries for ``GET /stats``, ``GET /metrics`` and the
benchmarks.

One set of numbers, two views: :class:`Metrics` keeps the counts, and
:func:`prometheus_registry` exposes the same counts in a per-worker
``prometheus_client.CollectorRegistry`` (read at scrape time by :class:`PrometheusView`), so
``/stats`` (JSON) and ``/metrics`` (Prometheus text format) can never disagree."""

from __future__ import annotations

import re
from bisect import bisect_left
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from streams.contracts import UserEvent
from streams.settings import CHANNELS


def percentile(values: Iterable[float], q: float) -> float | None:
    """Nearest-rank percentile (q in [0, 100]); None for no values."""
    ordered = sorted(values)
    if not ordered:
        return None
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


# Histogram bucket upper bounds of the millisecond summaries (5 ms .. 2 min; +Inf implied).
BUCKETS_MS = (5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1_000.0, 2_500.0, 5_000.0, 10_000.0, 30_000.0,
              60_000.0, 120_000.0)


class Summary:
    """The last ``size`` observations of one quantity (bounded memory), plus cumulative
    histogram counts over ``buckets`` (upper bounds) for ``/metrics``."""

    def __init__(self, size: int = 10_000, buckets: tuple[float, ...] = BUCKETS_MS) -> None:
        self._values: deque[float] = deque(maxlen=size)
        self.count = 0
        self.total = 0.0
        self.buckets = buckets
        self.bucket_counts = [0] * (len(buckets) + 1)  # per bucket (not cumulative); last: above all

    def observe(self, value: float) -> None:
        self._values.append(value)
        self.count += 1
        self.total += value
        self.bucket_counts[bisect_left(self.buckets, value)] += 1

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations <= bound) per bucket, ``inf`` last (== count)."""
        out, running = [], 0
        for bound, n in zip((*self.buckets, float("inf")), self.bucket_counts):
            running += n
            out.append((bound, running))
        return out

    def snapshot(self) -> dict[str, Any]:
        vals = list(self._values)
        return {"count": self.count, "mean": self.total / self.count if self.count else None,
                "p50": percentile(vals, 50), "p90": percentile(vals, 90), "p99": percentile(vals, 99),
                "max": max(vals) if vals else None}


class Metrics:
    def __init__(self) -> None:
        self.counters: Counter[str] = Counter()
        self.summaries: dict[str, Summary] = {}
        # name -> label value -> count; label values are bounded by the callers
        # (dead_letter_reason, channel_label), never raw record text.
        self.labeled: dict[str, Counter[str]] = {}

    def inc(self, name: str, by: int = 1) -> None:
        self.counters[name] += by

    def inc_label(self, name: str, label: str, by: int = 1) -> None:
        self.labeled.setdefault(name, Counter())[label] += by

    def observe(self, name: str, value: float) -> None:
        self.summaries.setdefault(name, Summary()).observe(value)

    def snapshot(self) -> dict[str, Any]:
        return {"counters": dict(self.counters),
                "summaries": {k: v.snapshot() for k, v in sorted(self.summaries.items())},
                "labeled": {k: dict(v) for k, v in sorted(self.labeled.items())}}


# -- dead-letter reasons and channels: bounded label values ----------------------------------

_EVENT_FIELDS = frozenset(UserEvent.model_fields)
_REASON_PREFIXES = (
    ("value is not valid UTF-8", "not_utf8"),
    ("value cannot be parsed", "unparseable"),
    ("record key must equal user_id", "key_mismatch"),
    ("cannot apply event", "apply_failed"),
)
DEAD_LETTER_REASONS = frozenset({"not_utf8", "unparseable", "key_mismatch", "apply_failed", "invalid_json",
                                 "not_an_object", "invalid_event", "unknown_field", "model_update", "other", *_EVENT_FIELDS})


def dead_letter_reason(error: str) -> str:
    """A bounded label for a dead letter's error text: a fixed kind, or the name of the
    :class:`UserEvent` field that failed validation (the first one). Never record text:
    an unknown field's name (user input) is ``unknown_field``."""
    for prefix, reason in _REASON_PREFIXES:
        if error.startswith(prefix):
            return reason
    loc, _, msg = error.partition(";")[0].partition(": ")
    field = loc.split(".")[0].strip()
    if "Extra inputs are not permitted" in msg:
        return "unknown_field"
    if field in _EVENT_FIELDS:
        return field
    if field == "value":
        if msg.startswith("Invalid JSON"):
            return "invalid_json"
        return "not_an_object" if "should be an object" in msg else "invalid_event"  # model-level checks
    return "other"


def channel_label(channel: str) -> str:
    return channel if channel in CHANNELS else "other"


# -- the Prometheus view ---------------------------------------------------------------------

@dataclass(frozen=True)
class Live:
    """Values read from the worker's live objects at scrape time (not counted in Metrics)."""

    queued: int = 0
    in_flight: int = 0
    model_failures: int = 0
    model_timeouts: int = 0
    degraded_batches: int = 0
    model_version: str | None = None
    consumer_lag: int | None = None  # records; None while unknown (no partitions fetched yet)


PREFIX = "newsrec"
# Metrics.counters name -> (exported name without _total, help); every other counter is
# exported as newsrec_<name>_total.
COUNTERS = {
    "events_in": ("events_consumed", "user-events records consumed (valid or not)"),
    "events_applied": ("events_applied", "user-events records applied to a user's window"),
    "events_dlq": ("events_dead_lettered", "user-events records sent to the dead-letter topic"),
    "recommendations_out": ("refreshes_published", "recommendations published (one per user refresh)"),
}
LABELED = {
    "dead_letters": ("dead_letters", "records sent to the dead-letter topic, by reason", "reason"),
    "recommended_items": ("recommended_items", ("items in published recommendations, by recall channel that "
                                                "found them (an item found by two channels counts for both)"),
                          "channel"),
}
# Metrics.summaries name (milliseconds) -> (exported histogram name, help); seconds.
HISTOGRAMS = {
    "model_batch_ms": ("model_batch_seconds", "model call per refresh batch"),
    "search_batch_ms": ("search_batch_seconds", "recall channels and fusion per refresh batch"),
    "dense_batch_ms": ("dense_batch_seconds", ("the dense channel per refresh batch (embedding the signals and "
                                               "the vector search; part of search_batch)")),
    "refresh_latency_ms": ("refresh_latency_seconds",
                           "end to end: oldest signal of a refresh reaching the worker to its publication"),
}
LIVE_COUNTERS = ("model_failures", "model_timeouts", "degraded_batches")
_NAME_OK = re.compile(r"[^a-zA-Z0-9_]")


class PrometheusView(Collector):
    """Reads :class:`Metrics` (and ``live()``) on every scrape: no second set of counters."""

    def __init__(self, metrics: Metrics, live: Callable[[], Live] = Live) -> None:
        self.metrics, self.live = metrics, live

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        counters = dict(m.counters)
        for key, (name, doc) in COUNTERS.items():
            yield CounterMetricFamily(f"{PREFIX}_{name}", doc, value=counters.pop(key, 0))
        reserved = {name for name, *_ in (*COUNTERS.values(), *LABELED.values())} | set(LIVE_COUNTERS)
        for key, value in sorted(counters.items()):
            if _NAME_OK.sub("_", key) in reserved:
                continue
            yield CounterMetricFamily(f"{PREFIX}_{_NAME_OK.sub('_', key)}", f"worker counter {key}", value=value)
        for key, (name, doc, label) in LABELED.items():
            family = CounterMetricFamily(f"{PREFIX}_{name}", doc, labels=[label])
            for value, n in sorted(m.labeled.get(key, Counter()).items()):
                family.add_metric([value], n)
            yield family
        for key, (name, doc) in HISTOGRAMS.items():
            summary = m.summaries.get(key) or Summary()
            buckets = [("+Inf" if b == float("inf") else repr(b / 1000), n) for b, n in summary.cumulative()]
            yield HistogramMetricFamily(f"{PREFIX}_{name}", f"{doc} (seconds)", buckets=buckets,
                                        sum_value=summary.total / 1000)
        live = self.live()
        yield GaugeMetricFamily(f"{PREFIX}_refresh_queue_size", "users with a refresh queued", value=live.queued)
        yield GaugeMetricFamily(f"{PREFIX}_refresh_in_flight", "refreshes being generated or published",
                                value=live.in_flight)
        yield CounterMetricFamily(f"{PREFIX}_model_failures", "model channel calls that failed or timed out",
                                  value=live.model_failures)
        yield CounterMetricFamily(f"{PREFIX}_model_timeouts", "model channel calls that timed out",
                                  value=live.model_timeouts)
        yield CounterMetricFamily(f"{PREFIX}_degraded_batches", "refresh batches published without the model",
                                  value=live.degraded_batches)
        version = GaugeMetricFamily(f"{PREFIX}_model_version", "the model serving (1 on its version)",
                                    labels=["version"])
        if live.model_version is not None:
            version.add_metric([live.model_version], 1)
        yield version
        if live.consumer_lag is not None:
            yield GaugeMetricFamily(f"{PREFIX}_consumer_lag", "records of user-events not yet committed by this "
                                    "worker (its partitions: fetched high watermark minus committed offset)",
                                    value=live.consumer_lag)


def prometheus_registry(metrics: Metrics, live: Callable[[], Live] = Live) -> CollectorRegistry:
    """A registry of its own per worker (not the process-global default)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PrometheusView(metrics, live))
    return registry
