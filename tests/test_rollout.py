"""Model registry and rollout: the ModelUpdate contract, registry/prepare/swap logic with
stand-in models, the model-updates follower with a stand-in consumer, and one worker
process on the real broker rolling a new version out and refusing a corrupted one."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from confluent_kafka import KafkaError, Producer

from models.manifest import MANIFEST_FILE, sha256_file, write_manifest
from streams.app import run_refresher
from streams.contracts import DeadLetter, ModelUpdate, parse_model_update
from streams.metrics import Metrics
from streams.rollout import (
    WARMUP_PROMPT,
    ActiveModel,
    RolloutError,
    follow_model_updates,
    prepare_model,
    publish,
    register,
    roll_out,
    startup_candidates,
)
from streams.settings import WorkerSettings
from tests.streaming import CORPUS, add_event, consume, event, wait_for
from tests.test_refresher import make_worker
from tools.stack import WorkerProcess, get_json

NOW = datetime(2026, 11, 1, 9, 30, tzinfo=UTC)
SHA = "ab" * 32


class FakeModel:
    def __init__(self, version: str | None, *, fail: bool = False, delay: float = 0.0) -> None:
        self.version, self.fail, self.delay, self.calls = version, fail, delay, []

    def generate(self, prompts: list[str], *, max_new_tokens: int) -> list[str]:
        self.calls.append(list(prompts))
        time.sleep(self.delay)
        if self.fail:
            raise RuntimeError("session exploded")
        return ["1. electric cars\n2. battery range"] * len(prompts)


def fake_model_dir(path: Path, version: str) -> Path:
    path.mkdir(parents=True)
    (path / "model.onnx").write_bytes(bytes(range(256)) * 8)
    (path / "config.json").write_text('{"layers": 2}')
    write_manifest(path, name="fake", version=version)
    return path


def manifest_loader(model_dir: Path) -> FakeModel:
    return FakeModel(json.loads((model_dir / MANIFEST_FILE).read_text())["version"])


def update_for(model_dir: Path, version: str, **kw: Any) -> ModelUpdate:
    return ModelUpdate(version=version, model_dir=str(model_dir.resolve()), published_at=NOW, **kw)


def flip_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 16):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


# --- contract --------------------------------------------------------------------------------


def test_model_update_round_trips():
    update = ModelUpdate(version="tiny-1", model_dir="/srv/registry/tiny-1", published_at=NOW, manifest_sha256=SHA)
    assert parse_model_update(update.to_json_bytes()) == update
    minimal = parse_model_update(b'{"version": "v2", "model_dir": "/m/v2", "published_at": "2026-11-01T09:30:00Z"}')
    assert minimal.schema_version == 1 and minimal.manifest_sha256 is None


GOOD = {"version": "tiny-1", "model_dir": "/srv/registry/tiny-1", "published_at": "2026-11-01T09:30:00Z"}


@pytest.mark.parametrize("raw, reason", [
    (b"{not json", "Invalid JSON"),
    (b"\xff\xfe", "UTF-8"),
    (json.dumps({k: v for k, v in GOOD.items() if k != "model_dir"}).encode(), "model_dir: Field required"),
    (json.dumps(GOOD | {"model_dir": "registry/tiny-1"}).encode(), "absolute"),
    (json.dumps(GOOD | {"version": "../etc"}).encode(), "version"),
    (json.dumps(GOOD | {"version": ""}).encode(), "version"),
    (json.dumps(GOOD | {"published_at": "2026-11-01T09:30:00"}).encode(), "timezone"),
    (json.dumps(GOOD | {"manifest_sha256": "xyz"}).encode(), "manifest_sha256"),
    (json.dumps(GOOD | {"schema_version": 2}).encode(), "schema_version"),
    (json.dumps(GOOD | {"extra": 1}).encode(), "extra"),
    (json.dumps(GOOD | {"version": 3}).encode(), "version"),
])
def test_bad_model_updates_raise_readable_errors(raw, reason):
    with pytest.raises(ValueError, match=reason):
        parse_model_update(raw)


# --- registry ------------------------------------------------------------------------------


def test_register_copies_into_a_version_dir_once(tmp_path):
    src = fake_model_dir(tmp_path / "export", "v1")
    manifest, dest = register(src, tmp_path / "registry")
    assert manifest.version == "v1" and dest == (tmp_path / "registry" / "v1").resolve()
    assert sha256_file(dest / MANIFEST_FILE) == sha256_file(src / MANIFEST_FILE)
    assert register(src, tmp_path / "registry")[1] == dest  # same bytes again: a no-op
    assert register(dest, tmp_path / "registry")[1] == dest  # already in the registry
    assert [p.name for p in (tmp_path / "registry").iterdir()] == ["v1"]  # no leftovers

    other = fake_model_dir(tmp_path / "other", "v1")  # same version, another manifest
    (other / "config.json").write_text('{"layers": 3}')
    write_manifest(other, name="fake", version="v1")
    with pytest.raises(RolloutError, match="already has version 'v1'"):
        register(other, tmp_path / "registry")


def test_register_refuses_a_dir_that_does_not_verify(tmp_path):
    src = fake_model_dir(tmp_path / "export", "v1")
    flip_bytes(src / "model.onnx")
    with pytest.raises(RolloutError, match="checksum mismatch for 'model.onnx'"):
        register(src, tmp_path / "registry")
    with pytest.raises(RolloutError, match="not a directory"):
        register(tmp_path / "missing", tmp_path / "registry")
    assert not (tmp_path / "registry").exists()


def test_cli_publish_refuses_a_bad_dir_with_exit_code_2(tmp_path, monkeypatch, capsys):
    from commands.cli import main

    monkeypatch.setenv("NEWSREC_STATE_DIR", str(tmp_path / "state"))
    src = fake_model_dir(tmp_path / "export", "v1")
    (src / "config.json").write_text("{}")  # size changes: caught before hashing
    assert main(["models", "publish", "--model-dir", str(src)]) == 2
    err = capsys.readouterr().err
    assert f"newsrec: cannot publish {src}" in err and "config.json" in err and "size" in err


# --- prepare, swap, start-up choice ----------------------------------------------------------


def test_prepare_model_verifies_loads_and_warms(tmp_path):
    src = fake_model_dir(tmp_path / "v1", "v1")
    model = prepare_model(update_for(src, "v1", manifest_sha256=sha256_file(src / MANIFEST_FILE)), manifest_loader)
    assert model.version == "v1" and model.calls == [[WARMUP_PROMPT]]


@pytest.mark.parametrize("case, reason", [
    ("missing dir", "does not exist"),
    ("no manifest", "manifest.json is missing"),
    ("corrupted file", "checksum mismatch for 'model.onnx'"),
    ("other manifest", "is not the announced one"),
    ("other version", "holds version 'v1', not the announced 'v9'"),
    ("load error", "loading .* failed: OSError: no GPU today"),
    ("loader lies", "loaded model reports version 'v0'"),
    ("warm-up error", "warm-up generate failed: RuntimeError: session exploded"),
])
def test_prepare_model_refuses_with_the_failed_step(tmp_path, case, reason):
    src = fake_model_dir(tmp_path / "v1", "v1")
    version, loader, sha = "v1", manifest_loader, None

    def failing_loader(model_dir: Path) -> FakeModel:
        raise OSError("no GPU today")

    if case == "missing dir":
        src = tmp_path / "nope"
    elif case == "no manifest":
        (src / MANIFEST_FILE).unlink()
    elif case == "corrupted file":
        flip_bytes(src / "model.onnx")
    elif case == "other manifest":
        sha = SHA
    elif case == "other version":
        version = "v9"
    elif case == "load error":
        loader = failing_loader
    elif case == "loader lies":
        loader = lambda _d: FakeModel("v0")  # noqa: E731
    elif case == "warm-up error":
        loader = lambda _d: FakeModel("v1", fail=True)  # noqa: E731
    with pytest.raises(RolloutError, match=reason):
        prepare_model(update_for(src, version, manifest_sha256=sha), loader)


async def test_roll_out_swaps_or_keeps_serving_and_reports(tmp_path):
    active, metrics = ActiveModel(FakeModel("v0")), Metrics()
    assert active.status() == {"model_version": "v0", "rollout": None}
    good = fake_model_dir(tmp_path / "v1", "v1")
    assert await roll_out(update_for(good, "v1"), active, manifest_loader, metrics)
    assert active.version == "v1" and active.status()["rollout"]["status"] == "ok"

    bad = fake_model_dir(tmp_path / "v2", "v2")
    flip_bytes(bad / "model.onnx")
    serving = active.current
    assert not await roll_out(update_for(bad, "v2"), active, manifest_loader, metrics)
    assert active.current is serving
    status = active.status()
    assert status["model_version"] == "v1"
    assert status["rollout"]["version"] == "v2" and status["rollout"]["status"] == "refused"
    assert "checksum mismatch" in status["rollout"]["reason"]
    assert metrics.counters == {"rollouts_ok": 1, "rollouts_refused": 1}


def test_startup_candidates_newest_first_down_to_the_local_version():
    history = [update_for(Path(f"/r/{v}"), v) for v in ["v1", "v2", "v3", "v2", "v4"]]
    assert [u.version for u in startup_candidates(history, "v0")] == ["v4", "v2", "v3", "v1"]
    assert [u.version for u in startup_candidates(history, "v3")] == ["v4", "v2"]
    assert startup_candidates(history, "v4") == []
    assert startup_candidates([], "v0") == []


async def test_swap_lands_between_batches_and_each_batch_reports_its_own_model():
    old, new = FakeModel("old", delay=0.3), FakeModel("new")
    worker = make_worker(old)
    task = asyncio.create_task(run_refresher(worker))
    try:
        add_event(worker, "u1", "e1")
        await wait_for(lambda: old.calls)  # the batch is inside the old model now
        worker.active_model.current = new  # what a rollout does
        sent = worker.recommendations.sent
        await wait_for(lambda: sent)
        assert sent[0]["model_version"] == "old" and not new.calls
        add_event(worker, "u2", "e2")
        await wait_for(lambda: len(sent) == 2)
        assert sent[1]["model_version"] == "new" and len(old.calls) == 1 and len(new.calls) == 1
    finally:
        task.cancel()


# --- the follower, with a stand-in consumer --------------------------------------------------


class FakeMessage:
    def __init__(self, offset: int, value: bytes | None, *, eof: bool = False) -> None:
        self._offset, self._value, self._eof = offset, value, eof

    def error(self) -> Any:
        return SimpleNamespace(code=lambda: KafkaError._PARTITION_EOF) if self._eof else None

    def value(self) -> bytes | None:
        return self._value

    def key(self) -> bytes:
        return b"model"

    def topic(self) -> str:
        return "mu"

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return self._offset


class FakeConsumer:
    """One partition holding ``history`` at start; ``live`` records arrive after the first EOF."""

    def __init__(self, history: list[bytes], live: list[bytes]) -> None:
        self.history, self.live, self.closed = history, live, False
        end = len(history)
        self.batches = [[FakeMessage(i, v) for i, v in enumerate(history)] + [FakeMessage(end, None, eof=True)],
                        [FakeMessage(end + i, v) for i, v in enumerate(live)]]

    def list_topics(self, topic: str, timeout: float) -> Any:
        return SimpleNamespace(topics={topic: SimpleNamespace(partitions={0: None}, error=None)})

    def get_watermark_offsets(self, tp: Any, timeout: float) -> tuple[int, int]:
        return 0, len(self.history)

    def assign(self, partitions: list[Any]) -> None:
        assert [tp.partition for tp in partitions] == [0]

    def consume(self, n: int, timeout: float) -> list[FakeMessage]:
        if self.batches:
            return self.batches.pop(0)
        time.sleep(min(timeout, 0.05))
        return []

    def close(self) -> None:
        self.closed = True


async def test_follower_applies_newest_working_version_at_start_then_live_ones(tmp_path):
    registry = tmp_path / "registry"
    v1 = fake_model_dir(registry / "v1", "v1")
    v2 = fake_model_dir(registry / "v2", "v2")
    flip_bytes(v2 / "model.onnx")  # the newest announced one is broken: fall back to v1
    v3 = fake_model_dir(registry / "v3", "v3")
    history = [update_for(v1, "v1").to_json_bytes(), b"not json (old)", update_for(v2, "v2").to_json_bytes()]
    live = [b'{"version": "v9"}', update_for(v3, "v3").to_json_bytes()]
    consumer, letters = FakeConsumer(history, live), []

    async def sink(key: bytes | None, letter: DeadLetter) -> None:
        letters.append((key, letter))

    active, metrics = ActiveModel(FakeModel("v0")), Metrics()
    task = asyncio.create_task(follow_model_updates(consumer, "mu", active, manifest_loader, metrics, sink,
                                                    poll_s=0.05))
    try:
        await wait_for(lambda: active.version == "v3")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    # v2 refused, v1 applied at start; then v3 live. Only the live bad record is dead-lettered.
    assert metrics.counters["rollouts_refused"] == 1 and metrics.counters["rollouts_ok"] == 2
    assert metrics.counters["model_updates_invalid"] == 2
    assert len(letters) == 1
    key, letter = letters[0]
    assert key == b"model" and letter.topic == "mu" and letter.offset == 3 and letter.raw == '{"version": "v9"}'
    assert "model_dir: Field required" in letter.error
    await asyncio.sleep(0.1)  # the close is queued behind the consumer thread's last call
    assert consumer.closed


# --- one worker on the real broker -------------------------------------------------------------


@pytest.fixture
def rollout_stack(kafka_bootstrap: str, tiny_model_dir: Path, unique_name: str, tmp_path: Path) -> Iterator[dict]:
    env = {
        "NEWSREC_KAFKA_BOOTSTRAP": kafka_bootstrap, "NEWSREC_BROKER_PROFILE": "local",
        "NEWSREC_MODEL_DIR": str(tiny_model_dir), "NEWSREC_STATE_DIR": str(tmp_path / "state"),
        "NEWSREC_MODEL_REGISTRY": str(tmp_path / "registry"),
        "NEWSREC_APP_ID": f"{unique_name}-worker", "NEWSREC_SEARCH_ENGINE": "embedded",
        "NEWSREC_TOPIC_EVENTS": f"{unique_name}-user-events", "NEWSREC_TOPIC_NEWS": f"{unique_name}-news-articles",
        "NEWSREC_TOPIC_RECOMMENDATIONS": f"{unique_name}-recommendations",
        "NEWSREC_TOPIC_DLQ": f"{unique_name}-user-events-dlq", "NEWSREC_TOPIC_MODEL_UPDATES": f"{unique_name}-mu",
        "NEWSREC_REFRESH_MIN_INTERVAL_S": "0.2", "NEWSREC_MAX_NEW_TOKENS": "8",
    }
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "partitioner": "murmur2_random"})
    for a in CORPUS[:40]:
        producer.produce(env["NEWSREC_TOPIC_NEWS"], key=a.news_id, value=a.model_dump_json())
    assert producer.flush(30) == 0
    workers: list[WorkerProcess] = []

    def start_worker() -> WorkerProcess:
        w = WorkerProcess(env, tmp_path / f"worker{len(workers)}.log").start()
        workers.append(w)
        w.wait_ready(documents=40, timeout=120)
        return w

    yield {"env": env, "producer": producer, "start_worker": start_worker}
    for w in workers:
        w.stop()


def recommend_once(stack: dict, bootstrap: str, user: str) -> dict:
    """Send one event for a new user; its recommendation."""
    env, producer = stack["env"], stack["producer"]
    ev = event(user, 0, "electric car battery range")
    producer.produce(env["NEWSREC_TOPIC_EVENTS"], key=user, value=json.dumps(ev))
    assert producer.flush(30) == 0
    recs = consume(bootstrap, env["NEWSREC_TOPIC_RECOMMENDATIONS"],
                   lambda got: any(v["trigger_event_id"] == ev["event_id"] for _, v in got), timeout=60)
    return next(v for _, v in recs if v["trigger_event_id"] == ev["event_id"])


def wait_rollout(worker: WorkerProcess, version: str, timeout: float = 90.0) -> dict:
    deadline = time.monotonic() + timeout
    stats: dict = {}
    while time.monotonic() < deadline:
        stats = worker.stats()
        if (stats.get("rollout") or {}).get("version") == version:
            return stats
        time.sleep(0.3)
    raise AssertionError(f"no rollout outcome for {version} (last {stats.get('rollout')}):\n{worker.log_tail()}")


@pytest.mark.integration
def test_worker_rolls_out_a_published_version_and_refuses_a_corrupted_one(
        rollout_stack, kafka_bootstrap, tiny_model_dir, tmp_path, monkeypatch, capsys):
    from commands.cli import main
    from models.tiny import build_tiny_model

    env = rollout_stack["env"]
    model_b = build_tiny_model(tmp_path / "tiny-1", seed=1)
    worker = rollout_stack["start_worker"]()
    assert get_json(f"{worker.url}/health")["model_version"] == "tiny-0"
    assert recommend_once(rollout_stack, kafka_bootstrap, "ro-a")["model_version"] == "tiny-0"

    # Version B through the CLI: copied into the registry and announced.
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert main(["models", "publish", "--model-dir", str(model_b)]) == 0
    registered = (tmp_path / "registry" / "tiny-1").resolve()
    assert f"announced model tiny-1 ({registered})" in capsys.readouterr().out
    stats = wait_rollout(worker, "tiny-1")
    assert stats["rollout"]["status"] == "ok" and stats["model_version"] == "tiny-1"
    health = get_json(f"{worker.url}/health")
    assert health["model_version"] == "tiny-1" and health["rollout"]["status"] == "ok"
    assert recommend_once(rollout_stack, kafka_bootstrap, "ro-b")["model_version"] == "tiny-1"

    # A corrupted copy (new version, manifest of the good bytes): publish refuses it ...
    bad = tmp_path / "tiny-2"
    shutil.copytree(tiny_model_dir, bad)
    write_manifest(bad, name="tiny-random-llama", version="tiny-2")
    flip_bytes(bad / "model.onnx")
    with pytest.raises(RolloutError, match="checksum mismatch for 'model.onnx'"):
        publish(WorkerSettings(), bad)
    assert not (tmp_path / "registry" / "tiny-2").exists()
    # ... so announce it by hand, after a record that breaks the contract.
    producer = rollout_stack["producer"]
    producer.produce(env["NEWSREC_TOPIC_MODEL_UPDATES"], key=b"model", value=b'{"version": "tiny-3"}')
    producer.produce(env["NEWSREC_TOPIC_MODEL_UPDATES"], key=b"model",
                     value=update_for(bad, "tiny-2", manifest_sha256=sha256_file(bad / MANIFEST_FILE)).to_json_bytes())
    assert producer.flush(30) == 0
    stats = wait_rollout(worker, "tiny-2")
    assert stats["rollout"]["status"] == "refused"
    assert "checksum mismatch for 'model.onnx'" in stats["rollout"]["reason"]
    assert stats["model_version"] == "tiny-1"
    assert "model rollout to tiny-2 refused, still serving tiny-1" in worker.log_path.read_text()
    assert recommend_once(rollout_stack, kafka_bootstrap, "ro-c")["model_version"] == "tiny-1"

    letters = consume(kafka_bootstrap, env["NEWSREC_TOPIC_DLQ"], lambda got: got, timeout=30)
    assert len(letters) == 1
    key, letter = letters[0]
    assert key == b"model" and letter["topic"] == env["NEWSREC_TOPIC_MODEL_UPDATES"]
    assert "model_dir: Field required" in letter["error"] and letter["raw"] == '{"version": "tiny-3"}'

    # A restarted worker starts on its local model (A), skips the broken newest announcement
    # and ends on B like the running fleet, without dead-lettering the old bad record again.
    worker.stop()
    restarted = rollout_stack["start_worker"]()
    stats = wait_rollout(restarted, "tiny-1")
    assert stats["model_version"] == "tiny-1" and stats["counters"]["rollouts_refused"] == 1
    assert recommend_once(rollout_stack, kafka_bootstrap, "ro-d")["model_version"] == "tiny-1"
    assert len(consume(kafka_bootstrap, env["NEWSREC_TOPIC_DLQ"], lambda got: len(got) > 1, timeout=5)) == 1
