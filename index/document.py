"""The indexed document: one news article, as every engine stores and returns it.

It is also the value of the ``news-articles`` topic (``streams.contracts`` re-exports it),
so the record base and schema version live here, at the bottom of the layers.
"""

from __future__ import annotations

from typing import Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

SCHEMA_VERSION = 1


class Record(BaseModel):
    """Strict, frozen JSON record: no type coercion, unknown fields rejected."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    def to_json_bytes(self) -> bytes:
        return self.model_dump_json().encode("utf-8")


class NewsArticle(Record):
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
