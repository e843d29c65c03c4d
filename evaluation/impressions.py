"""The impression protocol: rank each impression's candidates for its user with the serving
path's channels (``streams.recommend.channel_lists`` restricted to the candidates) and
report MIND's per-impression AUC, MRR, nDCG@5 and nDCG@10.

No leakage: an impression is scored with the user's events strictly before its ``ts`` and a
trending view fed only with earlier events (``news_click`` = clicks, ``impression`` = shows)
and earlier impressions (candidates = shows, clicked = clicks), added after they are scored.

Split by time: impressions on the last ``holdout_days`` are held out; the learned fusion
(``streams.ranker``) is fitted on the earlier ones only. Every variant is reported on the
held-out impressions: single channels, weighted RRF of all channels, the hybrid minus each
channel, the learned fusion, and for the model channel a paired bootstrap interval of its
effect (hybrid minus hybrid without it; with ``model_train_samples``, the model also writes
queries for the last training impressions, the ranker learns its columns, and its effect
inside the learned fusion gets an interval too).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from evaluation.baselines import QueryMethod
from evaluation.channels import ChannelEvalConfig, variants
from evaluation.dataset import COLD_HISTORY, HOLDOUT_DAYS, Dataset, Impression, holdout_cutoff
from evaluation.evaluate import build_state
from evaluation.metrics import bootstrap_ci, impression_auc, impression_mrr, impression_ndcg
from index.base import SearchEngine
from index.dense import DenseIndex
from index.fusion import FusedItem
from streams.contracts import UserEvent
from streams.ranker import CONTENT_FEATURES, FEATURES, UNSEEN_AGE_H, LearnedRanker, candidate_features
from streams.recommend import Recall, TrendingView, channel_lists, content_vectors, order_candidates
from streams.trending import TRENDING_KINDS, TrendingCounter

log = logging.getLogger(__name__)

METRICS = ("auc", "mrr", "ndcg@5", "ndcg@10")


@dataclass(frozen=True)
class ImpressionConfig(ChannelEvalConfig):
    holdout_days: float = HOLDOUT_DAYS
    model_samples: int | None = 300  # held-out impressions the model channel writes queries for
    # The last N training impressions it writes queries for too, so the learned fusion can
    # learn what the model's results are worth (0: it never sees them and ignores the channel).
    model_train_samples: int = 0
    save_ranker: Path | None = None  # write the fitted learned fusion here (a versioned artifact)


def impression_metrics(order: Sequence[FusedItem], clicked: set[str]) -> dict[str, float | None]:
    """MIND's metrics of one ranked candidate list (score = minus the position)."""
    scores = [-float(i) for i in range(len(order))]
    labels = [int(item.news_id in clicked) for item in order]
    return {"auc": impression_auc(scores, labels), "mrr": impression_mrr(scores, labels),
            "ndcg@5": impression_ndcg(scores, labels, 5), "ndcg@10": impression_ndcg(scores, labels, 10)}


def trending_views(impressions: Sequence[Impression], events: Iterable[Sequence[UserEvent]],
                   titles: Mapping[str, str]) -> Iterator[tuple[Impression, TrendingView]]:
    """Each impression (in time order) with the trending view as it stood strictly before its
    ``ts``: earlier ``news_click``/``impression`` events and earlier impressions only. The view
    reads the live counter: use it before advancing the iterator."""
    stream = sorted((e for evs in events for e in evs if e.domain in TRENDING_KINDS and e.news_id),
                    key=lambda e: e.ts)
    counter, pending, e_next = TrendingCounter(), 0, 0
    for i, imp in enumerate(impressions):
        while pending < i and impressions[pending].ts < imp.ts:  # added only once strictly in the past
            counter.add(impressions[pending].ts, shown=impressions[pending].candidates,
                        clicked=impressions[pending].clicked)
            pending += 1
        while e_next < len(stream) and stream[e_next].ts < imp.ts:
            e = stream[e_next]
            counter.add_event(e.ts, e.domain, e.news_id)
            e_next += 1
        yield imp, TrendingView.at(counter, imp.ts, titles)


async def evaluate_impressions(dataset: Dataset, engine: SearchEngine, dense: DenseIndex | None,
                               cfg: ImpressionConfig, method: QueryMethod | None = None) -> dict[str, Any]:
    """Score every impression of ``dataset`` (see the module docstring); returns the report."""
    started = time.perf_counter()
    imps = sorted(dataset.impressions, key=lambda i: (i.ts, i.impression_id))
    if not imps:
        raise ValueError(f"{dataset.path}: no impressions.jsonl to evaluate")
    cutoff = holdout_cutoff(imps, cfg.holdout_days)
    titles = {a.news_id: a.title for a in dataset.news}
    categories = {a.news_id: (a.category, a.subcategory) for a in dataset.news}
    rc = cfg.recommend
    held = [i for i, imp in enumerate(imps) if imp.ts > cutoff]
    model_rows = set(held[: cfg.model_samples] if cfg.model_samples is not None else held) if method else set()
    if method is not None and cfg.model_train_samples > 0:
        model_rows |= set([i for i, imp in enumerate(imps) if imp.ts <= cutoff][-cfg.model_train_samples:])

    # The model's queries first, in batches (the costly part), for the sampled held-out users.
    states = []
    for imp in imps:
        states.append(build_state([e for e in dataset.events.get(imp.user_id, ()) if e.ts < imp.ts], cfg.window))
    queries: dict[int, list[str]] = {}
    model_s = 0.0
    if method is not None:
        rows = sorted(model_rows)
        for start in tqdm(range(0, len(rows), cfg.batch_size), desc=method.name, disable=not cfg.progress):
            batch = rows[start: start + cfg.batch_size]
            t0 = time.perf_counter()
            for i, qs in zip(batch, method.queries([states[i] for i in batch], rc, now=imps[batch[0]].ts),
                             strict=True):
                queries[i] = qs
            model_s += time.perf_counter() - t0

    per_imp: list[dict[str, Any]] = []
    features: list[np.ndarray] = []
    for i, (imp, view) in enumerate(tqdm(trending_views(imps, dataset.events.values(), titles), total=len(imps),
                                         desc="impressions", disable=not cfg.progress)):
        cands = list(dict.fromkeys(imp.candidates))
        lists = (await channel_lists(Recall(engine, dense, view), [states[i]], [queries.get(i, [])], rc,
                                     k=len(cands), candidates=[cands]))[0]
        history = [sig.news_id for sig in states[i].signals if sig.news_id]
        content = content_vectors(dense, [states[i]], [cands], view.popularity)[0]
        features.append(candidate_features(lists, cands, view.popularity, view.now, categories=categories,
                                           history=history, content=content, queried=bool(queries.get(i))))
        per_imp.append({"i": i, "held_out": imp.ts > cutoff, "model": i in model_rows, "lists": lists,
                        "cands": cands, "clicked": set(imp.clicked), "cold": len(states[i].signals) < COLD_HISTORY})

    channels = [c for c in rc.weights if c != "model" or method is not None]
    # With a model, every variant is scored on the held-out impressions it wrote queries for,
    # so each row (and the paired model effect) compares like with like.
    test = [r for r in per_imp if r["held_out"] and (method is None or r["model"])]
    results: dict[str, dict[str, Any]] = {}
    rng = np.random.default_rng(cfg.seed)
    per_variant: dict[str, list[dict[str, float | None]]] = {}
    per_variant["random"] = [impression_metrics([FusedItem(n, "", 0.0, "") for n in rng.permutation(r["cands"])],
                                                r["clicked"]) for r in test]
    for name, vcfg in variants(rc, channels).items():
        per_variant[name] = [impression_metrics(order_candidates(r["lists"], r["cands"], vcfg), r["clicked"])
                             for r in test]

    # Learned fusion: fitted on the earlier impressions only, never on the held-out day.
    train = [r for r in per_imp if not r["held_out"] and r["clicked"] and len(r["clicked"]) < len(r["cands"])]
    ranker = None
    if train:
        x = np.concatenate([features[r["i"]] for r in train])
        y = np.concatenate([[int(n in r["clicked"]) for n in r["cands"]] for r in train])
        ranker = LearnedRanker.fit(x, y, [len(r["cands"]) for r in train],
                                   version=f"ranker-{dataset.path.resolve().name}-{cutoff:%Y%m%d}", seed=cfg.seed)
        if cfg.save_ranker is not None:
            ranker.save(cfg.save_ranker)
        for name, drop in [("learned", None), *((f"learned - {c}", c) for c in channels)]:
            per_variant[name] = [impression_metrics(_learned_order(ranker, r, features[r["i"]], drop), r["clicked"])
                                 for r in test]

    for name, rows in per_variant.items():
        results[name] = _summary(rows, [r["cold"] for r in test])
    model_effect = learned_model_effect = None
    if method is not None and "hybrid - model" in per_variant:
        model_effect = _effect(per_variant["hybrid"], per_variant["hybrid - model"], cfg, method.name)
    if method is not None and "learned - model" in per_variant and cfg.model_train_samples > 0:
        learned_model_effect = _effect(per_variant["learned"], per_variant["learned - model"], cfg, method.name)
    return {
        "protocol": "impressions", "impressions": len(imps), "held_out": len(test), "train": len(train),
        "holdout_from": cutoff.isoformat(), "channels": channels, "weights": rc.weights,
        "model": method.name if method else None, "model_impressions": len(model_rows),
        "model_train_impressions": sum(1 for r in train if r["model"]),
        "results": results, "model_effect": model_effect, "learned_model_effect": learned_model_effect,
        "timings": {"total_s": round(time.perf_counter() - started, 1), "model_s": round(model_s, 1)},
    }


def _effect(with_: Sequence[dict[str, float | None]], without: Sequence[dict[str, float | None]],
            cfg: ImpressionConfig, method: str) -> dict[str, Any] | None:
    """The paired AUC difference of two variants over the same impressions, with its
    bootstrap interval (None when no impression has both)."""
    pairs = [(a["auc"], b["auc"]) for a, b in zip(with_, without, strict=True)
             if a["auc"] is not None and b["auc"] is not None]
    if not pairs:
        return None
    mean, low, high = bootstrap_ci([p[0] for p in pairs], [p[1] for p in pairs], n=cfg.bootstrap, seed=cfg.seed)
    return {"metric": "auc", "impressions": len(pairs), "mean": mean, "ci95": [low, high], "method": method}


def _learned_order(ranker: LearnedRanker, r: dict[str, Any], x: np.ndarray, drop: str | None) -> list[FusedItem]:
    """Order by the ranker with ``drop``'s feature columns zeroed (as if that channel found
    nothing; the model's are made missing, as if it wrote no queries)."""
    x = x.copy()
    if drop is not None:
        cols = [j for j, f in enumerate(FEATURES) if f.startswith(f"{drop}_")]
        if drop == "trending":  # its counts too: as if nothing had been seen
            cols += [FEATURES.index("clicks_log"), FEATURES.index("shows_log"), FEATURES.index("trend_sim")]
            x[:, FEATURES.index("age_h")] = UNSEEN_AGE_H
        if drop == "dense":  # the content cosines too: as if there were no vectors
            cols += [FEATURES.index(f) for f in CONTENT_FEATURES]
        x[:, cols] = np.nan if drop == "model" else 0.0  # missing, as candidate_features(queried=False)
    scores = ranker.score(x)
    return [FusedItem(r["cands"][j], "", float(scores[j]), "") for j in sorted(range(len(scores)),
                                                                             key=lambda j: (-scores[j], j))]


def _summary(rows: Sequence[dict[str, float | None]], cold: Sequence[bool]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for metric in METRICS:
        values = [r[metric] for r in rows if r[metric] is not None]
        out[metric] = round(float(np.mean(values)), 4) if values else None
        cold_values = [r[metric] for r, c in zip(rows, cold, strict=True) if c and r[metric] is not None]
        out[f"cold_{metric}"] = round(float(np.mean(cold_values)), 4) if cold_values else None
    out["scored"] = sum(r["auc"] is not None for r in rows)
    return out


def format_impressions_markdown(report: dict[str, Any]) -> str:
    lines = [f"impression protocol: {report['held_out']} held-out impressions (from {report['holdout_from']}), "
             f"learned fusion fitted on {report['train']} earlier ones",
             "", "| variant | AUC | MRR | nDCG@5 | nDCG@10 | cold AUC |", "|---|---:|---:|---:|---:|---:|"]
    for name, r in report["results"].items():
        cells = [f"{r[m]:.4f}" if r[m] is not None else "—" for m in (*METRICS, "cold_auc")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for key, what in [("model_effect", "hybrid"), ("learned_model_effect", "learned fusion")]:
        effect = report.get(key)
        if effect:
            lines += ["", f"model channel effect on AUC ({what} minus {what} without it, {effect['impressions']} "
                          f"impressions, {effect['method']}): {effect['mean']:+.4f} "
                          f"[{effect['ci95'][0]:+.4f}, {effect['ci95'][1]:+.4f}] 95% bootstrap CI"]
    return "\n".join(lines)
