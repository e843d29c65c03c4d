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
    # Two training dirs (as real + simulated users would be): each row is scored by its own.
    cfg = _config(tmp_path, small_sim_dataset, tiny_model_dir,
                  train_data=[str(small_sim_dataset), str(small_sim_dataset)], train_users=3)
    summary = train_grpo(cfg, progress=False)
    out = cfg.output_dir
    assert summary["train_prompts_by_dir"] == [[str(small_sim_dataset), 3]] * 2 and summary["train_prompts"] == 6
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
    ({"train_data": []}, "train_data: give a dataset directory"),
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
    assert cfg.train_data == ((tmp_path / "data").resolve(),)
    assert cfg.output_dir == (tmp_path / "cfg" / "runs" / "a").resolve()
    assert cfg.weights[REWARD_NAMES.index("coverage")] == 0.0
    assert cfg.weights[REWARD_NAMES.index("format")] == 0.0  # unnamed rewards are off


def test_train_data_takes_real_and_simulated_dirs(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text('train_data = ["mind", "/abs/sim"]\noutput_dir = "o"\nevaluate = false\n')
    assert GRPORunConfig.from_file(path).train_data == ((tmp_path / "mind").resolve(), Path("/abs/sim"))


def _news(prefix: str, titles: list[str]) -> list:
    from streams.contracts import NewsArticle

    return [NewsArticle(news_id=f"{prefix}{i}", category="news", subcategory=f"sub{i}", title=t)
            for i, t in enumerate(titles)]


def _columns(contexts: list, sources: list[int]) -> dict[str, list]:
    """The reward kwargs TRL passes: one list per dataset column."""
    rows = [ctx.to_row() | {"source": s} for ctx, s in zip(contexts, sources, strict=True)]
    return {key: [row[key] for row in rows] for key in rows[0]}


def test_rewards_score_each_row_with_its_datasets_scorer_and_hybrid(tmp_path: Path, monkeypatch) -> None:
    """utility is the gain over the row's own hybrid (its other channels' lists travel in the
    row), scored against the row's own dataset (``source``)."""
    from training.grpo import reward_functions
    from training.scoring import RewardScorer, UserContext

    monkeypatch.setenv("NEWSREC_EMBEDDING_STORE", str(tmp_path / "vectors.sqlite"))
    real = RewardScorer(_news("R", ["volcano erupts near island village", "city council budget vote",
                                    "tennis open final result"]))
    sim = RewardScorer(_news("S", ["quantum computer chip record", "pasta recipe with garlic"]), embedder=real.embedder)
    utility = dict(zip(REWARD_NAMES, reward_functions([real, sim]), strict=True))["utility"]
    completion = "1. volcano erupts island\n2. quantum computer chip"
    alone = UserContext(("earth news",), ("sub0",), targets=("R0",))
    found_by_others = UserContext(("earth news",), ("sub0",), targets=("R0",), base=(("dense", ("R0",)),))
    sim_user = UserContext(("tech",), ("sub0",), targets=("S0",))
    scores = utility([completion] * 3, **_columns([alone, found_by_others, sim_user], [0, 0, 1]))
    assert scores[0] == pytest.approx(1.0)  # the model's query alone finds the held-out click
    assert scores[1] == pytest.approx(0.0)  # dense already found it: the model adds nothing
    assert scores[2] == pytest.approx(1.0)  # searched in the simulated corpus, not the real one
    # The same simulated user scored against the real corpus would find nothing.
    assert utility([completion], **_columns([sim_user], [0]))[0] == pytest.approx(0.0)
    real.close()
    sim.close()


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "configs").glob("grpo-*.toml")),
                         ids=lambda p: p.name)
def test_shipped_configs_parse(path: Path) -> None:
    cfg = GRPORunConfig.from_file(path)
    assert len(cfg.train_data) == 2 and cfg.eval_data is not None and cfg.max_steps > 0
