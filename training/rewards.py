"""Reward functions for GRPO training of the query-writing model (arXiv:2602.15005).

The policy reads a user's recent activity and writes a numbered list of news search
queries. Each completion is scored by five rewards, every one in [0, 1] and combined with
uniform weights, plus a utility reward. All functions here are pure (no I/O, no model, no
retrieval): the trainer parses, embeds and searches, then passes the results in.

- ``align``: do the queries retrieve articles that match them? Mean over queries of the
  mean cosine between the query embedding and its top-k results' embeddings. Negative
  cosines are clipped to 0, so each term and hence the mean lies in [0, 1]; a query with
  no results scores 0.
- ``coverage``: do the queries reach all of the user's interests? Share of the distinct
  interest clusters of the activity window found among the clusters of the retrieved
  articles; a share, so in [0, 1].
- ``specificity``: are the queries precise rather than vague ("latest news")? Per query,
  the sum of its distinct terms' normalised idf (each in [0, 1], see ``normalized_idf``)
  divided by ``saturation`` and capped at 1; mean over queries, so in [0, 1].
- ``diversity``: do the queries differ from each other? Mean over distinct query pairs of
  the cosine distance ``1 - cos``, each clipped into [0, 1] (an anti-correlated pair counts
  as fully distinct, no more), so the mean is in [0, 1].
- ``format``: is the output a clean numbered list the parser can use? 0 unless every
  non-empty line is a numbered item and the item count is within the allowed range;
  otherwise the share of items that pass the per-item checks, in [0, 1].
- ``utility``: does the list find what the user reads next? recall@k of the held-out
  future clicks over the ranked recommendations, in [0, 1].

``composite_reward`` is the weighted mean of these, so it stays in [0, 1] too.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from evaluation.metrics import recall_at_k
from models.prompt import parse_queries, sanitize_text

REWARD_NAMES: tuple[str, ...] = ("align", "coverage", "specificity", "diversity", "format", "utility")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class FormatRules:
    """Limits the format reward checks a completion against."""

    min_queries: int = 3
    max_queries: int = 8
    max_words: int = 12  # per query
    max_chars: int = 100  # per query

    def __post_init__(self) -> None:
        for name in ("min_queries", "max_queries", "max_words", "max_chars"):
            value = getattr(self, name)
            if not _is_int(value):
                raise ValueError(f"FormatRules.{name} must be an int, got {value!r}")
        if self.min_queries < 1:
            raise ValueError(f"FormatRules.min_queries must be at least 1, got {self.min_queries}")
        if self.max_queries < self.min_queries:
            raise ValueError(
                f"FormatRules.max_queries ({self.max_queries}) is below min_queries ({self.min_queries}); "
                "raise max_queries or lower min_queries"
            )
        if self.max_words < 1:
            raise ValueError(f"FormatRules.max_words must be at least 1, got {self.max_words}")
        if self.max_chars < 2:
            # parse_queries drops queries under 2 characters, so no item could ever pass.
            raise ValueError(f"FormatRules.max_chars must be at least 2, got {self.max_chars}")


# --- terms and idf -------------------------------------------------------------------------

# Function words plus generic news words: a query made of them ("latest news today")
# matches everything and pins down no interest.
STOPWORDS: frozenset[str] = frozenset(
    {
        "a", "about", "above", "after", "again", "against", "all", "also", "am", "an", "and", "any", "are",
        "as", "at", "be", "because", "been", "before", "being", "below", "between", "both", "but", "by", "can",
        "could", "did", "do", "does", "doing", "down", "during", "each", "few", "for", "from", "further", "had",
        "has", "have", "having", "he", "her", "here", "hers", "him", "his", "how", "i", "if", "in", "into",
        "is", "it", "its", "itself", "just", "me", "more", "most", "my", "no", "nor", "not", "now", "of", "off",
        "on", "once", "only", "or", "other", "our", "ours", "out", "over", "own", "same", "she", "should", "so",
        "some", "such", "than", "that", "the", "their", "theirs", "them", "then", "there", "these", "they",
        "this", "those", "through", "to", "too", "under", "until", "up", "very", "was", "we", "were", "what",
        "when", "where", "which", "while", "who", "whom", "why", "will", "with", "would", "you", "your",
        "yours",
        # generic news words
        "news", "latest", "update", "updates", "updated", "today", "todays", "tonight", "yesterday", "top",
        "stories", "story", "headline", "headlines", "breaking", "recent", "recently", "current", "currently",
        "report", "reports", "article", "articles", "info", "information", "search", "query", "queries",
    }
)

_TOKEN = re.compile(r"[^\W_]+")  # runs of unicode letters/digits


def query_terms(text: str) -> list[str]:
    """Lowercase word tokens of ``text`` minus stopwords and 1-character tokens, in order.

    Duplicates are kept. Build the corpus document frequencies with this same function so
    the terms match.
    """
    if not isinstance(text, str):
        return []
    # NFKC composes accents ("e" + combining acute) so they stay inside one token.
    folded = unicodedata.normalize("NFKC", text).casefold()
    return [t for t in _TOKEN.findall(folded) if len(t) > 1 and t not in STOPWORDS]


def normalized_idf(doc_freq: Mapping[str, int], n_docs: int) -> dict[str, float]:
    """Smoothed idf ``log((n_docs + 1) / (df + 1))`` over its maximum ``log(n_docs + 1)``.

    A term in no document gets 1.0, a term in every document 0.0.
    """
    if not _is_int(n_docs) or n_docs < 1:
        raise ValueError(f"n_docs must be an int of at least 1, got {n_docs!r}")
    top = math.log(n_docs + 1)
    out: dict[str, float] = {}
    for term, df in doc_freq.items():
        if not _is_int(df) or not 0 <= df <= n_docs:
            raise ValueError(f"document frequency of {term!r} must be an int in [0, n_docs={n_docs}], got {df!r}")
        out[term] = math.log((n_docs + 1) / (df + 1)) / top
    return out


# --- format --------------------------------------------------------------------------------

# Stricter than models.prompt._LIST_ITEM on purpose: the prompt asks for a numbered list, so
# bullets, "(1)" or "1:" are not rewarded even though the parser tolerates them. The marker
# must be followed by whitespace so "1.5 million jobs" is not read as item 1.
_NUMBERED_ITEM = re.compile(r"^\s*[0-9]{1,3}[.)](?:\s+(?P<item>.*))?$")


def _norm_key(text: str) -> str:
    return " ".join(text.split()).casefold()


def _clean_line(line: str) -> str:
    """The query ``parse_queries`` makes of this one line ("" if it drops it)."""
    # max_chars above the line length: no truncation, so over-long items stay detectable.
    parsed = parse_queries(line, max_queries=1, max_chars=len(line) + 2)
    return parsed[0] if parsed else ""


def _signal_keys(signal_texts: Sequence[str]) -> set[str]:
    keys: set[str] = set()
    for text in signal_texts:
        if not isinstance(text, str):
            continue
        # Raw text, and cleaned the way a copied item is (edge punctuation, quotes, markdown),
        # both in full and as shown in the prompt (sanitised, possibly truncated).
        for form in (text, sanitize_text(text, max_chars=10_000), sanitize_text(text)):
            keys.add(_norm_key(form))
            keys.add(_norm_key(_clean_line(form)))
    keys.discard("")
    return keys


def format_reward(completion: str, signal_texts: Sequence[str], rules: FormatRules = FormatRules()) -> float:
    """0.0 unless ``completion`` is a numbered list of ``min_queries..max_queries`` items;
    else the share of items that are 1..max_words words, at most max_chars characters,
    not a repeat of an earlier item and not a copy of an input signal. Never raises.
    """
    if not isinstance(completion, str):
        return 0.0
    lines = [line for line in completion.splitlines() if line.strip()]
    matches = [_NUMBERED_ITEM.match(line) for line in lines]
    if not lines or not all(matches) or not rules.min_queries <= len(lines) <= rules.max_queries:
        return 0.0
    copies = _signal_keys(signal_texts)
    seen: set[str] = set()
    passed = 0
    for line in lines:
        # Judge the query the parser will actually search for (labels, ages, markdown gone).
        query = _clean_line(line)
        key = _norm_key(query)
        ok = 1 <= len(query.split()) <= rules.max_words and len(query) <= rules.max_chars
        ok = ok and key not in seen and key not in copies
        if key:
            seen.add(key)
        passed += ok
    return passed / len(lines)


# --- embedding rewards ---------------------------------------------------------------------


def _unit_rows(vecs: np.ndarray, what: str) -> np.ndarray:
    arr = np.asarray(vecs, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"{what} must be a 2-d array (n, dim), got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{what} contains NaN or infinite values")
    # Re-normalising is a no-op for unit rows and keeps cosines in [-1, 1] if a caller forgot;
    # an all-zero row gets cosine 0 with everything instead of NaN.
    norms = np.linalg.norm(arr, axis=1, keepdims=True)
    return np.divide(arr, norms, out=np.zeros_like(arr), where=norms > 0)


def align_reward(query_vecs: np.ndarray, result_vecs: Sequence[np.ndarray]) -> float:
    """Mean over queries of the mean cosine (negatives clipped to 0) between the query and
    each of its results; a query without results scores 0; no queries score 0.
    """
    queries = _unit_rows(query_vecs, "query_vecs")
    n, dim = queries.shape
    if len(result_vecs) != n:
        raise ValueError(f"got {len(result_vecs)} result arrays for {n} queries; pass one (k_i, {dim}) array per query")
    if n == 0:
        return 0.0
    total = 0.0
    for i, results in enumerate(result_vecs):
        arr = np.asarray(results, dtype=np.float64)
        if arr.size == 0 and arr.ndim == 1:
            continue  # np.array([]) for a query with no results
        if arr.ndim != 2 or arr.shape[1] != dim:
            raise ValueError(f"result_vecs[{i}] must have shape (k, {dim}), got {arr.shape}")
        if arr.shape[0] == 0:
            continue
        cos = _unit_rows(arr, f"result_vecs[{i}]") @ queries[i]
        # Clip per result: an off-topic result should not cancel an on-topic one.
        total += float(np.mean(np.clip(cos, 0.0, 1.0)))
    return float(np.clip(total / n, 0.0, 1.0))


def diversity_reward(query_vecs: np.ndarray) -> float:
    """Mean over distinct pairs of ``1 - cos``, each clipped into [0, 1]; 0.0 below 2 queries.

    Equals ``evaluation.metrics.query_diversity`` whenever no pair is anti-correlated.
    """
    unit = _unit_rows(query_vecs, "query_vecs")
    n = unit.shape[0]
    if n < 2:
        return 0.0
    cos = (unit @ unit.T)[np.triu_indices(n, k=1)]
    # Per-pair clip: a pair pointing in opposite directions must not make up for a duplicate pair.
    return float(np.clip(np.mean(np.clip(1.0 - cos, 0.0, 1.0)), 0.0, 1.0))


# --- set / term rewards --------------------------------------------------------------------


def _not_a_string(value: object, what: str) -> None:
    # A bare str is a Collection[str] of characters: almost always a caller bug.
    if isinstance(value, str):
        raise TypeError(f"{what} must be a collection of strings, not a single str ({value[:40]!r})")


def coverage_reward(result_clusters: Sequence[Collection[str]], window_clusters: Collection[str]) -> float:
    """Share of the distinct window clusters present among the queries' result clusters.

    Empty cluster names are ignored (as in ``evaluation.metrics.interest_coverage``); 0.0 when
    the window has no cluster.
    """
    _not_a_string(window_clusters, "window_clusters")
    wanted = {c for c in window_clusters if c}
    if not wanted:
        return 0.0
    got: set[str] = set()
    for i, clusters in enumerate(result_clusters):
        _not_a_string(clusters, f"result_clusters[{i}]")
        got.update(clusters)
    return len(wanted & got) / len(wanted)


def specificity_reward(queries: Sequence[str], idf: Mapping[str, float], *, saturation: float = 2.0) -> float:
    """Mean over queries of ``min(1, sum of idf over the query's distinct terms / saturation)``.

    Terms missing from ``idf`` count 0 (they match nothing in the corpus); no queries score 0.
    """
    if not saturation > 0:  # also rejects NaN
        raise ValueError(f"saturation must be positive, got {saturation!r}")
    _not_a_string(queries, "queries")
    if not queries:
        return 0.0
    total = 0.0
    for query in queries:
        # Distinct terms: repeating a rare word ("bitcoin bitcoin bitcoin") must not pay.
        weights = (idf.get(t, 0.0) for t in dict.fromkeys(query_terms(query)))
        mass = sum(w if w > 0 else 0.0 for w in weights)  # NaN/negative idf count 0
        total += min(1.0, mass / saturation)
    return total / len(queries)


def utility_reward(ranked: Sequence[str], targets: Collection[str], k: int = 10) -> float:
    """recall@k of the held-out future clicks ``targets`` in the ranked recommendations."""
    if not _is_int(k) or k < 1:
        raise ValueError(f"k must be an int of at least 1, got {k!r}")
    _not_a_string(ranked, "ranked")
    _not_a_string(targets, "targets")
    return recall_at_k(ranked, targets, k)


def marginal_utility_reward(with_model: Sequence[str], without_model: Sequence[str], targets: Collection[str],
                            k: int = 10) -> float:
    """What the model adds: recall@k of the held-out clicks in the hybrid WITH the model's
    queries minus recall@k in the same hybrid WITHOUT them, in [-1, 1]. A model that only
    repeats what the signals, dense and trending channels find earns 0; one that pushes
    found clicks out of the top k is penalised."""
    return utility_reward(with_model, targets, k) - utility_reward(without_model, targets, k)


def composite_reward(scores: Mapping[str, float], weights: Mapping[str, float]) -> float:
    """Weighted mean of ``scores`` over the names with a positive weight."""
    used: dict[str, float] = {}
    for name, weight in weights.items():
        if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight >= 0):
            raise ValueError(f"weight of {name!r} must be a finite number >= 0, got {weight!r}")
        if weight > 0:
            used[name] = float(weight)
    if not used:
        raise ValueError(f"at least one weight must be positive, got {dict(weights)!r}")
    missing = [name for name in used if name not in scores]
    if missing:
        raise ValueError(f"no score for weighted reward(s) {missing}; got scores for {sorted(scores)}")
    bad = {name: scores[name] for name in used if not math.isfinite(scores[name])}
    if bad:
        raise ValueError(f"scores must be finite, got {bad}")
    values = [float(scores[name]) for name in used]
    mean = sum(w * v for w, v in zip(used.values(), values, strict=True)) / sum(used.values())
    # A weighted mean lies between its inputs; clamp away float rounding (1.0000000000000002).
    return min(max(mean, min(values)), max(values))
