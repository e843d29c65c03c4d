"""Overload: bursts produced much faster than the worker refreshes.

The worker must keep memory flat (state bounded by users, not events), coalesce refreshes per
user (at most one queued each, recommendations paced by the debounce interval, not by events)
and drain its consumer lag after each burst. Real parts: the session's local broker, a
`newsrec worker` process (tiny model, embedded search), confluent-kafka clients, psutil.
The pure summary functions of :mod:`tools.overload` are unit-tested first.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.faults.conftest import REPORT_DIR_ENV
from tests.streaming import (
    FaultCounts,
    Stack,
    expected_window,
    fault_counts,
    read_topic,
    wait_for_windows,
    worker_settings,
)
from tools.bench import settings_from_env
from tools.overload import (
    RSS_GROWTH_BOUND_MB,
    BurstMarks,
    Sample,
    consumer_lag,
    debounce_bound,
    rate_series,
    run_overload,
    summarise,
    write_report,
)

# -- pure core ------------------------------------------------------------------------------


def _sample(t: float, *, produced: int = 0, lag: int | None = 0, rss: float | None = 500.0, applied: int = 0,
            recs: int = 0, queued: int = 0) -> Sample:
    return Sample(t=t, produced=produced, lag=lag, committed=produced - (lag or 0), rss_mb=rss,
                  events_applied=applied, recommendations_out=recs, queued=queued, in_flight=0)


def _two_bursts(rss_end_2: float, *, queued: int = 10, recs_2: int = 20) -> list[Sample]:
    """Burst 1 over t 1-5 (warm-up, settling at 600 MB; 25 recommendations), burst 2 over t 7-11
    settling at ``rss_end_2`` with ``recs_2`` recommendations."""
    return [
        _sample(0, rss=450),
        _sample(1, rss=450),
        _sample(2, produced=1000, lag=1000, rss=580, queued=queued, recs=5),
        _sample(4, produced=1000, lag=300, rss=600, applied=700, queued=4, recs=20),
        _sample(5, produced=1000, lag=0, rss=640, applied=1000, recs=25),  # the last batch's buffers
        _sample(7, produced=1000, lag=0, rss=600, applied=1000, recs=25),
        _sample(8, produced=2000, lag=900, rss=620, applied=1100, queued=queued, recs=30),
        _sample(11, produced=2000, lag=0, rss=rss_end_2, applied=2000, recs=25 + recs_2),
    ]


MARKS = [BurstMarks(1, 1000, 10, started=1.5, produced=2.0, drained=5.0),
         BurstMarks(2, 1000, 10, started=7.5, produced=8.0, drained=11.0)]


def test_consumer_lag_counts_uncommitted_records_from_each_partitions_start() -> None:
    high = {0: 100, 1: 50, 2: 7}
    # Partition 1 never committed: its whole retained range (from its low watermark) lags.
    assert consumer_lag(high, {0: 90, 1: None, 2: 7}, {1: 20}) == 10 + 30 + 0
    assert consumer_lag(high, {0: 100, 1: 50, 2: 7}, {}) == 0
    assert consumer_lag({0: 5}, {0: 9}, {}) == 0  # a commit past the end never counts negative


def test_debounce_bound_is_one_refresh_per_user_at_once_then_one_per_interval() -> None:
    assert debounce_bound(30, 0.0, 2.0) == 30
    assert debounce_bound(30, 5.9, 2.0) == 30 * 3
    assert debounce_bound(30, 6.0, 2.0) == 30 * 4
    with pytest.raises(ValueError):
        debounce_bound(30, 6.0, 0.0)


def test_rate_series_differences_cumulative_counts_and_skips_gaps() -> None:
    samples = [_sample(0, applied=0), _sample(1, applied=300),
               Sample(2, 0, None, None, None, None, None, None, None), _sample(3, applied=700)]
    assert rate_series(samples, "events_applied") == [(1, 300.0), (3, 200.0)]


def test_summary_of_a_flat_coalesced_drained_run() -> None:
    summary = summarise(_two_bursts(604.0), MARKS, users=10, min_interval_s=2.0)
    b1, b2 = summary["bursts"]
    assert (b1["peak_lag"], b1["max_queued"], b1["recommendations"]) == (1000, 10, 25)
    assert (b1["rss_peak_mb"], b1["rss_settled_mb"]) == (640, 600)  # settled: after the idle pause
    assert b1["drain_s"] == 3.0 and b1["events_per_s"] == round(1000 / 3.5, 1)
    # Counters are read from the samples around the burst (t 7 and 11): 4 s → 1 + 2 refreshes per user.
    assert b2["recommendations"] == 20 and b2["debounce_bound"] == 10 * 3
    assert summary["rss_growth_mb"] == 4.0 and summary["rss_growth_kb_per_1k_events"] == 4096.0
    assert summary["events_per_recommendation"] == round(2000 / 45, 1) and summary["final_lag"] == 0
    assert summary["verdict"] == {"rss_flat": True, "coalesced": True, "drained": True}


def test_summary_verdicts_fail_on_growth_queueing_pacing_and_a_burst_that_never_drained() -> None:
    grown = summarise(_two_bursts(600 + RSS_GROWTH_BOUND_MB + 1), MARKS, users=10, min_interval_s=2.0)
    assert grown["verdict"]["rss_flat"] is False
    queued = summarise(_two_bursts(604.0, queued=11), MARKS, users=10, min_interval_s=2.0)
    assert queued["max_queued"] == 11 and queued["verdict"]["coalesced"] is False
    # One refresh more than the debounce interval allows in burst 2.
    unpaced = summarise(_two_bursts(604.0, recs_2=31), MARKS, users=10, min_interval_s=2.0)
    assert unpaced["verdict"]["coalesced"] is False
    stuck = [MARKS[0], BurstMarks(2, 1000, 10, started=7.5, produced=8.0, drained=None)]
    undrained = summarise(_two_bursts(604.0)[:-1], stuck, users=10, min_interval_s=2.0)
    assert undrained["verdict"]["drained"] is False and undrained["bursts"][1]["drained"] is False


# -- on the real stack ----------------------------------------------------------------------

USERS = 30
EVENTS = 5000  # per burst: 166 events per user, more than a window holds (30), so burst 1 fills every window
BURSTS = 3  # settled RSS is compared after burst 1 (warm-up) and after burst 3: 10,000 events later
DEBOUNCE_S = 2.0  # the production default: refreshes are paced by time, whatever the event rate


@pytest.mark.integration
def test_overload_keeps_memory_flat_coalesces_refreshes_and_drains(
        stack: Stack, tmp_path: Path, fault_report: Callable[[FaultCounts], None]) -> None:
    started = time.monotonic()
    extra = {"NEWSREC_REFRESH_MIN_INTERVAL_S": str(DEBOUNCE_S)}
    worker = stack.start_worker(**extra)
    report = run_overload(settings_from_env(stack.env | extra), worker, events=EVENTS, users=USERS, bursts=BURSTS,
                          pause_s=2.0, burst_timeout_s=90.0)
    out = Path(os.environ.get(REPORT_DIR_ENV) or tmp_path)
    write_report(report, out / "overload.json", out / "overload.png")
    summary = report["summary"]
    print(f"overload: {time.monotonic() - started:.0f} s, {summary['events']} events, "
          f"{summary['recommendations']} recommendations, max queued {summary['max_queued']}, peak lag "
          f"{summary['peak_lag']}, RSS {[b['rss_settled_mb'] for b in summary['bursts']]} MB settled after each burst")
    bursts = summary["bursts"]

    # Overload really happened: the broker took events faster than the worker applied them.
    assert all(b["produce_events_per_s"] > b["events_per_s"] for b in bursts), bursts
    assert summary["peak_lag"] >= EVENTS // 2, summary["peak_lag"]
    # Drained: every user's last event of every burst got its recommendation and the lag is 0,
    # and the worker's group (the faust app id) committed every event produced.
    assert all(b["drained"] for b in bursts), bursts
    last = report["samples"][-1]
    assert last["lag"] == 0 and last["committed"] == last["produced"] == EVENTS * BURSTS, last
    # Coalesced: never more than one queued refresh per user, and recommendations paced by the
    # debounce interval (the policy's own bound), so far fewer than events.
    assert summary["max_queued"] is not None and 0 < summary["max_queued"] <= USERS, summary["max_queued"]
    for b in bursts:
        assert b["recommendations"] <= b["debounce_bound"], b
    assert summary["recommendations"] * 5 <= summary["events"], summary["recommendations"]
    # Flat memory: see RSS_GROWTH_BOUND_MB for why this bound separates "bounded" from "per event".
    assert summary["rss_growth_mb"] <= RSS_GROWTH_BOUND_MB, (
        f"worker RSS grew {summary['rss_growth_mb']} MB from after burst 1 to after burst {BURSTS} "
        f"({[b['rss_settled_mb'] for b in bursts]}); report in {out}")
    assert (out / "overload.png").stat().st_size > 10_000

    # Nothing lost, measured from the topics: every user's window equals the fault-free one
    # (the newest window_max_signals events it was sent), nothing dead-lettered.
    events: dict[str, list[dict]] = {}
    for _, ev in read_topic(stack.bootstrap, stack.topic("events")):  # per key in send order
        events.setdefault(ev["user_id"], []).append(ev)
    settings = worker_settings(stack.env | extra)
    expected = {user: expected_window(evs, settings) for user, evs in events.items()}
    served = wait_for_windows(worker.url, expected)
    published = Counter(v["trigger_event_id"] for _, v in read_topic(stack.bootstrap, stack.topic("recommendations")))
    dlq = read_topic(stack.bootstrap, stack.topic("dlq"))
    counts = fault_counts("overload-3x5000", events, served, published, len(dlq), started)
    fault_report(counts)
    assert counts.events_sent == EVENTS * BURSTS and len(events) == USERS
    assert served == expected, [u for u in expected if served[u] != expected[u]]
    assert counts.events_in_state == USERS * settings.window_max_signals  # full windows, bounded
    assert dlq == [], f"valid events were dead-lettered: {dlq[:3]}"
