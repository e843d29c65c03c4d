"""librdkafka clients that behave: their log lines go through ``logging`` (rate-limited),
and an unreachable broker is found in seconds and reported once, with the fix."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable
from typing import Any

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

LOGGER_NAME = "newsrec.kafka"
BURST = 5  # librdkafka lines let through per period
PERIOD_S = 60.0
PROBE_TIMEOUT_S = 3.0


class BrokerUnavailable(ConnectionError):
    """No Kafka broker answers at the configured bootstrap servers."""

    def __init__(self, bootstrap: str, detail: str = "") -> None:
        super().__init__(f"no broker at {bootstrap}{f' ({detail})' if detail else ''}: start one with "
                         "`newsrec infra up` or set NEWSREC_KAFKA_BOOTSTRAP")
        self.bootstrap = bootstrap


class BrokerRefused(ConnectionError):
    """A broker answers the TCP connect but the client cannot talk to it (TLS, SASL)."""

    def __init__(self, bootstrap: str, detail: str) -> None:
        super().__init__(f"the broker at {bootstrap} refused this client ({detail}): check "
                         "NEWSREC_KAFKA_SECURITY_PROTOCOL, NEWSREC_KAFKA_SSL_CA_LOCATION and the SASL settings; "
                         "the librdkafka lines above say why (certificate, handshake, authentication)")


class RateLimitFilter(logging.Filter):
    """Lets ``burst`` records through per ``period_s``; the first one after a quiet spell
    says how many were suppressed."""

    def __init__(self, burst: int = BURST, period_s: float = PERIOD_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.burst, self.period_s, self.clock = burst, period_s, clock
        self._window_start = float("-inf")
        self._passed = 0
        self.suppressed = 0

    def filter(self, record: logging.LogRecord) -> bool:
        now = self.clock()
        if now - self._window_start >= self.period_s:
            self._window_start, self._passed = now, 0
        if self._passed >= self.burst:
            self.suppressed += 1
            return False
        self._passed += 1
        if self.suppressed:
            record.msg = f"{record.getMessage()} ({self.suppressed} similar librdkafka lines suppressed)"
            record.args = ()
            self.suppressed = 0
        return True


def kafka_logger() -> logging.Logger:
    """The logger handed to every confluent-kafka client (config key ``logger``)."""
    logger = logging.getLogger(LOGGER_NAME)
    if not any(isinstance(f, RateLimitFilter) for f in logger.filters):
        logger.addFilter(RateLimitFilter())
    return logger


def with_logger(config: dict[str, Any]) -> dict[str, Any]:
    """A client config whose librdkafka log goes through :func:`kafka_logger`."""
    return config | {"logger": kafka_logger()}


def require_broker(config: dict[str, Any], timeout: float = PROBE_TIMEOUT_S) -> None:
    """Raise :class:`BrokerUnavailable` unless a broker answers within ``timeout`` seconds.

    A plain TCP connect first, so a refused port costs no librdkafka log line at all."""
    bootstrap = str(config["bootstrap.servers"])
    reachable = False
    for server in bootstrap.split(","):
        host, port = server.rsplit(":", 1)
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
            reachable = True
            break
        except OSError:
            continue
    if not reachable:
        raise BrokerUnavailable(bootstrap)
    if str(config.get("security.protocol", "PLAINTEXT")).upper() != "PLAINTEXT":
        # The broker answers; a TLS or SASL failure from here on is not "no broker": the
        # client's own errors (handshake, authentication) say precisely what is wrong.
        return
    try:
        AdminClient(with_logger(config)).list_topics(timeout=timeout)
    except KafkaException as exc:
        raise BrokerUnavailable(bootstrap, exc.args[0].str() if exc.args else str(exc)) from None
