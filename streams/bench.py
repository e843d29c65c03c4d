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
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from streams.contracts import NewsArticle, UserEvent
from streams.metrics import percentile
from streams.producer import NewsrecProducer, ensure_topics
from streams.reader import RecommendationReader
from streams.settings import WorkerSettings, load
from streams.stack import WorkerProcess, free_port

log = logging.getLogger(__name__)

WORDS = ("election budget senate storm hurricane recipe pasta playoff basketball football soccer market stocks "
         "inflation electric battery vaccine flu travel flights hotel music concert movie streaming phone "
         "chip startup wildfire marathon fitness diet coffee housing mortgage").split()


def synthetic_event(user: int, seq: int, start: datetime) -> UserEvent:
    rnd = (user * 7919 + seq * 104729) % 9973
    text = " ".join(WORDS[(rnd + i * 13) % len(WORDS)] for i in range(3))
    domain = ("search", "browse", "app", "news_click")[seq % 4]
    return UserEvent(event_id=f"b{user}-{seq}-{uuid.uuid4().hex[:6]}", user_id=f"bench-user-{user}",
                     ts=start + timedelta(seconds=seq), domain=domain, text=text, url=None, news_id=None, meta={})


def _index_into_elasticsearch(settings: WorkerSettings, articles: list[NewsArticle]) -> None:
    from index.elastic import ElasticEngine

    async def load_all() -> None:
        engine = ElasticEngine(settings.es_url or "", settings.es_alias)
        try:
            await engine.rebuild(articles)
        finally:
            await engine.close()

    asyncio.run(load_all())


def _phase(settings: WorkerSettings, users: int, events: int, rate: float | None, timeout: float) -> dict[str, Any]:
    start_ts = datetime.now(UTC)
    sent_at: dict[str, float] = {}
    last_event: dict[str, str] = {}
    latencies: list[float] = []
    done: set[str] = set()
    tag = uuid.uuid4().hex[:4]
    with RecommendationReader(settings.consumer_config(f"newsrec-reader-{uuid.uuid4().hex[:8]}"), settings.topic_recommendations) as reader, \
            NewsrecProducer(settings) as producer:
        list(reader.poll(1.0))  # join the group before producing
        t0 = time.monotonic()
        for i in range(events):
            ev = synthetic_event(i % users, i // users, start_ts)
            ev = ev.model_copy(update={"user_id": f"{ev.user_id}-{tag}"})
            if rate:
                delay = t0 + i / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            producer.send_event(ev)
            sent_at[ev.event_id] = time.monotonic()
            last_event[ev.user_id] = ev.event_id
            for rec, arrived in reader.poll(0):
                _collect(rec, arrived, sent_at, last_event, latencies, done)
        produced_s = time.monotonic() - t0
        producer.flush()
        deadline = time.monotonic() + timeout
        while len(done) < len(last_event) and time.monotonic() < deadline:
            for rec, arrived in reader.poll(0.2):
                _collect(rec, arrived, sent_at, last_event, latencies, done)
        elapsed = time.monotonic() - t0
    return {"events": events, "users": users, "target_rate": rate, "produce_s": round(produced_s, 2),
            "drained_s": round(elapsed, 2), "events_per_s": round(events / elapsed, 1),
            "users_complete": len(done), "recommendations": len(latencies),
            "e2e_ms": {"p50": _r(percentile(latencies, 50)), "p99": _r(percentile(latencies, 99)),
                       "max": _r(max(latencies) if latencies else None)}}


def _collect(rec: Any, arrived: float, sent_at: dict[str, float], last_event: dict[str, str],
             latencies: list[float], done: set[str]) -> None:
    if rec.trigger_event_id in sent_at:
        latencies.append((arrived - sent_at[rec.trigger_event_id]) * 1000)
    if last_event.get(rec.user_id) == rec.trigger_event_id:
        done.add(rec.user_id)


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def bench_engine(engine: str, *, events: int, users: int, rate: float, model_dir: Path,
                 articles: list[NewsArticle]) -> dict[str, Any]:
    from streams.infra import LocalInfra

    state = Path(tempfile.mkdtemp(prefix=f"newsrec-bench-{engine}-"))
    infra = LocalInfra(state / "infra")
    try:
        env = {"NEWSREC_KAFKA_BOOTSTRAP": infra.start_broker(free_port()), "NEWSREC_STATE_DIR": str(state),
               "NEWSREC_MODEL_DIR": str(model_dir), "NEWSREC_SEARCH_ENGINE": engine,
               "NEWSREC_REFRESH_MIN_INTERVAL_S": "1", "NEWSREC_BATCH_MAX_USERS": "64",
               "NEWSREC_BATCH_MAX_WAIT_MS": "5"}
        if engine == "elasticsearch":
            env["NEWSREC_ES_URL"] = infra.start_search(free_port())
        settings = load(WorkerSettings, **{k.removeprefix("NEWSREC_").lower(): v for k, v in env.items()})
        ensure_topics(settings, extra=[settings.refresh_done_topic])
        if engine == "elasticsearch":
            _index_into_elasticsearch(settings, articles)
        else:
            with NewsrecProducer(settings) as producer:
                for a in articles:
                    producer.send_article(a)
        with WorkerProcess(env, state / "worker.log") as worker:
            worker.wait_ready(documents=len(articles), timeout=180)
            paced = _phase(settings, users, events, rate, timeout=120)
            stats_paced = worker.stats()
            burst = _phase(settings, users, events, None, timeout=300)
            stats = worker.stats()
        summaries = stats["summaries"]
        return {"engine": engine, "documents": len(articles), "paced": paced, "burst": burst,
                "model_batch_ms": summaries.get("model_batch_ms"), "search_batch_ms": summaries.get("search_batch_ms"),
                "batch_users": summaries.get("batch_users"), "paced_model_batch_ms": stats_paced["summaries"].get(
                    "model_batch_ms"), "counters": stats["counters"]}
    finally:
        infra.stop()


def run_pipeline_bench(*, events: int, users: int, engines: list[str], out: Path, model_dir: Path | None,
                       rate: float = 250.0) -> int:
    from index.corpus import read_mind_news
    from streams.demo import demo_corpus

    if model_dir is None:
        from models.bootstrap import default_cache_dir
        from models.tiny import build_tiny_model

        tiny_root = default_cache_dir() / "models" / "tiny-random"
        model_dir = tiny_root / "onnx"
        if not (model_dir / "manifest.json").exists():
            model_dir = build_tiny_model(tiny_root)
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
    head = ("| engine | docs | paced ev/s | paced e2e p50/p99 ms | burst ev/s (sustained) | burst e2e p50/p99 ms "
            "| model batch p50/p99 ms | users/batch p50 | search batch p50/p99 ms | p99 e2e / p99 model |")
    rows = [head, "|---" * 10 + "|"]
    for r in results:
        m, s, b = r["model_batch_ms"] or {}, r["search_batch_ms"] or {}, r["batch_users"] or {}
        pm = r["paced_model_batch_ms"] or {}
        ratio = (r["paced"]["e2e_ms"]["p99"] / pm["p99"]) if pm.get("p99") and r["paced"]["e2e_ms"]["p99"] else None
        rows.append(
            f"| {r['engine']} | {r['documents']} | {r['paced']['events_per_s']} "
            f"| {r['paced']['e2e_ms']['p50']} / {r['paced']['e2e_ms']['p99']} | {r['burst']['events_per_s']} "
            f"| {r['burst']['e2e_ms']['p50']} / {r['burst']['e2e_ms']['p99']} "
            f"| {_r(m.get('p50'))} / {_r(m.get('p99'))} | {b.get('p50')} | {_r(s.get('p50'))} / {_r(s.get('p99'))} "
            f"| {ratio and round(ratio, 2)} |")
    return "\n".join(rows)
