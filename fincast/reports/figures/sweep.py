"""The sweep's figure: objective against threshold, per clip method."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd
import numpy as np

from fincast.reports.figures.canvas import LogNorm, mticker, plt, save_figure


def sweep_objective(path: str | Path, trials: pd.DataFrame, thresholds: dict[str, str], *, title: str,
                    zero_loss: float | None = None) -> Path:
    """Objective vs threshold, one panel per searched clip method (log x). ``trials`` has columns number,
    method, threshold, lr, value, state (complete / pruned) and diverged; unclipped trials (``none``) are drawn
    by trial number and, in the other panels, as their best value (dotted line); the zero forecast's validation
    loss is a dashed line. Colour = lr; x = diverged (scored by the penalty), hollow = pruned (its last reported
    value), star = the best trial. The y range is zoomed on the complete trials (up to the zero forecast's
    loss); values above it are drawn on the top edge as triangles."""
    methods = [m for m in thresholds if (trials["method"] == m).any()] or ["none"]
    n = len(methods)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n + 1.2, 4.4), squeeze=False, sharey=True, constrained_layout=True)
    lrs = trials["lr"].to_numpy(float)
    lr_ok = np.isfinite(lrs) & (lrs > 0)
    varied = lr_ok.any() and np.nanmin(lrs[lr_ok]) < np.nanmax(lrs[lr_ok])
    norm = LogNorm(np.nanmin(lrs[lr_ok]), np.nanmax(lrs[lr_ok])) if varied else None
    done = trials[np.isfinite(trials["value"].to_numpy(float))]
    diverged = done["diverged"].astype(bool)
    lo, hi = _y_range(done, diverged, zero_loss)
    best = done.loc[done["value"].idxmin()] if len(done) else None
    none_best = done.loc[(done["method"] == "none") & (done["state"] == "complete") & ~diverged, "value"]
    sc = None
    for ax, m in zip(axes[0], methods):
        t = done[done["method"] == m]
        if m == "none":  # nothing to put on x: the values by trial number
            x = t["number"].to_numpy(float)
            ax.set_xlabel("trial number")
        else:
            x = t["threshold"].to_numpy(float)
            ax.set_xscale("log")
            ax.set_xlabel(thresholds[m])
        y = t["value"].to_numpy(float)
        off = y > hi
        y = np.where(off, hi, y)
        c = t["lr"].to_numpy(float) if varied else None
        div = t["diverged"].astype(bool).to_numpy()
        kinds = {"complete": (t["state"] == "complete").to_numpy() & ~div, "pruned": (t["state"] == "pruned").to_numpy(),
                 "diverged": div}
        for kind, mask in kinds.items():
            for clipped_off in (False, True):
                k = mask & (off == clipped_off)
                if not k.any():
                    continue
                label = f"{kind} ({int(mask.sum())})" if not (clipped_off and (mask & ~off).any()) else None
                kw = {"s": 40 if not clipped_off else 50, "label": label, "marker": "^" if clipped_off else "o"}
                if kind == "diverged":
                    kw["marker"] = "^" if clipped_off else "x"
                    ax.scatter(x[k], y[k], color="C3", **kw)
                elif kind == "pruned":
                    ax.scatter(x[k], y[k], facecolors="none", edgecolors="0.3", **kw)
                elif varied:
                    sc = ax.scatter(x[k], y[k], c=c[k], cmap="viridis", norm=norm, edgecolors="k", linewidths=0.3, **kw)
                else:
                    ax.scatter(x[k], y[k], color="C0", edgecolors="k", linewidths=0.3, **kw)
        if best is not None and best["method"] == m:
            bx = best["number"] if m == "none" else best["threshold"]
            ax.scatter([bx], [min(best["value"], hi)], marker="*", s=260, color="gold", edgecolors="k", zorder=5,
                       label=f"best: {best['value']:.4g}")
        if len(none_best) and m != "none":
            ax.axhline(none_best.min(), color="0.2", ls=":", lw=1.2, label=f"best unclipped: {none_best.min():.4g}")
        if zero_loss is not None and math.isfinite(zero_loss):
            ax.axhline(zero_loss, color="0.5", ls="--", lw=1.0, label=f"zero forecast: {zero_loss:.4g}")
        ax.set_title(m, fontsize=10)
        ax.legend(fontsize=7, loc="best", framealpha=0.7)
        ax.grid(True, which="major", alpha=0.3)
    ax0 = axes[0][0]
    if hi / lo > 3:
        ax0.set_yscale("log")
        ax0.yaxis.set_major_formatter(mticker.FormatStrFormatter("%.3g"))
        ax0.yaxis.set_minor_formatter(mticker.NullFormatter())
    ax0.set_ylim(lo, hi * 1.01)
    ax0.set_ylabel("objective: best validation loss" + ("  (triangles: off scale)" if (done["value"] > hi).any() else ""))
    if sc is not None:
        fig.colorbar(sc, ax=list(axes[0]), label="learning rate", shrink=0.9)
    fig.suptitle(title, fontsize=11)
    return save_figure(fig, path)


def _y_range(done: pd.DataFrame, diverged: pd.Series, zero_loss: float | None) -> tuple[float, float]:
    """Zoomed on the complete trials, up to the zero forecast's loss."""
    core = done.loc[(done["state"] == "complete") & ~diverged, "value"].to_numpy(float)
    if len(core):
        lo = core.min() / 1.01
        hi = max(np.percentile(core, 75), zero_loss if zero_loss is not None and math.isfinite(zero_loss) else 0)
        return lo, max(hi * 1.05, lo * 1.1)
    vals = done["value"].to_numpy(float)
    return (vals.min() / 1.1, vals.max() * 1.1) if len(vals) else (0.1, 10.0)
