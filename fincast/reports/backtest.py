"""The backtest report (layer L3): how the models would have done out of sample, folded forward through time.

``build`` writes ``<out>/index.html`` (self-contained, images inlined), the PNGs, ``stats.csv`` (one row per
ticker and model, buy and hold included), ``forecasts.csv`` (the walk-forward table: date, ticker, cutoff,
model, y_true, y_pred, ...), ``folds.csv`` (what each fold trained) and ``daily.csv`` (each strategy's daily
positions and returns), so the numbers behind every figure are in the folder.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from fincast.backtest import diebold_mariano
from fincast.backtest.evaluate import BUY_AND_HOLD, Evaluation
from fincast.config import atomic_write
from fincast.reports import figures
from fincast.reports.html import CSS, img, num, ui_link


@dataclass
class Context:
    """What the report says about how the backtest was run."""
    name: str
    tickers: list[str]
    source: str
    horizon: int
    window: int | str
    refit_every: int
    warm_start: bool
    rule: str
    cost_bps: float
    max_position: float
    vol_target: float
    sharpe_window: int
    refit_full: bool = True
    device: str = "cpu"
    run_id: str | None = None
    tracking_uri: str = ""
    experiment_id: str = ""
    notes: list[str] = field(default_factory=list)


FORECAST_COLS = [("RMSE", "{:.5f}"), ("RMSE vs Naive [%]", "{:+.2f}"), ("Directional Accuracy [%]", "{:.1f}"),
                 ("R2 OOS [%]", "{:+.2f}"), ("DM Stat", "{:+.2f}"), ("DM p-value", "{:.3f}"), ("Missing [%]", "{:.1f}")]
TRADING_COLS = [("Total Return [%]", "{:+.1f}"), ("CAGR [%]", "{:+.1f}"), ("Volatility (ann.) [%]", "{:.1f}"),
                ("Sharpe Ratio", "{:.2f}"), ("Sortino Ratio", "{:.2f}"), ("Max. Drawdown [%]", "{:.1f}"),
                ("Calmar Ratio", "{:.2f}"), ("Hit Rate [%]", "{:.1f}"), ("Turnover (ann.) [x]", "{:.1f}"),
                ("Exposure [%]", "{:.0f}")]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)


def _table(stats: pd.DataFrame, cols: list[tuple[str, str]], first: str = "model") -> str:
    e = html.escape
    head = f"<tr><th class='l'>{first}</th>" + "".join(f"<th>{e(c)}</th>" for c, _ in cols) + "</tr>"
    rows = []
    for _, r in stats.iterrows():
        cells = "".join(f"<td>{num(r.get(c, np.nan), f)}</td>" for c, f in cols)
        rows.append(f"<tr><td class='l'>{e(str(r['model']))}</td>{cells}</tr>")
    return "<table>" + head + "".join(rows) + "</table>"


def training_summary(folds: pd.DataFrame, lstms: list[str]) -> pd.DataFrame:
    """Per LSTM: how its folds trained (divergence, clipping, gradient norms, time)."""
    rows = []
    for m in lstms:
        f = folds[folds["model"] == m]
        rows.append({
            "model": m, "folds": len(f), "diverged": int(f["diverged"].astype(bool).sum()),
            "unusable": int((~f["usable"].astype(bool)).sum()), "clip_rate_median": float(f["clip_rate"].median()),
            "grad_norm_median": float(f["grad_norm_median"].median()), "grad_norm_max": float(f["grad_norm_max"].max()),
            "steps_median": float(f["steps"].median()), "best_val_loss_median": float(f["best_val_loss"].median()),
            "fit_seconds": float(f["fit_seconds"].sum()),
            "folds_beating_naive_pct": 100 * float((f["test_rmse_vs_naive_pct"] < 0).mean()),
        })
    return pd.DataFrame(rows)


def _versus(forecasts: pd.DataFrame, ticker: str, lstms: list[str], horizon: int) -> list[str]:
    """Clipped LSTMs against the unclipped one on the same forecasts: a Diebold-Mariano test between them."""
    control = "lstm-none"
    if control not in lstms:
        return []
    t = forecasts[forecasts["ticker"] == ticker]
    base = t[t["model"] == control].set_index("date")
    out = []
    for m in lstms:
        if m == control:
            continue
        other = t[t["model"] == m].set_index("date").reindex(base.index)
        y = base["y_true"].to_numpy()
        e1 = other["y_pred"].fillna(0.0).to_numpy() - y
        e0 = base["y_pred"].fillna(0.0).to_numpy() - y
        stat, p = diebold_mariano(e1, e0, horizon)
        if np.allclose(e1, e0):
            text = "identical forecasts (clipping never changed a step that mattered)"
        elif not np.isfinite(stat):
            text = "no test possible (too few forecasts or no variation in the loss difference)"
        else:
            text = (f"DM {stat:+.2f} (p = {p:.3f}): {'smaller' if stat < 0 else 'larger'} squared errors with "
                    "clipping" + ("" if p < 0.05 else ", not a significant difference"))
        out.append(f"{m} vs {control} on {ticker}: {text}")
    return out


def build(out: Path, ctx: Context, forecasts: pd.DataFrame, folds: pd.DataFrame, ev: Evaluation,
          lstms: list[str], train: pd.DataFrame | None = None) -> Path:
    """Write the report folder; returns the path of index.html. ``train``: training_summary(folds, lstms)
    when the caller already has it."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "stats.csv", ev.stats.to_csv(index=False))
    atomic_write(out / "forecasts.csv", forecasts.to_csv(index=False, date_format="%Y-%m-%d"))
    atomic_write(out / "folds.csv", folds.to_csv(index=False, date_format="%Y-%m-%d"))
    atomic_write(out / "daily.csv", ev.daily.to_csv(index=False, date_format="%Y-%m-%d"))
    train = training_summary(folds, lstms) if train is None else train
    atomic_write(out / "training.csv", train.to_csv(index=False))
    parts = _intro(ctx, folds, ev)
    parts += [f"<p class='note'>{html.escape(n)}</p>" for n in ctx.notes]
    for ticker in sorted(ev.periods):
        parts += _ticker_section(out, ctx, ticker, forecasts, ev, lstms)
    parts += _training_table(train)
    parts.append("</table><p class='note'>Files beside this page: stats.csv, forecasts.csv (the walk-forward table), "
                 "folds.csv, training.csv, daily.csv.</p></body></html>")
    return atomic_write(out / "index.html", "\n".join(parts))


def _intro(ctx: Context, folds: pd.DataFrame, ev: Evaluation) -> list[str]:
    """The page head and the paragraph that says how the backtest was run."""
    e = html.escape
    cut = pd.to_datetime(folds["cutoff"])
    first, last = cut.min(), cut.max()
    nfolds = folds["fold"].nunique()
    rule = {"sign": "sign of the forecast (long or short one unit)", "long_flat": "long when the forecast is positive, "
            "else flat", "vol_target": f"forecast strength x leverage targeting {100 * ctx.vol_target:g}% annualised "
            "volatility"}[ctx.rule]
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>Backtest report: {e(ctx.name)}</title>"
             f"<style>{CSS}</style></head><body><h1>Backtest report: {e(ctx.name)}</h1>",
             f"<p class='note'>{e(', '.join(ctx.tickers))} ({e(ctx.source)} data). Walk-forward: {nfolds} folds, "
             f"cutoffs {first:%Y-%m-%d} .. {last:%Y-%m-%d}, refit every {ctx.refit_every} bars on "
             + ("all data up to the cutoff (expanding window)" if ctx.window == "expanding" else
                f"the last {ctx.window} bars up to the cutoff (rolling window)")
             + (", each LSTM warm-started from its previous fold" if ctx.warm_start else ", fresh models every fold")
             + (" (early-stopped on the last part of the fold's training data, then retrained on all of it for the "
                "best epoch count)" if ctx.refit_full else " (early-stopped on the last part of the fold's training "
                "data, which it does not train on)")
             + f". Forecast: log return over the next {ctx.horizon} bar(s). Every forecast is made at the close of "
             "its origin, at or after its fold's cutoff, by models and scalers fit only on targets known at the "
             "cutoff. "
             f"Trading: {rule}, |position| capped at {ctx.max_position:g}; the position for day t uses the forecast "
             f"made at the close of t-1 and earns day t's return; costs {ctx.cost_bps:g} bp per unit of turnover. "
             "Ratios use a zero risk-free rate and the data's calendar (" + ", ".join(
                 f"{t}: {p} bars a year" for t, p in ev.periods.items()) + f"). Trained on {e(ctx.device)}."
             + (f" MLflow run {ui_link(ctx.tracking_uri, ctx.experiment_id, ctx.run_id)}." if ctx.run_id else "")
             + "</p>"]
    return parts


def _ticker_section(out: Path, ctx: Context, ticker: str, forecasts: pd.DataFrame, ev: Evaluation,
                    lstms: list[str]) -> list[str]:
    """One ticker's tables, verdicts and figures (the figures written into ``out``)."""
    e = html.escape
    parts = []
    s = ev.stats[ev.stats["ticker"] == ticker]
    tag = _slug(ticker)
    parts.append(f"<h2>{e(ticker)}</h2><h3>Forecasts</h3><p class='note'>Over all out-of-sample forecasts. "
                 "RMSE vs naive: relative to the zero-return forecast. R2 OOS: Campbell-Thompson, against the "
                 "historical-mean forecast (the mean of each fold's training targets"
                 + (", a rolling mean with this window" if ctx.window != "expanding" else "") + "). DM: Diebold-Mariano test of squared errors against naive (negative: "
                 "smaller errors; HAC variance for h &gt; 1, Harvey-Leybourne-Newbold correction). Missing: "
                 "forecasts of folds whose LSTM never validated finitely, counted as zero (no view).</p>")
    parts.append(_table(s[s["model"] != BUY_AND_HOLD], FORECAST_COLS))
    parts.append("<h3>Trading</h3>" + _table(s, TRADING_COLS))
    versus = _versus(forecasts, ticker, lstms, ctx.horizon)
    if versus:
        parts.append("<h3>Clipped vs unclipped LSTM</h3>" + "".join(f"<p class='verdict'>{e(v)}</p>" for v in versus))
    daily = ev.daily[ev.daily["ticker"] == ticker]
    models = list(dict.fromkeys(daily["model"]))
    eq = {m: daily[daily["model"] == m].set_index("date")["equity"] for m in models}
    net = {m: daily[daily["model"] == m].set_index("date")["net"] for m in models}
    figures.equity_drawdown(out / f"equity_{tag}.png", eq, title=f"{ticker}: equity (log scale) and drawdown")
    figures.rolling_sharpe(out / f"sharpe_{tag}.png", net, window=ctx.sharpe_window, periods=ev.periods[ticker],
                         title=f"{ticker}: rolling {ctx.sharpe_window}-bar Sharpe ratio")
    f = forecasts[forecasts["ticker"] == ticker]
    pairs = {m: (f.loc[f["model"] == m, "y_pred"].to_numpy(), f.loc[f["model"] == m, "y_true"].to_numpy())
             for m in models if m != BUY_AND_HOLD}
    figures.forecast_scatter(out / f"scatter_{tag}.png", pairs, title=f"{ticker}: forecast vs realised log return")
    fe = ev.fold_errors[ev.fold_errors["ticker"] == ticker]
    per_fold = fe.pivot(index="cutoff", columns="model", values="rmse_vs_naive_pct")
    per_fold = per_fold[[m for m in models if m in per_fold.columns]]
    per_fold.index = pd.to_datetime(per_fold.index)
    figures.fold_errors(out / f"folds_{tag}.png", per_fold, title=f"{ticker}: test RMSE per fold, relative to naive")
    parts += [img(out, f"equity_{tag}.png", f"{ticker} equity curves and drawdowns"),
              img(out, f"sharpe_{tag}.png", f"{ticker} rolling Sharpe"),
              img(out, f"scatter_{tag}.png", f"{ticker} forecast vs realised"),
              img(out, f"folds_{tag}.png", f"{ticker} per-fold error")]
    return parts


def _training_table(train: pd.DataFrame) -> list[str]:
    """How the LSTMs trained, fold by fold (the table is closed by the caller)."""
    e = html.escape
    parts = []
    parts.append("<h2>How the LSTMs trained, fold by fold</h2><p class='note'>Diverged: training became non-finite "
                 "in that fold; unusable: no epoch validated finitely, so the fold's forecasts are missing. Clip rate: "
                 "share of optimizer steps clipped. Gradient norms: global L2 before clipping. Folds beating naive: "
                 "share of folds with a lower test RMSE than the zero forecast.</p>")
    head = ["model", "folds", "diverged", "unusable", "clip rate (median)", "grad norm (median)", "grad norm (max)",
            "steps (median)", "best val loss (median)", "folds beating naive", "fit time"]
    parts.append("<table><tr>" + "".join(f"<th{' class=l' if i == 0 else ''}>{h}</th>" for i, h in enumerate(head))
                 + "</tr>")
    for r in train.itertuples():
        parts.append(f"<tr><td class='l'>{e(r.model)}</td><td>{r.folds}</td><td>{r.diverged}</td><td>{r.unusable}</td>"
                     f"<td>{num(r.clip_rate_median, '{:.1%}')}</td><td>{num(r.grad_norm_median, '{:.3g}')}</td>"
                     f"<td>{num(r.grad_norm_max, '{:.3g}')}</td><td>{num(r.steps_median, '{:.0f}')}</td>"
                     f"<td>{num(r.best_val_loss_median, '{:.4g}')}</td>"
                     f"<td>{num(r.folds_beating_naive_pct, '{:.0f}%')}</td><td>{num(r.fit_seconds, '{:.0f} s')}</td></tr>")
    return parts
