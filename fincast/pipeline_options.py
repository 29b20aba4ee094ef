"""The options-pricing pipeline (layer L4): chains + underlying + rate -> samples -> clipped LSTM training ->
test prices beside Black-Scholes baselines -> one MLflow run.

Same shape as the price pipeline (``fincast.pipeline``), whose run set-up, checkpoints, DDP and metric writer
it shares: params and tags first, per-step metrics while training, then the test evaluation of the LSTM and
every baseline on the same contracts, then artifacts (config, predictions, tables, the bucket heatmap and the
predicted-vs-market scatter, the model). ``fincast train`` and studies reach it through ``pipeline.train`` for
configs with ``task: options``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from fincast import config as config_mod
from fincast import pipeline, tracking
from fincast.clipping import bounds_global_l2
from fincast.clipping import label as clip_label
from fincast.config import FincastError, PipelineConfig, short_float
from fincast.data import fingerprint as frames_fingerprint
from fincast.data import heston, load_prices
from fincast.data import options as chains
from fincast.features import options as ofeat
from fincast.models import options as omodel
from fincast.models import pricing
from fincast.reports import plots
from fincast.training import dist_info, fit, predict, resolve_device, resolve_precision, seed_everything

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


def load_market(cfg: PipelineConfig, *, progress: bool = False, refresh: bool = False) -> Market:
    """Load the chain, the underlying and the rate for the options task (``cfg.task == 'options'``)."""
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


def collect(cfg: PipelineConfig, *, progress: bool = False, refresh: bool = True) -> list[str]:
    """``fincast data`` on an options pipeline: refresh the underlying (and rate, vol index) caches and, for the
    store source, append today's chains from yfinance to options.store_dir. Returns lines to print."""
    o = cfg.options
    if o.source == "synthetic":
        m = load_market(cfg)
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


def prepare(cfg: PipelineConfig, market: Market) -> tuple[ofeat.OptionSet, pd.DataFrame, dict[str, int]]:
    """Samples for the network and the contracts for evaluation; also the rows dropped when aligning."""
    o = cfg.options
    if o.source == "synthetic":  # the synthetic market's own rate, no dividends
        o = dataclasses.replace(o, rate=o.heston.rate, dividend_yield=0.0)
    contracts, windows, dropped = ofeat.prepare(market.chain, market.close, o, cfg.features.lookback,
                                                rates=market.rates, vol_index=market.vol_index)
    contracts["iv"] = omodel.implied_vols(contracts["price"].to_numpy(float), contracts)
    os_ = ofeat.build(contracts, windows, o, cfg.features, market.underlying)
    return os_, contracts, dropped


def baseline_prices(c: pd.DataFrame, hist_vols: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Black-Scholes with each realised vol, with the volatility index when there is one, and the true model
    price on synthetic data."""
    args = (c["S"].to_numpy(float), c["strike"].to_numpy(float), c["tau"].to_numpy(float), c["r"].to_numpy(float))
    call, q = c["call"].to_numpy(bool), c["q"].to_numpy(float)
    out = {f"bs_hv{w}": pricing.bs_price(*args, c[f"hv{w}"].to_numpy(float), call, q) for w in hist_vols}
    if "vol_index" in c and c["vol_index"].notna().all():
        out["bs_vol_index"] = pricing.bs_price(*args, c["vol_index"].to_numpy(float), call, q)
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


def train_options(cfg: PipelineConfig, writer: tracking.MetricWriter | None, *, progress: bool, resume: dict | None,
                  resume_overrides: list[str], extra_tags: dict[str, str], on_epoch=None):
    """One options-pricing run end to end (``pipeline._train`` for task = options)."""
    rank, world = dist_info()
    market = load_market(cfg, progress=progress and rank == 0)
    if resume is not None and market.fingerprint != resume["data_fingerprint"]:
        raise FincastError(f"the data changed since the checkpoint (fingerprint {market.fingerprint}, checkpoint "
                           f"{resume['data_fingerprint']}); a resumed run needs exactly the data it started with")
    os_, _, align_dropped = prepare(cfg, market)
    device = resolve_device(cfg.train.device)
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.set_num_threads(pipeline._threads(cfg, writer, device))
    precision = resolve_precision(cfg.train.precision, device)
    seed_everything(cfg.train.seed)
    model = omodel.build_option_model(cfg.model, os_.n_contract, os_.lookback, os_.channels).to(device)
    if rank != 0:
        fit(model, os_.train, os_.val, cfg.train, cfg.clip, device=device, precision=precision,
            log_every=cfg.tracking.log_every, monitor=cfg.monitor, resume=resume, on_epoch=on_epoch,
            cuda_graphs=cfg.train.cuda_graphs)
        return None
    run, name = _open_run(cfg, market, os_, align_dropped, model, device, precision, writer=writer,
                          extra_tags=extra_tags, resume=resume, resume_overrides=resume_overrides)
    with pipeline.ended(run):  # FINISHED, or FAILED / KILLED with the exception re-raised
        checkpoint, path = pipeline.checkpointer(cfg, run.run_id, market.fingerprint)
        result = fit(model, os_.train, os_.val, cfg.train, cfg.clip, device=device, precision=precision,
                     log_every=cfg.tracking.log_every, sink=run.log_metrics, progress=progress,
                     monitor=cfg.monitor, checkpoint=checkpoint, resume=resume, on_epoch=on_epoch,
                     cuda_graphs=cfg.train.cuda_graphs)
        return _close_run(run, name, cfg, market, os_, align_dropped, model, device, precision, result, path)


def train_options_batch(cfgs: list[PipelineConfig], *, tags: list[dict[str, str]] | None = None,
                        parent_run_id: str | None = None, progress: bool = False) -> list[pipeline.TrainOutcome]:
    """Options runs of one ``pipeline.batch_key`` trained as one stack (``pipeline.train_stacked``): the market
    and its samples are prepared once."""
    cfg0 = cfgs[0]
    market = load_market(cfg0, progress=progress)
    os_, _, align_dropped = prepare(cfg0, market)
    device = resolve_device(cfg0.train.device)
    torch.set_num_threads(pipeline._threads(cfg0, None, device))
    precision = resolve_precision(cfg0.train.precision, device)
    models = []
    for cfg in cfgs:
        seed_everything(cfg.train.seed)
        models.append(omodel.build_option_model(cfg.model, os_.n_contract, os_.lookback, os_.channels).to(device))

    def open_one(cfg, model, extra):
        return _open_run(cfg, market, os_, align_dropped, model, device, precision, writer=None, extra_tags=extra)

    def close_one(run, name, cfg, model, result, path):
        return _close_run(run, name, cfg, market, os_, align_dropped, model, device, precision, result, path)

    return pipeline.train_stacked(cfgs, models, (os_.train, os_.val), market.fingerprint, device, precision, open_one,
                                  close_one, tags=tags, parent_run_id=parent_run_id, progress=progress)


def _dropped(market, align_dropped: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in {**market.dropped, **align_dropped}.items() if v}


def _open_run(cfg: PipelineConfig, market, os_: ofeat.OptionSet, align_dropped: dict[str, int], model, device,
              precision: str, *, writer, extra_tags: dict[str, str], resume: dict | None = None,
              resume_overrides: list[str] | None = None):
    """Start an options run: tags, then params (what a crashed run still says it was)."""
    name = run_name(cfg, market.underlying)
    tags = pipeline.run_tags(cfg, device, precision, source=market.source, fingerprint=market.fingerprint,
                             tickers=market.underlying, extra={"fincast.kind": "options", **extra_tags})
    run = pipeline.open_run(cfg, name, tags, writer=writer, resume=resume, resume_overrides=resume_overrides or [])
    if resume is None:
        with pipeline.ended_on_error(run):
            dropped = _dropped(market, align_dropped)
            qd = market.chain["quote_date"]
            run.log_params(config_mod.flatten(config_mod.to_dict(cfg)))
            run.log_params({
                "data.underlying": market.underlying, "data.chain_rows_read": market.rows_read,
                "data.first_quote_date": f"{qd.min():%Y-%m-%d}", "data.last_quote_date": f"{qd.max():%Y-%m-%d}",
                "data.dropped": "; ".join(f"{k}: {v}" for k, v in dropped.items()) or "none",
                "features.names": os_.names, "split.val_start": os_.val_start.isoformat(),
                "split.test_start": os_.test_start.isoformat(), "samples.train": len(os_.train),
                "samples.val": len(os_.val), "samples.test": len(os_.test),
                "samples.test_dates": int(os_.frames["test"]["quote_date"].nunique()),
                "model.parameters": sum(p.numel() for p in model.parameters()),
            })
    return run, name


def _close_run(run, name: str, cfg: PipelineConfig, market, os_: ofeat.OptionSet, align_dropped: dict[str, int],
               model, device, precision: str, result, path: Path | None) -> pipeline.TrainOutcome:
    """After training: test prices of the LSTM and the baselines, the closing metrics, tables, figures, model."""
    dropped = _dropped(market, align_dropped)
    ev, table = evaluate_test(model, os_, cfg, device, usable=result.best_epoch > 0)
    test_metrics = []
    for model_name, row in ev.stats.iterrows():
        prefix = "test" if model_name == LSTM else f"baseline_{model_name}"
        test_metrics += [(f"{prefix}/{pipeline._metric_name(k)}", float(v)) for k, v in row.items()
                         if k != "Contracts" and math.isfinite(float(v))]
    zero_val = pipeline.log_fit_outcome(run, result, os_.val.y, test_metrics)
    out_dir = Path("reports") / "options" / cfg.name
    for f in write_outputs(out_dir, cfg, os_, ev, table, result, name, dropped, market.warnings):
        run.log_artifact(f)
    if cfg.tracking.log_model and result.best_epoch > 0:  # weights from an epoch that validated finitely
        pipeline.log_model(run, model, os_.test.x[:2], device)
    metrics = {m: {k: float(v) for k, v in row.items()} for m, row in ev.stats.iterrows()}
    return pipeline.TrainOutcome(run.run_id, name, cfg.tracking.experiment or cfg.name, run.uri, str(device),
                                 precision, result, metrics,
                                 {"train": len(os_.train), "val": len(os_.val), "test": len(os_.test)},
                                 market.warnings, str(path) if path is not None and path.is_file() else None,
                                 task="options", report=str(out_dir), dropped=dropped, zero_val_loss=zero_val)


def evaluate_test(model, os_: ofeat.OptionSet, cfg: PipelineConfig, device, *, usable: bool):
    """The LSTM's and every baseline's prices on the test contracts, scored; and the per-contract table."""
    c = os_.frames["test"]
    preds: dict[str, np.ndarray] = {}
    if usable:  # weights from an epoch that validated finitely
        raw = predict(model, os_.test.x, device) * os_.target_scale
        preds[LSTM] = to_prices(raw, c, os_.target)
    else:
        preds[LSTM] = np.full(len(c), np.nan)
    preds.update(baseline_prices(c, cfg.options.hist_vols))
    ev = omodel.evaluate(c, preds, moneyness_edges=cfg.options.moneyness_buckets,
                         maturity_edges=cfg.options.maturity_buckets)
    keep = [k for k in ("quote_date", "expiry", "contract", "call", "strike", "S", "tau", "r", "q", "price", "iv",
                        "bid", "ask", "volume") if k in c]
    table = c[keep].rename(columns={"price": "market_price", "iv": "market_iv"}).copy()
    for name, p in preds.items():
        table[f"{name}_price"] = p
        table[f"{name}_iv"] = ev.ivs[name].to_numpy()
    return ev, table


def write_outputs(out_dir: Path, cfg: PipelineConfig, os_: ofeat.OptionSet, ev: omodel.OptionEvaluation,
                  table: pd.DataFrame, result, name: str, dropped: dict[str, int], warnings: list[str]) -> list[Path]:
    """Tables and figures into ``out_dir`` (atomic writes); returns the files to log to the run."""
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
    steps_per_epoch = math.ceil(len(os_.train) / cfg.train.batch_size)
    val_steps = [min((i + 1) * steps_per_epoch, result.steps) for i in range(len(result.val_history))]
    l2_global = bounds_global_l2(cfg.clip)  # such thresholds can be drawn against the norm
    files.append(plots.training_curves(out_dir / "training_curves.png", loss=result.history["loss"],
                                       norm_pre=result.history["norm_pre"], norm_post=result.history["norm_post"],
                                       val_loss=result.val_history, val_steps=val_steps,
                                       threshold=result.history.get("threshold") if l2_global else None, title=name,
                                       diverged_step=result.diverged_step))
    m_order = omodel.bucket_order(cfg.options.moneyness_buckets, omodel.MONEYNESS_FMT)
    t_order = omodel.bucket_order(tuple(int(e) for e in cfg.options.maturity_buckets), omodel.MATURITY_FMT)
    files.append(plots.option_bucket_heatmap(out_dir / "bucket_errors.png", ev.buckets, list(ev.stats.index),
                                             m_order, t_order, title=f"{name}: test price RMSE by bucket"))
    files.append(plots.option_scatter(out_dir / "predicted_vs_market.png", table, list(ev.stats.index),
                                      title=f"{name}: test contracts"))
    return files
