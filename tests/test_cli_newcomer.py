"""What a new user meets first: producers that lose nothing, errors as one line with an exit
code, `newsrec dlq`, help that names the settings. All on the real local broker."""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from commands.cli import build_parser, main
from commands.errors import EXIT_INPUT, EXIT_SERVICE
from streams.kafka_log import RateLimitFilter
from streams.settings import WorkerSettings
from tests.streaming import consume
from tools.demo import demo_corpus
from tools.stack import free_port

ROOT = Path(__file__).resolve().parent.parent
GOOD = {"event_id": "e1", "user_id": "u1", "ts": "2026-11-01T09:30:00Z", "domain": "search", "text": "ev range"}


def _line(**changes: object) -> str:
    return json.dumps(GOOD | changes)


@pytest.fixture
def topics(monkeypatch: pytest.MonkeyPatch, kafka_bootstrap: str, unique_name: str, tmp_path: Path) -> dict[str, str]:
    """Fresh one-partition topics (total order: a later sentinel proves nothing came before it)."""
    names = {"events": f"{unique_name}-events", "news": f"{unique_name}-news", "dlq": f"{unique_name}-dlq"}
    env = {"NEWSREC_KAFKA_BOOTSTRAP": kafka_bootstrap, "NEWSREC_TOPIC_PARTITIONS": "1",
           "NEWSREC_STATE_DIR": str(tmp_path / "state"), **{f"NEWSREC_TOPIC_{k.upper()}": v for k, v in names.items()}}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return names | {"bootstrap": kafka_bootstrap}


def _read(topics: dict[str, str], what: str, count: int) -> list[dict]:
    records = consume(topics["bootstrap"], topics[what], until=lambda got: len(got) >= count)
    return [value for _, value in records]


def test_produce_events_sends_valid_lines_and_dead_letters_the_rest(topics, tmp_path, capsys):
    path = tmp_path / "events.jsonl"
    path.write_text("\n".join([_line(), "{not json", "", _line(event_id="e2", ts="2026-11-01T09:30:00"),
                               _line(event_id="e3")]) + "\n")
    assert main(["produce", "events", str(path)]) == EXIT_INPUT
    out, err = capsys.readouterr()
    assert f"{path}: sent 2 events records, dead-lettered 2, skipped 0" in out
    assert f"{path}:2: " in err and f"{path}:4: ts: " in err and "newsrec dlq" in err
    assert "Traceback" not in out + err

    assert [e["event_id"] for e in _read(topics, "events", 2)] == ["e1", "e3"]
    letters = _read(topics, "dlq", 2)
    assert [d["error"].split(": ")[0] for d in letters] == [f"{path}:2", f"{path}:4"]
    assert letters[0]["raw"] == "{not json" and letters[1]["raw"] == _line(event_id="e2", ts="2026-11-01T09:30:00")
    assert {d["topic"] for d in letters} == {topics["events"]} and {d["offset"] for d in letters} == {-1}


def test_produce_strict_sends_nothing_when_a_line_is_bad(topics, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(_line() + "\n" + _line(domain="tv") + "\n")
    assert main(["produce", "events", str(bad), "--strict"]) == EXIT_INPUT
    out, err = capsys.readouterr()
    assert "sent 0 events records, dead-lettered 0, skipped 1" in out
    assert f"{bad}:2: domain: " in err and "nothing sent (--strict)" in err and "Traceback" not in out + err

    # Sentinels sent after it are the first records of each topic: the strict run sent nothing.
    sentinel = tmp_path / "sentinel.jsonl"
    sentinel.write_text(_line(event_id="sentinel") + "\n" + "[]\n")
    assert main(["produce", "events", str(sentinel)]) == EXIT_INPUT
    assert _read(topics, "events", 1)[0]["event_id"] == "sentinel"
    assert _read(topics, "dlq", 1)[0]["raw"] == "[]"


def test_produce_news_dead_letters_a_broken_row(topics, tmp_path, capsys):
    rows = demo_corpus().read_text(encoding="utf-8").splitlines()[:3]
    path = tmp_path / "news.tsv"
    path.write_text("\n".join([rows[0], "D9999\tonly\tthree", rows[1], rows[2]]) + "\n")
    assert main(["produce", "news", str(path)]) == EXIT_INPUT
    out, err = capsys.readouterr()
    assert f"{path}: sent 3 news records, dead-lettered 1, skipped 0" in out
    assert f"{path}:2: expected 8 tab-separated fields, got 3" in err and "Traceback" not in out + err
    assert [a["news_id"] for a in _read(topics, "news", 3)] == [r.split("\t")[0] for r in rows]
    [letter] = _read(topics, "dlq", 1)
    assert letter["topic"] == topics["news"] and letter["raw"] == "D9999\tonly\tthree"


def test_produce_valid_file_exits_zero(topics, tmp_path, capsys):
    path = tmp_path / "ok.jsonl"
    path.write_text(_line() + "\n")
    assert main(["produce", "events", str(path)]) == 0
    assert "sent 1 events records, dead-lettered 0, skipped 0" in capsys.readouterr().out
    assert _read(topics, "events", 1)[0]["event_id"] == "e1"


def test_dlq_prints_the_latest_dead_letters(topics, tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text("one\ntwo\nthree\nline\n")
    main(["produce", "events", str(path)])
    assert len(_read(topics, "dlq", 4)) == 4  # every one has arrived
    capsys.readouterr()

    assert main(["dlq", "--last", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"{topics['events']}[-1]@-1 ") and f"{path}:3: " in lines[0] and "raw: three" in lines[0]
    assert f"{path}:4: " in lines[1] and lines[1].endswith("raw: line")

    assert main(["dlq", "--json"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["raw"] for r in records] == ["one", "two", "three", "line"]
    assert [r["dlq_offset"] for r in records] == [0, 1, 2, 3] and records[0]["error"].startswith(f"{path}:1: ")


def test_missing_file_is_one_line_with_the_input_exit_code(topics, tmp_path, capsys):
    assert main(["produce", "events", str(tmp_path / "nope.jsonl")]) == EXIT_INPUT
    err = capsys.readouterr().err
    assert err.strip() == f"newsrec: no such file: {tmp_path / 'nope.jsonl'} (give the path of a JSON-lines events file)"


@pytest.mark.parametrize("argv", [["produce", "events", "EVENTS"], ["topics"], ["dlq"], ["worker"]])
def test_unreachable_broker_is_reported_once_and_quickly(argv, tmp_path):
    bootstrap = f"127.0.0.1:{free_port()}"  # nothing listens there
    events = tmp_path / "events.jsonl"
    events.write_text(_line() + "\n")
    env = os.environ | {"NEWSREC_KAFKA_BOOTSTRAP": bootstrap, "NEWSREC_STATE_DIR": str(tmp_path)}
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "commands.cli", *[str(events) if a == "EVENTS" else a for a in argv]],
                            check=False, cwd=ROOT, env=env, capture_output=True, text=True)
    elapsed = time.monotonic() - started
    assert result.returncode == EXIT_SERVICE, result.stderr
    assert result.stderr.strip() == (f"newsrec: no broker at {bootstrap}: start one with `newsrec infra up` "
                                     "or set NEWSREC_KAFKA_BOOTSTRAP")
    assert result.stdout == "" and elapsed < 10, elapsed


def test_unreachable_search_server_is_one_line(topics, monkeypatch, capsys):
    url = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("NEWSREC_ES_URL", url)
    monkeypatch.setenv("NEWSREC_ES_MAX_RETRIES", "0")
    assert main(["index", "--exit-when-idle", "1"]) == EXIT_SERVICE
    err = capsys.readouterr().err
    assert f"newsrec: no search server at {url} (" in err and "start one with `newsrec infra up --search`" in err
    assert "Traceback" not in err


def test_verbose_shows_the_traceback(tmp_path, capsys):
    assert main(["--verbose", "produce", "events", str(tmp_path / "nope.jsonl")]) == EXIT_INPUT
    assert "Traceback" in capsys.readouterr().err


def test_worker_help_lists_every_setting_with_its_default(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["worker", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for name in WorkerSettings.model_fields:
        assert f"NEWSREC_{name.upper()}" in out
    assert "default: 127.0.0.1:19092" in out.split("NEWSREC_KAFKA_BOOTSTRAP", 1)[1].splitlines()[0]


# The commands defined in commands/cli.py and dlq_cli.py (data/eval/train/distill/study live elsewhere).
CORE_COMMANDS = {"newsrec", "newsrec worker", "newsrec index", "newsrec produce", "newsrec topics", "newsrec dlq",
                 "newsrec infra", "newsrec models bootstrap", "newsrec models publish", "newsrec demo",
                 "newsrec bench pipeline", "newsrec bench faults"}


def test_every_option_of_the_core_commands_has_help_text():
    seen, missing = set(), []

    def walk(parser: argparse.ArgumentParser) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for child in action.choices.values():
                    walk(child)
            elif parser.prog in CORE_COMMANDS:
                seen.add(parser.prog)
                if not action.help:
                    missing.append(f"{parser.prog} {'/'.join(action.option_strings) or action.dest}")

    walk(build_parser())
    assert seen == CORE_COMMANDS and missing == []


def test_rate_limit_filter_passes_a_burst_then_counts_the_rest(caplog):
    logger = logging.getLogger("test.kafka_log")
    now = [0.0]
    logger.addFilter(limit := RateLimitFilter(burst=3, period_s=60, clock=lambda: now[0]))
    with caplog.at_level(logging.INFO, logger="test.kafka_log"):
        for i in range(10):
            logger.error("Connect to 127.0.0.1:1 failed: refused %d", i)
    assert [r.getMessage() for r in caplog.records] == [f"Connect to 127.0.0.1:1 failed: refused {i}" for i in range(3)]
    assert limit.suppressed == 7
    now[0] = 60.0  # the next period
    with caplog.at_level(logging.INFO, logger="test.kafka_log"):
        logger.error("again")
    assert caplog.records[-1].getMessage() == "again (7 similar librdkafka lines suppressed)"
