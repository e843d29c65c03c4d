"""The evaluation harness on a small dataset written by hand in the documented format
(as someone else would bring it), through the real serving path and real engines."""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from commands.eval_cli import add_eval_commands
from evaluation.baselines import LexicalBaseline, LLMQueries, PopularBaseline, resolve_method
from evaluation.dataset import load_dataset
from evaluation.evaluate import (
    EvalConfig,
    WindowConfig,
    build_state,
    dataset_cutoff,
    evaluate,
    format_markdown,
    overlap_queries,
    overlap_stats,
    overlap_study,
)
from streams.contracts import NewsArticle, UserEvent
from streams.recommend import RecommendConfig
from streams.window import UserState

# (category, subcategory, words every article of the topic shares)
TOPICS = [
    ("sports", "tennis", "Wimbledon tennis Federer"),
    ("sports", "golf", "golf Masters Augusta"),
    ("finance", "markets", "stocks Nasdaq earnings"),
    ("health", "vaccines", "vaccine measles outbreak"),
    ("food", "recipes", "pasta recipe lasagna"),
    ("entertainment", "celebrity", "Kardashian celebrity gossip"),
]
ANGLES = ["update", "analysis", "report", "preview", "recap"]
T0 = datetime(2024, 5, 1, 8, 0, tzinfo=UTC)


def nid(topic: int, article: int) -> str:
    return f"N{topic}{article}"


def _mind_line(topic: int, article: int) -> str:
    category, sub, words = TOPICS[topic]
    title = f"{words} {ANGLES[article]} number {article}"
    abstract = f"An {ANGLES[article]} about {words.lower()}."
    entity = json.dumps([{"Label": words.split()[-1], "Type": "P", "WikidataId": "Q1", "Confidence": 1.0,
                          "OccurrenceOffsets": [0], "SurfaceForms": [words.split()[-1]]}])
    return "\t".join([nid(topic, article), category, sub, title, abstract,
                      f"https://example.org/{nid(topic, article)}", entity, "[]"])


def _event(user: str, seq: int, domain: str, text: str, news_id: str | None = None) -> str:
    record: dict[str, Any] = {"event_id": f"{user}-{seq}", "user_id": user,
                              "ts": (T0 + timedelta(minutes=10 * seq)).isoformat(), "domain": domain, "text": text}
    if news_id:
        record["news_id"] = news_id
    return json.dumps(record)


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """30 MIND rows; 10 warm users who search and read one topic (targets: that topic's
    unread articles), 3 cold users with one search, and crowd users who only read celebrity news."""
    path = tmp_path_factory.mktemp("handmade-dataset")
    (path / "news.tsv").write_text("".join(_mind_line(t, a) + "\n" for t in range(6) for a in range(5)))
    events, targets = [], []
    for u in range(10):
        user, topic = f"warm{u}", u % 5
        words = TOPICS[topic][2]
        events += [_event(user, 0, "search", words),
                   _event(user, 1, "news_click", f"{words} update number 0", nid(topic, 0)),
                   _event(user, 2, "browse", f"{words.split()[0]} fans forum"),
                   _event(user, 3, "news_click", f"{words} analysis number 1", nid(topic, 1))]
        targets.append({"user_id": user, "news_ids": [nid(topic, a) for a in (2, 3, 4)], "cold": False})
    for u in range(3):
        user, topic = f"cold{u}", u
        events.append(_event(user, 0, "search", TOPICS[topic][2]))
        targets.append({"user_id": user, "news_ids": [nid(topic, 2), nid(topic, 3)], "cold": True})
    for u in range(6):  # history-only users: make celebrity news the most popular
        events += [_event(f"crowd{u}", a, "news_click", "celebrity news", nid(5, a)) for a in range(5)]
    # events in a shuffled order: the loader sorts each user's events by time
    (path / "events.jsonl").write_text("\n".join(reversed(events)) + "\n")
    (path / "targets.jsonl").write_text("".join(json.dumps(t) + "\n" for t in targets))
    return path


def _metric_values(group: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in group.items() if k not in ("n", "n_queries", "n_targets", "n_items") and v is not None}


def _strip_timings(results: dict[str, Any]) -> dict[str, Any]:
    return {**results, "index_s": None, "methods": [{**m, "timings": None} for m in results["methods"]]}


async def test_lexical_popular_and_tiny_model_through_the_harness(dataset_dir: Path, tiny_model_dir: Path) -> None:
    ds = load_dataset(dataset_dir)
    methods = [LexicalBaseline(), PopularBaseline(ds.news, ds.events), LLMQueries.from_dir(tiny_model_dir)]
    cfg = EvalConfig(progress=False, batch_size=4)
    results = await evaluate(ds, methods, cfg)

    assert results["engine"] == "tantivy"
    assert results["dataset"]["evaluated_users"] == 13 and results["dataset"]["cold_users"] == 3
    assert results["config"]["now"] == (T0 + timedelta(minutes=40)).isoformat()
    assert len(results["dataset"]["sha256"]) == 64
    by_name = {m["method"]: m for m in results["methods"]}
    assert list(by_name) == ["lexical", "popular", "llm:tiny-0"]
    for m in results["methods"]:
        assert m["overall"]["n"] == 13 and m["cold"]["n"] == 3
        for group in (m["overall"], m["cold"]):
            for key, value in _metric_values(group).items():
                assert 0.0 <= value <= 1.0, (m["method"], key, value)
        assert len(m["per_user"]) == 13
        for row in m["per_user"]:
            assert len(row["items"]) <= 10 and len(set(row["items"])) == len(row["items"])

    lexical, popular = by_name["lexical"], by_name["popular"]
    # signals name the target articles' words: lexical finds them, popularity cannot
    assert lexical["overall"]["recall@10"] == 1.0 and lexical["overall"]["ndcg@10"] > 0.9
    assert popular["overall"]["recall@10"] == 0.0
    assert lexical["overall"]["coverage@10"] == 1.0
    assert popular["overall"]["query_diversity"] is None and popular["overall"]["n_queries"] is None
    assert lexical["overall"]["n_queries"] == pytest.approx((10 * 4 + 3 * 1) / 13)  # every signal text, up to 5
    assert 0.0 < lexical["overall"]["query_diversity"] <= 1.0
    # clicked articles are never recommended again
    warm0 = next(r for r in lexical["per_user"] if r["user_id"] == "warm0")
    assert not {nid(0, 0), nid(0, 1)} & set(warm0["items"])
    assert warm0["items"][:3] and set(warm0["items"][:3]) == {nid(0, 2), nid(0, 3), nid(0, 4)}
    tiny = by_name["llm:tiny-0"]
    assert tiny["version"] == "tiny-0" and tiny["timings"]["model_s"] > 0

    table = format_markdown(results)
    for name in by_name:
        assert f"| {name} | 13 |" in table and f"| {name} (cold) | 3 |" in table

    again = await evaluate(ds, methods, cfg)
    assert _strip_timings(again) == _strip_timings(results)


def test_lexical_query_counts_follow_the_window(dataset_dir: Path) -> None:
    ds = load_dataset(dataset_dir)
    state = build_state(ds.events["warm0"], WindowConfig.from_settings())
    # newest first; four signals, the two clicks remembered
    assert [s.event_id for s in state.signals] == ["warm0-3", "warm0-2", "warm0-1", "warm0-0"]
    assert state.clicked == (nid(0, 0), nid(0, 1))
    queries = LexicalBaseline().queries([state], RecommendConfig(max_queries=3))
    assert queries == [[s.text for s in state.signals[:3]]]
    assert WindowConfig.from_settings() == WindowConfig(30, 7 * 24 * 3600, 200)
    assert dataset_cutoff(ds) == T0 + timedelta(minutes=40)


def _article(news_id: str, published: datetime | None = None) -> NewsArticle:
    return NewsArticle(news_id=news_id, title=f"title {news_id}", published_at=published)


def _click(user: str, news_id: str, seq: int = 0) -> UserEvent:
    return UserEvent(event_id=f"{user}-{news_id}-{seq}", user_id=user, ts=T0, domain="news_click",
                     text="t", news_id=news_id)


def test_popular_ranks_by_clicks_then_recency_and_drops_own_clicks() -> None:
    news = [_article("A"), _article("B"), _article("C"), _article("D")]
    events = {"u1": [_click("u1", "B"), _click("u1", "C")], "u2": [_click("u2", "C"), _click("u2", "GONE")]}
    popular = PopularBaseline(news, events)
    cfg = RecommendConfig(items_per_user=3)
    # C: 2 clicks, B: 1, then unclicked by file order, later rows newer: D before A; unknown ids ignored
    assert popular.order == ["C", "B", "D", "A"]
    assert popular.rank([UserState(), UserState(clicked=("C",))], cfg) == [["C", "B", "D"], ["B", "D", "A"]]
    # nobody clicked: pure recency, published_at first when present
    dated = [_article("old", T0), _article("new", T0 + timedelta(days=1)), _article("undated")]
    assert PopularBaseline(dated, {}).order == ["new", "old", "undated"]


def test_resolve_method(dataset_dir: Path, tiny_model_dir: Path) -> None:
    ds = load_dataset(dataset_dir)
    assert isinstance(resolve_method("lexical", ds.news, ds.events), LexicalBaseline)
    assert isinstance(resolve_method("popular", ds.news, ds.events), PopularBaseline)
    assert resolve_method(str(tiny_model_dir), ds.news, ds.events).name == "llm:tiny-0"
    with pytest.raises(ValueError, match="unknown method"):
        resolve_method("no-such-thing", ds.news, ds.events)


def test_eval_config_rejects_k_beyond_the_served_items() -> None:
    with pytest.raises(ValueError, match="items_per_user"):
        EvalConfig(ks=(5, 20))
    with pytest.raises(ValueError):
        EvalConfig(ks=(0,))


def test_overlap_stats_and_queries() -> None:
    stats = overlap_stats([["a", "b", "c"], ["x"], [], ["p", "q"]], [["b", "a", "d"], ["y"], [], []], k=10)
    # per query: 2/3 (top-1 differs), 0/1, skipped (both empty), 0/2
    assert stats["queries"] == 3 and stats["both_empty"] == 1
    assert stats["overlap"] == pytest.approx((2 / 3) / 3)
    assert stats["overlap_raw"] == pytest.approx(0.2 / 3)
    assert stats["same_top1"] == 0.0
    assert overlap_stats([["a", "b"]], [["a", "c"]], k=1)["overlap"] == 1.0
    news = [NewsArticle(news_id=f"N{i}", title=f"Headline number {i} about things", entities=[f"Ent{i % 3}"])
            for i in range(20)]
    queries = overlap_queries(news, 8, seed=1)
    assert queries == overlap_queries(news, 8, seed=1) and len(queries) == 8  # titles fill in for entities
    assert len(set(queries)) == len(queries) and {"Ent0", "Ent1", "Ent2"} < set(queries)
    assert overlap_queries(news, 100, seed=1).__len__() == 23  # 20 titles + 3 entities, no repeats


async def test_elasticsearch_engine_path(dataset_dir: Path, es_url: str) -> None:
    from elasticsearch import AsyncElasticsearch

    ds = load_dataset(dataset_dir)
    methods = [LexicalBaseline(), PopularBaseline(ds.news, ds.events)]
    results = await evaluate(ds, methods, EvalConfig(progress=False, diversity=False),
                             engine="elasticsearch", es_url=es_url)
    assert results["engine"] == "elasticsearch"
    lexical, popular = results["methods"]
    assert lexical["overall"]["recall@10"] == 1.0 and popular["overall"]["recall@10"] == 0.0
    assert lexical["timings"]["search_s"] > 0
    async with AsyncElasticsearch(es_url) as client:  # the evaluation index is dropped afterwards
        aliases = (await client.indices.get_alias()).body
    assert not [name for name, info in aliases.items() if any(a.startswith("newsrec-eval-") for a in info["aliases"])]


async def test_overlap_study_on_three_engines(mind_news_path: Path, es_url: str, unique_name: str) -> None:
    from index.corpus import read_mind_news
    from index.dense import DenseIndex, MiniLMEmbedder
    from index.elastic import ElasticEngine
    from index.embedded import EmbeddedEngine

    news = [a for _, a in zip(range(30), read_mind_news(mind_news_path), strict=False)]
    queries = overlap_queries(news, 12, seed=0)
    engines = {"tantivy": EmbeddedEngine(), "es": ElasticEngine(es_url, unique_name), "dense": DenseIndex(MiniLMEmbedder())}
    try:
        study = await overlap_study(news, queries, engines)
    finally:
        for engine in engines.values():
            await engine.close()
    assert set(study["pairs"]) == {"tantivy vs es", "tantivy vs dense", "es vs dense"}
    for stats in study["pairs"].values():
        assert 0.0 <= stats["overlap"] <= 1.0 and 0.0 <= stats["same_top1"] <= 1.0
    # same BM25 weights on both lexical engines: they agree on most first hits
    assert study["pairs"]["tantivy vs es"]["same_top1"] >= 0.6
    assert study["engines"]["dense"]["empty_results"] == 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="newsrec")
    add_eval_commands(parser.add_subparsers(dest="command", required=True))
    return parser


def test_eval_cli_writes_json_and_prints_a_table(dataset_dir: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "r.json"
    args = _parser().parse_args(["eval", "--data", str(dataset_dir), "--model", "lexical", "--model", "popular",
                                 "--samples", "5", "--k", "10,5", "--no-diversity", "--out", str(out)])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "| lexical | 5 |" in printed and "| popular (cold) | 0 |" in printed and str(out) in printed
    data = json.loads(out.read_text())
    assert data["config"]["ks"] == [5, 10] and [m["method"] for m in data["methods"]] == ["lexical", "popular"]
    assert data["methods"][0]["per_user"] == []


def test_eval_cli_overlap(mind_news_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "overlap.json"
    args = _parser().parse_args(["eval", "overlap", "--news", str(mind_news_path), "--docs", "30",
                                 "--queries", "10", "--out", str(out)])
    assert args.func(args) == 0
    data = json.loads(out.read_text())
    assert data["docs"] == 30 and len(data["pairs"]) == 3
    assert "| tantivy vs noida-db (ES API) |" in capsys.readouterr().out


def test_eval_cli_config_errors(dataset_dir: Path) -> None:
    from streams.settings import ConfigError

    with pytest.raises(ConfigError, match="--data"):
        args = _parser().parse_args(["eval", "--model", "lexical"])
        args.func(args)
    with pytest.raises(ConfigError, match="unknown method"):
        args = _parser().parse_args(["eval", "--data", str(dataset_dir), "--model", "nope"])
        args.func(args)
    with pytest.raises(ConfigError, match="items_per_user"):
        args = _parser().parse_args(["eval", "--data", str(dataset_dir), "--model", "lexical", "--k", "50"])
        args.func(args)
