"""Scaling studies of the query-writing teacher: inference-time sampling and model capacity.

- ``sampling_study``: best-of-N. Each user's prompt is sampled ``max(N)`` times once; for
  every N the completion with the best composite reward among the first N is served, then
  evaluated through the serving path. The selection reward never sees held-out clicks
  (``utility`` is left out: at inference time there are none), so it is a fair test-time method.
- ``capacity_study``: the same GRPO run config trained at several depths (the base model cut
  to its first L blocks), each evaluated the same way.

Both return JSON-ready dicts with one point per setting (metrics, mean reward, compute) and
draw Recall@10 and reward against compute.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from evaluation.channels import dataset_trending
from evaluation.dataset import Dataset
from evaluation.evaluate import (
    EvalConfig,
    WindowConfig,
    build_state,
    dataset_cutoff,
    run_evaluation,
)
from streams.recommend import RecommendConfig, parse_completion, user_prompt
from streams.window import UserState
from training.grpo import GRPORunConfig, train_grpo
from training.plots import plot_scaling
from training.rewards import composite_reward
from training.sampling import SELECTION_WEIGHTS, sample_and_score
from training.scoring import RewardScorer

log = logging.getLogger(__name__)


class PromptKeyedQueries:
    """A query method serving precomputed query lists, looked up by the user's prompt
    (the prompt is a pure function of the window, so it identifies what the model saw)."""

    kind: Literal["queries"] = "queries"

    def __init__(self, name: str, by_prompt: Mapping[str, list[str]], version: str | None = None) -> None:
        self.name = name
        self.version = version
        self.by_prompt = dict(by_prompt)

    def queries(self, states: Sequence[UserState], cfg: RecommendConfig, *, now: datetime | None = None
                ) -> list[list[str]]:
        return [self.by_prompt[user_prompt(s, cfg, now)] for s in states]


def sampling_study(dataset: Dataset, model_dir: Path, ns: Sequence[int], *, users: int | None = 100,
                   temperature: float = 0.9, top_p: float = 1.0, seed: int = 0, batch_users: int = 8,
                   weights: Mapping[str, float] = SELECTION_WEIGHTS, progress: bool = True) -> dict[str, Any]:
    from models.runtime import OnnxCausalLM

    if not ns or min(ns) < 1:
        raise ValueError(f"--n needs positive sample counts, got {list(ns)}")
    rc = RecommendConfig.from_settings()
    chosen_users = dataset.users[:users]
    window = WindowConfig.from_settings()
    now = dataset_cutoff(dataset)
    states = [build_state(dataset.events.get(u, ()), window) for u in chosen_users]
    prompts = [user_prompt(s, rc, now) for s in states]
    scorer = RewardScorer(dataset.news, trending=dataset_trending(dataset))
    contexts = [scorer.context(s, prompt_signals=rc.prompt_signals, utility=False) for s in states]
    lm = OnnxCausalLM(model_dir)
    top = max(ns)

    samples = sample_and_score(lm, scorer, prompts, contexts, n=top, max_new_tokens=rc.max_new_tokens,
                               temperature=temperature, top_p=top_p, seed=seed, batch_prompts=batch_users,
                               weights=weights, progress=progress)
    # In batches like the samples: one pass over all users would hold every row's KV cache
    # at once (300 SmolLM2 users took 24 GB).
    greedy = lm.generate(prompts, max_new_tokens=rc.max_new_tokens, batch_size=batch_users)
    greedy_scores = [composite_reward(r, weights) for r in scorer.score(greedy, contexts)]
    scorer.close()

    methods = [PromptKeyedQueries("greedy", {p: parse_completion(g, rc) for p, g in zip(prompts, greedy, strict=True)},
                                  lm.version)]
    picks: dict[int, list[int]] = {}
    for n in ns:
        picks[n] = samples.best(n)
        by_prompt = {p: parse_completion(texts[i], rc) for p, texts, i in zip(prompts, samples.texts, picks[n],
                                                                               strict=True)}
        methods.append(PromptKeyedQueries(f"best-of-{n}", by_prompt, lm.version))
    results = run_evaluation(dataset, methods, EvalConfig(samples=len(chosen_users), keep_per_user=False,
                                                          progress=progress))
    tokens = samples.tokens
    mean_tokens = sum(map(sum, tokens)) / max(1, sum(map(len, tokens)))
    points = [_point("greedy", 1, results["methods"][0], sum(greedy_scores) / len(greedy_scores), mean_tokens)]
    for n, method in zip(ns, results["methods"][1:], strict=True):
        reward = sum(s[i] for s, i in zip(samples.rewards, picks[n], strict=True)) / len(samples.rewards)
        points.append(_point(f"N={n}", n, method, reward, n * mean_tokens) | {"n": n})
    return {"study": "sampling", "model": str(model_dir), "model_version": lm.version,
            "users": len(chosen_users), "temperature": temperature, "top_p": top_p, "seed": seed,
            "selection_weights": dict(weights), "mean_completion_tokens": round(mean_tokens, 1),
            "timings": {"sampling_s": round(samples.sample_s, 1), "scoring_s": round(samples.score_s, 1)},
            "points": points, "eval": results}


def _point(label: str, n: int, method: Mapping[str, Any], reward: float, tokens_per_user: float) -> dict[str, Any]:
    overall, cold = method["overall"], method["cold"]
    return {"label": label, "samples": n, "tokens_per_user": round(tokens_per_user, 1),
            "reward": round(reward, 4), "recall@10": overall["recall@10"], "ndcg@10": overall["ndcg@10"],
            "cold_recall@10": cold.get("recall@10"), "cold_ndcg@10": cold.get("ndcg@10")}


def capacity_study(base: GRPORunConfig, layers: Sequence[int | None], *, out_dir: Path,
                   progress: bool = True) -> dict[str, Any]:
    """Train ``base`` once per depth (``None`` = the full model) into ``out_dir/layers-<L>``.

    A depth whose run finished (``run.json``) is reused; an interrupted one resumes."""
    import json

    if base.eval_data is None:
        raise ValueError("the capacity study evaluates every size: the run config needs eval_data")
    points, runs = [], []
    for depth in layers:
        name = f"layers-{depth or 'all'}"
        cfg = replace(base, layers=depth, output_dir=out_dir / name, export=True, evaluate=True)
        done = cfg.output_dir / "run.json"
        if done.is_file():
            summary = json.loads(done.read_text())
        else:
            summary = train_grpo(cfg, resume=cfg.output_dir.exists(), progress=progress)
        reward = composite_reward(summary["final_rewards"], base.reward_weights)
        # Every size trains on the same prompts for the same steps, so compute ~ parameters.
        point = _point(name, 1, summary["eval"]["methods"][0], reward, 0.0)
        points.append(point | {"layers": depth, "parameters": summary["parameters"], "train_s": summary["train_s"]})
        runs.append(summary)
    return {"study": "capacity", "base_config": base.to_json(), "points": points, "runs": runs}


def save_study(study: dict[str, Any], json_path: Path, png_path: Path) -> None:
    import json

    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(study, indent=2, default=str))
    if study["study"] == "sampling":
        plot_scaling(study["points"], png_path, x="tokens_per_user", x_label="generated tokens per user (log)",
                     title=f"best-of-N sampling ({study['users']} users)")
    else:
        plot_scaling(study["points"], png_path, x="parameters", x_label="teacher parameters (log)",
                     title="teacher capacity (same GRPO budget)")
