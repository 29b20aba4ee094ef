"""How sure the trading numbers are: pure functions over daily strategy returns (numpy).

* Intervals: the stationary bootstrap of Politis and Romano (1994, JASA 89:1303): blocks of geometric length
  (mean ``block`` bars) resampled with wrap-around, so volatility clustering and autocorrelation within a block
  survive; percentile intervals for the Sharpe ratio, CAGR and maximum drawdown. Every strategy of a ticker is
  resampled on the same days, so differences keep their pairing.
* The edge over buy-and-hold: White's reality check (White 2000, Econometrica 68:1097) on Sharpe-ratio
  differences, each strategy minus buy-and-hold, with the stationary bootstrap; each strategy's p-value is
  adjusted for every strategy compared (the single-step max statistic of Romano and Wolf 2005, Econometrica
  73:1237): p_k = P*(max_j (d*_j - d_j) >= d_k). One-sided: only a higher Sharpe than buy-and-hold is an edge.
* Concentration: the share of a strategy's log outperformance over buy-and-hold earned on its 10 best days.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

CHUNK = 256  # resamples at a time (memory: CHUNK x days x strategies)


def stationary_indices(n: int, n_boot: int, block: float, rng: np.random.Generator) -> np.ndarray:
    """(n_boot, n) indices of stationary-bootstrap resamples of 0..n-1: each position starts a new block with
    probability 1/block (at a uniform index), else continues the previous one (wrapping at n)."""
    new = rng.random((n_boot, n)) < 1.0 / block
    new[:, 0] = True
    starts = rng.integers(0, n, size=(n_boot, n))
    t = np.arange(n)
    t_start = np.maximum.accumulate(np.where(new, t, 0), axis=1)  # when each position's block began
    first = np.take_along_axis(starts, t_start, axis=1)
    return (first + (t - t_start)) % n


def sharpe(r: np.ndarray, periods: int) -> np.ndarray:
    """Annualised Sharpe ratio along the last axis (zero risk-free rate); nan where returns do not vary."""
    sd = r.std(axis=-1, ddof=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(sd > 0, r.mean(axis=-1) / sd * math.sqrt(periods), np.nan)


def cagr(r: np.ndarray, periods: int) -> np.ndarray:
    """Compound annual growth (fraction) along the last axis; -1 once the capital is gone."""
    with np.errstate(divide="ignore", invalid="ignore"):
        growth = np.sum(np.log1p(np.maximum(r, -1.0)), axis=-1)
        return np.expm1(growth * periods / r.shape[-1])


def drawdown(equity) -> np.ndarray:
    """Drawdown from the running peak, as a fraction (0 at a peak, -0.5 when half is lost), along the last axis;
    the starting capital 1 counts as a peak; nan stays nan. The one drawdown of fincast: statistics and figures
    use it."""
    eq = np.asarray(equity, dtype=float)
    peak = np.fmax.accumulate(np.fmax(eq, 1.0), axis=-1)  # fmax ignores nan
    with np.errstate(invalid="ignore"):  # inf / inf
        return eq / peak - 1.0


def max_drawdown(r: np.ndarray) -> np.ndarray:
    """Worst fall from a running peak (fraction, <= 0) along the last axis of daily returns."""
    return np.min(drawdown(np.cumprod(1.0 + r, axis=-1)), axis=-1)


def best_days_share(r: np.ndarray, bench: np.ndarray, days: int = 10) -> float:
    """Share (percent) of the strategy's total log outperformance over ``bench`` that comes from its ``days``
    best days relative to it; nan when it did not outperform."""
    d = np.log1p(np.asarray(r, float)) - np.log1p(np.asarray(bench, float))
    total = float(np.sum(d))
    if not total > 0:
        return math.nan
    return 100.0 * float(np.sum(np.sort(d)[-days:])) / total


def trading_uncertainty(returns: dict[str, np.ndarray], bench: str, periods: int, *, n_boot: int = 2000,
                        block: float = 20.0, confidence: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """One row per strategy (index: its name): bootstrap intervals of Sharpe, CAGR and max drawdown, the Sharpe
    difference to ``bench`` with its interval, the reality check's raw and adjusted one-sided p-values (strategies
    with constant returns, e.g. always flat, are not tested), and the share of the outperformance from the 10 best
    days. All strategies' daily returns must cover the same days."""
    names = list(returns)
    R = np.stack([np.asarray(returns[m], float) for m in names])  # strategies x days
    n = R.shape[1]
    b = names.index(bench)
    obs_s = sharpe(R, periods)
    obs_d = obs_s - obs_s[b]
    rng = np.random.default_rng(seed)
    boot_s, boot_c, boot_m = [], [], []
    for start in range(0, n_boot, CHUNK):
        idx = stationary_indices(n, min(CHUNK, n_boot - start), block, rng)
        sample = R[:, idx]  # strategies x boot x days
        boot_s.append(sharpe(sample, periods).T)
        boot_c.append(cagr(sample, periods).T)
        boot_m.append(max_drawdown(sample).T)
    S, C, M = np.concatenate(boot_s), np.concatenate(boot_c), np.concatenate(boot_m)  # boot x strategies
    D = S - S[:, [b]]
    tail = 100 * (1 - confidence) / 2
    q = (tail, 100 - tail)
    tested = np.array([i != b and np.isfinite(obs_d[i]) and np.isfinite(D[:, i]).all() for i in range(len(names))])
    centred = np.where(tested, D - obs_d, -np.inf)
    max_stat = centred.max(axis=1) if tested.any() else np.full(len(D), -np.inf)
    rows = []
    for i in range(len(names)):
        lo_s, hi_s = np.nanpercentile(S[:, i], q) if np.isfinite(S[:, i]).any() else (math.nan, math.nan)
        lo_d, hi_d = np.nanpercentile(D[:, i], q) if i != b and np.isfinite(D[:, i]).any() else (math.nan, math.nan)
        rows.append({
            "Sharpe CI low": lo_s, "Sharpe CI high": hi_s,
            "CAGR [%] CI low": 100 * np.percentile(C[:, i], tail),
            "CAGR [%] CI high": 100 * np.percentile(C[:, i], 100 - tail),
            "Max. Drawdown [%] CI low": 100 * np.percentile(M[:, i], tail),
            "Max. Drawdown [%] CI high": 100 * np.percentile(M[:, i], 100 - tail),
            "Sharpe vs B&H": obs_d[i] if i != b else math.nan,
            "Sharpe vs B&H CI low": lo_d, "Sharpe vs B&H CI high": hi_d,
            "Edge p (raw)": float(np.mean(D[:, i] - obs_d[i] >= obs_d[i])) if tested[i] else math.nan,
            "Edge p (reality check)": float(np.mean(max_stat >= obs_d[i])) if tested[i] else math.nan,
            "Best 10 Days Share [%]": best_days_share(R[i], R[b]) if i != b else math.nan,
        })
    out = pd.DataFrame(rows, index=names)
    out.attrs["strategies_tested"] = int(tested.sum())
    return out


def seed_spread(stats: pd.DataFrame, family_of, columns: list[str]) -> pd.DataFrame:
    """Per ticker and model family with several seeds (``family_of(model)`` differs from the model): the median
    of every numeric column across its seeds, with the range of ``columns`` as '<col> min' and '<col> max', and
    'Seeds'. The interval and p-value columns are the median seed's (by Sharpe ratio; the lower middle one for
    an even count), stated as such in the report."""
    s = stats.assign(family=[family_of(m) for m in stats["model"]])
    rows = []
    for (ticker, fam), g in s[s["family"] != s["model"]].groupby(["ticker", "family"], sort=False):
        numeric = g.select_dtypes("number")
        row = {"ticker": ticker, "model": fam, **numeric.median().to_dict(), "Seeds": float(len(g))}
        order = g.sort_values("Sharpe Ratio", na_position="first") if "Sharpe Ratio" in g else g
        mid = order.iloc[(len(order) - 1) // 2]
        for c in [c for c in g.columns if " CI " in c or c.startswith("Edge p")]:
            row[c] = mid[c]
        if "Edge p (reality check)" in g:
            row["Edge p (reality check)"] = float(g["Edge p (reality check)"].min())  # any seed's edge
        for c in columns:
            if c in g:
                row[f"{c} min"], row[f"{c} max"] = float(g[c].min()), float(g[c].max())
        rows.append(row)
    return pd.DataFrame(rows)
