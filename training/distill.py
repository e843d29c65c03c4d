"""Distil the GRPO teacher into a compact student (arXiv:2602.15005, section on distillation).

- ``on-policy`` (the paper's method): TRL ``DistillationTrainer`` — the student samples
  completions for the worker's prompts, the teacher scores every token, and the loss is the
  reverse KL (``beta=1``) on the student's own rollouts. This is GKD with ``lmbda=1, beta=1``;
  TRL itself points that setting to ``DistillationTrainer``.
- ``supervised`` (the ablation baseline): the teacher writes one greedy completion per
  training prompt, and the student is fine-tuned on them (TRL ``SFTTrainer``).
- ``sequence`` (sequence-level distillation, Kim & Rush 2016): the teacher is the model with
  inference-time scaling, best-of-``teacher_samples`` selected by the test-time rewards
  (``training.sampling``); the student is fine-tuned on those selected outputs. This is how a
  student learns what costs the teacher N samples and a reward pass per user.
- ``none`` (the paper's "no distillation" row): the student as initialised, untrained.

The student is the whole teacher model (``student_layers`` None: a full pretrained student),
or the teacher cut to its first ``student_layers`` blocks (same tokenizer, the teacher's
weights), or ``student_init``: an earlier run's student, so on-policy distillation can start
from a supervised one (GKD's recipe when the cut student is too broken to sample anything the
teacher can correct). Training prompts come from every ``train_data`` directory; one with
MIND impressions gives only its training days (``evaluation.evaluate.training_users``). A run writes ``final/``, ``onnx/`` (parity-validated
export, parent = the teacher), ``train_log.jsonl``, ``eval.json`` and ``run.json``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from evaluation.dataset import Dataset, dataset_dirs, load_dataset
from evaluation.evaluate import TrainingUser, WindowConfig, training_users
from streams.recommend import RecommendConfig, user_prompt
from streams.settings import ConfigError

log = logging.getLogger(__name__)

Method = Literal["on-policy", "supervised", "sequence", "none"]
METHODS = ("on-policy", "supervised", "sequence", "none")


@dataclass(frozen=True)
class DistillConfig:
    teacher: Path  # HF model dir (e.g. a GRPO run's final/)
    train_data: Path | tuple[Path, ...]  # one or more dataset dirs (real and simulated users)
    output_dir: Path
    student_layers: int | None = None  # None: the whole teacher architecture (a full pretrained student)
    method: Method = "on-policy"
    teacher_samples: int = 8  # sequence: best of N teacher samples per prompt
    teacher_onnx: Path | None = None  # sequence: the teacher's ONNX export to sample (default: exported here)
    student_init: Path | None = None  # HF dir of an earlier student with student_layers blocks
    train_users: int | None = 256
    eval_data: Path | None = None
    eval_users: int | None = None
    max_steps: int = 50
    batch_size: int = 8  # prompts per step
    learning_rate: float = 5e-5
    # what the worker generates (NEWSREC_MAX_NEW_TOKENS)
    max_completion_length: int = field(default_factory=lambda: RecommendConfig.from_settings().max_new_tokens)
    temperature: float = 1.0  # on-policy sampling and the KL's temperature
    threads: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "train_data", dataset_dirs(self.train_data))
        problems = []
        if self.method not in METHODS:
            problems.append(f"method: {self.method!r} is not one of {', '.join(METHODS)}")
        if self.student_layers is not None and self.student_layers < 1:
            problems.append("student_layers: must be at least 1, or None for the whole model")
        for name in ("max_steps", "batch_size", "max_completion_length", "teacher_samples"):
            if getattr(self, name) < 1:
                problems.append(f"{name}: must be at least 1")
        if self.train_users is not None and self.train_users < 1:
            problems.append("train_users: must be positive or None (all)")
        if not 0 < self.learning_rate < 1:
            problems.append(f"learning_rate: expected a small positive number such as 5e-5, got {self.learning_rate}")
        if self.temperature <= 0:
            problems.append("temperature: must be > 0")
        if problems:
            raise ConfigError("bad distillation config:\n  - " + "\n  - ".join(problems))


def _training_set(data: Path, users: int | None) -> tuple[Dataset, list[TrainingUser], list[str]]:
    """The dataset, its training users (``training_users``: no held-out user) and the worker's
    prompt for each."""
    dataset = load_dataset(data)
    rc = RecommendConfig.from_settings()
    chosen = training_users(dataset, WindowConfig.from_settings(), limit=users)
    return dataset, chosen, [user_prompt(u.state, rc, u.now) for u in chosen]


def best_of_n_completions(cfg: DistillConfig, data: Path, teacher_onnx: Path, *,
                          progress: bool) -> tuple[list[str], list[str], dict[str, Any]]:
    """The sequence-level teacher on one dataset: prompts, the best of ``teacher_samples``
    completions each (test-time rewards over this dataset's corpus), and what it cost."""
    from models.runtime import OnnxCausalLM
    from training.sampling import sample_and_score
    from training.scoring import RewardScorer

    dataset, users, prompts = _training_set(data, cfg.train_users)
    rc = RecommendConfig.from_settings()
    scorer = RewardScorer(dataset.news)
    try:
        contexts = [scorer.context(u.state, prompt_signals=rc.prompt_signals, utility=False) for u in users]
        lm = OnnxCausalLM(teacher_onnx, intra_op_threads=cfg.threads)
        samples = sample_and_score(lm, scorer, prompts, contexts, n=cfg.teacher_samples,
                                   max_new_tokens=cfg.max_completion_length, temperature=cfg.temperature,
                                   seed=cfg.seed, progress=progress)
    finally:
        scorer.close()
    best = samples.best()
    stats = {"data": str(data), "prompts": len(prompts), "sample_s": round(samples.sample_s, 1),
             "score_s": round(samples.score_s, 1),
             "selected_reward": round(sum(r[i] for r, i in zip(samples.rewards, best, strict=True)) / len(best), 4),
             "first_sample_reward": round(sum(r[0] for r in samples.rewards) / len(best), 4)}
    return prompts, samples.selected(), stats


def teacher_completions(teacher_dir: Path, prompts: list[str], *, max_new_tokens: int, batch_size: int = 16,
                        progress: bool = True) -> list[str]:
    """Greedy teacher outputs (HF generate, left padding) for the supervised baseline."""
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(teacher_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    out: list[str] = []
    with torch.inference_mode():
        for start in tqdm(range(0, len(prompts), batch_size), desc="teacher outputs", disable=not progress):
            enc = tokenizer(prompts[start: start + batch_size], return_tensors="pt", padding=True,
                            add_special_tokens=False)
            ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            out += tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return out


def distill(cfg: DistillConfig, *, progress: bool = True) -> dict[str, Any]:
    import torch
    from transformers import AutoTokenizer

    from training.grpo import evaluate_run, export_run, load_policy

    started = time.perf_counter()
    out = cfg.output_dir
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"output_dir {out} is not empty: pick a new directory")
    if not (cfg.teacher / "config.json").is_file():
        raise ConfigError(f"teacher {cfg.teacher}: no config.json (pass a HF model dir, e.g. a GRPO run's final/)")
    if cfg.student_init is not None and not (cfg.student_init / "config.json").is_file():
        raise ConfigError(f"student_init {cfg.student_init}: no config.json (pass an earlier run's final/)")
    out.mkdir(parents=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    # The sequence method builds its prompts beside the teacher's samples (below).
    prompts = [] if cfg.method == "sequence" else [p for data in cfg.train_data
                                                   for p in _training_set(data, cfg.train_users)[2]]
    tokenizer = AutoTokenizer.from_pretrained(cfg.teacher)
    student = load_policy(cfg.student_init or cfg.teacher, layers=cfg.student_layers)
    teacher_layers = int(json.loads((cfg.teacher / "config.json").read_text())["num_hidden_layers"])
    final = out / "final"
    teacher_stats: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    if cfg.method == "on-policy":
        history = _on_policy(cfg, student, tokenizer, prompts, final, progress)
    elif cfg.method == "none":
        student.save_pretrained(final)
        tokenizer.save_pretrained(final)
        history = []
    elif cfg.method == "sequence":
        teacher_onnx = cfg.teacher_onnx or export_run(cfg.teacher, out / "teacher-onnx", name="teacher",
                                                      version=f"teacher-{cfg.teacher.name}", parent=None)
        completions = []
        for data in cfg.train_data:
            p, c, stats = best_of_n_completions(cfg, data, Path(teacher_onnx), progress=progress)
            prompts += p
            completions += c
            teacher_stats.append(stats)
        history = _supervised(cfg, student, tokenizer, prompts, completions, final, progress)
    else:
        completions = teacher_completions(cfg.teacher, prompts, max_new_tokens=cfg.max_completion_length,
                                          progress=progress)
        history = _supervised(cfg, student, tokenizer, prompts, completions, final, progress)
    train_s = time.perf_counter() - t0
    with (out / "train_log.jsonl").open("w") as fh:
        for row in history:
            fh.write(json.dumps(row) + "\n")
    summary: dict[str, Any] = {
        "config": json.loads(json.dumps(asdict(cfg), default=str)), "prompts": len(prompts),
        "teacher_layers": teacher_layers, "student_parameters": sum(p.numel() for p in student.parameters()),
        "train_s": round(train_s, 1), "losses": [r["loss"] for r in history if "loss" in r],
        "teacher_sampling": teacher_stats,
    }
    summary["onnx"] = str(export_run(final, out / "onnx", name=f"student-{out.name}", version=f"student-{out.name}",
                                     parent=cfg.teacher.name if cfg.teacher.name != "final" else cfg.teacher.parent.name))
    if cfg.eval_data is not None:
        summary["eval"] = evaluate_run(out / "onnx", cfg.eval_data, users=cfg.eval_users,
                                       name=f"{cfg.method}:{out.name}", progress=progress)
        (out / "eval.json").write_text(json.dumps(summary["eval"], indent=2, default=str))
    summary["wall_s"] = round(time.perf_counter() - started, 1)
    (out / "run.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def _on_policy(cfg: DistillConfig, student, tokenizer, prompts: list[str], final: Path,  # type: ignore[no-untyped-def]
               progress: bool) -> list[dict[str, Any]]:
    import torch
    from datasets import Dataset as HFDataset
    from transformers import AutoModelForCausalLM
    from trl import DistillationConfig, DistillationTrainer

    teacher = AutoModelForCausalLM.from_pretrained(cfg.teacher, dtype=torch.float32).eval()
    args = DistillationConfig(
        output_dir=str(cfg.output_dir / "checkpoints"), beta=1.0, temperature=cfg.temperature,
        max_completion_length=cfg.max_completion_length, per_device_train_batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate, max_steps=cfg.max_steps, logging_steps=1, save_strategy="no",
        report_to=[], seed=cfg.seed, use_cpu=not torch.cuda.is_available(), bf16=False, disable_tqdm=not progress,
    )
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args,
                                  train_dataset=HFDataset.from_list([{"prompt": p} for p in prompts]),
                                  processing_class=tokenizer)
    trainer.train()
    trainer.save_model(str(final))
    tokenizer.save_pretrained(final)
    return list(trainer.state.log_history)


def _supervised(cfg: DistillConfig, student, tokenizer, prompts: list[str], completions: list[str],  # type: ignore[no-untyped-def]
                final: Path, progress: bool) -> list[dict[str, Any]]:
    from training.warmstart import sft

    rows = [{"prompt": p, "completion": c} for p, c in zip(prompts, completions, strict=True) if c.strip()]
    # As many optimizer steps as the on-policy run, so the two methods get the same budget.
    result = sft(student, tokenizer, rows, final, epochs=1.0, max_steps=cfg.max_steps,
                 learning_rate=cfg.learning_rate, batch_size=cfg.batch_size, seed=cfg.seed, progress=progress)
    return result["history"]
