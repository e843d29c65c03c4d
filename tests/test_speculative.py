"""Prompt-lookup decoding and the stop after N queries: the same greedy tokens as plain decoding."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from models import runtime as runtime_mod
from models.bootstrap import bootstrap, default_cache_dir
from models.export import LOGITS_WINDOW, parity_prompts
from models.prompt import build_prompt, parse_queries, render_chatml
from models.runtime import OnnxCausalLM, PromptLookup, draft_by_lookup
from streams.window import Signal

LOOKUP = PromptLookup(max_ngram=3, min_ngram=1, draft_tokens=4)
# Different lengths, so rows are left-padded differently.
TINY_PROMPTS = [
    render_chatml([{"role": "user", "content": "hi"}]),
    render_chatml([{"role": "user", "content": "electric vehicle battery recycling, electric vehicle battery"}]),
    render_chatml([{"role": "user", "content": "a b c d e f g a b c d e f g a b c"}]),
]


def test_draft_prefers_the_longest_latest_match() -> None:
    lookup = PromptLookup(max_ngram=2, min_ngram=1, draft_tokens=3)
    # Tail (7, 8): its 2-gram match at 1 beats the later 1-gram match of 8 at 5.
    assert draft_by_lookup([7, 8, 9, 10, 11, 8, 12, 7, 8], lookup, 3) == [9, 10, 11]
    assert draft_by_lookup([7, 8, 9, 7, 8, 5, 7, 8], lookup, 3) == [5, 7, 8]  # the latest occurrence
    assert draft_by_lookup([1, 2, 3, 4, 2], lookup, 3) == [3, 4, 2]  # 1-gram fallback
    assert draft_by_lookup([1, 2, 3, 4, 2], lookup, 1) == [3]  # the limit caps the draft
    assert draft_by_lookup([1, 2, 3, 4, 5], lookup, 3) == []  # no earlier occurrence
    assert draft_by_lookup([1, 2, 1], PromptLookup(max_ngram=3, min_ngram=2), 3) == []  # below min_ngram
    assert draft_by_lookup([1, 2, 1], lookup, 0) == []


@pytest.fixture(scope="module")
def tiny_plain(tiny_model_dir: Path) -> OnnxCausalLM:
    return OnnxCausalLM(tiny_model_dir, intra_op_threads=1)


@pytest.fixture(scope="module")
def tiny_expected(tiny_plain: OnnxCausalLM) -> list[list[int]]:
    return tiny_plain.generate_ids(TINY_PROMPTS, max_new_tokens=24)


def _oracle(lm: OnnxCausalLM, expected: list[list[int]], mode: str):  # type: ignore[no-untyped-def]
    """A drafter that knows greedy's answer: drafts it right, right then wrong, or all wrong."""
    prompts = [lm.tokenizer(p, add_special_tokens=False)["input_ids"] for p in TINY_PROMPTS]

    def draft(context: Sequence[int], lookup: PromptLookup, limit: int) -> list[int]:
        row = next(r for r, p in enumerate(prompts) if list(context[: len(p)]) == p)
        done = len(context) - len(prompts[row])
        right = expected[row][done : done + limit]
        if mode == "right":
            return right
        wrong = [(t + 1) % lm._vocab for t in right]
        return right[:-1] + wrong[-1:] if mode == "right-then-wrong" else wrong

    return draft


@pytest.mark.parametrize("mode", ["right", "right-then-wrong", "wrong"])
def test_verified_drafts_never_change_greedy_tokens(tiny_model_dir: Path, tiny_expected: list[list[int]],
                                                    mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    lm = OnnxCausalLM(tiny_model_dir, intra_op_threads=1, prompt_lookup=LOOKUP)
    monkeypatch.setattr(runtime_mod, "draft_by_lookup", _oracle(lm, tiny_expected, mode))
    assert lm.generate_ids(TINY_PROMPTS, max_new_tokens=24) == tiny_expected
    stats = lm.last_stats
    assert stats is not None and stats.drafted > 0
    if mode == "wrong":
        assert stats.accepted == 0 and stats.new_tokens == 24  # one pass per token, as without drafts
    else:
        assert stats.accepted > 0 and stats.new_tokens < 24  # accepted drafts saved passes


@pytest.mark.parametrize("lookup", [None, LOOKUP])
def test_a_stopped_row_ends_while_the_others_go_on(tiny_model_dir: Path, tiny_expected: list[list[int]],
                                                   lookup: PromptLookup | None,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    lm = OnnxCausalLM(tiny_model_dir, intra_op_threads=1, prompt_lookup=lookup, max_queries=1)
    # Row 1 "completes its list" after 5 tokens.
    monkeypatch.setattr(lm, "_ends_list", lambda token, ids: ids == tiny_expected[1][:5])
    out = lm.generate_ids(TINY_PROMPTS, max_new_tokens=24)
    assert out == [tiny_expected[0], tiny_expected[1][:5], tiny_expected[2]]


def test_the_list_ends_at_the_newline_before_the_next_item(tiny_plain: OnnxCausalLM) -> None:
    lm = OnnxCausalLM(tiny_plain.model_dir, intra_op_threads=1, max_queries=2)
    ids = lm.tokenizer("Queries:\n1. heat pump cost\n2. Lisbon rentals\n3. NBA trades\n", add_special_tokens=False)[
        "input_ids"]
    ends = [i for i in range(len(ids)) if lm._ends_list(ids[i], ids[: i + 1])]
    assert ends, "never stopped"
    assert lm.tokenizer.decode(ids[: ends[0] + 1]).rstrip(" ") == "Queries:\n1. heat pump cost\n2. Lisbon rentals\n"
    no_stop = OnnxCausalLM(tiny_plain.model_dir, intra_op_threads=1)
    assert not any(no_stop._ends_list(ids[i], ids[: i + 1]) for i in range(len(ids)))


# --- the packaged SmolLM2 (exported once into the cache, minutes) ----------------------------------


@pytest.fixture(scope="module")
def smollm2_dir() -> Path:
    out = default_cache_dir() / f"bootstrap-onnx-window{LOGITS_WINDOW}"
    bootstrap(out)
    return out


def _query_prompts() -> list[str]:
    now = datetime(2025, 1, 6, 12, 0, tzinfo=UTC)
    texts = [("search", "electric vehicle battery recycling"), ("news_click", "Champions League quarter-final draw"),
             ("browse", "Lisbon apartment rentals"), ("search", "federal reserve interest rate decision")]
    return [build_prompt([Signal(f"s{i}-{j}", d, t, now - timedelta(hours=j + 1))
                          for j, (d, t) in enumerate(texts[i:] + texts[:i])], now=now) for i in range(3)]


def test_smollm2_lookup_gives_plain_greedy_tokens(smollm2_dir: Path) -> None:
    prompts = [*parity_prompts(), *_query_prompts()]
    plain = OnnxCausalLM(smollm2_dir, intra_op_threads=2).generate_ids(prompts, max_new_tokens=48)
    lm = OnnxCausalLM(smollm2_dir, intra_op_threads=2, prompt_lookup=PromptLookup())
    assert lm.generate_ids(prompts, max_new_tokens=48) == plain
    assert lm.last_stats is not None and lm.last_stats.accepted > 0  # queries copy words from the signals


def test_smollm2_stops_after_the_configured_queries(smollm2_dir: Path) -> None:
    prompts = _query_prompts()
    full = OnnxCausalLM(smollm2_dir, intra_op_threads=2).generate(prompts, max_new_tokens=48)
    lm = OnnxCausalLM(smollm2_dir, intra_op_threads=2, prompt_lookup=PromptLookup(), max_queries=2)
    stopped = lm.generate(prompts, max_new_tokens=48)
    for short, long in zip(stopped, full, strict=True):
        assert long.startswith(short)
        assert parse_queries(short, max_queries=2) == parse_queries(long, max_queries=2)
    assert any(len(short) < len(long) for short, long in zip(stopped, full, strict=True))
