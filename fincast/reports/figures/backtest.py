"""Figures of a walk-forward backtest: equity and drawdown, rolling Sharpe, forecast vs realised, per-fold
errors."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd
import numpy as np

from fincast.backtest.evaluate import drawdown
from fincast.backtest.naming import family
from fincast.reports.figures.canvas import finite, legend_right, log_y, mticker, plt, robust_lim, save_figure

_FIXED_STYLES = {"buy_and_hold": {"color": "k", "ls": "--", "lw": 1.4}, "naive": {"color": "0.6", "lw": 1.0},
                 "hist_mean": {"color": "0.4", "ls": ":", "lw": 1.0}, "ridge": {"color": "tab:purple", "lw": 1.0}}


_LSTM_COLORS = ["C0", "C1", "C2", "C3", "C5", "C6", "C7", "C8", "C9"]  # C4 is tab:purple (ridge)


def _model_colors(names) -> dict[str, dict]:
    """Line kwargs per model: fixed styles for the baselines, tab10 in order of first appearance for 'lstm-*'
    (so neighbouring configs get neighbouring colours), tab10 from the end (C9, C8, ...) for anything else."""
    styles: dict[str, dict] = {}
    n_lstm = n_other = 0
    for name in names:
        if name in styles:
            continue
        if name in _FIXED_STYLES:
            styles[name] = dict(_FIXED_STYLES[name])
        elif str(name).startswith("lstm-"):
            fam = family(str(name))
            if fam != name and fam in styles:  # another seed of a model already drawn: its colour, fainter
                styles[name] = {"color": styles[fam]["color"], "lw": 0.8, "alpha": 0.55}
                continue
            styles[name] = {"color": _LSTM_COLORS[n_lstm % len(_LSTM_COLORS)], "lw": 1.0}
            styles.setdefault(fam, styles[name])
            n_lstm += 1
        else:
            styles[name] = {"color": f"C{9 - n_other % 10}", "lw": 1.0}
            n_other += 1
    return styles


def _rolling_sharpe(returns: pd.Series, window: int, periods: int) -> pd.Series:
    """Annualised mean / std (ddof=1) over `window` bars, rf = 0; nan where the window is flat (std 0)."""
    roll = returns.astype(float).rolling(window)
    std = roll.std(ddof=1)
    return roll.mean() / std.where(std > 1e-12) * math.sqrt(periods)


def equity_drawdown(path: str | Path, equity: dict[str, pd.Series], *, title: str) -> Path:
    """Top: value of 1 unit of capital per model (log y; values <= 0 or non-finite are masked). Bottom:
    drawdown in percent from the running peak."""
    styles = _model_colors(equity)
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 6.5), sharex=True, height_ratios=[2, 1],
                                   constrained_layout=True)
    for name, series in equity.items():
        values = series.to_numpy(dtype=float, na_value=np.nan)
        ax1.plot(series.index, finite(values, True), label=str(name), **styles[name])
        ax2.plot(series.index, 100 * drawdown(values), **styles[name])
    ax1.axhline(1.0, color="0.5", lw=0.6)
    _equity_log_ticks(ax1)
    ax1.set_ylabel("value of 1 unit (log)")
    ax2.set_ylabel("drawdown [%]")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3, lw=0.5)
    legend_right(fig, ax1)
    fig.suptitle(title, fontsize=11)
    return save_figure(fig, path)


def _equity_log_ticks(ax) -> None:
    """Log y with 4-8 plain-number labels: over less than a decade (most backtests) evenly stepped values
    (0.9, 1, 1.1, ...), otherwise 1, 2 and 5 x 10^k. matplotlib's default labels a narrow log axis at one tick."""
    ax.set_yscale("log")
    lo, hi = ax.get_ylim()
    if 0 < lo < hi < 10 * lo:
        ticks = mticker.MaxNLocator(nbins=6, steps=[1, 2, 2.5, 5, 10]).tick_values(lo, hi)
        ax.yaxis.set_major_locator(mticker.FixedLocator([t for t in ticks if t > 0]))
        ax.yaxis.set_minor_locator(mticker.NullLocator())
        ax.yaxis.set_major_formatter(mticker.FuncFormatter(lambda v, _: f"{v:g}"))
    else:
        log_y(ax)
    ax.set_ylim(lo, hi)


def rolling_sharpe(path: str | Path, returns: dict[str, pd.Series], *, window: int, periods: int,
                   title: str) -> Path:
    """Rolling annualised Sharpe ratio (rf = 0) of each model's net returns over `window` bars."""
    styles = _model_colors(returns)
    fig, ax = plt.subplots(figsize=(10, 4), constrained_layout=True)
    for name, series in returns.items():
        ax.plot(series.index, _rolling_sharpe(series, window, periods).to_numpy(dtype=float, na_value=np.nan),
                label=str(name), **styles[name])
    ax.axhline(0.0, color="0.3", lw=0.8)
    ax.set_ylabel(f"rolling Sharpe ({window} bars, annualised, rf = 0)", fontsize=9)
    ax.grid(alpha=0.3, lw=0.5)
    legend_right(fig, ax)
    fig.suptitle(title, fontsize=11)
    return save_figure(fig, path)


def forecast_scatter(path: str | Path, pairs: dict[str, tuple[np.ndarray, np.ndarray]], *, title: str,
                     max_points: int = 4000) -> Path:
    """One panel per model (4 per row): realised vs forecast log return, OLS line, Pearson correlation and n
    of the finite pairs in the title. More than max_points points are thinned (every k-th) for drawing;
    axis limits span the 1st-99th percentiles (padded) so outliers don't squash the cloud."""
    styles, n = _model_colors(pairs), max(1, len(pairs))
    ncols = min(4, n)
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(0.6 + 3.2 * ncols, 0.6 + 3.0 * nrows), squeeze=False,
                             constrained_layout=True)
    for ax in axes.flat[len(pairs):]:
        ax.set_axis_off()
    for ax, (name, (forecast, realised)) in zip(axes.flat, pairs.items()):
        x, y = np.ravel(np.asarray(forecast, dtype=float)), np.ravel(np.asarray(realised, dtype=float))
        ok = np.isfinite(x) & np.isfinite(y)
        x, y = x[ok], y[ok]
        stride = max(1, -(-x.size // max_points))
        ax.scatter(x[::stride], y[::stride], s=4, alpha=0.4, lw=0, color=styles[name]["color"])
        ax.axhline(0.0, color="0.7", lw=0.5)
        ax.axvline(0.0, color="0.7", lw=0.5)
        label = f"{name}  n={x.size}"
        if x.size:
            ax.set_xlim(robust_lim(x))
            ax.set_ylim(robust_lim(y))
        if x.size >= 2 and np.ptp(x) > 0:
            slope, intercept = np.polyfit(x, y, 1)
            xs = np.array(ax.get_xlim())
            ax.plot(xs, intercept + slope * xs, color="k", lw=1.0)
            corr = float(np.corrcoef(x, y)[0, 1]) if np.ptp(y) > 0 else math.nan
            label = f"{name}  corr {corr:.2f}, n={x.size}"
        else:
            ax.text(0.5, 0.95, "no finite pairs" if not x.size else "forecast has no variance",
                    transform=ax.transAxes, ha="center", va="top", fontsize=8, color="0.3")
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("forecast (log return)", fontsize=8)
        ax.set_ylabel("realised (log return)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.locator_params(axis="x", nbins=4)
        ax.grid(alpha=0.3, lw=0.5)
    fig.suptitle(title, fontsize=11)
    return save_figure(fig, path)


def fold_errors(path: str | Path, table: pd.DataFrame, *, title: str,
                ylabel: str = "test RMSE vs naive [%]") -> Path:
    """Per-fold error of each model relative to naive (rows = fold cutoff dates, columns = models); 'naive'
    (0 by definition) and all-nan columns are skipped. Beyond +-100% the axis turns symlog."""
    data = {c: table[c].to_numpy(dtype=float, na_value=np.nan) for c in table.columns if c != "naive"}
    data = {c: v for c, v in data.items() if np.isfinite(v).any()}
    styles = _model_colors(data)
    fig, ax = plt.subplots(figsize=(10, 4), constrained_layout=True)
    for name, values in data.items():
        ax.plot(table.index, values, marker="o", ms=3, label=str(name), **styles[name])
    if not data:
        ax.text(0.5, 0.5, "no finite values", transform=ax.transAxes, ha="center", va="center")
    ax.axhline(0.0, color="0.3", lw=0.8)
    finite = np.concatenate([v[np.isfinite(v)] for v in data.values()] or [np.zeros(0)])
    if finite.size and np.abs(finite).max() > 100:  # exploded folds (+20000%) must not flatten the rest
        ax.set_yscale("symlog", linthresh=10)
        ylabel += " (symlog)"
    ax.set_xlabel("fold cutoff")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, lw=0.5)
    legend_right(fig, ax)
    fig.suptitle(title, fontsize=11)
    return save_figure(fig, path)
