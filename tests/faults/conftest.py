"""Fault tests: each scenario reports its counts (events sent, in state, published,
duplicates, dead letters) on stdout, in the test's user properties (junit XML), in the
terminal summary, and as JSON under ``$NEWSREC_FAULT_REPORT_DIR`` when that is set."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.streaming import FaultCounts

REPORT_DIR_ENV = "NEWSREC_FAULT_REPORT_DIR"


@pytest.fixture
def fault_report(request: pytest.FixtureRequest) -> Callable[[FaultCounts], None]:
    def report(counts: FaultCounts) -> None:
        print(counts.line())
        request.node.user_properties.append(("fault_counts", counts.to_dict()))
        if report_dir := os.environ.get(REPORT_DIR_ENV):
            path = Path(report_dir)
            path.mkdir(parents=True, exist_ok=True)
            (path / f"{counts.scenario}.json").write_text(json.dumps(counts.to_dict(), indent=2) + "\n")

    return report


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    # The lines survive output capture, so a plain `pytest -q` shows them too.
    lines = [FaultCounts(**value).line()
             for reports in terminalreporter.stats.values() for report in reports
             for name, value in getattr(report, "user_properties", ()) if name == "fault_counts"
             and getattr(report, "when", "call") == "call"]
    if lines:
        terminalreporter.section("fault scenario counts")
        for line in lines:
            terminalreporter.write_line(line)
