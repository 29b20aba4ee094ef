"""Figures of one training run: loss and gradient norms over steps, and the advisor's gradient-norm histogram."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    pass
import numpy as np

from fincast.reports.figures.canvas import log_y, plt, save_figure


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    if len(values) < window or window <= 1:
        return values
    finite = np.where(np.isfinite(values), values, np.nan)
    kernel = np.ones(window) / window
    return np.convolve(np.nan_to_num(finite, nan=np.nanmean(finite)), kernel, mode="valid")


def training_curves(path: str | Path, *, loss: list[float], norm_pre: list[float], norm_post: list[float],
                    val_loss: list[float], val_steps: list[int], threshold: float | list[float] | None, title: str,
                    diverged_step: int | None = None) -> Path:
    """Two panels: training loss (raw and smoothed) with per-epoch validation loss; gradient norm before
    and after clipping, with the threshold (a constant, or one value per step for scheduled and adaptive
    thresholds)."""
    steps = np.arange(1, len(loss) + 1)
    loss_a, pre, post = (np.asarray(v, float) for v in (loss, norm_pre, norm_post))
    # fixed margins: constrained layout measures every tick label, about half of this figure's cost
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True)
    fig.subplots_adjust(left=0.085, right=0.985, top=0.955, bottom=0.075, hspace=0.06)
    window = max(1, len(steps) // 100)
    ax1.plot(steps, loss_a, color="0.75", lw=0.6, label="train loss (step)")
    sm = _smooth(loss_a, window)
    ax1.plot(steps[len(steps) - len(sm):], sm, color="C0", lw=1.2, label=f"train loss ({window}-step mean)")
    if val_loss:
        ax1.plot(val_steps, val_loss, "o-", color="C3", ms=3, lw=1.2, label="val loss (epoch)")
    ax1.set_ylabel("MSE (scaled target)")
    log_y(ax1)
    ax1.legend(loc="upper right", fontsize=8)
    ax1.set_title(title, fontsize=10)
    ax2.plot(steps, pre, color="C1", lw=0.7, label="grad norm before clipping")
    ax2.plot(steps, post, color="C2", lw=0.7, alpha=0.8, label="grad norm after clipping")
    if isinstance(threshold, list | tuple | np.ndarray) and np.isfinite(np.asarray(threshold, float)).any():
        ax2.plot(steps[:len(threshold)], np.asarray(threshold, float), color="k", ls="--", lw=0.8, label="threshold")
    elif isinstance(threshold, float | int) and np.isfinite(threshold):
        ax2.axhline(threshold, color="k", ls="--", lw=0.8, label=f"threshold {threshold:g}")
    if diverged_step is not None:
        for ax in (ax1, ax2):
            ax.axvline(diverged_step, color="r", lw=1, label="diverged")
    log_y(ax2)
    ax2.set_xlabel("optimizer step")
    ax2.set_ylabel("global L2 norm")
    ax2.legend(loc="upper right", fontsize=8)
    return save_figure(fig, path)


def grad_norm_histogram(path: str | Path, norms: np.ndarray, marks: dict[str, float], *, title: str) -> Path:
    """Histogram of gradient norms on log-spaced bins, with a labelled vertical line per proposed threshold
    and the share of steps each would clip."""
    x = np.asarray(norms, float)
    x = x[np.isfinite(x) & (x > 0)]
    fig, ax = plt.subplots(figsize=(9, 4.8), constrained_layout=True)
    bins = np.geomspace(x.min(), x.max() * 1.0001, 60) if x.min() < x.max() else 10
    ax.hist(x, bins=bins, color="0.6", edgecolor="0.4", lw=0.3)
    ax.set_xscale("log")
    for i, (label, value) in enumerate(marks.items()):
        share = 100.0 * float(np.mean(x > value))
        ax.axvline(value, color=f"C{i}", lw=1.6, ls=("-", "--", ":", "-.")[i % 4],
                   label=f"{label}: {value:.3g} (clips {share:.1f}% of steps)")
    ax.set_xlabel("global L2 gradient norm (unclipped probe run)")
    ax.set_ylabel("steps")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper right", fontsize=8)
    return save_figure(fig, path)
