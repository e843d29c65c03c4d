"""GET /explain/{user_id}: the page that explains a user's feed (streams/explain.py).

The renderer in process first (every section, escaping, a cold user), then the page in a
real headless browser (Debian's chromium): a rendered file, and the page served by a real
worker on the real local broker for a user with an injected ``<script>`` in a signal.
Chromium missing or not starting fails these tests (setup.sh installs it), never skips them.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path

import pytest

from streams.explain import CONTENT_SECURITY_POLICY, age_text, explain_page, found_by
from tests.streaming import CORPUS, TEXTS, poll_json, wait_until

EVIL = """<script>document.title='pwned'</script><img src=x onerror="document.title='pwned'">"""
NOW = datetime(2026, 11, 1, 10, 0, tzinfo=UTC)


def window(*texts: str, pending: str | None = None) -> dict:
    signals = [{"event_id": f"e{n}", "domain": "search", "text": t, "ts": (NOW - timedelta(minutes=n)).isoformat(),
                "news_id": None} for n, t in enumerate(texts)]
    return {"signals": signals, "clicked": [], "pending_trigger": pending, "pending_partition": 0 if pending else None}


def record(**kw: object) -> dict:
    base = {"schema_version": 1, "user_id": "u1", "generated_at": (NOW - timedelta(seconds=30)).isoformat(),
            "model_version": "tiny-7", "queries": ["ev charging network", "battery <recycling>"],
            "items": [{"news_id": "N1", "title": "Voltra cuts prices & more", "score": 0.0328,
                       "query": "ev charging network", "channels": ["model", "dense"]},
                      {"news_id": "N2", "title": "Grid news", "score": 0.02, "query": "electric car battery",
                       "channels": ["signals"]},
                      {"news_id": "N3", "title": "Hot story", "score": 0.01, "query": "trending",
                       "channels": ["trending"]}],
            "trigger_event_id": "e0", "latency_ms": 41.7, "stale": False, "degraded": [], "pending_trigger": None}
    return base | kw


class Dom(HTMLParser):
    """Tags, text and the title of an HTML document (as a browser or the page wrote it)."""

    def __init__(self, html: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[str] = []
        self.attrs: list[tuple[str, str | None]] = []
        self.texts: list[str] = []
        self.title = ""
        self._in_title = False
        self.feed(html)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.attrs += attrs
        self._in_title = tag == "title"

    def handle_endtag(self, tag: str) -> None:
        self._in_title = False

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title += data
        self.texts.append(data)

    @property
    def text(self) -> str:
        return "".join(self.texts)


def assert_nothing_injected(dom: Dom) -> None:
    assert "script" not in dom.tags and "img" not in dom.tags, dom.tags
    assert not any(name.startswith("on") for name, _ in dom.attrs), dom.attrs
    assert dom.title != "pwned"  # what the injected script would set


# -- the renderer ----------------------------------------------------------------------------


def test_every_section_is_present_with_what_found_each_item():
    page = explain_page("u1", window("electric car battery", "nba playoffs"), record(), now=NOW)
    dom = Dom(page)
    for section in ("freshness", "signals", "queries", "items"):
        assert f'<section id="{section}">' in page
    text = dom.text
    assert "tiny-7" in text and record()["generated_at"] in text and "30 s ago" in text and "up to date" in text
    assert "no: every channel answered" in text
    assert "electric car battery" in text and "nba playoffs" in text and "1 min ago" in text
    assert "ev charging network" in text and "battery <recycling>" in text  # queries, escaped in the source
    assert "battery &lt;recycling&gt;" in page
    assert "Voltra cuts prices & more" in text and "N1" in text and "0.0328" in text
    assert re.findall(r'<span class="tag">([^<]*)</span>', page) == ["model", "dense", "signals", "trending"]
    assert re.findall(r'<span class="found-by">([^<]*)</span>', page) == ["model query", "signal", "trending"]
    assert page.count('<tr class="item">') == 3
    assert "<script" not in page.lower() and "http" not in page  # static: no script, nothing loaded from outside


def test_all_user_text_is_escaped():
    evil_rec = record(user_id=EVIL, model_version=EVIL, queries=[EVIL], trigger_event_id=EVIL,
                      items=[{"news_id": EVIL, "title": EVIL, "score": 1.0, "query": EVIL, "channels": [EVIL]}],
                      degraded=[EVIL], stale=True, pending_trigger=EVIL, generated_at=EVIL)
    evil_window = window(EVIL, pending=EVIL)
    evil_window["signals"][0] |= {"domain": EVIL, "event_id": EVIL, "news_id": EVIL}
    page = explain_page(EVIL, evil_window, evil_rec, now=NOW)
    dom = Dom(page)
    assert_nothing_injected(dom)
    assert "<script>" not in page and "<img" not in page and 'onerror="' not in page
    assert dom.text.count(EVIL) >= 10  # shown as text, every time
    assert dom.title == f"newsrec: the feed of {EVIL}"


def test_a_cold_user_and_a_user_without_a_recommendation():
    page = explain_page("nobody", None, None, now=NOW)
    dom = Dom(page)
    assert "No signals in the window" in dom.text and "No recommendation published yet" in dom.text
    assert "none published yet" in dom.text
    for section in ("freshness", "signals", "queries", "items"):
        assert f'<section id="{section}">' in page
    # Signals but nothing published yet: the pending refresh is shown.
    page = explain_page("u1", window("stock market", pending="e0"), None, now=NOW)
    assert "stock market" in Dom(page).text and "Pending refresh" in page and "e0" in page


def test_stale_and_degraded_records_say_so():
    rec = record(stale=True, pending_trigger="e9", degraded=["model"], queries=[],
                 items=[{"news_id": "N2", "title": "Grid news", "score": 0.02, "query": "electric car battery",
                         "channels": ["signals"]}])
    text = Dom(explain_page("u1", window("electric car battery"), rec, now=NOW)).text
    assert "stale" in text and "e9" in text and "not reflected yet" in text
    assert "model failed or timed out" in text and "without model" in text
    old = record(items=[{"news_id": "N1", "title": "Old", "score": 0.1, "query": "q"}])  # no channels field
    assert "Old" in Dom(explain_page("u1", None, old, now=NOW)).text


def test_age_and_found_by():
    assert age_text(NOW - timedelta(seconds=5), NOW) == "5 s ago"
    assert age_text(NOW - timedelta(hours=3, minutes=2), NOW) == "3 h ago"
    assert age_text(NOW - timedelta(days=2), NOW) == "2 d ago"
    assert age_text(NOW + timedelta(seconds=5), NOW) == "in the future" and age_text(None, NOW) == "unknown"
    assert found_by({"query": "a b", "channels": ["signals"]}, [], {"a b"}) == "signal"
    assert found_by({"query": "q", "channels": ["model"]}, ["q"], set()) == "model query"
    assert found_by({"query": "trending", "channels": ["trending"]}, [], set()) == "trending"


# -- a real browser ----------------------------------------------------------------------------


def chromium(url: str, tmp_path: Path, *extra: str) -> str:
    """``chromium --headless --dump-dom URL``: the DOM after the page ran (scripts included).
    Fails (never skips) when chromium is missing or does not start."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    assert exe, "chromium is not installed: run setup.sh as root (apt-get install chromium)"
    profile = tmp_path / "chromium-profile"
    cmd = [exe, "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run", "--disable-extensions",
           "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--virtual-time-budget=3000", *extra,
           "--dump-dom", url]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0 and "<html" in done.stdout, (
        f"chromium failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done.stdout


def test_the_browser_runs_scripts_but_not_the_injected_ones(tmp_path: Path):
    # Control: this chromium does run a page's script when one gets through, so the check below means something.
    control = tmp_path / "control.html"
    control.write_text(f"<!DOCTYPE html><html><head><title>ok</title></head><body>{EVIL}</body></html>")
    assert Dom(chromium(control.as_uri(), tmp_path)).title == "pwned"

    page = tmp_path / "page.html"  # a file: no CSP header, so only the escaping stands in the way
    page.write_text(explain_page("u1", window(EVIL, "electric car battery"), record(queries=[EVIL]), now=NOW),
                    encoding="utf-8")
    dom = Dom(chromium(page.as_uri(), tmp_path))
    assert_nothing_injected(dom)
    assert dom.title == "newsrec: the feed of u1" and dom.text.count(EVIL) == 2
    assert "Voltra cuts prices & more" in dom.text


@pytest.mark.integration
def test_explain_page_on_a_real_worker_in_chromium(stack, tmp_path: Path):
    worker = stack.start_worker()
    url, user = worker.url, "u-explain"
    stack.send(user, 0, "electric car battery range")
    stack.send(user, 1, "nba playoff injury report")
    last = stack.send(user, 2, EVIL)
    stack.flush()

    def published() -> dict | None:
        rec = get_page_json(f"{url}/recommendations/{user}")
        return rec if rec and rec["trigger_event_id"] == last["event_id"] and not rec["stale"] else None

    wait_until(published, 120, f"{user}'s recommendation for {last['event_id']}")
    rec = published()
    assert rec and rec["items"], rec

    with urllib.request.urlopen(f"{url}/explain/{user}", timeout=30) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/html; charset=utf-8"
        assert resp.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
        assert "default-src 'none'" in resp.headers["Content-Security-Policy"]
        assert "script-src" not in resp.headers["Content-Security-Policy"]
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
        source = resp.read().decode("utf-8")
    assert "<script>" not in source and "&lt;script&gt;" in source

    shot = tmp_path / "explain.png"
    dom = Dom(chromium(f"{url}/explain/{user}", tmp_path))
    assert_nothing_injected(dom)
    assert dom.title == f"newsrec: the feed of {user}"
    text = dom.text
    for signal in ("electric car battery range", "nba playoff injury report", EVIL):
        assert signal in text, signal
    assert rec["model_version"] in text and rec["generated_at"] in text and "up to date" in text
    for query in rec["queries"]:
        assert query in text, query
    if not rec["queries"]:
        assert "no queries" in text.lower() or "wrote no queries" in text
    for item in rec["items"]:
        assert item["news_id"] in text and " ".join(item["title"].split()) in " ".join(text.split()), item
        assert all(channel in dom.texts for channel in item["channels"]), item
    # The screenshot: the page renders as a whole in the browser.
    done = subprocess.run([shutil.which("chromium") or "chromium", "--headless", "--disable-gpu", "--no-sandbox",
                           f"--user-data-dir={tmp_path / 'chromium-shot'}", f"--screenshot={shot}",
                           "--window-size=1200,1600", f"{url}/explain/{user}"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0 and shot.stat().st_size > 10_000, done.stderr[-2000:]

    # An unknown user: a 404 page, with the same headers.
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"{url}/explain/u-nobody", timeout=30)
    assert info.value.code == 404 and info.value.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
    assert "No signals in the window" in info.value.read().decode("utf-8")


def fetch_page(address: str) -> tuple[int, dict[str, str], str]:
    try:
        with urllib.request.urlopen(address, timeout=30) as resp:
            return resp.status, dict(resp.headers), resp.read().decode("utf-8")
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read().decode("utf-8", "replace")


@pytest.mark.integration
def test_explain_page_on_either_worker_is_the_owners_with_the_same_headers(stack):
    a, b = (stack.start_worker(wait=False) for _ in range(2))
    for w in (a, b):
        w.wait_ready(documents=len(CORPUS), timeout=120)
    # 12 fixed users spread over every partition: each worker owns some and forwards the others.
    users = {f"explain-{n}": f"{TEXTS[n % len(TEXTS)]} {n}" for n in range(12)}
    for user, text in users.items():
        stack.send(user, 0, text)
    stack.flush()

    def assigned(w) -> int:
        answer = poll_json(f"{w.url}/health")
        return int(answer.get("assigned_partitions", 0)) if isinstance(answer, dict) else 0

    def every_page_on_both() -> bool:
        if not (assigned(a) and assigned(b)):
            return False
        for user, text in users.items():
            for w in (a, b):
                status, headers, page = fetch_page(f"{w.url}/explain/{user}")
                # A worker answering for a user it does not own, without forwarding, would show no signals.
                if status != 200 or text not in page or "No recommendation published yet" in page:
                    return False
                assert headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY, (w.url, user, headers)
                assert headers["Content-Type"] == "text/html; charset=utf-8", (w.url, user, headers)
        return True

    wait_until(every_page_on_both, 180, "/explain on both workers to show every user's window and feed")


def get_page_json(address: str) -> dict | None:
    from tests.streaming import poll_json

    answer = poll_json(address)
    return answer if isinstance(answer, dict) else None
