"""Reciprocal-rank fusion: of one channel's query results (:func:`rrf_fuse`), then of the
channels' ranked lists with a weight per channel (:func:`fuse_channels`). Pure."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, replace

from index.base import Hit

RRF_K = 60


@dataclass(frozen=True, slots=True)
class FusedItem:
    news_id: str
    title: str
    score: float
    query: str  # the query (or signal) that ranked this item best
    channels: tuple[str, ...] = ()  # the recall channels that found it, strongest first


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
    # Ordered by the score as published (rounded): sums equal but for float noise tie.
    ranked = sorted(scores, key=lambda nid: (-round(scores[nid], 6), best[nid][0], nid))[:limit]
    return [FusedItem(nid, best[nid][2], round(scores[nid], 6), best[nid][1]) for nid in ranked]


def fuse_channels(lists: Mapping[str, Sequence[FusedItem]], weights: Mapping[str, float], *, limit: int,
                  exclude: Collection[str] = (), k: int = RRF_K) -> list[FusedItem]:
    """Weighted RRF across channels: ``score = sum_c weights[c] / (k + rank_c + 1)``.

    Each item keeps the query of the channel that contributed most to its score and lists
    every channel that found it, strongest contribution first. A channel missing from
    ``weights`` (or weighted 0) does not count. Ties break by news_id (deterministic).
    """
    scores: dict[str, float] = {}
    parts: dict[str, list[tuple[float, str, FusedItem]]] = {}
    for channel, items in lists.items():
        weight = weights.get(channel, 0.0)
        if weight <= 0:
            continue
        rank = 0
        for item in items:
            if item.news_id in exclude or any(c == channel for _, c, _ in parts.get(item.news_id, ())):
                continue
            contribution = weight / (k + rank + 1)
            rank += 1
            scores[item.news_id] = scores.get(item.news_id, 0.0) + contribution
            parts.setdefault(item.news_id, []).append((contribution, channel, item))
    # Ordered by the score as published (rounded): 2/62 + 1/65 and 2/64 + 1/61 are equal
    # but differ in the last float bits, and must tie (then break by news_id).
    ranked = sorted(scores, key=lambda nid: (-round(scores[nid], 6), nid))[:limit]
    fused = []
    for nid in ranked:
        found = sorted(parts[nid], key=lambda p: (-p[0], p[1]))
        best = found[0][2]
        fused.append(replace(best, score=round(scores[nid], 6), channels=tuple(c for _, c, _ in found)))
    return fused
