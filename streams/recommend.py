"""The recommendation path shared by the worker and offline evaluation:
window → prompt → model → query list → one batched search → RRF per user.

The model call is synchronous (the worker runs it in a thread); retrieval is async
because the Elasticsearch engine is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from index.base import SearchEngine
from models.prompt import build_prompt, parse_queries, sanitize_text
from streams.fusion import FusedItem, rrf_fuse
from streams.window import UserState


class QueryModel(Protocol):
    version: str | None

    def generate(self, prompts: Sequence[str], *, max_new_tokens: int) -> list[str]: ...


@dataclass(frozen=True, slots=True)
class RecommendConfig:
    max_queries: int = 5
    max_new_tokens: int = 48
    prompt_signals: int = 20
    results_per_query: int = 10
    items_per_user: int = 10
    # Recent signal texts back-fill users whose model queries find too few items.
    backfill_signals: int = 2


def user_prompt(state: UserState, cfg: RecommendConfig, now: datetime | None = None) -> str:
    """The model prompt for one user's window: the worker's, the evaluator's and the trainers'."""
    return build_prompt(state.signals[: cfg.prompt_signals], now=now, max_queries=cfg.max_queries)


def generate_queries(model: QueryModel, states: Sequence[UserState], cfg: RecommendConfig,
                     now: datetime | None = None) -> list[list[str]]:
    """One model call for all users: each user's query list (possibly empty).

    ``now`` dates the signals' ages in the prompt (offline: the dataset's cutoff)."""
    prompts = [user_prompt(s, cfg, now=now) for s in states]
    texts = model.generate(prompts, max_new_tokens=cfg.max_new_tokens)
    return [parse_queries(t, max_queries=cfg.max_queries) for t in texts]


def signal_queries(state: UserState, n: int) -> list[str]:
    """The user's most recent signal texts as queries, sanitised like prompt lines: they are
    published in each item's ``query``, so raw control characters or ChatML markers from
    untrusted text must not reach consumers (a signal that sanitises to nothing is skipped)."""
    cleaned = (sanitize_text(s.text) for s in state.signals[:n])
    return [q for q in cleaned if q]


async def retrieve(engine: SearchEngine, states: Sequence[UserState], queries: Sequence[Sequence[str]],
                   cfg: RecommendConfig) -> list[list[FusedItem]]:
    """All users' queries (plus back-fill queries) in ONE search call, then RRF per user,
    dropping what the user already clicked."""
    backfill = [signal_queries(s, cfg.backfill_signals) for s in states]
    groups = [list(q) for q in queries] + backfill
    flat = [q for qs in groups for q in qs]
    results = await engine.search_many(flat, k=cfg.results_per_query) if flat else []
    per_group, offset = [], 0
    for qs in groups:
        per_group.append(results[offset: offset + len(qs)])
        offset += len(qs)
    fused = []
    for n, state in enumerate(states):
        clicked = set(state.clicked)
        items = rrf_fuse(groups[n], per_group[n], limit=cfg.items_per_user, exclude=clicked)
        if len(items) < cfg.items_per_user and backfill[n]:
            have = {i.news_id for i in items}
            extra = rrf_fuse(backfill[n], per_group[len(states) + n], limit=cfg.items_per_user, exclude=clicked)
            items += [i for i in extra if i.news_id not in have][: cfg.items_per_user - len(items)]
        fused.append(items)
    return fused
