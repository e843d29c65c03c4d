"""When to refresh whom: the debounce policy and the coalescing queue. Pure (time is passed in).

A user is refreshed at once when cold (never refreshed by this worker), otherwise no
sooner than ``min_interval_s`` after the previous refresh. However many events arrive
meanwhile, a user has at most one queued refresh (coalescing), carrying the newest
trigger: memory stays bounded by the number of users, not of events.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Refresh:
    user_id: str
    trigger_event_id: str
    partition: int
    due_at: float
    first_seen_at: float  # when the oldest event covered by this refresh arrived


def due_time(now: float, last_refresh_at: float | None, min_interval_s: float) -> float:
    if last_refresh_at is None:
        return now
    return max(now, last_refresh_at + min_interval_s)


class RefreshQueue:
    """Per-user pending refreshes; at most one each, and none while one is in flight."""

    def __init__(self, min_interval_s: float) -> None:
        self.min_interval_s = min_interval_s
        self._pending: dict[str, Refresh] = {}
        self._in_flight: set[str] = set()
        self._last_refresh: dict[str, float] = {}
        self._published: dict[str, str] = {}  # user -> trigger published, completion not yet seen

    def __len__(self) -> int:
        return len(self._pending)

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def schedule(self, user_id: str, trigger_event_id: str, partition: int, now: float) -> Refresh:
        queued = self._pending.get(user_id)
        if queued is None:
            due = due_time(now, self._last_refresh.get(user_id), self.min_interval_s)
            refresh = Refresh(user_id, trigger_event_id, partition, due, now)
        else:
            refresh = Refresh(user_id, trigger_event_id, partition, queued.due_at, queued.first_seen_at)
        self._pending[user_id] = refresh
        return refresh

    def is_known(self, user_id: str, trigger_event_id: str | None = None) -> bool:
        """Queued, in flight, or ``trigger_event_id`` already published by this worker."""
        if user_id in self._pending or user_id in self._in_flight:
            return True
        return trigger_event_id is not None and self._published.get(user_id) == trigger_event_id

    def next_due(self) -> float | None:
        ready = [r.due_at for u, r in self._pending.items() if u not in self._in_flight]
        return min(ready) if ready else None

    def take_due(self, now: float, limit: int) -> list[Refresh]:
        """Pop up to ``limit`` due refreshes (earliest first) and mark them in flight."""
        due = sorted((r for u, r in self._pending.items() if r.due_at <= now and u not in self._in_flight),
                     key=lambda r: (r.due_at, r.first_seen_at))[:limit]
        for r in due:
            del self._pending[r.user_id]
            self._in_flight.add(r.user_id)
            self._last_refresh[r.user_id] = now
        return due

    def finish(self, refreshes: list[Refresh], now: float) -> None:
        """Refreshes published: users queued meanwhile wait out the interval."""
        for r in refreshes:
            user_id = r.user_id
            self._in_flight.discard(user_id)
            self._published[user_id] = r.trigger_event_id
            queued = self._pending.get(user_id)
            if queued is not None:
                due = due_time(now, self._last_refresh.get(user_id), self.min_interval_s)
                self._pending[user_id] = Refresh(user_id, queued.trigger_event_id, queued.partition,
                                                 max(queued.due_at, due), queued.first_seen_at)

    def retry(self, refreshes: list[Refresh], due_at: float) -> None:
        """Put failed refreshes back (unless a newer one was queued meanwhile)."""
        for r in refreshes:
            self._in_flight.discard(r.user_id)
            queued = self._pending.get(r.user_id)
            self._pending[r.user_id] = queued or Refresh(r.user_id, r.trigger_event_id, r.partition, due_at,
                                                         r.first_seen_at)

    def acknowledge(self, user_id: str, trigger_event_id: str) -> None:
        """The completion of a published refresh reached the table."""
        if self._published.get(user_id) == trigger_event_id:
            del self._published[user_id]

    def prune(self, now: float) -> None:
        """Forget refresh times that can no longer delay anyone (bounds memory)."""
        horizon = now - self.min_interval_s
        for user_id in [u for u, t in self._last_refresh.items() if t < horizon]:
            del self._last_refresh[user_id]

    def forget_partitions(self, partitions: set[int]) -> None:
        """Drop queued refreshes of partitions this worker no longer owns."""
        for user_id in [u for u, r in self._pending.items() if r.partition in partitions]:
            del self._pending[user_id]
