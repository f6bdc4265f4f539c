"""Training curves: one run's ``metrics.jsonl`` (mean reward, the sequence weight W and the kernel φ), and
the reward curves of several runs side by side (experiment grids)."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional, Sequence

from megatron_vespo.logging_utils import read_metrics

# (panel title, [(metric, label), ...]); absent metrics (e.g. W under another loss) are skipped.
PANELS = [
    ("reward", [("rollout/reward_mean", "mean reward")]),
    ("sequence weight W = π/μ", [("vespo/W_mean", "mean"), ("vespo/W_max", "max"), ("vespo/W_min", "min")]),
    ("φ(W)", [("vespo/phi_mean", "mean"), ("vespo/phi_max", "max"), ("vespo/phi_min", "min")]),
]


def plot_metrics(jsonl_path: str | Path, png_path: str | Path) -> Path:
    """Write a PNG with one panel per quantity against the optimizer step; returns its path."""
    plt = _pyplot()
    records = read_metrics(jsonl_path)
    if not records:
        raise ValueError(f"{jsonl_path}: no metrics to plot")
    fig, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 3.6))
    for ax, (title, series) in zip(axes, PANELS):
        for key, label in series:
            points = [(r["train_step"], r[key]) for r in records if r.get(key) is not None and "train_step" in r]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, label=label, marker="." if len(points) < 50 else None)
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    return _save(plt, fig, png_path, dpi=100)


def plot_reward_curves(curves: Mapping[str, Sequence[tuple[int, float]]], png_path: str | Path, title: str = "",
                       linestyles: Optional[Mapping[str, str]] = None) -> Path:
    """One line per label: (optimizer step, reward) points, e.g. the mean over seeds of each loss; returns
    the PNG's path."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, points in curves.items():
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="." if len(points) < 50 else None, label=label,
                    linestyle=(linestyles or {}).get(label, "-"))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("rollout reward (mean over seeds)")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    return _save(plt, fig, png_path, dpi=110)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, png_path: str | Path, dpi: int) -> Path:
    fig.tight_layout()
    out = Path(png_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return out
