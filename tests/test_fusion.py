import pytest
from hypothesis import given
from hypothesis import strategies as st

from index.base import Hit
from index.fusion import RRF_K, rrf_fuse


def hits(*ids: str) -> list[Hit]:
    return [Hit(i, f"title {i}", 1.0) for i in ids]


def test_rrf_rewards_items_found_by_several_queries():
    fused = rrf_fuse(["q1", "q2"], [hits("a", "b", "c"), hits("c", "d")], limit=10)
    assert [f.news_id for f in fused] == ["c", "a", "b", "d"]  # b, d tie: id order
    assert fused[0].score == pytest.approx(round(1 / (RRF_K + 3) + 1 / (RRF_K + 1), 6))
    assert fused[0].query == "q2"  # ranked best by q2


def test_rrf_excludes_clicked_and_limits():
    fused = rrf_fuse(["q"], [hits("a", "b", "c")], limit=1, exclude={"a"})
    assert [f.news_id for f in fused] == ["b"]


def test_rrf_rejects_mismatched_inputs():
    with pytest.raises(ValueError):
        rrf_fuse(["q1", "q2"], [hits("a")], limit=3)


@given(st.lists(st.lists(st.sampled_from("abcdefgh"), max_size=8), max_size=5), st.integers(1, 10),
       st.sets(st.sampled_from("abcdefgh")))
def test_rrf_output_unique_sorted_and_clean(lists, limit, exclude):
    queries = [f"q{i}" for i in range(len(lists))]
    fused = rrf_fuse(queries, [hits(*ids) for ids in lists], limit=limit, exclude=exclude)
    ids = [f.news_id for f in fused]
    assert len(ids) == len(set(ids)) <= limit
    assert not set(ids) & exclude
    assert [f.score for f in fused] == sorted((f.score for f in fused), reverse=True)
    assert set(ids) <= {i for lst in lists for i in lst}
