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

from fincast.backtest import diebold_mariano, family
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
    borrow_bps: float = 0.0
    seeds: int = 1
    bootstrap: int = 2000
    block_days: float = 20.0
    device: str = "cpu"
    run_id: str | None = None
    tracking_uri: str = ""
    experiment_id: str = ""
    notes: list[str] = field(default_factory=list)


EDGE_ALPHA = 0.05


def _family_rows(stats: pd.DataFrame) -> pd.Series:
    """Rows that aggregate a model's seeds (median across them)."""
    return stats["Seeds"].notna() if "Seeds" in stats else pd.Series(False, index=stats.index)


def _seed_rows(stats: pd.DataFrame) -> pd.Series:
    return stats["seed"].notna() if "seed" in stats else pd.Series(False, index=stats.index)


def edge_verdict(stats: pd.DataFrame, ticker: str) -> str:
    """One line: is there evidence that any strategy beat buy and hold on its Sharpe ratio, after adjusting for
    every strategy compared (White's reality check)? 'No evidence' unless the adjusted test says so."""
    s = stats[(stats["ticker"] == ticker) & ~_family_rows(stats)]
    if "Edge p (reality check)" not in s:
        return f"{ticker}: no test against buy-and-hold was possible."
    tested = s[s["Edge p (reality check)"].notna()]
    if tested.empty:
        return f"{ticker}: no strategy's returns varied, so there is nothing to test against buy-and-hold."
    best = tested.sort_values(["Edge p (reality check)", "Sharpe vs B&H"], ascending=[True, False]).iloc[0]
    n = len(tested)
    bh = s.loc[s["model"] == BUY_AND_HOLD, "Sharpe Ratio"]
    numbers = (f"Sharpe {best['Sharpe Ratio']:.2f} vs buy-and-hold's {bh.iloc[0]:.2f}, difference "
               f"{best['Sharpe vs B&H']:+.2f}, 95% CI [{best['Sharpe vs B&H CI low']:+.2f}, "
               f"{best['Sharpe vs B&H CI high']:+.2f}]; reality-check p = {best['Edge p (reality check)']:.3f} "
               f"adjusted for the {n} strategies compared")
    if best["Edge p (reality check)"] < EDGE_ALPHA and best["Sharpe vs B&H"] > 0:
        return f"{ticker}: evidence of an edge over buy-and-hold: {best['model']} ({numbers})."
    return f"{ticker}: no evidence of an edge over buy-and-hold. The most promising of the strategies, " \
           f"{best['model']} ({numbers})."


def _spread(r: pd.Series, col: str, fmt: str) -> str:
    """'1.23' or, for a model trained with several seeds, 'median [min, max]'."""
    value = num(r.get(col, np.nan), fmt)
    lo, hi = r.get(f"{col} min", np.nan), r.get(f"{col} max", np.nan)
    if isinstance(lo, float) and np.isfinite(lo) and pd.notna(r.get("Seeds")):
        return f"{value} <small>[{num(lo, fmt)}, {num(hi, fmt)}]</small>"
    return value


def _ci(r: pd.Series, col: str, fmt: str) -> str:
    lo, hi = r.get(f"{col} CI low", np.nan), r.get(f"{col} CI high", np.nan)
    if not (isinstance(lo, float) and np.isfinite(lo)):
        return ""
    return f"<br><small>CI [{num(lo, fmt)}, {num(hi, fmt)}]</small>"


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
    """Clipped LSTMs against the unclipped one of the same seed on the same forecasts: Diebold-Mariano tests."""
    t = forecasts[forecasts["ticker"] == ticker]
    out = []
    for m in lstms:
        fam = family(m)
        control = "lstm-none" + m[len(fam):]
        if fam == "lstm-none" or control not in lstms:
            continue
        base = t[t["model"] == control].set_index("date")
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
    parts[1:1] = ["<h2 id='verdict'>Verdict</h2>", *_verdicts(ev)]
    parts += [f"<p class='note'>{html.escape(n)}</p>" for n in ctx.notes]
    for ticker in sorted(ev.periods):
        parts += _ticker_section(out, ctx, ticker, forecasts, ev, lstms)
    parts += _training_table(train)
    parts.append("</table><p class='note'>Files beside this page: stats.csv, forecasts.csv (the walk-forward table), "
                 "folds.csv, training.csv, daily.csv.</p></body></html>")
    return atomic_write(out / "index.html", "\n".join(parts))


def verdict_lines(ev: Evaluation) -> list[str]:
    """Per ticker: the edge verdict, then each LSTM's Sharpe ratio across its seeds."""
    lines = []
    for ticker in sorted(ev.periods):
        lines.append(edge_verdict(ev.stats, ticker))
        fam = ev.stats[(ev.stats["ticker"] == ticker) & _family_rows(ev.stats)]
        if len(fam):
            lines.append(f"{ticker}: Sharpe ratio across training seeds: " + "; ".join(
                f"{r['model']} median {r['Sharpe Ratio']:.2f} (range {r['Sharpe Ratio min']:.2f} to "
                f"{r['Sharpe Ratio max']:.2f}, {int(r['Seeds'])} seeds)" for _, r in fam.iterrows()) + ".")
    return lines


def _verdicts(ev: Evaluation) -> list[str]:
    return [f"<p class='verdict'>{html.escape(line)}</p>" for line in verdict_lines(ev)]


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
             f"made at the close of t-1 and earns day t's return; costs {ctx.cost_bps:g} bp per unit of turnover and "
             f"{ctx.borrow_bps:g} bp a year on short positions. "
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
    main = s[~_seed_rows(s)]
    parts.append(_forecast_table(main[main["model"] != BUY_AND_HOLD]))
    parts += _trading_tables(ctx, main, s[_seed_rows(s)])
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


def _head(names: list[str]) -> str:
    """A table's opening and header row, the first column left-aligned."""
    return "<table><tr>" + "".join(f"<th{' class=l' if i == 0 else ''}>{h}</th>" for i, h in enumerate(names)) \
        + "</tr>"


def _forecast_table(rows: pd.DataFrame) -> str:
    e = html.escape
    out = [_head(["model", "RMSE", "vs naive", "directional accuracy", "always long", "R2 OOS", "DM stat", "DM p",
                  "missing"])]
    for _, r in rows.iterrows():
        out.append(
            f"<tr><td class='l'>{e(str(r['model']))}</td><td>{_spread(r, 'RMSE', '{:.5f}')}</td>"
            f"<td>{_spread(r, 'RMSE vs Naive [%]', '{:+.2f}%')}</td>"
            f"<td>{_spread(r, 'Directional Accuracy [%]', '{:.1f}%')}</td>"
            f"<td>{num(r.get('Always-Long Accuracy [%]', np.nan), '{:.1f}%')}</td>"
            f"<td>{_spread(r, 'R2 OOS [%]', '{:+.2f}%')}</td><td>{num(r.get('DM Stat', np.nan), '{:+.2f}')}</td>"
            f"<td>{num(r.get('DM p-value', np.nan), '{:.3f}')}</td>"
            f"<td>{num(r.get('Missing [%]', np.nan), '{:.1f}%')}</td></tr>")
    return "".join(out) + "</table>"


def _trading_tables(ctx: Context, rows: pd.DataFrame, seeds: pd.DataFrame) -> list[str]:
    e = html.escape
    parts = [f"<h3>Trading</h3><p class='note'>After costs ({ctx.cost_bps:g} bp per unit of turnover, shorts "
             f"{ctx.borrow_bps:g} bp a year). "
             + (f"LSTMs: median across {ctx.seeds} training seeds, [min, max] beside it; their intervals and "
                "p-values are those of the median seed (by Sharpe). " if ctx.seeds > 1 else "")
             + f"CI: 95% stationary-bootstrap interval ({ctx.bootstrap} resamples, mean block {ctx.block_days:g} "
             "bars). vs B&amp;H: Sharpe ratio minus buy-and-hold's. Edge p: one-sided, White's reality check "
             "adjusted for every strategy compared (for a model with seeds: its best seed's). Best 10 days: share "
             "of the log outperformance over buy-and-hold earned on the 10 best days relative to it.</p>"]
    out = [_head(["model", "Sharpe", "CAGR", "max drawdown", "vs B&amp;H (Sharpe)", "edge p", "best 10 days",
                  "volatility", "turnover", "exposure"])]
    for _, r in rows.iterrows():
        out.append(
            f"<tr><td class='l'>{e(str(r['model']))}</td>"
            f"<td>{_spread(r, 'Sharpe Ratio', '{:.2f}')}{_ci(r, 'Sharpe', '{:.2f}')}</td>"
            f"<td>{_spread(r, 'CAGR [%]', '{:+.1f}%')}{_ci(r, 'CAGR [%]', '{:+.1f}%')}</td>"
            f"<td>{_spread(r, 'Max. Drawdown [%]', '{:.1f}%')}{_ci(r, 'Max. Drawdown [%]', '{:.1f}%')}</td>"
            f"<td>{_spread(r, 'Sharpe vs B&H', '{:+.2f}')}{_ci(r, 'Sharpe vs B&H', '{:+.2f}')}</td>"
            f"<td>{num(r.get('Edge p (reality check)', np.nan), '{:.3f}')}</td>"
            f"<td>{_spread(r, 'Best 10 Days Share [%]', '{:.0f}%')}</td>"
            f"<td>{num(r.get('Volatility (ann.) [%]', np.nan), '{:.1f}%')}</td>"
            f"<td>{num(r.get('Turnover (ann.) [x]', np.nan), '{:.1f}x')}</td>"
            f"<td>{num(r.get('Exposure [%]', np.nan), '{:.0f}%')}</td></tr>")
    parts.append("".join(out) + "</table>")
    costs = [c for c in rows.columns if c.startswith("Sharpe @ ")]
    if costs:
        at = sorted([(float(c.split()[2]), c) for c in costs] + [(ctx.cost_bps, "Sharpe Ratio")])
        parts.append("<h3>Cost sensitivity</h3><p class='note'>Sharpe ratio at other transaction costs (bp per unit "
                     "of turnover; borrow unchanged); the report's cost in bold.</p><table><tr><th class='l'>model"
                     "</th>" + "".join(f"<th>{'<b>' if c == 'Sharpe Ratio' else ''}{bp:g} bp</th>" for bp, c in at)
                     + "</tr>" + "".join(f"<tr><td class='l'>{e(str(r['model']))}</td>"
                                         + "".join(f"<td>{num(r.get(c, np.nan), '{:.2f}')}</td>" for _, c in at)
                                         + "</tr>" for _, r in rows.iterrows()) + "</table>")
    if len(seeds):
        parts.append("<h3>Each training seed</h3>" + _table(seeds, [
            ("Sharpe Ratio", "{:.2f}"), ("Sharpe CI low", "{:.2f}"), ("Sharpe CI high", "{:.2f}"),
            ("CAGR [%]", "{:+.1f}"), ("Max. Drawdown [%]", "{:.1f}"), ("Sharpe vs B&H", "{:+.2f}"),
            ("Edge p (reality check)", "{:.3f}"), ("RMSE vs Naive [%]", "{:+.2f}"),
            ("Directional Accuracy [%]", "{:.1f}")]))
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
