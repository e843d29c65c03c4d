"""The dataset directory format: write → load round trip, validation, file:line errors."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from evaluation.dataset import (
    EVENTS_FILE,
    IMPRESSIONS_FILE,
    META_FILE,
    NEWS_FILE,
    TARGETS_FILE,
    DatasetError,
    Impression,
    Target,
    load_dataset,
    validate_dataset,
    write_dataset,
)
from streams.contracts import UserEvent

NEWS_ROWS = [
    "N1\tsports\tgolf\tTiger wins again\tAbstract one\thttps://x/1\t[]\t[]",
    "N2\tnews\tnewsus\tCity council votes on budget\t\thttps://x/2\t[]\t[]",
    "N3\tsports\tgolf\tMasters field announced\t\t\t[]\t[]",
]
T0 = datetime(2019, 11, 1, tzinfo=UTC)


def event(user: str, i: int, **kw: object) -> UserEvent:
    fields: dict[str, object] = {"event_id": f"{user}-{i}", "user_id": user, "ts": T0 + timedelta(minutes=i),
                                 "domain": "search", "text": f"golf query {i}"}
    fields.update(kw)
    return UserEvent(**fields)  # type: ignore[arg-type]


def test_round_trip(tmp_path: Path) -> None:
    events = [event("u2", 1), event("u1", 2, domain="news_click", text="Tiger wins again", news_id="N1",
                                     url="https://x/1"), event("u1", 1, meta={"k": "v"})]
    targets = [Target(user_id="u1", news_ids=["N3"]), Target(user_id="u2", news_ids=["N2", "N3"], cold=True)]
    write_dataset(tmp_path, (r + "\n" for r in NEWS_ROWS), events, targets, {"seed": 3})
    assert (tmp_path / NEWS_FILE).read_text().splitlines() == NEWS_ROWS  # rows copied as they are
    ds = load_dataset(tmp_path)
    assert [a.news_id for a in ds.news] == ["N1", "N2", "N3"]
    assert ds.users == ["u1", "u2"] and ds.targets["u2"].cold and not ds.targets["u1"].cold
    assert ds.targets["u2"].news_ids == ["N2", "N3"]
    # Per user, oldest first; the contract records come back equal.
    assert [e.event_id for e in ds.events["u1"]] == ["u1-1", "u1-2"]
    assert ds.events["u1"][1] == events[1] and ds.events["u1"][0].meta == {"k": "v"}
    assert ds.meta == {"seed": 3}
    assert ds.news_by_id()["N2"].title == "City council votes on budget"
    assert validate_dataset(tmp_path).ok


def test_meta_is_optional(tmp_path: Path) -> None:
    write_dataset(tmp_path, NEWS_ROWS, [event("u1", 1)], [Target(user_id="u1", news_ids=["N1"])])
    assert not (tmp_path / META_FILE).exists()
    assert load_dataset(tmp_path).meta == {}


def test_validate_finds_unresolved_targets_and_users_without_events(tmp_path: Path) -> None:
    targets = [Target(user_id="u1", news_ids=["N1", "N404"]), Target(user_id="lonely", news_ids=["N2"]),
               Target(user_id="u3", news_ids=["N9", "N8"], cold=True)]
    write_dataset(tmp_path, NEWS_ROWS, [event("u1", 1), event("u3", 1)], targets)
    report = validate_dataset(tmp_path)
    assert not report.ok
    assert (report.users, report.cold_users, report.events, report.news) == (3, 1, 2, 3)
    assert report.target_clicks == 5 and report.unresolved_target_ids == 3 and report.users_without_events == 1
    assert any("3 target news ids are not in news.tsv" in p for p in report.problems)
    assert any("1 target users have no events" in p and "lonely" in p for p in report.problems)


def test_duplicate_news_rows_are_a_problem(tmp_path: Path) -> None:
    write_dataset(tmp_path, NEWS_ROWS + NEWS_ROWS[:1], [event("u1", 1)], [Target(user_id="u1", news_ids=["N1"])])
    assert any("duplicate news_id" in p for p in validate_dataset(tmp_path).problems)


def test_malformed_events_line_names_file_and_line(tmp_path: Path) -> None:
    write_dataset(tmp_path, NEWS_ROWS, [event("u1", 1)], [Target(user_id="u1", news_ids=["N1"])])
    with (tmp_path / EVENTS_FILE).open("a") as fh:
        fh.write("\n")  # blank lines are skipped but still counted
        bad = json.loads(event("u1", 2).model_dump_json())
        bad["domain"] = "tv"
        fh.write(json.dumps(bad) + "\n")
    with pytest.raises(DatasetError, match=rf"{EVENTS_FILE}:3: domain: "):
        load_dataset(tmp_path)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"user_id": "u1", "news_ids": []}', r"targets.jsonl:2: news_ids: List should have at least 1"),
        ('{"user_id": "u1", "news_ids": ["N1"], "extra": 1}', r"targets.jsonl:2: extra: Extra inputs"),
        ('not json', r"targets.jsonl:2: "),
    ],
)
def test_malformed_targets_line_names_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    write_dataset(tmp_path, NEWS_ROWS, [event("u1", 1)], [Target(user_id="u0", news_ids=["N1"])])
    with (tmp_path / TARGETS_FILE).open("a") as fh:
        fh.write(line + "\n")
    with pytest.raises(DatasetError, match=message):
        load_dataset(tmp_path)


def test_duplicate_target_user_and_missing_file(tmp_path: Path) -> None:
    t = Target(user_id="u1", news_ids=["N1"])
    write_dataset(tmp_path, NEWS_ROWS, [event("u1", 1)], [t, t])
    with pytest.raises(DatasetError, match=r"targets.jsonl:2: user 'u1' appears twice"):
        load_dataset(tmp_path)
    (tmp_path / EVENTS_FILE).unlink()
    with pytest.raises(DatasetError, match="missing events.jsonl"):
        load_dataset(tmp_path)


def test_bad_news_row_is_a_dataset_error(tmp_path: Path) -> None:
    write_dataset(tmp_path, NEWS_ROWS + ["N4\tonly\tthree"], [event("u1", 1)], [Target(user_id="u1", news_ids=["N1"])])
    with pytest.raises(DatasetError, match=r"news.tsv:4: expected 8 tab-separated fields"):
        load_dataset(tmp_path)


def test_validate_finds_leaked_targets_unknown_clicks_and_repeated_event_ids(tmp_path: Path) -> None:
    events = [event("u1", 1, domain="news_click", text="Tiger wins again", news_id="N1"),
              event("u1", 2, domain="news_click", text="gone", news_id="N404"), event("u2", 1), event("u2", 1)]
    write_dataset(tmp_path, NEWS_ROWS, events,
                  [Target(user_id="u1", news_ids=["N1", "N3"]), Target(user_id="u2", news_ids=["N2"])])
    problems = " | ".join(validate_dataset(tmp_path).problems)
    assert "1 targets were already clicked" in problems
    assert "1 events name a news_id that is not in news.tsv" in problems
    assert "event_id values repeat" in problems


def test_target_ids_must_not_repeat_and_bad_meta_is_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="repeat"):
        Target(user_id="u", news_ids=["N1", "N1"])
    write_dataset(tmp_path, NEWS_ROWS, [event("u1", 1)], [Target(user_id="u1", news_ids=["N1"])])
    (tmp_path / META_FILE).write_text("{not json")
    with pytest.raises(DatasetError, match="meta.json: not valid JSON"):
        load_dataset(tmp_path)


def imp(iid: str, user: str, minute: int, candidates: list[str], clicked: list[str]) -> Impression:
    return Impression(impression_id=iid, user_id=user, ts=T0 + timedelta(minutes=minute), candidates=candidates,
                      clicked=clicked)


def test_impressions_round_trip_sorted_by_time(tmp_path: Path) -> None:
    impressions = [imp("i2", "u1", 9, ["N3", "N2"], ["N3"]), imp("i1", "new", 5, ["N1", "N2"], ["N2"])]
    # "new" has no events: a first visit, allowed because its target is cold and it has an impression
    targets = [Target(user_id="u1", news_ids=["N3"]), Target(user_id="new", news_ids=["N2"], cold=True)]
    write_dataset(tmp_path, NEWS_ROWS, [event("u1", 1)], targets, impressions=impressions)
    ds = load_dataset(tmp_path)
    assert [i.impression_id for i in ds.impressions] == ["i1", "i2"]
    assert ds.impressions[1] == impressions[0] and ds.impressions[1].candidates == ["N3", "N2"]
    assert ds.impressions[0].ts.utcoffset() == timedelta(0)
    report = validate_dataset(tmp_path)
    assert report.ok, report.problems
    assert (report.impressions, report.impression_candidates, report.cold_users_without_events) == (2, 4, 1)


def test_no_impressions_file_means_no_impressions_and_no_silent_cold_users(tmp_path: Path) -> None:
    write_dataset(tmp_path, NEWS_ROWS, [event("u1", 1)],
                  [Target(user_id="u1", news_ids=["N1"]), Target(user_id="new", news_ids=["N2"], cold=True)])
    assert not (tmp_path / IMPRESSIONS_FILE).exists()
    assert load_dataset(tmp_path).impressions == []
    assert any("1 target users have no events" in p for p in validate_dataset(tmp_path).problems)


def test_validate_finds_unknown_candidates_and_silent_warm_users(tmp_path: Path) -> None:
    impressions = [imp("i1", "u1", 5, ["N1", "N404"], ["N1"]), imp("i2", "ghost", 6, ["N2"], [])]
    write_dataset(tmp_path, NEWS_ROWS, [event("u1", 1)], [Target(user_id="u1", news_ids=["N3"])],
                  impressions=impressions)
    problems = " | ".join(validate_dataset(tmp_path).problems)
    assert "1 candidate news ids are not in news.tsv" in problems
    assert "1 users have an impression but no events and no cold target, e.g. ['ghost']" in problems


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"impression_id": "i9", "user_id": "u1", "ts": "2019-11-01T00:00:00", "candidates": ["N1"], "clicked": []}',
         r"impressions.jsonl:2: ts: Input should have timezone info"),
        (('{"impression_id": "i9", "user_id": "u1", "ts": "2019-11-01T00:00:00Z", "candidates": ["N1"], '
         '"clicked": ["N2"]}'), r"impressions.jsonl:2: line: Value error, clicked ids \['N2'\] are not among"),
        ('{"impression_id": "i9", "user_id": "u1", "ts": "2019-11-01T00:00:00Z", "candidates": ["N1", "N1"]}',
         r"impressions.jsonl:2: candidates: Value error, ids must not repeat"),
        ('{"impression_id": "i9", "user_id": "u1", "ts": "2019-11-01T00:00:00Z", "candidates": []}',
         r"impressions.jsonl:2: candidates: List should have at least 1"),
        ('{"impression_id": "i1", "user_id": "u1", "ts": "2019-11-01T00:00:00Z", "candidates": ["N1"]}',
         r"impressions.jsonl:2: impression 'i1' appears twice"),
    ],
)
def test_malformed_impressions_line_names_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    write_dataset(tmp_path, NEWS_ROWS, [event("u1", 1)], [Target(user_id="u1", news_ids=["N1"])],
                  impressions=[imp("i1", "u1", 5, ["N1"], ["N1"])])
    with (tmp_path / IMPRESSIONS_FILE).open("a") as fh:
        fh.write(line + "\n")
    with pytest.raises(DatasetError, match=message):
        load_dataset(tmp_path)
