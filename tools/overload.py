"""Overload: events produced much faster than the worker can refresh.

What must hold (README "Overload"): the worker's memory stays flat (state is bounded by
users, not by events), refreshes coalesce per user (at most one queued per user, far fewer
recommendations than events) and the consumer lag drains once the burst is over.

Pure core: :class:`Sample` / :class:`BurstMarks` and the functions that summarise them
(:func:`summarise`, :func:`consumer_lag`, :func:`debounce_bound`, :func:`rate_series`).
I/O shell: :func:`run_overload` drives a running worker (bursts from a producer, a sampler
thread reading RSS, consumer-group lag and ``/stats``), :func:`write_report` writes JSON
and a PNG, :func:`run_faults_bench` is ``newsrec bench faults`` on its own local broker.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from itertools import pairwise
from pathlib import Path
from typing import Any

from confluent_kafka import KafkaException

from streams.producer import NewsrecProducer
from streams.reader import RecommendationReader
from streams.settings import WorkerSettings
from tools.bench import Tally, default_model_dir, local_stack, synthetic_event
from tools.stack import WorkerProcess

log = logging.getLogger(__name__)

# Settled RSS (after each burst's idle pause) may grow at most this much from the first burst
# (the warm-up: every user's window, table rows and queue entries exist) to the last. Measured
# here: with onnxruntime's CPU arena and memory patterns off and a fixed glibc mmap threshold,
# settled RSS moved -14..+15 MB from one burst to the next (allocator noise); with onnxruntime's
# defaults its arena ratchets up 35..155 MB between bursts in about half the runs. Memory kept per
# event shows once it adds up: a parsed event with its raw bytes is 1.6 KB (measured), so this
# catches >= 2.4 KB per event over the test's 10,000 events after warm-up, >= 0.8 KB over the
# 30,000 of `bench faults`' defaults.
RSS_GROWTH_BOUND_MB = 24.0


# -- pure core -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sample:
    """One look at the system; None where a probe did not answer in time."""

    t: float  # seconds since the scenario started
    produced: int  # events the broker acknowledged so far
    lag: int | None  # consumer-group lag of the worker on the events topic
    committed: int | None  # the group's committed offsets on the events topic, summed
    rss_mb: float | None  # worker RSS incl. child processes
    events_applied: int | None  # /stats counters of the worker
    recommendations_out: int | None
    queued: int | None  # refreshes waiting in the worker's queue (at most one per user)
    in_flight: int | None


@dataclass(frozen=True, slots=True)
class BurstMarks:
    """When one burst started, finished producing and drained (None: it did not, in time)."""

    index: int
    events: int
    users: int
    started: float
    produced: float
    drained: float | None


def consumer_lag(high: dict[int, int], committed: dict[int, int | None], low: dict[int, int]) -> int:
    """Records not yet committed, over partitions; a partition without a commit lags from its start.

    Right on the local broker only while producers write one-record batches: Tansu's high
    watermark is the first offset of the last batch + 1 (see INFRA.md).
    """
    total = 0
    for p, end in high.items():
        done = committed.get(p)
        total += max(0, end - (done if done is not None and done >= 0 else low.get(p, 0)))
    return total


def debounce_bound(users: int, duration_s: float, min_interval_s: float) -> int:
    """Most refreshes the policy allows in ``duration_s``: per user one at once, then one per interval."""
    if min_interval_s <= 0:
        raise ValueError("no debounce: refreshes are bounded only by events")
    return users * (math.floor(duration_s / min_interval_s) + 1)


def rate_series(samples: Sequence[Sample], field: str) -> list[tuple[float, float]]:
    """(t, per second) of a cumulative field between consecutive samples that have it."""
    points = [(s.t, getattr(s, field)) for s in samples if getattr(s, field) is not None]
    return [(t1, (v1 - v0) / (t1 - t0)) for (t0, v0), (t1, v1) in pairwise(points) if t1 > t0]


def _at(samples: Sequence[Sample], t: float, field: str, *, after: bool = False) -> Any:
    """The field's value in the last sample at or before ``t`` (first at or after, with ``after``)."""
    if after:
        return next((getattr(s, field) for s in samples if s.t >= t and getattr(s, field) is not None), None)
    return next((getattr(s, field) for s in reversed(samples) if s.t <= t and getattr(s, field) is not None), None)


def _max(samples: Sequence[Sample], field: str, start: float, end: float) -> Any:
    values = [getattr(s, field) for s in samples if start <= s.t <= end and getattr(s, field) is not None]
    return max(values) if values else None


def _round(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)


def summarise_burst(samples: Sequence[Sample], marks: BurstMarks, min_interval_s: float,
                    idle_until: float = math.inf) -> dict[str, Any]:
    """One burst's figures; ``idle_until`` is when the next burst started (the worker idled before)."""
    end = marks.drained if marks.drained is not None else (samples[-1].t if samples else marks.produced)
    produce_s = marks.produced - marks.started
    # Counters from the samples around the burst: one taken before it started, one after it drained.
    t_before = max((s.t for s in samples if s.t <= marks.started and s.recommendations_out is not None), default=None)
    t_after = min((s.t for s in samples if s.t >= end and s.recommendations_out is not None), default=None)
    recs = None
    if t_before is not None and t_after is not None:
        recs = _at(samples, t_after, "recommendations_out") - _at(samples, t_before, "recommendations_out")
    window_s = (t_after - t_before) if t_before is not None and t_after is not None else None
    return {
        "burst": marks.index, "events": marks.events, "users": marks.users,
        "produce_s": _round(produce_s, 2),
        "produce_events_per_s": _round(marks.events / produce_s if produce_s else None),
        "drained": marks.drained is not None,
        "drain_s": _round(end - marks.produced, 2),  # end of production → lag 0 and every user covered
        "total_s": _round(end - marks.started, 2),
        # Sustained: the burst's events over the time until all of them were reflected in recommendations.
        "events_per_s": _round(marks.events / (end - marks.started) if end > marks.started else None),
        "peak_lag": _max(samples, "lag", marks.started, end),
        "max_queued": _max(samples, "queued", marks.started, end),
        "recommendations": recs,
        "events_per_recommendation": _round(marks.events / recs if recs else None),
        "debounce_bound": debounce_bound(marks.users, window_s, min_interval_s)
        if window_s and min_interval_s > 0 else None,
        "rss_start_mb": _round(_at(samples, marks.started, "rss_mb")),
        "rss_peak_mb": _round(_max(samples, "rss_mb", marks.started, end)),
        # Settled: the last look before the next burst, after the idle pause, so buffers of the
        # burst's last refreshes are not mistaken for retained memory.
        "rss_settled_mb": _round(_at(samples, idle_until, "rss_mb")),
    }


def summarise(samples: Sequence[Sample], marks: Sequence[BurstMarks], *, users: int, min_interval_s: float,
              rss_bound_mb: float = RSS_GROWTH_BOUND_MB) -> dict[str, Any]:
    """Per-burst figures and the three verdicts: memory flat, refreshes coalesced, lag drained."""
    idle_until = [m.started for m in marks[1:]] + [math.inf]
    bursts = [summarise_burst(samples, m, min_interval_s, until) for m, until in zip(marks, idle_until, strict=True)]
    first, last = (bursts[0], bursts[-1]) if bursts else ({}, {})
    growth = None
    if len(bursts) > 1 and first["rss_settled_mb"] is not None and last["rss_settled_mb"] is not None:
        growth = round(last["rss_settled_mb"] - first["rss_settled_mb"], 1)
    later_events = sum(b["events"] for b in bursts[1:])
    per_1k = _round(growth * 1024 / (later_events / 1000)) if growth is not None and later_events else None
    events = sum(b["events"] for b in bursts)
    recs = [b["recommendations"] for b in bursts]
    total_recs = sum(recs) if recs and None not in recs else None
    max_queued = max((b["max_queued"] for b in bursts if b["max_queued"] is not None), default=None)
    final_lag = next((s.lag for s in reversed(samples) if s.lag is not None), None)
    return {
        "bursts": bursts,
        "events": events,
        "users": users,
        "recommendations": total_recs,
        "events_per_recommendation": _round(events / total_recs if total_recs else None),
        "max_queued": max_queued,
        "peak_lag": max((b["peak_lag"] for b in bursts if b["peak_lag"] is not None), default=None),
        "final_lag": final_lag,
        "rss_baseline_mb": _round(_at(samples, marks[0].started, "rss_mb")) if marks else None,
        "rss_growth_mb": growth,  # settled after the first burst → settled after the last
        "rss_growth_kb_per_1k_events": per_1k,
        "rss_growth_bound_mb": rss_bound_mb,
        "verdict": {
            "rss_flat": growth is not None and growth <= rss_bound_mb,
            "coalesced": (max_queued is not None and max_queued <= users and total_recs is not None
                          and all(b["recommendations"] <= b["debounce_bound"] for b in bursts
                                  if b["debounce_bound"] is not None)
                          and total_recs < events),
            "drained": bool(bursts) and all(b["drained"] for b in bursts) and final_lag == 0,
        },
    }


# -- I/O shell -------------------------------------------------------------------------------


class EventsLag:
    """The worker's consumer-group lag on the events topic (confluent-kafka AdminClient:
    aiokafka's admin fails against Tansu). The group id is the faust app id (aiokafka's
    ``group_id=conf.id``); :meth:`check_group` confirms the group exists on the broker."""

    def __init__(self, settings: WorkerSettings, timeout: float = 5.0) -> None:
        from confluent_kafka.admin import AdminClient

        self.settings, self.timeout = settings, timeout
        self.group = settings.app_id
        self.admin = AdminClient(settings.kafka_config())
        meta = self.admin.list_topics(settings.topic_events, timeout=timeout).topics[settings.topic_events]
        self.partitions = sorted(meta.partitions)

    def check_group(self) -> None:
        """The worker's group is active (Tansu lists no groups, but describes a live one as Stable)."""
        from confluent_kafka import ConsumerGroupState

        desc = self.admin.describe_consumer_groups([self.group])[self.group].result(timeout=self.timeout)
        if desc.state in (ConsumerGroupState.EMPTY, ConsumerGroupState.DEAD, ConsumerGroupState.UNKNOWN):
            raise RuntimeError(f"consumer group {self.group!r} (the worker's app id) is {desc.state.name}: "
                               "is the worker running with that app id?")

    def _offsets(self, spec: Any) -> dict[int, int]:
        from confluent_kafka import TopicPartition

        futures = self.admin.list_offsets({TopicPartition(self.settings.topic_events, p): spec
                                           for p in self.partitions})
        return {tp.partition: f.result(timeout=self.timeout).offset for tp, f in futures.items()}

    def committed(self) -> dict[int, int | None]:
        from confluent_kafka import ConsumerGroupTopicPartitions, TopicPartition

        request = ConsumerGroupTopicPartitions(
            self.group, [TopicPartition(self.settings.topic_events, p) for p in self.partitions])
        result = next(iter(self.admin.list_consumer_group_offsets([request]).values())).result(timeout=self.timeout)
        return {tp.partition: (tp.offset if tp.offset >= 0 else None) for tp in result.topic_partitions}

    def measure(self) -> tuple[int, int]:
        """(lag, committed records summed)."""
        from confluent_kafka.admin import OffsetSpec

        committed = self.committed()
        low = self._offsets(OffsetSpec.earliest()) if None in committed.values() else {}
        return consumer_lag(self._offsets(OffsetSpec.latest()), committed, low), sum(
            c for c in committed.values() if c is not None)


def worker_rss_mb(pid: int) -> float | None:
    import psutil

    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
        return sum(p.memory_info().rss for p in procs) / 2**20
    except psutil.Error:
        return None


class Sampler(threading.Thread):
    """Every ``interval_s``: RSS, lag, produced, /stats. A slow probe leaves its fields None."""

    def __init__(self, worker: WorkerProcess, lag: EventsLag, produced: Callable[[], int], t0: float,
                 interval_s: float = 0.5) -> None:
        super().__init__(name="overload-sampler", daemon=True)
        self.worker, self.lag, self.produced, self.t0, self.interval_s = worker, lag, produced, t0, interval_s
        self.samples: list[Sample] = []
        self.error: BaseException | None = None
        self._halt = threading.Event()

    def take(self) -> Sample:
        try:
            lag, committed = self.lag.measure()
        except (KafkaException, TimeoutError) as exc:  # a slow broker answer is a gap, not a failed run
            log.warning("lag probe failed: %s", exc)
            lag = committed = None
        try:
            stats = self.worker.stats()
        except (OSError, ValueError) as exc:
            log.warning("/stats probe failed: %s", exc)
            stats = {}
        counters = stats.get("counters", {})
        assert self.worker.proc is not None
        return Sample(t=round(time.monotonic() - self.t0, 3), produced=self.produced(), lag=lag, committed=committed,
                      rss_mb=_round(worker_rss_mb(self.worker.proc.pid), 2),
                      events_applied=counters.get("events_applied", 0) if stats else None,
                      recommendations_out=counters.get("recommendations_out", 0) if stats else None,
                      queued=stats.get("queued"), in_flight=stats.get("in_flight"))

    def run(self) -> None:
        try:
            while not self._halt.is_set():
                started = time.monotonic()
                self.samples.append(self.take())
                self._halt.wait(max(0.0, self.interval_s - (time.monotonic() - started)))
        except BaseException as exc:  # kept for the driver: a dead sampler would read as "never drained"
            self.error = exc
            raise

    def latest(self) -> Sample | None:
        return self.samples[-1] if self.samples else None

    def stop(self) -> list[Sample]:
        self._halt.set()
        self.join(10)
        return list(self.samples)


def _produce_burst(producer: NewsrecProducer, reader: RecommendationReader, tally: Tally, *, events: int,
                   users: int, seq0: int, tag: str, start_ts: datetime) -> None:
    """Round-robin over users, as fast as the producer takes them (no pacing)."""
    for i in range(events):
        event = synthetic_event(i % users, seq0 + i // users, start_ts, tag)
        tally.sent(event)
        producer.send_event(event)
        if i % 500 == 0:  # keep reading: recommendations arriving meanwhile keep their arrival times
            for rec, arrived in reader.poll(0):
                tally.received(rec, arrived)
    producer.flush(120)


def run_overload(settings: WorkerSettings, worker: WorkerProcess, *, events: int, users: int, bursts: int = 2,
                 interval_s: float = 0.5, pause_s: float = 3.0, burst_timeout_s: float = 300.0) -> dict[str, Any]:
    """``bursts`` bursts of ``events`` events over the same ``users`` users against a ready worker.

    Each burst is produced as fast as possible; the next one starts once the previous has
    drained (lag 0 on the events topic and every user's last event has its recommendation)
    plus ``pause_s`` idle. Returns the report: config, marks, samples and the summary.
    """
    lag = EventsLag(settings)
    lag.check_group()
    tag, start_ts = uuid.uuid4().hex[:6], datetime.now(UTC)
    marks: list[BurstMarks] = []
    group = f"newsrec-overload-{uuid.uuid4().hex[:8]}"
    with RecommendationReader(settings.consumer_config(group), settings.topic_recommendations) as reader, \
            NewsrecProducer(settings) as producer:
        reader.wait_assigned()
        t0 = time.monotonic()
        sampler = Sampler(worker, lag, lambda: producer.delivered, t0, interval_s)
        sampler.start()
        try:
            time.sleep(pause_s)  # a baseline before the first burst
            for b in range(bursts):
                tally = Tally(settings.refresh_min_interval_s)  # one per burst: "done" is about this burst
                started = time.monotonic() - t0
                log.info("burst %d/%d: %d events over %d users", b + 1, bursts, events, users)
                _produce_burst(producer, reader, tally, events=events, users=users, seq0=b * -(-events // users),
                               tag=tag, start_ts=start_ts)
                produced = time.monotonic() - t0
                drained = _wait_drained(reader, tally, sampler, produced, t0, burst_timeout_s)
                marks.append(BurstMarks(b + 1, events, users, round(started, 3), round(produced, 3),
                                        None if drained is None else round(drained, 3)))
                log.info("burst %d: produced in %.1fs, %s", b + 1, produced - started,
                         "drained after %.1fs" % (drained - produced) if drained else "NOT drained")
                time.sleep(pause_s)
        finally:
            samples = sampler.stop()
    summary = summarise(samples, marks, users=users, min_interval_s=settings.refresh_min_interval_s)
    config = {"events_per_burst": events, "users": users, "bursts": bursts, "sample_interval_s": interval_s,
              "app_id": settings.app_id, "topic_events": settings.topic_events,
              "partitions": lag.partitions, "refresh_min_interval_s": settings.refresh_min_interval_s,
              "batch_max_users": settings.batch_max_users, "window_max_signals": settings.window_max_signals}
    return {"generated_at": datetime.now(UTC).isoformat(), "config": config,
            "marks": [asdict(m) for m in marks], "samples": [asdict(s) for s in samples], "summary": summary}


def _wait_drained(reader: RecommendationReader, tally: Tally, sampler: Sampler, produced: float, t0: float,
                  timeout_s: float) -> float | None:
    """Seconds since t0 when lag was 0 (sampled after production ended) and every user was covered."""
    deadline = time.monotonic() + timeout_s
    covered_at: float | None = None
    while time.monotonic() < deadline:
        if not sampler.is_alive():
            raise RuntimeError("the sampler stopped") from sampler.error
        for rec, arrived in reader.poll(0.2):
            tally.received(rec, arrived)
        if covered_at is None and len(tally.done) >= len(tally.last_event):
            covered_at = time.monotonic() - t0
        last = sampler.latest()
        if covered_at is not None and last is not None and last.t > produced and last.lag == 0:
            return max(covered_at, last.t)
    return None


def write_report(report: dict[str, Any], json_path: Path, png_path: Path) -> None:
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2))
    plot_overload([Sample(**s) for s in report["samples"]], [BurstMarks(**m) for m in report["marks"]],
                  report["summary"], png_path)


def plot_overload(samples: Sequence[Sample], marks: Sequence[BurstMarks], summary: dict[str, Any],
                  path: Path) -> Path:
    """Three panels over time: events vs recommendations, lag (and queued), worker RSS."""
    from training.plots import pyplot, save_figure

    plt = pyplot()
    fig, (ax_ev, ax_lag, ax_rss) = plt.subplots(3, 1, figsize=(9, 8.5), sharex=True)
    t = [s.t for s in samples]

    def series(field: str) -> tuple[list[float], list[Any]]:
        pts = [(s.t, getattr(s, field)) for s in samples if getattr(s, field) is not None]
        return ([p[0] for p in pts], [p[1] for p in pts]) if pts else ([], [])

    ax_ev.plot(t, [s.produced for s in samples], label="events produced")
    ax_ev.plot(*series("events_applied"), label="events applied by the worker")
    ax_ev.plot(*series("recommendations_out"), label="recommendations published")
    ax_ev.set_ylabel("cumulative count")
    rates = rate_series(samples, "events_applied")
    if rates:
        twin = ax_ev.twinx()
        twin.plot([r[0] for r in rates], [r[1] for r in rates], color="grey", lw=0.8, alpha=0.6)
        twin.set_ylabel("events applied / s", color="grey")
    ax_ev.legend(loc="upper left", fontsize="small")
    ax_ev.set_title(f"overload: {summary['events']} events, {summary['users']} users, "
                    f"{len(marks)} bursts → {summary['recommendations']} recommendations")

    ax_lag.plot(*series("lag"), color="tab:red", label="consumer lag (events)")
    ax_lag.set_ylabel("lag (records)")
    twin = ax_lag.twinx()
    twin.plot(*series("queued"), color="tab:purple", lw=0.8, label="queued refreshes")
    twin.axhline(summary["users"], color="tab:purple", ls=":", lw=0.8)
    twin.set_ylabel(f"queued refreshes (≤ {summary['users']} users)", color="tab:purple")
    ax_lag.legend(loc="upper left", fontsize="small")

    ax_rss.plot(*series("rss_mb"), color="tab:green")
    ax_rss.set_ylabel("worker RSS (MB)")
    ax_rss.set_xlabel("seconds")
    ax_rss.set_title(f"RSS growth, settled after burst 1 → {len(marks)}: {summary.get('rss_growth_mb')} MB "
                     f"(bound {summary.get('rss_growth_bound_mb')} MB)", fontsize="small")
    for ax in (ax_ev, ax_lag, ax_rss):
        for m in marks:
            ax.axvspan(m.started, m.drained if m.drained is not None else m.produced, color="orange", alpha=0.12)
        ax.grid(alpha=0.3)
    return save_figure(fig, path)


def format_table(summary: dict[str, Any]) -> str:
    head = ("| burst | events | produce ev/s | sustained ev/s | peak lag | drain s | max queued "
            "| recs (policy max) | events/rec | RSS start / peak / settled MB |")
    rows = [head, "|---" * 10 + "|"]
    for b in summary["bursts"]:
        rows.append(f"| {b['burst']} | {b['events']} | {b['produce_events_per_s']} | {b['events_per_s']} "
                    f"| {b['peak_lag']} | {b['drain_s'] if b['drained'] else 'not drained'} | {b['max_queued']} "
                    f"| {b['recommendations']} ({b['debounce_bound']}) | {b['events_per_recommendation']} "
                    f"| {b['rss_start_mb']} / {b['rss_peak_mb']} / {b['rss_settled_mb']} |")
    v = summary["verdict"]
    rows.append(f"\nRSS growth, settled after the first burst → after the last: {summary['rss_growth_mb']} MB "
                f"(bound {summary['rss_growth_bound_mb']} MB): {'flat' if v['rss_flat'] else 'GROWING'}; "
                f"max queued {summary['max_queued']} ≤ {summary['users']} users, "
                f"{summary['events_per_recommendation']} events per recommendation: "
                f"{'coalesced' if v['coalesced'] else 'NOT coalesced'}; final lag {summary['final_lag']}: "
                f"{'drained' if v['drained'] else 'NOT drained'}")
    return "\n".join(rows)


def run_faults_bench(*, events: int, users: int, bursts: int, out_dir: Path, model_dir: Path | None) -> int:
    """``newsrec bench faults``: the overload scenario on a fresh local broker and worker."""
    from index.corpus import read_mind_news
    from tools.demo import demo_corpus

    articles = list(read_mind_news(demo_corpus()))
    model_dir = model_dir or default_model_dir()
    print(f"overload: {bursts} bursts of {events} events over {users} users (embedded search, {model_dir}) ...")
    t0 = time.monotonic()
    with local_stack("embedded", model_dir, articles, name="faults") as (settings, worker):
        report = run_overload(settings, worker, events=events, users=users, bursts=bursts)
    report["config"]["model_dir"] = str(model_dir)
    report["config"]["wall_s"] = round(time.monotonic() - t0, 1)
    json_path, png_path = out_dir / "faults.json", out_dir / "faults-overload.png"
    write_report(report, json_path, png_path)
    print(format_table(report["summary"]))
    print(f"\nwrote {json_path} and {png_path}")
    return 0 if all(report["summary"]["verdict"].values()) else 1
