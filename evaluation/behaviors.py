"""Reading MIND ``behaviors.tsv`` (real impression logs) and measuring how usable it is.

Each row is one impression: ``impression_id \\t user_id \\t time \\t history \\t impressions``
where ``time`` looks like ``11/11/2019 9:05:58 AM``, ``history`` is space-separated news ids
the user clicked before (may be empty) and ``impressions`` is space-separated
``N123-1`` (clicked) / ``N123-0`` (shown, not clicked).

MIND does not say which time zone ``time`` is in; we read it as UTC so that every
timestamp in the project is tz-aware and comparable.

A behaviors file usually comes from a much larger crawl than the news rows at hand (the
sample in ``shared/`` resolves only a few percent of its ids), so :func:`behaviors_stats`
reports how many ids resolve instead of assuming they all do, and ``known_news`` lets a
reader drop the ids it cannot use while keeping every row (row counts stay true to the file).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from index.corpus import CorpusError, ReadStats, read_rows, split_tsv_row

logger = logging.getLogger(__name__)

BEHAVIORS_COLUMNS = 5
TIME_FORMAT = "%m/%d/%Y %I:%M:%S %p"


class BehaviorsError(CorpusError):
    """A row of a behaviors file that is not in the MIND format; the message says file:line and what."""


@dataclass(slots=True)
class Impression:
    impression_id: str
    user_id: str
    time: datetime  # UTC
    history: list[str]  # clicked before, oldest first (as MIND lists them; duplicates kept)
    impressions: list[tuple[str, int]]  # (news_id, 1 clicked / 0 not clicked)

    @property
    def clicked(self) -> list[str]:
        return [news_id for news_id, label in self.impressions if label == 1]


@dataclass(slots=True)
class BehaviorsReadStats(ReadStats):
    """Filled in while :func:`read_mind_behaviors` runs."""

    dropped_ids: int = 0  # history/impression ids not in known_news
    kept_ids: int = 0


def read_mind_behaviors(
    path: str | Path,
    *,
    known_news: set[str] | None = None,
    errors: Literal["raise", "skip"] = "raise",
    stats: BehaviorsReadStats | None = None,
) -> Iterator[Impression]:
    """Yield one :class:`Impression` per row of a MIND ``behaviors.tsv``.

    With ``known_news``, history and impression ids outside it are dropped (counted in
    ``stats.dropped_ids`` and logged once at the end); rows are still yielded even if
    nothing of them resolves, so callers decide what an empty impression means.
    ``errors="raise"`` stops at the first malformed row with a :class:`BehaviorsError`;
    ``errors="skip"`` logs it, counts it and goes on. Blank lines are ignored.
    """
    stats = stats if stats is not None else BehaviorsReadStats()
    for imp in read_rows(Path(path), parse_behaviors_row, errors=errors, stats=stats):
        if known_news is not None:
            before = len(imp.history) + len(imp.impressions)
            imp.history = [n for n in imp.history if n in known_news]
            imp.impressions = [(n, c) for n, c in imp.impressions if n in known_news]
            kept = len(imp.history) + len(imp.impressions)
            stats.kept_ids += kept
            stats.dropped_ids += before - kept
        yield imp
    if known_news is not None and stats.dropped_ids:
        total = stats.dropped_ids + stats.kept_ids
        logger.info("%s: dropped %d of %d news ids not in the known news (%.1f%% kept)", path,
                    stats.dropped_ids, total, 100.0 * stats.kept_ids / total)


def parse_behaviors_row(raw: bytes | str, path: Path, line_no: int) -> Impression:
    """One row → :class:`Impression`; a pure function so the format rules are testable alone."""
    fields = split_tsv_row(raw, path, line_no, BEHAVIORS_COLUMNS, BehaviorsError,
                           "impression_id, user_id, time, history, impressions")
    impression_id, user_id, time_text, history_text, impressions_text = (f.strip() for f in fields)
    if not impression_id:
        raise BehaviorsError(path, line_no, "impression_id is empty")
    if not user_id:
        raise BehaviorsError(path, line_no, "user_id is empty")
    try:
        time = datetime.strptime(time_text, TIME_FORMAT).replace(tzinfo=UTC)
    except ValueError:
        raise BehaviorsError(path, line_no, f"time {time_text!r} is not like '11/11/2019 9:05:58 AM'") from None
    history = history_text.split()
    for news_id in history:
        if "-" in news_id:
            raise BehaviorsError(path, line_no, f"history id {news_id!r} has a click label; "
                                 "history lists bare news ids (labels belong to impressions)")
    impressions: list[tuple[str, int]] = []
    for token in impressions_text.split():
        news_id, sep, label = token.rpartition("-")
        if not sep or not news_id:
            raise BehaviorsError(path, line_no, f"impression {token!r} has no -1/-0 click label "
                                 "(the MIND test split has none; this reader needs labelled impressions)")
        if label not in ("0", "1"):
            raise BehaviorsError(path, line_no, f"impression {token!r}: click label must be 0 or 1, got {label!r}")
        impressions.append((news_id, int(label)))
    if not impressions:
        raise BehaviorsError(path, line_no, "impressions column is empty (every MIND impression shows news)")
    return Impression(impression_id, user_id, time, history, impressions)


def behaviors_stats(path: str | Path, known_news: set[str] | None = None) -> dict[str, Any]:
    """Counts for a behaviors file, and how much of it resolves to ``known_news``.

    Never raises for unresolved ids or malformed rows: malformed rows are counted in
    ``malformed_rows`` (first messages in ``malformed_examples``). Resolution counts are
    present only when ``known_news`` is given. ``*_ids`` count occurrences; ``*_unique`` distinct ids.
    """
    read = BehaviorsReadStats()
    users: set[str] = set()
    hist_ids: set[str] = set()
    imp_ids: set[str] = set()
    n_hist = n_imp = n_clicks = empty_history = 0
    first: datetime | None = None
    last: datetime | None = None
    known = known_news or set()
    hist_ok = imp_ok = clicks_ok = rows_with_known_click = 0
    users_with_known_history: set[str] = set()
    for imp in read_mind_behaviors(path, errors="skip", stats=read):
        users.add(imp.user_id)
        first = imp.time if first is None or imp.time < first else first
        last = imp.time if last is None or imp.time > last else last
        empty_history += not imp.history
        n_hist += len(imp.history)
        n_imp += len(imp.impressions)
        hist_ids.update(imp.history)
        imp_ids.update(n for n, _ in imp.impressions)
        clicked = imp.clicked
        n_clicks += len(clicked)
        if known_news is not None:
            ok = sum(n in known for n in imp.history)
            hist_ok += ok
            if ok:
                users_with_known_history.add(imp.user_id)
            imp_ok += sum(n in known for n, _ in imp.impressions)
            ok_clicks = sum(n in known for n in clicked)
            clicks_ok += ok_clicks
            rows_with_known_click += ok_clicks > 0
    out: dict[str, Any] = {
        "rows": read.rows - read.skipped,
        "malformed_rows": read.skipped,
        "users": len(users),
        "first_time": first.isoformat() if first else None,
        "last_time": last.isoformat() if last else None,
        "rows_with_empty_history": empty_history,
        "history_ids": n_hist,
        "history_unique": len(hist_ids),
        "impression_ids": n_imp,
        "impression_unique": len(imp_ids),
        "clicks": n_clicks,
    }
    if read.errors:
        out["malformed_examples"] = read.errors
    if known_news is not None:
        out.update({
            "known_news": len(known_news),
            "history_resolved": hist_ok,
            "history_unresolved": n_hist - hist_ok,
            "history_unique_resolved": len(hist_ids & known),
            "impression_resolved": imp_ok,
            "impression_unresolved": n_imp - imp_ok,
            "impression_unique_resolved": len(imp_ids & known),
            "clicks_resolved": clicks_ok,
            "clicks_unresolved": n_clicks - clicks_ok,
            "rows_with_resolved_click": rows_with_known_click,
            "users_with_resolved_history": len(users_with_known_history),
        })
    return out
