"""``newsrec export`` and ``newsrec bench models``: model export (fp32, int8, int4) and the model benchmark.

``add_model_commands(subparsers, bench=bench_subparsers)`` is wired into ``commands.cli``
(``bench`` is the ``newsrec bench`` sub-command group); handlers return exit codes and raise
``CommandError`` for bad input (see :mod:`commands.errors`).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from commands.errors import CommandError, run

log = logging.getLogger(__name__)


def add_model_commands(subparsers: Any, bench: Any | None = None) -> None:
    p = subparsers.add_parser(
        "export", help="export a HF causal LM to a validated ONNX model dir (optionally also int8/int4)",
        description="Export with optimum (KV cache), check parity against torch (logits within tolerance, "
                    "identical greedy tokens) and publish with a manifest; --int8 also publishes a dynamic "
                    "int8 quantisation and --int4 a weight-only int4 one (MatMulNBits), each measured against "
                    "the fp32 model and refused below --min-agreement, as its own model dir.")
    p.add_argument("--model", type=Path, required=True, help="Hugging Face model dir (config.json, weights, tokenizer)")
    p.add_argument("--out", type=Path, required=True, help="fp32 model dir to publish")
    p.add_argument("--int8", action="store_true", help="also publish an int8 model dir (see --int8-out)")
    p.add_argument("--int8-out", type=Path, default=None, help="int8 model dir (default: <OUT>-int8 beside --out)")
    p.add_argument("--int8-exclude", default=None, metavar="REGEX",
                   help="node names kept in fp32 (default: down_proj, whose outlier activations quantise worst; "
                        "'' quantises every MatMul)")
    p.add_argument("--int4", action="store_true", help="also publish a weight-only int4 model dir (see --int4-out)")
    p.add_argument("--int4-out", type=Path, default=None, help="int4 model dir (default: <OUT>-int4 beside --out)")
    p.add_argument("--int4-block-size", type=int, choices=(32, 128), default=None,
                   help="input rows per int4 scale (default 32)")
    p.add_argument("--min-agreement", type=float, default=None, metavar="SHARE",
                   help="quality gate of --int8/--int4: least next-token agreement with fp32 (default 0.5)")
    p.add_argument("--name", default=None, help="model name (default: the --model dir's name; the run's for <run>/final)")
    p.add_argument("--version", default=None, help="version (default: <name>-<UTC timestamp>); int8/int4 add -int8/-int4")
    p.add_argument("--parent", default=None, help="version this model was trained from")
    p.add_argument("--overwrite", action="store_true", help="replace existing model dirs")
    p.set_defaults(func=_cmd_export)

    if bench is not None:
        b = bench.add_parser(
            "models", help="teacher/student, torch/ONNX fp32/int8/int4: users/s, ms per batch, peak RSS, Recall@10",
            description="Each given model in a fresh process: greedy generation timed per batch size, peak RSS, "
                        "and with --data Recall@10/NDCG@10 through the offline evaluation. Missing models are "
                        "skipped; --fast also measures each ONNX model with the stop after NEWSREC_MAX_QUERIES "
                        "queries, and with prompt lookup plus that stop. Prints a markdown table with ratios and targets; writes JSON.")
        b.add_argument("--teacher", type=Path, default=None, help="teacher HF model dir (torch)")
        b.add_argument("--student", type=Path, default=None, help="student HF model dir (torch)")
        b.add_argument("--student-onnx", type=Path, default=None, help="student ONNX fp32 model dir")
        b.add_argument("--student-int8", type=Path, default=None, help="student ONNX int8 model dir")
        b.add_argument("--student-int4", type=Path, default=None, help="student ONNX int4 model dir")
        b.add_argument("--fast", action="store_true",
                       help="also measure each ONNX model with early stop, and with prompt lookup + early stop "
                            "(the fastest student variant is the served runtime)")
        b.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                       help="ONNX execution provider (default auto: CUDA when usable; cuda fails without it)")
        b.add_argument("--data", type=Path, default=None, help="dataset dir: prompts from its users, plus eval")
        b.add_argument("--users", type=int, default=100, help="evaluated users (first N targets; default 100)")
        b.add_argument("--batch-sizes", default="1,8,32", help="comma-separated (default 1,8,32)")
        b.add_argument("--repeats", type=int, default=3, help="timed batches per batch size (default 3)")
        b.add_argument("--max-new-tokens", type=int, default=48)
        b.add_argument("--threads", type=int, default=None, help="intra-op threads for every model (default: all)")
        b.add_argument("--out", type=Path, default=None, help="JSON path (default bench-results/models.json)")
        b.set_defaults(func=_cmd_bench_models)


def _check_hf_dir(path: Path, flag: str) -> None:
    if not (path / "config.json").is_file():
        raise CommandError(f"{flag} {path}: not a Hugging Face model directory (no config.json)")
    if not (any(path.glob("*.safetensors")) or any(path.glob("pytorch_model*.bin"))):
        raise CommandError(f"{flag} {path}: not a Hugging Face model directory (no *.safetensors or "
                          "pytorch_model*.bin weights)")
    if not (path / "tokenizer.json").is_file():
        raise CommandError(f"{flag} {path}: no tokenizer.json (a fast tokenizer is needed to serve the model)")


def _check_free(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite and (not path.is_dir() or any(path.iterdir())):
        raise CommandError(f"{path} already exists (pass --overwrite to replace it)")


def default_model_name(model_dir: Path) -> str:
    """The model dir's name, or its run's for a training run's ``<run>/final``."""
    resolved = model_dir.resolve()
    return resolved.parent.name if resolved.name == "final" else resolved.name


def _cmd_export(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from models.export import ExportValidationError, export_onnx
    from models.quantize import (
        Int4Settings,
        QuantizeSettings,
        quantize_int4,
        quantize_int8,
    )

    _check_hf_dir(args.model, "--model")
    if not args.int8 and (args.int8_out is not None or args.int8_exclude is not None):
        raise CommandError("--int8-out and --int8-exclude only apply with --int8")
    if not args.int4 and (args.int4_out is not None or args.int4_block_size is not None):
        raise CommandError("--int4-out and --int4-block-size only apply with --int4")
    if args.min_agreement is not None and not (args.int8 or args.int4):
        raise CommandError("--min-agreement only applies with --int8 or --int4")
    int8 = QuantizeSettings() if args.int8_exclude is None else QuantizeSettings(exclude=args.int8_exclude or None)
    int4 = Int4Settings() if args.int4_block_size is None else Int4Settings(block_size=args.int4_block_size)
    copies = [(dtype, out or args.out.with_name(f"{args.out.name}-{dtype}"), quantize, settings)
              for wanted, dtype, out, quantize, settings in ((args.int8, "int8", args.int8_out, quantize_int8, int8),
                                                            (args.int4, "int4", args.int4_out, quantize_int4, int4))
              if wanted]
    # Fail before the slow export, not after it.
    for path in [args.out] + [out for _, out, _, _ in copies]:
        _check_free(path, args.overwrite)
    name = args.name or default_model_name(args.model)
    version = args.version or f"{name}-{datetime.now(UTC):%Y%m%d-%H%M%S}"
    try:
        manifest = export_onnx(args.model, args.out, name=name, version=version, parent=args.parent,
                               overwrite=args.overwrite)
    except ExportValidationError as exc:
        print(f"newsrec export: refused to publish {args.out}: {exc}", file=sys.stderr)
        return 1
    m = manifest.metrics
    print(f"published {manifest.name} {manifest.version} at {args.out} "
          f"(max |logit diff| vs torch {m['parity_max_abs_logit_diff']:.2g}, greedy tokens identical)")
    code = 0
    for dtype, out, quantize, settings in copies:
        if args.min_agreement is not None:
            settings = replace(settings, min_top1_agreement=args.min_agreement)
        try:
            q = quantize(args.out, out, settings=settings, overwrite=args.overwrite)
        except ExportValidationError as exc:
            print(f"newsrec export: refused to publish {dtype} {out} (fp32 stays published): {exc}", file=sys.stderr)
            code = 1
            continue
        qm = q.metrics
        print(f"published {q.name} {q.version} at {out}: next-token agreement with fp32 "
              f"{qm['vs_fp32_top1_agreement']:.0%} of {qm['vs_fp32_positions']} positions, greedy tokens "
              f"{qm['vs_fp32_greedy_token_agreement']:.0%}, mean |logit diff| {qm['vs_fp32_mean_abs_logit_diff']:.3g}, "
              f"{qm['size_vs_fp32']:.0%} of the fp32 size")
    return code


def _parse_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise CommandError(f"--batch-sizes expects comma-separated integers, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise CommandError(f"--batch-sizes needs positive sizes, got {text!r}")
    return sizes


def _cmd_bench_models(args: argparse.Namespace) -> int:
    from evaluation.dataset import DatasetError
    from streams.recommend import RecommendConfig
    from tools.bench_models import (
        DEFAULT_OUT,
        ONNX_FP32,
        ONNX_INT4,
        ONNX_INT8,
        STUDENT,
        TEACHER,
        VARIANTS,
        BenchConfig,
        BenchModel,
        format_table,
        run_models_bench,
    )

    given = {TEACHER: (args.teacher, "torch", "--teacher"), STUDENT: (args.student, "torch", "--student"),
             ONNX_FP32: (args.student_onnx, "onnx", "--student-onnx"),
             ONNX_INT8: (args.student_int8, "onnx", "--student-int8"),
             ONNX_INT4: (args.student_int4, "onnx", "--student-int4")}
    models: dict[str, BenchModel | None] = {}
    for role, (path, runtime, flag) in given.items():
        if path is None:
            print(f"{flag} not given: skipping it")
            models[role] = None
            continue
        if runtime == "torch":
            _check_hf_dir(path, flag)
        elif not (path / "manifest.json").is_file():
            raise CommandError(f"{flag} {path}: not an exported model dir (no manifest.json)")
        models[role] = BenchModel(role, runtime, path)
        if runtime == "onnx" and args.fast:
            for suffix, variant in VARIANTS.items():
                if suffix:
                    models[role + suffix] = BenchModel(role + suffix, runtime, path, variant=variant)
    if not any(models.values()):
        raise CommandError("nothing to benchmark: give at least one of --teacher, --student, --student-onnx, "
                          "--student-int8, --student-int4")
    if args.data is not None and not args.data.is_dir():
        raise CommandError(f"--data {args.data}: no such dataset directory")
    if args.repeats < 1 or args.users < 1 or args.max_new_tokens < 1:
        raise CommandError("--repeats, --users and --max-new-tokens must be at least 1")
    cfg = BenchConfig(batch_sizes=_parse_sizes(args.batch_sizes), repeats=args.repeats,
                      max_new_tokens=args.max_new_tokens, threads=args.threads, data=args.data, users=args.users,
                      max_queries=RecommendConfig.from_settings().max_queries, device=args.device)
    out = args.out or DEFAULT_OUT
    try:
        report = run_models_bench(models, cfg, out=out)
    except DatasetError as exc:
        raise CommandError(f"--data: {exc}") from None
    print(format_table(report))
    print(f"results written to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """``newsrec`` with only these commands (``commands.cli`` has the full CLI)."""
    parser = argparse.ArgumentParser(prog="newsrec")
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="what", required=True)
    add_model_commands(sub, bench=bench)
    return parser


def main_for_tests(argv: Sequence[str] | None = None) -> int:
    """Parse and run like ``newsrec`` does (same error convention, :func:`commands.errors.run`)."""
    return run(build_parser(), list(argv) if argv is not None else None)
