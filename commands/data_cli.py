"""``newsrec data``: make, check and inspect evaluation datasets.

- ``data simulate --news news.tsv --out DIR``: simulated users over a MIND news file
  (see ``evaluation.simulate``), written in the dataset format of ``evaluation.dataset``;
- ``data mind --news N --behaviors B --out DIR``: real MIND impressions as a dataset with
  ``impressions.jsonl`` (see ``evaluation.mind`` for the rules);
- ``data validate DIR``: format and consistency report (exit code 1 on problems);
- ``data behaviors behaviors.tsv [--news news.tsv]``: counts of a MIND behaviors file and
  how many of its ids resolve to the news at hand.

``add_data_commands(subparsers)`` plugs these into the ``newsrec`` parser;
``python -m commands.data_cli data ...`` runs them alone.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from commands.errors import CommandError, run

logger = logging.getLogger(__name__)


def _span(text: str) -> tuple[int, int]:
    """``MIN,MAX`` (or one number for both) → a tuple, for argparse."""
    try:
        parts = [int(p) for p in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN,MAX whole numbers like 2,5, got {text!r}") from None
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"expected MIN,MAX like 2,5, got {text!r}")
    return parts[0], parts[1]


def _mix(text: str) -> dict[str, float]:
    """``search=0.4,browse=0.3,...`` → a mapping, for argparse."""
    out: dict[str, float] = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise argparse.ArgumentTypeError(f"expected DOMAIN=WEIGHT pairs like search=0.4,browse=0.3, got {text!r}")
    return out


def add_data_commands(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``data simulate|mind|validate|behaviors`` to a parser's subcommands."""
    p = subparsers.add_parser("data", help="evaluation datasets: simulate, MIND, validate, MIND behaviors stats")
    sub = p.add_subparsers(dest="data_command", required=True)

    s = sub.add_parser("simulate", help="simulated cross-domain users over a MIND news.tsv",
                       description="Write a dataset directory (news.tsv copied verbatim, events.jsonl, "
                                   "targets.jsonl, meta.json) of simulated users; see evaluation/simulate.py.")
    s.add_argument("--news", type=Path, required=True, help="MIND news.tsv (copied into the dataset as is)")
    s.add_argument("--out", type=Path, required=True, help="dataset directory to write")
    s.add_argument("--force", action="store_true", help="overwrite a dataset already in --out")
    s.add_argument("--users", type=int, default=None)
    s.add_argument("--cold-share", type=float, default=None, help="share of users with 1-3 signals")
    s.add_argument("--noise", type=float, default=None, help="share of signals unrelated to interests")
    s.add_argument("--interests", type=_span, default=None, metavar="MIN,MAX", help="interests per user")
    s.add_argument("--events", type=_span, default=None, metavar="MIN,MAX", help="signals per warm user")
    s.add_argument("--future", type=_span, default=None, metavar="MIN,MAX", help="future clicks (targets) per user")
    s.add_argument("--drift", type=float, default=None, help="probability an interest's weight shifts after the cutoff")
    s.add_argument("--typo-rate", type=float, default=None, help="probability a search has a typo")
    s.add_argument("--window-days", type=float, default=None, help="length of the history window")
    s.add_argument("--domain-mix", type=_mix, default=None, metavar="D=W,...",
                   help="e.g. search=0.35,browse=0.25,app=0.1,news_click=0.3")
    s.add_argument("--seed", type=int, default=None)
    s.set_defaults(func=_cmd_simulate)

    m = sub.add_parser("mind", help="real MIND impressions (news.tsv + behaviors.tsv) → dataset dir",
                       description="Write a dataset directory (news.tsv copied verbatim, events.jsonl from each "
                                   "user's history at synthetic times, targets.jsonl, impressions.jsonl, meta.json): "
                                   "one impression per user, the earliest; see evaluation/mind.py.")
    m.add_argument("--news", type=Path, required=True, help="MIND news.tsv (copied into the dataset as is)")
    m.add_argument("--behaviors", type=Path, required=True, help="MIND behaviors.tsv (labelled impressions)")
    m.add_argument("--out", type=Path, required=True, help="dataset directory to write")
    m.add_argument("--force", action="store_true", help="overwrite a dataset already in --out")
    m.add_argument("--skip-bad-rows", action="store_true",
                   help="count and skip malformed behaviors rows instead of stopping at the first")
    m.set_defaults(func=_cmd_mind)

    v = sub.add_parser("validate", help="check a dataset directory (exit code 1 on problems)")
    v.add_argument("dir", type=Path)
    v.set_defaults(func=_cmd_validate)

    b = sub.add_parser("behaviors", help="counts of a MIND behaviors.tsv, and how many ids resolve")
    b.add_argument("path", type=Path)
    b.add_argument("--news", type=Path, default=None, help="MIND news.tsv whose ids count as resolved")
    b.add_argument("--json", action="store_true", help="print one JSON object")
    b.set_defaults(func=_cmd_behaviors)


_CONFIG_ARGS = {"users": "users", "cold_share": "cold_share", "noise": "noise", "interests": "interests_per_user",
                "events": "events_per_user", "future": "future_clicks", "drift": "drift", "typo_rate": "typo_rate",
                "window_days": "window_days", "domain_mix": "domain_mix", "seed": "seed"}


def _cmd_simulate(args: argparse.Namespace) -> int:
    from evaluation.dataset import EVENTS_FILE, write_dataset
    from evaluation.simulate import SimulationConfig, SimulationError, read_entity_surface_forms, simulate, summarize
    from index.corpus import CorpusError, read_mind_news

    overrides = {field: getattr(args, arg) for arg, field in _CONFIG_ARGS.items() if getattr(args, arg) is not None}
    try:
        config = SimulationConfig(**overrides)
    except SimulationError as exc:
        raise CommandError(str(exc))
    if (args.out / EVENTS_FILE).exists() and not args.force:
        raise CommandError(f"{args.out} already holds a dataset; pass --force to overwrite it")
    started = time.perf_counter()
    try:
        news = list(read_mind_news(args.news))
        surface_forms = read_entity_surface_forms(args.news)
        events, targets, meta = simulate(news, config, surface_forms=surface_forms)
    except (OSError, CorpusError, SimulationError) as exc:
        raise CommandError(str(exc))
    simulated = time.perf_counter() - started
    meta["news_source"] = str(args.news)
    with args.news.open(encoding="utf-8") as fh:  # rows verbatim: the dataset keeps MIND's own columns
        rows = [line for line in fh if line.strip()]
    write_dataset(args.out, rows, events, targets, meta)
    total = time.perf_counter() - started
    summary = summarize(events, targets)
    domains = ", ".join(f"{d} {n}" for d, n in summary["events_by_domain"].items())
    print(f"wrote {args.out}: {summary['users']} users ({summary['cold_users']} cold) over {len(news)} news")
    print(f"events: {summary['events']} ({domains}); noise events: {meta['counts']['noise_events']}")
    print(f"targets: {summary['target_clicks']} future clicks ({summary['targets_per_user']} per user); "
          f"cutoff {meta['cutoff']}; seed {config.seed}")
    print(f"took {total:.2f}s (simulation {simulated:.2f}s)")
    return 0


def _cmd_mind(args: argparse.Namespace) -> int:
    from evaluation.dataset import EVENTS_FILE, write_dataset
    from evaluation.mind import COLD_HISTORY, read_mind

    if (args.out / EVENTS_FILE).exists() and not args.force:
        raise CommandError(f"{args.out} already holds a dataset; pass --force to overwrite it")
    # A malformed or missing input file raises CorpusError/OSError: exit code 3 (commands/errors.py).
    news, conv, read = read_mind(args.news, args.behaviors, errors="skip" if args.skip_bad_rows else "raise")
    with args.news.open(encoding="utf-8", newline="") as fh:  # every line as it is, blank ones too
        rows = fh.readlines()
    counts = {**conv.counts, "malformed_rows": read["malformed_rows"],
              "unresolved_ids_dropped": read["unresolved_ids_dropped"]}
    meta = {"source": "mind", "news_source": str(args.news), "behaviors_source": str(args.behaviors),
            "rules": {"impressions_per_user": "earliest with a click", "cold_history_clicks_below": COLD_HISTORY,
                      "history_ts": "synthetic: 1 minute apart, newest 1 minute before the impression",
                      "candidates": "shown order, each once, past clicks dropped"},
            "counts": counts, "malformed_examples": read["malformed_examples"]}
    write_dataset(args.out, rows, conv.events, conv.targets, meta, conv.impressions)
    c = counts
    print(f"wrote {args.out}: {c['impressions']} impressions of {c['users']} users ({c['cold_users']} cold, "
          f"{c['users_without_events']} without history) over {len(news)} news")
    print(f"events: {c['events']} history clicks; candidates: {c['candidates']}; clicks (targets): {c['clicks']}; "
          f"all-clicked impressions: {c['all_clicked_impressions']}")
    print(f"behaviors rows: {c['rows']} read, {c['malformed_rows']} malformed, {c['duplicate_impression_rows']} "
          f"repeating an impression id, {c['unused_impressions']} other impressions of the users not used, "
          f"{c['users_without_usable_click']} users without a usable click")
    print(f"dropped ids: {c['unresolved_ids_dropped']} not in news, {c['history_candidates_dropped']} candidates "
          f"already in the history, {c['repeated_candidates_dropped']} repeated candidates")
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from evaluation.dataset import DatasetError, validate_dataset

    try:
        report = validate_dataset(args.dir)
    except (DatasetError, OSError, json.JSONDecodeError) as exc:
        print(f"{args.dir}: not a valid dataset: {exc}", file=sys.stderr)
        return 1
    print(f"{args.dir}: {report.users} users ({report.cold_users} cold), {report.events} events, "
          f"{report.news} news, {report.target_clicks} target clicks")
    print(f"unresolved target ids: {report.unresolved_target_ids}; users without events: {report.users_without_events}")
    if report.impressions:
        print(f"impressions: {report.impressions} ({report.impression_candidates} candidates); cold users without "
              f"events (first visits): {report.cold_users_without_events}")
    for problem in report.problems:
        print(f"problem: {problem}")
    print("ok" if report.ok else f"{len(report.problems)} problem(s)")
    return 0 if report.ok else 1


def _cmd_behaviors(args: argparse.Namespace) -> int:
    from evaluation.behaviors import behaviors_stats
    from index.corpus import CorpusError, read_mind_news

    try:
        known = {a.news_id for a in read_mind_news(args.news)} if args.news else None
        stats = behaviors_stats(args.path, known)
    except (OSError, CorpusError) as exc:
        raise CommandError(str(exc))
    if args.json:
        print(json.dumps(stats, indent=2))
        return 0
    width = max(len(k) for k in stats)
    for key, value in stats.items():
        line = f"{key:<{width}}  {value}"
        total = {"history_resolved": "history_ids", "impression_resolved": "impression_ids",
                 "clicks_resolved": "clicks"}.get(key)
        if total and stats[total]:
            line += f"  ({100.0 * value / stats[total]:.1f}%)"
        print(line)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m commands.data_cli", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_commands(parser.add_subparsers(dest="command", required=True))
    return run(parser, list(argv) if argv is not None else None)


if __name__ == "__main__":
    sys.exit(main())
