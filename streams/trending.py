"""Trending: what is clicked most relative to how often it is shown. Pure.

Counts live in hourly buckets over a 24 h horizon (the worker's hopping windows); the score
is a smoothed click-through rate, so an article shown twice and clicked once does not beat
one shown 500 times and clicked 100 times. Where no exposures arrive at all (a feed that
only reports clicks), clicks alone rank.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime

BUCKET_S = 3600.0
HORIZON_S = 24 * 3600.0
# The user-event domains that are trending evidence, and what they count as.
TRENDING_KINDS = {"news_click": "clicked", "impression": "shown"}
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
    """The click-through rate of shown articles; None when nothing was shown (clicks-only
    feeds). Clicks beyond an article's shows (clicks that arrived without an exposure, e.g.
    history clicks) do not inflate it."""
    shows = sum(p.shows for p in counts.values())
    return sum(min(p.clicks, p.shows) for p in counts.values()) / shows if shows else None


class TrendingScores(Mapping[str, float]):
    """Score per news id, computed on access from the counts: the smoothed CTR, or the click
    count when nothing was ever shown (``prior`` None). Lazy, so ranking a few candidates
    does not score every article in the window."""

    def __init__(self, counts: Mapping[str, Popularity], prior: float | None,
                 strength: float = PRIOR_STRENGTH) -> None:
        self.counts, self.prior, self.strength = counts, prior, strength

    def __getitem__(self, news_id: str) -> float:
        p = self.counts[news_id]
        return float(p.clicks) if self.prior is None else smoothed_ctr(p.clicks, p.shows, self.prior, self.strength)

    def __iter__(self) -> Iterator[str]:
        return iter(self.counts)

    def __len__(self) -> int:
        return len(self.counts)


def trending_scores(counts: Mapping[str, Popularity], strength: float = PRIOR_STRENGTH) -> dict[str, float]:
    """Score per news id: smoothed CTR, or the click count when nothing was ever shown."""
    return dict(TrendingScores(counts, prior_ctr(counts), strength))


def bucket_of(ts: datetime, bucket_s: float = BUCKET_S) -> int:
    return int(ts.timestamp() // bucket_s)


class _Counts(Mapping[str, Popularity]):
    """A read-only view of the counter's running totals."""

    def __init__(self, totals: dict[str, list[float]]) -> None:
        self._totals = totals

    def __getitem__(self, news_id: str) -> Popularity:
        clicks, shows, first = self._totals[news_id]
        return Popularity(int(clicks), int(shows), first)

    def __iter__(self) -> Iterator[str]:
        return iter(self._totals)

    def __len__(self) -> int:
        return len(self._totals)


class TrendingCounter:
    """Clicks and shows per article in time buckets over a sliding horizon, with running
    totals, so reading the window costs nothing per article: ``popularity(now)`` drops the
    buckets that slid out of the horizon and returns a live view of everything added since.

    Offline it is fed strictly in time order, reading before adding, so an impression
    never sees its own clicks.
    """

    def __init__(self, bucket_s: float = BUCKET_S, horizon_s: float = HORIZON_S) -> None:
        if bucket_s <= 0 or horizon_s < bucket_s:
            raise ValueError("bucket_s must be positive and horizon_s at least one bucket")
        self.bucket_s, self.horizon_s = bucket_s, horizon_s
        # bucket -> news_id -> [clicks, shows, first ts]; totals: news_id -> the same, summed
        self._buckets: dict[int, dict[str, list[float]]] = defaultdict(dict)
        self._totals: dict[str, list[float]] = {}
        self.shows = 0
        self.shown_clicks = 0  # sum over articles of min(clicks, shows): clicks that had an exposure

    def add(self, ts: datetime, *, shown: Iterable[str] = (), clicked: Iterable[str] = ()) -> None:
        bucket = self._buckets[bucket_of(ts, self.bucket_s)]
        t = ts.timestamp()
        for nid, is_click in [*((n, False) for n in shown), *((n, True) for n in clicked)]:
            total = self._totals.get(nid)
            before = min(total[0], total[1]) if total else 0
            for rows in (bucket, self._totals):
                row = rows.setdefault(nid, [0, 0, t])
                row[0 if is_click else 1] += 1
                row[2] = min(row[2], t)
            total = self._totals[nid]
            self.shown_clicks += min(total[0], total[1]) - before
            self.shows += not is_click

    def add_event(self, ts: datetime, domain: str, news_id: str | None) -> bool:
        """Count one user event: a ``news_click`` is a click, an ``impression`` a show; any
        other domain (or no news_id) is not trending evidence. True when counted."""
        kind = TRENDING_KINDS.get(domain)
        if kind is None or not news_id:
            return False
        self.add(ts, **{kind: [news_id]})
        return True

    def _slide(self, now: datetime) -> None:
        oldest = bucket_of(now, self.bucket_s) - int(self.horizon_s // self.bucket_s) + 1
        for b in sorted(b for b in self._buckets if b < oldest):
            for nid, (clicks, shows, first) in self._buckets.pop(b).items():
                row = self._totals[nid]
                before = min(row[0], row[1])
                row[0] -= clicks
                row[1] -= shows
                self.shows -= int(shows)
                self.shown_clicks -= int(before - min(row[0], row[1]))
                if row[0] <= 0 and row[1] <= 0:
                    del self._totals[nid]
                elif row[2] == first:  # its first sighting slid out: the next one is the first now
                    row[2] = min(r[nid][2] for r in self._buckets.values() if nid in r)

    def popularity(self, now: datetime) -> Mapping[str, Popularity]:
        self._slide(now)
        return _Counts(self._totals)

    def prior(self, now: datetime) -> float | None:
        """The window's click-through rate (None when nothing was shown)."""
        self._slide(now)
        return self.shown_clicks / self.shows if self.shows else None
