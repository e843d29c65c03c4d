"""``newsrec bench pipeline``: throughput and end-to-end latency on the local stack.

For each search engine, on a fresh local broker (and Elasticsearch-API server):
1. paced phase: events at a fixed rate from many users; end-to-end latency = event
   produced → its recommendation consumed (only recommendations whose trigger is that
   event count; coalesced events have none);
2. burst phase: a backlog produced as fast as possible; sustained events/s = events /
   time until every user's recommendation covers their last event.
Model and search batch latencies come from the worker's own /stats.
"""

from __future__ import annotations

import asyncio
import json
import logging
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from streams.contracts import NewsArticle, UserEvent
from streams.metrics import percentile
from streams.producer import NewsrecProducer, ensure_topics
from streams.reader import RecommendationReader
from streams.settings import WorkerSettings, load
from tools.stack import WorkerProcess, free_port

log = logging.getLogger(__name__)

WORDS = ("election budget senate storm hurricane recipe pasta playoff basketball football soccer market stocks "
         "inflation electric battery vaccine flu travel flights hotel music concert movie streaming phone "
         "chip startup wildfire marathon fitness diet coffee housing mortgage").split()


def synthetic_event(user: int, seq: int, start: datetime, tag: str) -> UserEvent:
    rnd = (user * 7919 + seq * 104729) % 9973
    text = " ".join(WORDS[(rnd + i * 13) % len(WORDS)] for i in range(3))
    domain = ("search", "browse", "app", "news_click")[seq % 4]
    return UserEvent(event_id=f"b{user}-{seq}-{tag}", user_id=f"bench-user-{user}-{tag}",
                     ts=start + timedelta(seconds=seq), domain=domain, text=text, url=None, news_id=None, meta={})


def _index_into_elasticsearch(settings: WorkerSettings, articles: list[NewsArticle]) -> None:

    async def load_all() -> None:
        engine = settings.elastic_engine()
        try:
            await engine.rebuild(articles)
        finally:
            await engine.close()

    asyncio.run(load_all())


SESSION_EVENTS = 4
SESSION_GAP_S = 0.3


def paced_schedule(users: int, events: int, rate: float) -> list[tuple[float, int, int]]:
    """(send offset s, user, seq): users act in sessions of a few events 0.3 s apart
    (search, click, browse...), sessions starting evenly so the total rate is ``rate``."""
    sessions = -(-events // SESSION_EVENTS)
    plan = []
    for s in range(sessions):
        user, start = s % users, s * SESSION_EVENTS / rate
        for k in range(SESSION_EVENTS):
            plan.append((start + k * SESSION_GAP_S, user, (s // users) * SESSION_EVENTS + k))
    return sorted(plan)[:events]


class Tally:
    """Latency of each recommendation from its trigger event's production to its arrival.

    A trigger produced within the debounce interval after the user's previous
    recommendation arrived was held back on purpose: counted apart as ``debounced``.
    """

    def __init__(self, min_interval_s: float) -> None:
        self.min_interval_s = min_interval_s
        self.sent_at: dict[str, float] = {}
        self.last_event: dict[str, str] = {}
        self.last_arrival: dict[str, float] = {}
        self.immediate: list[float] = []
        self.debounced: list[float] = []
        self.done: set[str] = set()
        self.in_worker: list[float] = []  # oldest covered event reached the worker → published
        self.to_consumer: list[float] = []  # published → consumed (wall clocks of one machine)

    def sent(self, event: UserEvent) -> None:
        self.sent_at[event.event_id] = time.monotonic()
        self.last_event[event.user_id] = event.event_id
        self.done.discard(event.user_id)  # a newer event is not covered yet

    def received(self, rec: Any, arrived: float) -> None:
        sent = self.sent_at.get(rec.trigger_event_id)
        if sent is None:
            return
        previous = self.last_arrival.get(rec.user_id)
        held = previous is not None and sent - previous < self.min_interval_s
        (self.debounced if held else self.immediate).append((arrived - sent) * 1000)
        self.in_worker.append(rec.latency_ms)
        self.to_consumer.append((time.time() - rec.generated_at.timestamp()) * 1000)
        self.last_arrival[rec.user_id] = arrived
        if self.last_event.get(rec.user_id) == rec.trigger_event_id:
            self.done.add(rec.user_id)


def _phase(settings: WorkerSettings, users: int, events: int, rate: float | None, timeout: float) -> dict[str, Any]:
    start_ts = datetime.now(UTC)
    tally = Tally(settings.refresh_min_interval_s)
    tag = uuid.uuid4().hex[:4]
    plan = paced_schedule(users, events, rate) if rate else [(0.0, i % users, i // users) for i in range(events)]
    group = f"newsrec-bench-{uuid.uuid4().hex[:8]}"
    with RecommendationReader(settings.consumer_config(group), settings.topic_recommendations) as reader, \
            NewsrecProducer(settings) as producer:
        reader.wait_assigned()
        t0 = time.monotonic()
        for offset, user, seq in plan:
            # Wait for the send time by reading: arrival times stay exact.
            while (delay := t0 + offset - time.monotonic()) > 0:
                for rec, arrived in reader.poll(delay):
                    tally.received(rec, arrived)
            ev = synthetic_event(user, seq, start_ts, tag)
            producer.send_event(ev)
            tally.sent(ev)
        produced_s = time.monotonic() - t0
        producer.flush()
        deadline = time.monotonic() + timeout
        while len(tally.done) < len(tally.last_event) and time.monotonic() < deadline:
            for rec, arrived in reader.poll(0.2):
                tally.received(rec, arrived)
        elapsed = time.monotonic() - t0
    return {"events": events, "users": users, "target_rate": rate, "produce_s": round(produced_s, 2),
            "drained_s": round(elapsed, 2), "events_per_s": round(events / elapsed, 1),
            "users_complete": len(tally.done), "recommendations": len(tally.immediate) + len(tally.debounced),
            "e2e_ms": _summary(tally.immediate + tally.debounced), "e2e_immediate_ms": _summary(tally.immediate),
            "e2e_debounced_ms": _summary(tally.debounced), "in_worker_ms": _summary(tally.in_worker),
            "publish_to_consume_ms": _summary(tally.to_consumer)}


def _summary(values: list[float]) -> dict[str, float | int | None]:
    return {"count": len(values)} | {f"p{q}": _r(percentile(values, q)) for q in (50, 90, 99)}


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def settings_from_env(env: dict[str, str]) -> WorkerSettings:
    """The worker's settings as a worker started with these NEWSREC_* variables reads them."""
    return load(WorkerSettings, **{k.removeprefix("NEWSREC_").lower(): v for k, v in env.items()
                                   if k.startswith("NEWSREC_")})


@contextmanager
def local_stack(engine: str, model_dir: Path, articles: list[NewsArticle], *, name: str = "bench",
                extra_env: dict[str, str] | None = None) -> Iterator[tuple[WorkerSettings, WorkerProcess]]:
    """A fresh local broker (and Elasticsearch-API server), topics, the news, one ready worker."""
    from tools.infra import LocalInfra

    state = Path(tempfile.mkdtemp(prefix=f"newsrec-{name}-{engine}-"))
    infra = LocalInfra(state / "infra")
    try:
        env = {"NEWSREC_KAFKA_BOOTSTRAP": infra.start_broker(free_port()), "NEWSREC_STATE_DIR": str(state),
               "NEWSREC_MODEL_DIR": str(model_dir), "NEWSREC_SEARCH_ENGINE": engine, **(extra_env or {})}
        if engine == "elasticsearch":
            env["NEWSREC_ES_URL"] = infra.start_search(free_port())
        settings = settings_from_env(env)
        ensure_topics(settings, extra=[settings.refresh_done_topic])
        if engine == "elasticsearch":
            _index_into_elasticsearch(settings, articles)
        else:
            with NewsrecProducer(settings) as producer:
                for a in articles:
                    producer.send_article(a)
        with WorkerProcess(env, state / "worker.log") as worker:
            worker.wait_ready(documents=len(articles), timeout=180)
            yield settings, worker
    finally:
        infra.stop()


def bench_engine(engine: str, *, events: int, users: int, rate: float, model_dir: Path,
                 articles: list[NewsArticle]) -> dict[str, Any]:
    with local_stack(engine, model_dir, articles) as (settings, worker):
        paced = _phase(settings, users, events, rate, timeout=120)
        stats_paced = worker.stats()
        burst = _phase(settings, users, events, None, timeout=300)
        stats = worker.stats()
    summaries = stats["summaries"]
    return {"engine": engine, "documents": len(articles), "paced": paced, "burst": burst,
            "model_batch_ms": summaries.get("model_batch_ms"), "search_batch_ms": summaries.get("search_batch_ms"),
            "dense_batch_ms": summaries.get("dense_batch_ms"),
            "batch_users": summaries.get("batch_users"),
            "paced_model_batch_ms": stats_paced["summaries"].get("model_batch_ms"),
            "worker_paced": stats_paced, "worker_total": stats}


def default_model_dir() -> Path:
    """The tiny random test model, built once into the cache (benchmarks measure the pipeline)."""
    from models.bootstrap import default_cache_dir
    from models.tiny import build_tiny_model

    tiny_root = default_cache_dir() / "models" / "tiny-random"
    if (tiny_root / "onnx" / "manifest.json").exists():
        return tiny_root / "onnx"
    return build_tiny_model(tiny_root)


def run_pipeline_bench(*, events: int, users: int, engines: list[str], out: Path, model_dir: Path | None,
                       rate: float) -> int:
    from index.corpus import read_mind_news
    from tools.demo import demo_corpus

    if model_dir is None:
        model_dir = default_model_dir()
    articles = list(read_mind_news(demo_corpus()))
    results = []
    for engine in engines:
        # The local Elasticsearch-API server is ~100 ms/query: a smaller load keeps it finite.
        n_events, n_users, n_rate = (events, users, rate) if engine == "embedded" else (
            max(events // 20, 50), max(users // 20, 10), rate / 20)
        print(f"benchmarking engine={engine}: {n_events} events, {n_users} users, paced at {n_rate:g}/s ...")
        results.append(bench_engine(engine, events=n_events, users=n_users, rate=n_rate, model_dir=model_dir,
                                    articles=articles))
    report = {"generated_at": datetime.now(UTC).isoformat(), "model_dir": str(model_dir), "results": results}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(format_table(results))
    print(f"\nwrote {out}")
    return 0


def format_table(results: list[dict[str, Any]]) -> str:
    head = ("| engine | docs | paced ev/s | e2e immediate p50/p99 ms (n) | e2e debounced p50/p99 ms (n) "
            "| model batch p50/p99 ms | users/batch p50 | search batch p50/p99 ms | immediate p99 / model p99 "
            "| dense share of search (mean) | burst ev/s sustained |")
    rows = [head, "|---" * 11 + "|"]
    for r in results:
        paced, pm = r["paced"], r["paced_model_batch_ms"] or {}
        s, b, imm, deb = r["search_batch_ms"] or {}, r["batch_users"] or {}, paced["e2e_immediate_ms"], \
            paced["e2e_debounced_ms"]
        ratio = imm["p99"] / pm["p99"] if pm.get("p99") and imm["p99"] else None
        d = r.get("dense_batch_ms") or {}
        dense_share = f"{d['mean'] / s['mean']:.0%}" if d.get("mean") and s.get("mean") else "–"
        rows.append(
            f"| {r['engine']} | {r['documents']} | {paced['events_per_s']} "
            f"| {imm['p50']} / {imm['p99']} ({imm['count']}) | {deb['p50']} / {deb['p99']} ({deb['count']}) "
            f"| {_r(pm.get('p50'))} / {_r(pm.get('p99'))} | {b.get('p50')} | {_r(s.get('p50'))} / {_r(s.get('p99'))} "
            f"| {ratio and round(ratio, 2)} | {dense_share} | {r['burst']['events_per_s']} |")
    return "\n".join(rows)
