"""News search on Elasticsearch 8 (production) or any server speaking its API (noida-db locally).

The engine reads and writes through an alias (``news`` by default) that points at
one concrete index ``<alias>-<n>``, so ``rebuild`` can load a fresh index and swap
it in atomically while searches keep being answered.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterable, Iterable, Sequence
from typing import Any, Self

from elasticsearch import AsyncElasticsearch, BadRequestError, NotFoundError
from elasticsearch.helpers import BulkIndexError, async_bulk

from index.base import Hit, check_search_args
from index.document import NewsArticle

logger = logging.getLogger(__name__)

MAPPINGS: dict[str, Any] = {
    # Strict: a document with an unexpected field is a bug to surface, not a field to guess.
    "dynamic": "strict",
    "properties": {
        "news_id": {"type": "keyword"},
        "title": {"type": "text", "analyzer": "english"},
        "abstract": {"type": "text", "analyzer": "english"},
        "category": {"type": "keyword"},
        "subcategory": {"type": "keyword"},
        "url": {"type": "keyword", "index": False},
        # Keyword for exact filters/aggregations, english-analysed copy for matching.
        "entities": {"type": "keyword", "fields": {"text": {"type": "text", "analyzer": "english"}}},
        "published_at": {"type": "date"},
    },
}
SEARCH_FIELDS = ["title^3", "abstract", "entities.text^1.5"]
# Same bound as EmbeddedEngine: query text is untrusted.
MAX_QUERY_CHARS = 2_000
BULK_CHUNK = 500


# Per request. The client's default is no timeout on a silent server, which would
# park the refresher (and /health) forever during a network partition.
DEFAULT_REQUEST_TIMEOUT_S = 10.0
DEFAULT_MAX_RETRIES = 2


class SearchError(RuntimeError):
    """The search server refused or failed a request."""


def client_options(
    url: str,
    *,
    api_key: str | None = None,
    ca_certs: str | None = None,
    verify_certs: bool = True,
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT_S,
    max_retries: int = DEFAULT_MAX_RETRIES,
) -> dict[str, Any]:
    """Keyword arguments for ``AsyncElasticsearch``: auth, TLS and bounded waits.

    Only what is set is passed, so the client's own defaults (system CAs) apply otherwise.
    Refused connections are retried (another node may answer); a timed-out request is not,
    so a silent server costs one ``request_timeout`` per call, not ``max_retries + 1`` of them.
    """
    if request_timeout <= 0:
        raise ValueError(f"request_timeout must be positive, got {request_timeout}")
    options: dict[str, Any] = {
        "hosts": [url],
        "request_timeout": request_timeout,
        "max_retries": max_retries,
        "retry_on_timeout": False,
        "verify_certs": verify_certs,
    }
    if api_key:
        options["api_key"] = api_key
    if ca_certs:
        options["ca_certs"] = ca_certs
    if not verify_certs:
        options["ssl_show_warn"] = False  # the worker logs its own start-up warning instead
    return options


class ElasticEngine:
    """BM25 over title^3, abstract, entities^1.5 behind an alias.

    ``api_key`` is a secret: pass the value of a
    pydantic ``SecretStr``, never a literal, and never log it. ``ca_certs`` is the path
    of the CA bundle for a TLS cluster with a private CA.
    """

    name = "elasticsearch"

    def __init__(
        self,
        url: str,
        alias: str = "news",
        *,
        api_key: str | None = None,
        ca_certs: str | None = None,
        verify_certs: bool = True,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT_S,
        max_retries: int = DEFAULT_MAX_RETRIES,
    ) -> None:
        if alias != alias.lower() or not alias:
            raise ValueError(f"alias must be a non-empty lowercase name, got {alias!r}")
        self.alias = alias
        self._es = AsyncElasticsearch(**client_options(
            url, api_key=api_key, ca_certs=ca_certs, verify_certs=verify_certs, request_timeout=request_timeout,
            max_retries=max_retries))
        self._alias_ready = False

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- index lifecycle -------------------------------------------------------
    async def ensure_index(self) -> str:
        """Create ``<alias>-<n>`` and point the alias at it unless the alias exists; returns the index."""
        current = await self._alias_targets()
        if len(current) == 1:
            self._alias_ready = True
            return current[0]
        if current:
            raise SearchError(f"alias {self.alias!r} points at several indices {current}; expected one")
        if await self._es.indices.exists(index=self.alias):
            raise SearchError(f"{self.alias!r} is a concrete index, not an alias: delete or reindex it first")
        name = await self._next_index_name()
        # Racing creators compute the same name: "already exists" then means someone won, fine.
        await self._create_index(name, exist_ok=True)
        await self._es.indices.update_aliases(actions=[{"add": {"index": name, "alias": self.alias}}])
        logger.info("created index %s behind alias %s", name, self.alias)
        self._alias_ready = True
        return name

    async def rebuild(self, articles: Iterable[NewsArticle] | AsyncIterable[NewsArticle]) -> int:
        """Load ``articles`` into a new index, swap the alias to it atomically, delete the old one.

        Writes made through the alias while this runs land in the old index and are lost.
        """
        old = await self._alias_targets()
        new = await self._next_index_name()
        await self._create_index(new, exist_ok=False)
        try:
            written = await self._bulk(new, articles)
            await self._es.indices.refresh(index=new)
        except BaseException:
            await self._es.indices.delete(index=new, ignore_unavailable=True)
            raise
        swap = [{"remove": {"index": index, "alias": self.alias}} for index in old]
        swap.append({"add": {"index": new, "alias": self.alias}})
        try:
            await self._es.indices.update_aliases(actions=swap)
        except Exception as exc:
            raise SearchError(f"loaded {new} but could not swap alias {self.alias!r} to it; {new} is left in place") from exc
        for index in old:
            await self._es.indices.delete(index=index, ignore_unavailable=True)
        self._alias_ready = True
        logger.info("rebuilt alias %s: %s -> %s (%d docs)", self.alias, old, new, written)
        return written

    async def _alias_targets(self) -> list[str]:
        try:
            response = await self._es.indices.get_alias(name=self.alias)
        except NotFoundError:
            return []
        return sorted(response.body)

    async def _next_index_name(self) -> str:
        prefix = f"{self.alias}-"
        response = await self._es.indices.get_alias(index=f"{prefix}*")
        # Only numeric suffixes: "news-v2-1" belongs to alias "news-v2", not to "news".
        numbers = [int(name[len(prefix) :]) for name in response.body if name[len(prefix) :].isdigit()]
        return f"{prefix}{max(numbers, default=0) + 1}"

    async def _create_index(self, name: str, *, exist_ok: bool) -> None:
        try:
            await self._es.indices.create(index=name, mappings=MAPPINGS)
        except BadRequestError as exc:
            if not (exist_ok and exc.error == "resource_already_exists_exception"):
                raise

    # -- writing ---------------------------------------------------------------
    async def upsert(self, articles: Sequence[NewsArticle], *, refresh: bool = False) -> int:
        """Index or replace by news_id (the document _id); ``refresh`` makes them searchable now."""
        if not self._alias_ready:
            # Writing to a missing alias would silently create a concrete index with guessed mappings.
            await self.ensure_index()
        written = await self._bulk(self.alias, articles)
        if refresh:
            await self._es.indices.refresh(index=self.alias)
        return written

    async def delete(self, news_ids: Sequence[str], *, refresh: bool = False) -> None:
        """Remove by news_id (the document _id); ids not in the index are ignored."""
        if not news_ids:
            return
        if not self._alias_ready:
            await self.ensure_index()
        actions = ({"_op_type": "delete", "_index": self.alias, "_id": news_id} for news_id in news_ids)
        try:
            await async_bulk(self._es, actions, chunk_size=BULK_CHUNK, ignore_status=(404,))
        except BulkIndexError as exc:
            raise SearchError(f"{len(exc.errors)} documents failed to delete from {self.alias}; "
                              f"first: {exc.errors[0]}") from exc
        if refresh:
            await self._es.indices.refresh(index=self.alias)

    async def _bulk(self, index: str, articles: Iterable[NewsArticle] | AsyncIterable[NewsArticle]) -> int:
        fields = set(MAPPINGS["properties"])

        def action(article: NewsArticle) -> dict[str, Any]:
            return {"_index": index, "_id": article.news_id, "_source": article.model_dump(mode="json", include=fields)}

        if isinstance(articles, AsyncIterable):
            actions: Any = (action(a) async for a in articles)
        else:
            actions = (action(a) for a in articles)
        try:
            written, _ = await async_bulk(self._es, actions, chunk_size=BULK_CHUNK)
        except BulkIndexError as exc:
            raise SearchError(f"{len(exc.errors)} documents failed to index into {index}; first: {exc.errors[0]}") from exc
        return written

    # -- reading ---------------------------------------------------------------
    async def search_many(
        self,
        queries: Sequence[str],
        *,
        k: int = 10,
        exclude: Sequence[Sequence[str]] | None = None,
        within: Sequence[Sequence[str]] | None = None,
    ) -> list[list[Hit]]:
        """All queries in one ``msearch`` round trip; any failed query raises ``SearchError``."""
        check_search_args(queries, k, exclude, within)
        if not queries:
            return []
        searches: list[dict[str, Any]] = []
        for i, text in enumerate(queries):
            query: dict[str, Any] = {"multi_match": {"query": text[:MAX_QUERY_CHARS], "fields": SEARCH_FIELDS}}
            if exclude is not None and exclude[i]:
                query = {"bool": {"must": query, "must_not": {"ids": {"values": list(exclude[i])}}}}
            if within is not None:
                query = {"bool": {"must": query, "filter": {"ids": {"values": list(within[i])}}}}
            searches.append({})
            searches.append({"query": query, "size": k, "_source": ["title"]})
        response = await self._es.msearch(index=self.alias, searches=searches)
        failures = [
            f"query {i} ({queries[i][:60]!r}): {item.get('status')} {item['error'].get('type')}: {item['error'].get('reason')}"
            for i, item in enumerate(response["responses"])
            if "error" in item
        ]
        if failures:
            raise SearchError(f"{len(failures)} of {len(queries)} searches on {self.alias!r} failed: " + "; ".join(failures[:3]))
        return [
            [Hit(news_id=h["_id"], title=h["_source"]["title"], score=float(h["_score"])) for h in item["hits"]["hits"]]
            for item in response["responses"]
        ]

    async def count(self) -> int:
        try:
            response = await self._es.count(index=self.alias)
        except NotFoundError as exc:
            raise SearchError(f"alias {self.alias!r} does not exist: call ensure_index() or rebuild()") from exc
        return int(response["count"])

    async def close(self) -> None:
        await self._es.close()
