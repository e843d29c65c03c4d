"""MIND behaviors.tsv: the real sample loads, stats report what resolves, bad rows name file:line."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from evaluation.behaviors import BehaviorsError, BehaviorsReadStats, behaviors_stats, read_mind_behaviors
from index.corpus import read_mind_news

GOOD = "7\tU1\t11/11/2019 9:05:58 AM\tN1 N2\tN3-1 N4-0\n"


@pytest.fixture(scope="module")
def behaviors_path(mind_news_path: Path) -> Path:
    path = mind_news_path.parent / "behaviors.tsv"
    assert path.is_file(), f"MIND behaviors sample missing at {path}"
    return path


@pytest.fixture(scope="module")
def known_news(mind_news_path: Path) -> set[str]:
    return {a.news_id for a in read_mind_news(mind_news_path)}


def write(tmp_path: Path, *lines: str) -> Path:
    path = tmp_path / "behaviors.tsv"
    path.write_text("".join(lines), encoding="utf-8")
    return path


def test_real_file_loads(behaviors_path: Path) -> None:
    rows = list(read_mind_behaviors(behaviors_path))
    assert len(rows) == 5_000
    first = rows[0]
    assert (first.impression_id, first.user_id) == ("58376", "U81994")
    assert first.time == datetime(2019, 11, 12, 14, 14, 46, tzinfo=UTC)  # 2:14:46 PM
    assert first.history[:2] == ["N138", "N64727"]
    assert all(label in (0, 1) for _, label in first.impressions)
    assert sum(not r.history for r in rows) > 0  # empty histories are kept
    assert all(r.impressions for r in rows)


def test_known_news_drops_unresolved_ids_but_keeps_rows(behaviors_path: Path, known_news: set[str]) -> None:
    stats = BehaviorsReadStats()
    rows = list(read_mind_behaviors(behaviors_path, known_news=known_news, stats=stats))
    assert len(rows) == 5_000 and stats.rows == 5_000
    assert all(n in known_news for r in rows for n in r.history)
    assert all(n in known_news for r in rows for n, _ in r.impressions)
    # The sample resolves only a few percent of its ids: most are dropped, and counted.
    assert stats.dropped_ids > 10 * stats.kept_ids > 0


def test_stats_count_resolved_and_unresolved(behaviors_path: Path, known_news: set[str]) -> None:
    stats = behaviors_stats(behaviors_path, known_news)
    assert stats["rows"] == 5_000 and stats["malformed_rows"] == 0
    assert 0 < stats["users"] <= 5_000
    assert stats["history_resolved"] + stats["history_unresolved"] == stats["history_ids"]
    assert stats["impression_resolved"] + stats["impression_unresolved"] == stats["impression_ids"]
    assert stats["clicks_resolved"] + stats["clicks_unresolved"] == stats["clicks"]
    resolved_share = (stats["history_resolved"] + stats["impression_resolved"]) / (
        stats["history_ids"] + stats["impression_ids"])
    assert 0.01 < resolved_share < 0.10  # ~4%: reported, not assumed
    assert stats["history_unique_resolved"] <= len(known_news)
    without = behaviors_stats(behaviors_path)
    assert "history_resolved" not in without and without["history_ids"] == stats["history_ids"]


def test_stats_on_a_small_file(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD, "8\tU1\t11/12/2019 1:00:00 PM\t\tN1-0 N9-1\n", "\n")
    stats = behaviors_stats(path, {"N1", "N3"})
    assert stats["rows"] == 2 and stats["users"] == 1 and stats["rows_with_empty_history"] == 1
    assert (stats["history_ids"], stats["history_resolved"], stats["history_unresolved"]) == (2, 1, 1)
    assert (stats["impression_ids"], stats["impression_resolved"]) == (4, 2)
    assert (stats["clicks"], stats["clicks_resolved"], stats["rows_with_resolved_click"]) == (2, 1, 1)
    assert stats["first_time"] == "2019-11-11T09:05:58+00:00"


def test_stats_count_malformed_rows_instead_of_crashing(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD, "9\tU2\tyesterday\t\tN1-1\n")
    stats = behaviors_stats(path, set())
    assert stats["rows"] == 1 and stats["malformed_rows"] == 1
    assert f"{path}:2:" in stats["malformed_examples"][0]


@pytest.mark.parametrize(
    ("bad_line", "reason"),
    [
        ("9\tU2\t11/11/2019 9:05:58 AM\tN1\n", "expected 5 tab-separated fields"),
        ("9\t\t11/11/2019 9:05:58 AM\tN1\tN2-1\n", "user_id is empty"),
        ("9\tU2\t2019-11-11 09:05\tN1\tN2-1\n", "time '2019-11-11 09:05' is not like"),
        ("9\tU2\t11/11/2019 9:05:58 AM\tN1\tN2\n", "impression 'N2' has no -1/-0 click label"),
        ("9\tU2\t11/11/2019 9:05:58 AM\tN1\tN2-7\n", "click label must be 0 or 1"),
        ("9\tU2\t11/11/2019 9:05:58 AM\tN1-1\tN2-1\n", "history id 'N1-1' has a click label"),
        ("9\tU2\t11/11/2019 9:05:58 AM\tN1\t\n", "impressions column is empty"),
    ],
)
def test_malformed_row_names_file_and_line(tmp_path: Path, bad_line: str, reason: str) -> None:
    path = write(tmp_path, GOOD, bad_line)
    with pytest.raises(BehaviorsError) as info:
        list(read_mind_behaviors(path))
    assert str(info.value).startswith(f"{path}:2: ")
    assert reason in str(info.value)
    assert info.value.line == 2 and isinstance(info.value, ValueError)


def test_invalid_utf8_names_line(tmp_path: Path) -> None:
    path = tmp_path / "behaviors.tsv"
    path.write_bytes(GOOD.encode() + b"9\tU\xff\t11/11/2019 9:05:58 AM\t\tN1-1\n")
    with pytest.raises(BehaviorsError, match=r":2: not valid UTF-8"):
        list(read_mind_behaviors(path))


def test_skip_mode_counts_and_goes_on(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD, "broken\n", GOOD.replace("7\t", "8\t"))
    stats = BehaviorsReadStats()
    rows = list(read_mind_behaviors(path, errors="skip", stats=stats))
    assert [r.impression_id for r in rows] == ["7", "8"]
    assert (stats.rows, stats.skipped) == (3, 1)
    with pytest.raises(ValueError, match="errors must be"):
        list(read_mind_behaviors(path, errors="ignore"))  # type: ignore[arg-type]
