"""``newsrec``: one console script, a subcommand per role."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from pydantic_settings import BaseSettings

from commands.dlq_cli import add_dlq_command
from commands.errors import EXIT_INPUT, EXIT_SERVICE, CommandError, run
from streams.settings import CommonSettings, WorkerSettings, load

log = logging.getLogger("newsrec")

EXIT_CODES_HELP = """exit codes: 0 ok, 1 a check failed, 2 bad arguments or settings, 3 bad input file or
rejected records, 4 model failed verification, 5 broker or search server unreachable, 130 interrupted"""
TOPIC_SETTINGS = ("kafka_bootstrap", "broker_profile", "topic_events", "topic_news", "topic_recommendations",
                  "topic_dlq", "topic_model_updates", "topic_partitions")
PRODUCE_SETTINGS = ("kafka_bootstrap", "broker_profile", "topic_events", "topic_news", "topic_dlq")
INDEX_SETTINGS = ("kafka_bootstrap", "topic_news", "es_url", "es_alias", "es_api_key", "es_request_timeout_s")


def settings_help(cls: type[BaseSettings], names: Sequence[str] | None = None) -> str:
    """The settings ``cls`` reads (or just ``names``): env variable and default, from the model itself."""
    lines = ["settings (environment variables, or a .env file):"]
    for name, info in cls.model_fields.items():
        if names is None or name in names:
            value = info.get_default(call_default_factory=True)
            default = "unset" if value is None else json.dumps(value) if isinstance(value, dict | list) else value
            lines.append(f"  NEWSREC_{name.upper():<34} default: {default}")
    return "\n".join(lines)


def _cmd_worker(args: argparse.Namespace) -> int:
    """Run the recommendation worker; every setting comes from the NEWSREC_* environment
    variables below (or a .env file)."""
    from streams.runtime import run_worker

    return run_worker(load(WorkerSettings))


def _cmd_index(args: argparse.Namespace) -> int:
    import elastic_transport

    from streams.feed import DeadLetters, run_indexer
    from streams.kafka_log import require_broker

    settings = load(CommonSettings)
    if not settings.es_url:
        raise CommandError("`newsrec index` writes Elasticsearch: set NEWSREC_ES_URL "
                          "(the embedded engine is fed by each worker itself)")

    require_broker(settings.kafka_config())

    async def main() -> int:
        engine = settings.elastic_engine()
        try:
            await engine.ensure_index()
            return await run_indexer(settings.consumer_config("newsrec-indexer"), settings.topic_news, engine,
                                     dead_letters=DeadLetters(settings.producer_config(), settings.topic_dlq),
                                     idle_exit_s=args.exit_when_idle)
        finally:
            await engine.close()

    try:
        total = asyncio.run(main())
    except elastic_transport.TlsError as exc:
        raise CommandError(f"TLS with the search server at {settings.es_url} failed ({exc.message}): check "
                           "NEWSREC_ES_CA_CERTS (the CA that signed the server's certificate) and that the "
                           "certificate has not expired", EXIT_SERVICE) from None
    except elastic_transport.ConnectionError as exc:
        raise CommandError(f"no search server at {settings.es_url} ({exc.message}): start one with "
                           "`newsrec infra up --search` "
                           "or set NEWSREC_ES_URL", EXIT_SERVICE) from None
    log.info("indexer stopped after %d articles", total)
    return 0


def _cmd_produce(args: argparse.Namespace) -> int:
    from streams.producer import NewsrecProducer, ensure_topics, produce_file

    settings = load(CommonSettings)
    if not args.file.is_file():
        raise CommandError(f"no such file: {args.file} (give the path of a "
                           f"{'JSON-lines events file' if args.kind == 'events' else 'MIND news.tsv'})",
                           EXIT_INPUT)
    ensure_topics(settings)
    with NewsrecProducer(settings) as producer:
        report = produce_file(producer, args.file, args.kind, strict=args.strict)
    for reason in report.rejected:
        print(f"  invalid: {reason}", file=sys.stderr)
    if report.invalid > len(report.rejected):
        print(f"  ... and {report.invalid - len(report.rejected)} more", file=sys.stderr)
    print(report.summary())
    if not report.invalid:
        return 0
    if args.strict:
        print(f"{report.invalid} invalid records: nothing sent (--strict); fix them, or drop --strict "
              f"to send the valid ones and dead-letter the rest", file=sys.stderr)
    else:
        print(f"{report.invalid} invalid records went to {settings.topic_dlq}: see them with `newsrec dlq`",
              file=sys.stderr)
    return EXIT_INPUT


def _cmd_topics(args: argparse.Namespace) -> int:
    from streams.producer import ensure_topics

    settings = load(WorkerSettings)
    ensure_topics(settings, extra=[settings.refresh_done_topic])
    print("topics ready")
    return 0


def _cmd_infra(args: argparse.Namespace) -> int:
    from tools.infra import LocalInfra

    settings = load(CommonSettings)
    infra = LocalInfra(settings.state_dir / "infra")
    if args.action == "up":
        port = int(settings.kafka_bootstrap.split(",")[0].rsplit(":", 1)[1])
        print(f"export NEWSREC_KAFKA_BOOTSTRAP={infra.start_broker(port)}")
        if args.search or settings.engine == "elasticsearch":
            es_port = int((settings.es_url or "http://127.0.0.1:19200").rsplit(":", 1)[1])
            print(f"export NEWSREC_ES_URL={infra.start_search(es_port)}")
    elif args.action == "down":
        infra.stop()
        print("local infrastructure stopped")
    elif args.json:
        print(json.dumps(infra.status()))
    else:
        for name, state in infra.status().items():
            where = f"{state['url']}  pid {state['pid']}  log {state['log']}" if state["running"] else ""
            print(f"{name:<8} {'running' if state['running'] else 'stopped':<8} {where}".rstrip())
    return 0


def _cmd_models_publish(args: argparse.Namespace) -> int:
    from streams.rollout import RolloutError, publish

    settings = load(WorkerSettings)
    try:
        update = publish(settings, args.model_dir)
    except RolloutError as exc:
        raise CommandError(f"cannot publish {args.model_dir}: {exc}") from None
    print(f"announced model {update.version} ({update.model_dir}) on {settings.topic_model_updates}")
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from models.bootstrap import bootstrap

    settings = load(WorkerSettings)
    out = args.out or settings.resolved_model_dir()
    manifest = bootstrap(out, cache_dir=args.cache_dir) if args.cache_dir else bootstrap(out)
    print(f"model {manifest.name} {manifest.version} ready at {out}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from tools.demo import run_demo

    return run_demo(users=args.users, timeout=args.timeout, model_dir=args.model_dir)


def _cmd_bench(args: argparse.Namespace) -> int:
    from tools.bench import run_pipeline_bench

    return run_pipeline_bench(events=args.events, users=args.users, engines=args.engines.split(","),
                              out=args.out, model_dir=args.model_dir, rate=args.rate)


def _cmd_bench_faults(args: argparse.Namespace) -> int:
    from tools.overload import run_faults_bench

    return run_faults_bench(events=args.events, users=args.users, bursts=args.bursts, out_dir=args.out_dir,
                            model_dir=args.model_dir)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="newsrec", description=__doc__, epilog=EXIT_CODES_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging, library warnings, and the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("worker", help="run the recommendation worker (Faust)", description=_cmd_worker.__doc__,
                   epilog=settings_help(WorkerSettings), formatter_class=argparse.RawDescriptionHelpFormatter,
                   ).set_defaults(func=_cmd_worker)

    p = sub.add_parser("index", help="consume news-articles into Elasticsearch",
                       epilog=settings_help(CommonSettings, INDEX_SETTINGS),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--exit-when-idle", type=float, default=None, metavar="S",
                   help="stop after S seconds without new articles (batch loads)")
    p.set_defaults(func=_cmd_index)

    p = sub.add_parser("produce", help="publish records from a file (invalid ones to the dead-letter topic)",
                       description="Validate each record of FILE against its contract; send the valid ones and "
                                   "dead-letter each invalid one with file:line and the reason. Prints one "
                                   "summary line; exit code 3 when any record was rejected.",
                       epilog=settings_help(CommonSettings, PRODUCE_SETTINGS),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kind", choices=["events", "news"], help="events: JSON lines; news: MIND news.tsv")
    p.add_argument("file", type=Path, help="the input file")
    p.add_argument("--strict", action="store_true",
                   help="check the whole file first and send nothing (not even dead letters) if any record is bad")
    p.set_defaults(func=_cmd_produce)

    sub.add_parser("topics", help="create the contract topics", epilog=settings_help(CommonSettings, TOPIC_SETTINGS),
                   formatter_class=argparse.RawDescriptionHelpFormatter).set_defaults(func=_cmd_topics)

    add_dlq_command(sub)

    p = sub.add_parser("infra", help="local broker (and Elasticsearch-API server) for development")
    p.add_argument("action", choices=["up", "down", "status"],
                   help="up: start (prints export lines for the shell); down: stop; status: what runs where")
    p.add_argument("--search", action="store_true", help="also start the Elasticsearch-API server")
    p.add_argument("--json", action="store_true", help="status as one JSON object")
    p.set_defaults(func=_cmd_infra)

    p = sub.add_parser("models", help="model registry")
    msub = p.add_subparsers(dest="action", required=True)
    b = msub.add_parser("bootstrap", help="export SmolLM2-135M-Instruct (zero-shot) to ONNX")
    b.add_argument("--out", type=Path, default=None, help="model dir (default: NEWSREC_MODEL_DIR)")
    b.add_argument("--cache-dir", type=Path, default=None,
                   help="where the exported base model is cached (default: ~/.cache/newsrec)")
    b.set_defaults(func=_cmd_models)
    b = msub.add_parser("publish", help="copy a verified model dir into the registry and announce it to workers")
    b.add_argument("--model-dir", type=Path, required=True, help="exported model dir with manifest.json")
    b.set_defaults(func=_cmd_models_publish)

    p = sub.add_parser("demo", help="local broker + worker + demo news + simulated users")
    p.add_argument("--users", type=int, default=4, help="simulated users (default: 4)")
    p.add_argument("--timeout", type=float, default=180.0,
                   help="seconds to wait for the worker and for each user's recommendation (default: 180)")
    p.add_argument("--model-dir", type=Path, default=None, help="default: bootstrap SmolLM2 (cached)")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("bench", help="benchmarks")
    bsub = p.add_subparsers(dest="what", required=True)
    b = bsub.add_parser("pipeline", help="events/s and end-to-end latency on the local stack")
    b.add_argument("--events", type=int, default=4000, help="events to send (default: 4000)")
    b.add_argument("--users", type=int, default=400, help="simulated users (default: 400)")
    b.add_argument("--rate", type=float, default=220.0,
                   help="event rate the paced phase aims at (sessions end with a short tail)")
    b.add_argument("--engines", default="embedded,elasticsearch",
                   help="comma-separated search engines to run (default: embedded,elasticsearch)")
    b.add_argument("--model-dir", type=Path, default=None, help="default: a tiny random test model")
    b.add_argument("--out", type=Path, default=Path("bench-results/pipeline.json"),
                   help="JSON results file (default: bench-results/pipeline.json)")
    b.set_defaults(func=_cmd_bench)
    b = bsub.add_parser("faults", help="overload: bursts faster than the worker refreshes; RSS, lag, coalescing")
    b.add_argument("--events", type=int, default=15_000, help="events per burst")
    b.add_argument("--users", type=int, default=150, help="simulated users (default: 150)")
    b.add_argument("--bursts", type=int, default=3, help="bursts over the same users (RSS must not grow between)")
    b.add_argument("--model-dir", type=Path, default=None, help="default: a tiny random test model")
    b.add_argument("--out-dir", type=Path, default=Path("bench-results"),
                   help="writes faults.json and faults-overload.png here")
    b.set_defaults(func=_cmd_bench_faults)

    from commands.data_cli import add_data_commands
    from commands.eval_cli import add_eval_commands
    from commands.train_cli import add_train_commands

    add_data_commands(sub)
    add_eval_commands(sub)
    add_train_commands(sub)
    from commands.models_cli import add_model_commands

    add_model_commands(sub, bench=bsub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser(), list(argv) if argv is not None else None)


if __name__ == "__main__":
    sys.exit(main())
