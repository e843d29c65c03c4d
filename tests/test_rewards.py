"""GRPO reward functions: hand-computed cases, edge cases, errors and [0, 1] properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from training.rewards import (
    REWARD_NAMES,
    FormatRules,
    align_reward,
    composite_reward,
    coverage_reward,
    diversity_reward,
    format_reward,
    normalized_idf,
    query_terms,
    specificity_reward,
    utility_reward,
)

SIGNALS = ["Bitcoin price today?", "Champions League draw", "Lisbon housing market"]
GOOD = "1. Bitcoin ETF inflows\n2. Champions League quarter-final odds\n3. Lisbon rent control law"


def test_reward_names() -> None:
    assert REWARD_NAMES == ("align", "coverage", "specificity", "diversity", "format", "utility")


# --- FormatRules ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"min_queries": 0}, "min_queries must be at least 1"),
        ({"min_queries": 5, "max_queries": 4}, "raise max_queries or lower min_queries"),
        ({"max_words": 0}, "max_words must be at least 1"),
        ({"max_chars": 1}, "max_chars must be at least 2"),
        ({"max_queries": 4.5}, "must be an int"),
    ],
)
def test_format_rules_reject_bad_values(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FormatRules(**kwargs)


def test_format_rules_defaults() -> None:
    assert FormatRules() == FormatRules(min_queries=3, max_queries=8, max_words=12, max_chars=100)
    FormatRules(min_queries=1, max_queries=1, max_words=1, max_chars=2)  # tightest valid


# --- query_terms / normalized_idf ----------------------------------------------------------


def test_query_terms() -> None:
    assert query_terms("The latest news on Apple's M4 chip!") == ["apple", "m4", "chip"]
    assert query_terms("Top stories today: breaking updates") == []
    assert query_terms("café São-Paulo 2024 x 5") == ["café", "são", "paulo", "2024"]
    assert query_terms("cafe\u0301") == ["café"]  # decomposed accent stays in the token
    assert query_terms("rust rust_lang RUST") == ["rust", "rust", "lang", "rust"]  # duplicates kept, "_" splits
    assert query_terms("") == []


def test_normalized_idf_hand_computed() -> None:
    idf = normalized_idf({"rare": 0, "all": 3, "one": 1}, 3)
    assert idf["rare"] == 1.0
    assert idf["all"] == 0.0
    assert idf["one"] == pytest.approx(math.log(4 / 2) / math.log(4))  # = 0.5
    assert normalized_idf({}, 1) == {}


@pytest.mark.parametrize(("doc_freq", "n_docs"), [({"a": 1}, 0), ({"a": -1}, 3), ({"a": 4}, 3), ({"a": 1.5}, 3)])
def test_normalized_idf_errors(doc_freq: dict, n_docs: int) -> None:
    with pytest.raises(ValueError):
        normalized_idf(doc_freq, n_docs)


# --- format_reward -------------------------------------------------------------------------


def test_format_good_list() -> None:
    assert format_reward(GOOD, SIGNALS) == 1.0
    # ")" markers, gaps in the numbering, blank lines and indentation are fine
    assert format_reward("  2) alpha beta\n\n5) gamma delta\n9.  epsilon zeta\n", SIGNALS) == 1.0


def test_format_copied_signal() -> None:
    copied = "1. Bitcoin ETF inflows\n2. champions  LEAGUE draw\n3. Lisbon rent control law"
    assert format_reward(copied, SIGNALS) == pytest.approx(2 / 3)
    # echoed activity line: label and age stripped as parse_queries does, punctuation too
    echoed = "1. Searched: Bitcoin price today (2h ago)\n2. Champions League odds\n3. Lisbon rent control law"
    assert format_reward(echoed, SIGNALS) == pytest.approx(2 / 3)
    assert format_reward(copied, []) == 1.0


def test_format_not_a_numbered_list() -> None:
    assert format_reward("Bitcoin ETF inflows and the Champions League draw.", SIGNALS) == 0.0
    assert format_reward("Here are your queries:\n" + GOOD, SIGNALS) == 0.0
    assert format_reward("- alpha\n- beta\n- gamma", SIGNALS) == 0.0
    assert format_reward("1.5 million\n2.5 million\n3.5 million", SIGNALS) == 0.0
    assert format_reward("", SIGNALS) == 0.0
    assert format_reward(" \n\n ", SIGNALS) == 0.0


def test_format_item_count_bounds() -> None:
    items = [f"{i}. topic number {i}" for i in range(1, 10)]
    assert format_reward("\n".join(items[:9]), SIGNALS) == 0.0
    assert format_reward("\n".join(items[:8]), SIGNALS) == 1.0
    assert format_reward("\n".join(items[:2]), SIGNALS) == 0.0
    assert format_reward("\n".join(items[:2]), SIGNALS, FormatRules(min_queries=2)) == 1.0


def test_format_per_item_checks() -> None:
    dup = "1. Bitcoin ETF inflows\n2.  bitcoin   etf INFLOWS\n3. Lisbon rent control law"
    assert format_reward(dup, SIGNALS) == pytest.approx(2 / 3)
    wordy = "1. " + " ".join(["word"] * 13) + "\n2. alpha beta\n3. gamma delta"
    assert format_reward(wordy, SIGNALS) == pytest.approx(2 / 3)
    long = "1. " + "x" * 101 + "\n2. alpha beta\n3. gamma delta"
    assert format_reward(long, SIGNALS) == pytest.approx(2 / 3)
    assert format_reward("1. " + "x" * 100 + "\n2. alpha beta\n3. gamma delta", SIGNALS) == 1.0
    empty = "1.\n2. alpha beta\n3. gamma delta\n4. <|im_end|>"
    assert format_reward(empty, SIGNALS) == pytest.approx(2 / 4)
    tight = FormatRules(max_words=2, max_chars=11)
    assert format_reward("1. alpha beta\n2. alpha beta gamma\n3. abcdefghijkl", SIGNALS, tight) == pytest.approx(1 / 3)


def test_format_never_raises_on_odd_input() -> None:
    assert format_reward(None, SIGNALS) == 0.0  # type: ignore[arg-type]
    assert format_reward("1. a\x00b c\n2. \u202e evil\n3. \x1b[31m red", [None, "x"]) >= 0.0  # type: ignore[list-item]


@settings(max_examples=150, deadline=None)
@given(
    text=st.text(max_size=400)
    | st.lists(st.text(max_size=60), min_size=1, max_size=10).map(lambda xs: "\n".join(f"{i}. {x}" for i, x in enumerate(xs))),
    signals=st.lists(st.text(max_size=40), max_size=4),
)
def test_property_format_in_unit_interval(text: str, signals: list[str]) -> None:
    assert 0.0 <= format_reward(text, signals) <= 1.0


# --- align_reward --------------------------------------------------------------------------

E1, E2 = np.array([1.0, 0.0]), np.array([0.0, 1.0])


def test_align_hand_computed() -> None:
    queries = np.stack([E1, E2])
    # query 0: cosines 1 and 0 -> 0.5; query 1: no results -> 0; mean 0.25
    assert align_reward(queries, [np.stack([E1, E2]), np.empty((0, 2))]) == pytest.approx(0.25)
    assert align_reward(queries, [np.stack([E1]), np.stack([E2])]) == pytest.approx(1.0)
    # a negative cosine counts 0, not -1
    assert align_reward(np.stack([E1]), [np.stack([-E1, E1])]) == pytest.approx(0.5)
    # 45 degrees
    assert align_reward(np.stack([E1]), [np.array([[1.0, 1.0]]) / math.sqrt(2)]) == pytest.approx(1 / math.sqrt(2))
    assert align_reward(np.stack([E1]), [np.array([])]) == 0.0


def test_align_edge_cases_and_errors() -> None:
    assert align_reward(np.zeros((0, 4)), []) == 0.0
    assert align_reward(np.array([[2.0, 0.0]]), [np.array([[3.0, 0.0]])]) == pytest.approx(1.0)  # re-normalised
    with pytest.raises(ValueError, match="result arrays for 2 queries"):
        align_reward(np.stack([E1, E2]), [np.stack([E1])])
    with pytest.raises(ValueError, match="shape"):
        align_reward(np.stack([E1]), [np.ones((2, 3))])
    with pytest.raises(ValueError, match="2-d"):
        align_reward(E1, [np.stack([E1])])
    with pytest.raises(ValueError, match="NaN"):
        align_reward(np.array([[np.nan, 0.0]]), [np.stack([E1])])


def unit_rows(rows: int, dim: int) -> st.SearchStrategy[np.ndarray]:
    floats = st.floats(-1.0, 1.0, allow_nan=False, width=32)
    return hnp.arrays(np.float64, (rows, dim), elements=floats).map(
        lambda a: a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    )


@settings(max_examples=100, deadline=None)
@given(data=st.data(), n=st.integers(0, 5), dim=st.integers(1, 6))
def test_property_align_in_unit_interval(data: st.DataObject, n: int, dim: int) -> None:
    queries = data.draw(unit_rows(n, dim))
    results = [data.draw(unit_rows(data.draw(st.integers(0, 4)), dim)) for _ in range(n)]
    assert 0.0 <= align_reward(queries, results) <= 1.0


# --- diversity_reward ----------------------------------------------------------------------


def test_diversity_hand_computed() -> None:
    assert diversity_reward(np.stack([E1, E2])) == pytest.approx(1.0)
    assert diversity_reward(np.stack([E1, E1])) == pytest.approx(0.0)
    diag = (E1 + E2) / math.sqrt(2)
    # pairs: 1, 1 - 1/sqrt(2), 1 - 1/sqrt(2)
    assert diversity_reward(np.stack([E1, E2, diag])) == pytest.approx((3 - math.sqrt(2)) / 3)
    # opposite pairs count 1 each, so they cannot hide the duplicate pair: (0 + 1 + 1) / 3
    assert diversity_reward(np.stack([E1, E1, -E1])) == pytest.approx(2 / 3)


def test_diversity_edge_cases() -> None:
    assert diversity_reward(np.stack([E1])) == 0.0
    assert diversity_reward(np.zeros((0, 3))) == 0.0
    with pytest.raises(ValueError, match="2-d"):
        diversity_reward(E1)


@settings(max_examples=100, deadline=None)
@given(data=st.data(), n=st.integers(0, 6), dim=st.integers(1, 6))
def test_property_diversity_in_unit_interval(data: st.DataObject, n: int, dim: int) -> None:
    assert 0.0 <= diversity_reward(data.draw(unit_rows(n, dim))) <= 1.0


# --- coverage_reward -----------------------------------------------------------------------


def test_coverage_hand_computed() -> None:
    window = ["sports", "tech", "finance", "travel", "tech"]  # 4 distinct
    assert coverage_reward([{"sports"}, {"tech", "weather"}], window) == pytest.approx(0.5)
    assert coverage_reward([{"sports", "tech", "finance", "travel"}], window) == 1.0
    assert coverage_reward([], window) == 0.0
    assert coverage_reward([set(), set()], window) == 0.0
    assert coverage_reward([{"sports"}], []) == 0.0
    assert coverage_reward([{"sports"}], ["", "sports"]) == 1.0  # empty cluster names ignored


def test_coverage_rejects_bare_strings() -> None:
    with pytest.raises(TypeError):
        coverage_reward([{"sports"}], "sports")
    with pytest.raises(TypeError):
        coverage_reward(["sports"], {"sports"})


clusters = st.sets(st.sampled_from("abcdefgh"), max_size=5)


@settings(max_examples=100, deadline=None)
@given(results=st.lists(clusters, max_size=5), extra=clusters, window=clusters)
def test_property_coverage_monotone(results: list[set[str]], extra: set[str], window: set[str]) -> None:
    before = coverage_reward(results, window)
    after = coverage_reward([*results, extra], window)
    assert 0.0 <= before <= after <= 1.0


# --- specificity_reward --------------------------------------------------------------------

IDF = {"bitcoin": 1.0, "etf": 0.5, "price": 0.2, "inflows": 0.9}


def test_specificity_hand_computed() -> None:
    assert specificity_reward(["bitcoin etf"], IDF) == pytest.approx(0.75)
    assert specificity_reward(["bitcoin price etf"], IDF) == pytest.approx(0.85)
    assert specificity_reward(["bitcoin etf inflows"], IDF) == 1.0  # 2.4 / 2 capped
    assert specificity_reward(["the latest news today"], IDF) == 0.0
    assert specificity_reward(["unknownterm"], IDF) == 0.0  # not in the corpus: no credit
    assert specificity_reward(["bitcoin etf", "price"], IDF) == pytest.approx((0.75 + 0.1) / 2)
    assert specificity_reward(["bitcoin etf"], IDF, saturation=1.0) == 1.0
    assert specificity_reward([], IDF) == 0.0
    assert specificity_reward(["bitcoin"], {"bitcoin": -3.0}) == 0.0


def test_specificity_repeated_term_counts_once() -> None:
    assert specificity_reward(["bitcoin bitcoin Bitcoin"], IDF) == pytest.approx(0.5)


@pytest.mark.parametrize("saturation", [0.0, -1.0, math.nan])
def test_specificity_rejects_bad_saturation(saturation: float) -> None:
    with pytest.raises(ValueError, match="saturation"):
        specificity_reward(["bitcoin"], IDF, saturation=saturation)


words = st.text(alphabet="abcdefghij", min_size=2, max_size=6)


@settings(max_examples=100, deadline=None)
@given(
    queries=st.lists(st.lists(words, max_size=5).map(" ".join), min_size=1, max_size=4),
    idf=st.dictionaries(words, st.floats(0.0, 1.0), max_size=10),
    which=st.integers(0, 3),
    saturation=st.floats(0.1, 5.0),
)
def test_property_specificity_bounded_and_monotone(
    queries: list[str], idf: dict[str, float], which: int, saturation: float
) -> None:
    before = specificity_reward(queries, idf, saturation=saturation)
    assert 0.0 <= before <= 1.0
    rare = {**idf, "zzrare": 1.0}
    i = which % len(queries)
    appended = [*queries[:i], queries[i] + " zzrare", *queries[i + 1 :]]
    after = specificity_reward(appended, rare, saturation=saturation)
    assert before <= after <= 1.0


@settings(max_examples=50, deadline=None)
@given(doc_freq=st.dictionaries(words, st.integers(0, 50)), extra=st.integers(0, 50))
def test_property_normalized_idf_in_unit_interval(doc_freq: dict[str, int], extra: int) -> None:
    n_docs = max([1, *doc_freq.values()]) + extra
    assert all(0.0 <= v <= 1.0 for v in normalized_idf(doc_freq, n_docs).values())


# --- utility_reward / composite_reward -----------------------------------------------------


def test_marginal_utility_rewards_only_what_the_model_adds() -> None:
    from training.rewards import marginal_utility_reward

    without = ["n1", "n2", "n3"]
    # the model surfaces n9 (a held-out click) at the cost of n3 (not one): +1/2
    assert marginal_utility_reward(["n1", "n9", "n2"], without, {"n2", "n9"}, k=3) == pytest.approx(0.5)
    # it only repeats what the other channels found: nothing
    assert marginal_utility_reward(without, without, {"n2"}, k=3) == 0.0
    # it pushes a found click out of the top k: negative
    assert marginal_utility_reward(["n7", "n8", "n1"], without, {"n2"}, k=3) == pytest.approx(-1.0)


def test_utility_is_recall_at_k() -> None:
    ranked = ["n1", "n2", "n3", "n4"]
    assert utility_reward(ranked, {"n2", "n9"}) == pytest.approx(0.5)
    assert utility_reward(ranked, {"n4"}, k=3) == 0.0
    assert utility_reward(ranked, set()) == 0.0
    assert utility_reward([], {"n1"}) == 0.0
    with pytest.raises(ValueError, match="k must be"):
        utility_reward(ranked, {"n1"}, k=0)


def test_composite_weighted_mean() -> None:
    scores = {"align": 0.2, "coverage": 0.4, "specificity": 0.6, "diversity": 0.8, "format": 1.0, "utility": 0.0}
    uniform = dict.fromkeys(REWARD_NAMES[:5], 1.0)
    assert composite_reward(scores, uniform) == pytest.approx(0.6)
    assert composite_reward(scores, {**uniform, "utility": 5.0}) == pytest.approx(3.0 / 10)
    # zero-weighted names need no score
    assert composite_reward({"format": 0.5}, {"format": 2.0, "align": 0.0}) == 0.5


@pytest.mark.parametrize(
    ("scores", "weights", "message"),
    [
        ({"format": 1.0}, {"format": -1.0}, "must be a finite number >= 0"),
        ({"format": 1.0}, {"format": math.inf}, "must be a finite number >= 0"),
        ({"format": 1.0}, {"format": 0.0}, "at least one weight must be positive"),
        ({"format": 1.0}, {}, "at least one weight must be positive"),
        ({"format": 1.0}, {"format": 1.0, "align": 1.0}, "no score for weighted reward"),
        ({"format": math.nan}, {"format": 1.0}, "must be finite"),
    ],
)
def test_composite_errors(scores: dict, weights: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        composite_reward(scores, weights)


@settings(max_examples=100, deadline=None)
@given(
    scores=st.fixed_dictionaries({n: st.floats(0.0, 1.0) for n in REWARD_NAMES}),
    weights=st.fixed_dictionaries({n: st.floats(0.0, 10.0) for n in REWARD_NAMES}),
)
def test_property_composite_in_unit_interval(scores: dict[str, float], weights: dict[str, float]) -> None:
    if not any(w > 0 for w in weights.values()):
        weights = {**weights, "format": 1.0}
    assert 0.0 <= composite_reward(scores, weights) <= 1.0
