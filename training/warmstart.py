"""Optional short SFT warm start before GRPO (TRL ``SFTTrainer``), in one of two modes.

``window`` (default) teaches the output format only. A small base model rarely writes a clean
list of short queries when sampled (SmolLM2-135M at temperature 0.9 mostly copies whole titles
or adds a preamble), so the ``format`` reward starts at zero for every sample of a group and
GRPO gets no signal from it. Its lists come from the user's own window by a pure rule (the
rarest words of each distinct signal, in their original order, as a numbered list).

``next-clicks`` teaches what to look for (GPT4Rec-style): the list opens with the titles of the
news the user clicked next (a title is a good search query for itself and for its neighbours),
then the window's keyphrases fill it up. Those clicks come from
``training_users`` only: the training days of a dataset with impressions, never a held-out
user, so the evaluation's targets never reach the model.
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

from evaluation.dataset import dataset_dirs, load_dataset
from evaluation.evaluate import WindowConfig, training_users
from streams.recommend import RecommendConfig, user_prompt
from training.rewards import STOPWORDS, FormatRules, normalized_idf, query_terms

log = logging.getLogger(__name__)

_WORD = re.compile(r"[^\W_]+(?:['’.&-][^\W_]+)*", re.UNICODE)


def keyphrase(text: str, idf: Mapping[str, float], *, max_terms: int = 4, min_idf: float = 0.3) -> str:
    """The ``max_terms`` rarest corpus words of ``text`` (IDF >= ``min_idf``), kept in text order."""
    words = [w for w in _WORD.findall(text) if len(w) > 1 and w.casefold() not in STOPWORDS]
    scored = [(idf.get(w.casefold(), 0.0), i, w) for i, w in enumerate(words)]
    keep = sorted((s for s in scored if s[0] >= min_idf), key=lambda s: (-s[0], s[1]))[:max_terms]
    return " ".join(w for _, _, w in sorted(keep, key=lambda s: s[1]))


def clipped(text: str, rules: FormatRules = FormatRules()) -> str:
    """``text`` cut to its leading words that make a query the ``format`` reward accepts."""
    words = text.split()[: rules.max_words]
    while words and len(" ".join(words)) > rules.max_chars:
        words.pop()
    return " ".join(words)


def demonstration(signal_texts: Sequence[str], idf: Mapping[str, float], *, leading: Sequence[str] = (),
                  max_queries: int = 5, max_terms: int = 4) -> str:
    """A numbered list of queries: each distinct ``leading`` text whole (clipped; GPT4Rec writes
    the title it expects the user to read next as its query), then the keyphrase of each
    distinct signal (newest first); a query that would copy a whole signal, or repeat an
    earlier one, is skipped."""
    signals = {t.casefold().strip() for t in signal_texts}
    seen: set[frozenset[str]] = set()
    queries: list[str] = []
    candidates = [clipped(t) for t in leading] + [keyphrase(t, idf, max_terms=max_terms) for t in signal_texts]
    for phrase in candidates:
        key = frozenset(w.casefold() for w in phrase.split())
        if not phrase or phrase.casefold() in signals or key in seen:
            continue
        seen.add(key)
        queries.append(phrase)
        if len(queries) == max_queries:
            break
    return "\n".join(f"{i}. {q}" for i, q in enumerate(queries, 1))


TARGET_MODES = ("window", "next-clicks")


@dataclass(frozen=True)
class WarmStartConfig:
    train_data: Path | tuple[Path, ...]  # one or more dataset dirs (real and simulated users side by side)
    output_dir: Path
    base_model: str = "smollm2"
    users: int = 256  # the first N training users of each train_data dir
    targets: str = "window"  # one of TARGET_MODES (see the module docstring)
    epochs: float = 1.0
    learning_rate: float = 5e-5
    batch_size: int = 8
    min_queries: int = 3  # users whose list has fewer queries are left out
    threads: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "train_data", dataset_dirs(self.train_data))
        if not self.train_data:
            raise ValueError("train_data: give a dataset directory or several")
        if self.targets not in TARGET_MODES:
            raise ValueError(f"targets: expected one of {', '.join(TARGET_MODES)}, got {self.targets!r}")
        if self.users < 1 or self.batch_size < 1 or self.min_queries < 1:
            raise ValueError("users, batch_size and min_queries must be at least 1")
        if not 0 < self.epochs <= 20:
            raise ValueError(f"epochs must be in (0, 20], got {self.epochs}")
        if not 0 < self.learning_rate < 1:
            raise ValueError(f"learning_rate: expected a small positive number such as 5e-5, got {self.learning_rate}")


def demonstrations(cfg: WarmStartConfig, recommend: RecommendConfig) -> list[dict[str, str]]:
    """Prompt/completion pairs (the worker's prompt; the rule's list) for the first ``cfg.users``
    training users of each ``train_data`` dir, in dir order."""
    from index.dense import article_text

    rows = []
    for data_dir in dataset_dirs(cfg.train_data):
        dataset = load_dataset(data_dir)
        doc_freq = Counter(t for a in dataset.news for t in set(query_terms(article_text(a))))
        idf = normalized_idf(doc_freq, len(dataset.news))
        titles = {a.news_id: a.title for a in dataset.news}
        for user in training_users(dataset, WindowConfig.from_settings(), limit=cfg.users):
            texts = [s.text for s in user.state.signals[: recommend.prompt_signals]]
            leading = [titles[n] for n in user.targets if n in titles] if cfg.targets == "next-clicks" else []
            completion = demonstration(texts, idf, leading=leading, max_queries=recommend.max_queries)
            if completion and completion.count("\n") + 1 >= cfg.min_queries:
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
        dirs = ", ".join(map(str, cfg.train_data))
        raise ValueError(f"{dirs}: no training user yields {cfg.min_queries}+ distinct query phrases")
    base_dir = resolve_base_model(cfg.base_model)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    result = sft(load_policy(base_dir), tokenizer, rows, cfg.output_dir, epochs=cfg.epochs,
                 learning_rate=cfg.learning_rate, batch_size=cfg.batch_size, seed=cfg.seed, progress=progress)
    summary = {"config": json.loads(json.dumps(asdict(cfg), default=str)),
               **{k: v for k, v in result.items() if k != "history"},
               "wall_s": round(time.perf_counter() - started, 1), "example": rows[0]}
    (cfg.output_dir / "warmstart.json").write_text(json.dumps(summary, indent=2))
    return summary
