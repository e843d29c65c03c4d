"""Int8 dynamic quantisation of a published fp32 ONNX model, published as its own model dir.

``quantize_int8(fp32_dir, out_dir)`` verifies the fp32 dir, quantises its ``model.onnx`` with
``onnxruntime.quantization.quantize_dynamic`` (int8 weights; activations quantised to uint8 on
the fly, so MatMuls run as ``MatMulInteger`` on the CPU), measures the result against its fp32
parent and publishes it like ``export_onnx`` does (staging dir, manifest, rename): version
``<fp32 version>-int8``, parent = the fp32 version, the settings under ``export``, the
quality numbers under ``metrics``.

Settings, chosen on SmolLM2-135M (the bootstrap export: 8 parity prompts x 16 new tokens for
speed, on 2 busy cores, so the speed ratios are rough):

- ``QInt8`` weights (U8S8 ``MatMulInteger``): onnxruntime's fast x86 path, ~2.5x fp32 speed;
  ``QUInt8`` (U8U8) was ~1.6x and no more accurate.
- ``reduce_range`` (7-bit weights), on by default: on x86 without VNNI (AVX2 only) the U8S8
  kernel adds pairs of u8 x s8 products in 16 bits, which saturates with full-range weights
  (the onnxruntime quantisation docs). The int8 model is made once but served on whatever CPU
  a worker has: with full range, SmolLM2-135M agreed with fp32 on 0.88 of 25 positions on a
  VNNI host and on 0.32 on an AVX2-only EPYC (refused by the gate); with 7-bit weights, 1.00
  on that EPYC (mean |logit diff| 1.16).
- ``per_channel``: one scale per output column; mean |logit diff| 2.5 vs 3.7 per-tensor.
- MatMuls only: quantising the embedding ``Gather`` too shrank the file (250 -> 166 MB) but
  raised the mean |logit diff| from 2.5 to 3.6 for no speed.
- ``down_proj`` stays fp32: its input carries the activation outliers that per-tensor uint8
  activations handle worst. Keeping those 30 MatMuls in fp32 cut the mean |logit diff| from
  2.5 to 1.0 (max 14 -> 7) at ~1.9x fp32 speed instead of ~2.5x; the model is 51% of the fp32
  size. ``exclude=None`` quantises every MatMul (``newsrec export --int8-exclude ''``).
- A tied ``lm_head`` exports as ``MatMul(x, Transpose(embedding))``; quantize_dynamic only
  quantises MatMuls whose weight is an initializer, so constant Transposes are folded first
  (what onnxruntime's constant folding does at load anyway) and the lm_head becomes int8.
- ``EnableSubgraph``: a merged optimum decoder (an ``If`` over with/without-past branches)
  is quantised inside both branches; today's exports have no ``If``, so this is a no-op.
- No ``quant_pre_process``: its optimisation step cannot write models over 2 GB and the
  session applies the same optimisations at load; the one rewrite that matters here (the
  folded Transpose) is done above. Models over 2 GB are written with external data
  (``model.onnx`` + ``model.onnx.data``).

Quality gate: int8 is not expected to reproduce fp32 tokens, so only gross failure refuses
publication: the model does not run, produces non-finite logits, or its next-token choice
agrees with fp32's on fewer than ``min_top1_agreement`` of the checked positions. Positions
are every prefix of fp32's greedy continuation of each parity prompt (teacher forcing), so
each is a "first step" of a longer prompt and the share has ~30 decisions behind it, not 2
(on SmolLM2 the second parity prompt's first token is a near-tie in fp32, 30.75 vs 30.62, and
int8 flips it: first-step agreement over the 2 prompts alone would read 50%). A working int8
model agrees on 80-100% (SmolLM2-135M: 1.00 of 25 positions with 7-bit weights, 0.88 with
full-range weights on a VNNI host, other settings above 0.84-0.92; the tiny random test model
~0.9); a broken one (wrong scales, a mis-wired graph, saturating kernels: 0.32) picks mostly
wrong tokens out of a 49k vocabulary. 0.5 sits between.

Int4 (``quantize_int4``, ``newsrec export --int4``): weight-only, with onnxruntime's own
``MatMulNBitsQuantizer`` (round-to-nearest, asymmetric, one scale + zero point per block of
``block_size`` input rows). MatMuls become ``MatMulNBits`` with ``accuracy_level`` 4 (int8
activations on the CPU's integer dot-product kernels); the embedding ``Gather`` becomes
``GatherBlockQuantized`` and the folded lm_head MatMul is quantised like the others, each
switchable in ``Int4Settings``. Activations are not quantised, so ``down_proj`` needs no
exclusion. The published copy passes the same gate as int8 (``validate_quantized``).
On SmolLM2-135M: 0.80 agreement, 20% of the fp32 size; with the embedding and lm_head left
in fp32 0.76 and 55%; blocks of 128 0.88 but mean |logit diff| 4.3 vs 3.1 (25 positions).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.export import (
    ExportValidationError,
    copy_tokenizer,
    export_info,
    parity_prompts,
    publishing,
)
from models.manifest import Manifest, verify_manifest, write_manifest
from models.runtime import CPU, MODEL_FILE, OnnxCausalLM

log = logging.getLogger(__name__)

# protobuf cannot serialise a single message over 2 GiB; bigger models need external data.
_PROTOBUF_LIMIT = 2**31


@dataclass(frozen=True)
class QuantizeSettings:
    weight_type: str = "QInt8"  # onnxruntime.quantization.QuantType member name
    per_channel: bool = True
    reduce_range: bool = True  # 7-bit weights: correct on CPUs without VNNI too (see above)
    op_types: tuple[str, ...] = ("MatMul",)
    exclude: str | None = "down_proj"  # regex over node names kept in fp32; None: none
    quality_new_tokens: int = 16
    min_top1_agreement: float = 0.5


@dataclass(frozen=True)
class Int4Settings:
    block_size: int = 32  # input rows per scale (a power of two >= 16)
    accuracy_level: int = 4  # MatMulNBits: int8 activations on the CPU
    symmetric: bool = False
    embedding: bool = True  # quantise the token embedding Gather
    lm_head: bool = True  # quantise the (folded, tied) lm_head MatMul
    quality_new_tokens: int = 16
    min_top1_agreement: float = 0.5


def fold_constant_transposes(model: Any) -> int:
    """Replace every 2-D ``Transpose`` of an initializer by the transposed initializer."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    folded = 0
    for node in list(model.graph.node):
        if node.op_type != "Transpose" or node.input[0] not in inits:
            continue
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), [1, 0])
        weight = numpy_helper.to_array(inits[node.input[0]])
        if weight.ndim != 2 or perm != [1, 0]:
            continue
        model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(weight.T), node.output[0]))
        model.graph.node.remove(node)
        folded += 1
    return folded


@contextmanager
def _quiet_root_logger() -> Iterator[None]:
    # The quantizer logs a line per node on the root logger at INFO: hundreds for a real model.
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        root.setLevel(level)


def _quantize(src: Path, dst: Path, settings: QuantizeSettings, *, external_data: bool) -> dict[str, Any]:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(src))
    folded = fold_constant_transposes(model)
    pattern = re.compile(settings.exclude) if settings.exclude else None
    excluded = [n.name for n in model.graph.node if pattern and pattern.search(n.name)]
    with _quiet_root_logger():
        quantize_dynamic(
            model,  # a ModelProto: shape inference then runs in a temp dir, never in the published fp32 dir
            dst,
            weight_type=QuantType[settings.weight_type],
            per_channel=settings.per_channel,
            reduce_range=settings.reduce_range,
            op_types_to_quantize=list(settings.op_types),
            nodes_to_exclude=excluded,
            use_external_data_format=external_data,
            extra_options={"EnableSubgraph": True},
        )
    graph = onnx.load(str(dst), load_external_data=False).graph
    ops = [n.op_type for n in graph.node]
    return {"folded_transposes": folded, "excluded_nodes": len(excluded), "int8_matmuls": ops.count("MatMulInteger"),
            "fp32_matmuls": ops.count("MatMul"), "external_data": external_data}


def _quantize_int4(src: Path, dst: Path, settings: Int4Settings, *, external_data: bool) -> dict[str, Any]:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = onnx.load(str(src))
    folded = fold_constant_transposes(model)
    floats = {i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) == 2}
    # The embedding is the Gather over a 2-D float initializer; shape Gathers stay as they are.
    embeddings = [n.name for n in model.graph.node if n.op_type == "Gather" and n.input[0] in floats]
    heads = [n.name for n in model.graph.node if "logits" in n.output]
    quantizer = MatMulNBitsQuantizer(
        model,
        bits=4,
        block_size=settings.block_size,
        is_symmetric=settings.symmetric,
        accuracy_level=settings.accuracy_level,
        nodes_to_exclude=[] if settings.lm_head else heads,
        nodes_to_include=embeddings if settings.embedding else None,
        op_types_to_quantize=("MatMul",),
        quant_axes=(("MatMul", 0), ("Gather", 1)),
    )
    with _quiet_root_logger():
        quantizer.process()
    quantizer.model.save_model_to_file(str(dst), use_external_data_format=external_data)
    ops = [n.op_type for n in onnx.load(str(dst), load_external_data=False).graph.node]
    return {"folded_transposes": folded, "int4_matmuls": ops.count("MatMulNBits"),
            "int4_gathers": ops.count("GatherBlockQuantized"), "fp32_matmuls": ops.count("MatMul"),
            "external_data": external_data}


def compare_to_reference(reference: OnnxCausalLM, candidate: OnnxCausalLM, prompts: list[str],
                         new_tokens: int) -> dict[str, Any]:
    """How closely ``candidate`` follows ``reference`` on ``prompts``; see the module docstring.

    One prompt per call, as in ``validate_parity``: dynamic activation scales are per tensor,
    so batching would make the numbers depend on what shares the batch.
    """
    ref_ids = [reference.generate_ids([p], max_new_tokens=new_tokens)[0] for p in prompts]
    cand_ids = [candidate.generate_ids([p], max_new_tokens=new_tokens)[0] for p in prompts]
    # Every prefix of the reference's own continuation, re-encoded as text for both models.
    contexts = [p + reference.tokenizer.decode(ids[:j]) for p, ids in zip(prompts, ref_ids, strict=True)
                for j in range(len(ids) + 1)]
    ref_logits = np.concatenate([reference.next_token_logits([c]) for c in contexts])
    cand_logits = np.concatenate([candidate.next_token_logits([c]) for c in contexts])
    if not np.isfinite(cand_logits).all():
        raise ExportValidationError("quantised model produces non-finite logits")
    agree = ref_logits.argmax(axis=-1) == cand_logits.argmax(axis=-1)
    first = [sum(len(ids) + 1 for ids in ref_ids[:i]) for i in range(len(prompts))]  # j = 0 rows
    diff = np.abs(cand_logits - ref_logits)
    pairs = list(zip(ref_ids, cand_ids, strict=True))
    token_agreement = [sum(a == b for a, b in zip(r, c, strict=False)) / max(len(r), len(c)) if r or c else 1.0
                       for r, c in pairs]
    return {
        "vs_fp32_top1_agreement": round(float(agree.mean()), 4),
        "vs_fp32_first_token_agreement": round(float(agree[first].mean()), 4),
        "vs_fp32_positions": len(contexts),
        "vs_fp32_max_abs_logit_diff": round(float(diff.max()), 4),
        "vs_fp32_mean_abs_logit_diff": round(float(diff.mean()), 4),
        "vs_fp32_greedy_token_agreement": round(float(np.mean(token_agreement)), 4),
        "vs_fp32_greedy_exact_match": round(float(np.mean([r == c for r, c in pairs])), 4),
    }


def validate_quantized(fp32_dir: Path, q_dir: Path, settings: QuantizeSettings | Int4Settings,
                       dtype: str) -> dict[str, Any]:
    """Quality of ``q_dir`` against ``fp32_dir``; raises ExportValidationError on gross failure."""
    reference = OnnxCausalLM(fp32_dir, providers=[CPU], verify=False)
    try:
        candidate = OnnxCausalLM(q_dir, providers=[CPU], verify=False)
        metrics = compare_to_reference(reference, candidate, parity_prompts(), settings.quality_new_tokens)
    except ExportValidationError:
        raise
    except Exception as exc:  # onnxruntime raises several unrelated types; all mean "does not run"
        raise ExportValidationError(f"{dtype} model does not run: {exc}") from exc
    if not metrics["vs_fp32_top1_agreement"] >= settings.min_top1_agreement:
        raise ExportValidationError(
            f"{dtype} next-token choice agrees with fp32 on {metrics['vs_fp32_top1_agreement']:.0%} of "
            f"{metrics['vs_fp32_positions']} positions (< {settings.min_top1_agreement:.0%})"
        )
    log.info("%s vs fp32: top-1 agreement %.2f, mean |logit diff| %.3g", dtype,
             metrics["vs_fp32_top1_agreement"], metrics["vs_fp32_mean_abs_logit_diff"])
    return metrics


def _model_bytes(sizes: dict[str, int]) -> int:
    return sum(size for rel, size in sizes.items() if rel.startswith(MODEL_FILE))


def _publish_quantized(fp32_dir: Path, out_dir: Path, dtype: str, settings: QuantizeSettings | Int4Settings,
                       quantize: Callable[..., dict[str, Any]], *, version: str | None, overwrite: bool) -> Manifest:
    """Quantise the published fp32 model in ``fp32_dir``, check it, publish it at ``out_dir``."""
    fp32_dir, out_dir = Path(fp32_dir), Path(out_dir)
    parent = verify_manifest(fp32_dir)  # only ever derive from a validated, intact export
    version = version or f"{parent.version}-{dtype}"
    with publishing(out_dir, overwrite=overwrite) as staging:
        t0 = time.perf_counter()
        stats = quantize(fp32_dir / MODEL_FILE, staging / MODEL_FILE, settings,
                         external_data=_model_bytes(parent.sizes) >= _PROTOBUF_LIMIT)
        copy_tokenizer(fp32_dir, staging)
        t1 = time.perf_counter()
        metrics = validate_quantized(fp32_dir, staging, settings, dtype)
        t2 = time.perf_counter()
        model_bytes = sum(p.stat().st_size for p in staging.glob(f"{MODEL_FILE}*"))
        metrics |= {"quantize_s": round(t1 - t0, 2), "validation_s": round(t2 - t1, 2),
                    "model_bytes": model_bytes, "size_vs_fp32": round(model_bytes / _model_bytes(parent.sizes), 4)}
        settings_info = {"task": parent.export.get("task"), "dtype": dtype,
                         "quantization": asdict(settings) | stats}
        info = export_info(settings_info, fp32_dir, staging / MODEL_FILE)
        manifest = write_manifest(staging, parent.name, version, parent=parent.version, export=info, metrics=metrics)
    log.info("published %s %s (%s of %s) to %s", parent.name, version, dtype, parent.version, out_dir)
    return manifest


def quantize_int8(fp32_dir: Path, out_dir: Path, *, version: str | None = None,
                  settings: QuantizeSettings | None = None, overwrite: bool = False) -> Manifest:
    """Dynamic int8 copy of a published fp32 model dir, version ``<fp32>-int8``."""
    return _publish_quantized(fp32_dir, out_dir, "int8", settings or QuantizeSettings(), _quantize,
                              version=version, overwrite=overwrite)


def quantize_int4(fp32_dir: Path, out_dir: Path, *, version: str | None = None,
                  settings: Int4Settings | None = None, overwrite: bool = False) -> Manifest:
    """Weight-only int4 (MatMulNBits) copy of a published fp32 model dir, version ``<fp32>-int4``."""
    return _publish_quantized(fp32_dir, out_dir, "int4", settings or Int4Settings(), _quantize_int4,
                              version=version, overwrite=overwrite)
