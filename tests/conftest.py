"""Shared fixtures: real local servers (started once per session) and unique names."""

from __future__ import annotations

from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest

from tools.infra import LocalInfra

# shared/ sits beside the repository checkout (read-only input).
MIND_NEWS = Path(__file__).resolve().parents[2] / "shared" / "data" / "mind" / "news.tsv"


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


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random causal LM exported to ONNX with a manifest (built once per session)."""
    from models.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def small_sim_dataset(mind_news_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 simulated users over the first 300 MIND articles (a corpus MiniLM embeds in seconds)."""
    from evaluation.dataset import write_dataset
    from evaluation.simulate import SimulationConfig, simulate
    from index.corpus import read_mind_news

    lines = list(islice(mind_news_path.open(encoding="utf-8"), 300))
    path = tmp_path_factory.mktemp("grpo-data")
    (path / "src.tsv").write_text("".join(lines), encoding="utf-8")
    news = list(read_mind_news(path / "src.tsv"))
    events, targets, meta = simulate(news, SimulationConfig(users=12, seed=3, cold_share=0.25))
    meta.pop("truth", None)
    write_dataset(path / "data", lines, events, targets, meta)
    return path / "data"


@pytest.fixture(scope="session")
def tiny_int8_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model's int8 dynamic quantisation (built once per session)."""
    from models.quantize import quantize_int8

    out = tmp_path_factory.mktemp("tiny-int8") / "model"
    quantize_int8(tiny_model_dir, out)
    return out


@pytest.fixture
def stack(kafka_bootstrap: str, tiny_model_dir: Path, unique_name: str, tmp_path: Path) -> Iterator[Any]:
    """The demo news on fresh topics and a worker factory (tiny model, embedded search)."""
    from tests.streaming import Stack, stack_env

    s = Stack(stack_env(kafka_bootstrap, tiny_model_dir, unique_name, tmp_path / "state"), tmp_path)
    s.publish_news()
    yield s
    s.close()
