"""MiniLM embeddings and the dense index, on the real bundled model and real MIND news."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from index.corpus import read_mind_news
from index.dense import ONNX_PARITY_ATOL, DenseIndex, MiniLMEmbedder, article_text
from streams.contracts import NewsArticle


@pytest.fixture(scope="module")
def embedder() -> MiniLMEmbedder:
    return MiniLMEmbedder()


def test_embeddings_are_unit_float32_and_cached(embedder: MiniLMEmbedder) -> None:
    texts = ["Stocks fall on Wall Street", "Stocks fall on Wall Street", "a recipe for lemon cake"]
    before = embedder.encoded_texts
    vectors = embedder.encode(texts)
    assert vectors.shape == (3, embedder.dim) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert np.array_equal(vectors[0], vectors[1])
    assert embedder.encoded_texts - before == 2  # the repeated text is encoded once
    again = embedder.encode(texts[:1])
    assert embedder.encoded_texts - before == 2 and np.array_equal(again[0], vectors[0])
    assert embedder.encode([]).shape == (0, embedder.dim)


def test_batching_does_not_change_embeddings(embedder: MiniLMEmbedder) -> None:
    texts = ["short", "a much longer sentence about the federal reserve raising interest rates again"]
    fresh = MiniLMEmbedder(batch_size=1)
    assert np.allclose(fresh.encode(texts), embedder.encode(texts), atol=1e-5)


def test_similar_texts_are_closer_than_unrelated(embedder: MiniLMEmbedder) -> None:
    a, b, c = embedder.encode(["Stock markets tumble as investors fear recession",
                               "Shares slide on Wall Street amid economic worries",
                               "How to bake sourdough bread at home"])
    assert a @ b > a @ c + 0.2
    assert a @ b > b @ c + 0.2


def test_dense_index_finds_each_article_by_its_title(embedder: MiniLMEmbedder, mind_news_path: Path) -> None:
    news = list(read_mind_news(mind_news_path))[:200]
    index = DenseIndex(embedder)
    assert index.upsert_sync(news) == 200 and index.count_sync() == 200
    results = index.search_many_sync([a.title for a in news], k=5)
    top1 = sum(hits[0].news_id == a.news_id for hits, a in zip(results, news, strict=True))
    assert top1 >= 195  # near-duplicate titles in MIND may swap a handful
    for hits in results:
        assert len(hits) == 5
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


def _article(news_id: str, title: str) -> NewsArticle:
    return NewsArticle(news_id=news_id, title=title, abstract="", category="news", subcategory="x")


async def test_exclude_upsert_and_blank_queries(embedder: MiniLMEmbedder) -> None:
    index = DenseIndex(embedder)
    await index.upsert([_article("N1", "Lakers win the NBA championship"),
                        _article("N2", "Basketball finals: Lakers beat the Heat"),
                        _article("N3", "New vaccine approved by the FDA")])
    [hits] = await index.search_many(["Lakers basketball title"], k=3)
    assert {h.news_id for h in hits[:2]} == {"N1", "N2"} and hits[2].news_id == "N3"
    [hits] = index.search_many_sync(["Lakers basketball title"], k=3, exclude=[["N1", "N2", "unknown"]])
    assert [h.news_id for h in hits] == ["N3"]
    assert index.search_many_sync(["   ", "vaccine"], k=1)[0] == []
    # replacing an article keeps one row and moves it in the ranking
    index.upsert_sync([_article("N3", "Lakers parade after championship win")])
    assert index.count_sync() == 3
    [hits] = index.search_many_sync(["Lakers parade"], k=1)
    assert hits[0].news_id == "N3" and hits[0].title == "Lakers parade after championship win"
    with pytest.raises(ValueError):
        index.search_many_sync(["x"], k=0)
    assert await index.count() == 3


def test_article_text_uses_title_abstract_entities() -> None:
    a = NewsArticle(news_id="N", title="Title", abstract="Abstract here", entities=["Alpha", "Beta"])
    assert article_text(a) == "Title. Abstract here. Alpha, Beta"
    assert article_text(NewsArticle(news_id="N", title="Only")) == "Only"


def test_empty_index_returns_empty_lists(embedder: MiniLMEmbedder) -> None:
    assert DenseIndex(embedder).search_many_sync(["anything"], k=3) == [[]]


def test_delete_removes_articles_from_searches(embedder) -> None:
    from index.document import NewsArticle

    index = DenseIndex(embedder)
    index.upsert_sync([NewsArticle(news_id=f"D{i}", title=t) for i, t in
                       enumerate(["electric cars sell well", "football cup final", "stock market falls"])])
    assert index.search_many_sync(["electric vehicles"], k=1)[0][0].news_id == "D0"
    index.delete_sync(["D0", "unknown"])
    assert index.count_sync() == 2 and not index.has("D0") and index.has("D1")
    assert index.search_many_sync(["electric vehicles"], k=3)[0][0].news_id != "D0"
    assert sorted(h.news_id for h in index.search_many_sync(["football"], k=5)[0]) == ["D1", "D2"]


def test_onnx_runtime_gives_torchs_vectors_and_exports_once(embedder: MiniLMEmbedder, tmp_path) -> None:
    texts = ["short", "a much longer sentence about the federal reserve raising interest rates again", ""]
    onnx_dir = tmp_path / "minilm-onnx"
    onnx = MiniLMEmbedder(onnx_dir=onnx_dir)  # exports, checks parity, renames into place
    assert onnx.runtime == "onnx" and (onnx_dir / "model.onnx").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name != "minilm-onnx"]  # no staging left behind
    assert np.allclose(onnx.encode(texts), embedder.encode(texts), atol=ONNX_PARITY_ATOL)
    made = (onnx_dir / "model.onnx").stat().st_mtime_ns
    again = MiniLMEmbedder(onnx_dir=onnx_dir, batch_size=1)  # another process: reuses the export
    assert (onnx_dir / "model.onnx").stat().st_mtime_ns == made
    assert np.allclose(again.encode(texts), onnx.encode(texts), atol=1e-5)


def test_a_worker_embeds_with_onnx_unless_told_torch(tmp_path) -> None:
    from streams.settings import WorkerSettings

    store = tmp_path / "cache" / "vectors.sqlite"
    onnx = WorkerSettings(embedding_store=store).minilm_embedder()
    assert onnx.runtime == "onnx" and (store.parent / "minilm-onnx" / "model.onnx").is_file()
    assert WorkerSettings(embedding_store=store, embedding_runtime="torch").minilm_embedder().runtime == "torch"


def test_embedding_store_is_shared_across_embedders(tmp_path) -> None:
    store = tmp_path / "vectors.sqlite"
    first = MiniLMEmbedder(store=store, cache_size=2)
    texts = ["electric cars sell well", "football cup final", "stock market falls"]
    vectors = first.encode(texts)
    assert first.encoded_texts == 3
    second = MiniLMEmbedder(store=store, cache_size=2)  # another process, later: reads, never embeds
    again = second.encode(texts + ["a new text"])
    assert second.encoded_texts == 1 and np.allclose(again[:3], vectors)
    assert np.allclose(second.encode(texts[:1]), vectors[:1])  # the small LRU evicted it: the store has it
    assert second.encoded_texts == 1


def test_offline_runs_share_the_workers_vector_store(tmp_path, monkeypatch) -> None:
    """Reward scoring and `newsrec eval` embed through the configured store, like the worker:
    a second run on the same host embeds nothing the first one embedded."""
    from streams.contracts import NewsArticle
    from training.scoring import RewardScorer

    monkeypatch.setenv("NEWSREC_EMBEDDING_STORE", str(tmp_path / "host.sqlite"))
    news = [NewsArticle(news_id=f"N{i}", category="sports", subcategory="soccer", title=f"cup final report {i}")
            for i in range(3)]
    first = RewardScorer(news)
    assert first.embedder.encoded_texts == 3 and (tmp_path / "host.sqlite").is_file()
    second = RewardScorer(news)
    assert second.embedder.encoded_texts == 0
    first.close()
    second.close()
