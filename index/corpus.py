"""Reading the MIND news corpus (news.tsv) into ``NewsArticle`` contracts."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeVar

from pydantic import ValidationError

from index.document import NewsArticle

logger = logging.getLogger(__name__)

# news_id, category, subcategory, title, abstract, url, title_entities, abstract_entities
MIND_NEWS_COLUMNS = 8


class CorpusError(ValueError):
    """A row of a corpus file that cannot be turned into a ``NewsArticle``."""

    def __init__(self, path: Path, line: int, reason: str) -> None:
        super().__init__(f"{path}:{line}: {reason}")
        self.path = path
        self.line = line
        self.reason = reason


@dataclass(slots=True)
class ReadStats:
    """Filled in while a reader runs; pass one in to learn what was skipped."""

    rows: int = 0
    skipped: int = 0
    errors: list[str] = field(default_factory=list)  # the first few malformed-row messages


T = TypeVar("T")


def read_rows(path: Path, parse: Callable[[bytes, Path, int], T], *, errors: Literal["raise", "skip"],
              stats: ReadStats) -> Iterator[T]:
    """Each non-blank line of ``path`` through ``parse(raw, path, line_no)``; a ``CorpusError``
    stops the read (``errors="raise"``) or is logged, counted and skipped."""
    if errors not in ("raise", "skip"):
        raise ValueError(f"errors must be 'raise' or 'skip', not {errors!r}")
    # Binary + per-line decoding so a bad byte is reported with its line number.
    with path.open("rb") as fh:
        for line_no, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            stats.rows += 1
            try:
                row = parse(raw, path, line_no)
            except CorpusError as exc:
                if errors == "raise":
                    raise
                stats.skipped += 1
                if len(stats.errors) < 5:
                    stats.errors.append(str(exc))
                logger.warning("skipping malformed row: %s", exc)
                continue
            yield row
    if stats.skipped:
        logger.warning("%s: skipped %d of %d rows", path, stats.skipped, stats.rows)


def read_mind_news(
    path: str | Path,
    *,
    errors: Literal["raise", "skip"] = "raise",
    stats: ReadStats | None = None,
) -> Iterator[NewsArticle]:
    """Yield one article per row of a MIND ``news.tsv``.

    ``errors="raise"`` stops at the first malformed row with a ``CorpusError`` naming
    file:line; ``errors="skip"`` logs the row, counts it in ``stats.skipped`` and goes on.
    Blank lines are ignored. ``published_at`` stays None: MIND has no dates.
    """
    yield from read_rows(Path(path), _parse_row, errors=errors, stats=stats if stats is not None else ReadStats())


def split_tsv_row(raw: bytes | str, path: Path, line_no: int, columns: int, error: type[CorpusError] = CorpusError,
                  names: str = "") -> list[str]:
    """Decode one MIND row and split it into exactly ``columns`` tab-separated fields."""
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise error(path, line_no, f"not valid UTF-8: {exc}") from None
    fields = raw.rstrip("\r\n").split("\t")
    if len(fields) != columns:
        named = f" ({names})" if names else ""
        raise error(path, line_no, f"expected {columns} tab-separated fields{named}, got {len(fields)}")
    return fields


def _parse_row(raw: bytes, path: Path, line_no: int) -> NewsArticle:
    fields = split_tsv_row(raw, path, line_no, MIND_NEWS_COLUMNS)
    news_id, category, subcategory, title, abstract, url, title_ents, abstract_ents = fields
    labels = _entity_labels(title_ents, "title_entities", path, line_no)
    labels += _entity_labels(abstract_ents, "abstract_entities", path, line_no)
    try:
        return NewsArticle(
            news_id=news_id,
            title=title,
            abstract=abstract,
            category=category,
            subcategory=subcategory,
            url=url or None,
            entities=list(dict.fromkeys(labels)),  # unique, first mention first
        )
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'row'}: {err['msg']}"
            for err in exc.errors(include_url=False)
        )
        raise CorpusError(path, line_no, problems) from None


def _entity_labels(cell: str, column: str, path: Path, line_no: int) -> list[str]:
    if not cell.strip():
        return []
    try:
        entities = json.loads(cell)
    except json.JSONDecodeError as exc:
        raise CorpusError(path, line_no, f"{column} is not valid JSON: {exc}") from None
    if not isinstance(entities, list):
        raise CorpusError(path, line_no, f"{column} must be a JSON list, got {type(entities).__name__}")
    labels = []
    for i, entity in enumerate(entities):
        label = entity.get("Label") if isinstance(entity, dict) else None
        if not isinstance(label, str) or not label.strip():
            raise CorpusError(path, line_no, f"{column}[{i}] has no string 'Label'")
        labels.append(label)
    return labels
