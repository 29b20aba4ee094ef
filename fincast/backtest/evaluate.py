"""Forecast and trading evaluation of a walk-forward table: pure functions returning labelled Series.

Units are in the labels (``Return [%]``). Conventions:

* Forecasts are log returns over the horizon; a missing forecast (an LSTM fold that never validated
  finitely) counts as the zero forecast, "no view", and is reported in ``Missing [%]``.
* ``R2 OOS [%]`` is Campbell and Thompson's out-of-sample R2 against the historical mean forecast.
* ``DM`` is the Diebold-Mariano test of squared errors against the naive (zero) forecast, with the long-run
  variance over h-1 lags (rectangular weights, as DM and HLN assume for h-step forecasts; Bartlett weights
  if that comes out non-positive) and the Harvey-Leybourne-Newbold small-sample correction (Student t, T-1
  degrees of freedom); a negative statistic means smaller errors than naive.
* Trading: the position held on day t is decided from the forecast made at the close of t-1 (the origin)
  and earns day t's simple return; a cost of ``cost_bps`` basis points is paid per unit of turnover
  |position_t - position_{t-1}| (entering from flat on the first day included). Ratios use a zero risk-free
  rate and annualise with the data's calendar: 365 bars a year when it trades on weekends, else 252.
"""

from __future__ import annotations

__all__ = ["BUY_AND_HOLD", "MEAN", "NAIVE", "RIDGE", "Evaluation", "diebold_mariano", "drawdown", "evaluate",
           "fold_errors", "forecast_stats", "periods_per_year", "positions", "strategy_returns", "trading_stats"]

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats as sps

from fincast.backtest.naming import BUY_AND_HOLD, MEAN, NAIVE, RIDGE, SEED_SEP, family
from fincast.backtest.uncertainty import drawdown, seed_spread, sharpe, trading_uncertainty


def periods_per_year(dates) -> int:
    """365 for a calendar that trades on weekends (crypto), 252 for a trading-day calendar (equities); a stray
    weekend bar in equity data does not make it a 7-day calendar."""
    days = pd.DatetimeIndex(dates).day_of_week
    return 365 if len(days) and float(np.mean(days >= 5)) > 0.1 else 252  # ~29% of a 7-day calendar


def diebold_mariano(e_model, e_bench, horizon: int = 1) -> tuple[float, float]:
    """(statistic, two-sided p) of the Diebold-Mariano test on squared errors (model minus benchmark)."""
    d = np.square(np.asarray(e_model, float)) - np.square(np.asarray(e_bench, float))
    d = d[np.isfinite(d)]
    n = len(d)
    if n < 3:
        return math.nan, math.nan
    u = d - d.mean()
    gamma = [u @ u / n] + [(u[k:] @ u[:-k]) / n for k in range(1, min(horizon, n))]
    lrv = gamma[0] + 2 * sum(gamma[1:])  # rectangular over h-1 lags: h-step errors are MA(h-1) (DM 1995, HLN)
    if not lrv > 0:  # the rectangular estimate can be negative: Bartlett (Newey-West) weights then
        lrv = gamma[0] + 2 * sum((1 - k / horizon) * g for k, g in enumerate(gamma[1:], start=1))
    if not lrv > 0:
        return math.nan, math.nan
    stat = d.mean() / math.sqrt(lrv / n)
    h = horizon
    stat *= math.sqrt(max(n + 1 - 2 * h + h * (h - 1) / n, 0.0) / n)
    return float(stat), float(2 * sps.t.sf(abs(stat), n - 1))


def forecast_stats(y_true, y_pred, y_mean, *, horizon: int = 1) -> pd.Series:
    """Out-of-sample forecast statistics of one model; ``y_mean`` is the historical-mean forecast of the same
    samples (the benchmark of the out-of-sample R2)."""
    y = np.asarray(y_true, float)
    raw = np.asarray(y_pred, float)
    missing = ~np.isfinite(raw)
    f = np.where(missing, 0.0, raw)
    m = np.asarray(y_mean, float)
    e, e0 = f - y, -y
    rmse, rmse0 = math.sqrt(np.mean(e**2)), math.sqrt(np.mean(e0**2))
    hits = np.where(f == 0, 0.5, (np.sign(f) == np.sign(y)).astype(float))
    up = np.where(y == 0, 0.5, (y > 0).astype(float))  # always forecasting a rise
    denom = np.sum((y - m) ** 2)
    dm, p = diebold_mariano(e, e0, horizon) if np.any(f != 0) else (math.nan, math.nan)
    return pd.Series({
        "Forecasts": float(len(y)),
        "Missing [%]": 100 * float(np.mean(missing)) if len(y) else math.nan,
        "RMSE": rmse,
        "MAE": float(np.mean(np.abs(e))),
        "RMSE vs Naive [%]": 100 * (rmse / rmse0 - 1) if rmse0 > 0 else math.nan,
        "Directional Accuracy [%]": 100 * float(np.mean(hits)),
        "Always-Long Accuracy [%]": 100 * float(np.mean(up)),
        "R2 OOS [%]": 100 * (1 - np.sum(e**2) / denom) if denom > 0 else math.nan,
        "DM Stat": dm,
        "DM p-value": p,
    })


def positions(forecast, *, rule: str, max_position: float = 1.0, scale=None, vol=None, vol_target: float = 0.15,
              periods: int = 252) -> np.ndarray:
    """Position decided from each forecast (in units of capital, |position| <= max_position).

    sign: long one unit on a positive forecast, short on a negative one, flat on zero. long_flat: long on a
    positive forecast, else flat. vol_target: clip(forecast / scale, -1, 1) x vol_target / (vol x sqrt(periods)),
    where ``scale`` is the typical size of the model's forecasts (the RMS of its forecasts on its training
    inputs) and ``vol`` the daily volatility known at the forecast's origin: a typical forecast takes the
    position whose volatility is the target. A missing forecast (NaN) or unknown volatility means flat."""
    f = np.asarray(forecast, float)
    f = np.where(np.isfinite(f), f, 0.0)
    cap = float(max_position)
    if rule == "sign":
        pos = np.sign(f) * min(1.0, cap)
    elif rule == "long_flat":
        pos = (f > 0) * min(1.0, cap)
    elif rule == "vol_target":
        s = np.asarray(scale, float)
        v = np.asarray(vol, float)
        with np.errstate(divide="ignore", invalid="ignore"):
            strength = np.clip(np.where(s > 0, f / s, 0.0), -1, 1)
            lev = np.where(np.isfinite(v) & (v > 0), vol_target / (v * math.sqrt(periods)), 0.0)
        pos = np.clip(strength * lev, -cap, cap)
    else:
        raise ValueError(f"unknown position rule {rule!r}")
    return pos.astype(float) + 0.0  # no negative zeros


def strategy_returns(returns, held, cost_bps: float, borrow_bps: float = 0.0, periods: int = 252) -> pd.DataFrame:
    """Daily strategy returns: ``held[t]`` is the position over day t (decided before it), ``returns[t]``
    the asset's simple return that day. Net = held x return - cost_bps/1e4 x |held[t] - held[t-1]|
    - borrow_bps/1e4/periods x max(-held[t], 0) (a short position pays its borrow every bar)."""
    r = pd.Series(returns, dtype=float)
    pos = pd.Series(np.asarray(held, float), index=r.index)
    turnover = (pos - pos.shift(1, fill_value=0.0)).abs()
    gross = pos * r
    cost = cost_bps / 1e4 * turnover
    borrow = borrow_bps / 1e4 / periods * np.maximum(-pos, 0.0)
    return pd.DataFrame({"position": pos, "asset": r, "gross": gross, "cost": cost, "borrow": borrow,
                         "net": gross - cost - borrow, "turnover": turnover})


def trading_stats(net, position, periods: int) -> pd.Series:
    """Statistics of a daily return series (and the positions behind it), annualised with ``periods``."""
    r = np.asarray(net, float)
    pos = np.asarray(position, float)
    n = len(r)
    if n == 0:
        return pd.Series(dtype=float)
    equity = np.cumprod(1 + r)
    years = n / periods
    total = equity[-1] - 1
    cagr = equity[-1] ** (1 / years) - 1 if equity[-1] > 0 else -1.0
    sd = float(np.std(r, ddof=1)) if n > 1 else math.nan
    downside = math.sqrt(np.mean(np.minimum(r, 0) ** 2))
    mdd = float(np.min(drawdown(equity)))
    active = pos != 0
    return pd.Series({
        "Days": float(n),
        "Total Return [%]": 100 * total,
        "CAGR [%]": 100 * cagr,
        "Volatility (ann.) [%]": 100 * sd * math.sqrt(periods),
        "Sharpe Ratio": float(sharpe(r, periods)) if n > 1 else math.nan,
        "Sortino Ratio": np.mean(r) * periods / (downside * math.sqrt(periods)) if downside > 0 else math.nan,
        "Max. Drawdown [%]": 100 * mdd,
        "Calmar Ratio": cagr / -mdd if mdd < 0 else math.nan,
        "Hit Rate [%]": 100 * float(np.mean(r[active] > 0)) if active.any() else math.nan,
        "Turnover (ann.) [x]": float(np.sum(np.abs(np.diff(pos, prepend=0.0)))) / years,
        "Exposure [%]": 100 * float(np.mean(active)),
        "Avg. |Position|": float(np.mean(np.abs(pos))),
    })


# ---------------------------------------------------------------------------------------------
# A whole walk-forward table
# ---------------------------------------------------------------------------------------------


@dataclass
class Evaluation:
    stats: pd.DataFrame  # one row per (ticker, model), buy and hold included: forecast and trading columns
    daily: pd.DataFrame  # date, ticker, model, position, asset, gross, cost, net, turnover, equity
    fold_errors: pd.DataFrame  # fold, cutoff, ticker, model, n, rmse, rmse_vs_naive_pct
    periods: dict[str, int]  # ticker -> bars a year


def evaluate(table: pd.DataFrame, frames: dict[str, pd.DataFrame], *, models: list[str], horizon: int,
             rule: str, max_position: float, cost_bps: float, vol_target: float, vol_window: int,
             price: str = "adj_close", borrow_bps: float = 0.0, n_boot: int = 2000, block: float = 20.0,
             seed: int = 0) -> Evaluation:
    """Forecast statistics, strategy returns and trading statistics of every model, per ticker, with bootstrap
    intervals, the reality check against buy and hold and the cost sensitivity (``uncertainty``); then, per model
    trained with several seeds, the median and range across its seeds (rows named by the family)."""
    stats_rows, daily, periods = [], [], {}
    for ticker, tab in table.groupby("ticker", sort=True):
        df = frames[ticker]
        px = df[price].astype(float)
        periods[ticker] = ppy = periods_per_year(df.index)
        asset = px.pct_change()
        logret = np.log(px).diff()
        vol = logret.rolling(vol_window, min_periods=vol_window).std()  # known at each bar's close
        nxt = pd.Series(df.index[1:].append(pd.DatetimeIndex([pd.NaT])), index=df.index)  # the bar after
        mean_fc = tab[tab["model"] == MEAN].set_index("date")["y_pred"]
        days, rows, strategies = None, [], {}
        for model in models:
            t = tab[tab["model"] == model].sort_values("origin")
            fs = forecast_stats(t["y_true"], t["y_pred"], mean_fc.reindex(t["date"]).to_numpy(), horizon=horizon)
            origin = pd.DatetimeIndex(t["origin"])
            pos = positions(t["y_pred"].to_numpy(), rule=rule, max_position=max_position,
                            scale=t["pred_rms_train"].to_numpy(), vol=vol.reindex(origin).to_numpy(),
                            vol_target=vol_target, periods=ppy)
            held_on = pd.DatetimeIndex(nxt.reindex(origin).to_numpy())
            keep = ~held_on.isna()
            if days is None:  # every model has the same origins: one trading span per ticker
                days = held_on[keep]
                span = df.index[(df.index >= days.min()) & (df.index <= days.max())]
            held = pd.Series(pos[keep], index=held_on[keep]).reindex(span, fill_value=0.0)
            sr = strategy_returns(asset.reindex(span), held, cost_bps, borrow_bps, ppy)
            ts = trading_stats(sr["net"], sr["position"], ppy)
            rows.append(pd.concat([pd.Series({"ticker": ticker, "model": model}), fs, ts]))
            strategies[model] = sr
            daily.append(sr.assign(date=span, ticker=ticker, model=model, equity=(1 + sr["net"]).cumprod()))
        bh = strategy_returns(asset.reindex(span), np.ones(len(span)), cost_bps, borrow_bps, ppy)
        ts = trading_stats(bh["net"], bh["position"], ppy)
        rows.append(pd.concat([pd.Series({"ticker": ticker, "model": BUY_AND_HOLD}), ts]))
        strategies[BUY_AND_HOLD] = bh
        daily.append(bh.assign(date=span, ticker=ticker, model=BUY_AND_HOLD, equity=(1 + bh["net"]).cumprod()))
        stats_rows.append(_with_uncertainty(pd.DataFrame(rows), strategies, ppy, cost_bps, n_boot, block, seed))
    stats = pd.concat(stats_rows, ignore_index=True)
    spread = seed_spread(stats, family, SPREAD_COLS)
    if len(spread):
        stats["seed"] = [float(m.split(SEED_SEP)[1]) if SEED_SEP in m else math.nan for m in stats["model"]]
        stats = pd.concat([spread, stats], ignore_index=True)
        order = {m: i for i, m in enumerate(dict.fromkeys(family(m) for m in stats["model"]))}
        stats = stats.sort_values(["ticker", "model"], key=lambda c: c.map(order) if c.name == "model" else c,
                                  kind="stable").reset_index(drop=True)
    daily_frame = pd.concat(daily, ignore_index=True)
    return Evaluation(stats, daily_frame, fold_errors(table), periods)


SPREAD_COLS = ["RMSE", "RMSE vs Naive [%]", "Directional Accuracy [%]", "R2 OOS [%]", "Total Return [%]", "CAGR [%]",
               "Sharpe Ratio", "Max. Drawdown [%]", "Sharpe vs B&H", "Best 10 Days Share [%]"]
COST_MULTIPLES = (0, 2, 4)


def _with_uncertainty(rows: pd.DataFrame, strategies: dict[str, pd.DataFrame], periods: int, cost_bps: float,
                      n_boot: int, block: float, seed: int) -> pd.DataFrame:
    """One ticker's stats rows with the bootstrap intervals, the reality check and the Sharpe ratio at other
    costs (0, 2 and 4 times cost_bps; the borrow cost unchanged)."""
    unc = trading_uncertainty({m: sr["net"].to_numpy() for m, sr in strategies.items()}, BUY_AND_HOLD, periods,
                              n_boot=n_boot, block=block, seed=seed)
    out = pd.concat([rows.reset_index(drop=True), unc.reindex(rows["model"]).reset_index(drop=True)], axis=1)
    for k in COST_MULTIPLES:
        if k * cost_bps == cost_bps:
            continue
        out[f"Sharpe @ {k * cost_bps:g} bp"] = [
            float(sharpe((sr["gross"] - k * sr["cost"] - sr["borrow"]).to_numpy(), periods))
            for sr in (strategies[m] for m in rows["model"])]
    out["Strategies Tested"] = float(unc.attrs["strategies_tested"])
    return out


def fold_errors(table: pd.DataFrame) -> pd.DataFrame:
    """RMSE of each model in each fold (missing forecasts as zero), and relative to naive in that fold."""
    t = table.assign(err2=(table["y_pred"].fillna(0.0) - table["y_true"]) ** 2)
    g = t.groupby(["fold", "cutoff", "ticker", "model"], sort=True)
    out = g["err2"].agg(["size", "mean"]).reset_index().rename(columns={"size": "n"})
    out["rmse"] = np.sqrt(out.pop("mean"))
    naive = out[out["model"] == NAIVE].set_index(["fold", "ticker"])["rmse"]
    ref = naive.reindex(pd.MultiIndex.from_frame(out[["fold", "ticker"]])).to_numpy()
    out["rmse_vs_naive_pct"] = 100 * (out["rmse"].to_numpy() / ref - 1)
    return out
