"""Prompt construction and output parsing for the query-writing student model.

Pure functions only (no torch / onnxruntime) so the stream workers can build prompts and
parse outputs cheaply and tests can hammer them with property tests.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Protocol

log = logging.getLogger(__name__)

MAX_SIGNAL_CHARS = 200
CHATML_ROLES = frozenset({"system", "user", "assistant"})

# Wording tuned on SmolLM2-135M-Instruct: longer instructions ("one per distinct interest",
# "make each query specific") made it answer "I'm ready to help" or echo the activity list,
# and "- [search] ..." bullets were copied verbatim. Plain "Searched: ..." lines and a short
# ask gave usable numbered lists. Re-tune when the student model changes.
SYSTEM_PROMPT = "You write news search queries from a user's recent activity."

# How each signal domain is labelled in the prompt (unknown domains get their own name).
# Windows keep "impression" (shown, not chosen) out of prompts; the label keeps a prompt built
# from raw events from presenting an exposure as an interest.
DOMAIN_LABELS = {"search": "Searched", "browse": "Browsed", "news_click": "Read news", "app": "Used app",
                 "impression": "Was shown"}


class SignalLike(Protocol):
    """Anything carrying one user signal (read-only properties so frozen models match)."""

    @property
    def domain(self) -> str: ...  # "search" | "browse" | "news_click" | "app" | "impression"

    @property
    def text(self) -> str: ...

    @property
    def ts(self) -> datetime: ...


# --- sanitising untrusted text -------------------------------------------------------------

# ChatML / tokenizer control markers (<|im_start|>, <|endoftext|>, ...). Removed repeatedly
# because deleting one marker can splice its neighbours into a new one.
_SPECIAL_MARKER = re.compile(r"<\|[^<>|]{0,64}\|>")
_MARKER_FRAGMENT = re.compile(r"<\||\|>")
# Tag-like tokens such as <file_sep> or <repo_name> are special tokens in some vocabularies
# (and HTML noise otherwise); none of them help a news query.
_TAG_TOKEN = re.compile(r"</?[A-Za-z_][\w\-]{0,40}>")
_WHITESPACE = re.compile(r"\s+")


def _collapse_controls(text: str) -> str:
    # Newlines/tabs/zero-width/bidi controls would let user text fake new prompt lines.
    return "".join(" " if unicodedata.category(ch)[0] in "CZ" and ch != " " else ch for ch in text)


def _truncate(text: str, limit: int, ellipsis: str = "") -> str:
    if len(text) <= limit:
        return text
    cut = text[:limit]
    space = cut.rfind(" ")
    if space >= limit // 2:  # prefer a word boundary unless it throws away too much
        cut = cut[:space]
    return cut.rstrip() + ellipsis


def sanitize_text(text: object, max_chars: int = MAX_SIGNAL_CHARS) -> str:
    """Make untrusted text safe to embed in a ChatML prompt as a single line."""
    if not isinstance(text, str):
        text = "" if text is None else str(text)
    text = _collapse_controls(text)
    previous = None
    while previous != text:
        previous = text
        text = _SPECIAL_MARKER.sub(" ", text)
        text = _MARKER_FRAGMENT.sub(" ", text)
        text = _TAG_TOKEN.sub(" ", text)
    text = _WHITESPACE.sub(" ", text).strip()
    return _truncate(text, max(1, max_chars - 1), "…") if len(text) > max_chars else text


# --- prompt building -----------------------------------------------------------------------


def _as_utc(ts: datetime) -> datetime:
    # Naive timestamps are treated as UTC (that is what the producers emit).
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)


def format_age(ts: datetime, now: datetime) -> str:
    seconds = (_as_utc(now) - _as_utc(ts)).total_seconds()
    if seconds < 60:
        return "just now"  # also clock skew / future timestamps
    minutes = int(seconds // 60)
    if minutes < 60:
        return f"{minutes}m ago"
    hours = minutes // 60
    if hours < 48:
        return f"{hours}h ago"
    return f"{hours // 24}d ago"


def _domain_label(domain: object) -> str:
    key = re.sub(r"[^a-z0-9_]+", "_", str(domain).lower()).strip("_")[:20]
    return DOMAIN_LABELS.get(key) or (key.replace("_", " ").capitalize() or "Other")


def build_messages(
    signals: Sequence[SignalLike],
    *,
    now: datetime | None = None,
    max_queries: int = 5,
    max_signals: int = 20,
) -> list[dict[str, str]]:
    """System + user messages asking for a numbered list of news search queries."""
    now = now or datetime.now(UTC)
    max_queries = max(1, max_queries)
    ordered = sorted(signals, key=lambda s: _as_utc(s.ts), reverse=True)
    lines: list[str] = []
    seen: set[tuple[str, str]] = set()
    for signal in ordered:
        text = sanitize_text(signal.text)
        label = _domain_label(signal.domain)
        key = (label, text.casefold())
        if not text or key in seen:  # repeated clicks/searches add tokens, not information
            continue
        seen.add(key)
        lines.append(f"{label}: {text} ({format_age(signal.ts, now)})")
        if len(lines) >= max_signals:
            break
    activity = "\n".join(lines) if lines else "(no recent activity)"
    user = (
        "A user's recent activity:\n"  # newest first; saying so made the model echo "Newest first"
        f"{activity}\n\n"
        f"Write {max_queries} news search queries about these interests as a numbered list. No explanations."
    )
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def render_chatml(messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True) -> str:
    """Render messages in ChatML: ``<|im_start|>role\\ncontent<|im_end|>\\n`` per turn."""
    parts: list[str] = []
    for message in messages:
        role = message["role"]
        if role not in CHATML_ROLES:
            raise ValueError(f"unknown ChatML role {role!r}")
        parts.append(f"<|im_start|>{role}\n{message['content']}<|im_end|>\n")
    if add_generation_prompt:
        parts.append("<|im_start|>assistant\n")
    return "".join(parts)


def build_prompt(
    signals: Sequence[SignalLike],
    *,
    now: datetime | None = None,
    max_queries: int = 5,
    max_signals: int = 20,
) -> str:
    return render_chatml(build_messages(signals, now=now, max_queries=max_queries, max_signals=max_signals))


# --- output parsing ------------------------------------------------------------------------

_LIST_ITEM = re.compile(r"^\s*(?:\(?\d{1,3}\s*[.):\]]\s*|[-*•+–]\s+)(?P<item>.*)$")
_MARKDOWN = re.compile(r"\*\*|__|`+|^\s*#+\s*")
_EDGE_PUNCT = " \t*_.,;:!?-–—"
_QUOTES = "\"'“”‘’«»"
_QUOTE_PAIRS = (('"', '"'), ("'", "'"), ("“", "”"), ("‘", "’"), ("«", "»"))


def _strip_edges(item: str) -> str:
    previous = None
    while previous != item:
        previous = item
        item = item.strip(_EDGE_PUNCT)
        for open_, close in _QUOTE_PAIRS:
            if len(item) >= 2 and item[0] == open_ and item[-1] == close:
                item = item[1:-1]
        # A lone quote at an edge is wrapping debris; quotes inside ("AI" rules) are kept.
        if item[:1] in _QUOTES and not any(q in item[1:] for q in _QUOTES):
            item = item[1:]
        if item[-1:] in _QUOTES and not any(q in item[:-1] for q in _QUOTES):
            item = item[:-1]
    return item


# Small models often echo activity lines ("Searched: x (2h ago)"); keep just the x.
_ECHO_LABEL = re.compile(
    r"^(?:" + "|".join(re.escape(v) for v in DOMAIN_LABELS.values()) + r"|read|query|search query)\s*:\s*", re.IGNORECASE
)
_ECHO_AGE = re.compile(r"\s*\((?:just now|\d+[mhd] ago)\)\s*$|\s*\([^()]*$")  # incl. cut-off "(3h"


def _clean_item(item: str, max_chars: int) -> str:
    item = sanitize_text(item, max_chars=10_000)
    item = _strip_edges(_MARKDOWN.sub("", item))
    item = _strip_edges(_ECHO_AGE.sub("", _ECHO_LABEL.sub("", item)))
    item = _WHITESPACE.sub(" ", item)
    if len(item) > max_chars:
        item = _strip_edges(_truncate(item, max_chars))
    return item


def parse_queries(text: str, *, max_queries: int = 8, max_chars: int = 120) -> list[str]:
    """Parse the model's numbered/bulleted list into clean, unique queries. Never raises."""
    if not isinstance(text, str) or max_queries <= 0 or max_chars < 2:
        return []
    lines = [_MARKDOWN.sub("", line) for line in text.splitlines() if line.strip()]
    items = [m.group("item") for line in lines if (m := _LIST_ITEM.match(line))]
    if not items:
        # No list markup: take plain lines, minus preambles like "Here are some queries:".
        items = [line for line in lines if not line.rstrip().endswith(":")]
    out: list[str] = []
    seen: set[str] = set()
    for raw in items:
        query = _clean_item(raw, max_chars)
        key = query.casefold()
        if len(query) < 2 or key in seen:
            continue
        seen.add(key)
        out.append(query)
        if len(out) >= max_queries:
            break
    return out
