"""GRPO teacher training: config checks (unit) and 2 real TRL steps on a tiny random model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.grpo import GRPOConfigError, GRPORunConfig, train_grpo
from training.rewards import REWARD_NAMES


def _config(tmp_path: Path, dataset: Path, tiny_model_dir: Path, **overrides: object) -> GRPORunConfig:
    raw = {"train_data": str(dataset), "eval_data": str(dataset), "output_dir": str(tmp_path / "run"),
           "base_model": str(tiny_model_dir.parent / "hf"), "num_generations": 4, "max_steps": 2,
           "save_steps": 1, "max_completion_length": 12, "eval_users": 6, "threads": 2} | overrides
    path = tmp_path / "grpo.json"
    path.write_text(json.dumps(raw))
    return GRPORunConfig.from_file(path)


def test_two_grpo_steps_end_to_end_then_resume(tmp_path: Path, small_sim_dataset: Path, tiny_model_dir: Path) -> None:
    cfg = _config(tmp_path, small_sim_dataset, tiny_model_dir)
    summary = train_grpo(cfg, progress=False)
    out = cfg.output_dir
    assert summary["steps"] == 2
    assert (out / "checkpoint-2").is_dir() and (out / "final" / "config.json").is_file()
    assert (out / "onnx" / "manifest.json").is_file() and (out / "rewards.png").stat().st_size > 0
    log_rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    step_rows = [r for r in log_rows if "loss" in r]
    assert len(step_rows) == 2
    for name in REWARD_NAMES:  # every reward computed and logged under rewards/<name>
        values = [r[f"rewards/{name}/mean"] for r in step_rows]
        assert all(0.0 <= v <= 1.0 for v in values), (name, values)
    assert all(r["reward_scoring_s"] >= 0 for r in step_rows)
    method = summary["eval"]["methods"][0]
    assert method["timings"]["users"] == 6
    assert 0.0 <= method["overall"]["recall@10"] <= 1.0
    assert json.loads((out / "eval.json").read_text())["methods"][0]["method"] == method["method"]

    # A longer run in the same directory refuses to start unless told to resume, then continues.
    longer = _config(tmp_path, small_sim_dataset, tiny_model_dir, max_steps=3, evaluate=False, export=False)
    with pytest.raises(GRPOConfigError, match="--resume"):
        train_grpo(longer, progress=False)
    resumed = train_grpo(longer, resume=True, progress=False)
    assert resumed["steps"] == 3
    assert (out / "checkpoint-3").is_dir()


@pytest.mark.parametrize(("override", "message"), [
    ({"reward_weights": {"relevance": 1.0}}, "unknown reward"),
    ({"reward_weights": {"align": 0.0}}, "at least one reward"),
    ({"reward_weights": {"align": -1.0}}, ">= 0"),
    ({"num_generations": 1}, "num_generations: must be at least 2"),
    ({"temperature": 0.0}, "GRPO needs sampling"),
    ({"learning_rate": 5.0}, "learning_rate"),
    ({"eval_data": None}, "evaluate: needs eval_data"),
    ({"export": False}, "needs export = true"),
    ({"epochs": 3}, "unknown config key"),
])
def test_bad_configs_say_how_to_fix(tmp_path: Path, override: dict[str, object], message: str) -> None:
    raw = {"train_data": "d", "eval_data": "d", "output_dir": "o"} | override
    with pytest.raises(GRPOConfigError, match=message):
        GRPORunConfig.from_dict(raw, base=tmp_path)


def test_config_file_errors(tmp_path: Path) -> None:
    with pytest.raises(GRPOConfigError, match="no such config file"):
        GRPORunConfig.from_file(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("max_steps = [")
    with pytest.raises(GRPOConfigError, match="not valid toml"):
        GRPORunConfig.from_file(bad)
    bad.write_text('train_data = "d"')
    with pytest.raises(GRPOConfigError, match="missing required key"):
        GRPORunConfig.from_file(bad)


def test_relative_paths_resolve_against_the_config_file(tmp_path: Path) -> None:
    path = tmp_path / "cfg" / "run.toml"
    path.parent.mkdir()
    path.write_text('train_data = "../data"\noutput_dir = "runs/a"\nevaluate = false\n'
                    '[reward_weights]\ncoverage = 0\nalign = 1\n')
    cfg = GRPORunConfig.from_file(path)
    assert cfg.train_data == (tmp_path / "data").resolve()
    assert cfg.output_dir == (tmp_path / "cfg" / "runs" / "a").resolve()
    assert cfg.weights[REWARD_NAMES.index("coverage")] == 0.0
    assert cfg.weights[REWARD_NAMES.index("format")] == 0.0  # unnamed rewards are off
