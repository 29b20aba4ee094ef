"""Figures of an options run: test price error by moneyness and maturity bucket, predicted vs market price."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd
import numpy as np

from fincast.reports.figures.canvas import draw_heatmap, plt, save_figure


def option_bucket_heatmap(path: str | Path, buckets: pd.DataFrame, models: list[str], moneyness: list[str],
                          maturity: list[str], *, title: str) -> Path:
    """One heatmap per model of price RMSE by bucket (rows = days to expiry, columns = K/S), on one colour scale
    (up to the 95th percentile of all buckets) so the panels compare; empty buckets grey."""
    tables = []
    finite = buckets["price_rmse"].to_numpy(float)
    finite = finite[np.isfinite(finite)]
    vmax = float(np.percentile(finite, 95)) if len(finite) else 1.0  # one outlier bucket does not wash out the rest
    rows_in = [x for x in maturity if x in set(buckets["maturity"])]
    cols_in = [x for x in moneyness if x in set(buckets["moneyness"])]
    for m in models:
        b = buckets[buckets["model"] == m]
        t = b.pivot_table(index="maturity", columns="moneyness", values="price_rmse", aggfunc="first")
        t = t.reindex(index=rows_in, columns=cols_in)
        tables.append((m, t.astype(float), {"fmt": "{:.3g}", "cmap": "magma_r", "vmin": 0.0, "vmax": vmax,
                                             "cbar_label": "price RMSE"}))
    if not tables or not rows_in or not cols_in:
        raise ValueError("option_bucket_heatmap: no buckets to draw")
    cols = min(3, len(tables))
    rows = math.ceil(len(tables) / cols)
    w = 2.2 + 1.0 * max(1, tables[0][1].shape[1])
    h = 1.6 + 0.45 * max(1, tables[0][1].shape[0])
    fig, axes = plt.subplots(rows, cols, figsize=(w * cols, h * rows), squeeze=False, constrained_layout=True)
    for ax, (name, table, kwargs) in zip(axes.flat, tables):
        draw_heatmap(fig, ax, table, title=name, **kwargs)
        ax.set_xlabel("K / S")
        ax.set_ylabel("days to expiry")
    for ax in list(axes.flat)[len(tables):]:
        ax.set_visible(False)
    fig.suptitle(title)
    return save_figure(fig, path)


def option_scatter(path: str | Path, table: pd.DataFrame, models: list[str], *, title: str) -> Path:
    """Predicted vs market price per model (log-log, calls and puts marked), with the diagonal."""
    cols = min(3, max(1, len(models)))
    rows = math.ceil(max(1, len(models)) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.9 * rows), squeeze=False, constrained_layout=True)
    market = table["market_price"].to_numpy(float)
    call = table["call"].to_numpy(bool)
    pos = market[market > 0]
    hi = float(np.nanmax(pos)) * 1.3 if len(pos) else 1.0
    lo = max(float(np.nanpercentile(pos, 1)), hi * 1e-5) if len(pos) else 1e-2  # not down to vendor dust
    for ax, m in zip(axes.flat, models):
        pred = table[f"{m}_price"].to_numpy(float)
        for sel, label, color in ((call, "calls", "C0"), (~call, "puts", "C3")):
            x, y = market[sel], np.clip(pred[sel], lo / 2, None)
            ok = np.isfinite(x) & np.isfinite(y) & (x > 0)
            ax.scatter(x[ok], y[ok], s=4, alpha=0.35, color=color, label=label, rasterized=True)
        ax.plot([lo, hi], [lo, hi], color="k", lw=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(lo / 2, hi)
        ax.set_ylim(lo / 2, hi)
        ax.set_title(m)
        ax.set_xlabel("market price")
        ax.set_ylabel("predicted price (floored at the axis)")
        ax.legend(loc="upper left", fontsize=8, markerscale=3)
    for ax in list(axes.flat)[len(models):]:
        ax.set_visible(False)
    fig.suptitle(title)
    return save_figure(fig, path)
