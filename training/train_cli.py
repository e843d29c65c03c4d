"""``newsrec train grpo`` (and, in the study module, ``newsrec study``): training entry points.

``add_train_commands(subparsers)`` is wired into ``streams.cli``; handlers return exit codes.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


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


def parse_overrides(items: list[str]) -> dict[str, Any]:
    from streams.settings import ConfigError

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
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
        from training.evaluate import format_markdown

        print(format_markdown(summary["eval"]))
    print(f"run written to {cfg.output_dir}")
    return 0
