"""Warm start: the rule that writes demonstration lists (unit), the next-clicks mode on the
training days only, and a tiny SFT run."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from evaluation.dataset import Impression, Target, write_dataset
from streams.contracts import UserEvent
from streams.recommend import RecommendConfig
from training.rewards import FormatRules, format_reward
from training.warmstart import WarmStartConfig, clipped, demonstration, demonstrations, keyphrase, warm_start

IDF = {"google": 0.9, "undersea": 0.95, "cable": 0.7, "chile": 0.9, "connects": 0.5, "now": 0.1, "nfl": 0.8,
       "scores": 0.4, "curie": 0.99}


def test_keyphrase_keeps_the_rarest_words_in_text_order() -> None:
    text = "Google's Curie undersea cable now connects the US and Chile"
    assert keyphrase(text, IDF, max_terms=3) == "Curie undersea Chile"
    assert keyphrase(text, IDF, max_terms=10) == "Curie undersea cable connects Chile"  # "now" is too common
    assert keyphrase("the and of", IDF) == ""


def test_demonstration_is_a_valid_list_that_never_copies_or_repeats_a_signal() -> None:
    signals = ["Google's Curie undersea cable now connects the US and Chile", "Google", "opened NFL scores",
               "NFL scores today", "Curie undersea cable Chile news"]
    text = demonstration(signals, IDF, max_queries=5, max_terms=3)
    assert text.splitlines() == ["1. Curie undersea Chile", "2. NFL scores"]
    assert demonstration(signals, IDF, max_queries=1, max_terms=3) == "1. Curie undersea Chile"
    more = [*signals, "Chile now connects"]
    three = demonstration(more, IDF, max_terms=3)
    assert three.splitlines()[-1] == "3. Chile connects"
    assert format_reward(three, more) == 1.0


def test_next_click_titles_lead_the_list_whole_and_never_copy_a_signal() -> None:
    signals = ["Google's Curie undersea cable now connects the US and Chile", "opened NFL scores"]
    read_next = ["Chile wins the cup", "opened NFL scores", "Chile wins the cup",
                 "One two three four five six seven eight nine ten eleven twelve thirteen"]
    text = demonstration(signals, IDF, leading=read_next, max_terms=3)
    assert text.splitlines() == ["1. Chile wins the cup",  # a repeat and a copied signal are skipped
                                 "2. One two three four five six seven eight nine ten eleven twelve",
                                 "3. Curie undersea Chile", "4. NFL scores"]
    assert format_reward(text, signals) == 1.0
    assert demonstration(signals, IDF, leading=read_next, max_queries=1) == "1. Chile wins the cup"
    assert clipped("word " * 40, FormatRules(max_words=30, max_chars=24)) == "word word word word word"


def test_bad_warm_start_config() -> None:
    with pytest.raises(ValueError, match="epochs"):
        WarmStartConfig(Path("d"), Path("o"), epochs=0)
    with pytest.raises(ValueError, match="targets: expected one of window, next-clicks"):
        WarmStartConfig(Path("d"), Path("o"), targets="future")
    with pytest.raises(ValueError, match="train_data"):
        WarmStartConfig((), Path("o"))


def test_next_clicks_come_from_the_training_days_only(tmp_path: Path) -> None:
    """Day 1's users learn the titles they clicked next; the held-out last day's users, and
    their clicks, never reach a demonstration."""
    t0 = datetime(2019, 11, 9, 8, tzinfo=UTC)
    rows, events, targets, imps = [], [], [], []
    for u, name in enumerate(["Mayfield", "Chubb", "Njoku", "Garrett", "Ward", "Landry"]):
        user, ts, read, liked = f"u{u}", t0 + timedelta(hours=10 * u), f"N{u}a", f"N{u}b"
        rows += [f"{read}\tsports\tnfl\tBrowns hold on as {name} shines\t\t\t\t\n",
                 f"{liked}\tnews\tpolitics\tSenate vote number {u} delayed again\t\t\t\t\n"]
        events.append(UserEvent(event_id=f"{user}-c", user_id=user, ts=ts - timedelta(minutes=5),
                                domain="news_click", text=f"Browns hold on as {name} shines", news_id=read))
        imps.append(Impression(impression_id=str(u), user_id=user, ts=ts, candidates=[liked], clicked=[liked]))
        targets.append(Target(user_id=user, news_ids=[liked]))
    write_dataset(tmp_path / "ds", rows, events, targets, {"source": "test"}, impressions=imps)
    cfg = WarmStartConfig(tmp_path / "ds", tmp_path / "out", targets="next-clicks", min_queries=1)
    demos = demonstrations(cfg, RecommendConfig())
    # impressions 0..5 are 10 h apart: the last day (after 50 h - 24 h) holds u3, u4 and u5 out
    assert [d["completion"].splitlines()[0] for d in demos] == [f"1. Senate vote number {u} delayed again"
                                                               for u in range(3)]
    assert all("Senate" not in d["prompt"] for d in demos)  # the click is the answer, never the question
    window_only = demonstrations(WarmStartConfig(tmp_path / "ds", tmp_path / "out", min_queries=1), RecommendConfig())
    assert [d["prompt"] for d in window_only] == [d["prompt"] for d in demos]
    assert all("Senate" not in d["completion"] for d in window_only)


def test_tiny_next_click_warm_start_from_the_command_line(small_sim_dataset: Path, tiny_model_dir: Path,
                                                          tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from commands.cli import main
    from evaluation.dataset import load_dataset

    out = tmp_path / "warm"
    assert main(["train", "warmstart", "--data", str(small_sim_dataset), "--out", str(out), "--targets", "next-clicks",
                 "--base-model", str(tiny_model_dir.parent / "hf"), "--users", "8", "--batch-size", "4",
                 "--threads", "2", "--no-progress"]) == 0
    assert "warm start:" in capsys.readouterr().out
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    saved = json.loads((out / "warmstart.json").read_text())
    assert saved["steps"] >= 1 and saved["last_loss"] is not None and saved["config"]["targets"] == "next-clicks"
    ds = load_dataset(small_sim_dataset)
    first_read = next(a.title for a in ds.news if a.news_id == ds.targets[ds.users[0]].news_ids[0])
    assert saved["example"]["completion"].startswith(f"1. {clipped(first_read)}")
