"""Model registry and rollout: versioned model dirs, announced on ``model-updates``.

Registry: ``<root>/<version>/`` is one exported model dir (with ``manifest.json``) per
version, never rewritten once there, so an announcement names fixed bytes. :func:`publish`
verifies a dir, copies it into the registry and announces it (key ``"model"``).

Worker: every worker reads the whole topic itself, without a consumer group, because each
one must see every announcement. Once caught up it applies the newest announced version
that works (so a restarted worker ends where the running ones are), then each new one as
it arrives. A new model is verified, loaded and warmed in a thread while the current one
keeps serving, then swapped in between two batches; if any step fails the current model
stays and the refusal is reported on /health and /stats.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal
from uuid import uuid4

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Producer, TopicPartition

from models.manifest import MANIFEST_FILE, Manifest, ModelIntegrityError, sha256_file, verify_manifest
from models.prompt import build_prompt
from streams.contracts import MODEL_VERSION_PATTERN, DeadLetter, ModelUpdate, dead_letter, parse_model_update
from streams.kafka_log import with_logger
from streams.metrics import Metrics
from streams.producer import ensure_topics
from streams.recommend import QueryModel
from streams.settings import WorkerSettings
from streams.window import Signal

log = logging.getLogger(__name__)

MODEL_UPDATE_KEY = b"model"
# Warm-up: one short generate on a fixed prompt in the serving format, so the first real
# batch pays no first-run cost and a model that cannot generate is refused before the swap.
_WARMUP_AT = datetime(2026, 1, 1, tzinfo=UTC)
WARMUP_PROMPT = build_prompt([Signal("warmup", "search", "electric car battery range", _WARMUP_AT)], now=_WARMUP_AT)
WARMUP_TOKENS = 4
SETUP_RETRY_S = 5.0

Loader = Callable[[Path], QueryModel]
DeadLetterSink = Callable[[bytes | None, DeadLetter], Awaitable[None]]


class RolloutError(Exception):
    """A model dir cannot be published or rolled out; the message says why."""


def version_of(model: QueryModel) -> str:
    return model.version or "unversioned"


# --- registry and publishing --------------------------------------------------------------


def _verified(model_dir: Path) -> Manifest:
    try:
        return verify_manifest(model_dir)
    except (ModelIntegrityError, OSError) as exc:
        raise RolloutError(f"verification failed: {exc}") from None


def register(model_dir: Path, root: Path) -> tuple[Manifest, Path]:
    """Verify ``model_dir`` and make it ``<root>/<version>/`` (copied unless it already is).

    Returns its manifest and the absolute registry dir. A version already registered with
    a different manifest is refused: one version names one model for good."""
    model_dir, root = Path(model_dir), Path(root)
    if not model_dir.is_dir():
        raise RolloutError(f"{model_dir} is not a directory")
    manifest = _verified(model_dir)
    if not re.match(MODEL_VERSION_PATTERN, manifest.version):
        raise RolloutError(f"manifest version {manifest.version!r} cannot name a registry directory "
                           f"(letters, digits and . _ + - only)")
    dest = root / manifest.version
    if dest.resolve() == model_dir.resolve():
        return manifest, dest.resolve()
    if dest.exists():
        _verified(dest)  # the registry copy may have been damaged since it was published
        if sha256_file(dest / MANIFEST_FILE) != sha256_file(model_dir / MANIFEST_FILE):
            raise RolloutError(f"the registry already has version {manifest.version!r} at {dest} with a "
                               "different manifest: give the new export its own version")
        return manifest, dest.resolve()
    root.mkdir(parents=True, exist_ok=True)
    incoming = root / f".incoming-{manifest.version}-{uuid4().hex[:8]}"
    try:
        shutil.copytree(model_dir, incoming)
        _verified(incoming)  # what workers will read is the copy, so check the copy
        os.rename(incoming, dest)  # atomic: nobody ever sees a half-copied version dir
    except BaseException:
        shutil.rmtree(incoming, ignore_errors=True)
        raise
    log.info("registered %s %s at %s", manifest.name, manifest.version, dest)
    return manifest, dest.resolve()


def publish(settings: WorkerSettings, model_dir: Path, *, timeout: float = 30.0) -> ModelUpdate:
    """Register ``model_dir`` (it must verify) and announce it on ``settings.topic_model_updates``."""
    manifest, dest = register(model_dir, settings.resolved_model_registry())
    ensure_topics(settings)  # only now: a dir that does not verify is refused without a broker
    update = ModelUpdate(version=manifest.version, model_dir=str(dest), published_at=datetime.now(UTC),
                         manifest_sha256=sha256_file(dest / MANIFEST_FILE))
    errors: list[str] = []
    producer = Producer(with_logger(settings.producer_config()))
    producer.produce(settings.topic_model_updates, key=MODEL_UPDATE_KEY, value=update.to_json_bytes(),
                     on_delivery=lambda err, _msg: errors.append(str(err)) if err is not None else None)
    if producer.flush(timeout) or errors:
        reason = errors[0] if errors else f"not delivered within {timeout:.0f}s"
        raise RolloutError(f"announcing {update.version} on {settings.topic_model_updates} failed: {reason}")
    log.info("announced model %s (%s) on %s", update.version, dest, settings.topic_model_updates)
    return update


# --- worker side: prepare, swap, report ----------------------------------------------------


def prepare_model(update: ModelUpdate, loader: Loader) -> QueryModel:
    """Verify, load and warm the announced model. Blocking (hashes every file): run it in a
    thread. Raises :class:`RolloutError` naming the step that failed."""
    model_dir = Path(update.model_dir)
    if not model_dir.is_dir():
        raise RolloutError(f"model dir {model_dir} does not exist on this host")
    manifest_path = model_dir / MANIFEST_FILE
    if not manifest_path.is_file():
        raise RolloutError(f"{manifest_path} is missing")
    if update.manifest_sha256 is not None:
        digest = sha256_file(manifest_path)
        if digest != update.manifest_sha256:
            raise RolloutError(f"{manifest_path} is not the announced one (sha256 {digest[:12]}…, "
                               f"announced {update.manifest_sha256[:12]}…)")
    manifest = _verified(model_dir)
    if manifest.version != update.version:
        raise RolloutError(f"{model_dir} holds version {manifest.version!r}, not the announced {update.version!r}")
    try:
        model = loader(model_dir)
    except Exception as exc:
        raise RolloutError(f"loading {model_dir} failed: {type(exc).__name__}: {exc}") from exc
    if model.version != update.version:
        raise RolloutError(f"loaded model reports version {model.version!r}, not {update.version!r}")
    try:
        out = model.generate([WARMUP_PROMPT], max_new_tokens=WARMUP_TOKENS)
    except Exception as exc:
        raise RolloutError(f"warm-up generate failed: {type(exc).__name__}: {exc}") from exc
    if len(out) != 1 or not isinstance(out[0], str):
        raise RolloutError(f"warm-up generate returned {out!r:.80}, expected one text")
    return model


@dataclass(frozen=True)
class RolloutOutcome:
    version: str
    status: Literal["ok", "refused"]
    reason: str | None = None
    at: datetime = field(default_factory=lambda: datetime.now(UTC))

    def to_json(self) -> dict[str, Any]:
        return {"version": self.version, "status": self.status, "reason": self.reason, "at": self.at.isoformat()}


class ActiveModel:
    """The model the refresher serves with, and how the last rollout went.

    The refresher reads ``current`` once per batch and keeps that object for the whole
    batch, so a swap (one reference assignment on the event loop) lands between batches."""

    def __init__(self, model: QueryModel) -> None:
        self.current = model
        self.last_rollout: RolloutOutcome | None = None

    @property
    def version(self) -> str:
        return version_of(self.current)

    def status(self) -> dict[str, Any]:
        return {"model_version": self.version,
                "rollout": self.last_rollout.to_json() if self.last_rollout else None}


async def roll_out(update: ModelUpdate, active: ActiveModel, loader: Loader, metrics: Metrics) -> bool:
    """Prepare ``update`` off the event loop, then swap it in; on any failure keep serving
    the current model and record the refusal. Returns whether it was swapped in."""
    t0 = time.perf_counter()
    try:
        model = await asyncio.to_thread(prepare_model, update, loader)
    except Exception as exc:  # noqa: BLE001 - whatever failed, the current model keeps serving
        reason = str(exc) if isinstance(exc, RolloutError) else f"{type(exc).__name__}: {exc}"
        active.last_rollout = RolloutOutcome(update.version, "refused", reason)
        metrics.inc("rollouts_refused")
        log.error("model rollout to %s refused, still serving %s: %s", update.version, active.version, reason)
        return False
    previous = active.version
    active.current = model
    active.last_rollout = RolloutOutcome(update.version, "ok")
    metrics.inc("rollouts_ok")
    log.info("model rollout %s -> %s (verified, loaded and warmed in %.1fs)", previous, update.version,
             time.perf_counter() - t0)
    return True


def startup_candidates(history: Sequence[ModelUpdate], local_version: str) -> list[ModelUpdate]:
    """Announcements worth trying at start, newest first, each version once, stopping at
    the local version. Trying them in order until one works leaves a restarted worker on
    the version the running workers kept: the newest one that works."""
    seen: set[str] = set()
    out: list[ModelUpdate] = []
    for update in reversed(history):
        if update.version == local_version:
            break
        if update.version not in seen:
            seen.add(update.version)
            out.append(update)
    return out


def update_consumer(settings: WorkerSettings) -> Consumer:
    # Partitions are assigned by hand (no group membership, no commits): group.id is only required.
    return Consumer(with_logger(settings.consumer_config(f"{settings.app_id}-models"))
                    | {"enable.auto.commit": False, "enable.partition.eof": True})


async def topic_partitions(call: Callable[..., Any], consumer: Any, topic: str) -> list[int]:
    """The partitions of ``topic``, waiting (and saying so) until the broker knows it.
    ``call`` runs a consumer method in the consumer's own thread."""
    while True:
        try:
            meta = (await call(consumer.list_topics, topic, 10.0)).topics[topic]
            if meta.error is not None:
                raise KafkaException(meta.error)
            return sorted(meta.partitions)
        except (KafkaException, KeyError) as exc:
            log.warning("cannot read %s yet (%s); retrying in %.0fs", topic, exc, SETUP_RETRY_S)
            await asyncio.sleep(SETUP_RETRY_S)


async def follow_model_updates(consumer: Any, topic: str, active: ActiveModel, loader: Loader, metrics: Metrics,
                               send_dead_letter: DeadLetterSink, *, poll_s: float = 0.5) -> None:
    """Forever: read ``topic`` from its start, apply the newest working announcement once
    caught up, then each new one. Invalid records that arrive while running are dead-lettered
    (every worker does so: duplicates share topic/partition/offset); older ones only logged."""
    # One thread for every consumer call, so closing it can never overlap a consume.
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-updates")
    loop = asyncio.get_running_loop()

    async def call(fn: Callable[..., Any], *args: Any) -> Any:
        return await loop.run_in_executor(executor, fn, *args)

    try:
        partitions = await topic_partitions(call, consumer, topic)
        ends = {p: (await call(consumer.get_watermark_offsets, TopicPartition(topic, p), 10.0))[1]
                for p in partitions}
        await call(consumer.assign, [TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        behind = set(partitions)  # partitions whose history (records from before the start) is unread
        history: list[ModelUpdate] = []
        started = False
        while True:
            for msg in await call(consumer.consume, 100, poll_s):
                err = msg.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        behind.discard(msg.partition())
                    else:
                        log.warning("model-updates consumer: %s", err)
                    continue
                try:
                    update = parse_model_update(msg.value() or b"")
                except ValueError as exc:
                    metrics.inc("model_updates_invalid")
                    if msg.offset() >= ends.get(msg.partition(), 0):
                        await send_dead_letter(msg.key(), dead_letter(
                            msg.value() or b"", str(exc), topic=msg.topic(), partition=msg.partition(),
                            offset=msg.offset()))
                    log.warning("invalid model update at %s[%d]@%d: %s", msg.topic(), msg.partition(),
                                msg.offset(), exc)
                    continue
                if not started:
                    history.append(update)
                elif update.version == active.version:
                    log.info("model %s announced again; already serving it", update.version)
                else:
                    await roll_out(update, active, loader, metrics)
            if not started and not behind:
                started = True
                for update in startup_candidates(history, active.version):
                    if await roll_out(update, active, loader, metrics):
                        break
                history.clear()
    finally:
        executor.submit(consumer.close)  # queued behind any consume still running
        executor.shutdown(wait=False)
