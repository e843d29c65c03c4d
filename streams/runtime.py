"""Assemble and run one worker process: settings → model → search engine → Faust app."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from index.base import SearchEngine
from index.feed import IndexFollower
from streams.producer import ensure_topics
from streams.recommend import QueryModel
from streams.rollout import Loader
from streams.settings import CommonSettings, WorkerSettings

log = logging.getLogger(__name__)


def open_engine(settings: CommonSettings) -> tuple[SearchEngine, IndexFollower | None]:
    """The configured engine; the embedded one comes with a follower that feeds it."""
    if settings.engine == "elasticsearch":
        from index.elastic import ElasticEngine

        assert settings.es_url is not None
        engine = ElasticEngine(settings.es_url, settings.es_alias, api_key=settings.es_api_key_value(),
                               ca_certs=str(settings.es_ca_certs) if settings.es_ca_certs else None)
        return engine, None
    from index.embedded import EmbeddedEngine

    embedded = EmbeddedEngine()
    follower = IndexFollower(settings.consumer_config("newsrec-index-follower"), settings.topic_news,
                             embedded.upsert_sync)
    return embedded, follower


def load_model(settings: WorkerSettings) -> Any:
    from models.runtime import OnnxCausalLM

    model_dir = settings.resolved_model_dir()
    if not (model_dir / "manifest.json").exists():
        raise FileNotFoundError(
            f"no model at {model_dir}: run `newsrec models bootstrap --out {model_dir}` "
            "or set NEWSREC_MODEL_DIR to an exported model directory")
    return OnnxCausalLM(model_dir, intra_op_threads=settings.model_threads or None)


def rollout_loader(settings: WorkerSettings) -> Loader:
    """How the worker loads an announced model dir; the rollout has just verified its
    manifest, so the runtime does not hash every file a second time."""
    from models.runtime import OnnxCausalLM

    def load(model_dir: Path) -> QueryModel:
        return OnnxCausalLM(model_dir, verify=False, intra_op_threads=settings.model_threads or None)

    return load


def run_worker(settings: WorkerSettings) -> int:
    import faust

    from streams.app import create_worker

    ensure_topics(settings, extra=[settings.refresh_done_topic])
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
