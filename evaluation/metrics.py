"""Offline recommendation metrics: pure functions over id lists, no I/O.

Conventions (the ones of the recommenders library and most news-rec papers):

- ``ranked`` is the recommended list, best first. Repeated ids count once, at their
  first position, so a list with duplicates cannot score above a clean one.
- ``relevant`` is the set of held-out ids the user actually read (binary relevance).
- ``recall@k = |top-k ∩ relevant| / |relevant|`` (NOT divided by ``min(|relevant|, k)``):
  a user with more held-out reads than ``k`` cannot reach 1. This is the standard
  definition; it keeps recall comparable across ``k``.
- A user with no relevant ids scores 0 on every ranking metric (callers should not
  produce such users; the dataset format requires at least one target per user).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


def _check_k(k: int) -> None:
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")


def top_k(ranked: Iterable[str], k: int) -> list[str]:
    """The first ``k`` distinct ids of ``ranked``, in order."""
    _check_k(k)
    out: list[str] = []
    seen: set[str] = set()
    for item in ranked:
        if item in seen:
            continue
        seen.add(item)
        out.append(item)
        if len(out) == k:
            break
    return out


def recall_at_k(ranked: Sequence[str], relevant: Collection[str], k: int) -> float:
    """``|top-k ∩ relevant| / |relevant|``."""
    relevant = set(relevant)
    if not relevant:
        return 0.0
    return sum(1 for item in top_k(ranked, k) if item in relevant) / len(relevant)


def hit_rate_at_k(ranked: Sequence[str], relevant: Collection[str], k: int) -> float:
    """1.0 if any of the top ``k`` is relevant, else 0.0."""
    relevant = set(relevant)
    return 1.0 if any(item in relevant for item in top_k(ranked, k)) else 0.0


def ndcg_at_k(ranked: Sequence[str], relevant: Collection[str], k: int) -> float:
    """Binary-gain NDCG with a ``log2(rank + 1)`` discount (rank 1 undiscounted).

    The ideal ranking puts ``min(|relevant|, k)`` relevant items first.
    """
    relevant = set(relevant)
    if not relevant:
        return 0.0
    dcg = sum(1.0 / math.log2(rank + 1) for rank, item in enumerate(top_k(ranked, k), 1) if item in relevant)
    idcg = sum(1.0 / math.log2(rank + 1) for rank in range(1, min(len(relevant), k) + 1))
    return dcg / idcg


def mrr(ranked: Sequence[str], relevant: Collection[str], k: int | None = None) -> float:
    """Reciprocal rank of the first relevant item (within the top ``k`` if given); 0 if none."""
    relevant = set(relevant)
    items = top_k(ranked, k) if k is not None else top_k(ranked, max(1, len(ranked)))
    for rank, item in enumerate(items, 1):
        if item in relevant:
            return 1.0 / rank
    return 0.0


def interest_coverage(recommended_ids: Sequence[str], target_ids: Collection[str],
                      cluster_of: Mapping[str, str]) -> float:
    """Share of the distinct interest clusters of the held-out reads that the recommended
    list touches (any recommended item in the same cluster counts, not only exact hits).

    Clusters are e.g. MIND subcategories. Ids unknown to ``cluster_of`` or with an empty
    cluster are ignored; 0.0 when no target has a cluster. Pass the top-k yourself.
    """
    wanted = {c for t in target_ids if (c := cluster_of.get(t))}
    if not wanted:
        return 0.0
    got = {c for r in recommended_ids if (c := cluster_of.get(r))}
    return len(wanted & got) / len(wanted)


def query_diversity(query_embeddings: np.ndarray | Sequence[Sequence[float]]) -> float:
    """Mean pairwise cosine distance ``1 - cos`` over all query pairs; 0.0 for fewer than 2.

    Range [0, 2]; sentence embeddings of related text are positively correlated, so real
    values lie in [0, ~1]. Rows are normalised here; an all-zero row counts as distance 1
    from everything (cosine 0), rather than NaN.
    """
    emb = np.asarray(query_embeddings, dtype=np.float64)
    if emb.ndim != 2:
        raise ValueError(f"expected a 2-d array of embeddings, got shape {emb.shape}")
    n = emb.shape[0]
    if n < 2:
        return 0.0
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    unit = np.divide(emb, norms, out=np.zeros_like(emb), where=norms > 0)
    cos = np.clip(unit @ unit.T, -1.0, 1.0)
    upper = cos[np.triu_indices(n, k=1)]
    return float(np.clip(np.mean(1.0 - upper), 0.0, 2.0))


def aggregate(per_user_rows: Sequence[Mapping[str, Any]], by: Sequence[str] = ("cold",),
              ignore: Collection[str] = ("user_id",)) -> dict[str, dict[str, Any]]:
    """Means of every numeric column, over all rows (``"all"``) and over each subset whose
    boolean column named in ``by`` is true (e.g. ``"cold"``).

    Each group has ``n`` (rows in it) and, per metric, the mean over the rows where the value
    is not None (a metric may be undefined for some methods, e.g. query diversity without
    queries); a metric no row defines is None. Booleans in ``by`` are not averaged.
    """
    skip = set(ignore) | set(by)
    columns: list[str] = []
    for row in per_user_rows:
        for key, value in row.items():
            if key in skip or key in columns:
                continue
            if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)):
                columns.append(key)
    groups: dict[str, list[Mapping[str, Any]]] = {"all": list(per_user_rows)}
    for name in by:
        groups[name] = [r for r in per_user_rows if r.get(name)]
    return {name: _means(rows, columns) for name, rows in groups.items()}


def _means(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"n": len(rows)}
    for col in columns:
        values = [float(r[col]) for r in rows if r.get(col) is not None]
        out[col] = float(np.mean(values)) if values else None
    return out
