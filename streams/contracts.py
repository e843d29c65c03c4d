"""Wire contracts of every topic (JSON values, UTF-8 keys).

Versioned by ``schema_version``; producers may omit it (defaults to the current
version). Parsing is strict: no type coercion, unknown fields rejected, so a
producer bug surfaces in the dead-letter topic instead of in a recommendation.
"""

from __future__ import annotations

import base64
import json
import unicodedata
from datetime import UTC, datetime
from pathlib import PurePosixPath
from typing import Any, Literal, TypeVar

from pydantic import (
    AwareDatetime,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

# The news-articles value is the indexed document: defined in index/, re-exported here.
from index.document import SCHEMA_VERSION as SCHEMA_VERSION
from index.document import NewsArticle as NewsArticle
from index.document import Record as _Contract

MAX_TEXT_CHARS = 2_000
MAX_META_BYTES = 4_096
# Event times outside this range are producer bugs (or attacks): near datetime's limits,
# window and prompt arithmetic (ts - max_age, conversion to UTC) would overflow.
MIN_EVENT_TS = datetime(1970, 1, 1, tzinfo=UTC)
MAX_EVENT_TS = datetime(2100, 1, 1, tzinfo=UTC)

# "impression": the article ``news_id`` was shown to the user (text = its title). An exposure,
# not an interest: windows keep it out of the signals the model reads and out of the clicks.
Domain = Literal["search", "browse", "news_click", "app", "impression"]


def _clean_text(value: str, *, field: str, max_chars: int) -> str:
    value = value.strip()
    if not value:
        raise ValueError(f"{field} must not be empty")
    if len(value) > max_chars:
        raise ValueError(f"{field} has {len(value)} characters, more than {max_chars}")
    return value


def _check_id(value: str, field: str) -> str:
    # Ids become table keys, record keys and URL path segments: no control/format characters.
    if any(unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Zl", "Zp") for ch in value):
        raise ValueError(f"{field} must not contain control characters")
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

    @field_validator("event_id", "user_id")
    @classmethod
    def _ids(cls, value: str, info: Any) -> str:
        return _check_id(value, info.field_name)

    @field_validator("ts")
    @classmethod
    def _ts(cls, value: datetime) -> datetime:
        if not MIN_EVENT_TS <= value < MAX_EVENT_TS:
            raise ValueError(f"ts must lie between {MIN_EVENT_TS:%Y-%m-%d} and {MAX_EVENT_TS:%Y-%m-%d} (UTC)")
        return value

    @field_validator("text")
    @classmethod
    def _text(cls, value: str) -> str:
        return _clean_text(value, field="text", max_chars=MAX_TEXT_CHARS)

    @field_validator("meta")
    @classmethod
    def _meta(cls, value: dict[str, Any]) -> dict[str, Any]:
        try:
            # allow_nan=False: NaN/Infinity are not JSON (RFC 8259); pydantic's parser accepts them.
            size = len(json.dumps(value, ensure_ascii=False, allow_nan=False).encode("utf-8"))
        except ValueError as exc:
            raise ValueError(f"meta is not plain JSON: {exc}") from None
        if size > MAX_META_BYTES:
            raise ValueError(f"meta is {size} bytes as JSON, more than {MAX_META_BYTES}")
        return value

    @model_validator(mode="after")
    def _impression_names_news(self) -> UserEvent:
        if self.domain == "impression" and not self.news_id:
            raise ValueError("an impression event needs the news_id of the article shown")
        return self


class RecItem(_Contract):
    news_id: str
    title: str
    score: float
    query: str
    # The recall channels that found the item, strongest first (optional: older records lack it).
    channels: list[str] = Field(default_factory=list)


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
    # Channels left out of this refresh because they failed or timed out (e.g. ["model"]).
    degraded: list[str] = Field(default_factory=list)


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
    """An input record that could not be used, on ``user-events-dlq``; ``raw`` keeps it whole
    unless it was too big to forward (``raw_truncated``; the original stays at topic/partition/offset)."""

    schema_version: Literal[1] = SCHEMA_VERSION
    error: str
    raw: str
    raw_encoding: Literal["utf-8", "base64"] = "utf-8"
    topic: str
    partition: int
    offset: int
    failed_at: AwareDatetime = Field(default_factory=lambda: datetime.now(UTC))
    raw_truncated: bool = False
    raw_size: int | None = None  # bytes of the original value


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
    except (RecursionError, OverflowError) as exc:
        # Not ValueErrors, but still a bad record (the worker dead-letters ValueErrors only);
        # pydantic's parser caps nesting today, this keeps the promise if that changes.
        raise ValueError(f"value cannot be parsed: {type(exc).__name__}") from None


def parse_event(raw: bytes) -> UserEvent:
    """Parse one ``user-events`` value; raises ``ValueError`` with a readable reason, and
    nothing else, whatever the bytes (property-tested in tests/faults/test_hostile_input.py)."""
    return _parse(UserEvent, raw)


def parse_model_update(raw: bytes) -> ModelUpdate:
    """Parse one ``model-updates`` value; raises ``ValueError`` with a readable reason."""
    return _parse(ModelUpdate, raw)


# A dead letter must itself fit in one Kafka record (producers default to 1 MB): JSON escaping
# can blow raw bytes up sixfold (\x00 -> "\u0000"), so big or escape-heavy values are cut
# and/or base64-encoded (4/3) to stay under DEAD_LETTER_MAX_BYTES.
DEAD_LETTER_MAX_RAW_BYTES = 256 * 1024
DEAD_LETTER_MAX_BYTES = 512 * 1024


def dead_letter(raw: bytes, error: str, *, topic: str, partition: int, offset: int) -> DeadLetter:
    kept = raw[:DEAD_LETTER_MAX_RAW_BYTES]
    common: dict[str, Any] = {"error": error[:2_000], "topic": topic, "partition": partition, "offset": offset,
                              "raw_truncated": len(kept) < len(raw), "raw_size": len(raw)}
    try:
        letter = DeadLetter(raw=kept.decode("utf-8"), raw_encoding="utf-8", **common)
    except UnicodeDecodeError:
        letter = None
    if letter is None or len(letter.to_json_bytes()) > DEAD_LETTER_MAX_BYTES:
        letter = DeadLetter(raw=base64.b64encode(kept).decode("ascii"), raw_encoding="base64", **common)
    return letter


def _short_errors(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False)[:5]:
        loc = ".".join(str(p) for p in err.get("loc", ())) or "value"
        parts.append(f"{loc}: {err.get('msg')}")
    return "; ".join(parts)
