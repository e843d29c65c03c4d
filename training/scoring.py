"""The I/O shell around ``training.rewards``: retrieval and embeddings for scoring completions.

``utility`` is the marginal gain of the model channel: recall of the held-out clicks in the
serving hybrid (signals, dense, trending and the completion's queries, weighted RRF) minus
recall in the same hybrid without the completion's queries.

One :class:`RewardScorer` per news corpus holds an in-process tantivy index, the MiniLM
embeddings of every article (computed once) and the corpus IDF. Scoring a batch of
completions parses each into queries, runs ALL queries of the batch in one search call,
embeds all distinct queries in one MiniLM call, then applies the pure reward functions.
Results are memoised by (completion, user) so the six TRL reward callables, which the
trainer calls one after another on the same completions, share one retrieval pass.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from index.dense import DenseIndex, MiniLMEmbedder, article_text
from index.embedded import EmbeddedEngine
from index.fusion import FusedItem
from streams.contracts import NewsArticle
from streams.settings import WorkerSettings, load
from streams.recommend import (
    Recall,
    RecommendConfig,
    TrendingView,
    channel_lists,
    fuse_user,
    parse_completion,
    user_lists,
)
from streams.window import UserState
from training.rewards import (
    FormatRules,
    align_reward,
    coverage_reward,
    diversity_reward,
    format_reward,
    marginal_utility_reward,
    normalized_idf,
    query_terms,
    specificity_reward,
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
    # The other channels' ranked ids for this user (signals, dense, trending): the hybrid the
    # model's queries are added to. They do not depend on the completion, so they are computed once.
    base: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def to_row(self) -> dict[str, Any]:
        return {"signal_texts": list(self.signal_texts), "clusters": list(self.clusters),
                "clicked": list(self.clicked), "targets": list(self.targets),
                # two flat columns: the TRL dataset (Arrow) wants one type per column
                "base_channels": [c for c, _ in self.base], "base_ids": [list(ids) for _, ids in self.base]}

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> UserContext:
        return cls(tuple(row["signal_texts"]), tuple(row["clusters"]), tuple(row.get("clicked") or ()),
                   tuple(row.get("targets") or ()),
                   tuple((c, tuple(ids)) for c, ids in zip(row.get("base_channels") or (), row.get("base_ids") or (),
                                                           strict=True)))

    def base_lists(self) -> dict[str, list[FusedItem]]:
        return {c: [FusedItem(n, "", 0.0, "", (c,)) for n in ids] for c, ids in self.base}


class RewardScorer:
    def __init__(self, news: Sequence[NewsArticle], *, config: RewardConfig | None = None,
                 embedder: MiniLMEmbedder | None = None, trending: TrendingView | None = None,
                 cache_size: int = 4096) -> None:
        if not news:
            raise ValueError("the reward scorer needs a non-empty news corpus")
        self.config = config or RewardConfig()
        started = time.perf_counter()
        self.embedder = embedder or load(WorkerSettings).minilm_embedder()
        self.engine = EmbeddedEngine()
        self.engine.upsert_sync(news)
        by_id = {a.news_id: a for a in news}  # a repeated id keeps its last row, like the index
        self.cluster_of = {nid: a.subcategory or a.category for nid, a in by_id.items()}
        self._row = {nid: i for i, nid in enumerate(by_id)}
        self._article_vecs = self.embedder.encode([article_text(a) for a in by_id.values()])
        self.dense = DenseIndex(self.embedder)  # the serving dense channel (article vectors come from the cache)
        self.dense.upsert_sync(list(by_id.values()))
        self.trending = trending
        doc_freq = Counter(t for a in by_id.values() for t in set(query_terms(article_text(a))))
        self.idf = normalized_idf(doc_freq, len(by_id))
        self._memo: OrderedDict[tuple[str, UserContext], dict[str, float]] = OrderedDict()
        self._memo_size = cache_size
        self.scoring_s = 0.0  # time spent scoring (for the "well under generation time" check)
        log.info("reward scorer ready: %d articles in %.1fs", len(by_id), time.perf_counter() - started)

    def close(self) -> None:
        self.engine.close_sync()

    # -- user contexts ---------------------------------------------------------------------
    def context(self, state: UserState, *, prompt_signals: int, targets: Sequence[str] = (),
                utility: bool = True) -> UserContext:
        """A user's reward context from the worker's window state (``utility`` False: without the
        other channels' lists, which only the utility reward reads, e.g. for test-time selection).

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
                           self._base(state) if utility else ())

    def _base(self, state: UserState) -> tuple[tuple[str, tuple[str, ...]], ...]:
        """The user's non-model channel lists, through the serving ``channel_lists``."""
        rc = self.config.recommend
        others = [c for c in rc.weights if c != "model"]
        if not others:
            return ()
        recall = Recall(self.engine, self.dense, self.trending)
        lists = asyncio.run(channel_lists(recall, [state], [[]], rc.only(*others), k=rc.channel_depth))[0]
        return tuple((c, tuple(i.news_id for i in items)) for c, items in lists.items() if c != "model")

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
        flat = [q for qs in queries for q in qs]
        results = self.engine.search_many_sync(flat, k=rc.results_per_query) if flat else []
        distinct = list(dict.fromkeys(flat))
        vec_of = dict(zip(distinct, self.embedder.encode(distinct), strict=True)) if distinct else {}
        out, offset = [], 0
        for completion, qs, ctx in zip(completions, queries, contexts, strict=True):
            hits = results[offset: offset + len(qs)]
            offset += len(qs)
            qvecs = np.stack([vec_of[q] for q in qs]) if qs else np.zeros((0, self.embedder.dim), np.float32)
            rvecs = [self._article_vecs[[self._row[h.news_id] for h in hs]] for hs in hits]
            base = ctx.base_lists()
            model = user_lists(qs, hits, [], [], rc.channel_depth)["model"]
            with_model = fuse_user(base | {"model": model}, rc, ctx.clicked)
            without = fuse_user(base, rc, ctx.clicked)
            out.append({
                "align": align_reward(qvecs, rvecs),
                "coverage": coverage_reward([{self.cluster_of[h.news_id] for h in hs} for hs in hits], ctx.clusters),
                "specificity": specificity_reward(qs, self.idf, saturation=cfg.specificity_saturation),
                "diversity": diversity_reward(qvecs),
                "format": format_reward(completion, ctx.signal_texts, cfg.format),
                "utility": (marginal_utility_reward([i.news_id for i in with_model], [i.news_id for i in without],
                                                    ctx.targets, rc.items_per_user) if ctx.targets else 0.0),
            })
        return out
