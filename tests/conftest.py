"""Shared fixtures: real local servers (started once per session) and unique names."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from uuid import uuid4

import pytest

from streams.infra import LocalInfra

MIND_NEWS = Path("/work/shared/data/mind/news.tsv")


@pytest.fixture(scope="session")
def local_infra(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalInfra]:
    with LocalInfra(tmp_path_factory.mktemp("infra")) as infra:
        yield infra


# A server that cannot start raises here, so its tests error out instead of skipping.
@pytest.fixture(scope="session")
def kafka_bootstrap(local_infra: LocalInfra) -> str:
    return local_infra.start_broker(0)


@pytest.fixture(scope="session")
def es_url(local_infra: LocalInfra) -> str:
    return local_infra.start_search(0)


@pytest.fixture
def unique_name() -> str:
    """A fresh lowercase topic/index name, so tests sharing a server never collide."""
    return f"t-{uuid4().hex[:8]}"


@pytest.fixture(scope="session")
def mind_news_path() -> Path:
    assert MIND_NEWS.is_file(), f"MIND sample missing at {MIND_NEWS} (see /work/shared/INFRA.md)"
    return MIND_NEWS
