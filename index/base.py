"""What every news search engine offers, so the recommender can swap them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from index.document import NewsArticle


@dataclass(frozen=True, slots=True)
class Hit:
    news_id: str
    title: str
    score: float


class SearchEngine(Protocol):
    """A full-text news index; ``search_many`` answers a batch of queries in one go."""

    name: str

    async def upsert(self, articles: Sequence[NewsArticle]) -> int:
        """Insert or replace articles by ``news_id``; returns how many were written."""
        ...

    async def delete(self, news_ids: Sequence[str]) -> None:
        """Remove articles by ``news_id`` (a news tombstone); ids not in the index are ignored."""
        ...

    async def search_many(
        self,
        queries: Sequence[str],
        *,
        k: int = 10,
        exclude: Sequence[Sequence[str]] | None = None,
        within: Sequence[Sequence[str]] | None = None,
    ) -> list[list[Hit]]:
        """One hit list per query, best first; ``exclude[i]`` = news_ids to leave out of query i;
        ``within[i]`` (when given) = the only news_ids query i may return (ranking a candidate set)."""
        ...

    async def count(self) -> int: ...

    async def close(self) -> None: ...


def check_search_args(queries: Sequence[str], k: int, exclude: Sequence[Sequence[str]] | None,
                      within: Sequence[Sequence[str]] | None = None) -> None:
    """The argument rules every engine's ``search_many`` shares."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if exclude is not None and len(exclude) != len(queries):
        raise ValueError(f"exclude has {len(exclude)} entries for {len(queries)} queries")
    if within is not None and len(within) != len(queries):
        raise ValueError(f"within has {len(within)} entries for {len(queries)} queries")
