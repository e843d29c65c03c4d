"""``newsrec eval``: offline evaluation and the search-engine overlap study.

``add_eval_commands(subparsers)`` is wired into ``commands.cli``; handlers return exit codes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import re
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

from commands.errors import CommandError

log = logging.getLogger(__name__)

RESULTS_DIR = Path("bench-results")


def add_eval_commands(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "eval", help="offline evaluation of recommendation methods on a dataset directory",
        description="Evaluate methods on a dataset (news.tsv, events.jsonl, targets.jsonl) through the "
                    "serving path; `eval overlap` compares search engines instead.")
    p.add_argument("--data", type=Path, help="dataset directory")
    p.add_argument("--model", action="append", dest="models", metavar="M",
                   help="lexical | popular | bootstrap (prompt-only SmolLM2) | an ONNX model dir | best-of-N:M "
                        "(M = bootstrap or an ONNX dir, sampled N times per user, the best by the test-time "
                        "rewards); repeatable")
    p.add_argument("--k", default="5,10", help="comma-separated cut-offs (default 5,10)")
    p.add_argument("--samples", type=int, default=None, metavar="N", help="evaluate the first N target users")
    p.add_argument("--engine", choices=["embedded", "elasticsearch", "dense"], default="embedded",
                   help="search backend: tantivy (default), Elasticsearch at NEWSREC_ES_URL, or MiniLM dense")
    p.add_argument("--batch-size", type=int, default=None, help="users per model call (default: the worker's)")
    p.add_argument("--no-diversity", action="store_true", help="skip MiniLM query-diversity")
    p.add_argument("--per-user", action="store_true", help="keep per-user rows (queries, items) in the JSON")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default bench-results/eval-<dataset>.json)")
    p.add_argument("--protocol", choices=["auto", "corpus", "impressions"], default="auto",
                   help="corpus: R@k/N@k/MRR over the whole index; impressions: rank each impression's "
                        "candidates (MIND AUC, MRR, nDCG); auto: impressions when impressions.jsonl exists")
    p.add_argument("--channels", action="store_true",
                   help="corpus protocol: the channel ablation (each channel, the hybrid with and without "
                        "the --model, the hybrid minus each channel, the model's effect with a bootstrap CI)")
    p.add_argument("--holdout-days", type=float, default=1.0,
                   help="impressions: the last D days are held out (the learned fusion trains on the rest)")
    p.add_argument("--model-samples", type=int, default=300, metavar="N",
                   help="impressions: held-out impressions the model channel writes queries for")
    p.add_argument("--model-train-samples", type=int, default=0, metavar="N",
                   help="impressions: the last N training impressions the model writes queries for too, so "
                        "the learned fusion learns the model channel (and its effect there gets a CI)")
    p.add_argument("--save-ranker", type=Path, default=None, metavar="DIR",
                   help="impressions: write the fitted learned fusion (LightGBM + manifest) to DIR")
    p.set_defaults(func=_cmd_eval)

    sub = p.add_subparsers(dest="eval_what")
    o = sub.add_parser("overlap", help="top-10 agreement of tantivy, Elasticsearch (local noida-db) and dense")
    o.add_argument("--news", type=Path, required=True, help="MIND news.tsv")
    o.add_argument("--docs", type=int, default=300, help="first N articles (noida-db is slow: keep <= 300)")
    o.add_argument("--queries", type=int, default=50)
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--k", type=int, default=10, dest="overlap_k")
    o.add_argument("--out", type=Path, default=None, dest="overlap_out",
                   help="JSON path (default bench-results/overlap.json)")
    o.set_defaults(func=_cmd_overlap)


def _parse_ks(text: str) -> tuple[int, ...]:
    try:
        ks = tuple(sorted({int(k) for k in text.split(",") if k.strip()}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--k expects comma-separated integers, got {text!r}") from None
    if not ks or ks[0] < 1:
        raise argparse.ArgumentTypeError(f"--k needs positive cut-offs, got {text!r}")
    return ks


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str))


def _cmd_eval(args: argparse.Namespace) -> int:
    from evaluation.dataset import DatasetError, load_dataset
    from evaluation.evaluate import EvalConfig, format_markdown, run_evaluation
    from streams.settings import CommonSettings, load

    if args.data is None:
        raise CommandError("`newsrec eval` needs --data DIR")
    try:
        dataset = load_dataset(args.data)
    except DatasetError as exc:
        raise CommandError(f"dataset: {exc}") from None
    if args.protocol == "impressions" or (args.protocol == "auto" and dataset.impressions):
        return _eval_impressions(args, dataset)
    if args.channels:
        return _eval_channels(args, dataset)
    if not args.models:
        raise CommandError("the corpus protocol needs at least one --model (e.g. --model lexical)")
    cfg_args: dict[str, Any] = {"ks": _parse_ks(args.k), "samples": args.samples,
                                "diversity": not args.no_diversity, "keep_per_user": args.per_user}
    if args.batch_size:
        cfg_args["batch_size"] = args.batch_size
    try:
        cfg = EvalConfig(**cfg_args)
        methods = [_resolve(m, dataset) for m in args.models]
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    es: dict[str, Any] = {}
    if args.engine == "elasticsearch":
        settings = load(CommonSettings)
        if not settings.es_url:
            raise CommandError("--engine elasticsearch needs NEWSREC_ES_URL")
        es = {"es_url": settings.es_url, "es_api_key": settings.es_api_key_value(),
              "es_ca_certs": str(settings.es_ca_certs) if settings.es_ca_certs else None}
    results = run_evaluation(dataset, methods, cfg, engine=args.engine, **es)
    out = args.out or RESULTS_DIR / f"eval-{dataset.path.resolve().name}.json"
    _write_json(out, results)
    print(format_markdown(results))
    for m in results["methods"]:
        t = m["timings"]
        print(f"{m['method']}: {t['users']} users in {t['total_s']:.1f} s ({t['users_per_s']} users/s; "
              f"model {t['model_s']:.1f} s, search {t['search_s']:.1f} s, embed {t['embed_s']:.1f} s)")
    print(f"results written to {out}")
    return 0


def _resolve(spec: str, dataset: Any) -> Any:
    """A --model: a baseline, a model dir, or ``best-of-N:M`` (model M sampled N times per user,
    the best completion by the test-time rewards over this dataset's corpus served)."""
    from evaluation.baselines import onnx_model_dir, resolve_method

    match = re.fullmatch(r"best-of-(\d+):(.+)", spec)
    if match is None:
        return resolve_method(spec, dataset.news, dataset.events)
    from models.runtime import OnnxCausalLM
    from training.sampling import BestOfN
    from training.scoring import RewardScorer

    n, model = int(match[1]), match[2]
    model_dir = onnx_model_dir(model)
    if not model_dir.is_dir():
        raise ValueError(f"--model {spec}: {model_dir} is not an ONNX model directory (or 'bootstrap')")
    return BestOfN(OnnxCausalLM(model_dir), RewardScorer(dataset.news), n)


def _model_channel(args: argparse.Namespace, dataset: Any) -> Any:
    """The one query-writing --model that fills the model channel, or None."""
    from evaluation.baselines import QueryMethod

    methods = [_resolve(m, dataset) for m in args.models or ()]
    if len(methods) > 1 or not all(isinstance(m, QueryMethod) for m in methods):
        raise CommandError("channel evaluations take at most one query-writing --model (bootstrap or an ONNX "
                           "model dir): it is the model channel beside signals, dense and trending")
    return methods[0] if methods else None


def _dense_index(dataset: Any, rc: Any) -> Any:
    from index.dense import DenseIndex
    from streams.settings import WorkerSettings, load

    if not rc.weights.get("dense"):
        return None
    dense = DenseIndex(load(WorkerSettings).minilm_embedder())
    dense.upsert_sync(dataset.news)
    return dense


def _eval_channels(args: argparse.Namespace, dataset: Any) -> int:
    from evaluation.channels import ChannelStudyConfig, channel_study, format_channels_markdown
    from streams.recommend import RecommendConfig

    method, rc = _model_channel(args, dataset), RecommendConfig.from_settings()
    cfg = ChannelStudyConfig(samples=args.samples, recommend=rc,
                             **({"batch_size": args.batch_size} if args.batch_size else {}))
    return _channel_report(args, dataset, lambda engine, dense: channel_study(dataset, engine, dense, cfg, method),
                           format_channels_markdown, "eval-channels")


def _eval_impressions(args: argparse.Namespace, dataset: Any) -> int:
    from evaluation.impressions import ImpressionConfig, evaluate_impressions, format_impressions_markdown
    from streams.recommend import RecommendConfig

    if not dataset.impressions:
        raise CommandError(f"{dataset.path}: no impressions.jsonl (make one with `newsrec data mind`)")
    method, rc = _model_channel(args, dataset), RecommendConfig.from_settings()
    try:
        cfg = ImpressionConfig(holdout_days=args.holdout_days, model_samples=args.model_samples,
                               model_train_samples=args.model_train_samples,
                               recommend=rc, save_ranker=args.save_ranker,
                               **({"batch_size": args.batch_size} if args.batch_size else {}))
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    return _channel_report(args, dataset,
                           lambda engine, dense: evaluate_impressions(dataset, engine, dense, cfg, method),
                           format_impressions_markdown, "eval-impressions")


def _channel_report(args: argparse.Namespace, dataset: Any, study: Any, fmt: Any, prefix: str) -> int:
    """Index the dataset's news (lexical engine, and dense when its channel is on), run
    ``study(engine, dense)``, print its table and write its JSON."""
    from evaluation.evaluate import search_backend
    from streams.recommend import RecommendConfig

    async def run() -> dict[str, Any]:
        dense = _dense_index(dataset, RecommendConfig.from_settings())
        async with search_backend(args.engine if args.engine != "dense" else "embedded", dataset.news) as engine:
            return await study(engine, dense)

    report = asyncio.run(run())
    report["dataset"] = str(dataset.path)
    out = args.out or RESULTS_DIR / f"{prefix}-{dataset.path.resolve().name}.json"
    _write_json(out, report)
    print(fmt(report))
    print(f"took {report['timings']['total_s']} s (model {report['timings']['model_s']} s); results written to {out}")
    return 0


def _cmd_overlap(args: argparse.Namespace) -> int:
    from evaluation.evaluate import format_overlap_markdown, overlap_queries
    from index.corpus import read_mind_news
    from tools.infra import LocalInfra

    if not args.news.is_file():
        raise CommandError(f"--news {args.news}: no such file")
    news = []
    for article in read_mind_news(args.news, errors="skip"):
        news.append(article)
        if len(news) == args.docs:
            break
    queries = overlap_queries(news, args.queries, seed=args.seed)
    state = Path(tempfile.mkdtemp(prefix="newsrec-overlap-"))
    try:
        study = _run_overlap(LocalInfra(state / "infra"), news, queries, args.overlap_k)
    finally:
        shutil.rmtree(state, ignore_errors=True)
    study["news"] = str(args.news)
    study["seed"] = args.seed
    out = args.overlap_out or RESULTS_DIR / "overlap.json"
    _write_json(out, study)
    print(format_overlap_markdown(study))
    print(f"results written to {out}")
    return 0


def _run_overlap(infra: Any, news: list[Any], queries: list[str], k: int) -> dict[str, Any]:
    """Start noida-db, index the same news in three engines, compare their top-k."""
    from evaluation.evaluate import overlap_study
    from index.dense import DenseIndex, MiniLMEmbedder
    from index.elastic import ElasticEngine
    from index.embedded import EmbeddedEngine

    with infra:
        url = infra.start_search(0)

        async def run() -> dict[str, Any]:
            engines: dict[str, Any] = {
                "tantivy": EmbeddedEngine(),
                "noida-db (ES API)": ElasticEngine(url, f"overlap-{uuid.uuid4().hex[:8]}"),
                "dense MiniLM": DenseIndex(MiniLMEmbedder()),
            }
            try:
                return await overlap_study(news, queries, engines, k=k)
            finally:
                for engine in engines.values():
                    await engine.close()

        return asyncio.run(run())
