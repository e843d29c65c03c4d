"""One configuration source for the recommendation path: the worker, the evaluation and the
trainers' rewards all get their limits from WorkerSettings (NEWSREC_*)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from evaluation.evaluate import EvalConfig, WindowConfig
from streams.recommend import RecommendConfig, parse_completion, user_prompt
from streams.settings import WorkerSettings, load
from streams.window import Signal, UserState
from training.distill import DistillConfig
from training.grpo import GRPORunConfig
from training.scoring import RewardConfig

ENV = {"NEWSREC_MAX_QUERIES": "3", "NEWSREC_MAX_NEW_TOKENS": "40", "NEWSREC_PROMPT_SIGNALS": "25",
       "NEWSREC_RESULTS_PER_QUERY": "7", "NEWSREC_ITEMS_PER_USER": "6", "NEWSREC_SIGNAL_QUERIES": "1", "NEWSREC_CHANNEL_WEIGHTS": '{"signals": 1, "model": 2}',
       "NEWSREC_WINDOW_MAX_SIGNALS": "40", "NEWSREC_CLICKED_MEMORY": "50"}


def test_defaults_are_the_worker_settings_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ENV:
        monkeypatch.delenv(var, raising=False)
    assert RecommendConfig() == RecommendConfig.from_settings(WorkerSettings())
    assert RecommendConfig.from_settings() == RecommendConfig()


def test_worker_eval_and_training_share_the_configured_limits(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for var, value in ENV.items():
        monkeypatch.setenv(var, value)
    worker = load(WorkerSettings)
    served = RecommendConfig.from_settings(worker)  # what the worker's refresher uses
    assert served == RecommendConfig(max_queries=3, max_new_tokens=40, prompt_signals=25, results_per_query=7,
                                     items_per_user=6, signal_queries=1,
                                     channel_weights=(("signals", 1.0), ("model", 2.0)))
    assert EvalConfig(ks=(5,), progress=False).recommend == served
    assert EvalConfig(ks=(5,), progress=False).window == WindowConfig(40, worker.window_max_age_s, 50)
    assert RewardConfig().recommend == served
    assert GRPORunConfig(train_data=tmp_path, output_dir=tmp_path, evaluate=False).max_completion_length == 40
    assert DistillConfig(teacher=tmp_path, train_data=tmp_path, output_dir=tmp_path,
                         student_layers=2).max_completion_length == 40


def test_prompt_signals_above_twenty_are_honoured() -> None:
    now = datetime(2026, 11, 1, tzinfo=UTC)
    state = UserState(signals=tuple(Signal(f"e{i}", "search", f"topic number {i}", now - timedelta(minutes=i))
                                    for i in range(30)))
    prompt = user_prompt(state, RecommendConfig(prompt_signals=25), now=now)
    assert sum(line.startswith("Searched: topic number") for line in prompt.splitlines()) == 25


def test_completions_are_parsed_with_the_serving_limits() -> None:
    completion = "\n".join(f"{i}. query {i} " + "word " * 40 for i in range(1, 9))
    queries = parse_completion(completion, RecommendConfig(max_queries=3))
    assert len(queries) == 3 and all(len(q) <= 120 for q in queries)
