"""Settings per role, read from ``NEWSREC_*`` environment variables (or a ``.env`` file).

Frozen, validated at start-up: a bad value stops the process with a message that names
the variable and how to fix it (see :func:`load`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

if TYPE_CHECKING:
    from index.dense import MiniLMEmbedder
    from index.elastic import ElasticEngine

_HOST_PORT = re.compile(r"^[\w.\-\[\]:]+:\d{1,5}$")
# user:password@ inside a URL (any scheme); see redact().
_URL_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)[^/@\s]+@")
REDACTED = "***"
# The recall channels of the recommendation path (streams/recommend.py).
CHANNELS = ("signals", "model", "dense", "trending")


def redact(text: str, secrets: Iterable[str | None] = ()) -> str:
    """``text`` with every secret value and any URL credentials (user:pass@) masked.

    For strings that may quote a secret by accident: exception messages from clients,
    error summaries shown on /stats, config error messages."""
    for secret in sorted({s for s in secrets if s}, key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    return _URL_USERINFO.sub(rf"\g<scheme>{REDACTED}@", text)


def _existing_file(value: Path | None, var: str, what: str) -> Path | None:
    if value is None:
        return None
    if not value.is_file():
        raise ValueError(f"{what} {str(value)!r} does not exist or is not a file: "
                         f"point {var} at a readable PEM file (or unset it to use the system CAs)")
    return value


class ConfigError(ValueError):
    """A setting is invalid; the message says which variable and how to fix it."""


class CommonSettings(BaseSettings):
    """What every role needs: where the broker, the topics and the search index are."""

    # hide_input_in_errors: a ValidationError's text would otherwise quote every input,
    # secrets included (pydantic reports model-level errors with the whole input dict).
    model_config = SettingsConfigDict(env_prefix="NEWSREC_", frozen=True, extra="ignore", env_file=".env",
                                      hide_input_in_errors=True)

    kafka_bootstrap: str = "127.0.0.1:19092"
    # "local" works around the Tansu broker's end-offset bug (one-record batches);
    # "kafka" is for Apache Kafka and is the production profile.
    broker_profile: Literal["local", "kafka"] = "local"
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_ca_location: Path | None = None

    topic_events: str = "user-events"
    topic_news: str = "news-articles"
    topic_recommendations: str = "recommendations"
    topic_dlq: str = "user-events-dlq"
    topic_model_updates: str = "model-updates"
    topic_partitions: int = Field(default=4, ge=1, le=1024)

    search_engine: Literal["auto", "embedded", "elasticsearch"] = "auto"
    es_url: str | None = None
    es_alias: str = "news"
    es_api_key: SecretStr | None = None
    es_ca_certs: Path | None = None
    # False only for a test cluster with a self-signed certificate (logged as a warning).
    es_verify_certs: bool = True
    # Per request: a search server that stops answering fails the batch (retried with
    # backoff) instead of hanging the refresher.
    es_request_timeout_s: float = Field(default=10.0, gt=0, le=300)
    es_max_retries: int = Field(default=2, ge=0, le=10)

    state_dir: Path = Path(".newsrec")

    @field_validator("kafka_bootstrap")
    @classmethod
    def _bootstrap(cls, value: str) -> str:
        hosts = [h.strip() for h in value.split(",") if h.strip()]
        if not hosts or not all(_HOST_PORT.match(h) for h in hosts):
            raise ValueError("expected comma-separated host:port pairs, e.g. 127.0.0.1:9092")
        return ",".join(hosts)

    @field_validator("es_url")
    @classmethod
    def _es_url(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        if not re.match(r"^https?://[^/\s]+", value):
            raise ValueError("expected an http(s) URL such as http://127.0.0.1:9200")
        if "@" in urlsplit(value).netloc:
            # A password in the URL ends up in logs and error messages; the key is a SecretStr.
            raise ValueError("the URL must not carry credentials (user:password@): "
                             "put an API key in NEWSREC_ES_API_KEY instead")
        return value.rstrip("/")

    @field_validator("kafka_ssl_ca_location", "es_ca_certs", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        return None if value == "" else value

    @field_validator("kafka_ssl_ca_location")
    @classmethod
    def _kafka_ca(cls, value: Path | None) -> Path | None:
        return _existing_file(value, "NEWSREC_KAFKA_SSL_CA_LOCATION", "Kafka CA file")

    @field_validator("es_ca_certs")
    @classmethod
    def _es_ca(cls, value: Path | None) -> Path | None:
        return _existing_file(value, "NEWSREC_ES_CA_CERTS", "Elasticsearch CA file")

    @model_validator(mode="after")
    def _consistent(self) -> CommonSettings:
        if self.search_engine == "elasticsearch" and not self.es_url:
            raise ValueError("search_engine=elasticsearch needs NEWSREC_ES_URL")
        if self.kafka_security_protocol.startswith("SASL") and not (
            self.kafka_sasl_mechanism and self.kafka_sasl_username and self.kafka_sasl_password
        ):
            raise ValueError(
                "SASL needs NEWSREC_KAFKA_SASL_MECHANISM, NEWSREC_KAFKA_SASL_USERNAME and NEWSREC_KAFKA_SASL_PASSWORD"
            )
        # Credentials or a CA the chosen protocol would silently ignore are a misconfiguration:
        # the operator believes the connection is authenticated or encrypted when it is not.
        sasl_set = self.kafka_sasl_mechanism or self.kafka_sasl_username or self.kafka_sasl_password
        if sasl_set and not self.kafka_security_protocol.startswith("SASL"):
            raise ValueError(f"NEWSREC_KAFKA_SASL_* are set but NEWSREC_KAFKA_SECURITY_PROTOCOL="
                             f"{self.kafka_security_protocol} does not use them: set it to SASL_SSL")
        if self.kafka_ssl_ca_location and not self.kafka_security_protocol.endswith("SSL"):
            raise ValueError(f"NEWSREC_KAFKA_SSL_CA_LOCATION is set but NEWSREC_KAFKA_SECURITY_PROTOCOL="
                             f"{self.kafka_security_protocol} does not use TLS: set it to SSL or SASL_SSL")
        if self.es_ca_certs and not (self.es_url or "").startswith("https://"):
            raise ValueError("NEWSREC_ES_CA_CERTS is set but NEWSREC_ES_URL is not https://: "
                             "use the cluster's https URL (or unset the CA)")
        return self

    def security_warnings(self) -> list[str]:
        """Legal but risky combinations, logged at start-up (never containing secret values)."""
        warnings = []
        if self.es_api_key and self.es_url and self.es_url.startswith("http://"):
            warnings.append("NEWSREC_ES_API_KEY is sent over plain http (NEWSREC_ES_URL): use https")
        if not self.es_verify_certs:
            warnings.append("NEWSREC_ES_VERIFY_CERTS=false: the search server's certificate is not checked")
        if self.kafka_security_protocol == "SASL_PLAINTEXT":
            warnings.append("NEWSREC_KAFKA_SECURITY_PROTOCOL=SASL_PLAINTEXT: Kafka traffic is not encrypted"
                            + (" and the PLAIN password crosses the network in clear"
                               if self.kafka_sasl_mechanism == "PLAIN" else ""))
        return warnings

    def secret_values(self) -> list[str]:
        """The plain values of every secret setting, for :func:`redact`."""
        return [v.get_secret_value() for v in (self.kafka_sasl_password, self.es_api_key) if v is not None]

    @property
    def engine(self) -> Literal["embedded", "elasticsearch"]:
        if self.search_engine == "auto":
            return "elasticsearch" if self.es_url else "embedded"
        return self.search_engine

    def kafka_config(self) -> dict[str, Any]:
        """librdkafka (confluent-kafka) client settings shared by producers and consumers."""
        conf: dict[str, Any] = {
            "bootstrap.servers": self.kafka_bootstrap,
            "security.protocol": self.kafka_security_protocol,
        }
        if self.kafka_sasl_mechanism:
            conf["sasl.mechanism"] = self.kafka_sasl_mechanism
            conf["sasl.username"] = self.kafka_sasl_username
            conf["sasl.password"] = self.kafka_sasl_password.get_secret_value() if self.kafka_sasl_password else ""
        if self.kafka_ssl_ca_location:
            conf["ssl.ca.location"] = str(self.kafka_ssl_ca_location)
        return conf

    def consumer_config(self, group_id: str) -> dict[str, Any]:
        conf = self.kafka_config() | {"group.id": group_id, "auto.offset.reset": "earliest"}
        if self.broker_profile == "local":
            conf["session.timeout.ms"] = 6000  # Tansu holds a group join for half of it
            conf["fetch.wait.max.ms"] = 10  # Tansu holds every fetch this long, data or not
        return conf

    def producer_config(self) -> dict[str, Any]:
        conf = self.kafka_config() | {
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            # murmur2 is what Java clients and faust (aiokafka) use, so every client
            # puts one user on the same partition as the worker's table shard.
            "partitioner": "murmur2_random",
        }
        if self.broker_profile == "local":
            # Tansu reports a wrong end offset for multi-record batches.
            conf["batch.num.messages"] = 1
            conf["linger.ms"] = 0
        return conf

    def es_api_key_value(self) -> str | None:
        return self.es_api_key.get_secret_value() if self.es_api_key else None

    def elastic_engine(self) -> ElasticEngine:
        """The engine as configured by ``NEWSREC_ES_*`` (URL, alias, API key, CA, timeouts)."""
        from index.elastic import ElasticEngine  # the client library loads only when ES is used

        if not self.es_url:
            raise ConfigError("NEWSREC_ES_URL is not set: point it at the Elasticsearch cluster")
        return ElasticEngine(self.es_url, self.es_alias, api_key=self.es_api_key_value(),
                             ca_certs=str(self.es_ca_certs) if self.es_ca_certs else None,
                             verify_certs=self.es_verify_certs, request_timeout=self.es_request_timeout_s,
                             max_retries=self.es_max_retries)


class WorkerSettings(CommonSettings):
    """The recommendation worker (``newsrec worker``)."""

    model_dir: Path | None = None
    # Versioned model dirs (<registry>/<version>/) that `newsrec models publish` announces;
    # workers on other hosts must see it at the same path.
    model_registry: Path | None = None
    app_id: str = "newsrec-worker"
    web_port: int = Field(default=6066, ge=1, le=65535)
    web_bind: str = "127.0.0.1"
    # The address other workers use to reach this one (table-routed web views).
    web_host: str = "127.0.0.1"

    window_max_signals: int = Field(default=30, ge=1, le=1_000)
    window_max_age_s: float = Field(default=7 * 24 * 3600, gt=0)
    clicked_memory: int = Field(default=200, ge=0, le=10_000)
    refresh_min_interval_s: float = Field(default=2.0, ge=0)
    batch_max_users: int = Field(default=32, ge=1, le=1_024)
    batch_max_wait_ms: float = Field(default=5.0, ge=0)
    pending_sweep_interval_s: float = Field(default=5.0, gt=0)

    max_queries: int = Field(default=5, ge=1, le=16)
    max_new_tokens: int = Field(default=48, ge=4, le=512)
    prompt_signals: int = Field(default=20, ge=1, le=1_000)
    results_per_query: int = Field(default=10, ge=1, le=100)
    items_per_user: int = Field(default=10, ge=1, le=100)
    # Multi-channel recall (streams/recommend.py): weighted RRF of each channel's ranked list.
    # JSON, e.g. NEWSREC_CHANNEL_WEIGHTS='{"signals": 1, "model": 1, "dense": 1, "trending": 0.5}';
    # 0 switches a channel off.
    channel_weights: dict[str, float] = Field(
        default_factory=lambda: {"signals": 1.0, "model": 1.0, "dense": 1.0, "trending": 0.5})
    channel_depth: int = Field(default=20, ge=1, le=200)  # items each channel contributes
    signal_queries: int = Field(default=3, ge=0, le=50)  # recent signal texts as queries (signals channel)
    dense_signals: int = Field(default=10, ge=1, le=200)  # recent signals averaged into the dense profile
    model_threads: int = Field(default=0, ge=0, le=256)
    # onnxruntime's CPU arena keeps its peak forever; off, worker RSS stays flat across
    # load bursts (bench faults) at a small cost per batch.
    model_memory_arena: bool = False
    # Fault injection for tests/faults only (off by default): the process exits at once, like
    # kill -9, after a batch's model and search calls and before its first publish.
    fault_kill_before_publish: bool = False
    # A model call slower than this is abandoned for the batch: the other channels publish
    # without it (the record says "degraded": ["model"]).
    model_timeout_s: float = Field(default=30.0, gt=0, le=3_600)
    # POST /rank: the most candidates one request may rank.
    rank_max_candidates: int = Field(default=500, ge=1, le=10_000)
    # Article vectors on disk, shared by every worker on the host (a restart does not embed the
    # corpus again); default: $XDG_CACHE_HOME/newsrec/embeddings.sqlite (~/.cache/...).
    embedding_store: Path | None = None
    # MiniLM's runtime: "onnx" (an fp32 export made once beside the embedding store, checked
    # against torch; same vectors, about 2x faster on CPU) or "torch".
    embedding_runtime: Literal["onnx", "torch"] = "onnx"
    # POST /rank: a learned fusion dir (`newsrec eval --save-ranker`, verified at start-up);
    # unset: weighted RRF of the channels.
    ranker_dir: Path | None = None

    @field_validator("channel_weights")
    @classmethod
    def _channel_weights(cls, value: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(value) - set(CHANNELS))
        if unknown:
            raise ValueError(f"unknown channel(s) {unknown}: use {list(CHANNELS)}")
        if any(w < 0 for w in value.values()) or not any(w > 0 for w in value.values()):
            raise ValueError("weights must be >= 0 with at least one channel above 0")
        return value

    @property
    def refresh_done_topic(self) -> str:
        return f"{self.app_id}-refresh-done"

    def resolved_model_dir(self) -> Path:
        return self.model_dir or self.state_dir / "models" / "current"

    def resolved_embedding_store(self) -> Path:
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        return self.embedding_store or cache / "newsrec" / "embeddings.sqlite"

    def minilm_embedder(self, **kwargs: Any) -> MiniLMEmbedder:
        """MiniLM backed by the host's vector store and run as configured, as the worker's:
        offline runs (eval, reward scoring) embed a corpus once per host, not once per run."""
        from index.dense import MiniLMEmbedder  # torch loads only when embeddings are used

        store = self.resolved_embedding_store()
        onnx_dir = store.parent / "minilm-onnx" if self.embedding_runtime == "onnx" else None
        return MiniLMEmbedder(store=store, onnx_dir=onnx_dir, **kwargs)

    def resolved_model_registry(self) -> Path:
        return self.model_registry or self.state_dir / "models" / "registry"


S = TypeVar("S", bound=BaseSettings)


def load(cls: type[S], **overrides: Any) -> S:
    """Build settings or raise :class:`ConfigError` naming each bad variable."""
    try:
        return cls(**overrides)
    except ValidationError as exc:
        secret_fields = {name for name, f in cls.model_fields.items() if "SecretStr" in str(f.annotation)}
        # The raw secrets as given (env or overrides), so a message that quotes one is masked too.
        secrets = [str(v.get_secret_value() if isinstance(v, SecretStr) else v)
                   for err in exc.errors(include_url=False) if isinstance(err.get("input"), dict)
                   for k, v in err["input"].items() if k in secret_fields and v]
        secrets += [str(v) for k, v in overrides.items() if k in secret_fields and v]
        lines = []
        for err in exc.errors(include_url=False):
            field = ".".join(str(p) for p in err.get("loc", ()))
            var = f"NEWSREC_{field.upper()}" if field else "settings"
            msg = redact(str(err.get("msg")), secrets)
            if field and field.split(".")[0] not in secret_fields:
                msg += f" (got {redact(repr(err.get('input')), secrets)[:80]})"
            # Model-level errors (no field) carry the whole input, secrets included: never shown.
            lines.append(f"{var}: {msg}")
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines)) from None
