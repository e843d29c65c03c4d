"""Offline evaluation harness: a dataset directory in, ranking metrics per method out.

For every target user it replays their events through ``streams.window.apply_event`` (the
worker's window, with the worker's default settings), asks the method for queries in
batches, and retrieves with ``streams.recommend.retrieve`` against the dataset's news
indexed in a real search backend: the exact serving path, not a re-implementation.
Ranking methods (``popular``) skip the queries and the search.

Deterministic given the dataset, the method and ``EvalConfig``: greedy decoding, one
index build, batches in target-file order. (Batch composition changes left padding, so a
different ``batch_size`` can change an LLM's output in rare near-tie cases.)
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any, Literal

from tqdm import tqdm

from evaluation.baselines import Method
from evaluation.dataset import COLD_HISTORY, EVENTS_FILE, HOLDOUT_DAYS, NEWS_FILE, TARGETS_FILE, Dataset, holdout_cutoff
from evaluation.metrics import aggregate, hit_rate_at_k, interest_coverage, mrr, ndcg_at_k, query_diversity, recall_at_k
from index.base import SearchEngine
from index.dense import DenseIndex, MiniLMEmbedder
from streams.contracts import NewsArticle, UserEvent
from streams.recommend import RecommendConfig, retrieve
from streams.settings import WorkerSettings, load
from streams.window import UserState, apply_event

log = logging.getLogger(__name__)

EngineKind = Literal["embedded", "elasticsearch", "dense"]


@dataclass(frozen=True)
class WindowConfig:
    max_signals: int
    max_age_s: float
    clicked_memory: int

    @classmethod
    def from_settings(cls, settings: WorkerSettings | None = None) -> WindowConfig:
        """The worker's window bounds: from ``settings``, or from ``NEWSREC_*`` as the worker reads them
        (the results record both configs, so two evaluations can be compared)."""
        s = settings if settings is not None else load(WorkerSettings)
        return cls(s.window_max_signals, s.window_max_age_s, s.clicked_memory)


@dataclass(frozen=True)
class EvalConfig:
    ks: tuple[int, ...] = (5, 10)
    samples: int | None = None  # the first N target users; None = all
    batch_size: int = WorkerSettings.model_fields["batch_max_users"].default  # the worker's batch
    recommend: RecommendConfig = field(default_factory=RecommendConfig.from_settings)
    window: WindowConfig = field(default_factory=WindowConfig.from_settings)
    diversity: bool = True  # embed each user's queries with MiniLM (query_diversity)
    keep_per_user: bool = True  # per-user rows (with queries and items) in the result
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.ks or min(self.ks) < 1:
            raise ValueError(f"ks must be positive cut-offs, got {self.ks}")
        if max(self.ks) > self.recommend.items_per_user:
            raise ValueError(f"k={max(self.ks)} is above the {self.recommend.items_per_user} items the serving "
                             "path returns per user (RecommendConfig.items_per_user)")
        if self.batch_size < 1:
            raise ValueError("batch_size must be at least 1")


def build_state(events: Sequence[UserEvent], window: WindowConfig) -> UserState:
    """The worker's state after consuming ``events`` (oldest first) on one partition."""
    state = UserState()
    for event in events:
        state = apply_event(state, event, 0, max_signals=window.max_signals, max_age_s=window.max_age_s,
                            clicked_memory=window.clicked_memory)
    return state


def dataset_cutoff(dataset: Dataset) -> datetime | None:
    """When recommendations are asked for: ``meta.json``'s ``cutoff`` if given, else the newest event."""
    raw = dataset.meta.get("cutoff")
    if isinstance(raw, str):
        try:
            return datetime.fromisoformat(raw)
        except ValueError:
            log.warning("meta.json cutoff %r is not ISO 8601; using the newest event time", raw)
    newest = [evs[-1].ts for evs in dataset.events.values() if evs]
    return max(newest) if newest else None


@dataclass(frozen=True)
class TrainingUser:
    user_id: str
    state: UserState  # the worker's window when the model is asked
    now: datetime | None  # when it is asked (the prompt dates the signals against it)
    targets: tuple[str, ...]  # what the user read next: rewards only, never the prompt
    cold: bool


def training_users(dataset: Dataset, window: WindowConfig, *, holdout_days: float = HOLDOUT_DAYS,
                   limit: int | None = None) -> list[TrainingUser]:
    """The users a trainer may learn from, in file order (the first ``limit``).

    A dataset with impressions is split by time like the impression protocol: only users whose
    impression comes before the held-out last ``holdout_days`` (their window: events strictly
    before it; targets: its clicks), so no trainer sees a held-out user. Without impressions:
    every target user, at the dataset cutoff."""
    if dataset.impressions:
        cutoff = holdout_cutoff(dataset.impressions, holdout_days)
        first = {}
        for imp in dataset.impressions:
            if imp.ts <= cutoff and imp.clicked:
                first.setdefault(imp.user_id, imp)
        users = []
        for imp in list(first.values())[:limit]:
            state = build_state([e for e in dataset.events.get(imp.user_id, ()) if e.ts < imp.ts], window)
            target = dataset.targets.get(imp.user_id)
            users.append(TrainingUser(imp.user_id, state, imp.ts, tuple(imp.clicked),
                                      target.cold if target else len(state.signals) < COLD_HISTORY))
        return users
    now = dataset_cutoff(dataset)
    return [TrainingUser(u, build_state(dataset.events.get(u, ()), window), now, tuple(dataset.targets[u].news_ids),
                         dataset.targets[u].cold) for u in dataset.users[:limit]]


def dataset_fingerprint(dataset: Dataset) -> str | None:
    """sha256 over the three data files, so a result says exactly which dataset it came from
    (simulated datasets get regenerated in place)."""
    digest = hashlib.sha256()
    try:
        for name in (NEWS_FILE, EVENTS_FILE, TARGETS_FILE):
            digest.update((dataset.path / name).read_bytes())
    except OSError:
        return None  # an in-memory Dataset
    return digest.hexdigest()


def user_metrics(ranked: Sequence[str], targets: Sequence[str], ks: Sequence[int],
                 cluster_of: dict[str, str]) -> dict[str, float]:
    """One user's ranking metrics; coverage at the largest k."""
    row: dict[str, float] = {}
    for k in ks:
        row[f"recall@{k}"] = recall_at_k(ranked, targets, k)
        row[f"ndcg@{k}"] = ndcg_at_k(ranked, targets, k)
        row[f"hit@{k}"] = hit_rate_at_k(ranked, targets, k)
    row["mrr"] = mrr(ranked, targets)
    kmax = max(ks)
    row[f"coverage@{kmax}"] = interest_coverage(ranked[:kmax], targets, cluster_of)
    return row


@asynccontextmanager
async def search_backend(kind: EngineKind, news: Sequence[NewsArticle], *, es_url: str | None = None,
                         es_api_key: str | None = None, es_ca_certs: str | None = None,
                         embedder: MiniLMEmbedder | None = None) -> AsyncIterator[SearchEngine]:
    """The dataset's news indexed in a fresh engine; an Elasticsearch index is dropped afterwards."""
    if kind == "embedded":
        from index.embedded import EmbeddedEngine

        engine = EmbeddedEngine()
        engine.upsert_sync(news)
        try:
            yield engine
        finally:
            engine.close_sync()
    elif kind == "dense":
        index = DenseIndex(embedder or load(WorkerSettings).minilm_embedder())
        index.upsert_sync(news)
        yield index
    elif kind == "elasticsearch":
        from index.elastic import ElasticEngine

        if not es_url:
            raise ValueError("the elasticsearch engine needs an es_url (NEWSREC_ES_URL)")
        alias = f"newsrec-eval-{uuid.uuid4().hex[:10]}"  # never touches the serving alias
        es = ElasticEngine(es_url, alias, api_key=es_api_key, ca_certs=es_ca_certs)
        try:
            await es.rebuild(news)
            yield es
        finally:
            await es.close()
            await _drop_alias(es_url, alias, api_key=es_api_key, ca_certs=es_ca_certs)
    else:
        raise ValueError(f"unknown engine {kind!r}: expected embedded, elasticsearch or dense")


async def _drop_alias(url: str, alias: str, **client_args: Any) -> None:
    from elasticsearch import AsyncElasticsearch, NotFoundError

    async with AsyncElasticsearch(url, **{k: v for k, v in client_args.items() if v}) as client:
        try:
            indices = sorted((await client.indices.get_alias(name=alias)).body)
        except NotFoundError:
            return
        for index in indices:
            await client.indices.delete(index=index, ignore_unavailable=True)


async def evaluate_method(method: Method, dataset: Dataset, users: Sequence[str], states: dict[str, UserState],
                          engine: SearchEngine | None, cfg: EvalConfig, *, now: datetime | None = None,
                          embedder: MiniLMEmbedder | None = None) -> dict[str, Any]:
    """Metrics of one method over ``users`` (already windowed into ``states``)."""
    cluster_of = {a.news_id: a.subcategory for a in dataset.news}
    rc = cfg.recommend
    is_query = method.kind == "queries"
    if is_query and engine is None:
        raise ValueError(f"{method.name} writes queries and needs a search engine")
    rows: list[dict[str, Any]] = []
    model_s = search_s = embed_s = 0.0
    started = time.perf_counter()
    with tqdm(total=len(users), desc=method.name, unit="user", disable=not cfg.progress, leave=False) as bar:
        for start in range(0, len(users), cfg.batch_size):
            batch = list(users[start: start + cfg.batch_size])
            batch_states = [states[u] for u in batch]
            queries: list[list[str]]
            if is_query:
                t0 = time.perf_counter()
                queries = method.queries(batch_states, rc, now=now)  # type: ignore[union-attr]
                t1 = time.perf_counter()
                fused = await retrieve(engine, batch_states, queries, rc)  # type: ignore[arg-type]
                t2 = time.perf_counter()
                model_s, search_s = model_s + t1 - t0, search_s + t2 - t1
                ranked = [[item.news_id for item in items] for items in fused]
            else:
                t0 = time.perf_counter()
                ranked = method.rank(batch_states, rc)  # type: ignore[union-attr]
                model_s += time.perf_counter() - t0
                queries = [[] for _ in batch]
            diversity: list[float | None] = [None] * len(batch)
            if is_query and cfg.diversity and embedder is not None:
                t0 = time.perf_counter()
                flat = [q for qs in queries for q in qs]
                vectors = embedder.encode(flat) if flat else None
                offset = 0
                for i, qs in enumerate(queries):
                    diversity[i] = query_diversity(vectors[offset: offset + len(qs)]) if vectors is not None else 0.0
                    offset += len(qs)
                embed_s += time.perf_counter() - t0
            for i, user in enumerate(batch):
                target = dataset.targets[user]
                row: dict[str, Any] = {"user_id": user, "cold": target.cold, "n_targets": len(target.news_ids),
                                       "n_queries": len(queries[i]) if is_query else None,
                                       "n_items": len(ranked[i])}
                row |= user_metrics(ranked[i], target.news_ids, cfg.ks, cluster_of)
                row["query_diversity"] = diversity[i]
                if cfg.keep_per_user:
                    row["queries"] = queries[i]
                    row["items"] = ranked[i]
                rows.append(row)
            bar.update(len(batch))
    total_s = time.perf_counter() - started
    agg = aggregate(rows, by=("cold",), ignore=("user_id", "queries", "items"))
    return {
        "method": method.name,
        "kind": method.kind,
        "version": method.version,
        "overall": agg["all"],
        "cold": agg["cold"],
        "timings": {
            "users": len(users), "total_s": round(total_s, 3), "users_per_s": round(len(users) / total_s, 2) if total_s else None,
            "model_s": round(model_s, 3), "search_s": round(search_s, 3), "embed_s": round(embed_s, 3),
        },
        "per_user": rows if cfg.keep_per_user else [],
    }


async def evaluate(dataset: Dataset, methods: Sequence[Method], cfg: EvalConfig | None = None, *,
                   engine: EngineKind = "embedded", es_url: str | None = None, es_api_key: str | None = None,
                   es_ca_certs: str | None = None, embedder: MiniLMEmbedder | None = None) -> dict[str, Any]:
    """Evaluate each method on the first ``cfg.samples`` target users of ``dataset``; one index for all."""
    cfg = cfg or EvalConfig()
    users = dataset.users[: cfg.samples] if cfg.samples is not None else dataset.users
    if not users:
        raise ValueError(f"{dataset.path}: no target users to evaluate")
    news_ids = {a.news_id for a in dataset.news}
    unresolved = sum(1 for u in users for n in dataset.targets[u].news_ids if n not in news_ids)
    if unresolved:
        log.warning("%d target news ids are not in news.tsv; they count as misses", unresolved)
    states = {u: build_state(dataset.events.get(u, ()), cfg.window) for u in users}
    now = dataset_cutoff(dataset)
    needs_search = any(m.kind == "queries" for m in methods)
    if embedder is None and (engine == "dense" or (cfg.diversity and needs_search)):
        embedder = load(WorkerSettings).minilm_embedder()
    results = []
    t0 = time.perf_counter()
    if needs_search:
        async with search_backend(engine, dataset.news, es_url=es_url, es_api_key=es_api_key,
                                  es_ca_certs=es_ca_certs, embedder=embedder) as backend:
            index_s = time.perf_counter() - t0
            engine_name = backend.name
            for method in methods:
                results.append(await evaluate_method(method, dataset, users, states, backend, cfg, now=now,
                                                     embedder=embedder))
    else:
        index_s, engine_name = 0.0, None
        for method in methods:
            results.append(await evaluate_method(method, dataset, users, states, None, cfg, now=now))
    return {
        "dataset": {
            "name": dataset.path.name, "path": str(dataset.path), "news": len(dataset.news),
            "target_users": len(dataset.users), "evaluated_users": len(users),
            "cold_users": sum(dataset.targets[u].cold for u in users), "unresolved_target_ids": unresolved,
            "sha256": dataset_fingerprint(dataset),
            "meta": {k: v for k, v in dataset.meta.items() if k != "truth"},  # truth is bulky and private
        },
        "engine": engine_name,
        "index_s": round(index_s, 3),
        "config": {"ks": list(cfg.ks), "samples": cfg.samples, "batch_size": cfg.batch_size,
                   "recommend": asdict(cfg.recommend), "window": asdict(cfg.window),
                   "now": now.isoformat() if now else None},
        "methods": results,
    }


def run_evaluation(dataset: Dataset, methods: Sequence[Method], cfg: EvalConfig | None = None,
                   **kwargs: Any) -> dict[str, Any]:
    """Synchronous :func:`evaluate`."""
    return asyncio.run(evaluate(dataset, methods, cfg, **kwargs))


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def format_markdown(results: dict[str, Any]) -> str:
    """One row per method and one per method's cold users; metrics are means over users."""
    ks = results["config"]["ks"]
    kmax = max(ks)
    cols = [(f"R@{k}", f"recall@{k}") for k in ks] + [(f"N@{k}", f"ndcg@{k}") for k in ks]
    cols += [("MRR", "mrr"), (f"Cov@{kmax}", f"coverage@{kmax}"), ("QDiv", "query_diversity"), ("#Q", "n_queries")]
    header = ["Method", "Users"] + [c for c, _ in cols] + ["users/s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for m in results["methods"]:
        for label, group in ((m["method"], m["overall"]), (f"{m['method']} (cold)", m["cold"])):
            cells = [label, str(group["n"])]
            cells += [_fmt(group.get(key), 2 if key == "n_queries" else 4) for _, key in cols]
            cells.append(_fmt(m["timings"]["users_per_s"], 1) if group is m["overall"] else "")
            lines.append("| " + " | ".join(cells) + " |")
    ds = results["dataset"]
    lines.append("")
    lines.append(f"{ds['name']}: {ds['evaluated_users']} users ({ds['cold_users']} cold), {ds['news']} news, "
                 f"engine {results['engine'] or '–'}; R=recall, N=NDCG (binary, log2), Cov=interest "
                 f"(subcategory) coverage, QDiv=mean pairwise cosine distance of a user's queries (MiniLM)")
    return "\n".join(lines)


# -- engine overlap study -----------------------------------------------------------------

def overlap_queries(news: Sequence[NewsArticle], n: int, *, seed: int = 0) -> list[str]:
    """A fixed, seeded query set: title openings (first 4 words) and entity names, alternating;
    when one kind runs out the other fills up. Unique (case-insensitively)."""
    rng = random.Random(seed)
    pools = []
    for texts in ([" ".join(a.title.split()[:4]) for a in news], [e for a in news for e in a.entities]):
        unique = list(dict.fromkeys(t.strip() for t in texts if t.strip()))
        rng.shuffle(unique)
        pools.append(unique)
    queries: list[str] = []
    seen: set[str] = set()
    cursors = [0, 0]
    while len(queries) < n and any(c < len(p) for c, p in zip(cursors, pools, strict=True)):
        for i, pool in enumerate(pools):
            while cursors[i] < len(pool) and len(queries) < n:
                query = pool[cursors[i]]
                cursors[i] += 1
                if query.casefold() not in seen:
                    seen.add(query.casefold())
                    queries.append(query)
                    break
    return queries


def overlap_stats(a: Sequence[Sequence[str]], b: Sequence[Sequence[str]], k: int = 10) -> dict[str, float | int]:
    """Agreement of two engines' top-k id lists for the same queries.

    ``overlap`` = mean ``|A∩B| / max(|A|, |B|)`` (so two engines that both find the only 6
    matching documents agree fully); ``overlap_raw`` = mean ``|A∩B| / k``; ``same_top1`` =
    share of queries with the same first hit. Queries where both lists are empty are skipped.
    """
    if len(a) != len(b):
        raise ValueError(f"{len(a)} vs {len(b)} result lists")
    over, raw, top1, skipped = [], [], [], 0
    for x, y in zip(a, b, strict=True):
        x, y = list(x)[:k], list(y)[:k]
        if not x and not y:
            skipped += 1
            continue
        common = len(set(x) & set(y))
        over.append(common / max(len(x), len(y)))
        raw.append(common / k)
        top1.append(1.0 if x and y and x[0] == y[0] else 0.0)
    mean = (lambda v: sum(v) / len(v) if v else 0.0)
    return {"queries": len(over), "both_empty": skipped, "overlap": mean(over), "overlap_raw": mean(raw),
            "same_top1": mean(top1)}


async def overlap_study(news: Sequence[NewsArticle], queries: Sequence[str], engines: dict[str, SearchEngine],
                        *, k: int = 10) -> dict[str, Any]:
    """Index ``news`` in every engine, run ``queries`` (one batch each), compare every pair."""
    timings: dict[str, dict[str, float]] = {}
    ids: dict[str, list[list[str]]] = {}
    for name, engine in engines.items():
        t0 = time.perf_counter()
        if hasattr(engine, "rebuild"):  # Elasticsearch: a fresh index behind the alias, refreshed
            await engine.rebuild(news)
        else:
            await engine.upsert(news)
        t1 = time.perf_counter()
        hits = await engine.search_many(list(queries), k=k)
        t2 = time.perf_counter()
        ids[name] = [[h.news_id for h in hs] for hs in hits]
        timings[name] = {"index_ms_per_1000_docs": round((t1 - t0) / max(1, len(news)) * 1e6, 1),
                         "search_ms_per_query": round((t2 - t1) / max(1, len(queries)) * 1e3, 3),
                         "empty_results": sum(1 for h in hits if not h)}
    names = list(engines)
    pairs = {f"{x} vs {y}": overlap_stats(ids[x], ids[y], k) for i, x in enumerate(names) for y in names[i + 1:]}
    return {"docs": len(news), "queries": len(queries), "k": k, "engines": timings, "pairs": pairs,
            "query_sample": list(queries[:10])}


def format_overlap_markdown(study: dict[str, Any]) -> str:
    lines = [f"| Pair | Queries | Top-{study['k']} overlap | Overlap /{study['k']} | Same top-1 |",
             "|---|---:|---:|---:|---:|"]
    for pair, s in study["pairs"].items():
        lines.append(f"| {pair} | {s['queries']} | {s['overlap']:.3f} | {s['overlap_raw']:.3f} | {s['same_top1']:.3f} |")
    lines += ["", "| Engine | Index ms / 1,000 docs | Search ms / query | Empty results |", "|---|---:|---:|---:|"]
    for name, t in study["engines"].items():
        lines.append(f"| {name} | {t['index_ms_per_1000_docs']:.0f} | {t['search_ms_per_query']:.3f} | {t['empty_results']} |")
    lines.append("")
    lines.append(f"{study['docs']} docs, {study['queries']} seeded queries (title openings and entity names)")
    return "\n".join(lines)
