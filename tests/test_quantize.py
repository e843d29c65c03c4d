"""int8 dynamic and int4 weight-only quantisation and ``newsrec export``, on the tiny random model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from commands.models_cli import main_for_tests
from models import export as export_mod
from models import quantize as quantize_mod
from models.export import ExportValidationError, parity_prompts
from models.manifest import read_manifest, sha256_file, verify_manifest
from models.quantize import Int4Settings, QuantizeSettings, quantize_int4, quantize_int8
from models.runtime import OnnxCausalLM

QUALITY_KEYS = {
    "vs_fp32_top1_agreement", "vs_fp32_first_token_agreement", "vs_fp32_positions", "vs_fp32_max_abs_logit_diff",
    "vs_fp32_mean_abs_logit_diff", "vs_fp32_greedy_token_agreement", "vs_fp32_greedy_exact_match",
}
# The tiny model's weights are wide random normals (std 0.2): 4-bit blocks of them move its
# near-tied logits far more than a trained model's (SmolLM2-135M: 0.80 agreement, the default
# gate 0.5). It agrees on ~0.26; a broken model on ~0 of a 49k vocabulary.
TINY_INT4_GATE = 0.15


def _ops(model_dir: Path) -> list[str]:
    return [n.op_type for n in onnx.load(str(model_dir / "model.onnx"), load_external_data=False).graph.node]


def test_int8_manifest_verifies_and_records_quality(tiny_model_dir: Path, tiny_int8_dir: Path) -> None:
    fp32 = read_manifest(tiny_model_dir)
    manifest = verify_manifest(tiny_int8_dir)
    assert manifest.name == fp32.name
    assert manifest.version == f"{fp32.version}-int8" and manifest.parent == fp32.version
    assert manifest.files["model.onnx"] == sha256_file(tiny_int8_dir / "model.onnx")
    assert {"tokenizer.json", "config.json", "generation_config.json"} <= set(manifest.files)

    quant = manifest.export["quantization"]
    assert manifest.export["dtype"] == "int8" and manifest.export["source"] == str(tiny_model_dir)
    assert quant["weight_type"] == "QInt8" and quant["per_channel"] is True and quant["exclude"] == "down_proj"
    # 2 layers x (q, k, v, o, gate, up) + the tied lm_head (folded out of its Transpose); down_proj stays fp32.
    assert quant["folded_transposes"] == 1 and quant["excluded_nodes"] == 2
    assert quant["int8_matmuls"] == 13 == _ops(tiny_int8_dir).count("MatMulInteger")

    m = manifest.metrics
    assert QUALITY_KEYS <= set(m)
    assert m["vs_fp32_top1_agreement"] >= QuantizeSettings().min_top1_agreement
    assert 0 <= m["vs_fp32_greedy_token_agreement"] <= 1 and 0 <= m["vs_fp32_first_token_agreement"] <= 1
    assert m["vs_fp32_positions"] > len(parity_prompts())  # teacher-forced prefixes, not just the prompts
    assert 0 < m["vs_fp32_mean_abs_logit_diff"] <= m["vs_fp32_max_abs_logit_diff"]


def test_int8_model_loads_and_generates(tiny_model_dir: Path, tiny_int8_dir: Path) -> None:
    lm = OnnxCausalLM(tiny_int8_dir, providers=["CPUExecutionProvider"], intra_op_threads=1)
    assert lm.version is not None and lm.version.endswith("-int8")
    prompts = parity_prompts()
    logits = lm.next_token_logits(prompts)
    assert logits.shape[0] == len(prompts) and np.isfinite(logits).all()
    assert len(lm.generate(prompts, max_new_tokens=4)) == len(prompts)


def test_exclude_none_quantises_every_matmul_with_a_weight(tiny_model_dir: Path, tmp_path: Path) -> None:
    manifest = quantize_int8(tiny_model_dir, tmp_path / "all", settings=QuantizeSettings(exclude=None))
    assert manifest.export["quantization"]["int8_matmuls"] == 15 == _ops(tmp_path / "all").count("MatMulInteger")


def test_int8_below_agreement_threshold_is_not_published(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "strict"
    with pytest.raises(ExportValidationError, match="agrees with fp32"):
        quantize_int8(tiny_model_dir, out, settings=QuantizeSettings(min_top1_agreement=1.01))
    assert list(tmp_path.iterdir()) == []  # neither the model dir nor its staging dir


def test_int8_that_cannot_run_is_not_published(tiny_model_dir: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(src: Path, dst: Path, settings: QuantizeSettings, *, external_data: bool) -> dict[str, int]:
        dst.write_bytes(b"not an onnx model")
        return {}

    monkeypatch.setattr(quantize_mod, "_quantize", broken)
    with pytest.raises(ExportValidationError, match="does not run"):
        quantize_int8(tiny_model_dir, tmp_path / "broken")
    assert list(tmp_path.iterdir()) == []


def test_int4_passes_the_gate_and_records_quality(tiny_model_dir: Path, tmp_path: Path) -> None:
    manifest = quantize_int4(tiny_model_dir, tmp_path / "q4", settings=Int4Settings(min_top1_agreement=TINY_INT4_GATE))
    fp32 = read_manifest(tiny_model_dir)
    assert verify_manifest(tmp_path / "q4") == manifest
    assert (manifest.version, manifest.parent) == (f"{fp32.version}-int4", fp32.version)
    quant = manifest.export["quantization"]
    assert manifest.export["dtype"] == "int4" and quant["block_size"] == 32 and quant["accuracy_level"] == 4
    # 2 layers x 7 projections + the tied lm_head; the embedding Gather too.
    ops = _ops(tmp_path / "q4")
    assert quant["int4_matmuls"] == 15 == ops.count("MatMulNBits")
    assert quant["int4_gathers"] == 1 == ops.count("GatherBlockQuantized")
    m = manifest.metrics
    assert QUALITY_KEYS <= set(m) and m["vs_fp32_top1_agreement"] >= TINY_INT4_GATE
    assert m["size_vs_fp32"] < 0.5
    lm = OnnxCausalLM(tmp_path / "q4", intra_op_threads=1)
    assert len(lm.generate(parity_prompts(), max_new_tokens=4)) == 2


def test_int4_can_keep_the_embedding_and_lm_head(tiny_model_dir: Path, tmp_path: Path) -> None:
    settings = Int4Settings(embedding=False, lm_head=False, block_size=128, min_top1_agreement=TINY_INT4_GATE)
    quant = quantize_int4(tiny_model_dir, tmp_path / "q4", settings=settings).export["quantization"]
    assert (quant["int4_matmuls"], quant["int4_gathers"]) == (14, 0)
    assert "GatherBlockQuantized" not in _ops(tmp_path / "q4")


def test_int4_below_agreement_threshold_is_not_published(tiny_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ExportValidationError, match="int4 next-token choice agrees with fp32"):
        quantize_int4(tiny_model_dir, tmp_path / "strict", settings=Int4Settings(min_top1_agreement=1.01))
    assert list(tmp_path.iterdir()) == []


# --- newsrec export -------------------------------------------------------------------------


def test_export_cli_publishes_fp32_and_int8(tiny_model_dir: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    hf = tiny_model_dir.parent / "hf"
    out = tmp_path / "student"
    code = main_for_tests(["export", "--model", str(hf), "--out", str(out), "--int8",
                           "--name", "student", "--version", "s-1", "--parent", "teacher-3"])
    assert code == 0
    fp32, int8 = verify_manifest(out), verify_manifest(tmp_path / "student-int8")
    assert (fp32.name, fp32.version, fp32.parent) == ("student", "s-1", "teacher-3")
    assert fp32.metrics["parity_greedy_tokens_match"] is True
    assert (int8.version, int8.parent) == ("s-1-int8", "s-1")
    printed = capsys.readouterr().out
    assert "published student s-1 at" in printed and "published student s-1-int8 at" in printed


def test_export_cli_publishes_int4_with_its_gate(tiny_model_dir: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "student"
    code = main_for_tests(["export", "--model", str(tiny_model_dir.parent / "hf"), "--out", str(out), "--int4",
                           "--int4-block-size", "128", "--min-agreement", str(TINY_INT4_GATE), "--name", "student",
                           "--version", "s-1"])
    assert code == 0
    int4 = verify_manifest(tmp_path / "student-int4")
    assert int4.version == "s-1-int4" and int4.export["quantization"]["block_size"] == 128
    assert int4.export["quantization"]["min_top1_agreement"] == TINY_INT4_GATE
    assert "published student s-1-int4 at" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student", "student-int4"]


def test_export_cli_refuses_when_parity_fails(tiny_model_dir: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    def failing(*args: object, **kwargs: object) -> dict[str, object]:
        raise ExportValidationError("prompt 0: greedy tokens differ")

    monkeypatch.setattr(export_mod, "validate_parity", failing)
    out = tmp_path / "m"
    code = main_for_tests(["export", "--model", str(tiny_model_dir.parent / "hf"), "--out", str(out), "--int8"])
    assert code == 1
    assert "refused to publish" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no fp32 dir, no int8 dir, no staging left behind


@pytest.mark.parametrize("make", ["missing", "empty"])
def test_export_cli_rejects_a_dir_that_is_not_a_hf_model(make: str, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    model = tmp_path / "not-a-model"
    if make == "empty":
        model.mkdir()
    code = main_for_tests(["export", "--model", str(model), "--out", str(tmp_path / "out")])
    assert code == 2
    err = capsys.readouterr().err
    assert f"--model {model}: not a Hugging Face model directory (no config.json)" in err
    assert not (tmp_path / "out").exists()


def test_export_cli_will_not_clobber_without_overwrite(tiny_model_dir: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code = main_for_tests(["export", "--model", str(tiny_model_dir.parent / "hf"), "--out", str(out)])
    assert code == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"


def test_export_cli_keeps_fp32_when_int8_is_refused(tiny_model_dir: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    def failing(*args: object, **kwargs: object) -> dict[str, object]:
        raise ExportValidationError("int8 model does not run: boom")

    monkeypatch.setattr(quantize_mod, "validate_quantized", failing)
    out = tmp_path / "m"
    code = main_for_tests(["export", "--model", str(tiny_model_dir.parent / "hf"), "--out", str(out), "--int8",
                           "--int8-out", str(tmp_path / "q")])
    assert code == 1
    assert "refused to publish int8" in capsys.readouterr().err
    verify_manifest(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_export_cli_int8_options_need_int8(tiny_model_dir: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    code = main_for_tests(["export", "--model", str(tiny_model_dir.parent / "hf"), "--out", str(tmp_path / "m"),
                           "--int8-exclude", ""])
    assert code == 2 and "only apply with --int8" in capsys.readouterr().err
    code = main_for_tests(["export", "--model", str(tiny_model_dir.parent / "hf"), "--out", str(tmp_path / "m"),
                           "--int4-block-size", "32"])
    assert code == 2 and "only apply with --int4" in capsys.readouterr().err


def test_export_names_a_training_runs_final_dir_after_the_run(tmp_path: Path) -> None:
    from commands.models_cli import default_model_name

    assert default_model_name(tmp_path / "distill-sup" / "final") == "distill-sup"
    assert default_model_name(tmp_path / "my-model") == "my-model"
