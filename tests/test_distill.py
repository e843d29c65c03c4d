"""Distillation: tiny teacher -> tiny student, 2 steps of each method, exported and evaluated."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from streams.settings import ConfigError
from training.distill import DistillConfig, distill


@pytest.mark.parametrize("method", ["on-policy", "supervised"])
def test_tiny_distillation_two_steps(method: str, small_sim_dataset: Path, tiny_model_dir: Path,
                                     tmp_path: Path) -> None:
    teacher = tiny_model_dir.parent / "hf"
    cfg = DistillConfig(teacher=teacher, train_data=small_sim_dataset, output_dir=tmp_path / method,
                        student_layers=1, method=method, train_users=6, eval_data=small_sim_dataset, eval_users=4,
                        max_steps=2, batch_size=2, max_completion_length=8, threads=2)
    summary = distill(cfg, progress=False)
    assert summary["teacher_layers"] == 2
    assert len(summary["losses"]) == 2 and all(loss == loss for loss in summary["losses"])  # 2 steps, no NaN
    student_cfg = json.loads((cfg.output_dir / "final" / "config.json").read_text())
    assert student_cfg["num_hidden_layers"] == 1
    manifest = json.loads((cfg.output_dir / "onnx" / "manifest.json").read_text())
    assert manifest["parent"] == teacher.name
    assert summary["eval"]["methods"][0]["timings"]["users"] == 4
    with pytest.raises(ConfigError, match="not empty"):
        distill(cfg, progress=False)


def test_bad_distill_config() -> None:
    with pytest.raises(ConfigError, match="student_layers"):
        DistillConfig(teacher=Path("t"), train_data=Path("d"), output_dir=Path("o"), student_layers=0)
    with pytest.raises(ConfigError, match="method"):
        DistillConfig(teacher=Path("t"), train_data=Path("d"), output_dir=Path("o"), student_layers=1,
                      method="offline")  # type: ignore[arg-type]


def test_no_distillation_keeps_the_teachers_first_blocks_and_seeds_a_later_run(small_sim_dataset: Path, tiny_model_dir: Path,
                                                        tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    teacher_dir = tiny_model_dir.parent / "hf"
    cfg = DistillConfig(teacher=teacher_dir, train_data=small_sim_dataset, output_dir=tmp_path / "none",
                        student_layers=1, method="none", train_users=2)
    summary = distill(cfg, progress=False)
    assert summary["losses"] == []
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).state_dict()
    student = AutoModelForCausalLM.from_pretrained(cfg.output_dir / "final").state_dict()
    assert not any(".layers.1." in k for k in student)
    for name, weight in student.items():
        assert torch.equal(weight, teacher[name]), name
    assert (cfg.output_dir / "onnx" / "manifest.json").is_file()

    # on-policy from that student (the supervised -> on-policy chain) trains it further
    chained = distill(DistillConfig(teacher=teacher_dir, train_data=small_sim_dataset, output_dir=tmp_path / "chain",
                                    student_layers=1, student_init=cfg.output_dir / "final", train_users=2,
                                    max_steps=1, batch_size=2, max_completion_length=4), progress=False)
    assert len(chained["losses"]) == 1
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "chain" / "final").state_dict()
    assert any(not torch.equal(trained[k], student[k]) for k in student)


def test_sequence_distillation_learns_the_teachers_best_of_n(small_sim_dataset: Path, tiny_model_dir: Path,
                                                             tmp_path: Path) -> None:
    """The teacher samples N completions per prompt (its ONNX export), the test-time rewards pick
    one, and the whole-model student is fine-tuned on the picks."""
    teacher = tiny_model_dir.parent / "hf"
    cfg = DistillConfig(teacher=teacher, train_data=small_sim_dataset, output_dir=tmp_path / "seq",
                        method="sequence", teacher_samples=3, teacher_onnx=tiny_model_dir, train_users=4,
                        max_steps=2, batch_size=2, max_completion_length=8, threads=2)
    assert cfg.train_data == (small_sim_dataset,) and cfg.student_layers is None
    summary = distill(cfg, progress=False)
    assert len(summary["losses"]) == 2
    (stats,) = summary["teacher_sampling"]
    assert stats["prompts"] == 4
    assert stats["selected_reward"] >= stats["first_sample_reward"]  # the best of 3 includes the first
    student_cfg = json.loads((cfg.output_dir / "final" / "config.json").read_text())
    assert student_cfg["num_hidden_layers"] == summary["teacher_layers"] == 2  # the whole model
