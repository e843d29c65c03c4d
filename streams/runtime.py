"""Assemble and run one worker process: settings → model → search engine → Faust app."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from index.base import SearchEngine
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


def load_model(settings: WorkerSettings) -> Any:
    model_dir = settings.resolved_model_dir()
    if not (model_dir / "manifest.json").exists():
        raise FileNotFoundError(
            f"no model at {model_dir}: run `newsrec models bootstrap --out {model_dir}` "
            "or set NEWSREC_MODEL_DIR to an exported model directory")
    return open_model(settings, model_dir)


def open_model(settings: WorkerSettings, model_dir: Path, *, verify: bool = True) -> Any:
    from models.runtime import OnnxCausalLM

    return OnnxCausalLM(model_dir, verify=verify, intra_op_threads=settings.model_threads or None,
                        memory_arena=settings.model_memory_arena)


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
    engine, follower = open_engine(settings)
    if follower is not None:
        follower.start()
        if not follower.wait_caught_up(timeout=60):
            log.warning("news index not caught up after 60 s; serving with %d articles so far", follower.indexed)
    worker = create_worker(settings, model, engine, rollout_loader(settings))
    log.info("worker %s: model %s, engine %s, web http://%s:%d", settings.app_id, model.version, engine.name,
             settings.web_host, settings.web_port)
    try:
        faust.Worker(worker.app, loglevel="INFO", quiet=True).execute_from_commandline()
    except SystemExit as exc:
        return int(exc.code or 0)
    finally:
        if follower is not None:
            follower.stop()
    return 0
