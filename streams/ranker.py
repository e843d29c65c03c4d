"""Learned fusion: a small LightGBM LambdaRank model over the channels' scores.

Features per (user, candidate) come from the channel lists, the trending counts and the
MiniLM vectors of the candidates, the user's signals and what everyone clicked lately
(:func:`candidate_features`), so the same function serves ``newsrec eval`` and
``POST /rank``. A fitted ranker is a versioned artifact like the models: a directory with
``ranker.txt`` (LightGBM's own text format, no pickle) and a ``manifest.json`` (sha256 of
every file, version, feature names), verified on load.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from index.fusion import FusedItem
from models.manifest import Manifest, verify_manifest, write_manifest
from streams.settings import CHANNELS
from streams.trending import Popularity

RANKER_FILE = "ranker.txt"
FEATURES: tuple[str, ...] = (
    *(f"{c}_{kind}" for c in CHANNELS for kind in ("score", "rr")),
    "clicks_log", "shows_log", "age_h",
    "category_share", "subcategory_share",  # of the user's signals about indexed articles
    # Content: cosine of the candidate to the user's closest signal and to their mean, and to
    # the click-weighted centroid of everyone's recent clicks (a topic that is trending now
    # reaches articles never shown yet: on MIND's last day most candidates are new).
    "signal_max_sim", "signal_mean_sim", "trend_sim",
)
CONTENT_FEATURES = ("signal_max_sim", "signal_mean_sim", "trend_sim")
# An article never seen inside the trending horizon counts as this old (hours).
UNSEEN_AGE_H = 48.0


@dataclass(frozen=True)
class ContentVectors:
    """Unit vectors behind the content features: one row per candidate (zeros for one not
    embedded), one per signal of the user, and the centroid of recent clicks (None: none)."""

    candidates: np.ndarray
    signals: np.ndarray
    clicked_centroid: np.ndarray | None = None


def clicked_centroid(vectors: np.ndarray, clicks: Sequence[float]) -> np.ndarray | None:
    """The unit click-weighted mean of article ``vectors`` (None without clicks). Pure."""
    weights = np.asarray(clicks, np.float32)
    if not len(weights) or weights.sum() <= 0:
        return None
    mean = weights @ np.asarray(vectors, np.float32)
    norm = float(np.linalg.norm(mean))
    return mean / norm if norm > 0 else None


def candidate_features(lists: Mapping[str, Sequence[FusedItem]], candidates: Sequence[str],
                       popularity: Mapping[str, Popularity], now: float, *,
                       categories: Mapping[str, tuple[str, str]] | None = None,
                       history: Sequence[str] = (), content: ContentVectors | None = None,
                       queried: bool = True) -> np.ndarray:
    """(len(candidates), len(FEATURES)) float32: each channel's score and reciprocal rank
    (0 where it did not rank the candidate), log clicks and shows, hours since first seen,
    the share of the user's ``history`` (news ids of their signals) in the candidate's
    category and subcategory (``categories``: news_id -> (category, subcategory)), and the
    cosines of :data:`CONTENT_FEATURES` from ``content`` (0 without it). Pure.

    ``queried`` False (the model wrote no queries for this user: not asked, failed, cold)
    makes the model channel's columns NaN, LightGBM's missing value, so a ranker fitted on
    impressions with and without model queries tells "not asked" from "found nothing"."""
    col = {name: j for j, name in enumerate(FEATURES)}
    row = {n: i for i, n in enumerate(candidates)}
    x = np.zeros((len(candidates), len(FEATURES)), np.float32)
    for channel, items in lists.items():
        for rank, item in enumerate(items):
            i = row.get(item.news_id)
            if i is not None and x[i, col[f"{channel}_rr"]] == 0:
                x[i, col[f"{channel}_score"]] = item.score
                x[i, col[f"{channel}_rr"]] = 1.0 / (rank + 1)
    categories = categories or {}
    seen = [categories[n] for n in history if n in categories]
    cat_count = Counter(c for c, _ in seen)
    sub_count = Counter(sub for _, sub in seen if sub)
    for n, i in row.items():
        cat, sub = categories.get(n, ("", ""))
        if seen:
            x[i, col["category_share"]] = cat_count[cat] / len(seen) if cat else 0.0
            x[i, col["subcategory_share"]] = sub_count[sub] / len(seen) if sub else 0.0
        p = popularity.get(n)
        x[i, col["clicks_log"]] = math.log1p(p.clicks) if p else 0.0
        x[i, col["shows_log"]] = math.log1p(p.shows) if p else 0.0
        x[i, col["age_h"]] = min(UNSEEN_AGE_H, max(0.0, (now - p.first_seen) / 3600)) if p else UNSEEN_AGE_H
    if not queried:
        x[:, [col["model_score"], col["model_rr"]]] = np.nan
    if content is not None:
        if len(content.candidates) != len(candidates):
            raise ValueError(f"{len(content.candidates)} candidate vectors for {len(candidates)} candidates")
        if len(content.signals):
            sims = content.candidates @ content.signals.T
            x[:, col["signal_max_sim"]] = sims.max(axis=1)
            x[:, col["signal_mean_sim"]] = sims.mean(axis=1)
        if content.clicked_centroid is not None:
            x[:, col["trend_sim"]] = content.candidates @ content.clicked_centroid
    return x


class LearnedRanker:
    def __init__(self, booster: Any, version: str) -> None:
        self.booster, self.version = booster, version

    @classmethod
    def fit(cls, x: np.ndarray, y: np.ndarray, groups: Sequence[int], *, version: str, seed: int = 0,
            rounds: int = 200) -> LearnedRanker:
        """LambdaRank on impressions (``groups`` = candidates per impression, in row order)."""
        import lightgbm as lgb

        if sum(groups) != len(x) or len(x) != len(y):
            raise ValueError(f"{len(x)} rows, {len(y)} labels, groups summing to {sum(groups)}")
        # Small trees, 100 rows a leaf: chosen on a validation day carved out of MIND's training
        # days (README); fewer rows a leaf on a small training set, so it can still split.
        params = {"objective": "lambdarank", "metric": "ndcg", "ndcg_eval_at": [5, 10], "learning_rate": 0.05,
                  "num_leaves": 7, "min_data_in_leaf": min(100, max(5, len(x) // 50)),
                  "feature_fraction": 0.9, "bagging_fraction": 0.8,
                  "bagging_freq": 1, "lambda_l2": 1.0, "seed": seed, "deterministic": True,
                  "num_threads": 2, "verbosity": -1}
        data = lgb.Dataset(x, label=y, group=list(groups), feature_name=list(FEATURES), free_raw_data=False)
        return cls(lgb.train(params, data, num_boost_round=rounds), version)

    def score(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.booster.predict(x, num_threads=1), dtype=np.float64) if len(x) else np.zeros(0)

    def order(self, lists: Mapping[str, Sequence[FusedItem]], candidates: Sequence[str],
              popularity: Mapping[str, Popularity], now: float, *,
              categories: Mapping[str, tuple[str, str]] | None = None,
              history: Sequence[str] = (), content: ContentVectors | None = None,
              queried: bool = True) -> list[FusedItem]:
        """``candidates`` (distinct, in the order ``content`` has them) best first by the
        ranker, each with the channels and query that found it."""
        if len(set(candidates)) != len(candidates):
            raise ValueError("candidates must be distinct")
        scores = self.score(candidate_features(lists, candidates, popularity, now, categories=categories,
                                               history=history, content=content, queried=queried))
        found: dict[str, list[FusedItem]] = {}
        for channel, items in lists.items():
            for item in items:
                found.setdefault(item.news_id, []).append(item)
        out = []
        for i in sorted(range(len(candidates)), key=lambda i: (-scores[i], i)):
            n, hits = candidates[i], found.get(candidates[i], [])
            out.append(FusedItem(n, hits[0].title if hits else "", round(float(scores[i]), 6),
                                 hits[0].query if hits else "", tuple(c for h in hits for c in h.channels)))
        return out

    def save(self, out_dir: Path) -> Manifest:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / RANKER_FILE).write_text(self.booster.model_to_string(), encoding="utf-8")
        return write_manifest(out_dir, name="newsrec-ranker", version=self.version, parent=None,
                              export={"kind": "lightgbm-lambdarank", "features": list(FEATURES)})

    @classmethod
    def load(cls, model_dir: Path) -> LearnedRanker:
        import lightgbm as lgb

        manifest = verify_manifest(model_dir)
        features = (manifest.export or {}).get("features")
        if features != list(FEATURES):
            raise ValueError(f"{model_dir}: ranker features {json.dumps(features)} differ from this version's "
                             f"{list(FEATURES)}: retrain it with `newsrec eval --impressions ... --save-ranker`")
        booster = lgb.Booster(model_str=(model_dir / RANKER_FILE).read_text(encoding="utf-8"))
        return cls(booster, manifest.version)
