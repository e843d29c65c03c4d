"""Metric functions against hand-computed cases, plus property tests for their bounds."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from evaluation.metrics import (
    aggregate,
    bootstrap_ci,
    hit_rate_at_k,
    impression_auc,
    impression_mrr,
    impression_ndcg,
    interest_coverage,
    mrr,
    ndcg_at_k,
    query_diversity,
    recall_at_k,
    top_k,
)

RANKED = ["a", "b", "c", "d", "e"]


def test_recall_divides_by_all_relevant_items() -> None:
    assert recall_at_k(RANKED, {"b", "d"}, 5) == 1.0
    assert recall_at_k(RANKED, {"b", "d"}, 2) == 0.5
    # 3 relevant, one in the top 2: 1/3 (not 1/min(3, 2))
    assert recall_at_k(RANKED, {"a", "x", "y"}, 2) == pytest.approx(1 / 3)
    assert recall_at_k(RANKED, {"x"}, 5) == 0.0
    assert recall_at_k([], {"x"}, 5) == 0.0
    assert recall_at_k(RANKED, set(), 5) == 0.0


def test_duplicates_count_once() -> None:
    assert top_k(["a", "a", "b", "a", "c"], 2) == ["a", "b"]
    assert recall_at_k(["a", "a", "a"], {"a", "b"}, 3) == 0.5
    assert ndcg_at_k(["a", "a"], {"a", "b"}, 2) <= 1.0


def test_ndcg_hand_computed() -> None:
    # relevant at ranks 2 and 4 of 5, two relevant: DCG = 1/log2(3) + 1/log2(5); IDCG = 1 + 1/log2(3)
    expected = (1 / math.log2(3) + 1 / math.log2(5)) / (1 + 1 / math.log2(3))
    assert ndcg_at_k(RANKED, {"b", "d"}, 5) == pytest.approx(expected)
    # k=1 cuts both hits off
    assert ndcg_at_k(RANKED, {"b", "d"}, 1) == 0.0
    # one relevant at rank 3: 1/log2(4) = 0.5
    assert ndcg_at_k(RANKED, {"c"}, 5) == pytest.approx(0.5)
    # more relevant than k: the ideal fills all k slots
    assert ndcg_at_k(["a", "b"], {"a", "b", "c"}, 2) == pytest.approx(1.0)
    assert ndcg_at_k(RANKED, {"x"}, 5) == 0.0


def test_mrr_and_hit_rate() -> None:
    assert mrr(RANKED, {"c", "e"}) == pytest.approx(1 / 3)
    assert mrr(RANKED, {"a"}) == 1.0
    assert mrr(RANKED, {"x"}) == 0.0
    assert mrr(RANKED, {"e"}, k=4) == 0.0
    assert mrr([], {"x"}) == 0.0
    assert hit_rate_at_k(RANKED, {"e"}, 5) == 1.0
    assert hit_rate_at_k(RANKED, {"e"}, 4) == 0.0


def test_k_must_be_positive() -> None:
    with pytest.raises(ValueError):
        recall_at_k(RANKED, {"a"}, 0)


def test_interest_coverage_counts_clusters_not_items() -> None:
    cluster = {"t1": "soccer", "t2": "soccer", "t3": "markets", "t4": "", "r1": "soccer", "r2": "tv"}
    # target clusters {soccer, markets} ("" ignored, unknown ignored); recommended touch soccer only
    assert interest_coverage(["r1", "r2"], ["t1", "t2", "t3", "t4", "zz"], cluster) == 0.5
    assert interest_coverage(["r1", "t3"], ["t1", "t3"], cluster) == 1.0
    assert interest_coverage([], ["t1"], cluster) == 0.0
    assert interest_coverage(["r1"], ["zz"], cluster) == 0.0


def test_query_diversity() -> None:
    assert query_diversity(np.zeros((0, 3))) == 0.0
    assert query_diversity([[1.0, 0.0]]) == 0.0
    assert query_diversity([[1.0, 0.0], [2.0, 0.0]]) == pytest.approx(0.0)
    assert query_diversity([[1.0, 0.0], [0.0, 3.0]]) == pytest.approx(1.0)
    # three vectors: pairs (0,1) orthogonal=1, (0,2) same=0, (1,2) orthogonal=1 -> 2/3
    assert query_diversity([[1.0, 0.0], [0.0, 1.0], [5.0, 0.0]]) == pytest.approx(2 / 3)
    assert query_diversity([[1.0, 0.0], [-1.0, 0.0]]) == pytest.approx(2.0)
    assert query_diversity([[0.0, 0.0], [1.0, 0.0]]) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        query_diversity([1.0, 2.0])


def test_aggregate_overall_and_cold() -> None:
    rows = [
        {"user_id": "u1", "cold": True, "recall@5": 1.0, "n_queries": 2, "query_diversity": None},
        {"user_id": "u2", "cold": False, "recall@5": 0.0, "n_queries": 4, "query_diversity": 0.5},
        {"user_id": "u3", "cold": True, "recall@5": 0.5, "n_queries": 3, "query_diversity": 0.3},
    ]
    agg = aggregate(rows)
    assert agg["all"] == {"n": 3, "recall@5": 0.5, "n_queries": 3.0, "query_diversity": pytest.approx(0.4)}
    assert agg["cold"] == {"n": 2, "recall@5": 0.75, "n_queries": 2.5, "query_diversity": pytest.approx(0.3)}
    empty = aggregate([{"user_id": "u", "cold": False, "recall@5": 1.0}])
    assert empty["cold"] == {"n": 0, "recall@5": None}
    assert aggregate([]) == {"all": {"n": 0}, "cold": {"n": 0}}


ids = st.sampled_from(list("abcdefghij"))
ranked_lists = st.lists(ids, max_size=12)
relevant_sets = st.sets(ids, min_size=1, max_size=6)
ks = st.integers(min_value=1, max_value=12)


@given(ranked_lists, relevant_sets, ks)
def test_ranking_metrics_are_in_unit_interval(ranked: list[str], relevant: set[str], k: int) -> None:
    for value in (recall_at_k(ranked, relevant, k), ndcg_at_k(ranked, relevant, k), hit_rate_at_k(ranked, relevant, k),
                  mrr(ranked, relevant), mrr(ranked, relevant, k)):
        assert 0.0 <= value <= 1.0 + 1e-12


@given(ranked_lists, relevant_sets, ks)
def test_recall_and_hit_rate_are_monotone_in_k(ranked: list[str], relevant: set[str], k: int) -> None:
    assert recall_at_k(ranked, relevant, k) <= recall_at_k(ranked, relevant, k + 1)
    assert hit_rate_at_k(ranked, relevant, k) <= hit_rate_at_k(ranked, relevant, k + 1)


@given(relevant_sets, st.lists(ids, max_size=5), ks)
def test_perfect_ranking_has_ndcg_one(relevant: set[str], tail: list[str], k: int) -> None:
    ranked = sorted(relevant) + [t for t in tail if t not in relevant]
    assert ndcg_at_k(ranked, relevant, k) == pytest.approx(1.0)
    assert mrr(ranked, relevant) == 1.0


@given(st.lists(st.lists(st.floats(-10, 10, allow_nan=False), min_size=3, max_size=3), max_size=8))
def test_query_diversity_bounds(vectors: list[list[float]]) -> None:
    value = query_diversity(np.array(vectors, dtype=np.float64).reshape(len(vectors), 3))
    assert 0.0 <= value <= 2.0


@given(st.lists(ids, max_size=10), st.lists(ids, min_size=1, max_size=6))
def test_coverage_bounds(recommended: list[str], targets: list[str]) -> None:
    cluster = {c: c.upper() if c < "f" else "other" for c in "abcdefghij"}
    assert 0.0 <= interest_coverage(recommended, targets, cluster) <= 1.0


# ---------------------------------------------------------------------------- impression metrics


def test_impression_auc_hand_computed() -> None:
    # clicked scores {0.9, 0.5}, not clicked {0.2, 0.5}: pairs (0.9>0.2)=1, (0.9>0.5)=1, (0.5>0.2)=1,
    # (0.5=0.5)=1/2 -> 3.5 / 4
    assert impression_auc([0.9, 0.2, 0.5, 0.5], [1, 0, 1, 0]) == pytest.approx(0.875)
    assert impression_auc([0.1, 0.9], [1, 0]) == 0.0
    assert impression_auc([3.0, 3.0, 3.0], [1, 0, 0]) == 0.5  # all tied: every pair 1/2


def test_single_class_impressions_are_undefined_not_zero() -> None:
    assert impression_auc([0.3, 0.2], [1, 1]) is None
    assert impression_auc([0.3, 0.2], [0, 0]) is None
    assert impression_mrr([0.3, 0.2], [0, 0]) is None
    assert impression_ndcg([0.3, 0.2], [0, 0], 5) is None
    # all clicked: MRR and nDCG are defined. MRR = (1/1 + 1/2) / 2; nDCG of any order = 1
    assert impression_mrr([0.3, 0.2], [1, 1]) == pytest.approx(0.75)
    assert impression_ndcg([0.2, 0.3], [1, 1], 5) == pytest.approx(1.0)


def test_impression_mrr_hand_computed() -> None:
    # by score: 0.9 (no), 0.5 (click), 0.3 (no), 0.1 (click): clicks at ranks 2 and 4 -> (1/2 + 1/4) / 2
    assert impression_mrr([0.1, 0.9, 0.5, 0.3], [1, 0, 1, 0]) == pytest.approx(0.375)
    # equal scores keep the shown order: the click is second -> 1/2
    assert impression_mrr([0.5, 0.5], [0, 1]) == 0.5


def test_impression_ndcg_hand_computed() -> None:
    # ranked labels [0, 1, 0, 1]: DCG@4 = (2^1-1)/log2(3) + (2^1-1)/log2(5); ideal [1, 1, 0, 0]: 1/log2(2) + 1/log2(3)
    scores, labels = [0.1, 0.9, 0.5, 0.3], [1, 0, 1, 0]
    ideal = 1 + 1 / math.log2(3)
    assert impression_ndcg(scores, labels, 4) == pytest.approx((1 / math.log2(3) + 1 / math.log2(5)) / ideal)
    # @2: only the click at rank 2 counts: (1/log2(3)) / (1 + 1/log2(3))
    assert impression_ndcg(scores, labels, 2) == pytest.approx((1 / math.log2(3)) / ideal)
    # @1: the top item was not clicked
    assert impression_ndcg(scores, labels, 1) == 0.0


@pytest.mark.parametrize(("scores", "labels", "message"), [
    ([0.1, 0.2], [1], "one length"),
    ([], [], "at least one candidate"),
    ([float("nan"), 0.2], [1, 0], "finite"),
    ([0.1, 0.2], [2, 0], "labels must be 0"),
])
def test_impression_metrics_reject_bad_input(scores: list[float], labels: list[int], message: str) -> None:
    for fn in (impression_auc, impression_mrr, lambda s, y: impression_ndcg(s, y, 5)):
        with pytest.raises(ValueError, match=message):
            fn(scores, labels)
    with pytest.raises(ValueError, match="k must be at least 1"):
        impression_ndcg([0.1], [1], 0)


def _rank_auc(scores: list[float], labels: list[int]) -> float:
    # Mann-Whitney U with average ranks of ties: an independent route to the same AUC.
    order = sorted(scores)
    rank = {v: (order.index(v) + 1 + len(order) - order[::-1].index(v)) / 2 for v in scores}
    pos = [s for s, y in zip(scores, labels, strict=True) if y]
    n_pos, n_neg = len(pos), len(scores) - len(pos)
    return (sum(rank[s] for s in pos) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


impressions = st.lists(st.tuples(st.integers(0, 5).map(float), st.integers(0, 1)), min_size=1, max_size=15)


@given(impressions)
def test_impression_metric_properties(imp: list[tuple[float, int]]) -> None:
    scores, labels = [s for s, _ in imp], [y for _, y in imp]
    auc = impression_auc(scores, labels)
    if auc is None:
        assert len(set(labels)) == 1
    else:
        assert 0.0 <= auc <= 1.0
        assert auc == pytest.approx(_rank_auc(scores, labels))
        # reversing the scores swaps every won and lost pair
        assert impression_auc([-s for s in scores], labels) == pytest.approx(1.0 - auc)
    for value in (impression_mrr(scores, labels), impression_ndcg(scores, labels, 3)):
        assert value is None if not any(labels) else 0.0 <= value <= 1.0 + 1e-12
    if any(labels):  # scoring by the labels is the ideal order
        assert impression_ndcg([float(y) for y in labels], labels, 3) == pytest.approx(1.0)


def test_bootstrap_ci_hand_computed() -> None:
    # a constant has no spread
    assert bootstrap_ci([2.0, 2.0, 2.0], seed=1) == (2.0, 2.0, 2.0)
    # paired: a - b is 1 for every pair whatever b is, so the difference is exactly 1
    assert bootstrap_ci([3.0, 1.0, 6.0], [2.0, 0.0, 5.0], seed=1) == (1.0, 1.0, 1.0)
    # {0, 1}: a resample of 2 is all 0 with probability 1/4 and all 1 with 1/4, both > alpha/2 = 2.5%,
    # so the 95% interval spans [0, 1] around the mean 0.5
    assert bootstrap_ci([0.0, 1.0], n=2000, seed=7) == (0.5, 0.0, 1.0)


@given(st.lists(st.floats(-5, 5), min_size=1, max_size=30), st.integers(0, 2**32))
def test_bootstrap_ci_is_repeatable_and_inside_the_data(values: list[float], seed: int) -> None:
    mean, low, high = bootstrap_ci(values, n=200, seed=seed)
    assert (mean, low, high) == bootstrap_ci(values, n=200, seed=seed)
    assert min(values) - 1e-9 <= low <= high <= max(values) + 1e-9
    assert mean == pytest.approx(float(np.mean(values)))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"values_a": [], "seed": 0}, "non-empty"),
    ({"values_a": [1.0], "values_b": [1.0, 2.0], "seed": 0}, "one length"),
    ({"values_a": [float("nan")], "seed": 0}, "finite"),
    ({"values_a": [1.0], "n": 0, "seed": 0}, "at least 1"),
    ({"values_a": [1.0], "alpha": 1.0, "seed": 0}, "alpha"),
])
def test_bootstrap_ci_rejects_bad_input(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        bootstrap_ci(**kwargs)  # type: ignore[arg-type]
