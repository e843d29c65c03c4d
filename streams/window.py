"""Each user's rolling signal window: pure maths, no I/O.

The window is defined by the *set* of events seen, not by arrival order: it keeps the
``max_signals`` newest signals whose event time lies within ``max_age_s`` of the newest
one. Replaying or reordering events (at-least-once delivery, rebalances) therefore
yields the same window.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from streams.contracts import UserEvent


@dataclass(frozen=True, slots=True)
class Signal:
    event_id: str
    domain: str
    text: str
    ts: datetime
    news_id: str | None = None

    @classmethod
    def from_event(cls, event: UserEvent) -> Signal:
        return cls(event.event_id, event.domain, event.text, event.ts, event.news_id)

    def to_json(self) -> dict[str, Any]:
        return {"event_id": self.event_id, "domain": self.domain, "text": self.text,
                "ts": self.ts.isoformat(), "news_id": self.news_id}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Signal:
        return cls(data["event_id"], data["domain"], data["text"], datetime.fromisoformat(data["ts"]),
                   data.get("news_id"))


@dataclass(frozen=True, slots=True)
class UserState:
    """What the worker keeps per user (one row of the changelog-backed table)."""

    signals: tuple[Signal, ...] = ()
    clicked: tuple[str, ...] = ()
    # Newest event not yet reflected in a published recommendation, and the source
    # partition it came from (refresh completions are routed back to that partition).
    pending_trigger: str | None = None
    pending_partition: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {"signals": [s.to_json() for s in self.signals], "clicked": list(self.clicked),
                "pending_trigger": self.pending_trigger, "pending_partition": self.pending_partition}

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> UserState:
        if not data:
            return cls()
        return cls(tuple(Signal.from_json(s) for s in data.get("signals", ())), tuple(data.get("clicked", ())),
                   data.get("pending_trigger"), data.get("pending_partition"))


def add_signal(signals: tuple[Signal, ...], new: Signal, *, max_signals: int, max_age_s: float) -> tuple[Signal, ...]:
    """The window after ``new`` arrives, newest first; idempotent by event_id."""
    merged = {s.event_id: s for s in signals}
    merged.setdefault(new.event_id, new)
    ordered = sorted(merged.values(), key=lambda s: (s.ts, s.event_id), reverse=True)
    cutoff = ordered[0].ts - timedelta(seconds=max_age_s)
    return tuple(s for s in ordered if s.ts >= cutoff)[:max_signals]


def remember_click(clicked: tuple[str, ...], news_id: str | None, *, limit: int) -> tuple[str, ...]:
    """Most recent clicked news ids (newest last), bounded; used to drop already-read items."""
    if not news_id or limit == 0:
        return clicked[-limit:] if limit else ()
    return (tuple(c for c in clicked if c != news_id) + (news_id,))[-limit:]


EXPOSURE_DOMAINS = frozenset({"impression"})  # shown to the user: neither an interest nor a click


def apply_event(state: UserState, event: UserEvent, partition: int, *, max_signals: int, max_age_s: float,
                clicked_memory: int) -> UserState:
    """The new state after one valid event; the event becomes the pending refresh trigger.

    An exposure (``impression``) leaves the signals (what prompts are built from) and the
    clicks as they are: being shown an article says nothing of interest. It still becomes the
    pending trigger, because the worker schedules a refresh for every event it applies and
    clears ``pending_trigger`` only when the refresh of that very event is published."""
    signals = state.signals
    if event.domain not in EXPOSURE_DOMAINS:
        signals = add_signal(signals, Signal.from_event(event), max_signals=max_signals, max_age_s=max_age_s)
    return replace(
        state,
        signals=signals,
        clicked=remember_click(state.clicked, event.news_id if event.domain == "news_click" else None,
                               limit=clicked_memory),
        pending_trigger=event.event_id,
        pending_partition=partition,
    )


def complete_refresh(state: UserState, trigger_event_id: str) -> UserState:
    """Clear the pending trigger if the published recommendation covered it."""
    if state.pending_trigger == trigger_event_id:
        return replace(state, pending_trigger=None, pending_partition=None)
    return state
