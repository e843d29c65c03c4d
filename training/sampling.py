"""Best-of-N: inference-time scaling of a query writer, selected by the rewards that need no future.

Each prompt is sampled N times; the completion with the best composite of the paper's five
test-time rewards (align, coverage, specificity, diversity, format; ``utility`` needs held-out
clicks, so it never selects) is kept. The same selection serves three users:

- ``newsrec study sampling`` (how quality grows with N),
- the teacher of sequence-level distillation (``newsrec distill --method sequence``: the
  student learns the teacher's selected outputs),
- ``newsrec eval --model best-of-N:DIR`` (the teacher as a channel, measured like any model).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from tqdm import tqdm

from streams.recommend import RecommendConfig, parse_completion, user_prompt
from streams.window import UserState
from training.rewards import composite_reward
from training.scoring import RewardScorer, UserContext

# Rows (prompts x samples) decoded together: the KV cache grows with rows x tokens, and an
# unbounded batch (32 users x 8 samples) took over 10 GB here.
SAMPLE_ROWS = 64

# Test-time selection: the paper's five rewards, uniform (utility needs the future).
SELECTION_WEIGHTS: Mapping[str, float] = {"align": 1.0, "coverage": 1.0, "specificity": 1.0, "diversity": 1.0,
                                          "format": 1.0}


def best_of(scores: Sequence[float], n: int) -> int:
    """Index of the best of the first ``n`` scores (the earliest on ties)."""
    if n < 1 or n > len(scores):
        raise ValueError(f"n must be in 1..{len(scores)}, got {n}")
    return max(range(n), key=lambda i: (scores[i], -i))


@dataclass(frozen=True)
class Samples:
    """``n`` completions per prompt, their composite selection reward and token counts."""

    texts: list[list[str]]
    rewards: list[list[float]]
    tokens: list[list[int]]
    sample_s: float
    score_s: float

    def best(self, n: int | None = None) -> list[int]:
        """Per prompt, the index of the best of its first ``n`` samples (all by default)."""
        return [best_of(r, n or len(r)) for r in self.rewards]

    def selected(self, n: int | None = None) -> list[str]:
        return [texts[i] for texts, i in zip(self.texts, self.best(n), strict=True)]


def sample_and_score(lm: Any, scorer: RewardScorer, prompts: Sequence[str], contexts: Sequence[UserContext], *,
                     n: int, max_new_tokens: int, temperature: float = 0.9, top_p: float = 1.0, seed: int = 0,
                     batch_prompts: int | None = None, weights: Mapping[str, float] = SELECTION_WEIGHTS,
                     progress: bool = False) -> Samples:
    """Sample ``n`` completions per prompt with ``lm`` (``OnnxCausalLM``) and score each one."""
    if len(prompts) != len(contexts):
        raise ValueError(f"{len(prompts)} prompts for {len(contexts)} contexts")
    batch_prompts = batch_prompts or max(1, SAMPLE_ROWS // n)
    t0 = time.perf_counter()
    texts: list[list[str]] = []
    tokens: list[list[int]] = []
    for start in tqdm(range(0, len(prompts), batch_prompts), desc=f"sampling {n}/prompt", disable=not progress):
        ids = lm.sample_ids(prompts[start: start + batch_prompts], n=n, max_new_tokens=max_new_tokens,
                            temperature=temperature, top_p=top_p, seed=seed + start)
        tokens += [[len(x) for x in per_prompt] for per_prompt in ids]
        texts += [[lm.tokenizer.decode(x, skip_special_tokens=True) for x in per_prompt] for per_prompt in ids]
    t1 = time.perf_counter()
    rewards = [[composite_reward(r, weights) for r in scorer.score(row, [ctx] * len(row))]
               for ctx, row in zip(contexts, texts, strict=True)]
    return Samples(texts, rewards, tokens, t1 - t0, time.perf_counter() - t1)


class BestOfN:
    """A query method: the model sampled ``n`` times per user, the best completion by the
    selection rewards served (the teacher with inference-time scaling)."""

    kind: Literal["queries"] = "queries"

    def __init__(self, lm: Any, scorer: RewardScorer, n: int, *, temperature: float = 0.9, seed: int = 0,
                 name: str | None = None) -> None:
        if n < 1:
            raise ValueError(f"best-of-N needs N >= 1, got {n}")
        self.lm, self.scorer, self.n, self.temperature, self.seed = lm, scorer, n, temperature, seed
        self.version = lm.version
        self.name = name or f"best-of-{n}:{lm.version or 'unversioned'}"
        self._calls = 0

    def queries(self, states: Sequence[UserState], cfg: RecommendConfig, *, now: datetime | None = None
                ) -> list[list[str]]:
        prompts = [user_prompt(s, cfg, now) for s in states]
        contexts = [self.scorer.context(s, prompt_signals=cfg.prompt_signals, utility=False) for s in states]
        self._calls += 1  # each batch draws fresh samples, reproducibly
        samples = sample_and_score(self.lm, self.scorer, prompts, contexts, n=self.n,
                                   max_new_tokens=cfg.max_new_tokens, temperature=self.temperature,
                                   seed=self.seed + 100_003 * self._calls)
        return [parse_completion(text, cfg) for text in samples.selected()]
