"""MIND (``news.tsv`` + ``behaviors.tsv``) → a dataset directory with real impressions.

The rules (``newsrec data mind``; README "Offline evaluation" says the same):

- **One impression per user**: the user's earliest row (by time, then file order) that keeps
  at least one clicked candidate after the cleaning below. The user's other rows are counted
  (``unused_impressions``), not written; a user none of whose rows keeps a click is counted in
  ``users_without_usable_click`` and left out.
- **History → ``news_click`` events.** MIND has no click times, so they are synthesized: a
  history of ``n`` clicks (oldest first, as MIND lists them, repeats kept) gets times one
  minute apart, the newest one minute before the impression: click ``i`` (0 = oldest) at
  ``impression time - (n - i) minutes``. Events carry the title as ``text``, ``news_id``, the
  url and ``meta = {"synthetic_ts": true}``; ``event_id`` is ``<impression_id>-h<i>``
  (unique: a row that repeats an impression id is skipped and counted).
- **Candidates** are the shown ids in shown order, each once; ids already in the user's
  history are dropped (counted), so a target is never a past click. **Targets** are the
  clicked candidates; ``cold`` = fewer than :data:`COLD_HISTORY` history clicks. A user with
  an empty history keeps the impression, has no events and is cold.
- Ids that are not in ``news.tsv`` are dropped and counted (``evaluation.behaviors``);
  malformed rows stop the read with file:line (``errors="raise"``) or are counted and skipped.
- MIND times have no zone; they are read as UTC (as ``evaluation.behaviors`` does).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

from evaluation.behaviors import BehaviorsReadStats, read_mind_behaviors
from evaluation.behaviors import Impression as MindRow
from evaluation.dataset import COLD_HISTORY, Impression, Target
from index.corpus import read_mind_news
from streams.contracts import NewsArticle, UserEvent

CLICK_SPACING = timedelta(minutes=1)  # synthetic time between two history clicks


@dataclass
class MindConversion:
    events: list[UserEvent]  # per written impression, oldest first
    targets: list[Target]  # one per written impression, in impression order
    impressions: list[Impression]  # sorted by (ts, impression_id)
    counts: dict[str, int] = field(default_factory=dict)


def history_events(row: MindRow, news: dict[str, NewsArticle]) -> list[UserEvent]:
    """The row's history as ``news_click`` events at synthetic times (module docstring)."""
    n = len(row.history)
    return [UserEvent(event_id=f"{row.impression_id}-h{i}", user_id=row.user_id,
                      ts=row.time - (n - i) * CLICK_SPACING, domain="news_click", text=news[news_id].title,
                      url=news[news_id].url, news_id=news_id, meta={"synthetic_ts": True})
            for i, news_id in enumerate(row.history)]


def shown_candidates(row: MindRow) -> tuple[list[str], list[str], int, int]:
    """``(candidates, clicked, repeats dropped, history ids dropped)`` of one row: shown order,
    each id once (clicked if any of its showings was), past clicks left out."""
    label: dict[str, int] = {}
    for news_id, clicked in row.impressions:
        label[news_id] = max(label.get(news_id, 0), clicked)
    repeats = len(row.impressions) - len(label)
    past = set(row.history)
    candidates = [n for n in label if n not in past]
    return candidates, [n for n in candidates if label[n]], repeats, len(label) - len(candidates)


def convert_mind(news: Sequence[NewsArticle], rows: Iterable[MindRow]) -> MindConversion:
    """Pure: articles and behaviors rows (ids already resolved to ``news``) → events,
    targets and impressions by the rules of the module docstring, with counts."""
    by_id = {a.news_id: a for a in news}
    counts = dict.fromkeys(("rows", "duplicate_impression_rows", "unused_impressions", "users_without_usable_click",
                            "repeated_candidates_dropped", "history_candidates_dropped", "users_without_events"), 0)
    per_user: dict[str, list[tuple[int, MindRow]]] = {}
    seen_ids: set[str] = set()
    for order, row in enumerate(rows):
        counts["rows"] += 1
        if row.impression_id in seen_ids:
            counts["duplicate_impression_rows"] += 1
            continue
        seen_ids.add(row.impression_id)
        unknown = [n for n in (*row.history, *(n for n, _ in row.impressions)) if n not in by_id]
        if unknown:
            raise ValueError(f"impression {row.impression_id}: news ids {unknown[:3]} are not in the news; "
                             "read the behaviors with known_news to drop them")
        per_user.setdefault(row.user_id, []).append((order, row))
    events: list[UserEvent] = []
    targets: list[Target] = []
    impressions: list[Impression] = []
    for user_rows in per_user.values():
        user_rows.sort(key=lambda item: (item[1].time, item[0]))
        for _, row in user_rows:
            candidates, clicked, repeats, past = shown_candidates(row)
            if clicked:
                break
        else:
            counts["users_without_usable_click"] += 1
            continue
        counts["unused_impressions"] += len(user_rows) - 1
        counts["repeated_candidates_dropped"] += repeats
        counts["history_candidates_dropped"] += past
        counts["users_without_events"] += not row.history
        events += history_events(row, by_id)
        impressions.append(Impression(impression_id=row.impression_id, user_id=row.user_id, ts=row.time,
                                      candidates=candidates, clicked=clicked))
        targets.append(Target(user_id=row.user_id, news_ids=clicked, cold=len(row.history) < COLD_HISTORY))
    order = sorted(range(len(impressions)), key=lambda i: (impressions[i].ts, impressions[i].impression_id))
    impressions, targets = [impressions[i] for i in order], [targets[i] for i in order]
    counts.update({
        "users": len(per_user),
        "impressions": len(impressions),
        "events": len(events),
        "cold_users": sum(t.cold for t in targets),
        "candidates": sum(len(i.candidates) for i in impressions),
        "clicks": sum(len(i.clicked) for i in impressions),
        "all_clicked_impressions": sum(len(i.clicked) == len(i.candidates) for i in impressions),
    })
    return MindConversion(events, targets, impressions, counts)


def read_mind(news_path: Path, behaviors_path: Path, *,
              errors: Literal["raise", "skip"] = "raise") -> tuple[list[NewsArticle], MindConversion, dict[str, Any]]:
    """Read both files and convert; also returns the reader's counts (malformed rows,
    unresolved ids) for ``meta.json``. News rows are always strict: the dataset copies them."""
    news = list(read_mind_news(news_path))
    stats = BehaviorsReadStats()
    rows = read_mind_behaviors(behaviors_path, known_news={a.news_id for a in news}, errors=errors, stats=stats)
    conversion = convert_mind(news, rows)
    read = {"malformed_rows": stats.skipped, "unresolved_ids_dropped": stats.dropped_ids,
            "malformed_examples": stats.errors}
    return news, conversion, read
