"""The recommendation path shared by the worker and offline evaluation:
window → prompt → model → query list → one batched search → RRF per user.

The model call is synchronous (the worker runs it in a thread); retrieval is async
because the Elasticsearch engine is.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any, Protocol

from index.base import Hit, SearchEngine
from index.fusion import FusedItem, rrf_fuse
from models.prompt import build_prompt, parse_queries, sanitize_text
from streams.settings import WorkerSettings, load
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
    # Recent signal texts back-fill users whose model queries find too few items.
    backfill_signals: int = _setting("backfill_signals")

    @classmethod
    def from_settings(cls, settings: WorkerSettings | None = None) -> RecommendConfig:
        """The configured limits: from ``settings``, or (offline) from ``NEWSREC_*`` as the worker reads them."""
        settings = settings if settings is not None else load(WorkerSettings)
        return cls(**{f.name: getattr(settings, f.name) for f in fields(cls)})


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


def fuse_user(queries: Sequence[str], hits: Sequence[Sequence[Hit]], backfill: Sequence[str],
              backfill_hits: Sequence[Sequence[Hit]], cfg: RecommendConfig,
              clicked: Collection[str] = ()) -> list[FusedItem]:
    """One user's items: RRF over the model queries' results, back-filled from the signal
    queries' results when too few, minus what the user already clicked. Pure."""
    clicked = set(clicked)
    items = rrf_fuse(queries, hits, limit=cfg.items_per_user, exclude=clicked)
    if len(items) < cfg.items_per_user and backfill:
        have = {i.news_id for i in items}
        extra = rrf_fuse(backfill, backfill_hits, limit=cfg.items_per_user, exclude=clicked)
        items += [i for i in extra if i.news_id not in have][: cfg.items_per_user - len(items)]
    return items


async def retrieve(engine: SearchEngine, states: Sequence[UserState], queries: Sequence[Sequence[str]],
                   cfg: RecommendConfig) -> list[list[FusedItem]]:
    """All users' queries (plus back-fill queries) in ONE search call, then :func:`fuse_user`."""
    backfill = [signal_queries(s, cfg.backfill_signals) for s in states]
    groups = [list(q) for q in queries] + backfill
    flat = [q for qs in groups for q in qs]
    results = await engine.search_many(flat, k=cfg.results_per_query) if flat else []
    per_group, offset = [], 0
    for qs in groups:
        per_group.append(results[offset: offset + len(qs)])
        offset += len(qs)
    return [fuse_user(groups[n], per_group[n], backfill[n], per_group[len(states) + n], cfg, state.clicked)
            for n, state in enumerate(states)]
