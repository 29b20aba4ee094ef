"""The options-pricing task (layer L4, runs): chains + underlying + rate -> samples -> an LSTM + MLP pricing
each contract -> test prices beside Black-Scholes baselines on the same contracts; tables, the bucket heatmap
and the predicted-vs-market scatter in ``reports/options/<name>/``. See ``fincast.runs.task`` for the protocol;
the run driver does the rest (``task: options`` in a config picks this module).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from fincast import config as config_mod
from fincast.clipping import bounds_global_l2
from fincast.clipping import label as clip_label
from fincast.config import FincastError, PipelineConfig, short_float
from fincast.data import fingerprint as frames_fingerprint
from fincast.data import heston, load_prices, plausible
from fincast.data import options as chains
from fincast.features import options as option_features
from fincast.models import options as option_model
from fincast.models import pricing
from fincast.reports import figures
from fincast.reports import options as options_report
from fincast.runs.record import TrainOutcome, metric_name, summary_head, summary_tail
from fincast.runs.task import Description, Finished
from fincast.training import FitResult, dist_info, predict, seed_everything, train_runs

LSTM = "lstm"


@dataclass
class Market:
    """Everything the options task reads: the canonical chain, the underlying's closes, the rate and the
    volatility index (decimal per annum, by date; None when not configured), with one fingerprint."""
    chain: pd.DataFrame
    close: pd.Series
    rates: pd.Series | None
    vol_index: pd.Series | None
    source: str
    fingerprint: str
    underlying: str
    dropped: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    rows_read: int = 0


def _series_fingerprint(*parts: pd.Series | pd.DataFrame | None) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(b"none" if p is None else pd.util.hash_pandas_object(p, index=True).to_numpy().tobytes())
    return h.hexdigest()[:16]


def _aux_series(cfg: PipelineConfig, ticker: str, what: str, progress: bool) -> pd.Series:
    """A rate or volatility-index series (percent) through the price data layer, same source as the underlying;
    csv files from options.aux_path (else data.path). The history starts a year before data.start (the rate and
    index as of each quote date are forward-filled from the last value before it)."""
    d = cfg.data
    start = None if d.start is None else d.start - pd.Timedelta(days=366).to_pytimedelta()
    dc = dataclasses.replace(d, tickers=(ticker,), path=cfg.options.aux_path or d.path, start=start)
    try:
        prices = load_prices(dc, progress=progress, positive=what != "rate_ticker")
    except FincastError as exc:
        raise FincastError(f"options.{what} = {ticker}: {exc}") from None
    return prices.frames[ticker]["close"]


@functools.lru_cache(maxsize=2)
def _heston_market(h: config_mod.HestonConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The synthetic market of a Heston config, generated once per process (a study's runs share it)."""
    return heston.generate_market(h)


def load(cfg: PipelineConfig, *, progress: bool = False, refresh: bool = False) -> Market:
    """Load the chain, the underlying, the rate and the volatility index."""
    o = cfg.options
    if o.source == "synthetic":
        under, chain = _heston_market(o.heston)
        rates = pd.Series(o.heston.rate, index=under.index)
        return Market(chain, under["close"], rates, None, "synthetic heston", _series_fingerprint(under, chain),
                      "HESTON", rows_read=len(chain))
    ticker = cfg.data.tickers[0]
    prices = load_prices(cfg.data, min_rows=2, refresh=refresh, progress=progress)
    chain = chains.load_chain(o, ticker)
    rates = _aux_series(cfg, o.rate_ticker, "rate_ticker", progress) / 100 if o.rate_ticker else None
    vix = _aux_series(cfg, o.vol_index, "vol_index", progress) if o.vol_index else None  # percent
    fp = _series_fingerprint(pd.Series([frames_fingerprint(prices.frames), chain.fingerprint]), rates, vix)
    return Market(chain.frame, prices.frames[ticker][cfg.data.price], rates, vix, f"{prices.source} + {chain.source}",
                  fp, ticker, dict(chain.dropped), [*prices.warnings, *chain.warnings], chain.rows_read)


def fetch(cfg: PipelineConfig, *, progress: bool = False, refresh: bool = True) -> list[str]:
    """``fincast data`` on an options pipeline: refresh the underlying (and rate, vol index) caches and, for the
    store source, append today's chains from yfinance to options.store_dir. Returns lines to print."""
    o = cfg.options
    if o.source == "synthetic":
        m = load(cfg)
        return [f"synthetic Heston market: {len(m.close)} days, {len(m.chain)} contracts over "
                f"{m.chain['quote_date'].nunique()} quote dates, fingerprint {m.fingerprint} (nothing to fetch)"]
    ticker = cfg.data.tickers[0]
    lines = []
    prices = load_prices(cfg.data, min_rows=2, refresh=refresh, progress=progress)
    f = prices.frames[ticker]
    lines.append(f"underlying {ticker}: {len(f)} bars {f.index[0]:%Y-%m-%d} .. {f.index[-1]:%Y-%m-%d} "
                 f"(source {prices.source})")
    for key, t in (("rate_ticker", o.rate_ticker), ("vol_index", o.vol_index)):
        if t:
            s = _aux_series(cfg, t, key, progress)
            lines.append(f"{key} {t}: {len(s)} values {s.index[0]:%Y-%m-%d} .. {s.index[-1]:%Y-%m-%d}")
    if o.source == "store":
        paths, rows = chains.snapshot(o, ticker, timeout_s=cfg.data.timeout_s)
        lines.append(f"appended {rows} contracts of today's {ticker} chains to {', '.join(map(str, paths))}")
    chain = chains.load_chain(o, ticker)
    qd = chain.frame["quote_date"]
    lines.append(f"chains ({chain.source}): {len(chain.frame)} usable contracts of {chain.rows_read} rows, "
                 f"{qd.nunique()} quote dates {qd.min():%Y-%m-%d} .. {qd.max():%Y-%m-%d}, fingerprint "
                 f"{chain.fingerprint}")
    if any(chain.dropped.values()):
        lines.append("  dropped: " + "; ".join(f"{k} {v}" for k, v in chain.dropped.items() if v))
    return lines


def align(cfg: PipelineConfig, market: Market) -> tuple[option_features.OptionSet, pd.DataFrame, dict[str, int]]:
    """Samples for the network and the contracts for evaluation; also the rows dropped when aligning."""
    o = cfg.options
    if o.source == "synthetic":  # the synthetic market's own rate, no dividends
        o = dataclasses.replace(o, rate=o.heston.rate, dividend_yield=0.0)
    contracts, windows, dropped = option_features.prepare(market.chain, market.close, o, cfg.features.lookback,
                                                rates=market.rates, vol_index=market.vol_index)
    contracts["iv"] = option_model.implied_vols(contracts["price"].to_numpy(float), contracts)
    _check_quotes(cfg, market, contracts)
    if "contract" in contracts:
        contracts["prev_iv"] = option_features.previous_day_iv(contracts)
    samples = option_features.build(contracts, windows, o, cfg.features, market.underlying)
    return samples, contracts, dropped


def _check_quotes(cfg: PipelineConfig, market: Market, contracts: pd.DataFrame) -> None:
    """Market quotes outside the no-arbitrage bounds (a call above the discounted underlying, a put above the
    discounted strike, either below its discounted intrinsic value, by more than 1% of the bound and a cent): a
    data warning, or with data.strict an error."""
    c = contracts
    lower, upper = pricing.bounds(c["S"].to_numpy(float), c["strike"].to_numpy(float), c["tau"].to_numpy(float),
                                  c["r"].to_numpy(float), c["call"].to_numpy(bool), c["q"].to_numpy(float))
    p = c["price"].to_numpy(float)
    above, below = p > upper * 1.01 + 0.01, p < lower * 0.99 - 0.01
    if not (above.any() or below.any()):
        return
    first = c.loc[above | below].iloc[0]
    line = (f"{market.underlying} option chain: {int(above.sum()):,} quote(s) above the no-arbitrage upper bound "
            f"(a call above the underlying, a put above the strike, discounted) and {int(below.sum()):,} below the "
            f"lower bound (discounted intrinsic value), of {len(c):,}; the first: {first['quote_date']:%Y-%m-%d} "
            f"{'call' if first['call'] else 'put'} K={first['strike']:g} at {first['price']:g} with S={first['S']:g}"
            + (" (options.dividend_yield = 0: for an underlying that pays dividends the true bounds are lower for "
               "puts and higher for calls; set its yield)" if below.any() and cfg.options.dividend_yield == 0 else ""))
    plausible.refuse_if_strict([line], cfg.data.strict)
    market.warnings.append(line)


def baseline_prices(c: pd.DataFrame, hist_vols: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Black-Scholes with each realised vol, with the volatility index when there is one, and the true model
    price on synthetic data."""
    args = (c["S"].to_numpy(float), c["strike"].to_numpy(float), c["tau"].to_numpy(float), c["r"].to_numpy(float))
    call, q = c["call"].to_numpy(bool), c["q"].to_numpy(float)
    out = {f"bs_hv{w}": pricing.bs_price(*args, c[f"hv{w}"].to_numpy(float), call, q) for w in hist_vols}
    if "vol_index" in c and c["vol_index"].notna().all():
        out["bs_vol_index"] = pricing.bs_price(*args, c["vol_index"].to_numpy(float), call, q)
    if "prev_iv" in c and c["prev_iv"].notna().any():  # NaN where the contract has no previous-day IV
        prev = c["prev_iv"].to_numpy(float)
        out["bs_prev_iv"] = np.where(np.isfinite(prev), pricing.bs_price(*args, np.nan_to_num(prev, nan=0.2), call, q),
                                     np.nan)
    if "true_price" in c and c["true_price"].notna().all():
        out["true_model"] = c["true_price"].to_numpy(float)
    return out


def to_prices(pred_raw: np.ndarray, c: pd.DataFrame, target: str) -> np.ndarray:
    """Network outputs in target units (price / strike, or implied vol) -> prices."""
    if target == "price":
        return pred_raw * c["strike"].to_numpy(float)
    return pricing.bs_price(c["S"].to_numpy(float), c["strike"].to_numpy(float), c["tau"].to_numpy(float),
                            c["r"].to_numpy(float), pred_raw, c["call"].to_numpy(bool), c["q"].to_numpy(float))


def run_name(cfg: PipelineConfig, underlying: str) -> str:
    if cfg.tracking.run_name:
        return cfg.tracking.run_name
    return f"options-{underlying}-{clip_label(cfg.clip)}-lr{short_float(cfg.train.lr)}-s{cfg.train.seed}"


@dataclass
class Samples:
    """The options task's splits: the network's samples and the rows dropped (market loading and alignment)."""
    set: option_features.OptionSet
    dropped: dict[str, int]

    @property
    def train(self):
        return self.set.train

    @property
    def val(self):
        return self.set.val

    @property
    def test(self):
        return self.set.test


def prepare(cfg: PipelineConfig, data: Market) -> Samples:
    samples, _, align_dropped = align(cfg, data)
    return Samples(samples, {k: v for k, v in {**data.dropped, **align_dropped}.items() if v})


def build_model(cfg: PipelineConfig, splits: Samples) -> torch.nn.Module:
    s = splits.set
    return option_model.build_option_model(cfg.model, s.n_contract, s.lookback, s.channels)


def describe(cfg: PipelineConfig, data: Market, splits: Samples) -> Description:
    s, qd = splits.set, data.chain["quote_date"]
    params = {
        "data.underlying": data.underlying, "data.chain_rows_read": data.rows_read,
        "data.first_quote_date": f"{qd.min():%Y-%m-%d}", "data.last_quote_date": f"{qd.max():%Y-%m-%d}",
        "data.dropped": "; ".join(f"{k}: {v}" for k, v in splits.dropped.items()) or "none",
        "features.names": s.names, "split.val_start": s.val_start.isoformat(),
        "split.test_start": s.test_start.isoformat(), "samples.train": len(s.train),
        "samples.val": len(s.val), "samples.test": len(s.test),
        "samples.test_dates": int(s.frames["test"]["quote_date"].nunique()),
    }
    return Description(run_name(cfg, data.underlying), data.underlying, {"fincast.kind": "options"}, params)


def finish(cfg: PipelineConfig, data: Market, splits: Samples, model: torch.nn.Module, device: torch.device,
           result: FitResult, name: str, artifact_dir: Path, *, draw_figures: bool = True,
           shared: dict | None = None, precision: str = "fp32", progress: bool = False) -> Finished:
    """Test prices of the LSTM and the baselines; tables and figures into reports/options/<name>/ (the run's
    artifacts too). A study's run (no figures) writes its tables into ``artifact_dir`` only: its workers would
    otherwise write one folder at once, and each run could log another's files. A single run also trains the
    other options.seeds (:func:`other_seeds`) for the seed spread."""
    ev, table = evaluate_test(model, splits.set, cfg, device, usable=result.best_epoch > 0, shared=shared)
    test_metrics = _stat_metrics(ev.stats)
    models = list(ev.stats.index)
    seeds = None
    if draw_figures:
        prices = {cfg.train.seed: table[f"{LSTM}_price"].to_numpy(float),
                  **other_seeds(cfg, splits, device, precision, progress)}
        for s, p in list(prices.items())[1:]:
            table[f"{LSTM}_seed{s}_price"] = p
        seeds = options_report.seed_spread(table, models, prices)
        test_metrics += _seed_metrics(seeds)
    out_dir = report_folder(cfg) if draw_figures else artifact_dir
    files = write_outputs(out_dir, cfg, splits.set, ev, table, result, name, splits.dropped, data.warnings,
                          draw_figures=draw_figures)
    metrics = {m: {k: float(v) for k, v in row.items()} for m, row in ev.stats.iterrows()}
    versus = options_report.versus_baselines(table, models)
    verdict = option_verdict(cfg, splits.set, ev, table, versus)
    if draw_figures:
        verdict.insert(1, options_report.seed_line(seeds))
        files.append(config_mod.atomic_write(out_dir / "seeds.csv", seeds.to_csv(index=False)))
        files.append(options_report.page(out_dir, name, ev.stats, ev.buckets, versus, verdict,
                                         ["bucket_errors.png", "predicted_vs_market.png", "training_curves.png"],
                                         seeds=seeds))
    return Finished(test_metrics, metrics, files, {"report": str(out_dir), "dropped": splits.dropped,
                                                   "verdict": verdict})


def _seed_metrics(seeds: pd.DataFrame) -> list[tuple[str, float]]:
    """``test/seeds/<stat>_{median,min,max}`` across the seeds (none for one seed)."""
    out = []
    for col, key in (("lstm_rmse", "price_rmse"), ("lstm_vs_best_pct", "vs_best_baseline_pct")):
        values = seeds[col].dropna().to_numpy(float)
        if len(seeds) > 1 and len(values):
            out += [(f"test/seeds/{key}_{name}", float(f(values)))
                    for name, f in (("median", np.median), ("min", np.min), ("max", np.max))]
    return out


def other_seeds(cfg: PipelineConfig, splits: Samples, device: torch.device, precision: str,
                progress: bool) -> dict[int, np.ndarray]:
    """The LSTM trained again for seeds train.seed + 1 .. + options.seeds - 1, all in one stack (same samples,
    clip, schedule and early stopping; each its own initial weights and data order): test prices by seed, NaN
    where no epoch validated finitely. None under torchrun (the other ranks are not training them)."""
    if cfg.options.seeds < 2 or dist_info()[1] > 1:
        return {}
    seeds = [cfg.train.seed + i for i in range(1, cfg.options.seeds)]
    models = []
    for s in seeds:
        seed_everything(s)
        models.append(build_model(cfg, splits).to(device))
    results = train_runs(models, splits.train, splits.val, [dataclasses.replace(cfg.train, seed=s) for s in seeds],
                         [cfg.clip] * len(seeds), device=device, precision=precision,
                         log_every=cfg.tracking.log_every, monitor=dataclasses.replace(cfg.monitor, every=None),
                         cuda_graphs=cfg.train.cuda_graphs, progress=progress)
    c, s = splits.set.frames["test"], splits.set
    return {seed: to_prices(predict(m, s.test.x, device) * s.target_scale, c, s.target) if r.best_epoch > 0
            else np.full(len(c), np.nan) for seed, m, r in zip(seeds, models, results, strict=True)}


def option_verdict(cfg: PipelineConfig, samples: option_features.OptionSet, ev: option_model.OptionEvaluation,
                   table: pd.DataFrame, versus: pd.DataFrame) -> list[str]:
    """The headline against the best baseline (``versus``: options_report.versus_baselines), buckets where the
    LSTM's prices collapsed, and the notes."""
    test = samples.frames["test"]
    lines = [options_report.headline(versus)]
    mny, mat = option_model.bucket_labels(test, cfg.options.moneyness_buckets, cfg.options.maturity_buckets)
    flat = options_report.collapsed_buckets(table, mny, mat)
    if flat:
        lines.append("Collapsed predictions: the LSTM's prices barely vary in " + "; ".join(flat) + ".")
    return lines + options_report.notes(test, samples.frames["train"], list(ev.stats.index))


def _stat_metrics(stats: pd.DataFrame) -> list[tuple[str, float]]:
    """The evaluation table as metrics: ``test/...`` for the LSTM, ``baseline_<name>/...`` for the others."""
    out = []
    for model_name, row in stats.iterrows():
        prefix = "test" if model_name == LSTM else f"baseline_{model_name}"
        out += [(f"{prefix}/{metric_name(k)}", float(v)) for k, v in row.items()
                if k != "Contracts" and math.isfinite(float(v))]
    return out


def baselines(cfg: PipelineConfig, data: Market, splits: Samples) -> list[tuple[str, float]]:
    c = splits.set.frames["test"]
    ev = option_model.evaluate(c, baseline_prices(c, cfg.options.hist_vols),
                               moneyness_edges=cfg.options.moneyness_buckets,
                               maturity_edges=cfg.options.maturity_buckets)
    return _stat_metrics(ev.stats)


OPTION_NAMES = {"lstm": "LSTM", "bs_vol_index": "BS vol index", "true_model": "true model",
                "bs_prev_iv": "BS prev-day IV"}


def summary(out: TrainOutcome, seconds: float) -> str:
    """Test price and implied-vol errors of the LSTM beside every baseline, on the same contracts."""
    lines = summary_head(out, seconds, "contracts")
    if out.dropped:
        lines.append("  dropped: " + "; ".join(f"{k} {v}" for k, v in out.dropped.items()))
    lines += ["", f"  {'model':<14}{'price RMSE':>12}{'MAE':>10}{'IV RMSE':>10}{'no-arb viol.':>14}",
              f"  {'':<14}{'':>12}{'':>10}{'[vol pts]':>10}{'[%]':>14}"]
    for name, m in out.metrics.items():
        label = OPTION_NAMES.get(name, name.replace("bs_hv", "BS hist vol ").replace("bs_", "BS "))
        if not math.isfinite(m["Price RMSE"]):
            lines.append(f"  {label:<14}{'(no finite epoch)':>30}")
            continue
        lines.append(f"  {label:<14}{m['Price RMSE']:>12.4f}{m['Price MAE']:>10.4f}{m['IV RMSE [vol pts]']:>10.2f}"
                     f"{m['Any violation [%]']:>14.2f}")
    lines += [""] + [f"  {line}" for line in out.verdict]
    lines += ["", f"  tables and figures: {out.report}/ (index.html, stats.csv, buckets.csv, "
                  "predictions.csv, figures), also in the run's artifacts",
              "  look: make ui  (MLflow UI at http://127.0.0.1:5000; PORT=... to change)"]
    return "\n".join(lines + summary_tail(out))


def missing_local_data(cfg: PipelineConfig) -> list[str]:
    missing = []
    if cfg.data.source == "csv" and cfg.data.path and not Path(cfg.data.path).exists():
        missing.append(f"data.path {cfg.data.path}")
    o = cfg.options
    if o.source == "csv" and o.path and not Path(o.path).exists():
        missing.append(f"options.path {o.path}")
    if o.source != "synthetic" and cfg.data.source == "csv" and o.aux_path and not Path(o.aux_path).exists() \
            and (o.rate_ticker or o.vol_index):
        missing.append(f"options.aux_path {o.aux_path}")
    return missing


def report_folder(cfg: PipelineConfig) -> Path:
    """Where a single run writes its report: reports/options/<name> under the working directory."""
    return Path("reports") / "options" / cfg.name


def outputs(cfg: PipelineConfig) -> list[tuple[str, Path]]:
    return [("the options report folder", report_folder(cfg))]


def evaluate_test(model, samples: option_features.OptionSet, cfg: PipelineConfig, device, *, usable: bool,
                  shared: dict | None = None):
    """The LSTM's and every baseline's prices on the test contracts, scored; and the per-contract table. The
    baselines' prices are computed once per ``shared`` dict (a stack's runs share their contracts)."""
    c = samples.frames["test"]
    preds: dict[str, np.ndarray] = {}
    if usable:  # weights from an epoch that validated finitely
        raw = predict(model, samples.test.x, device) * samples.target_scale
        preds[LSTM] = to_prices(raw, c, samples.target)
    else:
        preds[LSTM] = np.full(len(c), np.nan)
    shared = {} if shared is None else shared
    if "option_baselines" not in shared:
        shared["option_baselines"] = baseline_prices(c, cfg.options.hist_vols)
    preds.update(shared["option_baselines"])
    ev = option_model.evaluate(c, preds, moneyness_edges=cfg.options.moneyness_buckets,
                         maturity_edges=cfg.options.maturity_buckets)
    keep = [k for k in ("quote_date", "expiry", "contract", "call", "strike", "S", "tau", "r", "q", "price", "iv",
                        "bid", "ask", "volume") if k in c]
    table = c[keep].rename(columns={"price": "market_price", "iv": "market_iv"}).copy()
    for name, p in preds.items():
        table[f"{name}_price"] = p
        table[f"{name}_iv"] = ev.ivs[name].to_numpy()
    return ev, table


def write_outputs(out_dir: Path, cfg: PipelineConfig, samples: option_features.OptionSet, ev: option_model.OptionEvaluation,
                  table: pd.DataFrame, result, name: str, dropped: dict[str, int], warnings: list[str], *,
                  draw_figures: bool = True) -> list[Path]:
    """Tables and (unless not ``draw_figures``) figures into ``out_dir`` (atomic writes); returns the files to log."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = []

    def write(fname: str, text: str) -> None:
        files.append(config_mod.atomic_write(out_dir / fname, text))

    write("config.yaml", config_mod.dump_yaml(cfg))
    write("stats.csv", ev.stats.to_csv())
    write("buckets.csv", ev.buckets.to_csv(index=False))
    out = table.copy()
    for col in ("quote_date", "expiry"):
        out[col] = pd.to_datetime(out[col]).dt.strftime("%Y-%m-%d")
    write("predictions.csv", out.to_csv(index=False))
    write("dropped.txt", "".join(f"{k}: {v}\n" for k, v in dropped.items()) or "nothing dropped\n")
    if warnings:
        write("data_warnings.txt", "\n".join(warnings) + "\n")
    if not draw_figures:
        return files
    steps_per_epoch = math.ceil(len(samples.train) / cfg.train.batch_size)
    val_steps = [min((i + 1) * steps_per_epoch, result.steps) for i in range(len(result.val_history))]
    l2_global = bounds_global_l2(cfg.clip)  # such thresholds can be drawn against the norm
    files.append(figures.training_curves(out_dir / "training_curves.png", loss=result.history["loss"],
                                       norm_pre=result.history["norm_pre"], norm_post=result.history["norm_post"],
                                       val_loss=result.val_history, val_steps=val_steps,
                                       threshold=result.history.get("threshold") if l2_global else None, title=name,
                                       diverged_step=result.diverged_step))
    m_order = option_model.bucket_order(cfg.options.moneyness_buckets, option_model.MONEYNESS_FMT)
    t_order = option_model.bucket_order(tuple(int(e) for e in cfg.options.maturity_buckets), option_model.MATURITY_FMT)
    files.append(figures.option_bucket_heatmap(out_dir / "bucket_errors.png", ev.buckets, list(ev.stats.index),
                                             m_order, t_order, title=f"{name}: test price RMSE by bucket"))
    files.append(figures.option_scatter(out_dir / "predicted_vs_market.png", table, list(ev.stats.index),
                                      title=f"{name}: test contracts"))
    return files
