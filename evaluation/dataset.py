"""The evaluation/training dataset format, so anyone can bring their own data.

A dataset is a directory with three files:

- ``news.tsv``: the news corpus, MIND ``news.tsv`` format (see ``index.corpus``);
- ``events.jsonl``: each user's signals *before* the cutoff, one ``user-events`` contract
  record per line (the same JSON the worker consumes);
- ``targets.jsonl``: ground truth per user, ``{"user_id", "news_ids": [...], "cold": bool}``,
  the news the user read *after* the cutoff (never shown to a model).

Optional ``meta.json`` says how it was made (simulator parameters, seed...).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from index.corpus import CorpusError, read_mind_news
from streams.contracts import NewsArticle, UserEvent

NEWS_FILE, EVENTS_FILE, TARGETS_FILE, META_FILE = "news.tsv", "events.jsonl", "targets.jsonl", "meta.json"


class DatasetError(ValueError):
    """The dataset directory is not in the documented format; the message says where."""


class Target(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    user_id: str = Field(min_length=1)
    news_ids: list[str] = Field(min_length=1)
    cold: bool = False

    @field_validator("news_ids")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("news_ids must not repeat an id")
        return value


@dataclass
class Dataset:
    path: Path
    news: list[NewsArticle]
    events: dict[str, list[UserEvent]]  # per user, oldest first
    targets: dict[str, Target]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def users(self) -> list[str]:
        """Users with a target, in file order (the evaluation population)."""
        return list(self.targets)

    def news_by_id(self) -> dict[str, NewsArticle]:
        return {a.news_id: a for a in self.news}


def load_dataset(path: Path) -> Dataset:
    """Read and check a dataset directory; raises :class:`DatasetError` naming file and line."""
    path = Path(path)
    for name in (NEWS_FILE, EVENTS_FILE, TARGETS_FILE):
        if not (path / name).is_file():
            raise DatasetError(f"{path}: missing {name} (a dataset holds {NEWS_FILE}, {EVENTS_FILE}, {TARGETS_FILE})")
    try:
        news = list(read_mind_news(path / NEWS_FILE))
    except CorpusError as exc:
        raise DatasetError(str(exc)) from None
    events: dict[str, list[UserEvent]] = defaultdict(list)
    for lineno, line in _lines(path / EVENTS_FILE):
        try:
            event = UserEvent.model_validate_json(line)
        except ValidationError as exc:
            raise DatasetError(f"{path / EVENTS_FILE}:{lineno}: {_first_error(exc)}") from None
        events[event.user_id].append(event)
    targets: dict[str, Target] = {}
    for lineno, line in _lines(path / TARGETS_FILE):
        try:
            target = Target.model_validate_json(line)
        except ValidationError as exc:
            raise DatasetError(f"{path / TARGETS_FILE}:{lineno}: {_first_error(exc)}") from None
        if target.user_id in targets:
            raise DatasetError(f"{path / TARGETS_FILE}:{lineno}: user {target.user_id!r} appears twice")
        targets[target.user_id] = target
    meta: dict[str, Any] = {}
    if (path / META_FILE).is_file():
        try:
            meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path / META_FILE}: not valid JSON: {exc}") from None
    for user_events in events.values():
        user_events.sort(key=lambda e: (e.ts, e.event_id))
    return Dataset(path, news, dict(events), targets, meta)


@dataclass
class ValidationReport:
    users: int
    cold_users: int
    events: int
    news: int
    target_clicks: int
    unresolved_target_ids: int
    users_without_events: int
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems


def validate_dataset(path: Path) -> ValidationReport:
    """Format checks (by loading) plus consistency: targets resolve to news, users have signals."""
    ds = load_dataset(path)
    ids = {a.news_id for a in ds.news}
    problems = []
    if len(ids) != len(ds.news):
        problems.append(f"{NEWS_FILE}: {len(ds.news) - len(ids)} duplicate news_id rows")
    unresolved = sum(1 for t in ds.targets.values() for n in t.news_ids if n not in ids)
    if unresolved:
        problems.append(f"{TARGETS_FILE}: {unresolved} target news ids are not in {NEWS_FILE}")
    without = [u for u in ds.targets if not ds.events.get(u)]
    if without:
        problems.append(f"{len(without)} target users have no events, e.g. {without[:3]}")
    all_events = [e for evs in ds.events.values() for e in evs]
    if len({e.event_id for e in all_events}) != len(all_events):
        problems.append(f"{EVENTS_FILE}: event_id values repeat")
    clicks_unknown = sum(1 for e in all_events if e.news_id and e.news_id not in ids)
    if clicks_unknown:
        problems.append(f"{EVENTS_FILE}: {clicks_unknown} events name a news_id that is not in {NEWS_FILE}")
    leaked = sum(len(set(t.news_ids) & {e.news_id for e in ds.events.get(u, ()) if e.news_id})
                 for u, t in ds.targets.items())
    if leaked:
        problems.append(f"{TARGETS_FILE}: {leaked} targets were already clicked by the same user before the cutoff")
    return ValidationReport(
        users=len(ds.targets), cold_users=sum(t.cold for t in ds.targets.values()),
        events=sum(len(v) for v in ds.events.values()), news=len(ds.news),
        target_clicks=sum(len(t.news_ids) for t in ds.targets.values()), unresolved_target_ids=unresolved,
        users_without_events=len(without), problems=problems)


def write_dataset(path: Path, news_tsv_rows: Iterable[str], events: Sequence[UserEvent], targets: Sequence[Target],
                  meta: dict[str, Any] | None = None) -> None:
    """Write a dataset directory; ``news_tsv_rows`` are MIND lines (copied as they are)."""
    path.mkdir(parents=True, exist_ok=True)
    with (path / NEWS_FILE).open("w", encoding="utf-8") as fh:
        for row in news_tsv_rows:
            fh.write(row.rstrip("\n") + "\n")
    with (path / EVENTS_FILE).open("w", encoding="utf-8") as fh:
        for event in events:
            fh.write(event.model_dump_json(exclude={"schema_version"}) + "\n")
    with (path / TARGETS_FILE).open("w", encoding="utf-8") as fh:
        for target in targets:
            fh.write(target.model_dump_json() + "\n")
    if meta is not None:
        (path / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))


def _lines(path: Path) -> Iterable[tuple[int, str]]:
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if line.strip():
                yield lineno, line


def _first_error(exc: ValidationError) -> str:
    err = exc.errors(include_url=False)[0]
    loc = ".".join(str(p) for p in err.get("loc", ())) or "line"
    return f"{loc}: {err.get('msg')}"
