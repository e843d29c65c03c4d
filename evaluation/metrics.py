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


# ---------------------------------------------------------------------------- impression metrics
#
# Per impression: ``scores`` are a model's scores of the candidates shown (higher = better),
# ``labels`` 1 for clicked, 0 for shown and not clicked, in the same order. The definitions are
# those of MIND's official scorer (msnews.github.io evaluate.py: roc_auc_score, mrr_score,
# dcg_score, ndcg_score), so numbers compare with published MIND results. Two deliberate
# choices where that scorer leaves things to numpy:
# - equal scores are ranked in shown order (a stable sort) for MRR and nDCG, so results are
#   deterministic; AUC counts a tied (clicked, not clicked) pair as 1/2, as sklearn does;
# - a metric that is undefined for an impression returns None instead of NaN or an
#   exception: AUC when all candidates are clicked or none is, MRR and nDCG when none is.
#   Callers skip those impressions and report how many (MIND's scorer never meets one:
#   every MIND impression has a click and a non-click).


def _impression(scores: Sequence[float], labels: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels)
    if s.ndim != 1 or y.ndim != 1 or len(s) != len(y):
        raise ValueError(f"scores and labels must be flat and of one length, got shapes {s.shape} and {y.shape}")
    if len(s) == 0:
        raise ValueError("an impression needs at least one candidate")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores must be finite numbers (no NaN or infinity)")
    if not np.all((y == 0) | (y == 1)):
        raise ValueError(f"labels must be 0 (not clicked) or 1 (clicked), got {sorted(set(y.tolist()))}")
    return s, y.astype(np.int64)


def _ranked_labels(s: np.ndarray, y: np.ndarray) -> np.ndarray:
    # Descending by score; stable, so ties keep the shown order.
    return y[np.argsort(-s, kind="stable")]


def impression_auc(scores: Sequence[float], labels: Sequence[int]) -> float | None:
    """Share of (clicked, not clicked) pairs the scores order correctly, ties counting 1/2
    (the ROC AUC); None when the impression has only one class."""
    s, y = _impression(scores, labels)
    pos, neg = s[y == 1], s[y == 0]
    if not len(pos) or not len(neg):
        return None
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(wins / (len(pos) * len(neg)))


def impression_mrr(scores: Sequence[float], labels: Sequence[int]) -> float | None:
    """MIND's MRR: the mean over clicked candidates of 1 / their rank; None without a click."""
    s, y = _impression(scores, labels)
    if not y.any():
        return None
    ranked = _ranked_labels(s, y)
    return float(np.sum(ranked / np.arange(1, len(ranked) + 1)) / ranked.sum())


def _dcg(ranked: np.ndarray, k: int) -> float:
    top = ranked[:k]
    return float(np.sum((2.0 ** top - 1.0) / np.log2(np.arange(len(top)) + 2.0)))


def impression_ndcg(scores: Sequence[float], labels: Sequence[int], k: int) -> float | None:
    """MIND's nDCG@k: DCG with gains ``2^label - 1`` and discount ``log2(rank + 1)`` over the
    top ``k`` by score, divided by the DCG of the ideal order; None without a click."""
    _check_k(k)
    s, y = _impression(scores, labels)
    if not y.any():
        return None
    return _dcg(_ranked_labels(s, y), k) / _dcg(np.sort(y)[::-1], k)


def bootstrap_ci(values_a: Sequence[float], values_b: Sequence[float] | None = None, *, n: int = 1000, seed: int,
                 alpha: float = 0.05) -> tuple[float, float, float]:
    """``(mean, low, high)``: the mean of ``values_a`` (or, with ``values_b``, of the paired
    differences ``a - b``) and its percentile bootstrap ``1 - alpha`` interval.

    Pairs are resampled together (one value per user or impression, same order in both),
    so the interval of a difference accounts for the correlation between two methods
    scored on the same users. ``mean`` is that of the full sample; ``seed`` makes it repeatable.
    """
    a = np.asarray(values_a, dtype=np.float64)
    if values_b is not None:
        b = np.asarray(values_b, dtype=np.float64)
        if b.shape != a.shape:
            raise ValueError(f"paired values must have one length, got {a.shape} and {b.shape}")
        a = a - b
    if a.ndim != 1 or not len(a):
        raise ValueError("bootstrap_ci needs a non-empty flat list of values")
    if not np.all(np.isfinite(a)):
        raise ValueError("bootstrap_ci values must be finite (skip undefined metrics before, not NaN)")
    if n < 1:
        raise ValueError(f"n (bootstrap resamples) must be at least 1, got {n}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie strictly between 0 and 1, got {alpha}")
    rng = np.random.default_rng(seed)
    means = np.empty(n)
    for start in range(0, n, 256):  # chunks keep memory at 256 x len(a) indices
        stop = min(n, start + 256)
        means[start:stop] = a[rng.integers(0, len(a), size=(stop - start, len(a)))].mean(axis=1)
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(a.mean()), float(low), float(high)
