from __future__ import annotations

import threading
from pathlib import Path

import pytest

from index.base import SearchEngine
from index.corpus import read_mind_news
from index.embedded import EmbeddedEngine
from streams.contracts import NewsArticle


@pytest.fixture(scope="module")
def articles(mind_news_path: Path) -> list[NewsArticle]:
    return list(read_mind_news(mind_news_path))


@pytest.fixture(scope="module")
def engine(articles: list[NewsArticle]) -> EmbeddedEngine:
    engine = EmbeddedEngine()
    assert engine.upsert_sync(articles) == 2_000
    return engine


def test_is_a_search_engine(engine: EmbeddedEngine) -> None:
    assert isinstance(engine.name, str)
    _: SearchEngine = engine  # static check of the protocol


def test_title_words_find_their_article(engine: EmbeddedEngine, articles: list[NewsArticle]) -> None:
    (hits,) = engine.search_many_sync(["Silver Spring marathon Marine Corps"], k=5)
    assert hits[0].news_id == "N16278"
    assert hits[0].title == "Silver Spring Man Nabs Title At Soggy Marine Corps Marathon"
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    # Whole titles as queries: nearly always their own article first.
    sample = articles[::20]
    results = engine.search_many_sync([a.title for a in sample], k=1)
    own_first = sum(hits[0].news_id == a.news_id for a, hits in zip(sample, results, strict=True))
    assert own_first >= 0.95 * len(sample)


def test_stemming_and_entities_match(engine: EmbeddedEngine) -> None:
    # "marathons" stems to "marathon"; "Maryland" appears only in the entity label.
    (hits,) = engine.search_many_sync(["marathons Maryland"], k=10)
    assert "N16278" in [h.news_id for h in hits]


async def test_async_api_and_count(engine: EmbeddedEngine, articles: list[NewsArticle]) -> None:
    assert await engine.count() == 2_000
    results = await engine.search_many(["Fort Lauderdale", "NASCAR Talladega"], k=3)
    assert len(results) == 2 and all(len(r) == 3 for r in results)


def test_upsert_is_idempotent_and_replaces(articles: list[NewsArticle]) -> None:
    engine = EmbeddedEngine()
    engine.upsert_sync(articles[:100])
    engine.upsert_sync(articles[:100])
    assert engine.count_sync() == 100
    changed = articles[0].model_copy(update={"title": "Completely rewritten zebra headline"})
    # Two versions of one id in one batch: the last one wins.
    engine.upsert_sync([articles[0], changed])
    assert engine.count_sync() == 100
    (hits,) = engine.search_many_sync(["zebra"])
    assert [(h.news_id, h.title) for h in hits] == [(changed.news_id, changed.title)]


@pytest.mark.parametrize(
    "hostile",
    ["title:(", '"', "AND OR NOT", "*", "\x00", "", "   ", "?!.,;", "news_id:N16278", "a" * 100_000, "((((((", "title:[a TO z]", "\\", "+-&&||!(){}[]^\"~*?:\\/"],
)
def test_hostile_queries_do_not_raise(engine: EmbeddedEngine, hostile: str) -> None:
    (hits,) = engine.search_many_sync([hostile])
    assert isinstance(hits, list)


def test_punctuation_or_stop_words_only_return_nothing(engine: EmbeddedEngine) -> None:
    assert engine.search_many_sync(["", "?!", "\x00", "*", "AND OR NOT", "the of to"]) == [[]] * 6
    assert engine.search_many_sync([]) == []


def test_syntax_is_not_interpreted(engine: EmbeddedEngine) -> None:
    # "title:" is just one more word ("titl" after stemming), not a field restriction.
    plain = engine.search_many_sync(["marathon"])[0]
    fielded = engine.search_many_sync(["title:marathon"])[0]
    assert [h.news_id for h in fielded] != [] and fielded[0].news_id == plain[0].news_id
    (hits,) = engine.search_many_sync(["NOT marathon"])
    assert "N16278" in [h.news_id for h in hits]  # NOT is a (stop) word, not an operator


def test_exclude(engine: EmbeddedEngine) -> None:
    query = "Silver Spring Marine Corps Marathon"
    full, excluded, other = engine.search_many_sync(
        [query, query, query], k=5, exclude=[[], ["N16278", "N-missing"], ["N1"]]
    )
    assert full[0].news_id == "N16278"
    assert "N16278" not in [h.news_id for h in excluded]
    assert [h.news_id for h in excluded[:4]] == [h.news_id for h in full[1:]]
    assert [h.news_id for h in other] == [h.news_id for h in full]


def test_bad_arguments(engine: EmbeddedEngine) -> None:
    with pytest.raises(ValueError, match="k must be"):
        engine.search_many_sync(["x"], k=0)
    with pytest.raises(ValueError, match="exclude has 1 entries for 2 queries"):
        engine.search_many_sync(["x", "y"], exclude=[[]])


def test_on_disk_index_reopens(tmp_path: Path, articles: list[NewsArticle]) -> None:
    engine = EmbeddedEngine(tmp_path / "idx")
    engine.upsert_sync(articles[:50])
    engine.close_sync()
    with pytest.raises(RuntimeError, match="closed"):
        engine.upsert_sync(articles[:1])
    reopened = EmbeddedEngine(tmp_path / "idx")
    assert reopened.count_sync() == 50
    reopened.upsert_sync(articles[40:60])  # the closed writer released the directory lock
    assert reopened.count_sync() == 60


def test_concurrent_readers_with_one_writer(articles: list[NewsArticle]) -> None:
    engine = EmbeddedEngine()
    engine.upsert_sync(articles[:500])
    errors: list[BaseException] = []
    stop = threading.Event()

    def read() -> None:
        try:
            while not stop.is_set():
                (hits,) = engine.search_many_sync(["Marine Corps Marathon"], k=5)
                assert len(hits) <= 5
                assert 500 <= engine.count_sync() <= 2_000
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    readers = [threading.Thread(target=read) for _ in range(4)]
    for t in readers:
        t.start()
    for start in range(0, 2_000, 100):
        engine.upsert_sync(articles[start : start + 100])
    stop.set()
    for t in readers:
        t.join()
    assert errors == []
    assert engine.count_sync() == 2_000
