"""Real TLS: the worker, the producers and the indexer talk to the local broker and search
server through a TLS terminator (Debian's stunnel4), with certificate verification on.

Tansu and noida-db speak plain TCP here, so each gets a stunnel in front, with a CA and
server certificates made by the test (openssl CLI). Kafka clients connect again, after
bootstrap, to the address the broker advertises in its metadata: this Tansu listens on a
plain loopback port and advertises the stunnel port, so every broker connection goes
through TLS. A wrong CA, an expired certificate and a plaintext client are each refused
with an error that says so, and no secret (API key, private key) reaches any log.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from confluent_kafka import Consumer

from streams.settings import CommonSettings
from tests.streaming import (
    CORPUS,
    READY_S,
    WAIT_S,
    event,
    poll_json,
    stack_env,
    wait_until,
)
from tools.demo import demo_corpus
from tools.infra import LocalInfra, _free_port
from tools.stack import WorkerProcess

pytestmark = pytest.mark.integration

API_KEY = "tls-apikey-Zr81qW"  # sent to the search server over TLS; must never show up in a log
CLI_TIMEOUT_S = 120.0
SERVER_EXT = """[ca]
default_ca = ca_default
[ca_default]
database = index.txt
new_certs_dir = .
serial = serial
default_md = sha256
policy = policy_any
unique_subject = no
[policy_any]
commonName = supplied
[server_ext]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
subjectAltName = IP:127.0.0.1,DNS:localhost
"""
EC_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]


@dataclass(frozen=True)
class Certs:
    ca: Path  # signs both server certificates
    wrong_ca: Path  # a CA that signed nothing here
    cert: Path
    key: Path
    expired: Path  # same key and names as ``cert``, valid for one day in 2020


def openssl(cwd: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_ca(d: Path, name: str) -> Path:
    openssl(d, "req", "-x509", *EC_KEY, "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2",
            "-subj", f"/CN=newsrec {name}", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    return d / f"{name}.pem"


def sign(d: Path, out: str, *dates: str) -> Path:
    """The server CSR signed by ca.pem (``openssl ca``: the only CLI that backdates in OpenSSL 3.0)."""
    openssl(d, "ca", "-batch", "-notext", "-config", "ca.cnf", "-cert", "ca.pem", "-keyfile", "ca.key",
            "-in", "server.csr", "-out", out, "-extensions", "server_ext", *dates)
    return d / out


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    d = tmp_path_factory.mktemp("pki")
    (d / "ca.cnf").write_text(SERVER_EXT)
    (d / "index.txt").write_text("")
    (d / "serial").write_text("01\n")
    ca, wrong_ca = make_ca(d, "ca"), make_ca(d, "wrong-ca")
    openssl(d, "req", *EC_KEY, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    return Certs(ca, wrong_ca, sign(d, "server.pem", "-days", "2"), d / "server.key",
                 sign(d, "expired.pem", "-startdate", "20200101000000Z", "-enddate", "20200102000000Z"))


@dataclass(frozen=True)
class TlsStand:
    kafka: str  # host:port of the TLS front the broker advertises
    kafka_expired: str  # a front with the expired certificate, same broker
    es_url: str  # https://
    es_expired_url: str
    infra: LocalInfra
    certs: Certs

    def logs(self) -> str:
        """Every server log of the stand (broker, search server, TLS fronts)."""
        return "".join(p.read_text(errors="replace") for p in self.infra.state_dir.glob("*.log"))


@pytest.fixture(scope="module")
def stand(certs: Certs, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsStand]:
    """Tansu and noida-db on plain loopback ports, each behind stunnel (one front with the
    valid certificate, one with the expired one). A server that cannot start fails here."""
    with LocalInfra(tmp_path_factory.mktemp("tls-infra")) as infra:
        plain, tls = _free_port(), _free_port()
        kafka = infra.start_tls_front("kafka", f"127.0.0.1:{plain}", certs.cert, certs.key, tls)
        infra.start_broker(plain, advertised_port=tls)
        kafka_expired = infra.start_tls_front("kafka-expired", f"127.0.0.1:{plain}", certs.expired, certs.key)
        search = infra.start_search(0).removeprefix("http://")
        es = infra.start_tls_front("search", search, certs.cert, certs.key)
        es_expired = infra.start_tls_front("search-expired", search, certs.expired, certs.key)
        yield TlsStand(kafka, kafka_expired, f"https://{es}", f"https://{es_expired}", infra, certs)


def tls_env(stand: TlsStand, name: str, **overrides: str) -> dict[str, str]:
    """Settings of a client that verifies both servers' certificates against the test CA."""
    return {
        "NEWSREC_KAFKA_BOOTSTRAP": stand.kafka, "NEWSREC_KAFKA_SECURITY_PROTOCOL": "SSL",
        "NEWSREC_KAFKA_SSL_CA_LOCATION": str(stand.certs.ca), "NEWSREC_TOPIC_NEWS": f"{name}-news-articles",
        "NEWSREC_TOPIC_EVENTS": f"{name}-user-events", "NEWSREC_TOPIC_DLQ": f"{name}-user-events-dlq",
        "NEWSREC_TOPIC_RECOMMENDATIONS": f"{name}-recommendations", "NEWSREC_TOPIC_MODEL_UPDATES": f"{name}-mu",
        "NEWSREC_ES_URL": stand.es_url, "NEWSREC_ES_CA_CERTS": str(stand.certs.ca),
        "NEWSREC_ES_ALIAS": f"{name}-news", "NEWSREC_ES_API_KEY": API_KEY, "NEWSREC_ES_REQUEST_TIMEOUT_S": "5",
    } | overrides


def newsrec(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``newsrec ARGS`` in a child process configured by ``env`` only (stdout and stderr merged)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("NEWSREC_")}
    return subprocess.run([sys.executable, "-m", "commands.cli", *args], env=clean | env, cwd=cwd, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=CLI_TIMEOUT_S, check=False)


def without(env: dict[str, str], *names: str) -> dict[str, str]:
    return {k: v for k, v in env.items() if k not in names}


def read_tls(env: dict[str, str], topic: str, until: int, timeout: float = WAIT_S) -> list[dict]:
    """JSON values of ``topic`` from the start, through TLS, until ``until`` arrived or the timeout."""
    settings = CommonSettings(**{k.removeprefix("NEWSREC_").lower(): v for k, v in env.items()})
    consumer = Consumer(settings.consumer_config(f"tls-read-{uuid.uuid4().hex[:6]}"))
    consumer.subscribe([topic])
    got: list[dict] = []
    deadline = time.monotonic() + timeout
    try:
        while len(got) < until and time.monotonic() < deadline:
            got += [json.loads(m.value()) for m in consumer.consume(100, timeout=0.5) if m.error() is None]
    finally:
        consumer.close()
    return got


def assert_no_secret(stand: TlsStand, *texts: str) -> None:
    key_body = "".join(stand.certs.key.read_text().splitlines()[1:-1])
    for text in (*texts, stand.logs()):
        assert API_KEY not in text
        assert key_body[:40] not in text.replace("\n", "")


def test_worker_producers_and_indexer_verify_the_servers_certificates(
        stand: TlsStand, tiny_model_dir: Path, unique_name: str, tmp_path: Path) -> None:
    env = stack_env(stand.kafka, tiny_model_dir, unique_name, tmp_path / "state") | tls_env(stand, unique_name) | {
        "NEWSREC_SEARCH_ENGINE": "elasticsearch"}
    # Producers (topics created, news sent) and the indexer: every connection through TLS.
    produced = newsrec(env, tmp_path, "produce", "news", str(demo_corpus()))
    assert produced.returncode == 0 and f"sent {len(CORPUS)} news records" in produced.stdout, produced.stdout
    indexed = newsrec(env, tmp_path, "index", "--exit-when-idle", "2")
    assert indexed.returncode == 0 and f"stopped after {len(CORPUS)} articles" in indexed.stdout, indexed.stdout
    assert f"{stand.es_url}/_bulk [status:200" in indexed.stdout  # https, verified

    # The worker: faust (aiokafka) and confluent-kafka clients over TLS, search over https.
    worker = WorkerProcess(env, tmp_path / "worker.log").start()
    try:
        health = worker.wait_ready(documents=len(CORPUS), timeout=READY_S)
        assert health["engine"] == "elasticsearch"
        users = [f"tls-{n}" for n in range(3)]
        events = [event(user, i, "electric car battery range") for i in range(2) for user in users]
        (tmp_path / "events.jsonl").write_text("".join(json.dumps(ev) + "\n" for ev in events))
        sent = newsrec(env, tmp_path, "produce", "events", str(tmp_path / "events.jsonl"))
        assert sent.returncode == 0, sent.stdout
        last = {user: f"{user}-e1" for user in users}
        wait_until(lambda: all((r := poll_json(f"{worker.url}/recommendations/{u}")) and r["trigger_event_id"] == e
                               and r["items"] for u, e in last.items()), WAIT_S, "recommendations over TLS")
        published = read_tls(env, env["NEWSREC_TOPIC_RECOMMENDATIONS"], until=len(users))
        assert set(last.values()) <= {r["trigger_event_id"] for r in published}
    finally:
        worker.stop()
    assert_no_secret(stand, produced.stdout, indexed.stdout, sent.stdout, worker.log_path.read_text(errors="replace"))


# (client, what is wrong) -> the settings that make it so; each refusal names its cause.
REFUSED = {
    ("kafka", "wrong CA"): lambda s: {"NEWSREC_KAFKA_SSL_CA_LOCATION": str(s.certs.wrong_ca)},
    ("kafka", "expired certificate"): lambda s: {"NEWSREC_KAFKA_BOOTSTRAP": s.kafka_expired},
    ("search", "wrong CA"): lambda s: {"NEWSREC_ES_CA_CERTS": str(s.certs.wrong_ca)},
    ("search", "expired certificate"): lambda s: {"NEWSREC_ES_URL": s.es_expired_url},
}
# What the client says, and what the TLS front logs for the refused handshake.
CLIENT_ERROR = {
    ("kafka", "wrong CA"): "SSL handshake failed: error:0A000086:SSL routines::certificate verify failed",
    ("kafka", "expired certificate"): "SSL handshake failed: error:0A000086:SSL routines::certificate verify failed",
    ("search", "wrong CA"): "CERTIFICATE_VERIFY_FAILED] certificate verify failed: unable to get local issuer",
    ("search", "expired certificate"): "CERTIFICATE_VERIFY_FAILED] certificate verify failed: certificate has expired",
}
# librdkafka sends the TLS alert naming the cause; aiohttp closes without one (stunnel: "unexpected eof").
FRONT_ERROR = {
    ("kafka", "wrong CA"): "SSL routines::tlsv1 alert unknown ca",
    ("kafka", "expired certificate"): "SSL routines::sslv3 alert certificate expired",
    ("search", "wrong CA"): "SSL_accept: ",
    ("search", "expired certificate"): "SSL_accept: ",
}


def run_client(client: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """The producer (Kafka only) or the indexer (Kafka, then search)."""
    if client == "kafka":
        return newsrec(env, cwd, "produce", "news", str(demo_corpus()))
    return newsrec(env, cwd, "index", "--exit-when-idle", "2")


@pytest.mark.parametrize(("client", "wrong"), list(REFUSED), ids=[f"{c}-{w}" for c, w in REFUSED])
def test_a_server_that_fails_verification_is_refused(stand: TlsStand, client: str, wrong: str, unique_name: str,
                                                     tmp_path: Path) -> None:
    before = stand.logs().count(FRONT_ERROR[client, wrong])
    result = run_client(client, tls_env(stand, unique_name) | REFUSED[client, wrong](stand), tmp_path)
    assert result.returncode == 5, result.stdout[-3000:]  # a service the client cannot use: one message, no traceback
    assert CLIENT_ERROR[client, wrong] in result.stdout, result.stdout[-3000:]
    assert "Traceback" not in result.stdout
    assert ("refused this client" if client == "kafka" else "TLS with the search server") in result.stdout
    assert "sent " not in result.stdout and "stopped after" not in result.stdout  # nothing got through
    wait_until(lambda: stand.logs().count(FRONT_ERROR[client, wrong]) > before, WAIT_S, f"stunnel to log {wrong!r}")
    assert_no_secret(stand, result.stdout)


def test_a_plaintext_client_is_refused(stand: TlsStand, unique_name: str, tmp_path: Path) -> None:
    env = tls_env(stand, unique_name)
    before = stand.logs().count("wrong version number")
    kafka = run_client("kafka", without(env, "NEWSREC_KAFKA_SECURITY_PROTOCOL", "NEWSREC_KAFKA_SSL_CA_LOCATION"),
                       tmp_path)
    assert kafka.returncode != 0 and "no broker at" in kafka.stdout and "sent " not in kafka.stdout, kafka.stdout
    search = run_client("search", without(env, "NEWSREC_ES_CA_CERTS") | {
        "NEWSREC_ES_URL": stand.es_url.replace("https://", "http://")}, tmp_path)
    assert search.returncode != 0 and "Connection reset by peer" in search.stdout, search.stdout[-3000:]
    assert "stopped after" not in search.stdout
    # The front refuses the plaintext bytes of both: not a TLS ClientHello.
    wait_until(lambda: stand.logs().count("wrong version number") >= before + 2, WAIT_S, "stunnel to refuse both")
    assert_no_secret(stand, kafka.stdout, search.stdout)
