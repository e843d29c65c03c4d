"""The recommendation worker: one Faust app.

Data flow (all topics keyed by user_id):

    user-events ──► on_event: validate (bad → user-events-dlq), update the user's window
                    in the ``users`` table, queue a refresh (coalesced, debounced)
    refresher task: every micro-batch → one model call → one search call → RRF per user
                    ──► recommendations  and  ──► <app>-refresh-done (same partition)
    <app>-refresh-done ──► on_refresh_done: store the latest recommendation, clear the
                    user's pending trigger (state tables are only written inside streams,
                    so the completion is routed back through the user's own partition)

A refresh is pending in the table until its recommendation is published, so after a
crash the pending sweep publishes it again (at-least-once; duplicates share the same
trigger_event_id).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import faust
from faust.web import Request, Response, View

from index.base import SearchEngine
from models.prompt import build_prompt, parse_queries
from streams.contracts import Recommendation, RecItem, dead_letter, parse_event
from streams.fusion import FusedItem, rrf_fuse
from streams.metrics import Metrics
from streams.refresh import Refresh, RefreshQueue
from streams.settings import WorkerSettings
from streams.window import UserState, apply_event, complete_refresh

log = logging.getLogger(__name__)

RETRY_BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0)
BACKFILL_SIGNALS = 2


class QueryModel(Protocol):
    version: str

    def generate(self, prompts: Sequence[str], *, max_new_tokens: int) -> list[str]: ...


@dataclass
class Worker:
    """The Faust app plus the parts the refresher needs; built by :func:`create_worker`."""

    app: faust.App
    settings: WorkerSettings
    model: QueryModel
    engine: SearchEngine
    queue: RefreshQueue
    metrics: Metrics
    users: Any
    latest: Any
    recommendations: Any
    refresh_done: Any


def _faust_broker_options(settings: WorkerSettings) -> dict[str, Any]:
    opts: dict[str, Any] = {"consumer_auto_offset_reset": "earliest"}
    if settings.broker_profile == "local":
        # Tansu: one-record batches keep its end offsets right (table recovery depends on them).
        opts |= {"producer_max_batch_size": 1, "producer_linger": 0.0,
                 "broker_session_timeout": 6.0, "broker_heartbeat_interval": 1.0}
    if settings.kafka_security_protocol != "PLAINTEXT":
        ssl_context = None
        if settings.kafka_security_protocol.endswith("SSL"):
            import ssl

            ssl_context = ssl.create_default_context(
                cafile=str(settings.kafka_ssl_ca_location) if settings.kafka_ssl_ca_location else None)
        if settings.kafka_sasl_mechanism:
            opts["broker_credentials"] = faust.SASLCredentials(
                username=settings.kafka_sasl_username,
                password=settings.kafka_sasl_password.get_secret_value() if settings.kafka_sasl_password else "",
                ssl_context=ssl_context, mechanism=settings.kafka_sasl_mechanism)
        else:
            opts["broker_credentials"] = faust.SSLCredentials(ssl_context)
    return opts


def create_worker(settings: WorkerSettings, model: QueryModel, engine: SearchEngine) -> Worker:
    partitions = settings.topic_partitions
    datadir = settings.state_dir / "faust" / settings.app_id
    datadir.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        settings.app_id,
        broker=[f"kafka://{h}" for h in settings.kafka_bootstrap.split(",")],
        store="memory://",  # rebuilt from the changelog topics on start
        topic_partitions=partitions,
        datadir=str(datadir),
        web_port=settings.web_port,
        web_bind=settings.web_bind,
        web_host=settings.web_host,
        table_standby_replicas=0,
        **_faust_broker_options(settings),
    )
    raw = {"key_serializer": "raw", "value_serializer": "raw"}
    events = app.topic(settings.topic_events, key_type=bytes, value_type=bytes, partitions=partitions, **raw)
    dlq = app.topic(settings.topic_dlq, key_type=bytes, value_type=bytes, **raw)
    recommendations = app.topic(settings.topic_recommendations, key_type=bytes, value_type=bytes, **raw)
    refresh_done = app.topic(settings.refresh_done_topic, key_type=bytes, value_type=bytes,
                             partitions=partitions, internal=True, **raw)
    users = app.Table("users", default=None, partitions=partitions, key_type=str)
    latest = app.Table("latest", default=None, partitions=partitions, key_type=str)

    worker = Worker(app, settings, model, engine, RefreshQueue(settings.refresh_min_interval_s), Metrics(),
                    users, latest, recommendations, refresh_done)
    metrics, queue = worker.metrics, worker.queue

    @app.agent(events)
    async def on_event(stream: faust.StreamT) -> None:
        async for event in stream.events():
            msg = event.message
            metrics.inc("events_in")
            try:
                parsed = parse_event(msg.value if isinstance(msg.value, bytes) else b"")
                if msg.key is not None and msg.key != parsed.user_id.encode("utf-8"):
                    raise ValueError("record key must equal user_id (UTF-8): it decides the user's partition")
            except ValueError as exc:
                metrics.inc("events_dlq")
                letter = dead_letter(msg.value or b"", str(exc), topic=msg.topic, partition=msg.partition,
                                     offset=msg.offset)
                await dlq.send(key=msg.key, value=letter.to_json_bytes())
                continue
            state = UserState.from_json(users.get(parsed.user_id))
            users[parsed.user_id] = apply_event(
                state, parsed, msg.partition, max_signals=settings.window_max_signals,
                max_age_s=settings.window_max_age_s, clicked_memory=settings.clicked_memory).to_json()
            queue.schedule(parsed.user_id, parsed.event_id, msg.partition, time.monotonic())
            metrics.inc("events_applied")

    @app.agent(refresh_done)
    async def on_refresh_done(stream: faust.StreamT) -> None:
        async for value in stream:
            rec = json.loads(value)
            user_id, trigger = rec["user_id"], rec["trigger_event_id"]
            latest[user_id] = rec
            state = UserState.from_json(users.get(user_id))
            if state.pending_trigger == trigger:
                users[user_id] = complete_refresh(state, trigger).to_json()
            queue.acknowledge(user_id, trigger)

    @app.task
    async def refresher() -> None:
        await run_refresher(worker)

    @app.timer(interval=settings.pending_sweep_interval_s)
    async def sweep_pending() -> None:
        active = {tp.partition for tp in app.assignor.assigned_actives() if tp.topic == settings.topic_events}
        now = time.monotonic()
        for user_id, data in list(users.items()):
            trigger, partition = (data or {}).get("pending_trigger"), (data or {}).get("pending_partition")
            if trigger and partition in active and not queue.is_known(user_id, trigger):
                queue.schedule(user_id, trigger, partition, now)
                metrics.inc("refreshes_recovered")
        queue.prune(now)

    @app.on_partitions_revoked.connect
    async def on_revoked(app_: faust.App, revoked: set[Any], **_: Any) -> None:
        queue.forget_partitions({tp.partition for tp in revoked if tp.topic == settings.topic_events})

    @app.page("/recommendations/{user_id}")
    class RecommendationView(View):
        @app.table_route(table=latest, match_info="user_id")
        async def get(self, request: Request, user_id: str) -> Response:
            rec = latest.get(user_id)
            if rec is None:
                return self.json({"error": f"no recommendation for user {user_id!r} yet"}, status=404)
            return self.json(rec)

    @app.page("/users/{user_id}")
    class UserView(View):
        @app.table_route(table=users, match_info="user_id")
        async def get(self, request: Request, user_id: str) -> Response:
            data = users.get(user_id)
            if data is None:
                return self.json({"error": f"unknown user {user_id!r}"}, status=404)
            return self.json(data)

    @app.page("/health")
    async def health(web: Any, request: Request) -> Response:
        return web.json({"status": "ok", "model_version": model.version, "engine": engine.name,
                         "documents": await engine.count()})

    @app.page("/stats")
    async def stats(web: Any, request: Request) -> Response:
        snap = metrics.snapshot() | {"queued": len(queue), "in_flight": queue.in_flight}
        return web.json(snap)

    return worker


async def run_refresher(worker: Worker) -> None:
    """Forever: wait for due refreshes, gather a micro-batch, process it."""
    settings, queue = worker.settings, worker.queue
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
    failures = 0
    while True:
        now = time.monotonic()
        next_due = queue.next_due()
        if next_due is None or next_due > now:
            await asyncio.sleep(min(0.01 if next_due is None else next_due - now, 0.05))
            continue
        if len(queue) < settings.batch_max_users and settings.batch_max_wait_ms:
            await asyncio.sleep(settings.batch_max_wait_ms / 1000)
        batch = queue.take_due(time.monotonic(), settings.batch_max_users)
        if not batch:
            continue
        try:
            await process_batch(worker, batch, executor)
            failures = 0
        except Exception:
            delay = RETRY_BACKOFF_S[min(failures, len(RETRY_BACKOFF_S) - 1)]
            failures += 1
            worker.metrics.inc("batches_failed")
            log.exception("refresh batch of %d users failed; retrying in %.1fs", len(batch), delay)
            queue.retry(batch, time.monotonic() + delay)


async def process_batch(worker: Worker, batch: list[Refresh], executor: ThreadPoolExecutor) -> None:
    settings, metrics = worker.settings, worker.metrics
    loop = asyncio.get_running_loop()
    states = [UserState.from_json(worker.users.get(r.user_id)) for r in batch]
    prompts = [build_prompt(s.signals[: settings.prompt_signals], max_queries=settings.max_queries) for s in states]

    t0 = time.perf_counter()
    texts = await loop.run_in_executor(
        executor, lambda: worker.model.generate(prompts, max_new_tokens=settings.max_new_tokens))
    model_ms = (time.perf_counter() - t0) * 1000
    metrics.observe("model_batch_ms", model_ms)
    metrics.observe("batch_users", len(batch))

    model_queries = [parse_queries(t, max_queries=settings.max_queries) for t in texts]
    backfill = [[s.text for s in st.signals[:BACKFILL_SIGNALS]] for st in states]
    flat = [q for qs in model_queries for q in qs] + [q for qs in backfill for q in qs]
    t1 = time.perf_counter()
    results = await worker.engine.search_many(flat, k=settings.results_per_query) if flat else []
    search_ms = (time.perf_counter() - t1) * 1000
    metrics.observe("search_batch_ms", search_ms)
    metrics.observe("search_queries", len(flat))

    offset = 0
    split_model, split_backfill = [], []
    for qs in model_queries:
        split_model.append(results[offset: offset + len(qs)])
        offset += len(qs)
    for qs in backfill:
        split_backfill.append(results[offset: offset + len(qs)])
        offset += len(qs)

    now_wall = datetime.now(UTC)
    for r, state, queries, hits, fb_queries, fb_hits in zip(
            batch, states, model_queries, split_model, backfill, split_backfill):
        clicked = set(state.clicked)
        items = rrf_fuse(queries, hits, limit=settings.items_per_user, exclude=clicked)
        if len(items) < settings.items_per_user:
            items += _backfill(items, rrf_fuse(fb_queries, fb_hits, limit=settings.items_per_user, exclude=clicked),
                               settings.items_per_user)
        rec = Recommendation(
            user_id=r.user_id, generated_at=now_wall, model_version=worker.model.version or "unversioned", queries=queries,
            items=[RecItem(news_id=i.news_id, title=i.title, score=i.score, query=i.query) for i in items],
            trigger_event_id=r.trigger_event_id,
            latency_ms=round((time.monotonic() - r.first_seen_at) * 1000, 3),
        )
        body, key = rec.to_json_bytes(), r.user_id.encode("utf-8")
        await worker.recommendations.send(key=key, value=body)
        await worker.refresh_done.send(key=key, value=body, partition=r.partition)
        metrics.observe("refresh_latency_ms", rec.latency_ms)
        metrics.inc("recommendations_out")
    worker.queue.finish(batch, time.monotonic())


def _backfill(items: list[FusedItem], extra: list[FusedItem], limit: int) -> list[FusedItem]:
    have = {i.news_id for i in items}
    return [i for i in extra if i.news_id not in have][: limit - len(items)]
