"""Optional short SFT warm start on the output format, before GRPO (TRL ``SFTTrainer``).

A small base model rarely writes a clean list of short queries when sampled (SmolLM2-135M at
temperature 0.9 mostly copies whole titles or adds a preamble), so the ``format`` reward
starts at zero for every sample of a group and GRPO gets no signal from it. The warm start
teaches only the shape: its targets are built from the user's own window by a pure rule
(the rarest words of each distinct signal, in their original order, as a numbered list),
never from held-out clicks, so it cannot leak the evaluation targets.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from evaluation.dataset import load_dataset
from evaluation.evaluate import WindowConfig, training_users
from streams.recommend import RecommendConfig, user_prompt
from training.rewards import STOPWORDS, normalized_idf, query_terms

log = logging.getLogger(__name__)

_WORD = re.compile(r"[^\W_]+(?:['’.&-][^\W_]+)*", re.UNICODE)


def keyphrase(text: str, idf: Mapping[str, float], *, max_terms: int = 4, min_idf: float = 0.3) -> str:
    """The ``max_terms`` rarest corpus words of ``text`` (IDF >= ``min_idf``), kept in text order."""
    words = [w for w in _WORD.findall(text) if len(w) > 1 and w.casefold() not in STOPWORDS]
    scored = [(idf.get(w.casefold(), 0.0), i, w) for i, w in enumerate(words)]
    keep = sorted((s for s in scored if s[0] >= min_idf), key=lambda s: (-s[0], s[1]))[:max_terms]
    return " ".join(w for _, _, w in sorted(keep, key=lambda s: s[1]))


def demonstration(signal_texts: Sequence[str], idf: Mapping[str, float], *, max_queries: int = 5,
                  max_terms: int = 4) -> str:
    """A numbered list of keyphrase queries, one per distinct signal (newest first); a phrase
    that would copy a whole signal, or repeat an earlier one, is skipped."""
    signals = {t.casefold().strip() for t in signal_texts}
    seen: set[frozenset[str]] = set()
    queries: list[str] = []
    for text in signal_texts:
        phrase = keyphrase(text, idf, max_terms=max_terms)
        key = frozenset(w.casefold() for w in phrase.split())
        if not phrase or phrase.casefold() in signals or key in seen:
            continue
        seen.add(key)
        queries.append(phrase)
        if len(queries) == max_queries:
            break
    return "\n".join(f"{i}. {q}" for i, q in enumerate(queries, 1))


@dataclass(frozen=True)
class WarmStartConfig:
    train_data: Path
    output_dir: Path
    base_model: str = "smollm2"
    users: int = 256  # the first N target users of train_data
    epochs: float = 1.0
    learning_rate: float = 5e-5
    batch_size: int = 8
    min_queries: int = 3  # users whose window yields fewer distinct phrases are left out
    threads: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.users < 1 or self.batch_size < 1 or self.min_queries < 1:
            raise ValueError("users, batch_size and min_queries must be at least 1")
        if not 0 < self.epochs <= 20:
            raise ValueError(f"epochs must be in (0, 20], got {self.epochs}")
        if not 0 < self.learning_rate < 1:
            raise ValueError(f"learning_rate: expected a small positive number such as 5e-5, got {self.learning_rate}")


def demonstrations(cfg: WarmStartConfig, recommend: RecommendConfig) -> list[dict[str, str]]:
    """Prompt/completion pairs (the worker's prompt; the rule's list) for the first ``cfg.users`` users."""
    from index.dense import article_text

    dataset = load_dataset(cfg.train_data)
    doc_freq = Counter(t for a in dataset.news for t in set(query_terms(article_text(a))))
    idf = normalized_idf(doc_freq, len(dataset.news))
    rows = []
    for user in training_users(dataset, WindowConfig.from_settings(), limit=cfg.users):
        texts = [s.text for s in user.state.signals[: recommend.prompt_signals]]
        completion = demonstration(texts, idf, max_queries=recommend.max_queries)
        if completion.count("\n") + 1 >= cfg.min_queries:
            rows.append({"prompt": user_prompt(user.state, recommend, user.now), "completion": completion})
    return rows


def sft(model, tokenizer, rows: Sequence[Mapping[str, str]], out_dir: Path, *, epochs: float, learning_rate: float,  # type: ignore[no-untyped-def]
        batch_size: int, seed: int, max_steps: int = -1, progress: bool = True) -> dict[str, Any]:
    """TRL SFT on prompt/completion rows (loss on the completion only); saves model + tokenizer in ``out_dir``.

    ``max_steps`` > 0 overrides ``epochs``."""
    import torch
    from datasets import Dataset as HFDataset
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(
        output_dir=str(out_dir / "sft-checkpoints"), num_train_epochs=epochs, max_steps=max_steps,
        per_device_train_batch_size=batch_size,
        learning_rate=learning_rate, lr_scheduler_type="cosine", completion_only_loss=True, logging_steps=1,
        save_strategy="no", report_to=[], seed=seed, use_cpu=not torch.cuda.is_available(), bf16=False,
        disable_tqdm=not progress, eos_token=tokenizer.eos_token,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=HFDataset.from_list(list(rows)),
                         processing_class=tokenizer)
    trainer.train()
    trainer.save_model(str(out_dir))
    tokenizer.save_pretrained(out_dir)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"examples": len(rows), "steps": trainer.state.global_step,
            "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
            "history": list(trainer.state.log_history)}


def warm_start(cfg: WarmStartConfig, *, progress: bool = True) -> dict[str, Any]:
    """SFT ``base_model`` on the demonstrations; saves ``output_dir`` (+ ``warmstart.json``)."""
    import torch
    from transformers import AutoTokenizer

    from training.grpo import load_policy, resolve_base_model

    started = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    rows = demonstrations(cfg, RecommendConfig.from_settings())
    if not rows:
        raise ValueError(f"{cfg.train_data}: no user window yields {cfg.min_queries}+ distinct query phrases")
    base_dir = resolve_base_model(cfg.base_model)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    result = sft(load_policy(base_dir), tokenizer, rows, cfg.output_dir, epochs=cfg.epochs,
                 learning_rate=cfg.learning_rate, batch_size=cfg.batch_size, seed=cfg.seed, progress=progress)
    summary = {"config": json.loads(json.dumps(asdict(cfg), default=str)),
               **{k: v for k, v in result.items() if k != "history"},
               "wall_s": round(time.perf_counter() - started, 1), "example": rows[0]}
    (cfg.output_dir / "warmstart.json").write_text(json.dumps(summary, indent=2))
    return summary
