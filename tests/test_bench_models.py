"""``newsrec bench models`` and the torch QueryModel adapter, on the tiny random model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from commands.models_cli import main_for_tests
from models.export import parity_prompts
from models.runtime import OnnxCausalLM
from models.torch_lm import TorchCausalLM
from tools.bench_models import (
    FAST,
    STOP,
    ONNX_FP32,
    ONNX_INT4,
    ONNX_INT8,
    ROLES,
    STUDENT,
    TEACHER,
    compute_ratios,
    fixed_prompts,
    target_checks,
)

MEASURED = [TEACHER, STUDENT, ONNX_FP32, ONNX_FP32 + STOP, ONNX_FP32 + FAST, ONNX_INT8, ONNX_INT8 + STOP,
            ONNX_INT8 + FAST]
RATIO_KEYS = {
    "student_vs_teacher_users_per_s", "served_student", "served_vs_teacher_users_per_s", "onnx_vs_torch_users_per_s",
    "int8_vs_fp32_users_per_s", "int4_vs_fp32_users_per_s", "int4_vs_int8_users_per_s", "fast_vs_plain_users_per_s",
    "stop_vs_plain_users_per_s", "stop_minus_plain_recall@10",
    "served_vs_torch_users_per_s", "student_vs_teacher_recall@10", "int8_minus_fp32_recall@10",
    "int4_minus_fp32_recall@10", "fast_minus_plain_recall@10",
}


def test_torch_adapter_matches_onnx_greedy_in_a_padded_batch(tiny_model_dir: Path) -> None:
    prompts = parity_prompts() + fixed_prompts(3)  # different lengths: left padding is exercised
    torch_lm = TorchCausalLM(tiny_model_dir.parent / "hf", threads=1)
    onnx_lm = OnnxCausalLM(tiny_model_dir, providers=["CPUExecutionProvider"], intra_op_threads=1)
    assert torch_lm.eos_ids == onnx_lm.eos_ids
    assert torch_lm.generate_ids(prompts, max_new_tokens=8) == onnx_lm.generate_ids(prompts, max_new_tokens=8)
    assert torch_lm.version == "hf" and len(torch_lm.generate(prompts[:2], max_new_tokens=4)) == 2


def _bench(tmp_path: Path, *extra: str) -> tuple[int, dict[str, Any]]:
    out = tmp_path / "models.json"
    code = main_for_tests(["bench", "models", "--batch-sizes", "1,2", "--repeats", "1", "--threads", "1",
                           "--out", str(out), *extra])
    return code, json.loads(out.read_text()) if out.exists() else {}


def test_bench_models_plain_and_fast_with_eval(tiny_model_dir: Path, tiny_int8_dir: Path, small_sim_dataset: Path,
                                               tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hf = tiny_model_dir.parent / "hf"
    code, report = _bench(tmp_path, "--teacher", str(hf), "--student", str(hf), "--student-onnx", str(tiny_model_dir),
                          "--student-int8", str(tiny_int8_dir), "--data", str(small_sim_dataset), "--users", "4",
                          "--fast")
    assert code == 0
    assert list(report["models"]) == list(ROLES) and report["prompts"]["source"] == "dataset"
    assert [r for r in ROLES if report["models"][r]["skipped"]] == [ONNX_INT4, ONNX_INT4 + STOP, ONNX_INT4 + FAST]
    for role in MEASURED:
        row = report["models"][role]
        assert row["skipped"] is None and row["runtime"] == ("onnx" if "onnx" in role else "torch")
        assert set(row["batches"]) == {"1", "2"}
        for timing in row["batches"].values():
            assert timing["users_per_s"] > 0 and timing["ms_per_batch"] > 0
        assert row["peak_rss_mb"] >= row["rss_before_load_mb"] > 0
        assert row["eval"]["users"] == 4
        assert 0 <= row["eval"]["recall@10"] <= 1 and 0 <= row["eval"]["ndcg@10"] <= 1
    assert report["models"][ONNX_INT8]["version"].endswith("-int8")
    assert [report["models"][ONNX_INT8 + v]["variant"] for v in ("", STOP, FAST)] == ["plain", "stop", "lookup+stop"]
    assert report["models"][ONNX_FP32 + FAST]["batches"]["2"]["passes_per_batch"] >= 1
    # Without drafts a row makes at most one forward pass per new token.
    assert report["models"][ONNX_FP32 + STOP]["batches"]["2"]["passes_per_batch"] <= 48

    ratios = report["ratios"]
    assert set(ratios) == RATIO_KEYS
    for key in ("student_vs_teacher_users_per_s", "onnx_vs_torch_users_per_s", "int8_vs_fp32_users_per_s"):
        assert set(ratios[key]) == {"1", "2"} and all(v > 0 for v in ratios[key].values())
    assert ratios["served_student"]["2"] in MEASURED[1:]
    assert ratios["int8_minus_fp32_recall@10"] is not None and ratios["int4_minus_fp32_recall@10"] is None
    assert all(v > 0 for v in ratios["fast_vs_plain_users_per_s"][ONNX_INT8].values())
    assert all(v > 0 for v in ratios["stop_vs_plain_users_per_s"][ONNX_INT8].values())
    # The stop after the configured queries keeps the parsed queries: the same Recall.
    assert ratios["fast_minus_plain_recall@10"][ONNX_FP32] in (0.0, None)
    assert ratios["stop_minus_plain_recall@10"][ONNX_FP32] in (0.0, None)
    # Teacher and student are the same model here: same greedy queries, same Recall (None if it is 0).
    assert ratios["student_vs_teacher_recall@10"] in (1.0, None)
    assert len(report["targets"]) == 7
    assert all((t["met"] is None) == (t["value"] is None) for t in report["targets"])

    printed = capsys.readouterr().out
    assert "| student (ONNX int8) |" in printed and "ONNX fp32 / torch users/s (batch 2)" in printed
    assert "| student (ONNX int8) + lookup + stop |" in printed and "| student (ONNX int8) + stop |" in printed


def test_bench_skips_models_not_given(tiny_model_dir: Path, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    code, report = _bench(tmp_path, "--student-onnx", str(tiny_model_dir))
    assert code == 0
    assert report["prompts"]["source"] == "fixed"
    assert [r for r in ROLES if not report["models"][r]["skipped"]] == [ONNX_FP32]
    assert report["models"][ONNX_FP32]["eval"] is None
    assert set(report["ratios"]) == RATIO_KEYS
    assert report["ratios"]["onnx_vs_torch_users_per_s"] == {"1": None, "2": None}
    assert all(t["met"] is None for t in report["targets"])
    printed = capsys.readouterr().out
    assert "--teacher not given: skipping it" in printed and "teacher (torch): skipped (not given)" in printed


def test_ratios_and_targets_from_rows() -> None:
    def row(users_per_s: float, recall: float) -> dict[str, Any]:
        return {"skipped": None, "batches": {"8": {"users_per_s": users_per_s}}, "eval": {"recall@10": recall}}

    rows = {TEACHER: row(1.0, 0.40), STUDENT: row(10.0, 0.39), ONNX_FP32: row(25.0, 0.39), ONNX_INT8: row(40.0, 0.375),
            ONNX_INT4: row(50.0, 0.385), ONNX_INT4 + STOP: row(60.0, 0.385), ONNX_INT4 + FAST: row(75.0, 0.385)}
    ratios = compute_ratios(rows, (8,))
    assert ratios["student_vs_teacher_users_per_s"] == {"8": 10.0}
    assert ratios["served_student"] == {"8": ONNX_INT4 + FAST} and ratios["served_vs_teacher_users_per_s"] == {"8": 75.0}
    assert ratios["served_vs_torch_users_per_s"] == {"8": 7.5}
    assert ratios["onnx_vs_torch_users_per_s"] == {"8": 2.5} and ratios["int8_vs_fp32_users_per_s"] == {"8": 1.6}
    assert ratios["int4_vs_fp32_users_per_s"] == {"8": 2.0} and ratios["int4_vs_int8_users_per_s"] == {"8": 1.25}
    assert ratios["fast_vs_plain_users_per_s"] == {ONNX_FP32: {"8": None}, ONNX_INT8: {"8": None},
                                                   ONNX_INT4: {"8": 1.5}}
    assert ratios["student_vs_teacher_recall@10"] == 0.975 and ratios["int8_minus_fp32_recall@10"] == -0.015
    assert ratios["int4_minus_fp32_recall@10"] == -0.005
    assert ratios["fast_minus_plain_recall@10"] == {ONNX_FP32: None, ONNX_INT8: None, ONNX_INT4: 0.0}
    assert ratios["stop_vs_plain_users_per_s"] == {ONNX_FP32: {"8": None}, ONNX_INT8: {"8": None},
                                                   ONNX_INT4: {"8": 1.2}}
    met = {t["name"]: t["met"] for t in target_checks(ratios, (8,))}
    assert met == {"student Recall@10 / teacher": True, "served student users/s / teacher (batch 8)": True,
                   "served student / student torch users/s (batch 8)": True,
                   "ONNX fp32 / torch users/s (batch 8)": True, "int8 / fp32 users/s (batch 8)": True,
                   "int8 - fp32 Recall@10": False, "int4 - fp32 Recall@10": True}


@pytest.mark.parametrize("args, message", [
    ([], "nothing to benchmark"),
    (["--student-onnx", "{hf}"], "not an exported model dir (no manifest.json)"),
    (["--teacher", "{onnx}"], "not a Hugging Face model directory"),
    (["--student-onnx", "{onnx}", "--batch-sizes", "1,x"], "--batch-sizes expects comma-separated integers"),
])
def test_bench_rejects_bad_input(args: list[str], message: str, tiny_model_dir: Path, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    paths = {"hf": str(tiny_model_dir.parent / "hf"), "onnx": str(tiny_model_dir)}
    code, report = _bench(tmp_path, *(a.format(**paths) for a in args))
    assert code == 2 and report == {}
    assert message in capsys.readouterr().err
