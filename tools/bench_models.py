"""``newsrec bench models``: teacher vs student, torch vs ONNX fp32/int8/int4, side by side.

With ``fast`` every ONNX model is measured three times: plain greedy decoding, with the stop
after ``max_queries`` queries, and with prompt-lookup drafting plus that stop
(``models.runtime``); the fastest student variant is the served runtime.

Each model runs in a fresh interpreter, so its peak RSS is its own: load, then per
batch size one warm-up batch and ``repeats`` timed batches of greedy generation (users/s and
ms per batch), then, with a dataset, Recall@10/NDCG@10 through the offline evaluation
harness (``evaluation.evaluate.run_evaluation``, the serving path). Prompts are the worker's
(``streams.recommend.user_prompt`` over each dataset user's window) or, without a dataset, a
fixed synthetic set. The table puts the ratios next to the targets they are meant to meet;
nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import logging
import pickle
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from models.prompt import build_prompt
from streams.window import Signal

log = logging.getLogger(__name__)

DEFAULT_OUT = Path("bench-results/models.json")
TEACHER, STUDENT, ONNX_FP32, ONNX_INT8 = "teacher_torch", "student_torch", "student_onnx_fp32", "student_onnx_int8"
ONNX_INT4 = "student_onnx_int4"
STOP = "_stop"  # role suffix: early stop after max_queries queries
FAST = "_fast"  # role suffix: prompt lookup + early stop
VARIANTS = {"": "plain", STOP: "stop", FAST: "lookup+stop"}
ONNX_ROLES = (ONNX_FP32, ONNX_INT8, ONNX_INT4)
LABELS = {TEACHER: "teacher (torch)", STUDENT: "student (torch)", ONNX_FP32: "student (ONNX fp32)",
          ONNX_INT8: "student (ONNX int8)", ONNX_INT4: "student (ONNX int4)"}
LABELS |= {role + STOP: f"{LABELS[role]} + stop" for role in ONNX_ROLES}
LABELS |= {role + FAST: f"{LABELS[role]} + lookup + stop" for role in ONNX_ROLES}
ROLES = (TEACHER, STUDENT, *(r + suffix for r in ONNX_ROLES for suffix in VARIANTS))
# The batch size the ONNX-vs-torch target is stated at (the worker's micro-batches are small).
TARGET_BATCH = 8


@dataclass(frozen=True)
class BenchModel:
    role: str
    runtime: Literal["torch", "onnx"]
    path: Path
    variant: Literal["plain", "stop", "lookup+stop"] = "plain"  # ONNX decoding: see VARIANTS


@dataclass(frozen=True)
class BenchConfig:
    batch_sizes: tuple[int, ...] = (1, 8, 32)
    repeats: int = 3
    max_new_tokens: int = 48
    threads: int | None = None  # None: each runtime's default
    data: Path | None = None
    users: int = 100  # evaluated users (the first N targets) when ``data`` is set
    max_queries: int = 5  # the stop variants' query count (the worker's NEWSREC_MAX_QUERIES)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # ONNX execution provider


_FIXED_SIGNALS = [
    ("search", "electric vehicle battery recycling"), ("news_click", "Champions League quarter-final draw"),
    ("browse", "Lisbon apartment rentals"), ("app", "opened a running tracker"),
    ("search", "federal reserve interest rate decision"), ("browse", "best budget mirrorless camera"),
    ("news_click", "SpaceX launches new batch of satellites"), ("search", "sourdough starter not rising"),
    ("browse", "NBA trade deadline rumours"), ("search", "heat pump installation cost"),
    ("news_click", "new Nintendo console price announced"), ("app", "booked a flight to Tokyo"),
    ("search", "symptoms of vitamin D deficiency"), ("browse", "Premier League fixture list"),
    ("news_click", "wildfire smoke air quality warning"), ("search", "how to file taxes as a freelancer"),
]
_FIXED_NOW = datetime(2025, 1, 6, 12, 0, tzinfo=UTC)


def fixed_prompts(n: int) -> list[str]:
    """``n`` deterministic query-writing prompts over synthetic windows of 3-6 signals."""
    prompts = []
    for i in range(n):
        picks = [_FIXED_SIGNALS[(5 * i + j) % len(_FIXED_SIGNALS)] for j in range(3 + i % 4)]
        signals = [Signal(f"bench-{i}-{j}", domain, text, _FIXED_NOW - timedelta(hours=3 * j + 1))
                   for j, (domain, text) in enumerate(picks)]
        prompts.append(build_prompt(signals, now=_FIXED_NOW))
    return prompts


def dataset_prompts(data: Path, n: int) -> list[str]:
    """The worker's prompts for the dataset's first ``n`` target users at the dataset cutoff."""
    from evaluation.dataset import load_dataset
    from evaluation.evaluate import WindowConfig, build_state, dataset_cutoff
    from streams.recommend import RecommendConfig, user_prompt

    dataset = load_dataset(data)
    now, window, cfg = dataset_cutoff(dataset), WindowConfig.from_settings(), RecommendConfig.from_settings()
    return [user_prompt(build_state(dataset.events.get(u, ()), window), cfg, now=now) for u in dataset.users[:n]]


def _load(model: BenchModel, cfg: BenchConfig) -> Any:
    if model.runtime == "onnx":
        from models.runtime import CPU, CUDA, OnnxCausalLM, PromptLookup

        providers = {"auto": "auto", "cpu": [CPU], "cuda": [CUDA, CPU]}[cfg.device]
        lm = OnnxCausalLM(model.path, providers=providers, intra_op_threads=cfg.threads,
                          prompt_lookup=PromptLookup() if model.variant == "lookup+stop" else None,
                          max_queries=cfg.max_queries if model.variant != "plain" else None)
        if cfg.device == "cuda" and lm.providers[0] != CUDA:
            raise RuntimeError(f"--device cuda: {model.path} runs on {lm.providers}")
        return lm
    from models.torch_lm import TorchCausalLM

    return TorchCausalLM(model.path, threads=cfg.threads)


def _evaluate(lm: Any, role: str, data: Path, users: int) -> dict[str, Any]:
    from evaluation.baselines import LLMQueries
    from evaluation.dataset import load_dataset
    from evaluation.evaluate import EvalConfig, run_evaluation

    result = run_evaluation(load_dataset(data), [LLMQueries(lm, name=role)],
                            EvalConfig(samples=users, diversity=False, keep_per_user=False, progress=False))
    method = result["methods"][0]
    overall = method["overall"]
    return {"users": overall["n"], "recall@10": overall["recall@10"], "ndcg@10": overall["ndcg@10"],
            "users_per_s": method["timings"]["users_per_s"]}


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def measure_model(model: BenchModel, prompts: list[str], cfg: BenchConfig) -> dict[str, Any]:
    """Load ``model``, time greedy generation per batch size, evaluate; meant for a fresh process."""
    rss_before = _rss_mb()
    t0 = time.perf_counter()
    lm = _load(model, cfg)
    load_s = time.perf_counter() - t0
    cursor = 0

    def next_batch(size: int) -> list[str]:
        nonlocal cursor  # walk through the prompts so repeats are not the same batch
        batch = [prompts[(cursor + i) % len(prompts)] for i in range(size)]
        cursor += size
        return batch

    batches: dict[str, dict[str, float]] = {}
    for size in cfg.batch_sizes:
        lm.generate(next_batch(size), max_new_tokens=cfg.max_new_tokens)  # warm-up: allocations, lazy init
        elapsed, passes, drafted, accepted = 0.0, 0, 0, 0
        for _ in range(cfg.repeats):
            batch = next_batch(size)
            t = time.perf_counter()
            lm.generate(batch, max_new_tokens=cfg.max_new_tokens)
            elapsed += time.perf_counter() - t
            if stats := getattr(lm, "last_stats", None):  # ONNX only
                passes, drafted, accepted = passes + stats.new_tokens, drafted + stats.drafted, accepted + stats.accepted
        batches[str(size)] = {"ms_per_batch": round(1000 * elapsed / cfg.repeats, 2),
                              "users_per_s": round(size * cfg.repeats / elapsed, 3)}
        if passes:
            batches[str(size)] |= {"passes_per_batch": round(passes / cfg.repeats, 1),
                                   "drafts_accepted": round(accepted / drafted, 3) if drafted else None}
    # Peak before evaluation: the search index and harness are not the model's memory.
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    row: dict[str, Any] = {
        "role": model.role, "runtime": model.runtime, "path": str(model.path), "variant": model.variant,
        "version": lm.version,
        "providers": getattr(lm, "providers", ["torch-cpu"]), "load_s": round(load_s, 2),
        "rss_before_load_mb": round(rss_before, 1), "peak_rss_mb": round(peak_kb / 1024, 1),
        "batches": batches, "eval": None, "skipped": None,
    }
    if cfg.data is not None:
        row["eval"] = _evaluate(lm, model.role, cfg.data, cfg.users)
    return row


def _in_fresh_process(model: BenchModel, prompts: list[str], cfg: BenchConfig) -> dict[str, Any]:
    """``measure_model`` in a new interpreter (``python -m tools.bench_models``): its peak RSS is the model's alone."""
    with tempfile.TemporaryDirectory(prefix="newsrec-bench-") as tmp:
        job, result = Path(tmp) / "job.pickle", Path(tmp) / "result.json"
        job.write_bytes(pickle.dumps((model, prompts, cfg)))
        level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
        proc = subprocess.run([sys.executable, "-m", "tools.bench_models", str(job), str(result), "--log-level", level],
                              check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"measuring {LABELS[model.role]} ({model.path}) failed with exit code "
                               f"{proc.returncode}; its log is above")
        return json.loads(result.read_text())


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def _users_per_s(row: dict[str, Any] | None, size: int) -> float | None:
    return row["batches"][str(size)]["users_per_s"] if row and not row["skipped"] else None


def _recall(row: dict[str, Any] | None) -> float | None:
    return row["eval"]["recall@10"] if row and not row["skipped"] and row["eval"] else None


def _served(rows: dict[str, dict[str, Any]], size: int) -> str | None:
    """The student variant one would deploy at this batch size: the fastest one measured."""
    measured = [r for r in ROLES[1:] if _users_per_s(rows.get(r), size) is not None]
    return max(measured, key=lambda r: _users_per_s(rows[r], size) or 0.0, default=None)


def compute_ratios(rows: dict[str, dict[str, Any]], batch_sizes: tuple[int, ...]) -> dict[str, Any]:
    """Every ratio key is always present (None where a model was skipped or not evaluated)."""
    def per_size(num: str | None, den: str, size: int) -> float | None:
        return _ratio(_users_per_s(rows.get(num) if num else None, size), _users_per_s(rows.get(den), size))

    def recall_drop(role: str, base: str = ONNX_FP32) -> float | None:
        pair = _recall(rows.get(role)), _recall(rows.get(base))
        return round(pair[0] - pair[1], 4) if pair[0] is not None and pair[1] is not None else None

    served = {b: _served(rows, b) for b in batch_sizes}
    return {
        "student_vs_teacher_users_per_s": {str(b): per_size(STUDENT, TEACHER, b) for b in batch_sizes},
        "served_student": {str(b): served[b] for b in batch_sizes},
        "served_vs_teacher_users_per_s": {str(b): per_size(served[b], TEACHER, b) for b in batch_sizes},
        "onnx_vs_torch_users_per_s": {str(b): per_size(ONNX_FP32, STUDENT, b) for b in batch_sizes},
        "int8_vs_fp32_users_per_s": {str(b): per_size(ONNX_INT8, ONNX_FP32, b) for b in batch_sizes},
        "int4_vs_fp32_users_per_s": {str(b): per_size(ONNX_INT4, ONNX_FP32, b) for b in batch_sizes},
        "int4_vs_int8_users_per_s": {str(b): per_size(ONNX_INT4, ONNX_INT8, b) for b in batch_sizes},
        "stop_vs_plain_users_per_s": {role: {str(b): per_size(role + STOP, role, b) for b in batch_sizes}
                                      for role in ONNX_ROLES},
        "fast_vs_plain_users_per_s": {role: {str(b): per_size(role + FAST, role, b) for b in batch_sizes}
                                      for role in ONNX_ROLES},
        "served_vs_torch_users_per_s": {str(b): per_size(served[b], STUDENT, b) for b in batch_sizes},
        "student_vs_teacher_recall@10": _ratio(_recall(rows.get(STUDENT)), _recall(rows.get(TEACHER))),
        "int8_minus_fp32_recall@10": recall_drop(ONNX_INT8),
        "int4_minus_fp32_recall@10": recall_drop(ONNX_INT4),
        "stop_minus_plain_recall@10": {role: recall_drop(role + STOP, role) for role in ONNX_ROLES},
        "fast_minus_plain_recall@10": {role: recall_drop(role + FAST, role) for role in ONNX_ROLES},
    }


def target_checks(ratios: dict[str, Any], batch_sizes: tuple[int, ...]) -> list[dict[str, Any]]:
    """The issue's targets against the measured ratios; ``met`` is None when not measurable."""
    at = str(TARGET_BATCH) if TARGET_BATCH in batch_sizes else str(max(batch_sizes))
    int8_speed, int8_drop = ratios["int8_vs_fp32_users_per_s"][at], ratios["int8_minus_fp32_recall@10"]
    checks = [
        ("student Recall@10 / teacher", ratios["student_vs_teacher_recall@10"], ">= 0.95",
         lambda v: v >= 0.95),
        (f"served student users/s / teacher (batch {at})", ratios["served_vs_teacher_users_per_s"][at], ">= 10",
         lambda v: v >= 10),
        (f"served student / student torch users/s (batch {at})", ratios["served_vs_torch_users_per_s"][at], ">= 5",
         lambda v: v >= 5),
        (f"ONNX fp32 / torch users/s (batch {at})", ratios["onnx_vs_torch_users_per_s"][at], ">= 2", lambda v: v >= 2),
        (f"int8 / fp32 users/s (batch {at})", int8_speed, ">= 1.5", lambda v: v >= 1.5),
        ("int8 - fp32 Recall@10", int8_drop, ">= -0.01 (1 point)", lambda v: v >= -0.01),
        ("int4 - fp32 Recall@10", ratios["int4_minus_fp32_recall@10"], ">= -0.01 (1 point)", lambda v: v >= -0.01),
    ]
    return [{"name": name, "value": value, "target": target, "met": None if value is None else bool(ok(value))}
            for name, value, target, ok in checks]


def run_models_bench(models: dict[str, BenchModel | None], cfg: BenchConfig, *, out: Path = DEFAULT_OUT
                     ) -> dict[str, Any]:
    """Measure every given model (``None``: skipped), write ``out`` (JSON) and return the report."""
    needed = max(cfg.batch_sizes) * (cfg.repeats + 1)
    prompts = dataset_prompts(cfg.data, needed) if cfg.data is not None else fixed_prompts(needed)
    if not prompts:
        raise ValueError(f"{cfg.data}: no target users to build prompts from")
    rows: dict[str, dict[str, Any]] = {}
    for role in ROLES:
        model = models.get(role)
        if model is None:
            log.info("%s: skipped (not given)", LABELS[role])
            rows[role] = {"role": role, "skipped": "not given"}
            continue
        log.info("%s: measuring %s", LABELS[role], model.path)
        rows[role] = _in_fresh_process(model, prompts, cfg)
    ratios = compute_ratios(rows, cfg.batch_sizes)
    report = {
        "created_at": datetime.now(UTC).isoformat(),
        "config": asdict(cfg) | {"data": str(cfg.data) if cfg.data else None},
        "prompts": {"source": "dataset" if cfg.data is not None else "fixed", "distinct": len(set(prompts))},
        "models": rows,
        "ratios": ratios,
        "targets": target_checks(ratios, cfg.batch_sizes),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str))
    return report


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "–" if value is None else format(value, spec)


def format_table(report: dict[str, Any]) -> str:
    sizes = report["config"]["batch_sizes"]
    evaluated = report["config"]["data"] is not None
    header = ["model"] + [f"b={b} users/s · ms/batch" for b in sizes] + ["peak RSS MB", "load s"]
    header += ["R@10", "N@10"] if evaluated else []
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for role, row in report["models"].items():
        if row["skipped"]:
            lines.append("| " + " | ".join([f"{LABELS[role]}: skipped ({row['skipped']})"] + [""] * (len(header) - 1))
                         + " |")
            continue
        cells = [LABELS[role]]
        cells += [f"{row['batches'][str(b)]['users_per_s']:.2f} · {row['batches'][str(b)]['ms_per_batch']:.0f}"
                  for b in sizes]
        cells += [f"{row['peak_rss_mb']:.0f}", f"{row['load_s']:.1f}"]
        if evaluated:
            cells += [_fmt(row["eval"]["recall@10"], ".4f"), _fmt(row["eval"]["ndcg@10"], ".4f")]
        lines.append("| " + " | ".join(cells) + " |")
    ratios = report["ratios"]
    lines += ["", "| users/s ratio | " + " | ".join(f"b={b}" for b in sizes) + " |", "|---|" + "---:|" * len(sizes)]
    for key, label in (("student_vs_teacher_users_per_s", "student / teacher (both torch)"),
                       ("served_vs_teacher_users_per_s", "served student / teacher"),
                       ("onnx_vs_torch_users_per_s", "student ONNX fp32 / torch"),
                       ("int8_vs_fp32_users_per_s", "student ONNX int8 / fp32"),
                       ("int4_vs_fp32_users_per_s", "student ONNX int4 / fp32"),
                       ("int4_vs_int8_users_per_s", "student ONNX int4 / int8"),
                       ("served_vs_torch_users_per_s", "served student / student torch")):
        lines.append(f"| {label} | " + " | ".join(_fmt(ratios[key][str(b)]) for b in sizes) + " |")
    for key, what in (("stop_vs_plain_users_per_s", "stop"), ("fast_vs_plain_users_per_s", "lookup + stop")):
        for role, per_size in ratios[key].items():
            lines.append(f"| {LABELS[role]}: {what} / plain | " + " | ".join(_fmt(per_size[str(b)]) for b in sizes)
                         + " |")
    served = ", ".join(f"b={b}: {LABELS[r] if r else '–'}" for b, r in ratios["served_student"].items())
    lines += [f"(served student = the fastest student variant: {served})"]
    lines += ["", "| target | value | target | met |", "|---|---:|---|---|"]
    for check in report["targets"]:
        met = {True: "yes", False: "NO", None: "–"}[check["met"]]
        lines.append(f"| {check['name']} | {_fmt(check['value'], '.3f')} | {check['target']} | {met} |")
    return "\n".join(lines)



def _measure_one(argv: list[str] | None = None) -> int:
    """Child side of ``_in_fresh_process``: one pickled job in, one JSON row out."""
    parser = argparse.ArgumentParser(prog="python -m tools.bench_models", description=_measure_one.__doc__)
    parser.add_argument("job", type=Path, help="pickled (BenchModel, prompts, BenchConfig) written by the parent")
    parser.add_argument("result", type=Path, help="JSON row to write")
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    model, prompts, cfg = pickle.loads(args.job.read_bytes())  # our own temp file, written by the parent
    args.result.write_text(json.dumps(measure_model(model, prompts, cfg), default=str))
    return 0


if __name__ == "__main__":
    sys.exit(_measure_one())
