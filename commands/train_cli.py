"""``newsrec train grpo|warmstart``, ``newsrec distill`` and ``newsrec study sampling|capacity``: teacher training entry points.

``add_train_commands(subparsers)`` is wired into ``commands.cli``; handlers return exit codes.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from commands.errors import CommandError

log = logging.getLogger(__name__)

RESULTS_DIR = Path("bench-results")


def add_train_commands(subparsers: Any) -> None:
    p = subparsers.add_parser("train", help="train the query-writing teacher")
    sub = p.add_subparsers(dest="train_what", required=True)
    g = sub.add_parser(
        "grpo", help="GRPO (TRL, Dr.GRPO) on the six query rewards",
        description="Train a causal LM to write news queries with TRL's GRPOTrainer; see training/grpo.py "
                    "and configs/grpo-smollm2.toml for every key.")
    g.add_argument("--config", type=Path, required=True, help="TOML or JSON run config")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (VALUE parsed as JSON, else taken as a string); repeatable")
    g.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
    g.add_argument("--no-progress", action="store_true")
    g.set_defaults(func=_cmd_grpo)
    w = sub.add_parser(
        "warmstart", help="short SFT warm start (TRL SFTTrainer) before GRPO: the query-list format, or next clicks",
        description="Fine-tune the base model on rule-made query lists (see training/warmstart.py): 'window' "
                    "lists come from each user's own window (format only); 'next-clicks' lists open with the "
                    "titles of the news the training user clicked next (GPT4Rec-style; training days only). "
                    "Point a GRPO config's base_model at --out, or export it and serve it.")
    w.add_argument("--data", type=Path, action="append", required=True,
                   help="training dataset directory; repeatable (a dataset with impressions gives only its "
                        "training days)")
    w.add_argument("--out", type=Path, required=True, help="HF model directory to write")
    w.add_argument("--base-model", default="smollm2", help="'smollm2' (bundled) or a HF model dir")
    w.add_argument("--targets", choices=["window", "next-clicks"], default="window",
                   help="what the demonstration lists teach (default: window, the format only)")
    w.add_argument("--users", type=int, default=256, help="the first N training users of each dataset")
    w.add_argument("--epochs", type=float, default=1.0)
    w.add_argument("--lr", type=float, default=5e-5)
    w.add_argument("--batch-size", type=int, default=8)
    w.add_argument("--threads", type=int, default=None)
    w.add_argument("--no-progress", action="store_true")
    w.set_defaults(func=_cmd_warmstart)

    d = subparsers.add_parser(
        "distill", help="distil a teacher into a student (on-policy reverse KL, sequence-level, supervised)",
        description="On-policy distillation with TRL's DistillationTrainer (GKD lmbda=1, beta=1); sequence-level "
                    "(SFT on the teacher's best-of-N outputs, selected by the test-time rewards); or the "
                    "supervised baseline (SFT on greedy teacher outputs). Exports and evaluates the student.")
    d.add_argument("--teacher", type=Path, required=True,
                   help="teacher HF model dir (e.g. <grpo run>/final), or 'smollm2' (the packaged SmolLM2-135M)")
    d.add_argument("--student-layers", type=int, default=None,
                   help="student = the teacher's first N blocks (default: the whole model)")
    d.add_argument("--data", type=Path, action="append", required=True,
                   help="training dataset directory; repeatable (e.g. MIND impressions and simulated users: "
                        "a dataset with impressions gives only its training days)")
    d.add_argument("--out", type=Path, required=True, help="run directory to create")
    d.add_argument("--method", choices=["on-policy", "sequence", "supervised", "none"], default="on-policy",
                   help="none = the student untrained (the ablation's baseline row)")
    d.add_argument("--teacher-samples", type=int, default=8, metavar="N",
                   help="sequence: the teacher's best of N samples per prompt (default 8)")
    d.add_argument("--teacher-onnx", type=Path, default=None,
                   help="sequence: the teacher's ONNX export to sample ('bootstrap' for the packaged SmolLM2; "
                        "default: export --teacher once)")
    d.add_argument("--student-init", type=Path, default=None,
                   help="start from this student (e.g. a supervised run's final/) instead of cutting the teacher")
    d.add_argument("--users", type=int, default=256, help="training prompts: the first N training users per dataset")
    d.add_argument("--steps", type=int, default=50)
    d.add_argument("--batch-size", type=int, default=8, help="prompts per step")
    d.add_argument("--lr", type=float, default=5e-5)
    d.add_argument("--eval-data", type=Path, default=None)
    d.add_argument("--eval-users", type=int, default=None)
    d.add_argument("--threads", type=int, default=None)
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(func=_cmd_distill)

    p = subparsers.add_parser("study", help="scaling studies of the teacher (JSON + PNG)")
    sub = p.add_subparsers(dest="study_what", required=True)
    s = sub.add_parser("sampling", help="inference-time scaling: best-of-N by composite reward, then eval")
    s.add_argument("--model", required=True, help="ONNX model dir, or 'bootstrap' (prompt-only SmolLM2)")
    s.add_argument("--data", type=Path, required=True, help="dataset directory")
    s.add_argument("--n", default="1,2,4,8,16", help="comma-separated sample counts (default 1,2,4,8,16)")
    s.add_argument("--users", type=int, default=100, help="first N target users (default 100)")
    s.add_argument("--temperature", type=float, default=0.9)
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", type=Path, default=RESULTS_DIR / "study-sampling.json", help="JSON (PNG beside it)")
    s.set_defaults(func=_cmd_study_sampling)
    c = sub.add_parser("capacity", help="the same GRPO run at several teacher depths, each evaluated")
    c.add_argument("--config", type=Path, required=True, help="GRPO run config (its output_dir is ignored)")
    c.add_argument("--layers", default="8,16,all", help="comma-separated block counts; 'all' = full model")
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    c.add_argument("--out-dir", type=Path, required=True, help="one run directory per depth goes here")
    c.add_argument("--out", type=Path, default=RESULTS_DIR / "study-capacity.json", help="JSON (PNG beside it)")
    c.set_defaults(func=_cmd_study_capacity)


def parse_overrides(items: list[str]) -> dict[str, Any]:

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise CommandError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def _cmd_grpo(args: argparse.Namespace) -> int:
    from training.grpo import GRPORunConfig, train_grpo

    cfg = GRPORunConfig.from_file(args.config, parse_overrides(args.set))
    summary = train_grpo(cfg, resume=args.resume, progress=not args.no_progress)
    print(f"trained {summary['steps']} steps in {summary['train_s']:.0f} s "
          f"(reward scoring {summary['reward_scoring_s']:.0f} s); final rewards {summary['final_rewards']}")
    if "eval" in summary:
        from evaluation.evaluate import format_markdown

        print(format_markdown(summary["eval"]))
    print(f"run written to {cfg.output_dir}")
    return 0


def _cmd_warmstart(args: argparse.Namespace) -> int:
    from training.warmstart import WarmStartConfig, warm_start

    try:
        cfg = WarmStartConfig(tuple(args.data), args.out, base_model=args.base_model, users=args.users,
                              targets=args.targets, epochs=args.epochs, learning_rate=args.lr,
                              batch_size=args.batch_size, threads=args.threads)
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    summary = warm_start(cfg, progress=not args.no_progress)
    print(f"warm start: {summary['examples']} examples, {summary['steps']} steps, loss {summary['first_loss']:.3f} -> "
          f"{summary['last_loss']:.3f} in {summary['wall_s']:.0f} s; model in {args.out}")
    return 0


def _cmd_distill(args: argparse.Namespace) -> int:
    from evaluation.baselines import onnx_model_dir
    from training.distill import DistillConfig, distill
    from training.grpo import resolve_base_model

    teacher_onnx = onnx_model_dir(args.teacher_onnx) if args.teacher_onnx is not None else None
    cfg = DistillConfig(teacher=resolve_base_model(str(args.teacher)), train_data=tuple(args.data), output_dir=args.out,
                        student_layers=args.student_layers, method=args.method, student_init=args.student_init,
                        teacher_samples=args.teacher_samples, teacher_onnx=teacher_onnx, train_users=args.users,
                        eval_data=args.eval_data, eval_users=args.eval_users, max_steps=args.steps,
                        batch_size=args.batch_size, learning_rate=args.lr, threads=args.threads)
    summary = distill(cfg, progress=not args.no_progress)
    losses = summary["losses"]
    trained = f"loss {losses[0]:.3f} -> {losses[-1]:.3f}" if losses else "no training"
    print(f"{cfg.method} distillation: {len(losses)} logged steps, {trained} "
          f"in {summary['train_s']:.0f} s; student {summary['student_parameters'] / 1e6:.1f}M parameters")
    for t in summary["teacher_sampling"]:
        print(f"teacher best-of-{cfg.teacher_samples} on {t['data']}: {t['prompts']} prompts, selected reward "
              f"{t['selected_reward']:.3f} (one sample: {t['first_sample_reward']:.3f}); sampling {t['sample_s']:.0f} s, "
              f"scoring {t['score_s']:.0f} s")
    if "eval" in summary:
        from evaluation.evaluate import format_markdown

        print(format_markdown(summary["eval"]))
    print(f"run written to {cfg.output_dir}")
    return 0


def _int_list(text: str, flag: str, *, allow_all: bool = False) -> list[int | None]:

    out: list[int | None] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        if allow_all and part == "all":
            out.append(None)
            continue
        try:
            value = int(part)
        except ValueError:
            raise CommandError(f"{flag} expects comma-separated positive integers, got {text!r}") from None
        if value < 1:
            raise CommandError(f"{flag} expects positive integers, got {value}")
        out.append(value)
    if not out:
        raise CommandError(f"{flag} is empty")
    return out


def _print_points(study: dict[str, Any]) -> None:
    print("| setting | R@10 | N@10 | cold R@10 | cold N@10 | reward |")
    print("|---|---|---|---|---|---|")
    for p in study["points"]:
        print(f"| {p['label']} | {p['recall@10']:.4f} | {p['ndcg@10']:.4f} | {p['cold_recall@10'] or 0:.4f} | "
              f"{p['cold_ndcg@10'] or 0:.4f} | {p['reward']:.4f} |")


def _cmd_study_sampling(args: argparse.Namespace) -> int:
    from evaluation.baselines import bootstrap_model_dir
    from evaluation.dataset import DatasetError, load_dataset
    from training.study import sampling_study, save_study

    ns = sorted(set(_int_list(args.n, "--n")))  # type: ignore[type-var]
    model = bootstrap_model_dir() if args.model == "bootstrap" else Path(args.model)
    if not (model / "manifest.json").is_file():
        raise CommandError(f"--model {args.model}: not an exported ONNX model dir (no manifest.json)")
    try:
        dataset = load_dataset(args.data)
        study = sampling_study(dataset, model, ns, users=args.users, temperature=args.temperature, top_p=args.top_p,
                               seed=args.seed)
    except (DatasetError, ValueError) as exc:
        raise CommandError(str(exc)) from None
    save_study(study, args.out, args.out.with_suffix(".png"))
    _print_points(study)
    print(f"sampling {study['timings']['sampling_s']:.0f} s, reward scoring {study['timings']['scoring_s']:.1f} s; "
          f"written to {args.out} and {args.out.with_suffix('.png')}")
    return 0


def _cmd_study_capacity(args: argparse.Namespace) -> int:
    from training.grpo import GRPORunConfig
    from training.study import capacity_study, save_study

    base = GRPORunConfig.from_file(args.config, parse_overrides(args.set))
    study = capacity_study(base, _int_list(args.layers, "--layers", allow_all=True), out_dir=args.out_dir)
    save_study(study, args.out, args.out.with_suffix(".png"))
    _print_points(study)
    print(f"written to {args.out} and {args.out.with_suffix('.png')}")
    return 0
