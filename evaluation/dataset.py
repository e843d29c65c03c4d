"""The evaluation/training dataset format, so anyone can bring their own data.

A dataset is a directory with three files:

- ``news.tsv``: the news corpus, MIND ``news.tsv`` format (see ``index.corpus``);
- ``events.jsonl``: each user's signals *before* the cutoff, one ``user-events`` contract
  record per line (the same JSON the worker consumes);
- ``targets.jsonl``: ground truth per user, ``{"user_id", "news_ids": [...], "cold": bool}``,
  the news the user read *after* the cutoff (never shown to a model).

Optional ``meta.json`` says how it was made (simulator parameters, seed...). Optional
``impressions.jsonl`` (real logs, e.g. ``evaluation.mind``): one line per impression,
``{"impression_id", "user_id", "ts", "candidates": [...], "clicked": [...]}``, the news shown to
the user at ``ts`` in shown order and the ones clicked. In a dataset with impressions a cold
target user may have no events at all (a first visit).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from index.corpus import CorpusError, read_mind_news
from streams.contracts import NewsArticle, UserEvent

NEWS_FILE, EVENTS_FILE, TARGETS_FILE, META_FILE = "news.tsv", "events.jsonl", "targets.jsonl", "meta.json"
IMPRESSIONS_FILE = "impressions.jsonl"


class DatasetError(ValueError):
    """The dataset directory is not in the documented format; the message says where."""


COLD_HISTORY = 5  # a user with fewer past clicks (or signals) than this is cold


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


class Impression(BaseModel):
    """One impression of ``impressions.jsonl``: what was shown to a user at ``ts``, and clicked."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    impression_id: str = Field(min_length=1)
    user_id: str = Field(min_length=1)
    ts: AwareDatetime
    candidates: list[str] = Field(min_length=1)  # in shown order
    clicked: list[str] = Field(default_factory=list)  # may be empty: metrics skip single-class impressions

    @field_validator("candidates", "clicked")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("ids must not repeat")
        if not all(value):
            raise ValueError("ids must not be empty")
        return value

    @model_validator(mode="after")
    def _clicked_were_shown(self) -> Impression:
        unshown = [n for n in self.clicked if n not in set(self.candidates)]
        if unshown:
            raise ValueError(f"clicked ids {unshown[:3]} are not among the candidates")
        return self


@dataclass
class Dataset:
    path: Path
    news: list[NewsArticle]
    events: dict[str, list[UserEvent]]  # per user, oldest first
    targets: dict[str, Target]
    meta: dict[str, Any] = field(default_factory=dict)
    impressions: list[Impression] = field(default_factory=list)  # sorted by (ts, impression_id)

    @property
    def users(self) -> list[str]:
        """Users with a target, in file order (the evaluation population)."""
        return list(self.targets)

    def news_by_id(self) -> dict[str, NewsArticle]:
        return {a.news_id: a for a in self.news}


def dataset_dirs(train_data: str | Path | Sequence[str | Path]) -> tuple[Path, ...]:
    """A trainer's ``train_data``, one dataset dir or several, as a tuple of paths."""
    return (Path(train_data),) if isinstance(train_data, (str, Path)) else tuple(Path(p) for p in train_data)


# The last day of impressions is held out (evaluation) and never trained on (trainers).
HOLDOUT_DAYS = 1.0


def holdout_cutoff(impressions: Sequence[Impression], days: float = HOLDOUT_DAYS) -> datetime:
    """Impressions after this moment are held out: the last ``days`` before the newest one."""
    if not impressions:
        raise ValueError("no impressions to split")
    return max(i.ts for i in impressions) - timedelta(days=days)


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
    targets = _read_unique(path / TARGETS_FILE, Target, "user_id", "user")
    impressions: dict[str, Impression] = {}
    if (path / IMPRESSIONS_FILE).is_file():
        impressions = _read_unique(path / IMPRESSIONS_FILE, Impression, "impression_id", "impression")
    meta: dict[str, Any] = {}
    if (path / META_FILE).is_file():
        try:
            meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path / META_FILE}: not valid JSON: {exc}") from None
    for user_events in events.values():
        user_events.sort(key=lambda e: (e.ts, e.event_id))
    ordered = sorted(impressions.values(), key=lambda i: (i.ts, i.impression_id))
    return Dataset(path, news, dict(events), targets, meta, ordered)


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
    impressions: int = 0
    impression_candidates: int = 0
    cold_users_without_events: int = 0  # allowed only in impression datasets

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
    # A first visit (cold, nothing before the impression) is real in logged impressions;
    # in a dataset without impressions a user without events cannot be evaluated.
    shown = {i.user_id for i in ds.impressions}
    cold_without = [u for u in without if ds.targets[u].cold and u in shown]
    without = [u for u in without if u not in set(cold_without)]
    if without:
        problems.append(f"{len(without)} target users have no events, e.g. {without[:3]}")
    problems += _impression_problems(ds, ids)
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
        users_without_events=len(without), problems=problems, impressions=len(ds.impressions),
        impression_candidates=sum(len(i.candidates) for i in ds.impressions),
        cold_users_without_events=len(cold_without))


def _impression_problems(ds: Dataset, ids: set[str]) -> list[str]:
    """Impressions name known news, and their users have events unless a target says cold."""
    problems = []
    unresolved = sum(1 for i in ds.impressions for n in i.candidates if n not in ids)
    if unresolved:
        problems.append(f"{IMPRESSIONS_FILE}: {unresolved} candidate news ids are not in {NEWS_FILE}")
    silent = sorted({i.user_id for i in ds.impressions
                     if not ds.events.get(i.user_id) and not (i.user_id in ds.targets and ds.targets[i.user_id].cold)})
    if silent:
        problems.append(f"{IMPRESSIONS_FILE}: {len(silent)} users have an impression but no events and no cold "
                        f"target, e.g. {silent[:3]}")
    return problems


def write_dataset(path: Path, news_tsv_rows: Iterable[str], events: Sequence[UserEvent], targets: Sequence[Target],
                  meta: dict[str, Any] | None = None, impressions: Sequence[Impression] | None = None) -> None:
    """Write a dataset directory; ``news_tsv_rows`` are MIND lines (copied as they are).
    ``impressions`` (if given) go to ``impressions.jsonl``, else no such file is written."""
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
    if impressions is not None:
        with (path / IMPRESSIONS_FILE).open("w", encoding="utf-8") as fh:
            for imp in impressions:
                fh.write(imp.model_dump_json() + "\n")
    if meta is not None:
        (path / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))


R = TypeVar("R", bound=BaseModel)


def _read_unique(path: Path, model: type[R], key: str, what: str) -> dict[str, R]:
    """One ``model`` record per line, keyed by ``key``; a bad line or a repeated key is a
    file:line error."""
    records: dict[str, R] = {}
    for lineno, line in _lines(path):
        try:
            record = model.model_validate_json(line)
        except ValidationError as exc:
            raise DatasetError(f"{path}:{lineno}: {_first_error(exc)}") from None
        value = getattr(record, key)
        if value in records:
            raise DatasetError(f"{path}:{lineno}: {what} {value!r} appears twice")
        records[value] = record
    return records


def _lines(path: Path) -> Iterable[tuple[int, str]]:
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if line.strip():
                yield lineno, line


def _first_error(exc: ValidationError) -> str:
    err = exc.errors(include_url=False)[0]
    loc = ".".join(str(p) for p in err.get("loc", ())) or "line"
    return f"{loc}: {err.get('msg')}"
