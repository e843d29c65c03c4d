"""Run worker processes of a local stack (demo, benchmarks, integration tests)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get_json(url: str, timeout: float = 2.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


class WorkerProcess:
    """``newsrec worker`` in a child process, configured only through NEWSREC_* variables."""

    def __init__(self, env: dict[str, str], log_path: Path, *, web_port: int | None = None) -> None:
        self.web_port = web_port or free_port()
        self.env = {**os.environ, **env, "NEWSREC_WEB_PORT": str(self.web_port)}
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.web_port}"

    def start(self) -> WorkerProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "commands.cli", "worker"], env=self.env,
                                     stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def wait_ready(self, *, documents: int = 1, timeout: float = 120.0) -> dict[str, Any]:
        """Until /health answers with at least ``documents`` indexed; raises with the log tail."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                last = get_json(f"{self.url}/health")
                if last.get("status") == "ok" and last.get("documents", 0) >= documents:
                    return last
            except urllib.error.HTTPError as exc:  # 503 while starting: keep its body for the error
                last = exc.read()[:200]
            except (OSError, ValueError):
                pass
            time.sleep(0.3)
        raise TimeoutError(f"worker not ready after {timeout}s (last health {last}):\n{self.log_tail()}")

    def stats(self) -> dict[str, Any]:
        return get_json(f"{self.url}/stats")

    def kill(self) -> None:
        """SIGKILL: the crash case."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> WorkerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
