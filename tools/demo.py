"""``newsrec demo``: the whole product on one machine, on embedded defaults.

Starts the local broker, exports (once, cached) the bootstrap model, publishes the demo
news corpus that ships with the project, runs a worker, streams a few simulated users'
cross-domain signals and prints their recommendations as they arrive.
"""

from __future__ import annotations

import logging
import tempfile
import textwrap
import time
import uuid
from datetime import UTC, datetime, timedelta
from importlib import resources
from itertools import zip_longest
from pathlib import Path

from streams.contracts import Recommendation, UserEvent
from streams.kafka_log import with_logger
from streams.producer import NewsrecProducer, ensure_topics
from streams.reader import RecommendationReader
from streams.settings import CommonSettings, WorkerSettings, load
from tools.infra import LocalInfra
from tools.stack import WorkerProcess, free_port

log = logging.getLogger(__name__)

EVENT_GAP_S = 0.7
TITLE_WIDTH = 70

# (domain, text) per persona, oldest first: searches, visited page titles, app events, clicks.
PERSONAS: dict[str, list[tuple[str, str]]] = {
    "ev-driver": [("search", "best electric car battery range 2026"), ("browse", "Charging network map: fast chargers"),
                  ("app", "opened EV charging app"), ("search", "tesla model price cut"),
                  ("news_click", "electric vehicles")],
    "hoops-fan": [("search", "nba standings"), ("browse", "Box score: last night's basketball games"),
                  ("app", "fantasy basketball lineup set"), ("search", "playoff injury report"),
                  ("news_click", "basketball")],
    "home-cook": [("search", "easy weeknight pasta recipe"), ("browse", "Seasonal vegetables guide: autumn"),
                  ("app", "grocery list: garlic, basil, tomatoes"), ("news_click", "recipe")],
    "investor": [("search", "interest rates outlook"), ("browse", "Stock market today: indexes close higher"),
                 ("app", "portfolio tracker: checked retirement account"), ("news_click", "stocks")],
    "traveller": [("search", "cheap flights to lisbon"), ("browse", "Travel guide: weekend in a European city"),
                  ("app", "booked hotel"), ("news_click", "travel")],
    "runner": [("search", "marathon training plan"), ("browse", "How to avoid running injuries"),
               ("app", "logged 10 km run"), ("news_click", "fitness")],
}


def demo_corpus() -> Path:
    return Path(str(resources.files("index") / "data" / "demo_news.tsv"))


def persona_events(user_id: str, persona: str, corpus_titles: dict[str, str], start: datetime) -> list[UserEvent]:
    """A persona's events; a click names the first corpus article whose title mentions its keyword."""
    events = []
    for i, (domain, text) in enumerate(PERSONAS[persona]):
        news_id = None
        if domain == "news_click":
            news_id = next((nid for nid, t in corpus_titles.items() if text.lower() in t.lower()), None)
            if news_id is None:
                continue
            text = corpus_titles[news_id]
        events.append(UserEvent(event_id=f"{user_id}-{i}-{uuid.uuid4().hex[:6]}", user_id=user_id,
                                ts=start + timedelta(minutes=5 * i), domain=domain, text=text, news_id=news_id,
                                url=None, meta={"source": "demo"}))
    return events


def short(text: str, width: int = TITLE_WIDTH) -> str:
    """``text`` on one line, cut at a word boundary."""
    return textwrap.shorten(text, width, placeholder=" …")


def print_recommendation(rec: Recommendation, trigger: UserEvent | None) -> None:
    cause = f"[{trigger.domain}] {short(trigger.text, 50)}" if trigger else rec.trigger_event_id
    print(f"\n== {rec.user_id}  after {cause}  (model {rec.model_version}, {rec.latency_ms:.0f} ms)")
    for q in rec.queries:
        print(f"   query: {q}")
    print(f"   {'#':>2}  {'news_id':<8} {'score':>7}  title")
    for rank, item in enumerate(rec.items[:5], 1):
        print(f"   {rank:>2}  {item.news_id:<8} {item.score:>7.4f}  {short(item.title)}")


def run_demo(*, users: int = 4, timeout: float = 180.0, model_dir: Path | None = None) -> int:
    # Logs outlive the run (NEWSREC_STATE_DIR/demo); the worker's state is removed on exit.
    logs = load(CommonSettings).state_dir.resolve() / "demo"
    (logs / "worker.log").unlink(missing_ok=True)  # this run's log only (the worker appends)
    with tempfile.TemporaryDirectory(prefix="newsrec-demo-") as tmp, LocalInfra(logs) as infra:
        print(f"logs: {logs}/worker.log, {logs}/broker.log")
        return _demo(infra, Path(tmp), logs, users=users, timeout=timeout, model_dir=model_dir)


def _demo(infra: LocalInfra, state: Path, logs: Path, *, users: int, timeout: float, model_dir: Path | None) -> int:
    from index.corpus import read_mind_news

    bootstrap = infra.start_broker(free_port())
    env = {"NEWSREC_KAFKA_BOOTSTRAP": bootstrap, "NEWSREC_STATE_DIR": str(state),
           "NEWSREC_BROKER_PROFILE": "local", "NEWSREC_SEARCH_ENGINE": "embedded",
           "NEWSREC_REFRESH_MIN_INTERVAL_S": "3"}
    settings = load(WorkerSettings, kafka_bootstrap=bootstrap, state_dir=state)
    if model_dir is None:
        from models.bootstrap import bootstrap as bootstrap_model
        from models.bootstrap import default_cache_dir

        model_dir = default_cache_dir() / "models" / "smollm2-bootstrap"
        if not (model_dir / "manifest.json").is_file():
            print(f"preparing the bootstrap model in {model_dir} (first run: a few minutes)...")
        bootstrap_model(model_dir)
    env["NEWSREC_MODEL_DIR"] = str(model_dir)

    ensure_topics(settings, extra=[settings.refresh_done_topic])
    articles = list(read_mind_news(demo_corpus()))
    with NewsrecProducer(settings) as producer:
        for article in articles:
            producer.send_article(article)
    print(f"published {len(articles)} demo news articles; starting the worker...")

    titles = {a.news_id: a.title for a in articles}
    with WorkerProcess(env, logs / "worker.log") as worker:
        worker.wait_ready(documents=len(articles), timeout=timeout)
        names = list(PERSONAS)
        start = datetime.now(UTC) - timedelta(hours=1)
        timelines = [persona_events(f"demo-{names[n % len(names)]}-{n}", names[n % len(names)], titles, start)
                     for n in range(users)]
        expected = {events[-1].user_id: events[-1].event_id for events in timelines if events}
        by_id = {ev.event_id: ev for events in timelines for ev in events}
        # Interleave users' signals, one every EVENT_GAP_S, as a live stream would.
        stream = [ev for step in zip_longest(*timelines) for ev in step if ev is not None]
        done: set[str] = set()
        deadline = time.monotonic() + timeout
        group = f"newsrec-demo-{uuid.uuid4().hex[:8]}"
        with RecommendationReader(with_logger(settings.consumer_config(group)), settings.topic_recommendations) \
                as reader, \
                NewsrecProducer(settings) as producer:
            reader.wait_assigned()
            print(f"streaming {len(stream)} signals of {users} users; recommendations as they arrive:")
            next_send = time.monotonic()
            while done != set(expected) and time.monotonic() < deadline:
                if stream and time.monotonic() >= next_send:
                    ev = stream.pop(0)
                    producer.send_event(ev)
                    producer.flush()
                    print(f"  -> {ev.user_id} [{ev.domain}] {short(ev.text)}")
                    next_send = time.monotonic() + EVENT_GAP_S
                for rec, _ in reader.poll(0.1):
                    print_recommendation(rec, by_id.get(rec.trigger_event_id))
                    if expected.get(rec.user_id) == rec.trigger_event_id:
                        done.add(rec.user_id)
        missing = set(expected) - done
        if missing:
            print(f"\nno up-to-date recommendation within {timeout:.0f}s for: {sorted(missing)}\n"
                  f"worker log tail ({logs / 'worker.log'}):\n{worker.log_tail()}")
            return 1
        print(f"\nall {users} users have recommendations covering their latest signal. Shutting down.")
        return 0
