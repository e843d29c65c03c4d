"""Export a HF causal LM to a validated, manifested ONNX model dir.

Pipeline: optimum export (decoder with KV cache) into a staging dir next to ``out_dir`` ->
tokenizer files -> parity check against torch (last-position logits within tolerance and
identical greedy tokens on fixed prompts) -> manifest -> rename into place. Nothing is
published unless parity holds, so a served dir is always a checked one. ``publishing`` and
``export_info`` are shared with derived models (``models.quantize``: int8 from a published
fp32 dir), which are checked against their parent the same way before they are published.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from models.manifest import Manifest, write_manifest
from models.prompt import build_prompt, render_chatml
from models.runtime import LOGITS_WINDOW_KEY, MODEL_FILE, OnnxCausalLM

log = logging.getLogger(__name__)

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
    "config.json",
)
# Never shipped: the fast tokenizer only needs tokenizer.json (see bootstrap).
UNSHIPPED_FILES = ("tokenizer.model",)


class ExportValidationError(Exception):
    """The exported ONNX model does not reproduce the torch model."""


@dataclass(frozen=True)
class ExportSettings:
    task: str = "text-generation-with-past"
    opset: int | None = None  # None: optimum's default for the architecture
    dtype: str = "fp32"
    parity_atol: float = 1e-3
    parity_rtol: float = 1e-3  # of the largest reference logit magnitude
    parity_new_tokens: int = 16


@dataclass(frozen=True)
class _SimpleSignal:
    domain: str
    text: str
    ts: datetime


_NOW = datetime(2025, 1, 6, 12, 0, tzinfo=UTC)


def parity_prompts() -> list[str]:
    """Two fixed prompts: a short chat turn and a realistic query-writing prompt."""
    short = render_chatml([{"role": "user", "content": "What is the capital of France?"}])
    signals = [
        _SimpleSignal("search", "electric vehicle battery recycling", datetime(2025, 1, 6, 10, 0, tzinfo=UTC)),
        _SimpleSignal("news_click", "Champions League quarter-final draw", datetime(2025, 1, 6, 9, 0, tzinfo=UTC)),
        _SimpleSignal("browse", "Lisbon apartment rentals", datetime(2025, 1, 5, 20, 0, tzinfo=UTC)),
    ]
    return [short, build_prompt(signals, now=_NOW)]


def _load_reference_model(hf_model_dir: Path):  # type: ignore[no-untyped-def]
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(hf_model_dir, dtype=torch.float32).eval()


def _run_optimum_export(hf_model_dir: Path, staging: Path, settings: ExportSettings) -> None:
    from optimum.exporters.onnx import main_export

    with warnings.catch_warnings():  # torch's tracer warns about every data-dependent branch
        warnings.simplefilter("ignore")
        main_export(
            str(hf_model_dir),
            output=staging,
            task=settings.task,
            opset=settings.opset,
            device="cpu",
            library_name="transformers",
            do_validation=False,  # our parity check below is stricter and covers the merged graph
        )
    if not (staging / MODEL_FILE).is_file():
        raise ExportValidationError(f"optimum produced no {MODEL_FILE}: {sorted(p.name for p in staging.iterdir())}")
    keep_last_position_logits(staging / MODEL_FILE)


# Positions the exported graph projects onto the vocabulary: the last LOGITS_WINDOW of each
# forward pass. 1 would do for plain greedy decoding; speculative decoding verifies a drafted
# token and the ones before it in one pass and needs them all (see models.runtime).
LOGITS_WINDOW = 8


def keep_last_position_logits(model_path: Path, window: int = LOGITS_WINDOW) -> None:
    """Make the graph project only the last ``window`` positions onto the vocabulary.

    Decoding reads nothing else, and on a prefill the full (batch, seq, vocab) logits
    dominate time and memory for small models (a 49k vocabulary). A pass over fewer tokens
    returns them all (Slice clamps the start).
    """
    import onnx
    from onnx import TensorProto, helper

    # Weights stay where they are: a >2 GB export keeps its external data file, and the
    # rewritten graph still points at it.
    model = onnx.load(str(model_path), load_external_data=False)
    producers = [n for n in model.graph.node if "logits" in n.output]
    if len(producers) != 1 or producers[0].op_type != "MatMul":
        raise ExportValidationError(f"unexpected logits producer in {model_path}: {[n.op_type for n in producers]}")
    head = producers[0]
    consts = {"last_pos_starts": -window, "last_pos_ends": 2**63 - 1, "last_pos_axes": 1}
    for name, value in consts.items():
        model.graph.initializer.append(helper.make_tensor(name, TensorProto.INT64, [1], [value]))
    sliced = f"{head.input[0]}_last_position"
    index = list(model.graph.node).index(head)
    model.graph.node.insert(index, helper.make_node(
        "Slice", [head.input[0], *consts], [sliced], name="/lm_head/last_position"))
    head.input[0] = sliced
    logits = next(o for o in model.graph.output if o.name == "logits")
    logits.type.tensor_type.shape.dim[1].Clear()
    logits.type.tensor_type.shape.dim[1].dim_param = "logits_positions"
    helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props}, LOGITS_WINDOW_KEY: str(window)})
    onnx.save(model, str(model_path))


def copy_tokenizer(hf_model_dir: Path, staging: Path) -> None:
    for name in TOKENIZER_FILES:
        src = hf_model_dir / name
        if src.is_file() and not (staging / name).is_file():
            shutil.copy2(src, staging / name)
    for name in UNSHIPPED_FILES:
        (staging / name).unlink(missing_ok=True)
    if not (staging / "tokenizer.json").is_file():
        raise ExportValidationError(f"{hf_model_dir} has no tokenizer.json to ship")


def validate_parity(hf_model_dir: Path, onnx_dir: Path, settings: ExportSettings) -> dict[str, Any]:
    """Compare ONNX vs torch: last-position logits and greedy tokens. Raises on mismatch."""
    import torch

    model = _load_reference_model(hf_model_dir)
    lm = OnnxCausalLM(onnx_dir, providers=["CPUExecutionProvider"], verify=False)
    max_diff = 0.0
    for i, prompt in enumerate(parity_prompts()):
        # One prompt at a time: this checks the export, not padding (tests cover batching).
        ids = lm.tokenizer(prompt, add_special_tokens=False, return_tensors="np")["input_ids"]
        with torch.no_grad():
            ref_logits = model(torch.from_numpy(ids)).logits[0, -1].numpy()
        onnx_logits = lm.next_token_logits([prompt])[0]
        diff = float(np.max(np.abs(onnx_logits - ref_logits)))
        tol = settings.parity_atol + settings.parity_rtol * float(np.max(np.abs(ref_logits)))
        max_diff = max(max_diff, diff)
        if not diff <= tol:  # also catches NaN
            raise ExportValidationError(f"prompt {i}: max |logit diff| {diff:.3g} exceeds tolerance {tol:.3g}")

        with torch.no_grad():
            out = model.generate(
                torch.from_numpy(ids),
                attention_mask=torch.ones_like(torch.from_numpy(ids)),
                max_new_tokens=settings.parity_new_tokens,
                do_sample=False,
                eos_token_id=sorted(lm.eos_ids),
                pad_token_id=lm.pad_id,
            )
        ref_tokens = out[0, ids.shape[1] :].tolist()
        ref_tokens = ref_tokens[: next((j for j, t in enumerate(ref_tokens) if t in lm.eos_ids), len(ref_tokens))]
        onnx_tokens = lm.generate_ids([prompt], max_new_tokens=settings.parity_new_tokens)[0]
        if onnx_tokens != ref_tokens:
            raise ExportValidationError(
                f"prompt {i}: greedy tokens differ: onnx {onnx_tokens} vs torch {ref_tokens}"
            )
    log.info("parity ok: max |logit diff| %.3g", max_diff)
    return {"parity_max_abs_logit_diff": max_diff, "parity_greedy_tokens_match": True}


def _onnx_opset(path: Path) -> int | None:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torch", "transformers", "optimum", "optimum-onnx", "onnx", "onnxruntime-gpu"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def export_info(settings: dict[str, Any], source: Path, model_path: Path) -> dict[str, Any]:
    """The manifest's ``export`` section: how a model dir was made, and with what."""
    return settings | {"source": str(source), "opset_used": _onnx_opset(model_path), "versions": _versions()}


def _publish(staging: Path, out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists():
        if not overwrite:
            raise FileExistsError(f"{out_dir} already exists")
        old = out_dir.with_name(f".{out_dir.name}.old-{time.time_ns()}")
        out_dir.rename(old)  # two renames: readers never see a mixed dir
        staging.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(out_dir)


@contextmanager
def publishing(out_dir: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty staging dir; if the block succeeds it becomes ``out_dir``, else it is removed."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} already exists and is not empty (pass overwrite=True)")
    if out_dir.exists() and not any(out_dir.iterdir()):
        out_dir.rmdir()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Staging lives next to out_dir so publishing is a same-filesystem rename.
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.staging-", dir=out_dir.parent))
    staging.chmod(0o755)  # mkdtemp makes it 0700; the published dir must be readable by servers
    try:
        yield staging
        _publish(staging, out_dir, overwrite)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def export_onnx(
    hf_model_dir: Path,
    out_dir: Path,
    *,
    name: str,
    version: str,
    parent: str | None = None,
    settings: ExportSettings | None = None,
    overwrite: bool = False,
) -> Manifest:
    """Export, validate and publish ``hf_model_dir`` as an ONNX model dir at ``out_dir``."""
    settings = settings or ExportSettings()
    hf_model_dir, out_dir = Path(hf_model_dir), Path(out_dir)
    with publishing(out_dir, overwrite=overwrite) as staging:
        t0 = time.perf_counter()
        _run_optimum_export(hf_model_dir, staging, settings)
        copy_tokenizer(hf_model_dir, staging)
        t1 = time.perf_counter()
        metrics = validate_parity(hf_model_dir, staging, settings)
        t2 = time.perf_counter()
        metrics |= {"export_s": round(t1 - t0, 2), "validation_s": round(t2 - t1, 2)}
        info = export_info(asdict(settings), hf_model_dir, staging / MODEL_FILE)
        manifest = write_manifest(staging, name, version, parent=parent, export=info, metrics=metrics)
    log.info("published %s %s to %s (export %.1fs, validation %.1fs)", name, version, out_dir, t1 - t0, t2 - t1)
    return manifest
