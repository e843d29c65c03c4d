"""Recommendation methods the evaluation harness compares, all on the same serving path.

Two kinds:

- *query* methods write each user's query list; the harness then retrieves with
  ``streams.recommend.retrieve`` (one batched search, RRF, click exclusion, back-fill),
  exactly like the worker. ``lexical`` (recent signal texts verbatim) and ``llm`` (any
  ONNX model via ``streams.recommend.generate_queries``) are query methods.
- *ranking* methods rank news ids directly, without search: ``popular``.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

from streams.contracts import NewsArticle, UserEvent
from streams.recommend import QueryModel, RecommendConfig, generate_queries, signal_queries
from streams.window import UserState

log = logging.getLogger(__name__)

BOOTSTRAP_SUBDIR = ("models", "smollm2-bootstrap")  # where the demo keeps it, under the newsrec cache


@runtime_checkable
class QueryMethod(Protocol):
    name: str
    version: str | None
    kind: Literal["queries"]

    def queries(self, states: Sequence[UserState], cfg: RecommendConfig, *, now: datetime | None = None
                ) -> list[list[str]]: ...


@runtime_checkable
class RankingMethod(Protocol):
    name: str
    version: str | None
    kind: Literal["ranking"]

    def rank(self, states: Sequence[UserState], cfg: RecommendConfig) -> list[list[str]]: ...


Method = QueryMethod | RankingMethod


class LexicalBaseline:
    """The user's most recent signal texts, verbatim, as queries (as many as the model may write)."""

    name = "lexical"
    version: str | None = None
    kind: Literal["queries"] = "queries"

    def queries(self, states: Sequence[UserState], cfg: RecommendConfig, *, now: datetime | None = None
                ) -> list[list[str]]:
        return [signal_queries(s, cfg.max_queries) for s in states]


class PopularBaseline:
    """No queries: news ranked by history clicks across all users (``news_click`` events with
    a news_id), ties broken by recency: ``published_at`` when known, else later rows of
    news.tsv count as newer. With no clicks at all it is a pure recency ranking.
    Each user's own remembered clicks (``UserState.clicked``, as the worker excludes) are dropped.
    """

    name = "popular"
    version: str | None = None
    kind: Literal["ranking"] = "ranking"

    def __init__(self, news: Sequence[NewsArticle], events: Mapping[str, Sequence[UserEvent]]) -> None:
        known = {a.news_id for a in news}
        clicks = Counter(e.news_id for evs in events.values() for e in evs
                         if e.domain == "news_click" and e.news_id in known)
        position = {a.news_id: i for i, a in enumerate(news)}  # a repeated id keeps its last row
        published = {a.news_id: a.published_at.timestamp() for a in news if a.published_at is not None}
        self.clicks = clicks
        self.order = sorted(position, key=lambda n: (-clicks[n], -published.get(n, float("-inf")), -position[n]))

    def rank(self, states: Sequence[UserState], cfg: RecommendConfig) -> list[list[str]]:
        out = []
        for state in states:
            clicked = set(state.clicked)
            ranked: list[str] = []
            for news_id in self.order:
                if news_id not in clicked:
                    ranked.append(news_id)
                    if len(ranked) == cfg.items_per_user:
                        break
            out.append(ranked)
        return out


class LLMQueries:
    """Queries written by a causal LM through the serving path's ``generate_queries``."""

    kind: Literal["queries"] = "queries"

    def __init__(self, model: QueryModel, name: str | None = None) -> None:
        self.model = model
        self.version = model.version
        self.name = name or f"llm:{model.version or 'unversioned'}"

    @classmethod
    def from_dir(cls, model_dir: Path, name: str | None = None, *, intra_op_threads: int | None = None) -> LLMQueries:
        from models.runtime import OnnxCausalLM

        return cls(OnnxCausalLM(model_dir, intra_op_threads=intra_op_threads,
                                max_queries=RecommendConfig.from_settings().max_queries), name)

    def queries(self, states: Sequence[UserState], cfg: RecommendConfig, *, now: datetime | None = None
                ) -> list[list[str]]:
        return generate_queries(self.model, states, cfg, now=now)




def bootstrap_model_dir() -> Path:
    """The zero-shot SmolLM2 ONNX export in the newsrec cache, exported on first use (~30 s)."""
    from models.bootstrap import bootstrap, default_cache_dir

    model_dir = default_cache_dir().joinpath(*BOOTSTRAP_SUBDIR)
    bootstrap(model_dir)  # a no-op when a verified copy is there
    return model_dir


def onnx_model_dir(spec: str | Path) -> Path:
    """``bootstrap`` (the packaged zero-shot SmolLM2, exported on first use) or a model directory."""
    return bootstrap_model_dir() if str(spec) == "bootstrap" else Path(spec)


def resolve_method(spec: str, news: Sequence[NewsArticle], events: Mapping[str, Sequence[UserEvent]],
                   *, intra_op_threads: int | None = None) -> Method:
    """``lexical`` | ``popular`` | ``bootstrap`` (prompt-only SmolLM2) | an ONNX model directory."""
    if spec == "lexical":
        return LexicalBaseline()
    if spec == "popular":
        return PopularBaseline(news, events)
    if spec == "bootstrap":
        return LLMQueries.from_dir(bootstrap_model_dir(), "prompt-only SmolLM2-135M", intra_op_threads=intra_op_threads)
    path = Path(spec)
    if not path.is_dir():
        raise ValueError(f"unknown method {spec!r}: expected lexical, popular, bootstrap or an ONNX model directory")
    return LLMQueries.from_dir(path, None, intra_op_threads=intra_op_threads)
