"""Figures of a stability study: loss bands per clip config, distributions of final metrics, heatmaps."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd
import numpy as np

from fincast.reports.figures.canvas import (
    BOXPLOT_HORIZONTAL,
    draw_heatmap,
    finite,
    log_x,
    log_y,
    plt,
    save_figure,
)


def _config_colors(names) -> dict[str, object]:
    """'none' (the unclipped control) is near-black; other configs take tab10 colours by first appearance."""
    colors: dict[str, object] = {}
    tab10 = plt.get_cmap("tab10")
    for name in names:
        if name not in colors:
            colors[name] = "0.15" if name == "none" else tab10(sum(n != "none" for n in colors) % 10)
    return colors


def quantiles(arr: np.ndarray, qs: tuple[float, ...]) -> np.ndarray:
    """``np.nanpercentile(arr, 100 * qs, axis=0)`` (linear interpolation) for columns with a value each, in one
    sort: numpy's own goes column by column once there are NaNs (1 s for a 1,000-run study's curves)."""
    s = np.sort(arr, axis=0)  # NaN last
    n = (~np.isnan(arr)).sum(axis=0)
    cols = np.arange(arr.shape[1])
    out = np.empty((len(qs), arr.shape[1]))
    for i, q in enumerate(qs):
        pos = (n - 1) * q
        lo = np.floor(pos).astype(np.int64)
        hi = np.minimum(lo + 1, n - 1)
        frac = pos - lo
        a, b = s[lo, cols], s[hi, cols]
        out[i] = a + (b - a) * frac
    return out


def band_curves(path: str | Path, curves: dict[str, dict[str, np.ndarray]], *, ylabel: str, title: str,
                log: bool = True, thresholds: dict[str, dict[str, np.ndarray | None]] | None = None,
                xlabel: str = "optimizer step", max_points: int = 2000) -> Path:
    """One panel per learning rate (side by side, each its own y axis); per clip config the median across seeds
    (rows of a runs x steps array, nan-padded) and the interquartile band, drawn where at least one run is
    finite, dotted where fewer than all its runs still have a value (early stopping, divergence); optional
    per-step thresholds as dashed lines of the config's colour. Panels without a finite value are left out
    (named in a note). Long curves are decimated."""
    colors = _config_colors(cfg for panel in curves.values() for cfg in panel)
    drawn = {lr: panel for lr, panel in curves.items()
             if any(np.isfinite(finite(np.atleast_2d(np.asarray(a, dtype=float)), log)).any() for a in panel.values())}
    empty = [lr for lr in curves if lr not in drawn]
    n = max(1, len(drawn))
    fig, axes = plt.subplots(1, n, figsize=(1.5 + 3.8 * n, 4.2), squeeze=False, constrained_layout=True)
    flags = {"threshold": False, "partial": False}
    for ax, (lr, panel) in zip(axes[0], drawn.items()):
        _band_panel(ax, panel, colors, (thresholds or {}).get(lr, {}), log=log, max_points=max_points, flags=flags)
        ax.set_title(lr, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3, lw=0.5)
    if not drawn:
        axes[0, 0].text(0.5, 0.5, "no finite values", transform=axes[0, 0].transAxes, ha="center", va="center")
    axes[0, 0].set_ylabel(ylabel)
    handles = [plt.Line2D([], [], color=c, lw=2, label=cfg) for cfg, c in colors.items()]
    if flags["partial"]:
        handles.append(plt.Line2D([], [], color="0.4", ls=":", lw=1.2, label="median of fewer runs\n(others stopped)"))
    if flags["threshold"]:
        handles.append(plt.Line2D([], [], color="0.4", ls="--", lw=0.9, label="effective threshold"))
    if handles:
        fig.legend(handles=handles, loc="outside right upper", fontsize=8, title="median, IQR band", title_fontsize=8)
    fig.suptitle(title + (f"\n(no finite values at {', '.join(empty)}: not drawn)" if empty and drawn else ""),
                 fontsize=11)
    return save_figure(fig, path)


def _band_panel(ax, panel: dict[str, np.ndarray], colors: dict, thresholds: dict, *, log: bool, max_points: int,
                flags: dict) -> None:
    lo, hi = math.inf, -math.inf  # the range drawn: explosions to 1e30 must not squash everything else
    missing = []
    for cfg, runs in panel.items():
        arr = finite(np.atleast_2d(np.asarray(runs, dtype=float)), log)
        stride = max(1, -(-arr.shape[1] // max_points))
        steps, arr = np.arange(1, arr.shape[1] + 1)[::stride], arr[:, ::stride]
        count = np.isfinite(arr).sum(axis=0)
        ok = count > 0
        if ok.any():
            q25, med, q75 = np.full((3, arr.shape[1]), np.nan)
            q25[ok], med[ok], q75[ok] = quantiles(arr[:, ok], (0.25, 0.5, 0.75))
            lo, hi = min(lo, float(np.nanmin(q25))), max(hi, float(np.nanmax(q75)))
            full = count == arr.shape[0]
            ax.plot(steps, np.where(full, med, np.nan), color=colors[cfg], lw=1.2)
            partial = ok & ~full
            if partial.any():  # dotted from the last step every run reached (joined to the solid line)
                join = partial | np.r_[partial[1:], False]
                ax.plot(steps, np.where(join, med, np.nan), color=colors[cfg], lw=1.2, ls=":")
                flags["partial"] = True
            ax.fill_between(steps, np.ma.masked_invalid(q25), np.ma.masked_invalid(q75), where=ok,
                            color=colors[cfg], alpha=0.2, lw=0)
        else:
            missing.append(cfg)
        thr = thresholds.get(cfg)
        if thr is not None and np.isfinite(thr_a := finite(np.ravel(thr), log)).any():
            ax.plot(np.arange(1, thr_a.size + 1)[::stride], thr_a[::stride], color=colors[cfg], ls="--", lw=0.9)
            flags["threshold"] = True
    if missing:
        ax.text(0.02, 0.02, "no finite values: " + ", ".join(missing), transform=ax.transAxes, fontsize=7,
                color="0.4", va="bottom")
    if log:
        log_y(ax)
        if math.isfinite(lo) and lo > 0 and hi > 0:  # at most 4 decades above the lowest quartile
            ax.set_ylim(lo / 1.5, min(hi, lo * 1e4) * 1.5)
    elif math.isfinite(lo) and math.isfinite(hi) and hi > lo:
        pad = 0.05 * (hi - lo)
        ax.set_ylim(lo - pad, hi + pad)


def distributions(path: str | Path, values: dict[str, np.ndarray], counts: dict[str, float] | None = None, *,
                  xlabel: str, title: str, counts_label: str = "gradient spikes per run (mean)") -> Path:
    """Left: box plot of the positive finite values per config (log x, configs as rows). Right (if counts):
    horizontal bars of counts per config. Empty or all-nan arrays are empty rows."""
    names = list(dict.fromkeys([*values, *(counts or {})]))
    colors, pos = _config_colors(names), np.arange(len(names))
    data = [(a := finite(np.ravel(values.get(nm, [])), True))[np.isfinite(a)] for nm in names]
    ncols = 2 if counts else 1
    fig, axes = plt.subplots(1, ncols, figsize=(6.5 + 3.5 * (ncols - 1), 1.6 + 0.4 * max(1, len(names))),
                             sharey=True, squeeze=False, width_ratios=[2, 1][:ncols], constrained_layout=True)
    ax = axes[0, 0]
    rows = [i for i, d in enumerate(data) if d.size]
    if rows:
        box = ax.boxplot([data[i] for i in rows], positions=pos[rows], widths=0.6, patch_artist=True,
                         flierprops={"ms": 2, "alpha": 0.5}, medianprops={"color": "k"}, **BOXPLOT_HORIZONTAL)
        for patch, i in zip(box["boxes"], rows):
            patch.set(facecolor=colors[names[i]], alpha=0.6)
        log_x(ax)
        # from the lowest 1st percentile, at most 6 decades: exploded runs (1e30) must not hide the rest
        lo = min(float(np.percentile(data[i], 1)) for i in rows)
        hi = max(float(data[i].max()) for i in rows)
        if lo > 0 and hi > 0:
            ax.set_xlim(lo / 1.5, min(hi, lo * 1e6) * 1.5)
    else:
        ax.text(0.5, 0.5, "no positive finite values", transform=ax.transAxes, ha="center", va="center")
    ax.set_yticks(pos, [f"{nm} (n={d.size})" for nm, d in zip(names, data)])
    ax.set_ylim(max(1, len(names)) - 0.5, -0.5)
    ax.set_xlabel(xlabel)
    if counts:
        widths = [float(counts.get(nm, np.nan)) for nm in names]
        bars = axes[0, 1].barh(pos, np.nan_to_num(widths, nan=0.0, posinf=0.0, neginf=0.0),
                               color=[colors[nm] for nm in names], alpha=0.8)
        axes[0, 1].bar_label(bars, labels=[f"{w:.3g}" if np.isfinite(w) else "n/a" for w in widths], fontsize=8,
                             padding=2)
        axes[0, 1].set_xlabel(counts_label)
        axes[0, 1].margins(x=0.2)
    for a in axes[0]:
        a.grid(axis="x", alpha=0.3, lw=0.5)
    fig.suptitle(title, fontsize=11)
    return save_figure(fig, path)


def heatmaps(path: str | Path, tables: list[tuple[str, pd.DataFrame, dict]]) -> Path:
    """Heatmaps side by side: each (title, DataFrame with rows = learning rates and columns = clip configs,
    kwargs as for `heatmap`); nan cells grey and annotated 'n/a'."""
    widths = [2.0 + 0.9 * max(1, t.shape[1]) for _, t, _ in tables] or [4.0]
    height = 1.8 + 0.45 * max([t.shape[0] for _, t, _ in tables] or [1])
    fig, axes = plt.subplots(1, len(widths), figsize=(sum(widths), height), squeeze=False, width_ratios=widths,
                             constrained_layout=True)
    for ax, (title, table, kwargs) in zip(axes[0], tables):
        draw_heatmap(fig, ax, table, title=title, **kwargs)
    return save_figure(fig, path)


def heatmap(path: str | Path, table: pd.DataFrame, *, title: str, fmt: str = "{:.2f}", cmap: str = "viridis",
            vmin: float | None = None, vmax: float | None = None, cbar_label: str = "") -> Path:
    """Rows = index (learning rates), columns = clip configs; cells annotated with fmt.format(value) in a
    readable colour; nan cells grey and annotated 'n/a'."""
    return heatmaps(path, [(title, table, {"fmt": fmt, "cmap": cmap, "vmin": vmin, "vmax": vmax,
                                           "cbar_label": cbar_label})])
