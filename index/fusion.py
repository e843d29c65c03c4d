"""Reciprocal-rank fusion of one user's query results: pure."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

from index.base import Hit

RRF_K = 60


@dataclass(frozen=True, slots=True)
class FusedItem:
    news_id: str
    title: str
    score: float
    query: str  # the query that ranked this item best


def rrf_fuse(queries: Sequence[str], results: Sequence[Sequence[Hit]], *, limit: int,
             exclude: Collection[str] = (), k: int = RRF_K) -> list[FusedItem]:
    """Fuse ranked lists (one per query) by RRF; dedupe by news_id, drop ``exclude``.

    Ties break by best single rank, then news_id, so the output is deterministic.
    """
    if len(queries) != len(results):
        raise ValueError(f"{len(queries)} queries but {len(results)} result lists")
    scores: dict[str, float] = {}
    best: dict[str, tuple[int, str, str]] = {}  # news_id -> (best rank, query, title)
    for query, hits in zip(queries, results):
        seen: set[str] = set()
        for rank, hit in enumerate(hits):
            if hit.news_id in exclude or hit.news_id in seen:
                continue
            seen.add(hit.news_id)
            scores[hit.news_id] = scores.get(hit.news_id, 0.0) + 1.0 / (k + rank + 1)
            if hit.news_id not in best or rank < best[hit.news_id][0]:
                best[hit.news_id] = (rank, query, hit.title)
    ranked = sorted(scores, key=lambda nid: (-scores[nid], best[nid][0], nid))[:limit]
    return [FusedItem(nid, best[nid][2], round(scores[nid], 6), best[nid][1]) for nid in ranked]
