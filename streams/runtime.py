"""Assemble and run one worker process: settings → model → search engine → Faust app."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from index.base import SearchEngine
from index.document import NewsArticle
from streams.feed import IndexFollower
from streams.producer import ensure_topics
from streams.recommend import QueryModel
from streams.rollout import Loader
from streams.settings import CommonSettings, WorkerSettings

log = logging.getLogger(__name__)


def open_engine(settings: CommonSettings) -> tuple[SearchEngine, IndexFollower | None]:
    """The configured engine; the embedded one comes with a follower that feeds it."""
    if settings.engine == "elasticsearch":

        return settings.elastic_engine(), None
    from index.embedded import EmbeddedEngine

    embedded = EmbeddedEngine()
    follower = IndexFollower(settings.consumer_config("newsrec-index-follower"), settings.topic_news,
                             embedded.upsert_sync)
    return embedded, follower


class NewsFeed:
    """What the news follower writes into: the embedded engine (when there is one) and the
    set of news ids indexed so far (``known``: POST /rank refuses other ids)."""

    def __init__(self, upsert: Callable[[list[NewsArticle]], int] | None = None,
                 delete: Callable[[list[str]], None] | None = None) -> None:
        self._upsert, self._delete = upsert, delete
        self.known: set[str] = set()
        self.categories: dict[str, tuple[str, str]] = {}  # the learned ranker's profile features

    def __call__(self, articles: list[NewsArticle]) -> int:
        if self._upsert is not None:
            self._upsert(articles)
        self.known.update(a.news_id for a in articles)
        self.categories.update((a.news_id, (a.category, a.subcategory)) for a in articles)
        return len(articles)

    def delete(self, news_ids: list[str]) -> None:
        """A tombstone: the article leaves the engine and the known ids."""
        if self._delete is not None:
            self._delete(news_ids)
        self.known.difference_update(news_ids)
        for news_id in news_ids:
            self.categories.pop(news_id, None)


# Articles embedded per step: the dense index grows as it goes instead of all at once.
DENSE_CHUNK = 64


class LazyDense:
    """The dense index (MiniLM), loaded in the dense follower's thread on its first articles,
    so a worker starts without waiting for MiniLM; until then (and for good, with a warning,
    if MiniLM cannot load) it counts 0 documents and the dense channel is skipped. Otherwise
    it stands for the ``index.dense.DenseIndex`` it holds."""

    def __init__(self, factory: Callable[[], Any]) -> None:
        self._factory = factory
        self._index: Any = None
        self.error: str | None = None
        self._lock = threading.Lock()

    def ensure(self) -> Any:
        """The index, loading it on first use; None when MiniLM cannot load."""
        with self._lock:
            if self._index is None and self.error is None:
                try:
                    self._index = self._factory()
                except Exception as exc:  # noqa: BLE001 - missing package, broken checkpoint: no dense channel
                    self.error = f"{type(exc).__name__}: {exc}"[:300]
                    log.warning("dense channel off: MiniLM cannot load (%s)", self.error)
            return self._index

    def count_sync(self) -> int:
        return self._index.count_sync() if self._index is not None else 0

    def __getattr__(self, name: str) -> Any:
        index = self.__dict__.get("_index")
        if index is None:
            raise AttributeError(f"dense index not loaded ({name})")
        return getattr(index, name)


# Embeddings the embedder keeps by text: enough for a chunk of articles or a batch's signals
# between the thread that embeds them and the loop that uses them (about 12 MiB); article
# vectors live in the index itself, so a large cache would only duplicate them.
EMBEDDING_CACHE = 8_192


def _minilm_index(settings: WorkerSettings) -> Any:
    from index.dense import DenseIndex

    return DenseIndex(settings.minilm_embedder(cache_size=EMBEDDING_CACHE))


class DenseFeed:
    """Feeds the dense index from its own news follower thread.

    Embedding (the slow part) runs in the follower's thread and fills the embedder's cache;
    the index itself is then changed on the worker's event loop, where every dense search
    runs, so a search never sees a half-added article (``DenseIndex`` is not thread-safe for
    writes). Before the loop is attached (start-up) the follower writes directly."""

    def __init__(self, dense: LazyDense) -> None:
        self.dense = dense
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None

    def __call__(self, articles: list[NewsArticle]) -> int:
        from index.dense import article_text

        index = self.dense.ensure()
        if index is None:
            return 0
        done = 0
        for start in range(0, len(articles), DENSE_CHUNK):
            chunk = articles[start: start + DENSE_CHUNK]
            try:
                index.embedder.encode([article_text(a) for a in chunk])
            except Exception:  # the dense channel misses these articles; lexical search still has them
                log.exception("dense index: cannot embed %d articles", len(chunk))
                continue
            with self._lock:
                if self._loop is None:
                    index.upsert_sync(chunk)
                else:
                    try:
                        self._loop.call_soon_threadsafe(self._apply, index, chunk)
                    except RuntimeError:  # the worker's loop is closed: shutting down
                        return done
            done += len(chunk)
        return done

    def delete(self, news_ids: list[str]) -> None:
        """A tombstone: removed on the loop too (or directly before it is attached)."""
        index = self.dense.ensure()
        if index is None:
            return
        with self._lock:
            if self._loop is None:
                index.delete_sync(news_ids)
            else:
                try:
                    self._loop.call_soon_threadsafe(index.delete_sync, list(news_ids))
                except RuntimeError:  # the worker's loop is closed: shutting down
                    pass

    @staticmethod
    def _apply(index: Any, articles: Sequence[NewsArticle]) -> None:
        try:
            index.upsert_sync(articles)  # embeddings cached: no model call on the loop
        except Exception:
            log.exception("dense index: cannot add %d articles", len(articles))

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._lock:
            self._loop = loop


def open_dense(settings: WorkerSettings) -> LazyDense | None:
    """The dense index when the dense channel is weighted above 0 (MiniLM loads lazily)."""
    if settings.channel_weights.get("dense", 0) <= 0:
        return None
    return LazyDense(lambda: _minilm_index(settings))


class _Feeds:
    """The news feed (known ids) and the dense feed, attached to the worker's loop together."""

    def __init__(self, news: NewsFeed, dense: DenseFeed | None) -> None:
        self.news, self.dense_feed = news, dense

    @property
    def known(self) -> set[str]:
        return self.news.known

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.dense_feed is not None:
            self.dense_feed.attach(loop)


def load_model(settings: WorkerSettings) -> Any:
    model_dir = settings.resolved_model_dir()
    if not (model_dir / "manifest.json").exists():
        raise FileNotFoundError(
            f"no model at {model_dir}: run `newsrec models bootstrap --out {model_dir}` "
            "or set NEWSREC_MODEL_DIR to an exported model directory")
    return open_model(settings, model_dir)


def open_model(settings: WorkerSettings, model_dir: Path, *, verify: bool = True) -> Any:
    from models.runtime import OnnxCausalLM

    # max_queries: a row stops once its list holds the queries the worker keeps (same parse).
    return OnnxCausalLM(model_dir, verify=verify, intra_op_threads=settings.model_threads or None,
                        memory_arena=settings.model_memory_arena, max_queries=settings.max_queries)


def rollout_loader(settings: WorkerSettings) -> Loader:
    """How the worker loads an announced model dir; the rollout has just verified its
    manifest, so the runtime does not hash every file a second time."""
    def load(model_dir: Path) -> QueryModel:
        return open_model(settings, model_dir, verify=False)

    return load


def _return_freed_memory() -> None:
    """glibc keeps freed blocks under its adaptive mmap threshold in the heap, so RSS after
    a burst of large model batches stays at the peak; a fixed 1 MiB threshold maps those
    buffers and unmaps them on free (measured: RSS flat across bursts, see bench faults)."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc: nothing to tune
        log.debug("mallopt unavailable; leaving the allocator as it is")


def run_worker(settings: WorkerSettings) -> int:
    import faust

    from streams.app import create_worker

    for warning in settings.security_warnings():  # first: the broker connection below may fail
        log.warning("%s", warning)
    ensure_topics(settings, extra=[settings.refresh_done_topic])
    _return_freed_memory()
    model = load_model(settings)
    engine, _ = open_engine(settings)
    # One follower feeds the embedded engine (if any) and the known ids; the dense index has
    # its own, so embedding a large corpus never holds up the lexical index at start-up.
    embedded = settings.engine == "embedded"
    news = NewsFeed(getattr(engine, "upsert_sync", None) if embedded else None,
                    getattr(engine, "delete_sync", None) if embedded else None)
    follower = IndexFollower(settings.consumer_config("newsrec-index-follower"), settings.topic_news, news,
                             delete=news.delete)
    dense = open_dense(settings)
    dense_feed = DenseFeed(dense) if dense is not None else None
    followers = [follower]
    if dense_feed is not None:
        followers.append(IndexFollower(settings.consumer_config("newsrec-dense-follower"), settings.topic_news,
                                       dense_feed, delete=dense_feed.delete))
    for f in followers:
        f.start()
    if not follower.wait_caught_up(timeout=60):
        log.warning("news index not caught up after 60 s; serving with %d articles so far", follower.indexed)
    worker = create_worker(settings, model, engine, rollout_loader(settings), dense=dense,
                           news=_Feeds(news, dense_feed))
    log.info("worker %s: model %s, engine %s, channels %s, web http://%s:%d", settings.app_id, model.version,
             engine.name, worker.config.weights, settings.web_host, settings.web_port)
    try:
        faust.Worker(worker.app, loglevel="INFO", quiet=True).execute_from_commandline()
    except SystemExit as exc:
        return int(exc.code or 0)
    finally:
        for f in followers:
            f.stop()
    return 0
