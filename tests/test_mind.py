"""MIND → dataset with impressions: the conversion rules on hand-made rows, their invariants
on generated ones, and ``newsrec data mind`` end to end (with title-only news rows)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from commands.data_cli import main
from evaluation.behaviors import Impression as MindRow
from evaluation.dataset import IMPRESSIONS_FILE, load_dataset, validate_dataset
from evaluation.mind import COLD_HISTORY, convert_mind, read_mind
from index.corpus import CorpusError, read_mind_news
from models.prompt import build_messages
from streams.contracts import NewsArticle, parse_event
from streams.window import UserState, apply_event

# N1 has every column; the others are title-only, as 49,282 rows of shared/data/mind-small are.
NEWS = ["N1\tsports\tgolf\tTiger wins again\tAn abstract\thttps://x/1\t[]\t[]"] + [
    f"N{i}\tnews\t\tHeadline number {i}\t\t\t\t" for i in range(2, 10)]
BEHAVIORS = [
    # history repeats N1; candidate N1 is a past click (dropped); clicked N3
    "i1\tU1\t11/11/2019 9:05:58 AM\tN1 N2 N1\tN3-1 N4-0 N1-1 N5-0",
    # U1's earlier row: its only click is a past click, so it is not usable and i1 is U1's impression
    "i2\tU1\t11/10/2019 9:00:00 AM\tN2\tN2-1 N6-0",
    # empty history, N404 unknown: kept, cold, no events
    "i3\tU2\t11/12/2019 1:00:00 PM\t\tN7-0 N8-1 N404-1",
    # warm: 5 history clicks; a candidate shown twice counts once
    "i4\tU3\t11/13/2019 1:00:00 PM\tN1 N2 N3 N4 N5\tN6-1 N7-0 N6-0",
    # repeats impression id i4: skipped
    "i4\tU4\t11/13/2019 2:00:00 PM\tN1\tN6-1 N7-0",
    # the only click is a past click: the user is left out
    "i6\tU5\t11/13/2019 3:00:00 PM\tN1\tN1-1 N2-0",
]


def write_inputs(tmp_path: Path, behaviors: list[str] = BEHAVIORS) -> tuple[Path, Path]:
    news, beh = tmp_path / "news.tsv", tmp_path / "behaviors.tsv"
    news.write_text("\n".join(NEWS) + "\n", encoding="utf-8")
    beh.write_text("\n".join(behaviors) + "\n", encoding="utf-8")
    return news, beh


def test_title_only_rows_read_with_empty_columns(tmp_path: Path) -> None:
    articles = list(read_mind_news(write_inputs(tmp_path)[0]))
    assert len(articles) == 9
    blank = articles[1]
    assert (blank.title, blank.category, blank.subcategory, blank.abstract, blank.url, blank.entities) == (
        "Headline number 2", "news", "", "", None, [])


def test_conversion_rules(tmp_path: Path) -> None:
    _, conv, read = read_mind(*write_inputs(tmp_path))
    by_user = {i.user_id: i for i in conv.impressions}
    assert [i.impression_id for i in conv.impressions] == ["i1", "i3", "i4"]  # by time; U5 has no usable click
    assert by_user["U1"].candidates == ["N3", "N4", "N5"] and by_user["U1"].clicked == ["N3"]
    assert by_user["U2"].candidates == ["N7", "N8"] and by_user["U2"].clicked == ["N8"]
    assert by_user["U3"].candidates == ["N6", "N7"] and by_user["U3"].clicked == ["N6"]
    assert by_user["U1"].ts == datetime(2019, 11, 11, 9, 5, 58, tzinfo=UTC)
    # i1: 3 history clicks at 9:02:58, 9:03:58, 9:04:58 (one minute apart, the last one minute before 9:05:58)
    u1 = [e for e in conv.events if e.user_id == "U1"]
    assert [e.event_id for e in u1] == ["i1-h0", "i1-h1", "i1-h2"]
    assert [e.ts.strftime("%H:%M:%S") for e in u1] == ["09:02:58", "09:03:58", "09:04:58"]
    assert [(e.domain, e.news_id, e.text) for e in u1] == [
        ("news_click", "N1", "Tiger wins again"), ("news_click", "N2", "Headline number 2"),
        ("news_click", "N1", "Tiger wins again")]
    assert u1[0].url == "https://x/1" and u1[1].url is None and u1[0].meta == {"synthetic_ts": True}
    assert not [e for e in conv.events if e.user_id == "U2"]
    assert {t.user_id: (t.news_ids, t.cold) for t in conv.targets} == {
        "U1": (["N3"], True), "U2": (["N8"], True), "U3": (["N6"], False)}
    assert conv.counts == {
        "rows": 6, "duplicate_impression_rows": 1, "unused_impressions": 1, "users_without_usable_click": 1,
        "repeated_candidates_dropped": 1, "history_candidates_dropped": 1, "users_without_events": 1,
        "users": 4, "impressions": 3, "events": 8, "cold_users": 2, "candidates": 7, "clicks": 3,
        "all_clicked_impressions": 0}
    assert read == {"malformed_rows": 0, "unresolved_ids_dropped": 1, "malformed_examples": []}


def test_ids_must_be_resolved_before_converting(tmp_path: Path) -> None:
    news = list(read_mind_news(write_inputs(tmp_path)[0]))
    row = MindRow("i9", "U9", datetime(2019, 11, 11, tzinfo=UTC), ["N404"], [("N1", 1)])
    with pytest.raises(ValueError, match=r"news ids \['N404'\] are not in the news"):
        convert_mind(news, [row])


# The articles of NEWS without a file (hypothesis and tmp_path do not mix).
ARTICLES = [NewsArticle(news_id=f"N{i}", title=f"Headline number {i}", category="news") for i in range(1, 10)]
ids = st.sampled_from([f"N{i}" for i in range(1, 10)])
rows = st.lists(st.builds(
    lambda n, user, minute, history, shown: MindRow(f"i{n}", user, datetime(2019, 11, 11, tzinfo=UTC)
                                                    + timedelta(minutes=minute), history, shown),
    st.integers(0, 10**6), st.sampled_from(["U1", "U2", "U3"]), st.integers(0, 3),
    st.lists(ids, max_size=8), st.lists(st.tuples(ids, st.integers(0, 1)), min_size=1, max_size=6)), max_size=8)


@given(rows)
def test_conversion_invariants(tmp_rows: list[MindRow]) -> None:
    conv = convert_mind(ARTICLES, tmp_rows)
    assert len({i.user_id for i in conv.impressions}) == len(conv.impressions)  # one per user
    assert [(i.ts, i.impression_id) for i in conv.impressions] == sorted((i.ts, i.impression_id)
                                                                          for i in conv.impressions)
    assert len({e.event_id for e in conv.events}) == len(conv.events)
    for imp, target in zip(conv.impressions, conv.targets, strict=True):
        history = [e for e in conv.events if e.user_id == imp.user_id]
        assert target.user_id == imp.user_id and target.news_ids == imp.clicked and imp.clicked
        assert set(imp.clicked) <= set(imp.candidates)
        assert not set(imp.candidates) & {e.news_id for e in history}  # past clicks never come back
        assert target.cold == (len(history) < COLD_HISTORY)
        assert all(e.ts < imp.ts for e in history)
        assert [e.ts for e in history] == sorted(e.ts for e in history)
    assert conv.counts["impressions"] + conv.counts["users_without_usable_click"] == conv.counts["users"]


def test_data_mind_command_writes_a_valid_dataset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    news, beh = write_inputs(tmp_path)
    out = tmp_path / "ds"
    argv = ["data", "mind", "--news", str(news), "--behaviors", str(beh), "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "3 impressions of 4 users (2 cold, 1 without history)" in printed
    assert (out / "news.tsv").read_bytes() == news.read_bytes()
    assert (out / IMPRESSIONS_FILE).read_text().count("\n") == 3
    ds = load_dataset(out)
    assert [i.impression_id for i in ds.impressions] == ["i1", "i3", "i4"]
    meta = json.loads((out / "meta.json").read_text())
    assert meta["source"] == "mind" and meta["counts"]["unresolved_ids_dropped"] == 1
    report = validate_dataset(out)
    assert report.ok, report.problems
    assert (report.impressions, report.cold_users_without_events) == (3, 1)
    assert main(["data", "validate", str(out)]) == 0
    assert "cold users without events (first visits): 1" in capsys.readouterr().out
    assert main(argv) == 2  # no silent overwrite
    assert "--force" in capsys.readouterr().err


def test_data_mind_bad_row_names_file_and_line_or_is_counted(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    news, beh = write_inputs(tmp_path, [*BEHAVIORS, "i7\tU7\tyesterday\t\tN1-1"])
    argv = ["data", "mind", "--news", str(news), "--behaviors", str(beh), "--out", str(tmp_path / "ds")]
    assert main(argv) == 3
    assert f"{beh}:7: time 'yesterday'" in capsys.readouterr().err
    with pytest.raises(CorpusError, match=r"behaviors.tsv:7: "):
        read_mind(news, beh)
    assert main([*argv, "--skip-bad-rows"]) == 0
    assert "behaviors rows: 6 read, 1 malformed" in capsys.readouterr().out
    meta = json.loads((tmp_path / "ds" / "meta.json").read_text())
    assert meta["counts"]["malformed_rows"] == 1 and "behaviors.tsv:7" in meta["malformed_examples"][0]


# ---------------------------------------------------------------- impressions on the wire (user-events)


def impression_event(**kw: object) -> bytes:
    fields = {"event_id": "i1-c0", "user_id": "U1", "ts": "2019-11-11T09:05:58Z", "domain": "impression",
              "text": "Headline number 3", "news_id": "N3"}
    return json.dumps({**fields, **kw}).encode()


def test_impression_domain_needs_the_news_shown() -> None:
    assert parse_event(impression_event()).domain == "impression"
    with pytest.raises(ValueError, match="an impression event needs the news_id"):
        parse_event(impression_event(news_id=None))


def test_impressions_are_neither_prompt_signals_nor_clicks() -> None:
    kw = {"max_signals": 10, "max_age_s": 1e6, "clicked_memory": 10}
    click = parse_event(impression_event(event_id="c1", domain="news_click", news_id="N1", text="Tiger wins again"))
    state = apply_event(UserState(), click, 0, **kw)
    shown = apply_event(state, parse_event(impression_event()), 2, **kw)
    assert shown.signals == state.signals and shown.clicked == ("N1",)
    # still the pending trigger: the worker refreshes after every event and clears only that trigger
    assert (shown.pending_trigger, shown.pending_partition) == ("i1-c0", 2)
    prompt = build_messages(shown.signals, now=datetime(2019, 11, 12, tzinfo=UTC))[-1]["content"]
    assert "Tiger wins again" in prompt and "Headline number 3" not in prompt
