"""Scaling studies: best-of-N selection (unit) and both studies end to end on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evaluation.dataset import load_dataset
from models import runtime
from models.runtime import OnnxCausalLM
from streams.recommend import RecommendConfig, user_prompt
from streams.window import UserState
from training.grpo import GRPORunConfig
from training.sampling import Samples, best_of
from training.study import (
    PromptKeyedQueries,
    capacity_study,
    sampling_study,
    save_study,
)


def test_best_of_takes_the_best_prefix_score_and_the_earliest_tie() -> None:
    scores = [0.2, 0.5, 0.5, 0.9]
    assert [best_of(scores, n) for n in (1, 2, 3, 4)] == [0, 1, 1, 3]
    with pytest.raises(ValueError, match="n must be in 1..4"):
        best_of(scores, 5)


def test_prompt_keyed_queries_serve_by_the_users_prompt() -> None:
    cfg = RecommendConfig()
    empty = UserState()
    method = PromptKeyedQueries("fixed", {user_prompt(empty, cfg): ["a query"]})
    assert method.queries([empty, empty], cfg) == [["a query"], ["a query"]]


def test_sampling_study_on_a_tiny_model(small_sim_dataset: Path, tiny_model_dir: Path, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    batches: list[int] = []  # greedy ONNX batches
    decode = OnnxCausalLM._decode
    monkeypatch.setattr(OnnxCausalLM, "_decode", lambda lm, prompts, **kw: (
        kw["choose"] is runtime._greedy and batches.append(len(prompts))) or decode(lm, prompts, **kw))
    study = sampling_study(load_dataset(small_sim_dataset), tiny_model_dir, [1, 2, 4], users=5, batch_users=2,
                           progress=False)
    assert batches == [2, 2, 1]  # greedy in batches too: all users in one pass ran out of memory at 300
    labels = [p["label"] for p in study["points"]]
    assert labels == ["greedy", "N=1", "N=2", "N=4"]
    rewards = [p["reward"] for p in study["points"][1:]]
    # The best of a longer prefix of the same samples can only score higher.
    assert rewards == sorted(rewards)
    assert all(0.0 <= p["recall@10"] <= 1.0 for p in study["points"])
    assert study["points"][-1]["tokens_per_user"] == pytest.approx(4 * study["mean_completion_tokens"], abs=0.2)
    save_study(study, tmp_path / "s.json", tmp_path / "s.png")
    assert json.loads((tmp_path / "s.json").read_text())["study"] == "sampling"
    assert (tmp_path / "s.png").stat().st_size > 0


def test_capacity_study_trains_each_depth(small_sim_dataset: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    base = GRPORunConfig.from_dict({
        "train_data": str(small_sim_dataset), "eval_data": str(small_sim_dataset), "output_dir": str(tmp_path / "x"),
        "base_model": str(tiny_model_dir.parent / "hf"), "num_generations": 2, "max_steps": 1, "save_steps": 1,
        "max_completion_length": 8, "eval_users": 3, "threads": 2})
    study = capacity_study(base, [1, None], out_dir=tmp_path / "cap", progress=False)
    one, full = study["points"]
    assert (one["layers"], full["layers"]) == (1, None)
    assert one["parameters"] < full["parameters"]
    assert json.loads((tmp_path / "cap" / "layers-1" / "final" / "config.json").read_text())["num_hidden_layers"] == 1
    again = capacity_study(base, [1], out_dir=tmp_path / "cap", progress=False)  # finished runs are reused
    assert again["points"][0] == one


def test_samples_serve_the_best_completion() -> None:
    samples = Samples([["a", "b", "c"], ["d", "e"]], [[0.1, 0.5, 0.5], [0.9, 0.2]], [[1, 1, 1], [1, 1]], 0.0, 0.0)
    assert samples.best() == [1, 0] and samples.selected() == ["b", "d"]
    assert samples.selected(1) == ["a", "d"]


def test_eval_serves_a_best_of_n_teacher(small_sim_dataset: Path, tiny_model_dir: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    from commands.cli import main

    out = tmp_path / "eval.json"
    assert main(["eval", "--data", str(small_sim_dataset), "--model", f"best-of-2:{tiny_model_dir}",
                 "--samples", "3", "--no-diversity", "--out", str(out)]) == 0
    (method,) = json.loads(out.read_text())["methods"]
    assert method["method"].startswith("best-of-2:") and method["timings"]["users"] == 3
    assert main(["eval", "--data", str(small_sim_dataset), "--model", f"best-of-2:{tmp_path / 'nope'}"]) == 2
    assert "not an ONNX model directory" in capsys.readouterr().err
