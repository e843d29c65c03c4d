"""A seeded generative simulator of cross-domain users over any news corpus.

This is the ground truth offline evaluation is judged on, so here is the whole story.

Corpus → interests
    An *interest* is a cluster of articles: a subcategory ``(category, subcategory)`` or a
    subcategory narrowed to one entity ``(category, subcategory, entity label)`` (e.g.
    ``sports/football_nfl/New England Patriots``). A cluster is eligible when it holds at
    least ``min_interest_articles`` articles (an entity cluster also fewer than its whole
    subcategory). Each cluster has a vocabulary: its top words by TF-IDF over titles
    (counted twice) and abstracts, and its most frequent entities. Within an interest,
    articles are equally likely: a broad interest (``news/newsus``) is a broad taste.

Per user (user *i* draws from its own random stream, seeded by ``(seed, i)``, so a user
does not change when others are added; which users are cold is drawn once, up front)
    1. *Interests*: k ~ U(interests_per_user) distinct eligible clusters, drawn with
       probability ∝ sqrt(size), entity clusters taking ``entity_interest_share`` of the mass.
       Weights w ~ Dirichlet(alpha) (as normalised Gamma(alpha) draws g).
    2. *Drift*: with probability ``drift`` each interest's Gamma draw g is drawn afresh;
       the renormalised w' are the interests' weights *after* the cutoff.
    3. *Targets* (future clicks, after the cutoff): n ~ U(future_clicks) articles, each with
       probability ``target_noise`` an article outside the user's interest subcategories,
       otherwise an interest drawn by w' and an article of it drawn uniformly. Targets are
       distinct, and an interest keeps at least one article for the history, so every user
       gets ≥ 1 target (fewer than n only when the interests run out of articles).
    4. *History* (before the cutoff): warm users get n ~ U(events_per_user) signals, cold users
       (exactly ``round(users * cold_share)`` of them, ``cold: true``) 1-3. Signals come in
       sessions of 1-4 events, each session about one interest (drawn by w) and one *story*
       article of it; an event is about the story (60%) or another article of the interest.
       History articles are never targets: the future is *new* articles on the same
       interests, so nothing the user saw, searched for or clicked is a target.
       Each signal is, with probability ``noise``, about an article outside the user's
       interest subcategories instead (same generator, different topic).
    5. *Domains* by ``domain_mix``, ordered within a session search → browse → news_click → app:
       - ``search``: 45% an entity surface form (the interest's entity, else one of the
         article's, likelier when the topic mentions it often; MIND ``SurfaceForms`` when
         given, else the label without its disambiguation), sometimes with a category
         modifier ("score", "forecast", "recipe"...); 35% 2-4 salient (high-IDF) title words
         of the article in title order; else a topic word of the interest, mostly with a
         modifier ("ufc results"). 70% lower-cased; one typo with probability ``typo_rate``.
       - ``browse``: a page title *related* to the interest, never an article title, from
         category templates ("<entity> schedule and tickets", "<entity> - Wikipedia",
         "<keyphrase> guide"...) filled with the interest's entities and vocabulary.
       - ``app``: app activity ("opened Sports app", "score alert set: <entity>",
         "<keyphrase> alert set", "added <entity> to watchlist"...).
       - ``news_click``: the article's title, ``news_id`` and url (an article is clicked at
         most once; with no article left to click the signal becomes a search).
       No search/browse/app text is exactly an article title (checked, case-insensitively).
    6. *Time*: sessions start uniformly in ``[start, start + window_days)``, events 20 s to
       10 min apart, all before the end of the window (``cutoff`` defaults to it and may be
       later, leaving a gap). Event ids ``<user>-e<nnnn>`` follow time order.

What a model can learn: with the defaults on the MIND sample, about half of a warm
user's search/browse signals share a content word with that interest's future clicks
(~70% for entity interests, ~20% for broad subcategory ones, ~3% with another user's),
so exact-article recall has a ceiling well below 1 while subcategory coverage does not.

``simulate`` is pure: same news, surface forms and config → identical output (no set
iteration order or clock involved). ``meta["truth"]`` keeps per user the interests, their
weights before/after drift, each event's interest (-1 = noise) and each target's interest
(-1 = noise): never show it to a model.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from evaluation.dataset import Target
from streams.contracts import MAX_TEXT_CHARS, NewsArticle, UserEvent

logger = logging.getLogger(__name__)

DOMAINS = ("search", "browse", "app", "news_click")
SESSION_ORDER = {"search": 0, "browse": 1, "news_click": 2, "app": 3}
GENERATOR = "newsrec.evaluation.simulate"
GENERATOR_VERSION = 1


class SimulationError(ValueError):
    """A bad simulation config or a corpus the simulator cannot use; the message says how to fix it."""


# ---------------------------------------------------------------------------- config


@dataclass(frozen=True)
class SimulationConfig:
    users: int = 100
    interests_per_user: tuple[int, int] = (1, 4)
    cold_share: float = 0.2  # share of users with only 1-3 signals
    noise: float = 0.15  # share of signals unrelated to the user's interests
    events_per_user: tuple[int, int] = (5, 30)  # warm users
    future_clicks: tuple[int, int] = (1, 5)
    drift: float = 0.2  # probability an interest's weight is redrawn for the future
    domain_mix: tuple[tuple[str, float], ...] = (("search", 0.35), ("browse", 0.25), ("app", 0.1),
                                                 ("news_click", 0.3))
    typo_rate: float = 0.05  # probability a search query has one typo
    seed: int = 0
    start: datetime = datetime(2019, 11, 1, tzinfo=UTC)
    window_days: float = 14.0  # history lies in [start, start + window_days)
    cutoff: datetime | None = None  # None: the end of the history window
    target_noise: float = 0.05  # share of future clicks outside the user's interests
    entity_interest_share: float = 0.5  # share of interest draws that are entity clusters
    min_interest_articles: int = 3
    dirichlet_alpha: float = 1.0  # < 1: one dominant interest; > 1: even interests

    def __post_init__(self) -> None:
        # Normalise friendly inputs (lists, a mapping for the mix) so equal configs compare equal.
        mix = self.domain_mix
        if isinstance(mix, Mapping):
            mix = tuple(mix.items())
        try:
            mix = tuple((str(d), float(w)) for d, w in mix)
        except (TypeError, ValueError):
            raise SimulationError("domain_mix must map domains to weights, e.g. "
                                  "{'search': 0.4, 'browse': 0.3, 'app': 0.1, 'news_click': 0.2}") from None
        object.__setattr__(self, "domain_mix", tuple(sorted(mix, key=lambda dw: DOMAINS.index(dw[0])
                                                            if dw[0] in DOMAINS else 99)))
        for name in ("interests_per_user", "events_per_user", "future_clicks"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        problems = self._problems()
        if problems:
            raise SimulationError("bad simulation config: " + "; ".join(problems))
        if self.cutoff is None:
            object.__setattr__(self, "cutoff", self.history_end)

    @property
    def history_end(self) -> datetime:
        return self.start + timedelta(days=self.window_days)

    def _problems(self) -> list[str]:
        out: list[str] = []

        def integer(name: str, lo: int, hi: int) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                out.append(f"{name} must be a whole number from {lo} to {hi}, got {v!r}")

        def share(name: str, hi: float = 1.0) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not 0.0 <= v <= hi:
                out.append(f"{name} must be a number from 0 to {hi:g} (a probability), got {v!r}")

        def span(name: str, lo: int, hi: int) -> None:
            v = getattr(self, name)
            ok = (isinstance(v, tuple) and len(v) == 2
                  and all(isinstance(x, int) and not isinstance(x, bool) for x in v))
            if not ok or not lo <= v[0] <= v[1] <= hi:
                out.append(f"{name} must be (min, max) whole numbers with {lo} <= min <= max <= {hi}, "
                           f"e.g. ({lo}, {max(lo, min(hi, 5))}), got {v!r}")

        integer("users", 1, 10_000_000)
        integer("seed", 0, 2**63 - 1)
        integer("min_interest_articles", 2, 1_000)
        span("interests_per_user", 1, 50)
        span("events_per_user", 1, 10_000)
        span("future_clicks", 1, 1_000)
        for name in ("cold_share", "noise", "drift", "typo_rate", "target_noise", "entity_interest_share"):
            share(name)
        if not isinstance(self.dirichlet_alpha, int | float) or not 0.01 <= self.dirichlet_alpha <= 100:
            out.append(f"dirichlet_alpha must be a number from 0.01 to 100 (1 = uniform over weightings), "
                       f"got {self.dirichlet_alpha!r}")
        unknown = [d for d, _ in self.domain_mix if d not in DOMAINS]
        if unknown:
            out.append(f"domain_mix has unknown domains {unknown}; use {', '.join(DOMAINS)}")
        elif len({d for d, _ in self.domain_mix}) != len(self.domain_mix):
            out.append("domain_mix names a domain twice")
        weights = [w for _, w in self.domain_mix]
        if any(not math.isfinite(w) or w < 0 for w in weights) or not sum(weights) > 0:
            out.append(f"domain_mix weights must be >= 0 and not all 0, got {dict(self.domain_mix)}")
        if not isinstance(self.start, datetime) or self.start.tzinfo is None:
            out.append(f"start must be a timezone-aware datetime (e.g. 2019-11-01T00:00:00+00:00), got {self.start!r}")
        if isinstance(self.window_days, bool) or not isinstance(self.window_days, int | float) \
                or not 0.01 <= self.window_days <= 3650:
            out.append(f"window_days must be a number of days from 0.01 to 3650, got {self.window_days!r}")
        elif self.cutoff is not None and not out:
            if not isinstance(self.cutoff, datetime) or self.cutoff.tzinfo is None:
                out.append(f"cutoff must be a timezone-aware datetime or None, got {self.cutoff!r}")
            elif self.cutoff < self.history_end:
                out.append(f"cutoff {self.cutoff.isoformat()} is before the end of the history window "
                           f"{self.history_end.isoformat()}; move it later, shorten window_days or leave it unset")
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (datetimes as ISO strings, the mix as a mapping); ``from_dict`` reverses it."""
        out = asdict(self)
        out["domain_mix"] = dict(self.domain_mix)
        for name in ("interests_per_user", "events_per_user", "future_clicks"):
            out[name] = list(out[name])
        out["start"] = self.start.isoformat()
        out["cutoff"] = self.cutoff.isoformat() if self.cutoff else None
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SimulationConfig:
        known = {f.name for f in fields(cls)}
        extra = sorted(set(data) - known)
        if extra:
            raise SimulationError(f"unknown simulation config keys {extra}; known: {sorted(known)}")
        kw = dict(data)
        for name in ("start", "cutoff"):
            if isinstance(kw.get(name), str):
                kw[name] = datetime.fromisoformat(kw[name])
        return cls(**kw)


# ---------------------------------------------------------------------------- text tools

_WORD = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9'’&.\-]*[A-Za-z0-9])?")
STOPWORDS = frozenset("""
a about above after again against all also am an and any are aren't as at be because been before being
below between both but by can can't cannot could couldn't did didn't do does doesn't doing don't down during
each few for from further had hadn't has hasn't have haven't having he he'd he'll he's her here here's hers
herself him himself his how how's i i'd i'll i'm i've if in into is isn't it it's its itself let's me more most
mustn't my myself no nor not of off on once only or other ought our ours ourselves out over own same shan't she
she'd she'll she's should shouldn't so some such than that that's the their theirs them themselves then there
there's these they they'd they'll they're they've this those through to too under until up very was wasn't we
we'd we'll we're we've were weren't what what's when when's where where's which while who who's whom why why's
with won't would wouldn't you you'd you'll you're you've your yours yourself yourselves
says said say new news one two three first last just like get gets got make makes made may might will year
years day days week weeks time times back now still even many much way ways could via amid per
photos photo video videos watch see look here's things thing know need want best top report reports
according people man woman men women former next week's today tonight yesterday
""".split())  # noqa: SIM905 (a word list reads better as text)
_QWERTY = ["qwertyuiop", "asdfghjkl", "zxcvbnm"]
_NEIGHBOURS: dict[str, str] = {}
for _r, _row in enumerate(_QWERTY):
    for _c, _ch in enumerate(_row):
        _NEIGHBOURS[_ch] = "".join(_QWERTY[rr][cc] for rr in (_r - 1, _r, _r + 1) for cc in (_c - 1, _c, _c + 1)
                                   if 0 <= rr < 3 and 0 <= cc < len(_QWERTY[rr]) and (rr, cc) != (_r, _c))


def tokens(text: str) -> list[str]:
    """Words of a text as written; a trailing possessive 's is dropped."""
    return [re.sub(r"['’]s$", "", w) for w in _WORD.findall(text)]


def _content(word: str) -> bool:
    cf = word.casefold()
    return cf not in STOPWORDS and not cf.replace(".", "").replace(",", "").isdigit() and (
        len(cf) >= 3 or (len(word) >= 2 and word.isupper()))


def add_typo(text: str, rng: np.random.Generator) -> str:
    """One keyboard slip in a word of 4+ letters: swap, drop, double or hit a neighbouring key."""
    words = text.split(" ")
    candidates = [i for i, w in enumerate(words) if len(w) >= 4 and w.isalpha()]
    if not candidates:
        return text
    i = candidates[int(rng.integers(len(candidates)))]
    w = words[i]
    pos = int(rng.integers(1, len(w) - 1))  # keep the first letter: people rarely miss it
    op = int(rng.integers(4))
    if op == 0:
        w = w[:pos] + w[pos + 1] + w[pos] + w[pos + 2:]
    elif op == 1:
        w = w[:pos] + w[pos + 1:]
    elif op == 2:
        w = w[:pos] + w[pos] + w[pos:]
    else:
        near = _NEIGHBOURS.get(w[pos].lower(), "")
        if near:
            w = w[:pos] + near[int(rng.integers(len(near)))] + w[pos + 1:]
        else:
            w = w[:pos] + w[pos + 1:]
    words[i] = w
    return " ".join(words)


def _strip_disambiguation(label: str) -> str:
    return re.sub(r"\s*\([^)]*\)\s*$", "", label).strip() or label


# ---------------------------------------------------------------------------- templates

CATEGORY_NAMES = {
    "news": "News", "sports": "Sports", "finance": "Money", "foodanddrink": "Food & Drink",
    "lifestyle": "Lifestyle", "weather": "Weather", "video": "Video", "travel": "Travel", "health": "Health",
    "autos": "Autos", "music": "Music", "tv": "TV", "movies": "Movies", "entertainment": "Entertainment",
    "kids": "Kids", "middleeast": "Middle East", "northamerica": "North America",
}
SUBCATEGORY_NAMES = {
    "football_nfl": "NFL", "baseball_mlb": "MLB", "basketball_nba": "NBA", "icehockey_nhl": "NHL",
    "football_ncaa": "college football", "basketball_ncaa": "college basketball", "mma": "MMA",
    "newsus": "US news", "newspolitics": "politics", "newsworld": "world news", "newscrime": "crime",
    "newsscienceandtechnology": "science and technology", "weathertopstories": "weather",
    "newsopinion": "opinion", "newsoffbeat": "offbeat news", "newsgoodnews": "good news",
    "more_sports": "sports", "football_nfl_videos": "NFL videos", "soccer_epl": "Premier League",
}
_GROUP = {"sports": "sports", "news": "news", "video": "news", "finance": "finance", "weather": "weather",
          "foodanddrink": "food", "travel": "travel", "autos": "autos", "health": "health",
          "lifestyle": "lifestyle", "tv": "tv", "movies": "movies", "music": "music",
          "entertainment": "celebrity", "kids": "lifestyle"}

# {e}: an entity surface form, {p}: a keyphrase, {P}: keyphrase capitalised, {S}: subcategory, {C}: category.
BROWSE_TEMPLATES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {  # (with entity, with keyphrase)
    "general": (("{e} - Wikipedia", "Wikipedia: {e}", "{e}: latest news and updates", "Who is {e}? Everything to know"),
                ("{P} guide", "{P}: what you need to know", "{P} explained", "r/{S}: {p} discussion")),
    "sports": (("{e} schedule and tickets", "{e} roster and stats", "{e} scores, standings and highlights",
                "{e} injury report", "{e} - Wikipedia"),
               ("{P} highlights", "{S} scores and standings", "{S} power rankings", "{P} fantasy advice")),
    "news": (("{e} - Wikipedia", "{e}: timeline", "{e}: live updates", "Wikipedia: {e}"),
             ("{P}: live updates", "{P}: timeline of events", "{P} explained", "{S}: top stories on {p}")),
    "finance": (("{e} stock quote and news", "{e} earnings report", "{e} company profile"),
                ("{P} calculator", "{P} explained", "{P}: rates today", "Personal finance: {p} guide")),
    "weather": (("{e} 10-day weather forecast", "{e} radar and weather alerts", "{e} hourly forecast"),
                ("{P} forecast", "{P} safety tips", "Weather: {p} tracker")),
    "food": (("{e} menu and reviews", "{e} recipes", "{e} - Wikipedia"),
             ("{P} recipe", "Easy {p} recipe", "Best {p} near me", "How to make {p}")),
    "travel": (("Things to do in {e}", "{e} travel guide", "{e} hotels and flights"),
               ("{P} travel tips", "{P}: best places to visit", "{P} guide")),
    "autos": (("{e} review, price and specs", "{e} recall information", "{e} for sale near me"),
              ("{P} buyer's guide", "{P} reviews", "{P}: what to know before you buy")),
    "health": (("{e}: symptoms and causes", "{e} treatment options", "{e} - Wikipedia"),
               ("{P}: symptoms and causes", "{P} tips", "Is {p} healthy?")),
    "lifestyle": (("{e} photos", "{e} biography", "{e} - Wikipedia"),
                  ("{P} ideas", "{P}: tips and tricks", "{P} inspiration")),
    "tv": (("{e} cast and episodes", "Where to watch {e}", "{e} - Wikipedia"),
           ("{P} recap", "{P} episode guide", "{P}: fan theories")),
    "movies": (("{e} trailer", "{e} cast and crew", "{e} showtimes near me"),
               ("{P} review", "{P}: box office", "{P} trailer")),
    "music": (("{e} tour dates and tickets", "{e} lyrics", "{e} albums and songs"),
              ("{P} playlist", "{P} lyrics", "{P}: new releases")),
    "celebrity": (("{e} biography", "{e} net worth", "{e} - Wikipedia"),
                  ("{P}: celebrity news", "{P} photos", "{P} gossip")),
}
APP_TEMPLATES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "general": (("followed {e}", "{e} notifications turned on"),
                ("opened {C} app", "{p} alert set", "{S} notifications turned on", "saved topic: {p}")),
    "sports": (("score alert set: {e}", "fantasy lineup set: {e}", "followed {e} in Sports app"),
               ("opened Sports app: {S} scores", "{p} alert set", "opened {S} scores")),
    "news": (("breaking news alert set: {e}", "followed topic: {e}"),
             ("opened News app", "opened {S} briefing", "{p} alert set")),
    "finance": (("added {e} to watchlist", "price alert set: {e}"),
                ("opened Money app", "budget app: {p}", "{p} alert set")),
    "weather": (("weather alert set for {e}", "added {e} to weather locations"),
                ("opened Weather app", "{p} alert set")),
    "food": (("saved restaurant: {e}", "followed {e}"),
             ("saved recipe: {p}", "added to grocery list: {p}", "opened Food & Drink app")),
    "travel": (("booked hotel in {e}", "saved trip: {e}", "flight price alert: {e}"),
               ("opened Travel app", "saved trip idea: {p}")),
    "autos": (("saved search: {e}", "price alert set: {e}"), ("opened Autos app", "saved search: {p}")),
    "health": (("followed {e}",), ("logged symptom: {p}", "health reminder set: {p}", "opened Health app")),
    "lifestyle": (("followed {e}",), ("saved idea: {p}", "opened Lifestyle app")),
    "tv": (("added {e} to watchlist", "episode reminder set: {e}"), ("opened TV guide app", "{p} alert set")),
    "movies": (("added {e} to watchlist", "bought tickets: {e}"), ("opened Movies app", "{p} alert set")),
    "music": (("played {e}", "followed {e}"), ("played {p} playlist", "opened Music app")),
    "celebrity": (("followed {e}",), ("opened Entertainment app", "{p} alert set")),
}
SEARCH_MODIFIERS: dict[str, tuple[str, ...]] = {
    "general": ("news", "latest", "update"),
    "sports": ("score", "schedule", "news", "injury report", "highlights", "stats", "trade rumors"),
    "news": ("news", "latest", "update", "live", "what happened"),
    "finance": ("stock", "earnings", "news", "price"),
    "weather": ("forecast", "weather", "radar"),
    "food": ("recipe", "near me", "menu"),
    "travel": ("flights", "hotels", "things to do"),
    "autos": ("review", "price", "recall"),
    "health": ("symptoms", "treatment", "study"),
    "lifestyle": ("photos", "facts", "history"),
    "tv": ("cast", "new season", "episode"),
    "movies": ("trailer", "cast", "box office"),
    "music": ("tour", "new album", "lyrics"),
    "celebrity": ("net worth", "news", "age"),
}


def subcategory_name(category: str, subcategory: str) -> str:
    if subcategory in SUBCATEGORY_NAMES:
        return SUBCATEGORY_NAMES[subcategory]
    name = subcategory
    for prefix in (category, "news", "finance", "lifestyle", "tv", "music", "movies", "travel", "health"):
        if name.startswith(prefix) and len(name) > len(prefix):
            name = name[len(prefix):]
            break
    name = re.sub(r"[-_]+", " ", name).strip()
    return name or CATEGORY_NAMES.get(category, category) or "news"


# ---------------------------------------------------------------------------- corpus model


@dataclass
class Cluster:
    category: str
    subcategory: str
    entity: str | None
    articles: list[int]  # indices into the news list, ascending
    vocab: list[str] = field(default_factory=list)  # display forms, best first
    entities: list[str] = field(default_factory=list)  # labels, most frequent first
    entity_counts: dict[str, int] = field(default_factory=dict)  # articles mentioning each label

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.category, self.subcategory, self.entity or "")

    def describe(self) -> dict[str, Any]:
        return {"category": self.category, "subcategory": self.subcategory, "entity": self.entity,
                "articles": len(self.articles)}


class CorpusModel:
    """What the simulator needs from a corpus, computed once: clusters, IDF, salient words."""

    def __init__(self, news: Sequence[NewsArticle], surface_forms: Mapping[str, Sequence[str]] | None,
                 min_interest_articles: int) -> None:
        if not news:
            raise SimulationError("the news corpus is empty; pass a news.tsv with articles")
        ids = [a.news_id for a in news]
        if len(set(ids)) != len(ids):
            dup = next(i for i, c in Counter(ids).items() if c > 1)
            raise SimulationError(f"news_id {dup!r} appears more than once in the corpus; de-duplicate it")
        self.news = list(news)
        self.titles = {a.title.strip().casefold() for a in news}
        self.forms: dict[str, list[str]] = {}
        for label, forms in (surface_forms or {}).items():
            # Datelines shout ("NEW YORK (AP)"); nobody types that, acronyms (NFL) are fine.
            clean = [f.strip() for f in forms if f and f.strip() and not (f.isupper() and len(f.strip()) > 4)]
            if clean:
                self.forms[label] = clean
        # IDF over title + abstract words; display case from abstracts (sentence case)
        # when seen there, since MIND titles are Title Case.
        docs = [{w.casefold() for w in tokens(a.title + " " + a.abstract)} for a in news]
        df = Counter(w for d in docs for w in d)
        n = len(news)
        self.idf = {w: math.log((n + 1) / (c + 1)) + 1.0 for w, c in df.items()}
        abstract_case: dict[str, Counter[str]] = defaultdict(Counter)
        title_case: dict[str, Counter[str]] = defaultdict(Counter)
        for a in news:
            for w in tokens(a.abstract):
                abstract_case[w.casefold()][w] += 1
            for w in tokens(a.title):
                title_case[w.casefold()][w] += 1
        self.display: dict[str, str] = {}
        for w in df:
            if w in abstract_case:
                self.display[w] = abstract_case[w].most_common(1)[0][0]
            else:
                form = title_case[w].most_common(1)[0][0] if w in title_case else w
                self.display[w] = form if form.isupper() and len(form) > 1 else form.lower()
        # Salient title words per article (as written, in order, distinct), and the runs of
        # adjacent ones ("Marine Corps Marathon"): natural phrases for page titles.
        self.salient: list[list[str]] = []
        self.runs: list[list[list[str]]] = []
        for a in news:
            seen: set[str] = set()
            words: list[str] = []
            runs: list[list[str]] = [[]]
            for piece in re.split(r"[:;,|()\[\]\"“”!?]|\s[-–—]\s", a.title):
                for w in tokens(piece):
                    if _content(w):
                        runs[-1].append(w)
                        if w.casefold() not in seen:
                            seen.add(w.casefold())
                            words.append(w)
                    elif runs[-1]:
                        runs.append([])
                if runs[-1]:
                    runs.append([])
            self.salient.append(words)
            self.runs.append([r for r in runs if r])
        # Clusters: every subcategory (noise needs them all), eligible ones become interests.
        by_sub: dict[tuple[str, str], list[int]] = defaultdict(list)
        by_ent: dict[tuple[str, str, str], list[int]] = defaultdict(list)
        for i, a in enumerate(news):
            sub = (a.category or "news", a.subcategory or a.category or "news")
            by_sub[sub].append(i)
            for label in a.entities:
                by_ent[(*sub, label)].append(i)
        self.subclusters = {k: self._cluster(k[0], k[1], None, v) for k, v in sorted(by_sub.items())}
        self.sub_of = [(a.category or "news", a.subcategory or a.category or "news") for a in news]
        sub_interests = [c for c in self.subclusters.values() if len(c.articles) >= min_interest_articles]
        # An entity cluster that is the whole subcategory adds nothing over the subcategory.
        ent_interests = [self._cluster(k[0], k[1], k[2], v) for k, v in sorted(by_ent.items())
                         if min_interest_articles <= len(v) < len(by_sub[(k[0], k[1])])]
        self.interests: list[Cluster] = sub_interests + ent_interests
        if not self.interests:
            raise SimulationError(
                f"no subcategory or entity has {min_interest_articles}+ articles in this corpus of {n}; "
                "lower min_interest_articles (>= 2) or use a larger corpus")
        # sqrt(size): popular topics are more common, without drowning small ones.
        sub_w = np.array([math.sqrt(len(c.articles)) for c in sub_interests])
        ent_w = np.array([math.sqrt(len(c.articles)) for c in ent_interests])
        self._sub_w, self._ent_w = sub_w, ent_w

    def prior(self, entity_share: float) -> np.ndarray:
        parts = []
        if len(self._sub_w):
            parts.append(self._sub_w / self._sub_w.sum() * (1.0 - entity_share if len(self._ent_w) else 1.0))
        if len(self._ent_w):
            parts.append(self._ent_w / self._ent_w.sum() * (entity_share if len(self._sub_w) else 1.0))
        p = np.concatenate(parts)
        if p.sum() <= 0:  # entity_share 0 with only entity clusters (or 1 with none): fall back to uniform
            p = np.ones_like(p)
        return p / p.sum()

    def _cluster(self, category: str, subcategory: str, entity: str | None, idx: list[int]) -> Cluster:
        scores: Counter[str] = Counter()
        ents: Counter[str] = Counter()
        for i in idx:
            a = self.news[i]
            for w in tokens(a.title):
                if _content(w):
                    scores[w.casefold()] += 2.0
            for w in tokens(a.abstract):
                if _content(w):
                    scores[w.casefold()] += 1.0
            ents.update(a.entities)
        if entity:  # the focus entity's own words say nothing new next to it
            scores = Counter({w: s for w, s in scores.items() if w not in entity.casefold()})
        ranked = sorted(scores, key=lambda w: (-scores[w] * self.idf.get(w, 1.0), w))[:15]
        return Cluster(category, subcategory, entity, idx, [self.display.get(w, w) for w in ranked],
                       [e for e, _ in sorted(ents.items(), key=lambda kv: (-kv[1], kv[0]))][:10], dict(ents))

    def surface_form(self, label: str, rng: np.random.Generator) -> str:
        forms = self.forms.get(label)
        if not forms:
            base = _strip_disambiguation(label)
            forms = [base.split(",")[0].strip() or base, base] if "," in base else [base]
        # The most frequent form most often, the others sometimes.
        weights = np.array([1.0 / (r + 1) for r in range(len(forms))])
        return forms[int(rng.choice(len(forms), p=weights / weights.sum()))]


def read_entity_surface_forms(path: str | Path) -> dict[str, list[str]]:
    """Entity label → surface forms (most frequent first) from the raw MIND JSON columns 7 and 8.

    Lenient on purpose (surface forms are optional flavour): rows or cells that do not
    parse are skipped and counted in a debug log; ``read_mind_news`` is the strict reader.
    """
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    bad = 0
    with Path(path).open(encoding="utf-8", errors="replace") as fh:
        for line in fh:
            cols = line.rstrip("\r\n").split("\t")
            if len(cols) < 8:
                bad += bool(line.strip())
                continue
            for cell in cols[6:8]:
                if not cell.strip():
                    continue
                try:
                    entities = json.loads(cell)
                except json.JSONDecodeError:
                    bad += 1
                    continue
                for ent in entities if isinstance(entities, list) else []:
                    if not isinstance(ent, dict) or not isinstance(ent.get("Label"), str):
                        continue
                    for form in ent.get("SurfaceForms") or []:
                        if isinstance(form, str) and form.strip():
                            counts[ent["Label"]][form.strip()] += 1
    if bad:
        logger.debug("%s: %d rows/cells without usable entity JSON", path, bad)
    return {label: [f for f, _ in sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))]
            for label, c in sorted(counts.items())}


# ---------------------------------------------------------------------------- simulation


@dataclass
class _UserPlan:
    interests: list[Cluster]
    weights: np.ndarray
    future_weights: np.ndarray
    targets: list[int]
    target_interest: list[int]
    interest_subs: set[tuple[str, str]]


def simulate(news: Sequence[NewsArticle], config: SimulationConfig, *,
             surface_forms: Mapping[str, Sequence[str]] | None = None
             ) -> tuple[list[UserEvent], list[Target], dict[str, Any]]:
    """Simulate ``config.users`` users over ``news``; see the module docstring for the story.

    Returns events (user by user, oldest first), one :class:`Target` per user, and meta
    (config, corpus summary, counts and the per-user ``truth``). Pure given its arguments.
    """
    corpus = CorpusModel(news, surface_forms, config.min_interest_articles)
    prior = corpus.prior(config.entity_interest_share)
    n_cold = round(config.users * config.cold_share)
    cold_rng = np.random.default_rng([config.seed, 0])
    cold = {int(i) for i in cold_rng.choice(config.users, size=n_cold, replace=False)} if n_cold else set()
    width = max(5, len(str(config.users - 1)))
    events: list[UserEvent] = []
    targets: list[Target] = []
    truth: dict[str, Any] = {}
    for i in range(config.users):
        user_id = f"sim-u{i:0{width}d}"
        rng = np.random.default_rng([config.seed, 1, i])
        plan = _plan_user(corpus, prior, config, rng)
        user_events, event_interest = _history(corpus, config, plan, user_id, i in cold, rng)
        events.extend(user_events)
        targets.append(Target(user_id=user_id, news_ids=[corpus.news[t].news_id for t in plan.targets],
                              cold=i in cold))
        truth[user_id] = {
            "cold": i in cold,
            "interests": [dict(c.describe(), weight=round(float(w), 4), future_weight=round(float(fw), 4))
                          for c, w, fw in zip(plan.interests, plan.weights, plan.future_weights, strict=True)],
            "event_interest": event_interest,
            "target_interest": plan.target_interest,
        }
    by_domain = Counter(e.domain for e in events)
    meta = {
        "generator": GENERATOR,
        "generator_version": GENERATOR_VERSION,
        "config": config.to_dict(),
        "cutoff": config.cutoff.isoformat() if config.cutoff else None,
        "corpus": {"articles": len(corpus.news), "subcategories": len(corpus.subclusters),
                   "interest_clusters": len(corpus.interests),
                   "entity_clusters": sum(c.entity is not None for c in corpus.interests),
                   "surface_form_entities": len(corpus.forms)},
        "counts": {"users": config.users, "cold_users": len(cold), "events": len(events),
                   "events_by_domain": {d: by_domain.get(d, 0) for d in DOMAINS},
                   "noise_events": sum(v == -1 for t in truth.values() for v in t["event_interest"].values()),
                   "target_clicks": sum(len(t.news_ids) for t in targets)},
        "truth": truth,
    }
    return events, targets, meta


def _plan_user(corpus: CorpusModel, prior: np.ndarray, config: SimulationConfig,
               rng: np.random.Generator) -> _UserPlan:
    lo, hi = config.interests_per_user
    k = min(int(rng.integers(lo, hi + 1)), int(np.count_nonzero(prior)))
    chosen = rng.choice(len(corpus.interests), size=k, replace=False, p=prior)
    interests = [corpus.interests[int(c)] for c in chosen]
    g = rng.gamma(config.dirichlet_alpha, size=k)
    g = np.maximum(g, 1e-12)  # tiny alphas underflow to 0
    redraw = rng.random(k) < config.drift
    g_future = np.where(redraw, np.maximum(rng.gamma(config.dirichlet_alpha, size=k), 1e-12), g)
    weights, future_weights = g / g.sum(), g_future / g_future.sum()
    subs = {(c.category, c.subcategory) for c in interests}
    taken: set[int] = set()
    targets: list[int] = []
    target_interest: list[int] = []
    flo, fhi = config.future_clicks
    for _ in range(int(rng.integers(flo, fhi + 1))):
        if rng.random() < config.target_noise:
            noise = _noise_article(corpus, subs, taken, rng)
            if noise is not None:
                taken.add(noise)
                targets.append(noise)
                target_interest.append(-1)
                continue
        # Leave every interest at least one article for the history.
        left = [[a for a in c.articles if a not in taken] for c in interests]
        open_ = np.array([len(x) >= 2 for x in left])
        if not open_.any():
            break
        p = np.where(open_, future_weights, 0.0)
        j = int(rng.choice(k, p=p / p.sum()))
        a = left[j][int(rng.integers(len(left[j])))]
        taken.add(a)
        targets.append(a)
        target_interest.append(j)
    if not targets:  # cannot happen (interest pools hold >= 2 articles); a guard for future edits
        raise SimulationError("a user got no future click; raise min_interest_articles")
    return _UserPlan(interests, weights, future_weights, targets, target_interest, subs)


def _noise_article(corpus: CorpusModel, subs: set[tuple[str, str]], exclude: set[int],
                   rng: np.random.Generator) -> int | None:
    """An article outside the user's interest subcategories (rejection sampling, then a scan)."""
    n = len(corpus.news)
    for _ in range(32):
        a = int(rng.integers(n))
        if corpus.sub_of[a] not in subs and a not in exclude:
            return a
    rest = [a for a in range(n) if corpus.sub_of[a] not in subs and a not in exclude]
    return rest[int(rng.integers(len(rest)))] if rest else None


def _sessions(n: int, rng: np.random.Generator) -> list[int]:
    sizes = []
    while n > 0:
        s = min(n, int(rng.choice(4, p=[0.35, 0.3, 0.2, 0.15])) + 1)
        sizes.append(s)
        n -= s
    return sizes


def _history(corpus: CorpusModel, config: SimulationConfig, plan: _UserPlan, user_id: str, cold: bool,
             rng: np.random.Generator) -> tuple[list[UserEvent], dict[str, int]]:
    lo, hi = config.events_per_user
    n = int(rng.integers(1, 4)) if cold else int(rng.integers(lo, hi + 1))
    targets = set(plan.targets)
    pools = [[a for a in c.articles if a not in targets] for c in plan.interests]
    domains = [d for d, _ in config.domain_mix]
    mix = np.array([w for _, w in config.domain_mix])
    mix = mix / mix.sum()
    window_s = max(1, int(config.window_days * 86_400))
    clicked: set[int] = set()
    planned: list[tuple[int, str, int, int | None, Cluster | None]] = []  # (offset s, domain, interest, article, cluster)
    for size in _sessions(n, rng):
        j = int(rng.choice(len(plan.interests), p=plan.weights))
        pool = pools[j]
        story = pool[int(rng.integers(len(pool)))] if pool else None
        items = []
        for _ in range(size):
            domain = domains[int(rng.choice(len(domains), p=mix))]
            if rng.random() < config.noise:
                noise = _noise_article(corpus, plan.interest_subs, targets, rng)
                if noise is not None:  # None: the corpus has nothing outside the interests
                    items.append((domain, -1, noise, None))
                    continue
            article = story if (story is not None and rng.random() < 0.6) or not pool \
                else pool[int(rng.integers(len(pool)))]
            items.append((domain, j, article, plan.interests[j]))
        items.sort(key=lambda it: SESSION_ORDER[it[0]])
        gaps = rng.integers(20, 601, size=size)
        gaps[0] = 0
        offsets = np.cumsum(gaps)
        if offsets[-1] >= window_s:  # a tiny window: squeeze the session in
            offsets = (offsets * (window_s - 1) // max(1, int(offsets[-1]))).astype(np.int64)
        begin = int(rng.integers(0, window_s - int(offsets[-1])))
        for off, (domain, interest, article, cluster) in zip(offsets, items, strict=True):
            planned.append((begin + int(off), domain, interest, article, cluster))
    planned.sort(key=lambda p: p[0])  # stable: session order is kept on equal times
    events: list[UserEvent] = []
    event_interest: dict[str, int] = {}
    for seq, (offset, domain, interest, article, cluster) in enumerate(planned):
        if cluster is None and article is not None:  # noise: the topic of the noise article
            cluster = corpus.subclusters[corpus.sub_of[article]]
        assert cluster is not None
        news_id = url = None
        if domain == "news_click":
            article = _click_article(article, pools[interest] if interest >= 0 else [], clicked, rng)
            if article is None:
                domain = "search"  # nothing left to click on this topic
            else:
                clicked.add(article)
                a = corpus.news[article]
                text, news_id, url = a.title, a.news_id, a.url
        if domain == "search":
            text = _search_text(corpus, cluster, article, rng, config.typo_rate)
        elif domain == "browse":
            text, url = _browse_text(corpus, cluster, article, rng)
        elif domain == "app":
            text = _app_text(corpus, cluster, article, rng)
        if domain != "news_click":
            text = _not_a_title(corpus, text)
        event_id = f"{user_id}-e{seq:04d}"
        events.append(UserEvent(event_id=event_id, user_id=user_id, ts=config.start + timedelta(seconds=offset),
                                domain=domain, text=text[:MAX_TEXT_CHARS], url=url, news_id=news_id))
        event_interest[event_id] = interest
    return events, event_interest


def _click_article(article: int | None, pool: list[int], clicked: set[int], rng: np.random.Generator) -> int | None:
    if article is not None and article not in clicked:
        return article
    left = [a for a in pool if a not in clicked]
    return left[int(rng.integers(len(left)))] if left else None


def _group(cluster: Cluster) -> str:
    return _GROUP.get(cluster.category, "general")


def _entity(corpus: CorpusModel, cluster: Cluster, article: int | None, rng: np.random.Generator) -> str | None:
    """An entity label for the signal: the interest's own, else one of the article's or cluster's."""
    if cluster.entity:
        return cluster.entity
    if article is not None and corpus.news[article].entities:
        # The article's entities that the topic keeps mentioning are the ones people look up.
        ents = corpus.news[article].entities
        w = np.array([1.0 + cluster.entity_counts.get(e, 0) for e in ents])
        return ents[int(rng.choice(len(ents), p=w / w.sum()))]
    if cluster.entities:
        top = cluster.entities[:5]
        return top[int(rng.integers(len(top)))]
    return None


def _title_words(corpus: CorpusModel, article: int, k: int, rng: np.random.Generator) -> list[str]:
    """k salient title words (rarer words likelier), kept in title order."""
    words = corpus.salient[article]
    if len(words) <= k:
        return list(words)
    w = np.array([corpus.idf.get(x.casefold(), 1.0) ** 2 for x in words])
    pick = sorted(rng.choice(len(words), size=k, replace=False, p=w / w.sum()))
    return [words[int(i)] for i in pick]


def _phrase(corpus: CorpusModel, cluster: Cluster, article: int | None, rng: np.random.Generator) -> str:
    """A short natural phrase: 1-3 adjacent salient words of the article's title, else one of
    the interest's top words (several unrelated top words side by side read like nonsense)."""
    if article is not None and corpus.runs[article] and (rng.random() < 0.6 or not cluster.vocab):
        run = corpus.runs[article][int(rng.integers(len(corpus.runs[article])))]
        k = min(len(run), int(rng.integers(1, 4)))
        i = int(rng.integers(len(run) - k + 1))
        return " ".join(corpus.display.get(w.casefold(), w) for w in run[i:i + k])
    if cluster.vocab:
        top = cluster.vocab[:8]
        w = np.array([1.0 / (r + 2) for r in range(len(top))])
        return top[int(rng.choice(len(top), p=w / w.sum()))]
    return subcategory_name(cluster.category, cluster.subcategory)


def _search_text(corpus: CorpusModel, cluster: Cluster, article: int | None, rng: np.random.Generator,
                 typo_rate: float) -> str:
    label = _entity(corpus, cluster, article, rng)
    mods = SEARCH_MODIFIERS.get(_group(cluster), SEARCH_MODIFIERS["general"])
    kind = rng.random()
    if label and kind < 0.45:  # an entity, sometimes with a modifier: "patriots injury report"
        text = corpus.surface_form(label, rng)
        if rng.random() < 0.4:
            text = f"{text} {mods[int(rng.integers(len(mods)))]}"
    elif article is not None and len(corpus.salient[article]) >= 2 and kind < 0.8:  # the story's key words
        text = " ".join(_title_words(corpus, article, int(rng.integers(2, 5)), rng))
    else:  # the topic in general: "ufc results"
        text = _phrase(corpus, cluster, None, rng)
        if rng.random() < 0.6:
            text = f"{text} {mods[int(rng.integers(len(mods)))]}"
    if rng.random() < 0.7:
        text = text.lower()
    if rng.random() < typo_rate:
        text = add_typo(text, rng)
    return text


def _fill(template: str, corpus: CorpusModel, cluster: Cluster, article: int | None, label: str | None,
          rng: np.random.Generator) -> str:
    values: dict[str, str] = {"S": subcategory_name(cluster.category, cluster.subcategory),
                              "C": CATEGORY_NAMES.get(cluster.category, cluster.category.title() or "News")}
    if "{e}" in template and label:
        # Wikipedia titles keep the disambiguation ("Democratic Party (United States)").
        values["e"] = label if "Wikipedia" in template else corpus.surface_form(label, rng)
    if "{p}" in template or "{P}" in template:
        phrase = _phrase(corpus, cluster, article, rng)
        values["p"], values["P"] = phrase, phrase[:1].upper() + phrase[1:]
    return template.format(**values)


def _template(table: dict[str, tuple[tuple[str, ...], tuple[str, ...]]], corpus: CorpusModel, cluster: Cluster,
              article: int | None, rng: np.random.Generator) -> tuple[str, str | None]:
    with_entity, with_phrase = table.get(_group(cluster), table["general"])
    label = _entity(corpus, cluster, article, rng)
    # Entity templates when there is an entity (more often for entity interests).
    use_entity = label is not None and rng.random() < (0.75 if cluster.entity else 0.5)
    choices = with_entity if use_entity else with_phrase
    if rng.random() < 0.2:  # a generic page now and then
        choices = table["general"][0 if use_entity else 1]
    template = choices[int(rng.integers(len(choices)))]
    return _fill(template, corpus, cluster, article, label, rng), (label if use_entity else None)


def _browse_text(corpus: CorpusModel, cluster: Cluster, article: int | None,
                 rng: np.random.Generator) -> tuple[str, str | None]:
    text, label = _template(BROWSE_TEMPLATES, corpus, cluster, article, rng)
    url = None
    if label and "Wikipedia" in text:
        url = "https://en.wikipedia.org/wiki/" + label.replace(" ", "_")
    return text, url


def _app_text(corpus: CorpusModel, cluster: Cluster, article: int | None, rng: np.random.Generator) -> str:
    return _template(APP_TEMPLATES, corpus, cluster, article, rng)[0]


def _not_a_title(corpus: CorpusModel, text: str) -> str:
    """Signals other than clicks must not be article titles (that would leak a target verbatim)."""
    text = " ".join(text.split()) or "news"
    suffixes = iter((" - search", " news", " (page)", " info", " more"))
    while text.casefold() in corpus.titles:
        text = text + next(suffixes, " more")
    return text


def summarize(events: Iterable[UserEvent], targets: Sequence[Target]) -> dict[str, Any]:
    """The short numbers the CLI prints: users, cold users, events by domain, target clicks."""
    by_domain = Counter(e.domain for e in events)
    clicks = [len(t.news_ids) for t in targets]
    return {"users": len(targets), "cold_users": sum(t.cold for t in targets),
            "events": sum(by_domain.values()), "events_by_domain": {d: by_domain.get(d, 0) for d in DOMAINS},
            "target_clicks": sum(clicks), "targets_per_user": round(sum(clicks) / max(1, len(clicks)), 2)}
