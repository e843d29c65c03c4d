"""The impression protocol: no leakage, MIND metrics per variant, the CLI on a dataset dir."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from evaluation.dataset import Impression, Target, load_dataset, write_dataset
from evaluation.impressions import ImpressionConfig, evaluate_impressions, impression_metrics, trending_views
from index.embedded import EmbeddedEngine
from index.fusion import FusedItem
from streams.contracts import UserEvent
from streams.recommend import RecommendConfig

T0 = datetime(2019, 11, 9, 8, tzinfo=UTC)


def imp(i: int, user: str, ts: datetime, cands: list[str], clicked: list[str]) -> Impression:
    return Impression(impression_id=str(i), user_id=user, ts=ts, candidates=cands, clicked=clicked)


def click(user: str, news_id: str, ts: datetime, title: str = "a title") -> UserEvent:
    return UserEvent(event_id=f"{user}-{news_id}-{ts.timestamp()}", user_id=user, ts=ts, domain="news_click",
                     text=title, news_id=news_id)


def test_no_impression_sees_its_own_or_later_clicks() -> None:
    imps = [imp(1, "u1", T0, ["X", "Y"], ["X"]), imp(2, "u2", T0, ["X", "Z"], ["Z"]),
            imp(3, "u3", T0 + timedelta(hours=1), ["X", "Y", "Z"], ["Y"])]
    events = [[click("u9", "Y", T0 + timedelta(minutes=30)), click("u9", "Z", T0 + timedelta(hours=2))]]
    # a view is live (valid until the next impression is added): copy it at its turn
    seen = {i.impression_id: dict(v.popularity) for i, v in trending_views(imps, events, {})}
    assert seen["1"] == {} and seen["2"] == {}  # same ts: neither sees the other
    later = seen["3"]
    assert later["X"].clicks == 1 and later["X"].shows == 2  # impressions 1 and 2, clicks and shows
    assert later["Y"].clicks == 1 and later["Y"].shows == 1  # the 08:30 click event and impression 1's show
    assert later["Z"].clicks == 1  # impression 2's click; the 10:00 event is in the future


def test_metrics_of_an_order() -> None:
    order = [FusedItem(n, "", 0.0, "") for n in ["a", "b", "c", "d"]]
    m = impression_metrics(order, {"b"})
    assert m["auc"] == pytest.approx(2 / 3) and m["mrr"] == pytest.approx(0.5)


@pytest.fixture(scope="module")
def impression_dataset(mind_news_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Users who click within one category; impressions mix that category with others, and
    the held-out day's clicks follow the same interests."""
    from index.corpus import read_mind_news

    news = list(read_mind_news(mind_news_path))[:400]
    by_cat: dict[str, list[str]] = {}
    for a in news:
        by_cat.setdefault(a.category, []).append(a.news_id)
    cats = [c for c, ids in by_cat.items() if len(ids) >= 12][:4]
    title = {a.news_id: a.title for a in news}
    events, targets, imps = [], [], []
    for u in range(24):
        cat, other = cats[u % len(cats)], cats[(u + 1) % len(cats)]
        user, ts = f"u{u}", T0 + timedelta(hours=u * 2)  # 48 h: the last day is held out
        history = by_cat[cat][:5]
        events += [click(user, n, ts - timedelta(minutes=10 - j), title[n]) for j, n in enumerate(history)]
        liked = by_cat[cat][5 + u % 6]
        # The user searched for the story before it was shown: the signals channel can find it.
        events.append(UserEvent(event_id=f"{user}-s", user_id=user, ts=ts - timedelta(minutes=1), domain="search",
                                text=title[liked]))
        cands = [liked, *by_cat[other][:6]]
        imps.append(imp(u, user, ts, cands, [liked]))
        targets.append(Target(user_id=user, news_ids=[liked]))
    out = tmp_path_factory.mktemp("impressions")
    rows = [line for line in mind_news_path.read_text(encoding="utf-8").splitlines(keepends=True)
            if line.split("\t")[0] in title]
    write_dataset(out, rows, events, targets, {"source": "test"}, impressions=imps)
    return out


async def test_protocol_reports_every_variant_on_the_held_out_day(impression_dataset: Path) -> None:
    ds = load_dataset(impression_dataset)
    engine = EmbeddedEngine()
    engine.upsert_sync(ds.news)
    cfg = ImpressionConfig(progress=False, bootstrap=50,
                           recommend=RecommendConfig().only("signals", "trending"))
    report = await evaluate_impressions(ds, engine, None, cfg)
    assert report["held_out"] == 12 and report["train"] == 12
    results = report["results"]
    assert {"random", "signals", "trending", "hybrid", "hybrid - signals", "learned"} <= set(results)
    assert results["signals"]["auc"] > max(0.75, results["random"]["auc"] + 0.2)  # the searched story ranks high
    assert results["hybrid - signals"]["auc"] < results["hybrid"]["auc"]
    assert all(r["scored"] == 12 for r in results.values())


async def test_the_learned_fusion_learns_the_model_channel_from_training_queries(impression_dataset: Path,
                                                                               tmp_path: Path) -> None:
    """With queries on the training days the ranker splits on the model's columns (here a
    "model" that searches the user's signals, which find the clicked story) and its effect
    inside the learned fusion gets an interval; without, the columns are missing in training
    and the ranker ignores them."""
    from evaluation.baselines import LexicalBaseline
    from streams.ranker import FEATURES, LearnedRanker

    ds = load_dataset(impression_dataset)
    engine = EmbeddedEngine()
    engine.upsert_sync(ds.news)
    base = ImpressionConfig(progress=False, bootstrap=50, recommend=RecommendConfig().only("model", "trending"),
                            model_samples=None)
    model_cols = [FEATURES.index("model_score"), FEATURES.index("model_rr")]
    taught = await evaluate_impressions(ds, engine, None, replace(base, model_train_samples=12,
                                                                  save_ranker=tmp_path / "taught"), LexicalBaseline())
    assert taught["model_train_impressions"] == 12 and taught["model_impressions"] == 24
    assert taught["learned_model_effect"]["impressions"] == 12
    assert LearnedRanker.load(tmp_path / "taught").booster.feature_importance()[model_cols].sum() > 0
    blind = await evaluate_impressions(ds, engine, None, replace(base, save_ranker=tmp_path / "blind"),
                                       LexicalBaseline())
    assert blind["model_train_impressions"] == 0 and blind["learned_model_effect"] is None
    assert LearnedRanker.load(tmp_path / "blind").booster.feature_importance()[model_cols].sum() == 0
    assert blind["results"]["learned"] == blind["results"]["learned - model"]


def test_eval_command_uses_the_impression_protocol(impression_dataset: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from commands.cli import main

    monkeypatch.setenv("NEWSREC_CHANNEL_WEIGHTS", '{"signals": 1, "trending": 0.5}')
    out = tmp_path / "r.json"
    assert main(["eval", "--data", str(impression_dataset), "--out", str(out), "--save-ranker",
                 str(tmp_path / "ranker")]) == 0
    report = json.loads(out.read_text())
    assert report["protocol"] == "impressions" and report["channels"] == ["signals", "trending"]
    assert "| hybrid |" in capsys.readouterr().out
    assert (tmp_path / "ranker" / "manifest.json").is_file()
    assert main(["eval", "--data", str(impression_dataset), "--model", "popular"]) == 2
    assert "at most one query-writing --model" in capsys.readouterr().err


def test_channel_ablation_on_the_corpus_protocol(small_sim_dataset: Path, tiny_model_dir: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from commands.cli import main

    monkeypatch.setenv("NEWSREC_CHANNEL_WEIGHTS", '{"signals": 1, "model": 1, "dense": 1, "trending": 0.5}')
    out = tmp_path / "c.json"
    assert main(["eval", "--data", str(small_sim_dataset), "--channels", "--model", str(tiny_model_dir),
                 "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    results = report["results"]
    assert {"signals", "model", "dense", "trending", "signals+dense", "hybrid", "hybrid - model",
            "hybrid - dense"} <= set(results)
    assert all(0.0 <= r["recall@10"] <= 1.0 for r in results.values())
    effect = report["model_effect"]["recall@10"]
    assert effect["ci95"][0] <= effect["mean"] <= effect["ci95"][1]
    assert "model channel effect on recall@10" in capsys.readouterr().out


def test_trainers_see_only_the_training_days(impression_dataset: Path) -> None:
    """Prompts for GRPO, warm start and distillation come from training_users: no held-out user,
    and each window holds only what happened before that user's impression."""
    from evaluation.dataset import holdout_cutoff
    from evaluation.evaluate import WindowConfig, training_users

    ds = load_dataset(impression_dataset)
    cutoff = holdout_cutoff(ds.impressions)
    users = training_users(ds, WindowConfig(max_signals=50, max_age_s=30 * 86400, clicked_memory=100))
    held = {i.user_id for i in ds.impressions if i.ts > cutoff}
    first = {i.user_id: i for i in reversed(ds.impressions)}
    assert len(users) == 12 and len(held) == 12 and not {u.user_id for u in users} & held
    for u in users:
        shown = first[u.user_id]
        assert u.now == shown.ts and u.targets == tuple(shown.clicked)
        assert u.state.signals and all(s.ts < shown.ts for s in u.state.signals)
    assert [u.user_id for u in training_users(ds, WindowConfig.from_settings(), limit=3)] == ["u0", "u1", "u2"]
