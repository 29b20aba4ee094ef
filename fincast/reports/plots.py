"""Figures (the only module that imports matplotlib). Files are written atomically."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

from fincast.config import atomic_file

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker as mticker  # noqa: E402
import numpy as np  # noqa: E402

if TYPE_CHECKING:
    import pandas as pd


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    if len(values) < window or window <= 1:
        return values
    finite = np.where(np.isfinite(values), values, np.nan)
    kernel = np.ones(window) / window
    return np.convolve(np.nan_to_num(finite, nan=np.nanmean(finite)), kernel, mode="valid")


def save_figure(fig, path: str | Path) -> Path:
    """Write the figure as a PNG atomically, and close it."""
    try:
        with atomic_file(path) as fh:
            # zlib level 1: a fifth of the figure's time at the default level, for files ~25% larger
            fig.savefig(fh, dpi=110, format="png", pil_kwargs={"compress_level": 1})
    finally:
        plt.close(fig)
    return Path(path)


def _log_y(ax) -> None:
    """A log y axis with plain labels at 1, 2 and 5 x 10^k: matplotlib's default minor ticks (a Line2D and a Text
    each) and math-text labels cost as much as the rest of a training-curves figure."""
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(mticker.LogLocator(subs=(1.0, 2.0, 5.0), numticks=9))
    ax.yaxis.set_minor_locator(mticker.NullLocator())
    ax.yaxis.set_major_formatter(mticker.FuncFormatter(lambda v, _: f"{v:g}"))


def training_curves(path: str | Path, *, loss: list[float], norm_pre: list[float], norm_post: list[float],
                    val_loss: list[float], val_steps: list[int], threshold: float | list[float] | None, title: str,
                    diverged_step: int | None = None) -> Path:
    """Two panels: training loss (raw and smoothed) with per-epoch validation loss; gradient norm before
    and after clipping, with the threshold (a constant, or one value per step for scheduled and adaptive
    thresholds)."""
    steps = np.arange(1, len(loss) + 1)
    loss_a, pre, post = (np.asarray(v, float) for v in (loss, norm_pre, norm_post))
    # fixed margins: constrained layout measured every tick label and took half of the 0.37 s this figure cost
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True)
    fig.subplots_adjust(left=0.085, right=0.985, top=0.955, bottom=0.075, hspace=0.06)
    window = max(1, len(steps) // 100)
    ax1.plot(steps, loss_a, color="0.75", lw=0.6, label="train loss (step)")
    sm = _smooth(loss_a, window)
    ax1.plot(steps[len(steps) - len(sm):], sm, color="C0", lw=1.2, label=f"train loss ({window}-step mean)")
    if val_loss:
        ax1.plot(val_steps, val_loss, "o-", color="C3", ms=3, lw=1.2, label="val loss (epoch)")
    ax1.set_ylabel("MSE (scaled target)")
    _log_y(ax1)
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
    _log_y(ax2)
    ax2.set_xlabel("optimizer step")
    ax2.set_ylabel("global L2 norm")
    ax2.legend(loc="upper right", fontsize=8)
    return save_figure(fig, path)


# --- stability report: median/IQR bands, distributions, heatmaps -------------------------------------------

_BOXPLOT_HORIZONTAL = ({"orientation": "horizontal"} if tuple(int(p) for p in matplotlib.__version__.split(".")[:2])
                       >= (3, 10) else {"vert": False})


def _config_colors(names) -> dict[str, object]:
    """'none' (the unclipped control) is near-black; other configs take tab10 colours by first appearance."""
    colors: dict[str, object] = {}
    tab10 = plt.get_cmap("tab10")
    for name in names:
        if name not in colors:
            colors[name] = "0.15" if name == "none" else tab10(sum(n != "none" for n in colors) % 10)
    return colors


def _finite(values, positive: bool) -> np.ndarray:
    """Float copy with inf (and, for log axes, values <= 0) replaced by nan."""
    a = np.array(values, dtype=float, copy=True)
    a[~np.isfinite(a) | ((a <= 0) if positive else False)] = np.nan
    return a


def band_curves(path: str | Path, curves: dict[str, dict[str, np.ndarray]], *, ylabel: str, title: str,
                log: bool = True, thresholds: dict[str, dict[str, np.ndarray | None]] | None = None,
                xlabel: str = "optimizer step", max_points: int = 2000) -> Path:
    """One panel per learning rate (side by side, shared y); per clip config the median across seeds (rows of
    a runs x steps array, nan-padded) and the interquartile band, drawn where at least one run is finite;
    optional per-step thresholds as dashed lines of the config's colour. Long curves are decimated."""
    colors = _config_colors(cfg for panel in curves.values() for cfg in panel)
    n = max(1, len(curves))
    fig, axes = plt.subplots(1, n, figsize=(1.5 + 3.8 * n, 4.2), sharey=True, squeeze=False,
                             constrained_layout=True)
    any_threshold = False
    lo, hi = math.inf, -math.inf  # the range drawn: explosions to 1e30 must not squash everything else
    for ax, (lr, panel) in zip(axes[0], curves.items()):
        missing = []
        for cfg, runs in panel.items():
            arr = _finite(np.atleast_2d(np.asarray(runs, dtype=float)), log)
            stride = max(1, -(-arr.shape[1] // max_points))
            steps, arr = np.arange(1, arr.shape[1] + 1)[::stride], arr[:, ::stride]
            ok = np.isfinite(arr).any(axis=0)
            if ok.any():
                q25, med, q75 = np.full((3, arr.shape[1]), np.nan)
                q25[ok], med[ok], q75[ok] = np.nanpercentile(arr[:, ok], [25, 50, 75], axis=0)
                lo, hi = min(lo, float(np.nanmin(q25))), max(hi, float(np.nanmax(q75)))
                ax.plot(steps, med, color=colors[cfg], lw=1.2)
                ax.fill_between(steps, np.ma.masked_invalid(q25), np.ma.masked_invalid(q75), where=ok,
                                color=colors[cfg], alpha=0.2, lw=0)
            else:
                missing.append(cfg)
            thr = (thresholds or {}).get(lr, {}).get(cfg)
            if thr is not None and np.isfinite(thr_a := _finite(np.ravel(thr), log)).any():
                ax.plot(np.arange(1, thr_a.size + 1)[::stride], thr_a[::stride], color=colors[cfg], ls="--", lw=0.9)
                any_threshold = True
        if missing or not panel:
            ax.text(0.02, 0.02, "no finite values: " + ", ".join(missing) if panel else "no runs",
                    transform=ax.transAxes, fontsize=7, color="0.4", va="bottom")
        ax.set_title(lr, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3, lw=0.5)
    axes[0, 0].set_ylabel(ylabel)
    if log:
        axes[0, 0].set_yscale("log")
        if math.isfinite(lo) and lo > 0 and hi > 0:  # at most 4 decades above the lowest quartile
            axes[0, 0].set_ylim(lo / 1.5, min(hi, lo * 1e4) * 1.5)
    elif math.isfinite(lo) and math.isfinite(hi) and hi > lo:
        pad = 0.05 * (hi - lo)
        axes[0, 0].set_ylim(lo - pad, hi + pad)
    handles = [plt.Line2D([], [], color=c, lw=2, label=cfg) for cfg, c in colors.items()]
    if any_threshold:
        handles.append(plt.Line2D([], [], color="0.4", ls="--", lw=0.9, label="effective threshold"))
    if handles:
        fig.legend(handles=handles, loc="outside right upper", fontsize=8, title="median, IQR band", title_fontsize=8)
    fig.suptitle(title, fontsize=11)
    return save_figure(fig, path)


def distributions(path: str | Path, values: dict[str, np.ndarray], counts: dict[str, float] | None = None, *,
                  xlabel: str, title: str, counts_label: str = "gradient spikes per run (mean)") -> Path:
    """Left: box plot of the positive finite values per config (log x, configs as rows). Right (if counts):
    horizontal bars of counts per config. Empty or all-nan arrays are empty rows."""
    names = list(dict.fromkeys([*values, *(counts or {})]))
    colors, pos = _config_colors(names), np.arange(len(names))
    data = [(a := _finite(np.ravel(values.get(nm, [])), True))[np.isfinite(a)] for nm in names]
    ncols = 2 if counts else 1
    fig, axes = plt.subplots(1, ncols, figsize=(6.5 + 3.5 * (ncols - 1), 1.6 + 0.4 * max(1, len(names))),
                             sharey=True, squeeze=False, width_ratios=[2, 1][:ncols], constrained_layout=True)
    ax = axes[0, 0]
    rows = [i for i, d in enumerate(data) if d.size]
    if rows:
        box = ax.boxplot([data[i] for i in rows], positions=pos[rows], widths=0.6, patch_artist=True,
                         flierprops={"ms": 2, "alpha": 0.5}, medianprops={"color": "k"}, **_BOXPLOT_HORIZONTAL)
        for patch, i in zip(box["boxes"], rows):
            patch.set(facecolor=colors[names[i]], alpha=0.6)
        ax.set_xscale("log")
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


def _draw_heatmap(fig, ax, table: pd.DataFrame, *, title: str, fmt: str = "{:.2f}", cmap: str = "viridis",
                  vmin: float | None = None, vmax: float | None = None, cbar_label: str = "") -> None:
    data = table.to_numpy(dtype=float, na_value=np.nan)
    ax.set_title(title, fontsize=10)
    if data.size == 0:
        ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center")
        return
    if not np.isfinite(data).any() and (vmin is None or vmax is None):
        vmin, vmax = (0.0 if vmin is None else vmin), (1.0 if vmax is None else vmax)
    cm = plt.get_cmap(cmap).with_extremes(bad="0.8")
    im = ax.imshow(np.ma.masked_invalid(data), cmap=cm, vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xticks(range(data.shape[1]), [str(c) for c in table.columns], rotation=30, ha="right")
    ax.set_yticks(range(data.shape[0]), [str(i) for i in table.index])
    for (i, j), v in np.ndenumerate(data):
        r, g, b, _ = cm(im.norm(v)) if np.isfinite(v) else (0.8, 0.8, 0.8, 1)
        ax.text(j, i, "n/a" if np.isnan(v) else fmt.format(v), ha="center", va="center", fontsize=8,
                color="k" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "w")
    fig.colorbar(im, ax=ax, label=cbar_label, shrink=0.9)


def heatmaps(path: str | Path, tables: list[tuple[str, pd.DataFrame, dict]]) -> Path:
    """Heatmaps side by side: each (title, DataFrame with rows = learning rates and columns = clip configs,
    kwargs as for `heatmap`); nan cells grey and annotated 'n/a'."""
    widths = [2.0 + 0.9 * max(1, t.shape[1]) for _, t, _ in tables] or [4.0]
    height = 1.8 + 0.45 * max([t.shape[0] for _, t, _ in tables] or [1])
    fig, axes = plt.subplots(1, len(widths), figsize=(sum(widths), height), squeeze=False, width_ratios=widths,
                             constrained_layout=True)
    for ax, (title, table, kwargs) in zip(axes[0], tables):
        _draw_heatmap(fig, ax, table, title=title, **kwargs)
    return save_figure(fig, path)


def heatmap(path: str | Path, table: pd.DataFrame, *, title: str, fmt: str = "{:.2f}", cmap: str = "viridis",
            vmin: float | None = None, vmax: float | None = None, cbar_label: str = "") -> Path:
    """Rows = index (learning rates), columns = clip configs; cells annotated with fmt.format(value) in a
    readable colour; nan cells grey and annotated 'n/a'."""
    return heatmaps(path, [(title, table, {"fmt": fmt, "cmap": cmap, "vmin": vmin, "vmax": vmax,
                                           "cbar_label": cbar_label})])


# --- walk-forward backtest report: equity and drawdown, rolling Sharpe, forecast scatter, per-fold errors -----

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
            styles[name] = {"color": _LSTM_COLORS[n_lstm % len(_LSTM_COLORS)], "lw": 1.0}
            n_lstm += 1
        else:
            styles[name] = {"color": f"C{9 - n_other % 10}", "lw": 1.0}
            n_other += 1
    return styles


def drawdown_pct(equity: np.ndarray) -> np.ndarray:
    """Drawdown in percent from the running peak; the starting capital 1 counts as a peak; nan stays nan."""
    eq = np.asarray(equity, dtype=float)
    peak = np.fmax.accumulate(np.fmax(eq, 1.0))  # fmax ignores nan
    with np.errstate(invalid="ignore"):  # inf / inf
        return 100.0 * (eq / peak - 1.0)


def _rolling_sharpe(returns: pd.Series, window: int, periods: int) -> pd.Series:
    """Annualised mean / std (ddof=1) over `window` bars, rf = 0; nan where the window is flat (std 0)."""
    roll = returns.astype(float).rolling(window)
    std = roll.std(ddof=1)
    return roll.mean() / std.where(std > 1e-12) * math.sqrt(periods)


def _legend_right(fig, ax) -> None:
    if ax.get_legend_handles_labels()[0]:
        fig.legend(*ax.get_legend_handles_labels(), loc="outside right upper", fontsize=8)


def equity_drawdown(path: str | Path, equity: dict[str, pd.Series], *, title: str) -> Path:
    """Top: value of 1 unit of capital per model (log y; values <= 0 or non-finite are masked). Bottom:
    drawdown in percent from the running peak."""
    styles = _model_colors(equity)
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 6.5), sharex=True, height_ratios=[2, 1],
                                   constrained_layout=True)
    for name, series in equity.items():
        values = series.to_numpy(dtype=float, na_value=np.nan)
        ax1.plot(series.index, _finite(values, True), label=str(name), **styles[name])
        ax2.plot(series.index, drawdown_pct(values), **styles[name])
    ax1.axhline(1.0, color="0.5", lw=0.6)
    ax1.set_yscale("log")
    ax1.yaxis.set_major_formatter(mticker.StrMethodFormatter("{x:g}"))  # plain numbers, minor ticks too when
    if 0 < (lim := ax1.get_ylim())[0] < lim[1] < lim[0] * 1e3:  # it spans < 3 decades (all of them if < 5x)
        keep = range(2, 10) if lim[1] < 5 * lim[0] else (2, 3, 5)
        ax1.yaxis.set_minor_formatter(mticker.FuncFormatter(
            lambda v, _: f"{v:g}" if v > 0 and round(v / 10 ** math.floor(math.log10(v)), 6) in keep else ""))
    ax1.set_ylabel("value of 1 unit (log)")
    ax2.set_ylabel("drawdown [%]")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3, lw=0.5)
    _legend_right(fig, ax1)
    fig.suptitle(title, fontsize=11)
    return save_figure(fig, path)


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
    _legend_right(fig, ax)
    fig.suptitle(title, fontsize=11)
    return save_figure(fig, path)


def _robust_lim(values: np.ndarray) -> tuple[float, float]:
    lo, hi = (float(v) for v in np.percentile(values, [1, 99]))
    pad = 0.1 * (hi - lo) if hi > lo else max(0.1 * abs(lo), 1e-3)
    return lo - pad, hi + pad


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
            ax.set_xlim(_robust_lim(x))
            ax.set_ylim(_robust_lim(y))
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
    _legend_right(fig, ax)
    fig.suptitle(title, fontsize=11)
    return save_figure(fig, path)


# --- options pricing: errors by moneyness x maturity bucket, predicted vs market -------------------------------


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
        _draw_heatmap(fig, ax, table, title=name, **kwargs)
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
    norm = matplotlib.colors.LogNorm(np.nanmin(lrs[lr_ok]), np.nanmax(lrs[lr_ok])) if varied else None
    done = trials[np.isfinite(trials["value"].to_numpy(float))]
    diverged = done["diverged"].astype(bool)
    core = done.loc[(done["state"] == "complete") & ~diverged, "value"].to_numpy(float)
    if len(core):
        lo = core.min() / 1.01
        hi = max(np.percentile(core, 75), zero_loss if zero_loss is not None and math.isfinite(zero_loss) else 0)
        hi = max(hi * 1.05, lo * 1.1)
    else:
        vals = done["value"].to_numpy(float)
        lo, hi = (vals.min() / 1.1, vals.max() * 1.1) if len(vals) else (0.1, 10.0)
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
