"""Trending: what is clicked most relative to how often it is shown. Pure.

Counts live in hourly buckets over a 24 h horizon (the worker's hopping windows); the score
is a smoothed click-through rate, so an article shown twice and clicked once does not beat
one shown 500 times and clicked 100 times. Where no exposures arrive at all (a feed that
only reports clicks), clicks alone rank.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime

BUCKET_S = 3600.0
HORIZON_S = 24 * 3600.0
# Beta prior of the smoothed CTR: `strength` pseudo-shows at the population's CTR.
PRIOR_STRENGTH = 20.0


@dataclass(frozen=True, slots=True)
class Popularity:
    clicks: int
    shows: int
    first_seen: float  # epoch seconds of the first show or click inside the horizon


def smoothed_ctr(clicks: float, shows: float, prior: float, strength: float = PRIOR_STRENGTH) -> float:
    """(clicks + strength * prior) / (shows + strength): shrinks small samples to the prior."""
    return (clicks + strength * prior) / (max(shows, clicks) + strength)


def prior_ctr(counts: Mapping[str, Popularity]) -> float | None:
    """The population's click-through rate; None when nothing was shown (clicks-only feeds)."""
    shows = sum(p.shows for p in counts.values())
    return min(1.0, sum(p.clicks for p in counts.values()) / shows) if shows else None


def trending_scores(counts: Mapping[str, Popularity], strength: float = PRIOR_STRENGTH) -> dict[str, float]:
    """Score per news id: smoothed CTR, or the click count when nothing was ever shown."""
    prior = prior_ctr(counts)
    if prior is None:
        return {nid: float(p.clicks) for nid, p in counts.items()}
    return {nid: smoothed_ctr(p.clicks, p.shows, prior, strength) for nid, p in counts.items()}


def bucket_of(ts: datetime, bucket_s: float = BUCKET_S) -> int:
    return int(ts.timestamp() // bucket_s)


class TrendingCounter:
    """Clicks and shows per article in time buckets; ``popularity(now)`` sums the buckets
    inside the horizon up to ``now``'s (everything added so far in the current one).

    Offline it is fed strictly in time order, querying before adding, so an impression
    never sees its own clicks.
    """

    def __init__(self, bucket_s: float = BUCKET_S, horizon_s: float = HORIZON_S) -> None:
        if bucket_s <= 0 or horizon_s < bucket_s:
            raise ValueError("bucket_s must be positive and horizon_s at least one bucket")
        self.bucket_s, self.horizon_s = bucket_s, horizon_s
        # bucket -> news_id -> [clicks, shows, first ts]
        self._buckets: dict[int, dict[str, list[float]]] = defaultdict(dict)

    def add(self, ts: datetime, *, shown: Iterable[str] = (), clicked: Iterable[str] = ()) -> None:
        bucket = self._buckets[bucket_of(ts, self.bucket_s)]
        t = ts.timestamp()
        for nid, is_click in [*((n, False) for n in shown), *((n, True) for n in clicked)]:
            row = bucket.setdefault(nid, [0, 0, t])
            row[0 if is_click else 1] += 1
            row[2] = min(row[2], t)

    def popularity(self, now: datetime) -> dict[str, Popularity]:
        current = bucket_of(now, self.bucket_s)
        oldest = current - int(self.horizon_s // self.bucket_s) + 1
        for stale in [b for b in self._buckets if b < oldest]:
            del self._buckets[stale]  # the window slid past it
        acc: dict[str, list[float]] = {}
        for b, rows in self._buckets.items():
            if b > current:
                continue
            for nid, (clicks, shows, first) in rows.items():
                row = acc.setdefault(nid, [0, 0, first])
                row[0] += clicks
                row[1] += shows
                row[2] = min(row[2], first)
        return {nid: Popularity(int(c), int(s), f) for nid, (c, s, f) in acc.items()}
