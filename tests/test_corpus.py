from __future__ import annotations

import logging
from pathlib import Path

import pytest

from index.corpus import CorpusError, ReadStats, read_mind_news

GOOD = "N1\tsports\tgolf\tTiger wins again\t\thttps://x/1\t[]\t[]\n"


def write(tmp_path: Path, *lines: str) -> Path:
    path = tmp_path / "news.tsv"
    path.write_text("".join(lines), encoding="utf-8")
    return path


def test_real_mind_file_loads(mind_news_path: Path) -> None:
    stats = ReadStats()
    articles = list(read_mind_news(mind_news_path, stats=stats))
    assert len(articles) == 2_000
    assert stats == ReadStats(rows=2_000, skipped=0)
    assert len({a.news_id for a in articles}) == 2_000
    first = articles[0]
    assert first.news_id == "N34700"
    assert first.category == "news" and first.subcategory == "newspolitics"
    assert first.title.startswith("New Florida Majority celebrates")
    # Title and abstract both mention Fort Lauderdale: one label, first mention first.
    assert first.entities == ["Fort Lauderdale, Florida", "Caribbean"]
    assert first.url == "https://assets.msn.com/labs/mind/AAJte4f.html"
    assert first.published_at is None
    assert sum(1 for a in articles if not a.abstract) > 0  # empty abstracts are kept


def test_empty_abstract_and_entities(tmp_path: Path) -> None:
    (article,) = read_mind_news(write(tmp_path, GOOD))
    assert article.abstract == "" and article.entities == [] and article.url == "https://x/1"


@pytest.mark.parametrize(
    ("bad_line", "reason"),
    [
        ("N2\tsports\tgolf\tonly five\tfields\n", "expected 8 tab-separated fields, got 5"),
        ("N2\tsports\tgolf\tTitle\t\thttps://x\t[{oops\t[]\n", "title_entities is not valid JSON"),
        ("N2\tsports\tgolf\tTitle\t\thttps://x\t[]\t[{\"Type\": \"P\"}]\n", "abstract_entities[0] has no string 'Label'"),
        ("N2\tsports\tgolf\t\t\thttps://x\t[]\t[]\n", "title: String should have at least 1 character"),
    ],
)
def test_malformed_row_names_file_and_line(tmp_path: Path, bad_line: str, reason: str) -> None:
    path = write(tmp_path, GOOD, bad_line)
    with pytest.raises(CorpusError) as info:
        list(read_mind_news(path))
    assert str(info.value).startswith(f"{path}:2: ")
    assert reason in str(info.value)
    assert info.value.line == 2 and info.value.path == path


def test_invalid_utf8_names_line(tmp_path: Path) -> None:
    path = tmp_path / "news.tsv"
    path.write_bytes(GOOD.encode() + b"N2\tx\ty\t\xff\xfe\t\t\t[]\t[]\n")
    with pytest.raises(CorpusError, match=r"news\.tsv:2: not valid UTF-8"):
        list(read_mind_news(path))


def test_skip_mode_logs_and_counts(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write(tmp_path, GOOD, "broken row\n", "\n", GOOD.replace("N1", "N3"))
    stats = ReadStats()
    with caplog.at_level(logging.WARNING, logger="index.corpus"):
        articles = list(read_mind_news(path, errors="skip", stats=stats))
    assert [a.news_id for a in articles] == ["N1", "N3"]
    assert (stats.rows, stats.skipped) == (3, 1)  # the blank line is not a row
    assert len(stats.errors) == 1 and "news.tsv:2:" in stats.errors[0]
    assert f"{path}:2:" in caplog.text


def test_unknown_errors_mode_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="errors must be"):
        list(read_mind_news(write(tmp_path, GOOD), errors="ignore"))  # type: ignore[arg-type]


def test_title_only_row_keeps_empty_columns(tmp_path: Path) -> None:
    # 49,282 rows of shared/data/mind-small look like this: id, category and title, the rest empty.
    (article,) = read_mind_news(write(tmp_path, "N61837\tnews\t\tThe Cost of Trump's Aid Freeze\t\t\t\t\n"))
    assert (article.news_id, article.category, article.title) == ("N61837", "news", "The Cost of Trump's Aid Freeze")
    assert (article.subcategory, article.abstract, article.url, article.entities) == ("", "", None, [])
