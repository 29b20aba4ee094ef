"""The options report (layer L3): the LSTM's test prices against the strongest baseline, verdict first.

Pure functions of the per-contract table (``predictions.csv``: market_price and ``<model>_price`` columns) and
the evaluation's tables, and ``page`` which writes ``index.html`` beside them. The headline compares the LSTM
with the baseline that prices best relative to it on the same contracts (never the first or the weakest);
Black-Scholes with the true model's price (synthetic markets) is shown but not a baseline a trader could use.
"""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np
import pandas as pd

from fincast.config import atomic_write
from fincast.reports.html import CSS, img, num

LSTM = "lstm"
NOT_A_BASELINE = {LSTM, "true_model"}  # the oracle of a synthetic market
COLLAPSE_RATIO, COLLAPSE_MIN = 0.1, 10  # a bucket's predictions vary less than a tenth as much as the market's


def versus_baselines(table: pd.DataFrame, models: list[str]) -> pd.DataFrame:
    """Per baseline: the LSTM's and its price RMSE on the contracts both price, and the relative difference."""
    rows = []
    lstm = table[f"{LSTM}_price"].to_numpy(float)
    market = table["market_price"].to_numpy(float)
    for b in [m for m in models if m not in NOT_A_BASELINE]:
        base = table[f"{b}_price"].to_numpy(float)
        both = np.isfinite(lstm) & np.isfinite(base)
        if not both.any():
            continue
        r_l = float(np.sqrt(np.mean((lstm[both] - market[both]) ** 2)))
        r_b = float(np.sqrt(np.mean((base[both] - market[both]) ** 2)))
        rows.append({"baseline": b, "contracts": int(both.sum()), "lstm_rmse": r_l, "baseline_rmse": r_b,
                     "lstm_vs_baseline_pct": 100 * (r_l / r_b - 1) if r_b > 0 else np.nan})
    return pd.DataFrame(rows, columns=["baseline", "contracts", "lstm_rmse", "baseline_rmse", "lstm_vs_baseline_pct"])


def label(name: str) -> str:
    if name == LSTM:
        return "LSTM"
    if name.startswith("bs_hv"):
        return f"BS hist vol {name[len('bs_hv'):]}d"
    return {"bs_vol_index": "BS vol index", "bs_prev_iv": "BS previous-day IV", "true_model": "true model"}.get(
        name, name)


def headline(versus: pd.DataFrame) -> str:
    """The LSTM against the best baseline (the one it loses most to, or beats least, on shared contracts)."""
    if versus.empty or not np.isfinite(versus["lstm_rmse"]).any():
        return "The LSTM priced no test contract (no epoch validated finitely): nothing to compare."
    best = versus.sort_values("lstm_vs_baseline_pct", ascending=False).iloc[0]
    rel = best["lstm_vs_baseline_pct"]
    word = "better than" if rel < 0 else "worse than"
    return (f"LSTM price RMSE {best['lstm_rmse']:.4g} vs {best['baseline_rmse']:.4g} for the best baseline, "
            f"{label(best['baseline'])}, on the same {int(best['contracts']):,} test contracts: {rel:+.1f}% "
            f"({word} it). Against every baseline: " + "; ".join(
                f"{label(r.baseline)} {r.lstm_vs_baseline_pct:+.1f}%" for r in versus.itertuples()) + ".")


def collapsed_buckets(table: pd.DataFrame, moneyness: np.ndarray, maturity: np.ndarray) -> list[str]:
    """Buckets (moneyness x maturity, at least COLLAPSE_MIN contracts) where the LSTM's prices vary less than
    COLLAPSE_RATIO times the market's: the model predicts nearly one price there."""
    frame = pd.DataFrame({"m": moneyness, "t": maturity, "p": table[f"{LSTM}_price"].to_numpy(float),
                          "mkt": table["market_price"].to_numpy(float)})
    out = []
    for (m, t), g in frame.groupby(["m", "t"], sort=False):
        g = g[np.isfinite(g["p"])]
        if len(g) >= COLLAPSE_MIN and g["mkt"].std() > 0 and g["p"].std() < COLLAPSE_RATIO * g["mkt"].std():
            out.append(f"{m} x {t} (prices sd {g['p'].std():.3g} vs market {g['mkt'].std():.3g}, {len(g)} contracts)")
    return out


def notes(test: pd.DataFrame, train: pd.DataFrame, models: list[str]) -> list[str]:
    """What a reader must know: contracts lacking a previous-day IV, contracts already seen in training."""
    out = []
    if "bs_prev_iv" in models and "prev_iv" in test:
        lack = int(test["prev_iv"].isna().sum())
        out.append(f"{lack:,} of {len(test):,} test contracts ({100 * lack / max(len(test), 1):.1f}%) have no "
                   "previous-day implied vol (not quoted on the chain's previous quote date, or no implied vol "
                   "there): BS previous-day IV is scored on the others, and the LSTM beside it on the same ones.")
    elif "contract" in test:
        out.append("No test contract has a previous-day implied vol, so there is no BS previous-day IV baseline.")
    if "contract" in test and "contract" in train:
        seen = test["contract"].astype(str).isin(set(train["contract"].astype(str)))
        if seen.any():
            out.append(f"{int(seen.sum()):,} of {len(test):,} test contracts ({100 * seen.mean():.0f}%) were quoted in "
                       "the training period at earlier dates: the LSTM learned a price surface that includes them. "
                       "That is fine for a surface model, but these are not unseen instruments.")
    return out


def seed_spread(table: pd.DataFrame, models: list[str], prices: dict[int, np.ndarray]) -> pd.DataFrame:
    """Per training seed (``prices``: the LSTM's test prices by seed, NaN where unpriced): its price RMSE on the
    contracts it prices and, as in :func:`headline`, its difference to the best baseline on shared contracts."""
    market = table["market_price"].to_numpy(float)
    rows = []
    for seed, p in prices.items():
        ok = np.isfinite(p)
        versus = versus_baselines(table.assign(**{f"{LSTM}_price": p}), models)
        versus = versus[np.isfinite(versus["lstm_vs_baseline_pct"].astype(float))]
        best = versus.sort_values("lstm_vs_baseline_pct", ascending=False).iloc[0] if len(versus) else None
        rows.append({"seed": seed, "contracts": int(ok.sum()),
                     "lstm_rmse": float(np.sqrt(np.mean((p[ok] - market[ok]) ** 2))) if ok.any() else np.nan,
                     "best_baseline": None if best is None else best["baseline"],
                     "lstm_vs_best_pct": np.nan if best is None else float(best["lstm_vs_baseline_pct"])})
    return pd.DataFrame(rows, columns=["seed", "contracts", "lstm_rmse", "best_baseline", "lstm_vs_best_pct"])


def seed_line(seeds: pd.DataFrame) -> str:
    """One sentence: how far the headline holds across training seeds (``seeds``: :func:`seed_spread`)."""
    if len(seeds) < 2:
        return ("One training seed (options.seeds = 1): a second seed can score differently; set options.seeds, "
                "or run the options stability study (pipelines/stability_options.yaml) for the spread.")
    names = ", ".join(str(s) for s in seeds["seed"])
    rmse, rel = seeds["lstm_rmse"].dropna(), seeds["lstm_vs_best_pct"].dropna()
    if rmse.empty:
        return f"Across {len(seeds)} training seeds ({names}) the LSTM priced no test contract."
    text = (f"Across {len(seeds)} training seeds ({names}): LSTM price RMSE median {rmse.median():.4g} "
            f"({rmse.min():.4g} to {rmse.max():.4g})")
    if rel.empty:
        return text + "."
    return (text + f"; against the best baseline median {rel.median():+.1f}% ({rel.min():+.1f}% to "
            f"{rel.max():+.1f}%), better in {int((rel < 0).sum())} of {len(seeds)} seeds"
            + (f", {len(seeds) - len(rmse)} priced nothing" if len(rmse) < len(seeds) else "") + ".")


def page(out: Path, name: str, stats: pd.DataFrame, buckets: pd.DataFrame, versus: pd.DataFrame,
         verdict: list[str], figures: list[str], seeds: pd.DataFrame | None = None) -> Path:
    """index.html in ``out`` (the figures inlined): verdict, then the statistics, buckets and figures."""
    e = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>Options report: {e(name)}</title>"
             f"<style>{CSS}</style></head><body><h1>Options report: {e(name)}</h1>",
             "<h2 id='verdict'>Verdict</h2>", *(f"<p class='verdict'>{e(v)}</p>" for v in verdict)]
    parts.append("<h2>Test prices, every model</h2><p class='note'>Price errors in the underlying's currency against "
                 "the market price; IV errors in vol points where both have an implied vol; no-arbitrage violations: "
                 "share of prices below the lower or above the upper bound, or non-monotone in strike. Priced: share "
                 "of the test contracts the model has a price for.</p>")
    cols = [("Priced [%]", "{:.1f}%"), ("Price RMSE", "{:.4g}"), ("Price MAE", "{:.4g}"),
            ("IV RMSE [vol pts]", "{:.2f}"), ("Any violation [%]", "{:.2f}%")]
    parts.append("<table><tr><th class='l'>model</th>" + "".join(f"<th>{c}</th>" for c, _ in cols) + "</tr>"
                 + "".join(f"<tr><td class='l'>{e(label(m))}</td>"
                           + "".join(f"<td>{num(r.get(c, np.nan), f)}</td>" for c, f in cols) + "</tr>"
                           for m, r in stats.iterrows()) + "</table>")
    if len(versus):
        parts.append("<h3>The LSTM against each baseline, on the contracts both price</h3><table><tr><th class='l'>"
                     "baseline</th><th>contracts</th><th>LSTM RMSE</th><th>baseline RMSE</th><th>LSTM vs baseline"
                     "</th></tr>" + "".join(
                         f"<tr><td class='l'>{e(label(r.baseline))}</td><td>{r.contracts:,}</td>"
                         f"<td>{num(r.lstm_rmse)}</td><td>{num(r.baseline_rmse)}</td>"
                         f"<td class='{'helped' if r.lstm_vs_baseline_pct < 0 else 'hurt'}'>"
                         f"{num(r.lstm_vs_baseline_pct, '{:+.1f}%')}</td></tr>" for r in versus.itertuples())
                     + "</table>")
    if seeds is not None and len(seeds) > 1:
        parts.append("<h3>Across training seeds</h3><p class='note'>The same setup trained once per seed (weights "
                     "and data order); the run's own model is the first. Best baseline: the one the seed's LSTM "
                     "compares worst with on shared contracts.</p><table><tr><th>seed</th><th>contracts priced</th>"
                     "<th>LSTM RMSE</th><th class='l'>best baseline</th><th>LSTM vs it</th></tr>" + "".join(
                         f"<tr><td>{r.seed}</td><td>{r.contracts:,}</td><td>{num(r.lstm_rmse)}</td>"
                         f"<td class='l'>{e(label(r.best_baseline)) if isinstance(r.best_baseline, str) else '-'}</td>"
                         f"<td>{num(r.lstm_vs_best_pct, '{:+.1f}%')}</td></tr>" for r in seeds.itertuples())
                     + "</table>")
    if len(buckets):
        wide = buckets.pivot_table(index=["moneyness", "maturity"], columns="model", values="price_rmse",
                                   sort=False)
        counts = buckets.groupby(["moneyness", "maturity"], sort=False)["contracts"].max()
        parts.append("<h2>Price RMSE by bucket</h2><p class='note'>Moneyness K/S x days to expiry.</p><table><tr>"
                     "<th class='l'>moneyness</th><th class='l'>maturity</th><th>contracts</th>"
                     + "".join(f"<th>{e(label(m))}</th>" for m in wide.columns) + "</tr>" + "".join(
                         f"<tr><td class='l'>{e(str(k[0]))}</td><td class='l'>{e(str(k[1]))}</td>"
                         f"<td>{int(counts.get(k, 0))}</td>"
                         + "".join(f"<td>{num(v)}</td>" for v in row) + "</tr>" for k, row in wide.iterrows())
                     + "</table>")
    parts.append("<h2>Figures</h2>")
    parts += [img(out, f, f) for f in figures if (out / f).is_file()]
    parts.append("<p class='note'>Files beside this page: stats.csv, buckets.csv, predictions.csv (every test "
                 "contract with each model's price and implied vol; lstm_seed&lt;n&gt;_price for the other seeds), seeds.csv, "
                 "config.yaml.</p></body></html>")
    return atomic_write(out / "index.html", "\n".join(parts))
