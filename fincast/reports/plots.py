"""Figures (the only module that imports matplotlib). Files are written atomically."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    if len(values) < window or window <= 1:
        return values
    finite = np.where(np.isfinite(values), values, np.nan)
    kernel = np.ones(window) / window
    return np.convolve(np.nan_to_num(finite, nan=np.nanmean(finite)), kernel, mode="valid")


def save_figure(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110, format="png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        Path(tmp).unlink(missing_ok=True)
    return path


def training_curves(path: str | Path, *, loss: list[float], norm_pre: list[float], norm_post: list[float],
                    val_loss: list[float], val_steps: list[int], threshold: float | list[float] | None, title: str,
                    diverged_step: int | None = None) -> Path:
    """Two panels: training loss (raw and smoothed) with per-epoch validation loss; gradient norm before
    and after clipping, with the threshold (a constant, or one value per step for scheduled and adaptive
    thresholds)."""
    steps = np.arange(1, len(loss) + 1)
    loss_a, pre, post = (np.asarray(v, float) for v in (loss, norm_pre, norm_post))
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True, constrained_layout=True)
    window = max(1, len(steps) // 100)
    ax1.plot(steps, loss_a, color="0.75", lw=0.6, label="train loss (step)")
    sm = _smooth(loss_a, window)
    ax1.plot(steps[len(steps) - len(sm):], sm, color="C0", lw=1.2, label=f"train loss ({window}-step mean)")
    if val_loss:
        ax1.plot(val_steps, val_loss, "o-", color="C3", ms=3, lw=1.2, label="val loss (epoch)")
    ax1.set_ylabel("MSE (scaled target)")
    ax1.set_yscale("log")
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
    ax2.set_yscale("log")
    ax2.set_xlabel("optimizer step")
    ax2.set_ylabel("global L2 norm")
    ax2.legend(loc="upper right", fontsize=8)
    return save_figure(fig, path)
