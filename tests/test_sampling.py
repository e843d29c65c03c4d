"""Temperature / nucleus sampling in ``OnnxCausalLM.sample`` (best-of-N, rejection sampling)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models.prompt import render_chatml
from models.runtime import OnnxCausalLM, _Sampler

# Different token lengths, so batches really mix left-padded rows.
PROMPTS = [
    render_chatml([{"role": "user", "content": "hi"}]),
    render_chatml([{"role": "user", "content": "Tell me the latest news about electric vehicle batteries"}]),
    render_chatml(
        [
            {"role": "system", "content": "You write news search queries."},
            {"role": "user", "content": "Recent activity: football transfers and a Federal Reserve decision."},
        ]
    ),
]
# The tiny random model's next-token distribution is nearly flat at T=1, so 12 tokens from
# different seeds agree only with negligible probability.
TOKENS = 12


@pytest.fixture(scope="module")
def lm(tiny_model_dir: Path) -> OnnxCausalLM:
    return OnnxCausalLM(tiny_model_dir, intra_op_threads=1)


def test_output_shape_and_stats(lm: OnnxCausalLM) -> None:
    out = lm.sample(PROMPTS, n=4, max_new_tokens=5, seed=0)
    assert len(out) == len(PROMPTS)
    assert all(len(group) == 4 and all(isinstance(t, str) for t in group) for group in out)
    ids = lm.sample_ids(PROMPTS, n=4, max_new_tokens=5, seed=0)
    assert [lm.tokenizer.batch_decode(g, skip_special_tokens=True) for g in ids] == out
    assert all(len(row) <= 5 for group in ids for row in group)
    stats = lm.last_stats
    assert stats is not None and stats.batch_size == 12 and stats.batches == 1
    assert 1 <= stats.new_tokens <= 5 and stats.total_s >= stats.prefill_s > 0
    assert lm.sample([], n=3) == []
    assert [len(g) for g in lm.sample(PROMPTS[:1], n=2, max_new_tokens=2)] == [2]  # seed=None works


def test_same_seed_same_output_different_seed_differs(lm: OnnxCausalLM) -> None:
    a = lm.sample(PROMPTS, n=3, max_new_tokens=TOKENS, seed=123)
    assert lm.sample(PROMPTS, n=3, max_new_tokens=TOKENS, seed=123) == a
    b = lm.sample(PROMPTS, n=3, max_new_tokens=TOKENS, seed=124)
    assert any(x != y for ga, gb in zip(a, b, strict=True) for x, y in zip(ga, gb, strict=True))
    # The n copies of one prompt are independent draws, not n copies of one draw.
    assert all(len(set(group)) > 1 for group in a)


def test_batching_does_not_change_results(lm: OnnxCausalLM) -> None:
    kwargs = {"n": 3, "max_new_tokens": TOKENS, "temperature": 0.9, "top_p": 0.95, "seed": 7}
    whole = lm.sample(PROMPTS, **kwargs)  # type: ignore[arg-type]
    # 2 splits a prompt's copies across batches and mixes prompts of different lengths.
    for batch_size in (1, 2, 4):
        assert lm.sample(PROMPTS, batch_size=batch_size, **kwargs) == whole  # type: ignore[arg-type]
        stats = lm.last_stats
        assert stats is not None and stats.batches == -(-9 // batch_size) and stats.batch_size == batch_size
    # A prompt's rows do not depend on the other prompts either (row seeds are by index).
    first = lm.sample(PROMPTS[:1], **kwargs)  # type: ignore[arg-type]
    assert first == whole[:1]


def test_low_temperature_and_tiny_top_p_match_greedy(lm: OnnxCausalLM) -> None:
    greedy = lm.generate(PROMPTS, max_new_tokens=TOKENS)
    expected = [[text] * 2 for text in greedy]
    assert lm.sample(PROMPTS, n=2, max_new_tokens=TOKENS, temperature=1e-4, seed=1) == expected
    assert lm.sample(PROMPTS, n=2, max_new_tokens=TOKENS, top_p=1e-9, seed=2) == expected
    assert lm.sample(PROMPTS, n=2, max_new_tokens=TOKENS, top_p=1e-9, seed=2, batch_size=4) == expected


def test_sampled_rows_stop_at_eos(tiny_model_dir: Path) -> None:
    lm = OnnxCausalLM(tiny_model_dir, intra_op_threads=1)
    first = lm.generate_ids([PROMPTS[0]], max_new_tokens=1)[0][0]
    lm.eos_ids = frozenset({first})  # the (near-)certain first token now ends every row
    assert lm.sample_ids([PROMPTS[0]], n=3, max_new_tokens=10, temperature=1e-4, seed=0) == [[[], [], []]]
    assert lm.last_stats is not None and lm.last_stats.new_tokens == 1


def test_sampler_follows_the_distribution() -> None:
    probs = np.array([0.6, 0.3, 0.1])
    rows = 20_000
    rngs = [np.random.default_rng(s) for s in np.random.SeedSequence(0).spawn(rows)]
    logits = np.tile(np.log(probs), (rows, 1)).astype(np.float32)
    counts = np.bincount(_Sampler(rngs, temperature=1.0, top_p=1.0)(logits), minlength=3) / rows
    assert np.allclose(counts, probs, atol=0.02)
    # top_p=0.8: {0, 1} is the smallest set reaching 0.8; renormalised to 2/3 and 1/3.
    counts = np.bincount(_Sampler(rngs, temperature=1.0, top_p=0.8)(logits), minlength=3) / rows
    assert counts[2] == 0 and np.allclose(counts[:2], [2 / 3, 1 / 3], atol=0.02)
    # Temperature 2 flattens: p ~ sqrt(probs).
    flat = np.sqrt(probs) / np.sqrt(probs).sum()
    counts = np.bincount(_Sampler(rngs, temperature=2.0, top_p=1.0)(logits), minlength=3) / rows
    assert np.allclose(counts, flat, atol=0.02)


def test_nucleus_keeps_smallest_set_reaching_top_p() -> None:
    sampler = _Sampler([], temperature=1.0, top_p=0.5)
    probs = np.array([[0.2, 0.5, 0.3], [0.25, 0.25, 0.5]])
    # Row 0: 0.5 alone reaches 0.5. Row 1: the top token alone reaches 0.5.
    assert (sampler._nucleus(probs) > 0).tolist() == [[False, True, False], [False, False, True]]
    sampler.top_p = 0.51
    assert (sampler._nucleus(probs) > 0).tolist() == [[False, True, True], [True, False, True]]
    sampler.top_p = 1e-9  # always at least the top token
    assert (sampler._nucleus(probs) > 0).sum(axis=1).tolist() == [1, 1]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n": 0}, r"n must be >= 1"),
        ({"temperature": 0.0}, r"temperature must be a finite number > 0"),
        ({"temperature": -1.0}, r"temperature must be a finite number > 0"),
        ({"temperature": float("nan")}, r"temperature must be a finite number > 0"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"top_p": float("nan")}, r"top_p must be in \(0, 1\]"),
        ({"batch_size": 0}, r"batch_size must be >= 1"),
    ],
)
def test_invalid_arguments(lm: OnnxCausalLM, kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        lm.sample(PROMPTS, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=message):
        lm.sample([], **kwargs)  # checked before the empty shortcut
