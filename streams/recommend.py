"""The recommendation path shared by the worker, offline evaluation and the training rewards.

Recall channels, each a ranked list per user, fused by weighted RRF (``index.fusion``):

- ``signals``: the user's most recent signal texts as lexical queries;
- ``model``: the model's queries (window → prompt → model → query list);
- ``dense``: the MiniLM profile (mean of recent signal embeddings) against article vectors;
- ``trending``: smoothed click-through rate over all users' recent clicks and shows.

The model only adds: every other channel works without it, so a user always gets the
signals' items (and a cold user the trending ones). Both lexical channels share ONE search
call per batch. :func:`recommend` fills a feed; :func:`rank` orders a given candidate set
(``POST /rank``, the impression protocol of ``newsrec eval``).

The model call is synchronous (the worker runs it in a thread); retrieval is async
because the Elasticsearch engine is.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, fields
from dataclasses import replace as _replace
from datetime import datetime
from typing import Any, Protocol

import numpy as np

from index.base import Hit, SearchEngine
from index.dense import DenseIndex
from index.fusion import FusedItem, fuse_channels, rrf_fuse
from models.prompt import build_prompt, parse_queries, sanitize_text
from streams.ranker import ContentVectors, LearnedRanker, clicked_centroid
from streams.settings import CHANNELS, WorkerSettings, load
from streams.trending import Popularity, TrendingCounter, TrendingScores
from streams.window import UserState

# Longer model items are cut (at a word boundary) to this many characters.
QUERY_MAX_CHARS = 120


def _setting(name: str) -> Any:
    return WorkerSettings.model_fields[name].default


class QueryModel(Protocol):
    version: str | None

    def generate(self, prompts: Sequence[str], *, max_new_tokens: int) -> list[str]: ...


@dataclass(frozen=True, slots=True)
class RecommendConfig:
    """The limits of the recommendation path. One source: ``WorkerSettings`` (its defaults
    here; :meth:`from_settings` for the configured values), so the worker, the evaluation
    and the trainers' rewards never disagree."""

    max_queries: int = _setting("max_queries")
    max_new_tokens: int = _setting("max_new_tokens")
    prompt_signals: int = _setting("prompt_signals")
    results_per_query: int = _setting("results_per_query")
    items_per_user: int = _setting("items_per_user")
    signal_queries: int = _setting("signal_queries")
    dense_signals: int = _setting("dense_signals")
    channel_depth: int = _setting("channel_depth")
    # (channel, weight) pairs: hashable, so the config can key caches.
    channel_weights: tuple[tuple[str, float], ...] = tuple(
        WorkerSettings.model_fields["channel_weights"].default_factory().items())  # type: ignore[misc]

    @classmethod
    def from_settings(cls, settings: WorkerSettings | None = None) -> RecommendConfig:
        """The configured limits: from ``settings``, or (offline) from ``NEWSREC_*`` as the worker reads them."""
        settings = settings if settings is not None else load(WorkerSettings)
        values = {f.name: getattr(settings, f.name) for f in fields(cls)}
        values["channel_weights"] = tuple(settings.channel_weights.items())
        return cls(**values)

    @property
    def weights(self) -> dict[str, float]:
        return {c: w for c, w in self.channel_weights if w > 0}

    def only(self, *channels: str) -> RecommendConfig:
        """The same limits with only ``channels`` on (at weight 1 unless already weighted)."""
        unknown = set(channels) - set(CHANNELS)
        if unknown:
            raise ValueError(f"unknown channel(s) {sorted(unknown)}: use {list(CHANNELS)}")
        current = dict(self.channel_weights)
        return _replace(self, channel_weights=tuple((c, current.get(c) or 1.0) for c in channels))

    def without(self, channel: str) -> RecommendConfig:
        return self.only(*(c for c in self.weights if c != channel))


def user_prompt(state: UserState, cfg: RecommendConfig, now: datetime | None = None) -> str:
    """The model prompt for one user's window: the worker's, the evaluator's and the trainers'."""
    return build_prompt(state.signals[: cfg.prompt_signals], now=now, max_queries=cfg.max_queries,
                        max_signals=cfg.prompt_signals)


def parse_completion(text: str, cfg: RecommendConfig) -> list[str]:
    """The query list in one model completion, with the serving limits."""
    return parse_queries(text, max_queries=cfg.max_queries, max_chars=QUERY_MAX_CHARS)


def generate_queries(model: QueryModel, states: Sequence[UserState], cfg: RecommendConfig,
                     now: datetime | None = None) -> list[list[str]]:
    """One model call for all users: each user's query list (possibly empty).

    ``now`` dates the signals' ages in the prompt (offline: the dataset's cutoff)."""
    prompts = [user_prompt(s, cfg, now=now) for s in states]
    texts = model.generate(prompts, max_new_tokens=cfg.max_new_tokens)
    return [parse_completion(t, cfg) for t in texts]


def signal_queries(state: UserState, n: int) -> list[str]:
    """The user's most recent signal texts as queries, sanitised like prompt lines: they are
    published in each item's ``query``, so raw control characters or ChatML markers from
    untrusted text must not reach consumers (a signal that sanitises to nothing is skipped)."""
    cleaned = (sanitize_text(s.text) for s in state.signals[:n])
    return [q for q in cleaned if q]


@dataclass(frozen=True)
class TrendingView:
    """Trending scores at one moment (all users' recent clicks and shows) and the titles to
    publish them with; built by the worker from its windowed tables, offline from earlier
    impressions."""

    scores: Mapping[str, float] = field(default_factory=dict)
    titles: Mapping[str, str] = field(default_factory=dict)
    popularity: Mapping[str, Popularity] = field(default_factory=dict)  # the counts behind the scores
    now: float = 0.0  # epoch seconds the view was taken at
    unseen: float = 0.0  # the score of an article with no clicks or shows (the prior CTR)

    @classmethod
    def at(cls, counter: TrendingCounter, now: datetime, titles: Mapping[str, str] | None = None) -> TrendingView:
        """The counter's view at ``now``; it reads the counter live (no copy), so take it, use it
        and drop it before the counter changes (per batch, per impression)."""
        popularity, prior = counter.popularity(now), counter.prior(now)
        return cls(TrendingScores(popularity, prior), titles or {}, popularity, now.timestamp(), prior or 0.0)

    def among(self, candidates: Sequence[str]) -> TrendingView:
        """The view over a candidate set: an unseen candidate scores the prior, so it ranks above
        articles shown often and rarely clicked, and below those clicked more than usual."""
        return TrendingView({n: self.scores[n] if n in self.scores else self.unseen for n in candidates},
                            self.titles, self.popularity, self.now, self.unseen)

    def top(self, k: int, exclude: Collection[str] = ()) -> list[FusedItem]:
        ranked = sorted((n for n in self.scores if n not in exclude), key=lambda n: (-self.scores[n], n))[:k]
        return [FusedItem(n, self.titles.get(n, ""), round(self.scores[n], 6), "trending", ("trending",))
                for n in ranked]


@dataclass
class Recall:
    """The I/O edges of the channels: the lexical engine, and optionally the dense index
    (with its embedder) and the current trending view."""

    engine: SearchEngine
    dense: DenseIndex | None = None
    trending: TrendingView | None = None


def _tag(items: Sequence[FusedItem], channel: str) -> list[FusedItem]:
    return [FusedItem(i.news_id, i.title, i.score, i.query, (channel,)) for i in items]


def user_lists(model_queries: Sequence[str], model_hits: Sequence[Sequence[Hit]], signal_qs: Sequence[str],
               signal_hits: Sequence[Sequence[Hit]], depth: int) -> dict[str, list[FusedItem]]:
    """The two lexical channels of one user: RRF over each channel's queries. Pure."""
    return {"model": _tag(rrf_fuse(model_queries, model_hits, limit=depth), "model"),
            "signals": _tag(rrf_fuse(signal_qs, signal_hits, limit=depth), "signals")}


def fuse_user(lists: Mapping[str, Sequence[FusedItem]], cfg: RecommendConfig,
              clicked: Collection[str] = ()) -> list[FusedItem]:
    """One user's feed: weighted RRF of the channel lists, minus what the user clicked. Pure."""
    return fuse_channels(lists, cfg.weights, limit=cfg.items_per_user, exclude=set(clicked))


def dense_profiles(dense: DenseIndex, states: Sequence[UserState], n: int) -> tuple[np.ndarray, list[list[str]],
                                                                                     list[np.ndarray]]:
    """Each user's profile (unit mean of the embeddings of the ``n`` most recent signals;
    zeros without signals), the signal texts, and their embeddings (to name the signal
    closest to an item). A signal about an indexed article (a click, a show) uses that
    article's stored vector; only other texts are embedded, all users' in one call."""
    per_signal: list[list[tuple[str, str | None]]] = []
    for state in states:
        rows = [(sanitize_text(s.text), s.news_id if s.news_id and dense.has(s.news_id) else None)
                for s in state.signals[:n]]
        per_signal.append([(t, nid) for t, nid in rows if t])
    to_embed = list(dict.fromkeys(t for rows in per_signal for t, nid in rows if nid is None))
    encoded = dict(zip(to_embed, dense.embedder.encode(to_embed), strict=True)) if to_embed else {}
    dim = dense.embedder.dim
    profiles = np.zeros((len(states), dim), np.float32)
    texts, per_user = [], []
    for u, rows in enumerate(per_signal):
        stored = dense.vectors_of([nid for _, nid in rows if nid is not None])
        it = iter(stored)
        v = np.stack([next(it) if nid is not None else encoded[t] for t, nid in rows]) if rows \
            else np.zeros((0, dim), np.float32)
        texts.append([t for t, _ in rows])
        per_user.append(v)
        if len(rows):
            mean = v.mean(axis=0)
            profiles[u] = mean / max(float(np.linalg.norm(mean)), 1e-9)
    return profiles, texts, per_user


def _dense_items(dense: DenseIndex, hits: Sequence[Hit], texts: Sequence[str], vecs: np.ndarray) -> list[FusedItem]:
    if not hits:
        return []
    closest = (dense.vectors_of([h.news_id for h in hits]) @ vecs.T).argmax(axis=1)
    return [FusedItem(h.news_id, h.title, round(h.score, 6), texts[int(j)], ("dense",))
            for h, j in zip(hits, closest, strict=True)]


async def channel_lists(recall: Recall, states: Sequence[UserState], queries: Sequence[Sequence[str]],
                        cfg: RecommendConfig, *, k: int, candidates: Sequence[Sequence[str]] | None = None,
                        timings: dict[str, float] | None = None) -> list[dict[str, list[FusedItem]]]:
    """Every enabled channel's ranked list per user (top ``k``; within ``candidates[u]`` when given).

    Both lexical channels go out in ONE search call. ``timings``, when given, receives the
    seconds spent per edge (``lexical``, ``dense``, ``trending``), for the worker's metrics."""
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        if timings is not None:
            now = time.perf_counter()
            timings[name] = timings.get(name, 0.0) + now - clock
            clock = now

    on = cfg.weights
    model_qs = [list(q) if "model" in on else [] for q in queries]
    signal_qs = [signal_queries(s, cfg.signal_queries) if "signals" in on else [] for s in states]
    groups = model_qs + signal_qs
    flat = [q for qs in groups for q in qs]
    within = None
    if candidates is not None:
        within = [list(candidates[u % len(states)]) for u, qs in enumerate(groups) for _ in qs]
    results = await recall.engine.search_many(flat, k=k, within=within) if flat else []
    per_group, offset = [], 0
    for qs in groups:
        per_group.append(results[offset: offset + len(qs)])
        offset += len(qs)
    lists = [user_lists(model_qs[u], per_group[u], signal_qs[u], per_group[len(states) + u], k)
             for u in range(len(states))]
    lap("lexical")
    if "dense" in on and recall.dense is not None and recall.dense.count_sync():
        profiles, texts, vecs = dense_profiles(recall.dense, states, cfg.dense_signals)
        live = [u for u in range(len(states)) if texts[u]]
        found = recall.dense.search_vectors_sync(
            profiles[live], k=k, within=[candidates[u] for u in live] if candidates is not None else None)
        for u, hits in zip(live, found, strict=True):
            lists[u]["dense"] = _dense_items(recall.dense, hits, texts[u], vecs[u])
        lap("dense")
    if "trending" in on and recall.trending is not None:
        for u in range(len(states)):
            view = recall.trending if candidates is None else recall.trending.among(candidates[u])
            lists[u]["trending"] = view.top(k)
        lap("trending")
    return lists


async def recommend(recall: Recall, states: Sequence[UserState], queries: Sequence[Sequence[str]],
                    cfg: RecommendConfig, *, timings: dict[str, float] | None = None) -> list[list[FusedItem]]:
    """Each user's feed: every channel's top ``channel_depth``, fused (:func:`fuse_user`)."""
    lists = await channel_lists(recall, states, queries, cfg, k=cfg.channel_depth, timings=timings)
    return [fuse_user(lists[u], cfg, state.clicked) for u, state in enumerate(states)]


async def retrieve(engine: SearchEngine, states: Sequence[UserState], queries: Sequence[Sequence[str]],
                   cfg: RecommendConfig) -> list[list[FusedItem]]:
    """:func:`recommend` with the lexical channels only (one engine, no dense or trending edge)."""
    return await recommend(Recall(engine), states, queries, cfg)


def order_candidates(lists: Mapping[str, Sequence[FusedItem]], candidates: Sequence[str],
                     cfg: RecommendConfig) -> list[FusedItem]:
    """All ``candidates`` ordered by weighted RRF of the channel lists; those no channel
    found follow in the given order with score 0 and no channel. Pure."""
    fused = fuse_channels(lists, cfg.weights, limit=len(candidates))
    seen = {i.news_id for i in fused}
    return fused + [FusedItem(n, "", 0.0, "", ()) for n in dict.fromkeys(candidates) if n not in seen]


def content_vectors(dense: DenseIndex | None, states: Sequence[UserState], candidates: Sequence[Sequence[str]],
                    popularity: Mapping[str, Popularity]) -> list[ContentVectors | None]:
    """Per user, the MiniLM vectors behind the learned fusion's content features: the
    candidates' stored vectors (zeros for one not indexed), every window signal's (as in
    :func:`dense_profiles`) and the centroid of the indexed articles clicked in ``popularity``.
    None per user without a dense index."""
    if dense is None or not dense.count_sync():
        return [None] * len(states)
    _, _, signal_vecs = dense_profiles(dense, states, max((len(s.signals) for s in states), default=0))
    clicked = [n for n, p in popularity.items() if p.clicks > 0 and dense.has(n)]
    centroid = clicked_centroid(dense.vectors_of(clicked), [popularity[n].clicks for n in clicked])
    out: list[ContentVectors | None] = []
    for cands, vecs in zip(candidates, signal_vecs, strict=True):
        rows = np.zeros((len(cands), dense.embedder.dim), np.float32)
        known = [i for i, n in enumerate(cands) if dense.has(n)]
        if known:
            rows[known] = dense.vectors_of([cands[i] for i in known])
        out.append(ContentVectors(rows, vecs, centroid))
    return out


async def rank(recall: Recall, states: Sequence[UserState], queries: Sequence[Sequence[str]],
               candidates: Sequence[Sequence[str]], cfg: RecommendConfig, *, ranker: LearnedRanker | None = None,
               categories: Mapping[str, tuple[str, str]] | None = None) -> list[list[FusedItem]]:
    """Each user's candidate set, ordered by the same channels as the feed: fused by weighted
    RRF, or by a learned ``ranker`` over the channels' scores (``categories``: news_id ->
    (category, subcategory), for its profile features)."""
    if len(candidates) != len(states):
        raise ValueError(f"{len(candidates)} candidate sets for {len(states)} users")
    candidates = [list(dict.fromkeys(c)) for c in candidates]
    depth = max((len(c) for c in candidates), default=1) or 1
    lists = await channel_lists(recall, states, queries, cfg, k=depth, candidates=candidates)
    if ranker is None:
        return [order_candidates(lists[u], candidates[u], cfg) for u in range(len(states))]
    view = recall.trending or TrendingView()
    content = content_vectors(recall.dense, states, candidates, view.popularity)
    return [ranker.order(lists[u], candidates[u], view.popularity, view.now, categories=categories,
                         history=[s.news_id for s in states[u].signals if s.news_id], content=content[u],
                         queried=bool(queries[u]))
            for u in range(len(states))]
