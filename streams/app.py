"""The recommendation worker: one Faust app.

Data flow (all topics keyed by user_id):

    user-events ──► on_event: validate (bad → user-events-dlq), update the user's window
                    in the ``users`` table, queue a refresh (coalesced, debounced)
    refresher task: every micro-batch → one model call → one search call → RRF per user
                    ──► recommendations  and  ──► <app>-refresh-done (same partition)
    <app>-refresh-done ──► on_refresh_done: store the latest recommendation, clear the
                    user's pending trigger (state tables are only written inside streams,
                    so the completion is routed back through the user's own partition)
    model-updates ──► model_updates task (every worker reads all of it, no group): verify,
                    load and warm an announced model in a thread, swap it in between
                    batches, or keep the current one (see streams/rollout.py)

A refresh is pending in the table until its recommendation is published, so after a
crash the pending sweep publishes it again (at-least-once; duplicates share the same
trigger_event_id).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import faust
from faust.web import Request, Response, View

from index.base import SearchEngine
from streams.contracts import DeadLetter, Recommendation, RecItem, dead_letter, parse_event
from streams.metrics import Metrics
from streams.recommend import QueryModel, RecommendConfig, generate_queries, retrieve
from streams.refresh import Refresh, RefreshQueue
from streams.rollout import ActiveModel, Loader, follow_model_updates, update_consumer, version_of
from streams.settings import WorkerSettings
from streams.window import UserState, apply_event, complete_refresh

log = logging.getLogger(__name__)

RETRY_BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0)


@dataclass
class Worker:
    """The Faust app plus the parts the refresher needs; built by :func:`create_worker`."""

    app: faust.App
    settings: WorkerSettings
    active_model: ActiveModel
    engine: SearchEngine
    queue: RefreshQueue
    metrics: Metrics
    users: Any
    latest: Any
    recommendations: Any
    refresh_done: Any
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)  # a refresh was queued

    @property
    def config(self) -> RecommendConfig:
        s = self.settings
        return RecommendConfig(max_queries=s.max_queries, max_new_tokens=s.max_new_tokens,
                               prompt_signals=s.prompt_signals, results_per_query=s.results_per_query,
                               items_per_user=s.items_per_user)


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


def create_worker(settings: WorkerSettings, model: QueryModel, engine: SearchEngine, loader: Loader) -> Worker:
    """``model`` serves until a rollout swaps in an announced one, loaded with ``loader``."""
    partitions = settings.topic_partitions
    datadir = settings.state_dir / "faust" / settings.app_id
    datadir.mkdir(parents=True, exist_ok=True)
    scheme = "kafka"
    if settings.broker_profile == "local":
        from streams.local_transport import SCHEME as scheme
    app = faust.App(
        settings.app_id,
        broker=[f"{scheme}://{h}" for h in settings.kafka_bootstrap.split(",")],
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

    worker = Worker(app, settings, ActiveModel(model), engine, RefreshQueue(settings.refresh_min_interval_s),
                    Metrics(), users, latest, recommendations, refresh_done)
    metrics, queue, active_model = worker.metrics, worker.queue, worker.active_model

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
            worker.wakeup.set()
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

    async def dead_letter_model_update(key: bytes | None, letter: DeadLetter) -> None:
        await dlq.send(key=key, value=letter.to_json_bytes())

    @app.task
    async def model_updates() -> None:
        await follow_model_updates(update_consumer(settings), settings.topic_model_updates, active_model, loader,
                                   metrics, dead_letter_model_update)

    @app.timer(interval=settings.pending_sweep_interval_s)
    async def sweep_pending() -> None:
        active = {tp.partition for tp in app.assignor.assigned_actives() if tp.topic == settings.topic_events}
        now = time.monotonic()
        for user_id, data in list(users.items()):
            trigger, partition = (data or {}).get("pending_trigger"), (data or {}).get("pending_partition")
            if trigger and partition in active and not queue.is_known(user_id, trigger):
                queue.schedule(user_id, trigger, partition, now)
                worker.wakeup.set()
                metrics.inc("refreshes_recovered")
        queue.prune(now)

    @app.on_partitions_revoked.connect
    async def on_revoked(app_: faust.App, revoked: set[Any], **_: Any) -> None:
        queue.forget_partitions({tp.partition for tp in revoked if tp.topic == settings.topic_events})

    _user_table_view(app, latest, "/recommendations/{user_id}", "recommendation")
    _user_table_view(app, users, "/users/{user_id}", "window")

    @app.page("/health")
    async def health(web: Any, request: Request) -> Response:
        # Ready = partitions assigned and tables recovered: before that, events wait unread.
        ready = bool(app.consumer.assignment()) and not app.rebalancing and app.tables.recovery.completed.is_set()
        body = {"status": "ok" if ready else "starting", **active_model.status(), "engine": engine.name,
                "documents": await engine.count(), "assigned_partitions": len(app.consumer.assignment())}
        return web.json(body, status=200 if ready else 503)

    @app.page("/stats")
    async def stats(web: Any, request: Request) -> Response:
        snap = metrics.snapshot() | {"queued": len(queue), "in_flight": queue.in_flight} | active_model.status()
        return web.json(snap)

    return worker


class _Backoff:
    """Delay before retrying failed refreshes; resets on the first success."""

    def __init__(self) -> None:
        self.failures = 0

    def next_delay(self) -> float:
        delay = RETRY_BACKOFF_S[min(self.failures, len(RETRY_BACKOFF_S) - 1)]
        self.failures += 1
        return delay


def _user_table_view(app: faust.App, table: Any, path: str, what: str) -> None:
    """GET ``path`` → the user's row, answered by the worker that owns its partition."""

    class UserTableView(View):
        @app.table_route(table=table, match_info="user_id")
        async def get(self, request: Request, user_id: str) -> Response:
            value = table.get(user_id)
            if value is None:
                return self.json({"error": f"no {what} for user {user_id!r} yet"}, status=404)
            return self.json(value)

    app.page(path, name=f"user-{what}")(UserTableView)


async def run_refresher(worker: Worker) -> None:
    """Forever: gather a micro-batch of due refreshes, run the model on it, and hand it to
    a publishing task, so the next batch's model call overlaps this batch's search+publish."""
    settings, queue = worker.settings, worker.queue
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
    backoff = _Backoff()
    publishing: set[asyncio.Task[None]] = set()
    while True:
        await _wait_until_due(worker)
        if len(queue) < settings.batch_max_users and settings.batch_max_wait_ms and not publishing:
            await asyncio.sleep(settings.batch_max_wait_ms / 1000)  # idle: let a batch gather
        batch = queue.take_due(time.monotonic(), settings.batch_max_users)
        if not batch:
            continue
        try:
            generated = await generate_batch(worker, batch, executor)
        except Exception:
            _failed(worker, batch, backoff, "model")
            continue
        task = asyncio.create_task(_publish_or_retry(worker, generated, backoff))
        publishing.add(task)
        task.add_done_callback(publishing.discard)
        if len(publishing) >= 2:  # bound the work in flight
            await asyncio.wait(publishing, return_when=asyncio.FIRST_COMPLETED)


async def _wait_until_due(worker: Worker) -> None:
    while True:
        now = time.monotonic()
        next_due = worker.queue.next_due()
        if next_due is not None and next_due <= now:
            return
        worker.wakeup.clear()
        try:
            await asyncio.wait_for(worker.wakeup.wait(), timeout=None if next_due is None else next_due - now)
        except TimeoutError:
            pass


def _failed(worker: Worker, batch: list[Refresh], backoff: _Backoff, stage: str) -> None:
    delay = backoff.next_delay()
    worker.metrics.inc("batches_failed")
    log.exception("%s stage failed for a batch of %d users; retrying in %.1fs", stage, len(batch), delay)
    worker.queue.retry(batch, time.monotonic() + delay)
    worker.wakeup.set()


async def _publish_or_retry(worker: Worker, generated: Generated, backoff: _Backoff) -> None:
    try:
        await publish_batch(worker, generated)
        backoff.failures = 0
    except Exception:
        _failed(worker, generated.batch, backoff, "search/publish")


@dataclass
class Generated:
    batch: list[Refresh]
    states: list[UserState]
    queries: list[list[str]]
    model_version: str  # of the model that wrote these queries, not whichever is active at publish


async def generate_batch(worker: Worker, batch: list[Refresh], executor: ThreadPoolExecutor) -> Generated:
    """One model call for the whole batch: each user's window → prompt → query list."""
    states = [UserState.from_json(worker.users.get(r.user_id)) for r in batch]
    model = worker.active_model.current  # read once: a rollout swap never splits a batch
    t0 = time.perf_counter()
    queries = await asyncio.get_running_loop().run_in_executor(
        executor, generate_queries, model, states, worker.config)
    worker.metrics.observe("model_batch_ms", (time.perf_counter() - t0) * 1000)
    worker.metrics.observe("batch_users", len(batch))
    return Generated(batch, states, queries, version_of(model))


async def publish_batch(worker: Worker, generated: Generated) -> None:
    """One search call for the batch, RRF per user, publish."""
    metrics, batch = worker.metrics, generated.batch
    t0 = time.perf_counter()
    fused = await retrieve(worker.engine, generated.states, generated.queries, worker.config)
    metrics.observe("search_batch_ms", (time.perf_counter() - t0) * 1000)
    now_wall = datetime.now(UTC)
    for r, queries, items in zip(batch, generated.queries, fused):
        rec = Recommendation(
            user_id=r.user_id, generated_at=now_wall, model_version=generated.model_version, queries=queries,
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
    worker.wakeup.set()  # users queued while in flight are schedulable again
