from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from elasticsearch import AsyncElasticsearch

from index.base import SearchEngine
from index.corpus import read_mind_news
from index.elastic import MAPPINGS, ElasticEngine, SearchError
from streams.contracts import NewsArticle

pytestmark = pytest.mark.integration

# noida-db slows down with corpus size: keep it at a few hundred documents.
CORPUS_SIZE = 200


@pytest.fixture(scope="module")
def articles(mind_news_path: Path) -> list[NewsArticle]:
    corpus = list(read_mind_news(mind_news_path))[:CORPUS_SIZE]
    assert any(a.news_id == "N16278" for a in corpus)
    return corpus


@pytest.fixture
async def engine(es_url: str, unique_name: str) -> AsyncIterator[ElasticEngine]:
    async with ElasticEngine(es_url, alias=unique_name) as engine:
        yield engine


@pytest.fixture
async def raw(es_url: str) -> AsyncIterator[AsyncElasticsearch]:
    client = AsyncElasticsearch(es_url)
    yield client
    await client.close()


async def test_ensure_index_creates_alias_and_mapping(engine: ElasticEngine, raw: AsyncElasticsearch) -> None:
    _: SearchEngine = engine
    index = await engine.ensure_index()
    assert index == f"{engine.alias}-1"
    assert await engine.ensure_index() == index  # idempotent
    assert (await raw.indices.get_alias(name=engine.alias)).body == {index: {"aliases": {engine.alias: {}}}}
    mapping = (await raw.indices.get_mapping(index=index)).body[index]["mappings"]
    props = mapping["properties"]
    assert props["title"] == {"type": "text", "analyzer": "english"}
    assert props["news_id"]["type"] == "keyword" and props["category"]["type"] == "keyword"
    assert props["entities"]["fields"]["text"]["analyzer"] == "english"
    assert props["published_at"]["type"] == "date"
    assert mapping == MAPPINGS
    assert await engine.count() == 0


async def test_upsert_search_batch_and_count(engine: ElasticEngine, articles: list[NewsArticle]) -> None:
    assert await engine.upsert(articles, refresh=True) == CORPUS_SIZE
    assert await engine.upsert(articles[:20], refresh=True) == 20
    assert await engine.count() == CORPUS_SIZE  # same _id: replaced, not duplicated
    queries = [
        "Silver Spring Marine Corps Marathon",
        articles[10].title,
        articles[50].title,
        "Maryland",  # only in an entity label
        "?!",  # analyses to nothing
    ]
    results = await engine.search_many(queries, k=5)
    assert len(results) == 5
    assert results[0][0].news_id == "N16278"
    assert results[0][0].title == "Silver Spring Man Nabs Title At Soggy Marine Corps Marathon"
    assert results[1][0].news_id == articles[10].news_id
    assert results[2][0].news_id == articles[50].news_id
    assert "N16278" in [h.news_id for h in results[3]]
    assert results[4] == []
    assert all(len(r) <= 5 for r in results)
    assert [h.score for h in results[1]] == sorted((h.score for h in results[1]), reverse=True)


async def test_exclude_and_hostile_text(engine: ElasticEngine, articles: list[NewsArticle]) -> None:
    await engine.upsert(articles[:50], refresh=True)
    query = articles[3].title
    full, excluded = await engine.search_many([query, query], k=3, exclude=[[], [articles[3].news_id]])
    assert full[0].news_id == articles[3].news_id
    assert articles[3].news_id not in [h.news_id for h in excluded]
    hostile = ['title:(', '"', "AND OR NOT", "*", "\x00", "", "{\"query\": 1}"]
    assert len(await engine.search_many(hostile)) == len(hostile)


async def test_rebuild_swaps_alias_and_drops_old_index(
    engine: ElasticEngine, raw: AsyncElasticsearch, articles: list[NewsArticle]
) -> None:
    first = await engine.ensure_index()
    await engine.upsert(articles[:30], refresh=True)

    async def stream() -> AsyncIterator[NewsArticle]:
        for article in articles[100:150]:
            yield article

    assert await engine.rebuild(stream()) == 50
    targets = list((await raw.indices.get_alias(name=engine.alias)).body)
    assert targets == [f"{engine.alias}-2"]
    assert not await raw.indices.exists(index=first)
    assert await engine.count() == 50
    (hits,) = await engine.search_many([articles[120].title], k=1)
    assert hits[0].news_id == articles[120].news_id
    assert await engine.rebuild(articles[:10]) == 10  # and again, from a plain list
    assert list((await raw.indices.get_alias(name=engine.alias)).body) == [f"{engine.alias}-3"]


async def test_first_rebuild_without_alias(engine: ElasticEngine, articles: list[NewsArticle]) -> None:
    assert await engine.rebuild(articles[:5]) == 5
    assert await engine.count() == 5


async def test_errors_are_clear(engine: ElasticEngine, raw: AsyncElasticsearch) -> None:
    with pytest.raises(SearchError, match="does not exist"):
        await engine.count()
    with pytest.raises(SearchError, match=r"1 of 1 searches .* failed: query 0 .*404"):
        await engine.search_many(["anything"])
    with pytest.raises(ValueError, match="exclude has"):
        await engine.search_many(["a", "b"], exclude=[[]])
    # A concrete index squatting on the alias name is reported, not silently used.
    await raw.indices.create(index=engine.alias)
    try:
        with pytest.raises(SearchError, match="concrete index, not an alias"):
            await engine.ensure_index()
    finally:
        await raw.indices.delete(index=engine.alias)


def test_alias_must_be_lowercase() -> None:
    with pytest.raises(ValueError, match="lowercase"):
        ElasticEngine("http://127.0.0.1:1", alias="News")
