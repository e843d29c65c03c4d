"""Format warm start: the rule that writes demonstration lists (unit) and a tiny SFT run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.rewards import format_reward
from training.warmstart import WarmStartConfig, demonstration, keyphrase, warm_start

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


def test_bad_warm_start_config() -> None:
    with pytest.raises(ValueError, match="epochs"):
        WarmStartConfig(Path("d"), Path("o"), epochs=0)


def test_tiny_warm_start_runs_and_saves(small_sim_dataset: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    cfg = WarmStartConfig(small_sim_dataset, tmp_path / "warm", base_model=str(tiny_model_dir.parent / "hf"),
                          users=8, batch_size=4, min_queries=1, threads=2)
    summary = warm_start(cfg, progress=False)
    assert summary["examples"] >= 1 and summary["steps"] >= 1
    assert summary["last_loss"] is not None
    assert (tmp_path / "warm" / "config.json").is_file() and (tmp_path / "warm" / "tokenizer.json").is_file()
    saved = json.loads((tmp_path / "warm" / "warmstart.json").read_text())
    assert saved["example"]["completion"].startswith("1. ")
