from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from models import export as export_mod
from models.export import ExportValidationError, export_onnx
from models.manifest import ModelIntegrityError, read_manifest, sha256_file, verify_manifest
from models.prompt import render_chatml
from models.runtime import OnnxCausalLM
from models.tiny import TINY_NAME, build_tiny_model

PROMPTS = [
    render_chatml([{"role": "user", "content": "hi"}]),
    render_chatml([{"role": "user", "content": "Tell me the latest news about electric vehicle batteries in Europe"}]),
    render_chatml(
        [
            {"role": "system", "content": "You write news search queries."},
            {"role": "user", "content": "Recent activity: football transfers, Lisbon rentals, SpaceX launches, "
             "the Federal Reserve rate decision and a new Nintendo console. Write queries."},
        ]
    ),
]


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    build_tiny_model(root, seed=0)
    return root


@pytest.fixture(scope="module")
def tiny_dir(tiny_root: Path) -> Path:
    return tiny_root / "onnx"


@pytest.fixture(scope="module")
def lm(tiny_dir: Path) -> OnnxCausalLM:
    return OnnxCausalLM(tiny_dir, intra_op_threads=1)


@pytest.fixture
def model_copy(tiny_dir: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(tiny_dir, dst)
    return dst


# --- manifest ------------------------------------------------------------------------------


def test_manifest_verifies(tiny_dir: Path) -> None:
    manifest = verify_manifest(tiny_dir)
    assert manifest.name == TINY_NAME and manifest.version == "tiny-0"
    assert {"model.onnx", "tokenizer.json", "config.json"} <= set(manifest.files)
    assert "manifest.json" not in manifest.files and "tokenizer.model" not in manifest.files
    assert manifest.files["model.onnx"] == sha256_file(tiny_dir / "model.onnx")
    assert manifest.sizes["model.onnx"] == (tiny_dir / "model.onnx").stat().st_size
    assert manifest.export["task"] == "text-generation-with-past"


def test_manifest_is_frozen(tiny_dir: Path) -> None:
    manifest = read_manifest(tiny_dir)
    with pytest.raises(Exception):
        manifest.version = "other"  # type: ignore[misc]


def test_tampered_byte_is_rejected(model_copy: Path) -> None:
    onnx_path = model_copy / "model.onnx"
    data = bytearray(onnx_path.read_bytes())
    data[len(data) // 2] ^= 0x01
    onnx_path.write_bytes(bytes(data))
    with pytest.raises(ModelIntegrityError, match="checksum mismatch.*model.onnx"):
        verify_manifest(model_copy)
    with pytest.raises(ModelIntegrityError, match="model.onnx"):
        OnnxCausalLM(model_copy)


def test_truncated_file_is_rejected(model_copy: Path) -> None:
    path = model_copy / "tokenizer.json"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ModelIntegrityError, match="tokenizer.json.*size"):
        verify_manifest(model_copy)


def test_missing_and_extra_files_are_rejected(model_copy: Path) -> None:
    (model_copy / "notes.txt").write_text("hi")
    with pytest.raises(ModelIntegrityError, match="notes.txt.*not listed"):
        verify_manifest(model_copy)
    (model_copy / "notes.txt").unlink()
    (model_copy / "config.json").unlink()
    with pytest.raises(ModelIntegrityError, match="config.json.*missing"):
        verify_manifest(model_copy)


def test_missing_or_corrupt_manifest(model_copy: Path) -> None:
    (model_copy / "manifest.json").write_text("{not json")
    with pytest.raises(ModelIntegrityError, match="not a valid manifest"):
        verify_manifest(model_copy)
    (model_copy / "manifest.json").unlink()
    with pytest.raises(ModelIntegrityError, match="missing"):
        verify_manifest(model_copy)


# --- runtime -------------------------------------------------------------------------------


def test_runtime_metadata(lm: OnnxCausalLM) -> None:
    assert lm.version == "tiny-0"
    assert "CPUExecutionProvider" in lm.providers
    assert lm.providers == lm.session.get_providers()
    assert lm.tokenizer.convert_tokens_to_ids("<|im_end|>") in lm.eos_ids


def test_explicit_cpu_provider(tiny_dir: Path) -> None:
    assert OnnxCausalLM(tiny_dir, providers=["CPUExecutionProvider"]).providers == ["CPUExecutionProvider"]


def test_batched_generation_matches_single(lm: OnnxCausalLM) -> None:
    lengths = [len(lm.tokenizer(p, add_special_tokens=False).input_ids) for p in PROMPTS]
    assert len(set(lengths)) == 3  # really exercises left padding
    batched = lm.generate_ids(PROMPTS, max_new_tokens=12)
    single = [lm.generate_ids([p], max_new_tokens=12)[0] for p in PROMPTS]
    assert batched == single
    assert all(len(ids) > 0 for ids in batched)
    # Also in a different batch order (padding differs per row).
    assert lm.generate_ids(PROMPTS[::-1], max_new_tokens=12) == single[::-1]


def test_row_prefill_equals_the_padded_batch_pass(lm: OnnxCausalLM) -> None:
    # The CPU prefill runs each row alone (no pad positions computed); it must leave the
    # logits and the (masked, left-padded) cache that one padded batch pass leaves.
    input_ids, mask = lm._encode(PROMPTS)
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    padded_logits, padded_past = lm._run(input_ids, mask, positions, lm._empty_past(len(PROMPTS)))
    row_logits, row_past = lm._prefill_rows(input_ids, mask)
    np.testing.assert_allclose(row_logits, padded_logits, atol=1e-4)
    assert set(row_past) == set(padded_past)
    real = mask.astype(bool)  # (batch, seq): only these cache slots are ever attended to
    for name, value in padded_past.items():
        padded = value.numpy()
        assert row_past[name].shape == padded.shape
        np.testing.assert_allclose(row_past[name].transpose(0, 2, 1, 3)[real], padded.transpose(0, 2, 1, 3)[real],
                                   atol=1e-4)
        assert not row_past[name].transpose(0, 2, 1, 3)[~real].any()


def test_row_prefill_computes_a_repeated_prompt_once(lm: OnnxCausalLM, monkeypatch: pytest.MonkeyPatch) -> None:
    # Best-of-N feeds each prompt N times: one pass per distinct prompt, the same result.
    rows = [PROMPTS[0], PROMPTS[1], PROMPTS[0], PROMPTS[1], PROMPTS[0]]
    input_ids, mask = lm._encode(rows)
    expected_logits, expected_past = lm._prefill_rows(input_ids[[0, 1]], mask[[0, 1]])
    passes = []
    run = lm._run
    monkeypatch.setattr(lm, "_run", lambda ids, *a, **kw: passes.append(ids.shape) or run(ids, *a, **kw))
    row_logits, row_past = lm._prefill_rows(input_ids, mask)
    assert len(passes) == 2
    width = input_ids.shape[1]
    for r, src in enumerate([0, 1, 0, 1, 0]):
        np.testing.assert_array_equal(row_logits[r], expected_logits[src])
        for name, value in row_past.items():  # the same cache, aligned to this batch's width
            n = int(mask[r].sum())
            np.testing.assert_array_equal(value[r, :, width - n:], expected_past[name][src, :, -n:])
            assert not value[r, :, : width - n].any()


def test_generate_in_batches_gives_the_same_tokens(lm: OnnxCausalLM) -> None:
    whole = lm.generate_ids(PROMPTS, max_new_tokens=6)
    assert lm.generate_ids(PROMPTS, max_new_tokens=6, batch_size=2) == whole
    assert lm.last_stats is not None and lm.last_stats.batches == 2 and lm.last_stats.batch_size == 2
    with pytest.raises(ValueError, match="batch_size"):
        lm.generate_ids(PROMPTS, batch_size=0)


def test_generate_text_and_stats(lm: OnnxCausalLM) -> None:
    texts = lm.generate(PROMPTS, max_new_tokens=5)
    ids = lm.generate_ids(PROMPTS, max_new_tokens=5)
    assert texts == lm.tokenizer.batch_decode(ids, skip_special_tokens=True)
    assert all(len(row) <= 5 for row in ids)
    assert all("<|im_end|>" not in t for t in texts)
    stats = lm.last_stats
    assert stats is not None and stats.batch_size == 3 and 1 <= stats.new_tokens <= 5
    assert stats.total_s >= stats.prefill_s > 0
    assert lm.generate([]) == []


def test_generation_stops_at_eos(tiny_dir: Path) -> None:
    lm = OnnxCausalLM(tiny_dir)
    first = lm.generate_ids([PROMPTS[0]], max_new_tokens=3)[0]
    # Declare the model's first greedy token an eos: that row must stop immediately and
    # the whole batch must stop once every row is done.
    lm.eos_ids = frozenset({first[0]})
    assert lm.generate_ids([PROMPTS[0]], max_new_tokens=10) == [[]]
    assert lm.last_stats is not None and lm.last_stats.new_tokens == 1


# --- export --------------------------------------------------------------------------------


def test_export_parity_recorded(tiny_dir: Path) -> None:
    manifest = verify_manifest(tiny_dir)
    assert manifest.metrics["parity_greedy_tokens_match"] is True
    assert manifest.metrics["parity_max_abs_logit_diff"] < 1e-3
    assert manifest.export["dtype"] == "fp32" and manifest.export["opset_used"]


def test_batched_onnx_matches_torch_greedy(tiny_root: Path, lm: OnnxCausalLM) -> None:
    import torch

    model = export_mod._load_reference_model(tiny_root / "hf")
    onnx_ids = lm.generate_ids(PROMPTS, max_new_tokens=8)
    for prompt, got in zip(PROMPTS, onnx_ids, strict=True):
        ids = torch.tensor([lm.tokenizer(prompt, add_special_tokens=False).input_ids])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                             eos_token_id=sorted(lm.eos_ids), pad_token_id=lm.pad_id)
        ref = out[0, ids.shape[1]:].tolist()
        ref = ref[: next((i for i, t in enumerate(ref) if t in lm.eos_ids), len(ref))]
        assert got == ref


def test_export_refuses_to_publish_on_parity_failure(
    tiny_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    real_loader = export_mod._load_reference_model

    def perturbed(hf_dir: Path):  # type: ignore[no-untyped-def]
        model = real_loader(hf_dir)
        with torch.no_grad():
            model.model.norm.weight.mul_(1.5)  # the "torch side" no longer matches the export
        return model

    monkeypatch.setattr(export_mod, "_load_reference_model", perturbed)
    out_dir = tmp_path / "published"
    with pytest.raises(ExportValidationError, match="logit diff"):
        export_onnx(tiny_root / "hf", out_dir, name="bad", version="bad-1")
    assert not out_dir.exists()
    assert list(tmp_path.iterdir()) == []  # staging dir cleaned up too


def test_export_will_not_clobber_existing_dir(tiny_root: Path, tiny_dir: Path) -> None:
    with pytest.raises(FileExistsError):
        export_onnx(tiny_root / "hf", tiny_dir, name="x", version="x-1")
    verify_manifest(tiny_dir)  # untouched
