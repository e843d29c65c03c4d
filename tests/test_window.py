from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from streams.contracts import UserEvent
from streams.window import Signal, UserState, add_signal, apply_event, complete_refresh, remember_click

T0 = datetime(2026, 11, 1, tzinfo=UTC)


def sig(i: int, minutes: float) -> Signal:
    return Signal(f"e{i}", "search", f"text {i}", T0 + timedelta(minutes=minutes))


def build(signals, **kw):
    window: tuple[Signal, ...] = ()
    for s in signals:
        window = add_signal(window, s, **kw)
    return window


def test_window_keeps_newest_by_count():
    window = build([sig(i, i) for i in range(10)], max_signals=3, max_age_s=1e9)
    assert [s.event_id for s in window] == ["e9", "e8", "e7"]


def test_window_drops_signals_older_than_max_age_of_newest():
    window = build([sig(0, 0), sig(1, 30), sig(2, 90)], max_signals=10, max_age_s=3600)
    assert [s.event_id for s in window] == ["e2", "e1"]


def test_replayed_event_does_not_change_window():
    signals = [sig(i, i) for i in range(5)]
    window = build(signals, max_signals=10, max_age_s=1e9)
    assert add_signal(window, signals[2], max_signals=10, max_age_s=1e9) == window


@given(st.lists(st.tuples(st.integers(0, 30), st.integers(0, 500)), max_size=40),
       st.integers(1, 8), st.integers(1, 400), st.randoms())
def test_window_depends_on_the_set_of_events_not_their_order(items, max_signals, max_age_min, rnd):
    signals = [sig(i, m) for i, m in {i: m for i, m in items}.items()]
    kw = {"max_signals": max_signals, "max_age_s": max_age_min * 60}
    shuffled = signals[:]
    rnd.shuffle(shuffled)
    replayed = shuffled + shuffled[: len(shuffled) // 2]
    a, b = build(signals, **kw), build(replayed, **kw)
    assert a == b
    assert len(a) <= max_signals
    if a:
        assert all(a[0].ts - s.ts <= timedelta(seconds=kw["max_age_s"]) for s in a)


def test_clicks_are_remembered_bounded_and_deduplicated():
    clicked: tuple[str, ...] = ()
    for nid in ["n1", "n2", "n1", "n3", "n4"]:
        clicked = remember_click(clicked, nid, limit=3)
    assert clicked == ("n1", "n3", "n4")
    assert remember_click(clicked, None, limit=3) == clicked


def test_apply_event_sets_pending_and_completion_clears_only_matching_trigger():
    ev = UserEvent(event_id="e1", user_id="u1", ts=T0, domain="news_click", text="a story", news_id="N1")
    state = apply_event(UserState(), ev, 3, max_signals=5, max_age_s=60, clicked_memory=10)
    assert state.pending_trigger == "e1" and state.pending_partition == 3 and state.clicked == ("N1",)
    assert complete_refresh(state, "other").pending_trigger == "e1"
    assert complete_refresh(state, "e1").pending_trigger is None
    assert UserState.from_json(state.to_json()) == state
