"""Channel ablation on the corpus protocol: every recall channel alone, the model-free
hybrid, the hybrid with the model, and the hybrid minus each channel, from ONE pass of
channel lists per user (``streams.recommend.channel_lists``); fusing a variant is pure, so
all variants see exactly the same retrieval. The model channel's effect (hybrid minus hybrid
without it) comes with a paired bootstrap interval over users.

Trending here is built from the dataset's ``news_click`` events of all users before the
cutoff (clicks only, so clicks rank; no user's targets are involved).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm import tqdm

from evaluation.baselines import QueryMethod
from evaluation.dataset import Dataset
from evaluation.evaluate import WindowConfig, build_state, dataset_cutoff
from evaluation.metrics import bootstrap_ci, ndcg_at_k, recall_at_k
from index.base import SearchEngine
from index.dense import DenseIndex
from streams.recommend import Recall, RecommendConfig, TrendingView, channel_lists, fuse_user
from streams.trending import TrendingCounter


def variants(cfg: RecommendConfig, channels: Sequence[str]) -> dict[str, RecommendConfig]:
    """Each channel alone, signals+dense (the strongest model-free pair), the hybrid of all
    ``channels`` and the hybrid minus each one; weights as configured."""
    on = [c for c in cfg.weights if c in channels]
    out = {c: cfg.only(c) for c in on}
    if {"signals", "dense"} <= set(on):
        out["signals+dense"] = cfg.only("signals", "dense")
    if "model" in on:
        out["hybrid - model"] = cfg.only(*on).without("model")
    out["hybrid"] = cfg.only(*on)
    for c in on:
        if c != "model":
            out[f"hybrid - {c}"] = cfg.only(*on).without(c)
    return out


def dataset_trending(dataset: Dataset) -> TrendingView | None:
    """The trending view at the dataset's cutoff from all users' ``news_click`` and
    ``impression`` events up to it (targets are after the cutoff: never counted)."""
    now = dataset_cutoff(dataset)
    if now is None:
        return None
    counter = TrendingCounter()
    for evs in dataset.events.values():
        for e in evs:
            if e.ts <= now:
                counter.add_event(e.ts, e.domain, e.news_id)
    return TrendingView.at(counter, now, {a.news_id: a.title for a in dataset.news})


@dataclass(frozen=True)
class ChannelEvalConfig:
    """What every channel evaluation shares: the serving limits, batching and the bootstrap."""

    batch_size: int = 16
    bootstrap: int = 1000
    seed: int = 0
    recommend: RecommendConfig = field(default_factory=RecommendConfig.from_settings)
    window: WindowConfig = field(default_factory=WindowConfig.from_settings)
    progress: bool = True


@dataclass(frozen=True)
class ChannelStudyConfig(ChannelEvalConfig):
    samples: int | None = None  # the first N target users
    k: int = 10


async def channel_study(dataset: Dataset, engine: SearchEngine, dense: DenseIndex | None, cfg: ChannelStudyConfig,
                        method: QueryMethod | None = None) -> dict[str, Any]:
    started = time.perf_counter()
    users = dataset.users[: cfg.samples] if cfg.samples is not None else dataset.users
    now = dataset_cutoff(dataset)
    states = [build_state(dataset.events.get(u, ()), cfg.window) for u in users]
    view = dataset_trending(dataset)
    rc = cfg.recommend
    recall = Recall(engine, dense, view)
    lists: list[dict[str, Any]] = []
    model_s = 0.0
    for start in tqdm(range(0, len(users), cfg.batch_size), desc="channels", disable=not cfg.progress):
        batch = states[start: start + cfg.batch_size]
        t0 = time.perf_counter()
        queries = method.queries(batch, rc, now=now) if method is not None else [[] for _ in batch]
        model_s += time.perf_counter() - t0
        lists += await channel_lists(recall, batch, queries, rc, k=rc.channel_depth)
    channels = [c for c in rc.weights if c != "model" or method is not None]
    per_variant: dict[str, dict[str, list[float]]] = {}
    for name, vcfg in variants(rc, channels).items():
        ranked = [[i.news_id for i in fuse_user(lists[u], vcfg, states[u].clicked)] for u in range(len(users))]
        targets = [dataset.targets[u].news_ids for u in users]
        per_variant[name] = {f"recall@{cfg.k}": [recall_at_k(r, t, cfg.k) for r, t in zip(ranked, targets, strict=True)],
                             f"ndcg@{cfg.k}": [ndcg_at_k(r, t, cfg.k) for r, t in zip(ranked, targets, strict=True)]}
    cold = [dataset.targets[u].cold for u in users]
    results = {name: {m: round(float(np.mean(v)), 4) for m, v in metrics.items()}
               | {f"cold_{m}": round(float(np.mean([x for x, c in zip(v, cold, strict=True) if c])), 4)
                  for m, v in metrics.items() if any(cold)}
               for name, metrics in per_variant.items()}
    effect = None
    if method is not None:
        effect = {}
        for metric in (f"recall@{cfg.k}", f"ndcg@{cfg.k}"):
            mean, low, high = bootstrap_ci(per_variant["hybrid"][metric], per_variant["hybrid - model"][metric],
                                           n=cfg.bootstrap, seed=cfg.seed)
            effect[metric] = {"mean": round(mean, 4), "ci95": [round(low, 4), round(high, 4)]}
    return {"protocol": "corpus-channels", "users": len(users), "channels": channels, "weights": rc.weights,
            "model": method.name if method else None, "results": results, "model_effect": effect,
            "timings": {"total_s": round(time.perf_counter() - started, 1), "model_s": round(model_s, 1)}}


def format_channels_markdown(report: dict[str, Any], k: int = 10) -> str:
    lines = [f"channel ablation (corpus protocol): {report['users']} users, model {report['model'] or 'none'}",
             "", f"| variant | R@{k} | N@{k} | cold R@{k} |", "|---|---:|---:|---:|"]
    for name, r in report["results"].items():
        cold = r.get(f"cold_recall@{k}")
        lines.append(f"| {name} | {r[f'recall@{k}']:.4f} | {r[f'ndcg@{k}']:.4f} | "
                     f"{f'{cold:.4f}' if cold is not None else '—'} |")
    if report.get("model_effect"):
        for metric, e in report["model_effect"].items():
            lines.append(f"\nmodel channel effect on {metric}: {e['mean']:+.4f} "
                         f"[{e['ci95'][0]:+.4f}, {e['ci95'][1]:+.4f}] 95% bootstrap CI over users")
    return "\n".join(lines)
