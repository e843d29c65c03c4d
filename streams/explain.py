"""The page that explains one user's feed (``GET /explain/{user_id}`` on the worker).

A pure function of the user's row in the ``users`` table (the window) and the record
``GET /recommendations/{user_id}`` serves (the latest published recommendation, marked
``stale``/``pending_trigger``): the window's signals, the queries the model wrote, each item
with the channels and the query or signal that found it, the model version, freshness and
degradation. Read-only and static: no scripts, no forms, no outside resources.

Every value from a record is escaped (``html.escape``, quotes too): signal texts, titles,
queries and ids come from producers and the model, so they are untrusted. The worker also
sends :data:`PAGE_HEADERS` (a Content-Security-Policy that allows no script at all), so a
missed escape still could not run anything.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from html import escape
from typing import Any

from streams.window import UserState

CONTENT_TYPE = "text/html; charset=utf-8"
CONTENT_SECURITY_POLICY = ("default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'; "
                           "frame-ancestors 'none'")
PAGE_HEADERS = {
    "Content-Type": CONTENT_TYPE,
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}

_STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:1.5em auto;max-width:70em;padding:0 1em;color:#222}
h1{font-size:1.4em}h2{font-size:1.1em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;width:100%}td,th{text-align:left;vertical-align:top;padding:.25em .5em;
border-bottom:1px solid #eee}th{font-weight:600}.muted{color:#777}.tag{display:inline-block;padding:0 .4em;
margin:0 .2em .1em 0;border-radius:.3em;background:#eef;font-size:.9em}.warn{color:#a40}.ok{color:#070}
code{font-size:.95em}dt{font-weight:600;float:left;clear:left;width:11em}dd{margin:0 0 .2em 12em}
"""


def _e(value: Any) -> str:
    """Escaped text of any value (None: empty)."""
    return "" if value is None else escape(str(value), quote=True)


def _parse_ts(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value
    if not isinstance(value, str):
        return None
    try:
        ts = datetime.fromisoformat(value)
    except ValueError:
        return None
    return ts if ts.tzinfo else ts.replace(tzinfo=UTC)


def age_text(ts: datetime | None, now: datetime) -> str:
    """How long before ``now``: "42 s ago", "5 min ago", "3 h ago", "2 d ago"."""
    if ts is None:
        return "unknown"
    seconds = (now - ts).total_seconds()
    if seconds < 0:
        return "in the future"
    for unit, size in (("d", 86_400), ("h", 3_600), ("min", 60)):
        if seconds >= size:
            return f"{int(seconds // size)} {unit} ago"
    return f"{int(seconds)} s ago"


def _tags(values: Iterable[Any]) -> str:
    return "".join(f'<span class="tag">{_e(v)}</span>' for v in values) or '<span class="muted">none</span>'


def found_by(item: Mapping[str, Any], queries: list[str], signal_texts: set[str]) -> str:
    """What the item's ``query`` is: one of the model's queries, a signal's text, or trending."""
    query = item.get("query") or ""
    if query in queries:
        return "model query"
    if " ".join(str(query).split()) in signal_texts:
        return "signal"
    if query == "trending" or list(item.get("channels") or []) == ["trending"]:
        return "trending"
    if "dense" in (item.get("channels") or []):
        return "signal (dense)"
    return "query"


def _signals_section(state: UserState, now: datetime) -> str:
    if not state.signals:
        return ('<p class="muted" id="no-signals">No signals in the window: a cold user, whose feed comes '
                "from the trending channel only.</p>")
    rows = "".join(
        f"<tr><td>{_e(s.domain)}</td><td class=\"signal-text\">{_e(s.text)}</td>"
        f"<td title=\"{_e(s.ts.isoformat())}\">{_e(age_text(s.ts, now))}</td>"
        f"<td><code>{_e(s.event_id)}</code></td><td><code>{_e(s.news_id or '')}</code></td></tr>"
        for s in state.signals)
    return ("<table><thead><tr><th>Domain</th><th>Text</th><th>Age</th><th>Event</th><th>News id</th></tr>"
            f"</thead><tbody>{rows}</tbody></table>")


def _queries_section(rec: Mapping[str, Any] | None) -> str:
    if rec is None:
        return '<p class="muted">No recommendation published yet.</p>'
    queries = [q for q in rec.get("queries") or [] if isinstance(q, str)]
    if queries:
        return "<ol>" + "".join(f'<li class="query">{_e(q)}</li>' for q in queries) + "</ol>"
    if "model" in (rec.get("degraded") or []):
        return ('<p class="warn">No queries: the model failed or timed out on this refresh, so the items come '
                "from the other channels.</p>")
    return '<p class="muted">The model wrote no queries for this refresh.</p>'


def _items_section(rec: Mapping[str, Any] | None, signal_texts: set[str]) -> str:
    if rec is None:
        return '<p class="muted">No recommendation published yet.</p>'
    items = [i for i in rec.get("items") or [] if isinstance(i, Mapping)]
    if not items:
        return '<p class="muted">The last recommendation has no items.</p>'
    queries = [q for q in rec.get("queries") or [] if isinstance(q, str)]
    rows = []
    for rank, item in enumerate(items, 1):
        score = item.get("score")
        score_text = f"{score:.4f}" if isinstance(score, int | float) else _e(score)
        rows.append(
            f'<tr class="item"><td>{rank}</td><td>{_e(item.get("title"))}<br><code class="muted">'
            f'{_e(item.get("news_id"))}</code></td><td>{score_text}</td>'
            f'<td>{_tags(item.get("channels") or [])}</td>'
            f'<td><span class="found-by">{_e(found_by(item, queries, signal_texts))}</span>: '
            f'<q>{_e(item.get("query"))}</q></td></tr>')
    return ("<table><thead><tr><th>#</th><th>Item</th><th>Score</th><th>Channels</th><th>Found by</th></tr>"
            f"</thead><tbody>{''.join(rows)}</tbody></table>")


def _freshness_section(state: UserState, rec: Mapping[str, Any] | None, now: datetime) -> str:
    rows: list[tuple[str, str]] = []
    if rec is None:
        rows.append(("Recommendation", '<span class="muted">none published yet</span>'))
    else:
        generated = _parse_ts(rec.get("generated_at"))
        rows += [
            ("Model version", f'<code id="model-version">{_e(rec.get("model_version"))}</code>'),
            ("Generated at", (f'<span id="generated-at">{_e(rec.get("generated_at"))}</span> '
                              f'({_e(age_text(generated, now))})')),
            ("Triggered by", f'<code>{_e(rec.get("trigger_event_id"))}</code>'),
            ("Latency", f'{_e(rec.get("latency_ms"))} ms'),
        ]
        if rec.get("stale"):
            pending = rec.get("pending_trigger")
            rows.append(("Freshness", '<span class="warn" id="stale">stale</span>'
                         + (f": newer event <code>{_e(pending)}</code> not reflected yet" if pending else "")))
        else:
            rows.append(("Freshness", '<span class="ok" id="fresh">up to date</span>'))
        degraded = list(rec.get("degraded") or [])
        rows.append(("Degraded", f'<span class="warn" id="degraded">without {_tags(degraded)}</span>' if degraded
                     else '<span class="ok" id="not-degraded">no: every channel answered</span>'))
    if state.pending_trigger and (rec is None or not rec.get("pending_trigger")):
        rows.append(("Pending refresh", f"<code>{_e(state.pending_trigger)}</code>"))
    return "<dl>" + "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in rows) + "</dl>"


def explain_page(user_id: str, window: Mapping[str, Any] | None, served: Mapping[str, Any] | None, *,
                 now: datetime | None = None) -> str:
    """The HTML page for ``user_id``: ``window`` is the user's row in the ``users`` table,
    ``served`` the record GET /recommendations/{user_id} answers (None: not yet)."""
    now = now or datetime.now(UTC)
    state = UserState.from_json(dict(window) if window else None)
    signal_texts = {" ".join(s.text.split()) for s in state.signals}
    user = _e(user_id)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="referrer" content="no-referrer">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>newsrec: the feed of {user}</title><style>{_STYLE}</style></head>
<body>
<h1>Why user <code id="user-id">{user}</code> sees this feed</h1>
<p class="muted">As of {_e(now.isoformat(timespec="seconds"))}. Read-only; reload for newer state.</p>
<section id="freshness"><h2>Model and freshness</h2>{_freshness_section(state, served, now)}</section>
<section id="signals"><h2>Signals in the window ({len(state.signals)})</h2>{_signals_section(state, now)}</section>
<section id="queries"><h2>Queries the model wrote</h2>{_queries_section(served)}</section>
<section id="items"><h2>Items, and what found them</h2>{_items_section(served, signal_texts)}</section>
</body></html>
"""
