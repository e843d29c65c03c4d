"""The user simulator: reproducible, valid, and faithful to the generative story it documents."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from commands.data_cli import _cmd_behaviors, add_data_commands, main
from evaluation.dataset import Target, load_dataset, validate_dataset, write_dataset
from evaluation.simulate import (
    STOPWORDS,
    SimulationConfig,
    SimulationError,
    add_typo,
    read_entity_surface_forms,
    simulate,
    summarize,
    tokens,
)
from index.corpus import read_mind_news
from streams.contracts import NewsArticle, UserEvent

REPO = Path(__file__).resolve().parents[1]

# A small hand-made corpus: 4 subcategories, a few shared entities, no surface forms.
_TOPICS = {
    ("sports", "football_nfl"): (["Patriots", "Cowboys", "quarterback", "touchdown", "defense", "playoff"],
                                 ["New England Patriots", "Dallas Cowboys", "Tom Brady"]),
    ("sports", "golf"): (["Masters", "birdie", "Augusta", "putt", "fairway", "tour"], ["Tiger Woods", "PGA Tour"]),
    ("foodanddrink", "recipes"): (["pumpkin", "casserole", "cookies", "roast", "gravy", "pie"], ["Thanksgiving"]),
    ("finance", "markets"): (["stocks", "earnings", "Dow", "rally", "bonds", "inflation"], ["Apple Inc.", "Wall Street"]),
}


def small_corpus(per_topic: int = 8) -> list[NewsArticle]:
    rng = np.random.default_rng(0)
    out = []
    for t, ((cat, sub), (words, ents)) in enumerate(_TOPICS.items()):
        for i in range(per_topic):
            picked = [words[int(j)] for j in rng.choice(len(words), size=3, replace=False)]
            ent = ents[i % len(ents)]
            title = f"{ent.split(' (')[0]} {picked[0]} {picked[1]} and {picked[2]} story {t}{i}"
            out.append(NewsArticle(news_id=f"N{t}{i:02d}", title=title, abstract=f"More on {picked[2]} today.",
                                   category=cat, subcategory=sub, url=f"https://x/{t}{i}", entities=[ent]))
    return out


def tsv_rows(news: list[NewsArticle]) -> list[str]:
    def ents(a: NewsArticle) -> str:
        return json.dumps([{"Label": e, "SurfaceForms": [e]} for e in a.entities])
    return ["\t".join([a.news_id, a.category, a.subcategory, a.title, a.abstract, a.url or "", ents(a), "[]"])
            for a in news]


@pytest.fixture(scope="module")
def mind_news(mind_news_path: Path) -> list[NewsArticle]:
    return list(read_mind_news(mind_news_path))


@pytest.fixture(scope="module")
def mind_forms(mind_news_path: Path) -> dict[str, list[str]]:
    return read_entity_surface_forms(mind_news_path)


@pytest.fixture(scope="module")
def mind_sim(mind_news: list[NewsArticle], mind_forms: dict[str, list[str]]
             ) -> tuple[list[UserEvent], list[Target], dict[str, Any]]:
    return simulate(mind_news, SimulationConfig(users=300, seed=11, cold_share=0.25), surface_forms=mind_forms)


def per_user(events: list[UserEvent]) -> dict[str, list[UserEvent]]:
    out: dict[str, list[UserEvent]] = {}
    for e in events:
        out.setdefault(e.user_id, []).append(e)
    return out


def words(text: str) -> set[str]:
    """Content words (what a shared word should mean: not 'the', not 'news')."""
    return {w.casefold() for w in tokens(text) if len(w) >= 3 and w.casefold() not in STOPWORDS}


# ---------------------------------------------------------------- reproducibility


def write(tmp: Path, news: list[NewsArticle], rows: list[str], config: SimulationConfig,
          forms: dict[str, list[str]] | None = None) -> Path:
    events, targets, meta = simulate(news, config, surface_forms=forms)
    write_dataset(tmp, rows, events, targets, meta)
    return tmp


def test_same_seed_same_files_different_seed_different(tmp_path: Path, mind_news: list[NewsArticle],
                                                       mind_forms: dict[str, list[str]]) -> None:
    rows = tsv_rows(mind_news[:300])
    a = write(tmp_path / "a", mind_news, rows, SimulationConfig(users=40, seed=3), mind_forms)
    b = write(tmp_path / "b", mind_news, rows, SimulationConfig(users=40, seed=3), mind_forms)
    c = write(tmp_path / "c", mind_news, rows, SimulationConfig(users=40, seed=4), mind_forms)
    for name in ("events.jsonl", "targets.jsonl", "meta.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "events.jsonl").read_bytes() != (c / "events.jsonl").read_bytes()
    assert (a / "targets.jsonl").read_bytes() != (c / "targets.jsonl").read_bytes()


def test_identical_across_processes_with_different_hash_seeds(tmp_path: Path, mind_news_path: Path) -> None:
    """No output may depend on set/dict iteration order of strings (PYTHONHASHSEED)."""
    outs = []
    for hash_seed in ("1", "2"):
        out = tmp_path / f"h{hash_seed}"
        env = dict(os.environ, PYTHONHASHSEED=hash_seed)
        subprocess.run([sys.executable, "-m", "commands.data_cli", "data", "simulate", "--news", str(mind_news_path),
                        "--out", str(out), "--users", "30", "--seed", "5"], cwd=REPO, env=env, check=True,
                       capture_output=True)
        outs.append(out)
    for name in ("events.jsonl", "targets.jsonl", "meta.json"):
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name


def test_a_user_does_not_change_when_users_are_added() -> None:
    news = small_corpus()
    few = simulate(news, SimulationConfig(users=5, seed=2, cold_share=0.0))
    more = simulate(news, SimulationConfig(users=9, seed=2, cold_share=0.0))
    ids = {t.user_id for t in few[1]}
    assert few[0] == [e for e in more[0] if e.user_id in ids]
    assert few[1] == [t for t in more[1] if t.user_id in ids]


# ---------------------------------------------------------------- the generative story


def test_cold_users_share_and_signals(mind_sim: tuple[list[UserEvent], list[Target], dict[str, Any]]) -> None:
    events, targets, meta = mind_sim
    by_user = per_user(events)
    cold = [t.user_id for t in targets if t.cold]
    assert len(cold) == round(300 * 0.25)  # exact, not just within tolerance
    assert all(1 <= len(by_user[u]) <= 3 for u in cold)
    warm = [t.user_id for t in targets if not t.cold]
    assert all(5 <= len(by_user[u]) <= 30 for u in warm)
    assert all(meta["truth"][u]["cold"] for u in cold)
    assert sum(len(by_user[u]) for u in warm) / len(warm) > 10


def test_events_are_valid_contracts_in_the_window(mind_sim: tuple[list[UserEvent], list[Target], dict[str, Any]]
                                                  ) -> None:
    events, targets, meta = mind_sim
    config = SimulationConfig.from_dict(meta["config"])
    assert len({e.event_id for e in events}) == len(events)
    assert {e.user_id for e in events} == {t.user_id for t in targets}
    for e in events:
        assert config.start <= e.ts < config.history_end <= config.cutoff  # type: ignore[operator]
        assert e.text.strip() and len(e.text) <= 2000
        UserEvent.model_validate_json(e.model_dump_json())
    for user_events in per_user(events).values():
        # Event ids follow time order, so (ts, event_id) sorting is the generation order.
        assert sorted(user_events, key=lambda e: (e.ts, e.event_id)) == sorted(user_events, key=lambda e: e.event_id)


def test_targets_exist_and_were_not_clicked_before(mind_news: list[NewsArticle],
                                                   mind_sim: tuple[list[UserEvent], list[Target], dict[str, Any]]
                                                   ) -> None:
    events, targets, _ = mind_sim
    ids = {a.news_id for a in mind_news}
    clicks = Counter((e.user_id, e.news_id) for e in events if e.domain == "news_click")
    for t in targets:
        assert t.news_ids and len(set(t.news_ids)) == len(t.news_ids)
        assert all(n in ids for n in t.news_ids)
        assert not any((t.user_id, n) in clicks for n in t.news_ids)
    assert max(clicks.values()) == 1  # an article is clicked at most once per user
    assert all(len(t.news_ids) <= 5 for t in targets)


def test_only_clicks_carry_article_titles(mind_news: list[NewsArticle],
                                          mind_sim: tuple[list[UserEvent], list[Target], dict[str, Any]]) -> None:
    events, _, _ = mind_sim
    by_id = {a.news_id: a for a in mind_news}
    titles = {a.title.casefold() for a in mind_news}
    for e in events:
        if e.domain == "news_click":
            assert e.news_id in by_id and e.text == by_id[e.news_id].title and e.url == by_id[e.news_id].url
        else:
            assert e.news_id is None and e.text.casefold() not in titles
    assert {e.domain for e in events} == {"search", "browse", "app", "news_click"}


def test_signals_relate_to_the_users_interests(mind_news: list[NewsArticle],
                                               mind_sim: tuple[list[UserEvent], list[Target], dict[str, Any]]
                                               ) -> None:
    """Search/browse signals share words with the same interest's future clicks, far more than
    with another user's; entity interests (a team, a politician) almost always do."""
    events, targets, meta = mind_sim
    by_id = {a.news_id: a for a in mind_news}
    by_user = per_user(events)
    warm = [t for t in targets if not t.cold]
    hits: dict[str, list[bool]] = {"own": [], "other": [], "entity": []}
    for k, t in enumerate(warm):
        truth = meta["truth"][t.user_id]
        other = warm[(k + 1) % len(warm)]
        other_words = set().union(*(words(by_id[n].title + " " + by_id[n].abstract) for n in other.news_ids))
        target_words: dict[int, set[str]] = {}
        for n, j in zip(t.news_ids, truth["target_interest"], strict=True):
            target_words.setdefault(j, set()).update(words(by_id[n].title + " " + by_id[n].abstract))
        for e in by_user[t.user_id]:
            j = truth["event_interest"][e.event_id]
            if e.domain not in ("search", "browse") or j < 0 or j not in target_words:
                continue
            hits["own"].append(bool(words(e.text) & target_words[j]))
            hits["other"].append(bool(words(e.text) & other_words))
            if truth["interests"][j]["entity"]:
                hits["entity"].append(hits["own"][-1])
    share = {k: sum(v) / len(v) for k, v in hits.items()}
    assert len(hits["own"]) > 500
    assert share["own"] > 0.4 and share["own"] > 5 * share["other"]
    assert share["entity"] > 0.6


def test_noise_signals_are_outside_the_interests(mind_news: list[NewsArticle],
                                                 mind_sim: tuple[list[UserEvent], list[Target], dict[str, Any]]
                                                 ) -> None:
    events, _, meta = mind_sim
    by_id = {a.news_id: a for a in mind_news}
    labels = [v for t in meta["truth"].values() for v in t["event_interest"].values()]
    assert 0.08 < labels.count(-1) / len(labels) < 0.22  # noise = 0.15
    assert meta["counts"]["noise_events"] == labels.count(-1)
    for e in events:
        truth = meta["truth"][e.user_id]
        subs = {(i["category"], i["subcategory"]) for i in truth["interests"]}
        a = by_id.get(e.news_id or "")
        if a is not None:
            inside = (a.category, a.subcategory) in subs
            assert inside == (truth["event_interest"][e.event_id] >= 0)


def test_interest_weights_and_drift(mind_sim: tuple[list[UserEvent], list[Target], dict[str, Any]]) -> None:
    _, _, meta = mind_sim
    drifted = 0
    for truth in meta["truth"].values():
        assert 1 <= len(truth["interests"]) <= 4
        assert sum(i["weight"] for i in truth["interests"]) == pytest.approx(1.0, abs=1e-3)
        drifted += any(i["weight"] != i["future_weight"] for i in truth["interests"])
    assert drifted > 0
    no_drift = simulate(small_corpus(), SimulationConfig(users=20, drift=0.0))[2]
    assert all(i["weight"] == i["future_weight"] for t in no_drift["truth"].values() for i in t["interests"])


def test_knobs_do_what_they_say() -> None:
    news = small_corpus()
    only_search = simulate(news, SimulationConfig(users=10, domain_mix={"search": 1.0}, noise=0.0))
    assert {e.domain for e in only_search[0]} == {"search"}
    assert all(v >= 0 for t in only_search[2]["truth"].values() for v in t["event_interest"].values())
    all_noise = simulate(news, SimulationConfig(users=10, noise=1.0, interests_per_user=(1, 1)))
    assert all(v == -1 for t in all_noise[2]["truth"].values() for v in t["event_interest"].values())
    many = simulate(news, SimulationConfig(users=10, future_clicks=(3, 3), events_per_user=(7, 7), cold_share=0))
    assert all(len(t.news_ids) == 3 for t in many[1])
    assert Counter(e.user_id for e in many[0]) == Counter({t.user_id: 7 for t in many[1]})
    start = datetime(2024, 5, 1, tzinfo=UTC)
    dated = simulate(news, SimulationConfig(users=3, start=start, window_days=0.5,
                                            cutoff=start + timedelta(days=2)))
    assert all(start <= e.ts < start + timedelta(hours=12) for e in dated[0])
    assert dated[2]["cutoff"] == "2024-05-03T00:00:00+00:00"


def test_typos_change_one_word() -> None:
    rng = np.random.default_rng(0)
    query = ["new", "england", "patriots", "schedule"]
    for _ in range(50):
        typo = add_typo(" ".join(query), rng)
        changed = [a != b for a, b in zip(typo.split(), query, strict=True)]
        assert sum(changed) == 1 and typo.split()[0] == "new"
    assert add_typo("nfl", rng) == "nfl"  # nothing long enough to mistype
    typos = simulate(small_corpus(), SimulationConfig(users=20, typo_rate=1.0, domain_mix={"search": 1}, noise=0))
    vocab = {w.casefold() for a in small_corpus() for w in tokens(a.title + " " + a.abstract + " " + " ".join(a.entities))}
    assert any(not words(e.text) <= vocab for e in typos[0])


def test_surface_forms_from_the_raw_json(mind_forms: dict[str, list[str]]) -> None:
    assert mind_forms["Fort Lauderdale, Florida"][0] == "Fort Lauderdale"
    assert "Carribbean" in mind_forms["Caribbean"]  # as written in the article, typos included
    assert len(mind_forms) > 1000


# ---------------------------------------------------------------- config and corpus errors


@pytest.mark.parametrize(
    ("kwargs", "hint"),
    [
        ({"users": 0}, "users must be a whole number from 1"),
        ({"cold_share": 1.5}, "cold_share must be a number from 0 to 1"),
        ({"noise": -0.1}, "noise must be a number from 0 to 1"),
        ({"interests_per_user": (3, 1)}, "interests_per_user must be (min, max) whole numbers with 1 <= min <= max"),
        ({"events_per_user": (0, 4)}, "events_per_user must be (min, max)"),
        ({"future_clicks": (1, 2, 3)}, "future_clicks must be (min, max)"),
        ({"domain_mix": {"tv": 1.0}}, "unknown domains ['tv']; use search, browse, app, news_click"),
        ({"domain_mix": {"search": 0.0}}, "weights must be >= 0 and not all 0"),
        ({"start": datetime(2019, 1, 1)}, "start must be a timezone-aware datetime"),
        ({"window_days": 0}, "window_days must be a number of days"),
        ({"cutoff": datetime(2019, 11, 2, tzinfo=UTC)}, "move it later, shorten window_days or leave it unset"),
        ({"users": True}, "users must be a whole number"),
    ],
)
def test_bad_config_says_how_to_fix_it(kwargs: dict[str, Any], hint: str) -> None:
    with pytest.raises(SimulationError) as info:
        SimulationConfig(**kwargs)
    assert hint in str(info.value) and isinstance(info.value, ValueError)


def test_config_round_trips_through_meta() -> None:
    config = SimulationConfig(users=7, interests_per_user=[2, 3], domain_mix={"news_click": 1, "search": 2},
                              seed=9)  # type: ignore[arg-type]
    assert config.interests_per_user == (2, 3)
    assert config.domain_mix == (("search", 2.0), ("news_click", 1.0))
    assert SimulationConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(SimulationError, match="unknown simulation config keys"):
        SimulationConfig.from_dict({"userz": 3})


def test_corpus_without_interests_is_refused() -> None:
    news = small_corpus()[:2]
    with pytest.raises(SimulationError, match="lower min_interest_articles"):
        simulate(news, SimulationConfig(users=2))
    with pytest.raises(SimulationError, match="corpus is empty"):
        simulate([], SimulationConfig(users=2))
    with pytest.raises(SimulationError, match="appears more than once"):
        simulate(small_corpus() + small_corpus()[:1], SimulationConfig(users=2))


# ---------------------------------------------------------------- property: any config → a valid dataset

_NEWS = small_corpus()
_ROWS = tsv_rows(_NEWS)


@st.composite
def configs(draw: st.DrawFn) -> SimulationConfig:
    def span(lo: int, hi: int) -> tuple[int, int]:
        a, b = draw(st.integers(lo, hi)), draw(st.integers(lo, hi))
        return (min(a, b), max(a, b))
    mix = draw(st.dictionaries(st.sampled_from(["search", "browse", "app", "news_click"]),
                               st.floats(0.0, 5.0), min_size=1))
    if sum(mix.values()) <= 0:
        mix["search"] = 1.0
    return SimulationConfig(
        users=draw(st.integers(1, 12)), interests_per_user=span(1, 6), cold_share=draw(st.floats(0, 1)),
        noise=draw(st.floats(0, 1)), events_per_user=span(1, 40), future_clicks=span(1, 12),
        drift=draw(st.floats(0, 1)), domain_mix=mix, typo_rate=draw(st.floats(0, 1)),
        seed=draw(st.integers(0, 2**32)), window_days=draw(st.floats(0.01, 60)),
        target_noise=draw(st.floats(0, 1)), entity_interest_share=draw(st.floats(0, 1)),
        min_interest_articles=draw(st.integers(2, 8)), dirichlet_alpha=draw(st.floats(0.05, 20)))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(config=configs())
def test_any_config_gives_a_valid_dataset(tmp_path: Path, config: SimulationConfig) -> None:
    events, targets, meta = simulate(_NEWS, config)
    out = tmp_path / f"ds{config.seed}"
    write_dataset(out, _ROWS, events, targets, meta)
    report = validate_dataset(out)
    assert report.ok, report.problems
    assert report.users == config.users and report.cold_users == round(config.users * config.cold_share)
    ds = load_dataset(out)
    clicks = {(e.user_id, e.news_id) for e in events if e.domain == "news_click"}
    titles = {a.title.casefold() for a in _NEWS}
    for t in ds.targets.values():
        assert 1 <= len(t.news_ids) <= config.future_clicks[1]
        assert not any((t.user_id, n) in clicks for n in t.news_ids)
        n = len(ds.events[t.user_id])
        assert 1 <= n <= 3 if t.cold else config.events_per_user[0] <= n <= config.events_per_user[1]
    for e in events:
        assert config.start <= e.ts < config.history_end
        assert e.domain == "news_click" or e.text.casefold() not in titles


# ---------------------------------------------------------------- the data commands


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_data_commands(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def run(argv: list[str]) -> int:
    # Through the entry point, so typed errors become exit codes as on the command line.
    return main(argv)


def test_simulate_then_validate(tmp_path: Path, mind_news_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sim"
    argv = ["data", "simulate", "--news", str(mind_news_path), "--out", str(out), "--users", "25",
            "--cold-share", "0.2", "--interests", "1,3", "--events", "4,9", "--future", "2,4", "--noise", "0.1",
            "--drift", "0.3", "--typo-rate", "0", "--window-days", "7", "--seed", "8",
            "--domain-mix", "search=2,browse=1,app=1,news_click=1"]
    assert run(argv) == 0
    printed = capsys.readouterr().out
    assert "25 users (5 cold)" in printed and "events:" in printed and "targets:" in printed
    assert (out / "news.tsv").read_bytes() == mind_news_path.read_bytes()  # verbatim copy
    meta = json.loads((out / "meta.json").read_text())
    assert meta["config"]["events_per_user"] == [4, 9] and meta["config"]["seed"] == 8
    assert meta["config"]["domain_mix"] == {"search": 2.0, "browse": 1.0, "app": 1.0, "news_click": 1.0}
    assert run(["data", "validate", str(out)]) == 0
    assert "ok" in capsys.readouterr().out
    assert run(argv) == 2  # no silent overwrite
    assert "--force" in capsys.readouterr().err
    assert run(argv + ["--force"]) == 0


def test_validate_reports_problems_with_exit_code_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    news = small_corpus()
    events, targets, _ = simulate(news, SimulationConfig(users=3))
    write_dataset(tmp_path, tsv_rows(news), events[1:], [*targets, Target(user_id="ghost", news_ids=["N404"])])
    assert run(["data", "validate", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "unresolved target ids: 1" in out and "problem:" in out
    (tmp_path / "targets.jsonl").write_text("{broken\n")
    assert run(["data", "validate", str(tmp_path)]) == 1
    assert "targets.jsonl:1" in capsys.readouterr().err


def test_bad_simulate_arguments(tmp_path: Path, mind_news_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["data", "simulate", "--news", str(mind_news_path), "--out", str(tmp_path), "--cold-share", "2"]) == 2
    assert "cold_share must be a number from 0 to 1" in capsys.readouterr().err
    assert run(["data", "simulate", "--news", str(tmp_path / "nope.tsv"), "--out", str(tmp_path / "o")]) == 2
    assert "nope.tsv" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse(["data", "simulate", "--news", "x", "--out", "y", "--events", "a,b"])


def test_behaviors_command(mind_news_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    behaviors = mind_news_path.parent / "behaviors.tsv"
    assert run(["data", "behaviors", str(behaviors), "--news", str(mind_news_path)]) == 0
    out = capsys.readouterr().out
    assert "history_unresolved" in out and "%)" in out
    args = parse(["data", "behaviors", str(behaviors), "--json"])
    assert _cmd_behaviors(args) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["rows"] == 5_000 and "history_resolved" not in stats


def test_summary_counts() -> None:
    events, targets, meta = simulate(small_corpus(), SimulationConfig(users=6, cold_share=0.5))
    s = summarize(events, targets)
    assert s["users"] == 6 and s["cold_users"] == 3 and s["events"] == len(events)
    assert s["events_by_domain"] == meta["counts"]["events_by_domain"]


def test_title_only_rows_cluster_under_their_category() -> None:
    # As in shared/data/mind-small: most rows carry only id, category and title.
    news = [a.model_copy(update={"subcategory": "", "abstract": "", "url": None, "entities": []})
            if a.subcategory == "golf" else a for a in small_corpus()]
    events, targets, meta = simulate(news, SimulationConfig(users=40, seed=5, min_interest_articles=3))
    interests = [i for t in meta["truth"].values() for i in t["interests"]]
    assert {(i["category"], i["subcategory"]) for i in interests} >= {("sports", "sports")}  # the golf rows
    assert all(i["subcategory"] for i in interests)
    golf = {a.news_id for a in news if not a.subcategory}
    assert any(set(t.news_ids) & golf for t in targets)
    assert all(e.text.strip() for e in events)
