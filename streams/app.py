"""The recommendation worker: one Faust app.

Data flow (all topics keyed by user_id):

    user-events ──► on_event: validate (bad → user-events-dlq), update the user's window
                    in the ``users`` table, queue a refresh (coalesced, debounced)
    refresher task: every micro-batch → one model call → the recall channels (signals and
                    model: one search call; dense; trending) → weighted RRF per user
                    ──► recommendations  and  ──► <app>-refresh-done (same partition)
    trending task:  every partition of user-events (no group, from 24 h back) → clicks and
                    shows per article (in process, the same on every worker)
    <app>-refresh-done ──► on_refresh_done: store the latest recommendation, clear the
                    user's pending trigger (state tables are only written inside streams,
                    so the completion is routed back through the user's own partition)
    model-updates ──► model_updates task (every worker reads all of it, no group): verify,
                    load and warm an announced model in a thread, swap it in between
                    batches, or keep the current one (see streams/rollout.py)

A refresh is pending in the table until its recommendation is published, so after a
crash the pending sweep publishes it again (at-least-once; duplicates share the same
trigger_event_id).

When the model fails or times out, the batch is published from the other channels
(queries empty, ``"degraded": ["model"]``). When the search server fails, the batch goes
back to the queue and the refresher pauses ALL refreshes for a growing backoff (the
dependency is shared, so other users' batches would fail the same way); events keep being
consumed meanwhile, and GET /recommendations/{user} serves the last recommendation marked
``stale``. POST /rank orders a feed service's candidates for one user (see README).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import faust
from faust.web import Request, Response, View
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from index.base import SearchEngine
from models.manifest import ModelIntegrityError
from streams import faust_transport
from streams.contracts import (
    DeadLetter,
    RecItem,
    Recommendation,
    dead_letter,
    parse_event,
)
from streams.explain import PAGE_HEADERS, explain_page
from streams.kafka_log import with_logger
from streams.metrics import (
    Live,
    Metrics,
    channel_label,
    dead_letter_reason,
    prometheus_registry,
)
from streams.ranker import LearnedRanker
from streams.recommend import (
    QueryModel,
    Recall,
    RecommendConfig,
    TrendingView,
    generate_queries,
    rank,
    recommend,
    signal_queries,
)
from streams.refresh import Refresh, RefreshQueue
from streams.rollout import (
    ActiveModel,
    Loader,
    follow_model_updates,
    topic_partitions,
    update_consumer,
    version_of,
)
from streams.settings import ConfigError, WorkerSettings, redact
from streams.trending import HORIZON_S, TrendingCounter
from streams.window import UserState, apply_event, complete_refresh

log = logging.getLogger(__name__)

RETRY_BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0)
# POST /rank: bodies above this are refused (413) before they are parsed.
RANK_MAX_BODY_BYTES = 256 * 1024
# Set on a /rank request forwarded to the owner of the user's partition: never forwarded again.
ROUTED_HEADER = "X-Newsrec-Routed"
# /health must answer even when the search server does not.
HEALTH_SEARCH_TIMEOUT_S = 2.0
ERROR_SUMMARY_CHARS = 300


class RefreshHealth:
    """Consecutive refresh failures: the backoff pause and what /stats and /health report.

    ``secrets`` are masked out of every error summary it keeps (client exceptions may
    quote URLs or headers)."""

    def __init__(self, secrets: list[str] | None = None) -> None:
        self.secrets = secrets or []
        self.failures = 0  # in a row; a success resets it
        self.paused_until = 0.0  # monotonic: no new batch is started before this
        self.last_error: dict[str, Any] | None = None
        self.last_success_at: datetime | None = None

    def next_delay(self) -> float:
        return RETRY_BACKOFF_S[min(self.failures, len(RETRY_BACKOFF_S) - 1)]

    def failed(self, stage: str, exc: BaseException, now: float) -> float:
        """Record a failed batch; returns the pause before the next try."""
        delay = self.next_delay()
        self.failures += 1
        self.paused_until = now + delay
        self.last_error = {"stage": stage, "error": error_summary(exc, self.secrets),
                           "at": datetime.now(UTC).isoformat(), "retry_in_s": delay}
        return delay

    def succeeded(self) -> None:
        self.failures = 0
        self.paused_until = 0.0
        self.last_success_at = datetime.now(UTC)

    def snapshot(self) -> dict[str, Any]:
        return {"ok": self.failures == 0, "failures_in_row": self.failures, "last_error": self.last_error,
                "last_success_at": self.last_success_at.isoformat() if self.last_success_at else None}


def error_summary(exc: BaseException, secrets: list[str]) -> str:
    """One line naming the error, safe to show on /stats: secrets and URL credentials masked."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return redact(text, secrets)[:ERROR_SUMMARY_CHARS]


def served_recommendation(latest: dict[str, Any] | None, window: dict[str, Any] | None) -> dict[str, Any] | None:
    """What GET /recommendations/{user} answers: the last published recommendation, marked
    ``stale`` with the ``pending_trigger`` while the user's newest event is not reflected
    in it (a refresh queued, or failing during an outage). The Recommendation fields are
    unchanged, so readers of the topic contract can read this too."""
    if latest is None:
        return None
    pending = (window or {}).get("pending_trigger")
    behind = pending is not None and pending != latest.get("trigger_event_id")
    return {**latest, "stale": bool(latest.get("stale")) or behind, "pending_trigger": pending if behind else None}


async def search_status(engine: SearchEngine, secrets: list[str],
                        timeout: float = HEALTH_SEARCH_TIMEOUT_S) -> dict[str, Any]:
    """Whether the search engine answers now (document count), bounded by ``timeout``."""
    try:
        documents = await asyncio.wait_for(engine.count(), timeout)
    except TimeoutError:
        return {"ok": False, "documents": None, "error": f"no answer within {timeout:g}s"}
    except Exception as exc:  # noqa: BLE001 - any failure is reported, never raised: /health must answer
        return {"ok": False, "documents": None, "error": error_summary(exc, secrets)}
    return {"ok": True, "documents": documents}


class ModelChannelHealth:
    """Failures and timeouts of the model channel: a refresh whose model call fails publishes
    the other channels' items (``"degraded": ["model"]``) instead of pausing every refresh."""

    def __init__(self, secrets: list[str] | None = None) -> None:
        self.secrets = secrets or []
        self.failures = 0
        self.timeouts = 0
        self.in_row = 0
        self.degraded_batches = 0
        self.last_error: dict[str, Any] | None = None

    def failed(self, exc: BaseException | None, *, timed_out: bool = False, reason: str = "") -> str:
        self.failures += 1
        self.timeouts += timed_out
        self.in_row += 1
        text = reason or (error_summary(exc, self.secrets) if exc is not None else "model call failed")
        self.last_error = {"error": text, "at": datetime.now(UTC).isoformat(), "timed_out": timed_out}
        return text

    def succeeded(self) -> None:
        self.in_row = 0

    def snapshot(self) -> dict[str, Any]:
        return {"model_failures": self.failures, "model_timeouts": self.timeouts,
                "model_failures_in_row": self.in_row, "degraded_batches": self.degraded_batches,
                "last_model_error": self.last_error}


class TrendingFeed:
    """The trending channel's counts: clicks (``news_click``) and shows (``impression``) of
    all users in hourly buckets over 24 h (:class:`streams.trending.TrendingCounter`), and
    the last event text (the title) per news id.

    In process, per worker: every worker reads every partition of ``user-events`` itself
    (:func:`follow_trending`, no consumer group) from 24 h back, so all workers hold the
    same counts and a restarted worker rebuilds them. Not a Faust windowed table."""

    def __init__(self, horizon_s: float = HORIZON_S) -> None:
        self.counter = TrendingCounter(horizon_s=horizon_s)
        self.titles: dict[str, str] = {}
        self.events = 0
        self.skipped = 0

    def add(self, raw: bytes, now: datetime | None = None) -> bool:
        """Count one ``user-events`` value if it is a click or a show; anything else (or
        invalid: on_event dead-letters it) is ignored."""
        if b"news_click" not in raw and b"impression" not in raw:
            return False
        try:
            event = parse_event(raw)
        except ValueError:
            self.skipped += 1
            return False
        ts = min(event.ts, now or datetime.now(UTC))  # a producer's clock ahead of ours counts as now
        if not self.counter.add_event(ts, event.domain, event.news_id):
            return False
        self.titles[event.news_id] = event.text[:300]
        self.events += 1
        return True

    def view(self, now: datetime | None = None) -> TrendingView:
        view = TrendingView.at(self.counter, now or datetime.now(UTC), self.titles)
        if len(self.titles) > 2 * len(view.scores) + 1_000:  # titles of articles that left the horizon
            self.titles = {n: t for n, t in self.titles.items() if n in view.scores}
        return view

    def snapshot(self) -> dict[str, Any]:
        return {"events": self.events, "invalid_skipped": self.skipped, "items": len(self.titles)}


def trending_consumer(settings: WorkerSettings) -> Any:
    from confluent_kafka import Consumer

    # Partitions are assigned by hand (no group membership, no commits): group.id is only required.
    conf = with_logger(settings.consumer_config(f"{settings.app_id}-trending"))
    return Consumer(conf | {"enable.auto.commit": False})


async def follow_trending(consumer: Any, topic: str, feed: TrendingFeed, *, horizon_s: float = HORIZON_S,
                          poll_s: float = 0.5) -> None:
    """Forever: every partition of ``topic`` from ``horizon_s`` ago (by record timestamp; from
    the start where the broker cannot say) into ``feed``. Counting happens on the event loop,
    so the feed needs no lock; the consumer calls run in one thread."""
    from confluent_kafka import OFFSET_BEGINNING, TopicPartition

    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="trending")
    loop = asyncio.get_running_loop()

    async def call(fn: Callable[..., Any], *args: Any) -> Any:
        return await loop.run_in_executor(executor, fn, *args)

    try:
        partitions = await topic_partitions(call, consumer, topic)
        start_ms = int((time.time() - horizon_s) * 1000)
        try:
            found = await call(consumer.offsets_for_times,
                               [TopicPartition(topic, p, start_ms) for p in partitions], 10.0)
            assign = []
            for tp in found:
                offset = tp.offset
                if offset < 0:  # nothing newer than the horizon: from the current end on
                    offset = (await call(consumer.get_watermark_offsets, TopicPartition(topic, tp.partition),
                                         10.0))[1]
                assign.append(TopicPartition(topic, tp.partition, offset))
        except Exception as exc:  # noqa: BLE001 - a broker without offsets by time: read it all
            log.warning("trending: no offsets by time for %s (%s); reading it from the start", topic, exc)
            assign = [TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions]
        await call(consumer.assign, assign)
        log.info("trending: following %d partitions of %s from %s", len(assign), topic,
                 {tp.partition: tp.offset for tp in assign})
        while True:
            for msg in await call(consumer.consume, 500, poll_s):
                if msg.error() is None and msg.value():
                    try:
                        feed.add(msg.value())
                    except Exception:  # one odd record must not stop the counts
                        log.exception("trending: cannot count %s[%d]@%d", msg.topic(), msg.partition(), msg.offset())
    finally:
        await loop.run_in_executor(executor, consumer.close)
        executor.shutdown(wait=False)


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
    health: RefreshHealth = field(default_factory=RefreshHealth)
    dense: Any = None  # index.dense.DenseIndex (its embedder inside) when the dense channel is on
    trending: TrendingFeed | None = None  # when the trending channel is on
    news: Any = None  # the news feed: ``known`` (ids indexed so far), ``attach(loop)``
    model_health: ModelChannelHealth = field(default_factory=ModelChannelHealth)
    model_call: Any = None  # the last model call's future (still running after a timeout)
    ranker: Any = None  # streams.ranker.LearnedRanker for POST /rank (NEWSREC_RANKER_DIR); None: RRF
    registry: Any = None  # GET /metrics: prometheus_client registry reading ``metrics`` (create_worker)

    @property
    def config(self) -> RecommendConfig:
        return RecommendConfig.from_settings(self.settings)

    def recall(self, now: datetime | None = None) -> Recall:
        """The channels' edges as of ``now``: engine, dense index, trending view."""
        on = self.config.weights
        dense = self.dense if "dense" in on else None
        trending = self.trending.view(now) if self.trending is not None and "trending" in on else None
        return Recall(self.engine, dense, trending)

    def unknown_ids(self, news_ids: list[str]) -> list[str]:
        """The ids not in the news index (as far as this worker has read it); unknowable
        without a news feed or dense index: then none."""
        known = getattr(self.news, "known", None)
        if known is None:
            return []
        return [n for n in dict.fromkeys(news_ids) if n not in known]


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


class _RawKeyTable(faust.Table):
    """A table whose ``str`` keys are stored as their raw UTF-8 bytes, like the records'
    keys: faust's default JSON key (b'"u-42"') hashes to another partition than the
    user's events, so table_route (GET /users/{id} on a worker that does not own the
    user) would forward the request to the wrong worker."""

    def _serializer_from_type(self, typ: Any) -> Any:
        return "raw" if typ is str else super()._serializer_from_type(typ)


def load_ranker(ranker_dir: Path) -> LearnedRanker:
    """The learned fusion for POST /rank, verified; a bad dir stops the worker at start-up."""
    try:
        ranker = LearnedRanker.load(ranker_dir)
    except (OSError, ValueError, ModelIntegrityError) as exc:
        raise ConfigError(f"NEWSREC_RANKER_DIR={ranker_dir}: not a usable learned fusion ({exc}): make one with "
                          "`newsrec eval --data DIR --save-ranker DIR` or unset it (RRF)") from None
    log.info("POST /rank uses learned fusion %s from %s", ranker.version, ranker_dir)
    return ranker


def create_worker(settings: WorkerSettings, model: QueryModel, engine: SearchEngine, loader: Loader, *,
                  dense: Any = None, news: Any = None) -> Worker:
    """``model`` serves until a rollout swaps in an announced one, loaded with ``loader``;
    ``dense`` (a DenseIndex) and ``news`` (the news feed: known ids) come from the runtime."""
    partitions = settings.topic_partitions
    datadir = settings.state_dir / "faust" / settings.app_id
    datadir.mkdir(parents=True, exist_ok=True)
    scheme = faust_transport.LOCAL_SCHEME if settings.broker_profile == "local" else faust_transport.SCHEME
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
        Table=_RawKeyTable,
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

    secrets = settings.secret_values()
    worker = Worker(app, settings, ActiveModel(model), engine, RefreshQueue(settings.refresh_min_interval_s),
                    Metrics(), users, latest, recommendations, refresh_done, health=RefreshHealth(secrets),
                    dense=dense, news=news, model_health=ModelChannelHealth(secrets))
    if "trending" in worker.config.weights:
        worker.trending = TrendingFeed()
    if settings.ranker_dir is not None:
        worker.ranker = load_ranker(settings.ranker_dir)
    metrics, queue, active_model = worker.metrics, worker.queue, worker.active_model

    async def reject(msg: Any, reason: str) -> None:
        metrics.inc("events_dlq")
        metrics.inc_label("dead_letters", dead_letter_reason(reason))
        letter = dead_letter(msg.value if isinstance(msg.value, bytes) else b"", reason, topic=msg.topic,
                             partition=msg.partition, offset=msg.offset)
        await dlq.send(key=msg.key, value=letter.to_json_bytes())

    @app.agent(events)
    async def on_event(stream: faust.StreamT) -> None:
        async for event in stream.events():
            msg = event.message
            metrics.inc("events_in")
            try:
                parsed = parse_event(msg.value if isinstance(msg.value, bytes) else b"")
                # A keyless record lands on a random partition, so the user's row would be
                # written from a shard that does not own it (and split across shards).
                if msg.key != parsed.user_id.encode("utf-8"):
                    raise ValueError("record key must equal user_id (UTF-8): it decides the user's partition")
            except ValueError as exc:
                await reject(msg, str(exc))
                continue
            try:
                state = UserState.from_json(users.get(parsed.user_id))
                new_state = apply_event(
                    state, parsed, msg.partition, max_signals=settings.window_max_signals,
                    max_age_s=settings.window_max_age_s, clicked_memory=settings.clicked_memory)
            except Exception as exc:  # a poison record must not stop its partition: park it in the DLQ
                log.exception("cannot apply event %r of user %r", parsed.event_id, parsed.user_id)
                await reject(msg, f"cannot apply event: {error_summary(exc, secrets)}")
                continue
            users[parsed.user_id] = new_state.to_json()
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
        metrics.inc_label("dead_letters", "model_update")
        await dlq.send(key=key, value=letter.to_json_bytes())

    @app.task
    async def model_updates() -> None:
        await follow_model_updates(update_consumer(settings), settings.topic_model_updates, active_model, loader,
                                   metrics, dead_letter_model_update)

    if worker.trending is not None:
        trending_feed = worker.trending

        @app.task
        async def trending_events() -> None:
            await follow_trending(trending_consumer(settings), settings.topic_events, trending_feed)

    if news is not None and hasattr(news, "attach"):
        @app.task
        async def attach_news_feed() -> None:
            news.attach(asyncio.get_running_loop())  # dense upserts now run on this loop

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

    _user_table_view(app, latest, "/recommendations/{user_id}", "recommendation",
                     lambda user_id, rec: served_recommendation(rec, users.get(user_id)))
    _user_table_view(app, users, "/users/{user_id}", "window")
    _rank_view(app, worker)
    _explain_view(app, worker)

    @app.page("/health")
    async def health(web: Any, request: Request) -> Response:
        # Ready = partitions assigned and tables recovered: before that, events wait unread.
        ready = bool(app.consumer.assignment()) and not app.rebalancing and app.tables.recovery.completed.is_set()
        search = await search_status(engine, secrets)
        # A search outage degrades the worker but does not make it unready: it keeps consuming
        # and serving the last recommendations (stale), and a restart would not bring search back.
        status = ("ok" if search["ok"] else "degraded") if ready else "starting"
        body = {"status": status, **active_model.status(), "engine": engine.name,
                "documents": search["documents"], "search": search, "refresh": worker.health.snapshot(),
                "channels": channels_snapshot(worker), "assigned_partitions": len(app.consumer.assignment())}
        return web.json(body, status=200 if ready else 503)

    @app.page("/stats")
    async def stats(web: Any, request: Request) -> Response:
        snap = metrics.snapshot() | {"queued": len(queue), "in_flight": queue.in_flight} | active_model.status()
        return web.json(snap | {"refresh": worker.health.snapshot(), "channels": channels_snapshot(worker),
                                "consumer_lag": consumer_lag(app, settings.topic_events)})

    worker.registry = prometheus_registry(metrics, lambda: live_metrics(worker))

    @app.page("/metrics")
    async def prometheus_metrics(web: Any, request: Request) -> Response:
        # The same numbers as /stats, in the Prometheus text format (README "Metrics").
        return web.bytes(generate_latest(worker.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    return worker


def consumer_lag(app: faust.App, topic: str) -> int | None:
    """Records of ``topic`` on this worker's assigned partitions not committed yet: the
    high watermark its consumer last fetched minus the group's committed offset (in
    process, no broker call); None before any of them was fetched."""
    try:
        consumer = app.consumer
        committed = consumer._committed_offset  # faust keeps the group's committed offsets here
        lag, known = 0, False
        for tp in consumer.assignment():
            if tp.topic != topic:
                continue
            high = consumer.highwater(tp)
            if high is None:
                continue
            known = True
            lag += max(0, high - (committed.get(tp) or 0))
        return lag if known else None
    except Exception:  # noqa: BLE001 - not started or rebalancing: unknown, never a failed scrape
        return None


def live_metrics(worker: Worker) -> Live:
    """What /metrics reads from the worker's live objects (the same ones /stats shows)."""
    health = worker.model_health
    return Live(queued=len(worker.queue), in_flight=worker.queue.in_flight, model_failures=health.failures,
                model_timeouts=health.timeouts, degraded_batches=health.degraded_batches,
                model_version=worker.active_model.status()["model_version"],
                consumer_lag=consumer_lag(worker.app, worker.settings.topic_events))


def channels_snapshot(worker: Worker) -> dict[str, Any]:
    """What /stats and /health say about the recall channels."""
    weights = worker.config.weights
    dense = worker.dense
    return {"weights": weights, **worker.model_health.snapshot(),
            "dense": None if dense is None else {"documents": dense.count_sync(),
                                                 "error": getattr(dense, "error", None)},
            "trending": None if worker.trending is None else worker.trending.snapshot()}


class RankError(Exception):
    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(body.get("error"))
        self.status, self.body = status, body


def parse_rank_request(raw: bytes, max_candidates: int) -> tuple[str, list[str], int]:
    """``{"user_id": str, "candidates": [news ids], "k": int}`` (k optional: all) or RankError(400/413)."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        raise RankError(400, {"error": "body is not JSON"}) from None
    if not isinstance(body, dict):
        raise RankError(400, {"error": "body must be a JSON object"})
    unknown_fields = sorted(set(body) - {"user_id", "candidates", "k"})
    if unknown_fields:
        raise RankError(400, {"error": f"unknown field(s) {unknown_fields}: use user_id, candidates, k"})
    user_id, candidates, k = body.get("user_id"), body.get("candidates"), body.get("k")
    if not isinstance(user_id, str) or not 1 <= len(user_id) <= 128:
        raise RankError(400, {"error": "user_id must be a string of 1-128 characters"})
    if not isinstance(candidates, list) or not all(isinstance(c, str) and 1 <= len(c) <= 64 for c in candidates):
        raise RankError(400, {"error": "candidates must be a list of news ids (strings of 1-64 characters)"})
    if not candidates:
        raise RankError(400, {"error": "candidates is empty"})
    if len(candidates) > max_candidates:
        raise RankError(413, {"error": f"{len(candidates)} candidates, more than {max_candidates} per request"})
    if k is None:
        k = len(candidates)
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise RankError(400, {"error": "k must be a positive integer"})
    return user_id, list(dict.fromkeys(candidates)), k


async def _read_body(request: Request, limit: int = RANK_MAX_BODY_BYTES) -> bytes:
    too_big = RankError(413, {"error": f"request body is larger than {limit} bytes"})
    if request.content_length is not None and request.content_length > limit:
        raise too_big
    chunks, size = [], 0
    while chunk := await request.content.read(64 * 1024):
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


async def rank_for_user(worker: Worker, user_id: str, candidates: list[str], k: int) -> dict[str, Any]:
    """``candidates`` ordered for ``user_id`` from the user's current window, the model queries
    of the user's last published recommendation (the model is never called here), dense
    and trending; a user without signals gets the trending order, marked ``cold``."""
    state = UserState.from_json(worker.users.get(user_id))
    latest = worker.latest.get(user_id) or {}
    cold = not state.signals
    queries = [] if cold else list(latest.get("queries") or [])
    recall = worker.recall()
    await _warm_dense(worker, [state])
    ordered = (await rank(recall, [state], [queries], [candidates], worker.config, ranker=worker.ranker,
                          categories=getattr(worker.news, "categories", None)))[0][:k]
    return {"user_id": user_id, "cold": cold, "queries": queries, "model_version": latest.get("model_version"),
            "generated_at": datetime.now(UTC).isoformat(),
            "items": [{"news_id": i.news_id, "title": i.title, "score": i.score, "query": i.query,
                       "channels": list(i.channels)} for i in ordered]}


def _rank_view(app: faust.App, worker: Worker) -> None:
    """POST /rank: answered by the worker that owns the user's partition (the body is
    forwarded once, marked with ROUTED_HEADER)."""

    class RankView(View):
        async def post(self, request: Request) -> Response:
            try:
                raw = await _read_body(request)
                user_id, candidates, k = parse_rank_request(raw, worker.settings.rank_max_candidates)
                unknown = worker.unknown_ids(candidates)
                if unknown:
                    raise RankError(400, {"error": f"unknown news id(s): {', '.join(unknown[:20])}",
                                          "unknown": unknown})
                if not request.headers.get(ROUTED_HEADER):
                    forwarded = await _forward_to_owner(app, worker, user_id, request, raw)
                    if forwarded is not None:
                        return forwarded
                return self.json(await rank_for_user(worker, user_id, candidates, k))
            except RankError as exc:
                return self.json(exc.body, status=exc.status)

    app.page("/rank", name="rank")(RankView)


def _url_ident(url: Any) -> tuple[str, int]:
    return ((url.host if url.scheme else url.path) or "", int(url.port or 80))


async def _forward_to_owner(app: faust.App, worker: Worker, user_id: str, request: Request,
                            raw: bytes) -> Response | None:
    """The owner's answer, or None when this worker owns the user's partition."""
    try:
        dest = app.router.key_store(worker.latest.name, user_id)
    except KeyError:
        raise RankError(503, {"error": "partition owners unknown (worker starting or rebalancing)"}) from None
    if _url_ident(dest) == _url_ident(app.conf.canonical_url):
        return None
    host, port = _url_ident(dest)
    url = request.url.with_host(host).with_port(port)
    headers = {"Content-Type": "application/json", ROUTED_HEADER: "1"}
    async with app.http_client.request(method="POST", url=url, data=raw, headers=headers) as response:
        return app.web.text(await response.text(), content_type=response.content_type, status=response.status)


def _user_table_view(app: faust.App, table: Any, path: str, what: str,
                     present: Callable[[str, Any], Any] | None = None) -> None:
    """GET ``path`` → the user's row (through ``present``), answered by the worker that
    owns its partition (every table is partitioned by user_id alike)."""

    class UserTableView(View):
        @app.table_route(table=table, match_info="user_id")
        async def get(self, request: Request, user_id: str) -> Response:
            value = table.get(user_id)
            if value is None:
                return self.json({"error": f"no {what} for user {user_id!r} yet"}, status=404)
            return self.json(present(user_id, value) if present else value)

    app.page(path, name=f"user-{what}")(UserTableView)


def _explain_view(app: faust.App, worker: Worker) -> None:
    """GET /explain/{user_id}: the HTML page of :mod:`streams.explain`, answered by the owner
    of the user's partition (table routing, like GET /recommendations/{user_id}); the page's
    headers (Content-Security-Policy: no scripts) are set on a forwarded answer too."""
    users, latest = worker.users, worker.latest

    class ExplainView(View):
        @app.table_route(table=latest, match_info="user_id")
        async def _render(self, request: Request, user_id: str) -> Response:
            window, rec = users.get(user_id), latest.get(user_id)
            page = explain_page(user_id, window, served_recommendation(rec, window))
            return self.html(page, status=200 if window or rec else 404)

        async def get(self, request: Request, user_id: str) -> Response:
            response = await self._render(request, user_id)
            response.headers.update(PAGE_HEADERS)
            return response

    app.page("/explain/{user_id}", name="user-explain")(ExplainView)


async def run_refresher(worker: Worker) -> None:
    """Forever: gather a micro-batch of due refreshes, run the model on it, and hand it to
    a publishing task, so the next batch's model call overlaps this batch's search+publish."""
    settings, queue = worker.settings, worker.queue
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
    publishing: set[asyncio.Task[None]] = set()
    while True:
        await _wait_until_due(worker)
        pause = worker.health.paused_until - time.monotonic()
        if pause > 0:  # backing off a failing model/search: no batch at all until then
            await asyncio.sleep(pause)
            continue
        if worker.health.failures and publishing:  # while failing, one probe batch at a time
            await asyncio.wait(publishing)
            continue
        if len(queue) < settings.batch_max_users and settings.batch_max_wait_ms and not publishing:
            await asyncio.sleep(settings.batch_max_wait_ms / 1000)  # idle: let a batch gather
        batch = queue.take_due(time.monotonic(), settings.batch_max_users)
        if not batch:
            continue
        try:
            generated = await generate_batch(worker, batch, executor)
        except Exception as exc:  # noqa: BLE001 - whatever failed, the batch is retried, never lost
            _failed(worker, batch, "model", exc)
            continue
        task = asyncio.create_task(_publish_or_retry(worker, generated))
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


def _failed(worker: Worker, batch: list[Refresh], stage: str, exc: BaseException) -> None:
    now = time.monotonic()
    first = worker.health.failures == 0
    delay = worker.health.failed(stage, exc, now)
    worker.metrics.inc("batches_failed")
    worker.metrics.inc(f"batches_failed_{stage.replace('/', '_')}")
    if first:  # the traceback once per outage; then one line per retry
        log.error("%s stage failed for a batch of %d users; retrying in %.1fs", stage, len(batch), delay,
                  exc_info=exc)
    else:
        log.warning("%s stage failed again (%d in a row) for %d users: %s; retrying in %.1fs", stage,
                    worker.health.failures, len(batch), worker.health.last_error["error"]
                    if worker.health.last_error else "", delay)
    worker.queue.retry(batch, now + delay)
    worker.wakeup.set()


async def _publish_or_retry(worker: Worker, generated: Generated) -> None:
    try:
        await publish_batch(worker, generated)
    except Exception as exc:  # noqa: BLE001 - whatever failed, the batch is retried, never lost
        _failed(worker, generated.batch, "search/publish", exc)
    else:
        worker.health.succeeded()


@dataclass
class Generated:
    batch: list[Refresh]
    states: list[UserState]
    queries: list[list[str]]
    model_version: str  # of the model that wrote these queries, not whichever is active at publish
    degraded: list[str] = field(default_factory=list)  # channels left out of this batch (["model"])


def _consume_result(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()  # a late failure of an abandoned call is not an unretrieved error


async def generate_batch(worker: Worker, batch: list[Refresh], executor: ThreadPoolExecutor) -> Generated:
    """One model call for the whole batch: each user's window → prompt → query list.

    A model that fails or takes longer than ``model_timeout_s`` leaves the batch without
    queries, marked degraded: the other channels still publish. A timed-out call keeps
    running in its thread; until it ends, batches go without the model at once."""
    states = [UserState.from_json(worker.users.get(r.user_id)) for r in batch]
    model = worker.active_model.current  # read once: a rollout swap never splits a batch
    cfg = worker.config
    worker.metrics.observe("batch_users", len(batch))
    no_queries: list[list[str]] = [[] for _ in batch]
    if "model" not in cfg.weights:
        return Generated(batch, states, no_queries, version_of(model))
    health = worker.model_health
    if worker.model_call is not None and not worker.model_call.done():
        health.failed(None, timed_out=True, reason="an earlier model call is still running after its timeout")
        return _model_degraded(worker, batch, states, model)
    t0 = time.perf_counter()
    call = asyncio.get_running_loop().run_in_executor(executor, generate_queries, model, states, cfg)
    call.add_done_callback(_consume_result)
    worker.model_call = call
    try:
        queries = await asyncio.wait_for(asyncio.shield(call), worker.settings.model_timeout_s)
    except TimeoutError as exc:
        text = health.failed(exc, timed_out=True,
                             reason=f"no answer within model_timeout_s={worker.settings.model_timeout_s:g}")
        _log_model_failure(worker, batch, text, None)
        return _model_degraded(worker, batch, states, model)
    except Exception as exc:  # noqa: BLE001 - any model failure degrades this batch, never stops refreshes
        text = health.failed(exc)
        _log_model_failure(worker, batch, text, exc)
        return _model_degraded(worker, batch, states, model)
    health.succeeded()
    worker.metrics.observe("model_batch_ms", (time.perf_counter() - t0) * 1000)
    return Generated(batch, states, queries, version_of(model))


def _model_degraded(worker: Worker, batch: list[Refresh], states: list[UserState], model: QueryModel) -> Generated:
    worker.model_health.degraded_batches += 1
    # Kept for dashboards that count failed model stages (the batch itself is still published).
    worker.metrics.inc("batches_failed")
    worker.metrics.inc("batches_failed_model")
    return Generated(batch, states, [[] for _ in batch], version_of(model), degraded=["model"])


def _log_model_failure(worker: Worker, batch: list[Refresh], text: str, exc: BaseException | None) -> None:
    in_row = worker.model_health.in_row
    if in_row == 1:  # the traceback once per streak; then a line every 100 batches
        log.error("model failed for a batch of %d users (%s); publishing the other channels", len(batch), text,
                  exc_info=exc)
    elif in_row % 100 == 0:
        log.warning("model failed %d batches in a row (%s); publishing the other channels", in_row, text)


async def _warm_dense(worker: Worker, states: list[UserState]) -> None:
    """Embed the users' signal texts in a thread, so the dense channel's own call (on the
    event loop) finds them in the embedder's cache instead of blocking the loop."""
    dense = worker.dense
    if dense is None or "dense" not in worker.config.weights or not dense.count_sync():
        return
    n = worker.config.dense_signals
    texts = list(dict.fromkeys(t for s in states for t in signal_queries(s, n)))
    if texts:
        await asyncio.to_thread(dense.embedder.encode, texts)


async def publish_batch(worker: Worker, generated: Generated) -> None:
    """Every channel for the batch (one lexical search call, dense, trending), weighted RRF
    per user, publish."""
    metrics, batch = worker.metrics, generated.batch
    t0 = time.perf_counter()
    await _warm_dense(worker, generated.states)
    warm_s = time.perf_counter() - t0
    timings: dict[str, float] = {}
    fused = await recommend(worker.recall(), generated.states, generated.queries, worker.config, timings=timings)
    metrics.observe("search_batch_ms", (time.perf_counter() - t0) * 1000)
    if "dense" in timings:  # embedding the signals plus the vector search
        metrics.observe("dense_batch_ms", (warm_s + timings["dense"]) * 1000)
    if worker.settings.fault_kill_before_publish:  # tests/faults: a crash between model call and publish
        import os

        os._exit(137)
    now_wall = datetime.now(UTC)
    for r, queries, items in zip(batch, generated.queries, fused):
        rec = Recommendation(
            user_id=r.user_id, generated_at=now_wall, model_version=generated.model_version, queries=queries,
            items=[RecItem(news_id=i.news_id, title=i.title, score=i.score, query=i.query,
                           channels=list(i.channels)) for i in items],
            trigger_event_id=r.trigger_event_id,
            latency_ms=round((time.monotonic() - r.first_seen_at) * 1000, 3),
            degraded=list(generated.degraded),
        )
        body, key = rec.to_json_bytes(), r.user_id.encode("utf-8")
        await worker.recommendations.send(key=key, value=body)
        await worker.refresh_done.send(key=key, value=body, partition=r.partition)
        metrics.observe("refresh_latency_ms", rec.latency_ms)
        metrics.inc("recommendations_out")
        for item in rec.items:
            for channel in item.channels:
                metrics.inc_label("recommended_items", channel_label(channel))
    worker.queue.finish(batch, time.monotonic())
    worker.wakeup.set()  # users queued while in flight are schedulable again
