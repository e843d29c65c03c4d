"""The I/O shell around ``training.rewards``: retrieval and embeddings for scoring completions.

One :class:`RewardScorer` per news corpus holds an in-process tantivy index, the MiniLM
embeddings of every article (computed once) and the corpus IDF. Scoring a batch of
completions parses each into queries, runs ALL queries of the batch in one search call,
embeds all distinct queries in one MiniLM call, then applies the pure reward functions.
Results are memoised by (completion, user) so the six TRL reward callables, which the
trainer calls one after another on the same completions, share one retrieval pass.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from index.dense import MiniLMEmbedder, article_text
from index.embedded import EmbeddedEngine
from streams.contracts import NewsArticle
from streams.recommend import RecommendConfig, fuse_user, parse_completion, signal_queries, user_lists
from streams.window import UserState
from training.rewards import (
    FormatRules,
    align_reward,
    coverage_reward,
    diversity_reward,
    format_reward,
    normalized_idf,
    query_terms,
    specificity_reward,
    utility_reward,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RewardConfig:
    # The serving limits (one source, WorkerSettings): queries are parsed, searched
    # (top results_per_query: align and coverage, the paper's top-10) and fused exactly as
    # the worker does; utility is Recall@items_per_user of the held-out clicks.
    recommend: RecommendConfig = field(default_factory=RecommendConfig.from_settings)
    specificity_saturation: float = 2.0
    format: FormatRules = field(default_factory=FormatRules)

    def __post_init__(self) -> None:
        if self.specificity_saturation <= 0:
            raise ValueError("specificity_saturation must be positive (it is the IDF mass that counts as fully specific)")


@dataclass(frozen=True)
class UserContext:
    """What the rewards know about one user: never the prompt's rendering, only its inputs."""

    signal_texts: tuple[str, ...]  # the window's signals as the prompt shows them
    clusters: tuple[str, ...]  # the window's distinct interest clusters (coverage)
    clicked: tuple[str, ...] = ()  # excluded from the utility ranking, as the worker does
    targets: tuple[str, ...] = ()  # held-out future clicks (utility); empty at inference time
    signal_queries: tuple[str, ...] = ()  # the worker's signals-channel queries for this user

    def to_row(self) -> dict[str, list[str]]:
        return {"signal_texts": list(self.signal_texts), "clusters": list(self.clusters),
                "clicked": list(self.clicked), "targets": list(self.targets), "signal_queries": list(self.signal_queries)}

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> UserContext:
        return cls(tuple(row["signal_texts"]), tuple(row["clusters"]), tuple(row.get("clicked") or ()),
                   tuple(row.get("targets") or ()), tuple(row.get("signal_queries") or ()))


class RewardScorer:
    def __init__(self, news: Sequence[NewsArticle], *, config: RewardConfig | None = None,
                 embedder: MiniLMEmbedder | None = None, cache_size: int = 4096) -> None:
        if not news:
            raise ValueError("the reward scorer needs a non-empty news corpus")
        self.config = config or RewardConfig()
        started = time.perf_counter()
        self.embedder = embedder or MiniLMEmbedder()
        self.engine = EmbeddedEngine()
        self.engine.upsert_sync(news)
        by_id = {a.news_id: a for a in news}  # a repeated id keeps its last row, like the index
        self.cluster_of = {nid: a.subcategory or a.category for nid, a in by_id.items()}
        self._row = {nid: i for i, nid in enumerate(by_id)}
        self._article_vecs = self.embedder.encode([article_text(a) for a in by_id.values()])
        doc_freq = Counter(t for a in by_id.values() for t in set(query_terms(article_text(a))))
        self.idf = normalized_idf(doc_freq, len(by_id))
        self._memo: OrderedDict[tuple[str, UserContext], dict[str, float]] = OrderedDict()
        self._memo_size = cache_size
        self.scoring_s = 0.0  # time spent scoring (for the "well under generation time" check)
        log.info("reward scorer ready: %d articles in %.1fs", len(by_id), time.perf_counter() - started)

    def close(self) -> None:
        self.engine.close_sync()

    # -- user contexts ---------------------------------------------------------------------
    def context(self, state: UserState, *, prompt_signals: int, targets: Sequence[str] = ()) -> UserContext:
        """A user's reward context from the worker's window state.

        Interest clusters come from the signals themselves: a clicked article's own
        subcategory, else the subcategory of the article the signal's text retrieves first.
        """
        signals = state.signals[:prompt_signals]
        texts = [s.text for s in signals]
        top1 = self.engine.search_many_sync([s.text for s in signals if s.news_id not in self.cluster_of], k=1)
        hits = iter(top1)
        clusters: list[str] = []
        for s in signals:
            if s.news_id in self.cluster_of:
                clusters.append(self.cluster_of[s.news_id])
            elif best := next(hits):
                clusters.append(self.cluster_of[best[0].news_id])
        return UserContext(tuple(texts), tuple(dict.fromkeys(clusters)), tuple(state.clicked), tuple(targets),
                           tuple(signal_queries(state, self.config.recommend.signal_queries)))

    # -- scoring ---------------------------------------------------------------------------
    def score(self, completions: Sequence[str], contexts: Sequence[UserContext]) -> list[dict[str, float]]:
        """Every reward of every completion (one dict per completion, keys ``REWARD_NAMES``)."""
        if len(completions) != len(contexts):
            raise ValueError(f"{len(completions)} completions but {len(contexts)} user contexts")
        todo = [i for i, key in enumerate(zip(completions, contexts, strict=True)) if key not in self._memo]
        if todo:
            started = time.perf_counter()
            for i, scores in zip(todo, self._score_uncached([completions[i] for i in todo],
                                                            [contexts[i] for i in todo]), strict=True):
                self._memo[(completions[i], contexts[i])] = scores
            while len(self._memo) > self._memo_size:
                self._memo.popitem(last=False)
            self.scoring_s += time.perf_counter() - started
        return [self._memo[(c, u)] for c, u in zip(completions, contexts, strict=True)]

    def _score_uncached(self, completions: Sequence[str], contexts: Sequence[UserContext]) -> list[dict[str, float]]:
        cfg, rc = self.config, self.config.recommend
        queries = [parse_completion(c, rc) for c in completions]
        groups = queries + [list(ctx.signal_queries) for ctx in contexts]
        flat = [q for qs in groups for q in qs]
        results = self.engine.search_many_sync(flat, k=rc.results_per_query) if flat else []
        per_group, offset = [], 0
        for qs in groups:
            per_group.append(results[offset: offset + len(qs)])
            offset += len(qs)
        distinct = list(dict.fromkeys(q for qs in queries for q in qs))
        vec_of = dict(zip(distinct, self.embedder.encode(distinct), strict=True)) if distinct else {}
        out = []
        for n, (completion, qs, ctx) in enumerate(zip(completions, queries, contexts, strict=True)):
            hits = per_group[n]
            qvecs = np.stack([vec_of[q] for q in qs]) if qs else np.zeros((0, self.embedder.dim), np.float32)
            rvecs = [self._article_vecs[[self._row[h.news_id] for h in hs]] for hs in hits]
            lists = user_lists(qs, hits, ctx.signal_queries, per_group[len(completions) + n], rc.channel_depth)
            fused = fuse_user(lists, rc, ctx.clicked)
            out.append({
                "align": align_reward(qvecs, rvecs),
                "coverage": coverage_reward([{self.cluster_of[h.news_id] for h in hs} for hs in hits], ctx.clusters),
                "specificity": specificity_reward(qs, self.idf, saturation=cfg.specificity_saturation),
                "diversity": diversity_reward(qvecs),
                "format": format_reward(completion, ctx.signal_texts, cfg.format),
                "utility": (utility_reward([i.news_id for i in fused], ctx.targets, rc.items_per_user)
                            if ctx.targets else 0.0),
            })
        return out
