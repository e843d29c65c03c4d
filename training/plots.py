"""PNG plots for training runs and studies (matplotlib, headless)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from training.rewards import REWARD_NAMES


def pyplot():  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path) -> Path:
    """Write ``fig`` as a PNG (creating its folder) and free it."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path


def smooth(values: Sequence[float], window: int) -> list[float]:
    """Trailing moving average (the first points average what they have)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_reward_curves(history: Sequence[Mapping[str, Any]], path: Path, *, title: str, window: int = 10) -> Path:
    """One line per reward (``rewards/<name>/mean`` of each logged step), smoothed."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name in REWARD_NAMES:
        points = [(h["step"], h[f"rewards/{name}/mean"]) for h in history
                  if f"rewards/{name}/mean" in h and "step" in h]
        if points:
            steps, values = zip(*points, strict=True)
            ax.plot(steps, smooth(values, window), label=name)
    ax.set_xlabel("GRPO step")
    ax.set_ylabel(f"reward (moving mean of {window} steps)")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(loc="best", fontsize="small")
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def plot_scaling(points: Sequence[Mapping[str, Any]], path: Path, *, x: str, x_label: str, title: str,
                 metrics: Sequence[str] = ("recall@10", "reward")) -> Path:
    """Metrics against compute (one subplot per metric), points labelled with their setting."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4))
    for ax, metric in zip(axes if len(metrics) > 1 else [axes], metrics, strict=True):
        xs = [p[x] for p in points]
        ys = [p[metric] for p in points]
        ax.plot(xs, ys, marker="o")
        for p, xv, yv in zip(points, xs, ys, strict=True):
            ax.annotate(str(p["label"]), (xv, yv), textcoords="offset points", xytext=(4, 4), fontsize="small")
        ax.set_xscale("log")
        ax.set_xlabel(x_label)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    return save_figure(fig, path)
