"""Wire contracts of every topic (JSON values, UTF-8 keys).

Versioned by ``schema_version``; producers may omit it (defaults to the current
version). Parsing is strict: no type coercion, unknown fields rejected, so a
producer bug surfaces in the dead-letter topic instead of in a recommendation.
"""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from pathlib import PurePosixPath
from typing import Any, Literal, TypeVar

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError, field_validator

SCHEMA_VERSION = 1
MAX_TEXT_CHARS = 2_000
MAX_META_BYTES = 4_096

Domain = Literal["search", "browse", "news_click", "app"]


class _Contract(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    def to_json_bytes(self) -> bytes:
        return self.model_dump_json().encode("utf-8")


def _clean_text(value: str, *, field: str, max_chars: int) -> str:
    value = value.strip()
    if not value:
        raise ValueError(f"{field} must not be empty")
    if len(value) > max_chars:
        raise ValueError(f"{field} has {len(value)} characters, more than {max_chars}")
    return value


class UserEvent(_Contract):
    """One user signal on topic ``user-events`` (key = user_id)."""

    schema_version: Literal[1] = SCHEMA_VERSION
    event_id: str = Field(min_length=1, max_length=128)
    user_id: str = Field(min_length=1, max_length=128)
    ts: AwareDatetime
    domain: Domain
    text: str
    url: str | None = Field(default=None, max_length=2_048)
    news_id: str | None = Field(default=None, max_length=64)
    meta: dict[str, Any] = Field(default_factory=dict)

    @field_validator("text")
    @classmethod
    def _text(cls, value: str) -> str:
        return _clean_text(value, field="text", max_chars=MAX_TEXT_CHARS)

    @field_validator("meta")
    @classmethod
    def _meta(cls, value: dict[str, Any]) -> dict[str, Any]:
        size = len(json.dumps(value, ensure_ascii=False).encode("utf-8"))
        if size > MAX_META_BYTES:
            raise ValueError(f"meta is {size} bytes as JSON, more than {MAX_META_BYTES}")
        return value


class NewsArticle(_Contract):
    """One article on topic ``news-articles`` (key = news_id)."""

    schema_version: Literal[1] = SCHEMA_VERSION
    news_id: str = Field(min_length=1, max_length=64)
    title: str = Field(min_length=1, max_length=1_000)
    abstract: str = Field(default="", max_length=10_000)
    category: str = ""
    subcategory: str = ""
    url: str | None = None
    entities: list[str] = Field(default_factory=list)
    published_at: AwareDatetime | None = None


class RecItem(_Contract):
    news_id: str
    title: str
    score: float
    query: str


class Recommendation(_Contract):
    """The latest recommendations of one user on topic ``recommendations`` (key = user_id)."""

    schema_version: Literal[1] = SCHEMA_VERSION
    user_id: str
    generated_at: AwareDatetime
    model_version: str
    queries: list[str]
    items: list[RecItem]
    trigger_event_id: str
    latency_ms: float
    stale: bool = False


# A version names a registry directory (<root>/<version>/): one safe path component.
MODEL_VERSION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$"


class ModelUpdate(_Contract):
    """A model version announced on ``model-updates`` (key = "model") by ``newsrec models publish``."""

    schema_version: Literal[1] = SCHEMA_VERSION
    version: str = Field(pattern=MODEL_VERSION_PATTERN)
    # Absolute: every worker resolves it on its own host (a shared or identically mounted registry).
    model_dir: str = Field(min_length=1, max_length=4_096)
    published_at: AwareDatetime
    # sha256 of manifest.json: pins the exact manifest, so the files it lists are pinned too.
    manifest_sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")

    @field_validator("model_dir")
    @classmethod
    def _model_dir(cls, value: str) -> str:
        if not PurePosixPath(value).is_absolute():
            raise ValueError("model_dir must be an absolute path")
        return value


class DeadLetter(_Contract):
    """An input record that could not be used, on ``user-events-dlq``; ``raw`` keeps it whole."""

    schema_version: Literal[1] = SCHEMA_VERSION
    error: str
    raw: str
    raw_encoding: Literal["utf-8", "base64"] = "utf-8"
    topic: str
    partition: int
    offset: int
    failed_at: AwareDatetime = Field(default_factory=lambda: datetime.now(UTC))


C = TypeVar("C", bound=_Contract)


def _parse(cls: type[C], raw: bytes) -> C:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"value is not valid UTF-8: {exc}") from None
    try:
        return cls.model_validate_json(text)
    except ValidationError as exc:
        raise ValueError(_short_errors(exc)) from None


def parse_event(raw: bytes) -> UserEvent:
    """Parse one ``user-events`` value; raises ``ValueError`` with a readable reason."""
    return _parse(UserEvent, raw)


def parse_model_update(raw: bytes) -> ModelUpdate:
    """Parse one ``model-updates`` value; raises ``ValueError`` with a readable reason."""
    return _parse(ModelUpdate, raw)


def dead_letter(raw: bytes, error: str, *, topic: str, partition: int, offset: int) -> DeadLetter:
    try:
        text, encoding = raw.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        text, encoding = base64.b64encode(raw).decode("ascii"), "base64"
    return DeadLetter(
        error=error[:2_000], raw=text, raw_encoding=encoding, topic=topic, partition=partition, offset=offset
    )


def _short_errors(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False)[:5]:
        loc = ".".join(str(p) for p in err.get("loc", ())) or "value"
        parts.append(f"{loc}: {err.get('msg')}")
    return "; ".join(parts)
