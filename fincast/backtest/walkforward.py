"""Walk-forward forecasting: refit at each cutoff on what was known by then, forecast the next bars.

Features are computed once for the whole history (each feature row of bar t uses bars up to t only); what
depends on a fold's training data, the scalers, the target scales and the models, is refit per fold from
that fold's training part alone.

Fold k has a cutoff c_k, a date of the data's calendar (the union of the tickers' bars):

* training samples: targets that ended at or before c_k (and, with a rolling ``backtest.window`` of n bars,
  origins among the ticker's last n bars up to c_k). A ticker takes part in a fold once it has at least
  MIN_TRAIN training and MIN_EVAL validation samples. The LSTM early-stops on the last ``features.val_frac`` of them
  (by target date, purged for h > 1 like the pipeline's split); scalers are fit on the feature rows of the
  remaining training inputs; ridge (its penalty chosen on that inner validation) and the historical mean
  are fit on all of them.
* forecasts: every sample whose origin (the last input bar, known at its close) is in [c_k, c_{k+1}), so
  every forecast is made at or after the cutoff and its target starts after it, and no target period of a forecast overlaps the data the
  fold trained on.

The output is one long table, one row per (date, ticker, model) with the fold's ``cutoff`` (Darts /
statsforecast style), and one row per fold with what training did.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import pandas as pd
from numpy.lib.stride_tricks import sliding_window_view
from sklearn.linear_model import Ridge
from tqdm.auto import tqdm

from fincast import features
from fincast.backtest.evaluate import MEAN, NAIVE, RIDGE, periods_per_year
from fincast.backtest.naming import lstm_runs
from fincast.backtest.stacking import fold_stacks
from fincast.config import ClipConfig, FincastError, PipelineConfig
from fincast.features import MIN_EVAL, MIN_TRAIN, Split


class BacktestError(FincastError):
    pass


@dataclass
class TickerPanel:
    """One ticker's features, computed once: row i is the feature row of bar ``origin[i]``."""
    feats: np.ndarray  # (n, F) float64, unscaled
    windows: np.ndarray  # (n - L + 1, L, F) view: windows[i] = rows i .. i+L-1
    y: np.ndarray  # (n,) log return over the next h bars from origin[i] (NaN where unknown)
    origin: np.ndarray  # (n,) datetime64[ns]
    first: np.ndarray  # (n,) first bar of the target period (the bar after the origin)
    date: np.ndarray  # (n,) last bar of the target period
    valid: np.ndarray  # (n,) bool: a full input window and a known target


def panels(frames: dict[str, pd.DataFrame], cfg: PipelineConfig) -> dict[str, TickerPanel]:
    L = cfg.features.lookback
    out = {}
    for ticker, df in frames.items():
        feats, target = features.ticker_features(df, cfg.features, price=cfg.data.price)
        x = feats.to_numpy(float)
        if len(x) < L:
            raise BacktestError(f"{ticker}: {len(x)} complete feature rows, fewer than features.lookback = {L}")
        y = target["y"].to_numpy(float)
        pos = np.arange(len(x))
        first = pd.Series(df.index, index=df.index).shift(-1).loc[feats.index].to_numpy("datetime64[ns]")
        out[ticker] = TickerPanel(
            feats=x, windows=sliding_window_view(x, (L, x.shape[1]))[:, 0], y=y,
            origin=feats.index.to_numpy("datetime64[ns]"), first=first,
            date=pd.to_datetime(target["date"]).to_numpy("datetime64[ns]"), valid=(pos >= L - 1) & ~np.isnan(y))
    return out


def cutoffs(panel: dict[str, TickerPanel], cfg: PipelineConfig) -> tuple[np.ndarray, np.ndarray]:
    """(cutoff dates, the data calendar): every refit_every-th calendar date from backtest.start on, as long as
    a forecast from it has its target by backtest.end."""
    calendar = np.unique(np.concatenate([p.origin[p.valid] for p in panel.values()]))
    if len(calendar) == 0:
        raise BacktestError("no samples: every ticker's history is shorter than warm-up + lookback + horizon")
    b = cfg.backtest
    start = np.datetime64(b.start, "ns") if b.start else calendar[len(calendar) // 2]
    first = int(np.searchsorted(calendar, start))
    last = len(calendar)
    if b.end is not None:  # origins whose forecast targets end by backtest.end
        end = np.datetime64(b.end, "ns")
        ok = np.concatenate([p.origin[p.valid & (p.date <= end)] for p in panel.values()])
        last = int(np.searchsorted(calendar, ok.max(), side="right")) if len(ok) else 0
    cut = calendar[first:last:b.refit_every]
    if len(cut) == 0:
        span = f"{pd.Timestamp(calendar[0]):%Y-%m-%d} .. {pd.Timestamp(calendar[-1]):%Y-%m-%d}"
        raise BacktestError(f"backtest.start = {b.start} leaves nothing to forecast: sample origins span {span}"
                            + (f" and backtest.end = {b.end}" if b.end else ""))
    return cut, calendar


@dataclass
class FoldData:
    """One ticker's part of a fold: sample positions into its panel, and its scaler."""
    train: np.ndarray  # LSTM training samples (before the inner validation)
    val: np.ndarray  # inner validation (early stopping)
    test: np.ndarray  # forecasts of this fold
    mean: np.ndarray  # scaler (fit on the training inputs' feature rows)
    std: np.ndarray
    tscale: float  # target scale (std of the training targets, or 1)


def _fold_split(p: TickerPanel, cutoff: np.datetime64, next_cut: np.datetime64 | None, rolling: int | None,
                cfg: PipelineConfig, end: np.datetime64 | None) -> FoldData | None:
    """This ticker's part of the fold, or None when it has no forecasts in it or too little training data
    (fewer than MIN_TRAIN training or MIN_EVAL validation samples: a ticker that starts later joins the folds
    once it has enough)."""
    L = cfg.features.lookback
    known = p.valid & (p.date <= cutoff)
    if rolling is not None:  # the last `rolling` bars of this ticker's own calendar up to the cutoff
        i = int(np.searchsorted(p.origin, cutoff, side="right"))
        known &= p.origin >= p.origin[max(0, i - rolling)]
    pos = np.flatnonzero(known)
    test_mask = p.valid & (p.origin >= cutoff)
    if next_cut is not None:
        test_mask &= p.origin < next_cut
    if end is not None:
        test_mask &= p.date <= end
    test = np.flatnonzero(test_mask)
    if len(pos) == 0 or len(test) == 0:
        return None
    # inner validation: the last val_frac of the training target dates; purged like features.build
    dates = np.unique(p.date[pos])
    v = dates[min(len(dates) - 1, int(len(dates) * (1 - cfg.features.val_frac)))]
    train = pos[p.date[pos] < v]
    val = pos[p.first[pos] >= v]
    if len(train) < MIN_TRAIN or len(val) < MIN_EVAL:
        return None
    rows = slice(max(0, train[0] - L + 1), train[-1] + 1)  # the feature rows the training inputs cover
    mean = p.feats[rows].mean(axis=0)
    std = p.feats[rows].std(axis=0)
    std = np.where(std > 0, std, 1.0)  # StandardScaler's convention for constant columns
    tscale = float(np.std(p.y[train])) if cfg.features.scale_target else 1.0
    return FoldData(train, val, test, mean, std, tscale if tscale > 0 else 1.0)


def _split(panel: dict[str, TickerPanel], parts: dict[str, FoldData], which: str, L: int) -> Split:
    xs, ys, raw, scale, origin, date, ticker = [], [], [], [], [], [], []
    for t, d in parts.items():
        p = panel[t]
        idx = getattr(d, which)
        xs.append(((p.windows[idx - L + 1] - d.mean) / d.std).astype(np.float32))
        ys.append((p.y[idx] / d.tscale).astype(np.float32))
        raw.append(p.y[idx])
        scale.append(np.full(len(idx), d.tscale))
        origin.append(p.origin[idx])
        date.append(p.date[idx])
        ticker.append(np.full(len(idx), t, dtype=object))
    return Split(*(np.concatenate(a) for a in (xs, ys, raw, scale, origin, date, ticker)))


def _rms(values: np.ndarray) -> float:
    """Root mean square of the finite values (nan when there are none)."""
    v = values[np.isfinite(values)]
    return float(np.sqrt(np.mean(np.square(v)))) if len(v) else math.nan


RIDGE_ALPHAS = tuple(10.0**k for k in range(-1, 6))


def _flat(split: Split) -> np.ndarray:
    return split.x.reshape(len(split), -1)


def _ridge_alpha(train: Split, val: Split, cfg: PipelineConfig) -> float:
    """Ridge's penalty for this fold: the one of RIDGE_ALPHAS with the lowest error on the fold's inner
    validation split when fit on the rest (the split the LSTM early-stops on: nothing after the cutoff)."""
    x, xv = _flat(train), _flat(val)
    errors = [float(np.mean((Ridge(alpha=a).fit(x, train.y).predict(xv) - val.y) ** 2)) for a in RIDGE_ALPHAS]
    return RIDGE_ALPHAS[int(np.argmin(errors))]


def concat_splits(a: Split, b: Split) -> Split:
    return Split(*(np.concatenate([getattr(a, f), getattr(b, f)]) for f in Split.__dataclass_fields__))


@dataclass
class FoldFit:
    """What fitting one LSTM on one fold gives back (see ``LSTMFitter``)."""
    predict: Callable[[np.ndarray], np.ndarray]  # scaled input windows (N, L, F) -> forecasts in training units
    usable: bool  # an epoch validated finitely (else the fold's forecasts are missing)
    weights: dict | None = None  # the trained weights, for the next fold's warm start
    info: dict = field(default_factory=dict)  # steps, epochs, stop_reason, best_val_loss, diverged, clip_rate, ...


@dataclass
class FitRequest:
    """One LSTM to train on one fold (see ``LSTMFitter``)."""
    clip: ClipConfig
    train: Split
    val: Split  # the fold's inner validation (early stopping)
    warm: dict | None  # warm-start weights, or None: a fresh model
    epochs: int  # at most
    seed: int = 0  # the model's initialisation and the training's shuffling


# stacks of requests -> their fits, one list per stack in order and one FoldFit per request in it: each stack the
# LSTMs of one or more folds, which the pipeline trains together (``fincast.runs.backtest.stack_fitter``); it may
# ask for the next stacks before handing back the first (without warm starts). This layer trains no model itself.
LSTMFitter = Callable[[Iterator[list[FitRequest]]], Iterable[list[FoldFit]]]


@dataclass
class WalkForward:
    forecasts: pd.DataFrame  # date, ticker, cutoff, model, y_true, y_pred, origin, fold, pred_rms_train
    folds: pd.DataFrame  # one row per (fold, model): cutoff, samples, training outcome, seconds
    models: list[str]
    lstms: list[str]
    seconds: dict[str, float] = field(default_factory=dict)  # where the time went: features, lstm_fit, ...
    notes: list[str] = field(default_factory=list)  # what a reader should know (e.g. mixed calendars)
    resumed: int = 0  # folds taken from an earlier attempt (FoldStore)


FoldCallback = Callable[[int, pd.DataFrame], None]


class FoldStore(Protocol):
    """Finished folds kept across attempts (``fincast.runs.backtest.FoldFiles``): ``get(k)`` -> what ``put(k,
    done)`` stored for fold k (its forecast rows, folds-table rows and the warm-start weights after it), or None."""

    def get(self, k: int) -> dict | None: ...

    def put(self, k: int, done: dict) -> None: ...


def walk_forward(frames: dict[str, pd.DataFrame], cfg: PipelineConfig, *, fit_lstm: LSTMFitter,
                 progress: bool = False, on_fold: FoldCallback | None = None,
                 store: FoldStore | None = None, stack: int = 1, workers: int = 1) -> WalkForward:
    """Run the walk-forward backtest of ``cfg`` on ``frames`` (one OHLCV frame per ticker).

    ``fit_lstm`` trains the LSTMs of at most ``stack`` folds at a time, as one stack (``backtest.stacking.stack_folds``; with
    warm_start one fold at a time), perhaps several stacks at once in ``workers`` processes (the stacks are then
    as many as a multiple of them: ``fincast.runs.backtest.stack_fitter``). ``on_fold(k, rows)`` is called
    after each fold with its rows of the folds table (the pipeline logs them to MLflow as stepped metrics).
    ``store``: each finished fold is put there, and a fold found there is taken from it instead of refit (a
    killed backtest resumes from its finished folds; ``WalkForward.resumed`` counts them)."""
    seconds = dict.fromkeys(("features", "split", "lstm_fit", "lstm_predict", "ridge", "table"), 0.0)
    t0 = time.perf_counter()
    panel = panels(frames, cfg)
    cuts, calendar = cutoffs(panel, cfg)
    b = cfg.backtest
    end = np.datetime64(b.end, "ns") if b.end else None
    rolling = None if b.window == "expanding" else int(b.window)
    runs = lstm_runs(cfg)
    lstms = [name for name, _, _ in runs]
    seconds["features"] += time.perf_counter() - t0

    notes = _calendar_notes(panel)
    rows: list[pd.DataFrame] = []
    fold_rows: list[dict] = []
    previous: dict[str, dict] = {}  # warm start: each LSTM's weights after the last fold
    bar = tqdm(total=len(cuts), desc="backtest", unit="fold", disable=not progress, leave=False)
    resumed = 0
    pending: list[tuple] = []  # the stacks asked for, in order: (folds, taken from the store, prepared, requests)

    def stacks():
        """Each stack's LSTM requests, prepared when the fitter asks for them (with warm_start, one fold at a time,
        after the fold before it has finished: its weights are the start)."""
        for todo in fold_stacks(len(cuts), 1 if b.warm_start else stack, workers):
            done = {k: d for k in todo if store is not None and (d := store.get(k + 1)) is not None}
            t = time.perf_counter()
            folds = {k: _prepare(k, panel, cuts, rolling, cfg, end) for k in todo if k not in done}
            requests = _requests(runs, {k: f for k, f in folds.items() if f is not None}, previous, cfg)
            seconds["split"] += time.perf_counter() - t
            pending.append((todo, done, folds, requests))
            yield [r for _, _, r in requests]

    results = iter(fit_lstm(stacks()))
    while True:
        t, split = time.perf_counter(), seconds["split"]
        fits = next(results, None)
        if fits is None:
            break
        seconds["lstm_fit"] += time.perf_counter() - t - (seconds["split"] - split)
        todo, done, folds, requests = pending.pop(0)
        fitted = _fitted(requests, fits, folds, previous, cfg, seconds)
        for k in todo:
            if k in done:  # finished by an earlier attempt
                previous.clear()
                previous.update(_take(done[k], k + 1, rows, fold_rows, on_fold))
                resumed += 1
            elif folds[k] is None:  # no ticker has enough training data or anything to forecast in this fold
                if store is not None:
                    store.put(k + 1, {"rows": [], "folds": [], "previous": dict(previous)})
            else:
                fold_forecasts, folds_now = _finish(folds[k], fitted[k], cuts[k], k, cfg, seconds)
                rows += fold_forecasts
                fold_rows.extend(folds_now)
                if store is not None:
                    store.put(k + 1, {"rows": fold_forecasts, "folds": folds_now, "previous": dict(previous)})
                if on_fold is not None:
                    on_fold(k + 1, pd.DataFrame(folds_now))
            bar.update(1)
    bar.close()
    if not rows:
        raise BacktestError("no fold had both training data and forecasts; check backtest.start and backtest.end")
    t = time.perf_counter()
    table = _long_table(rows, lstms + [RIDGE, MEAN, NAIVE])
    seconds["table"] += time.perf_counter() - t
    return WalkForward(table, pd.DataFrame(fold_rows), lstms + [RIDGE, MEAN, NAIVE], lstms, seconds, notes, resumed)


def _long_table(rows: list[pd.DataFrame], models: list[str]) -> pd.DataFrame:
    """The forecast rows as one table by ticker, date and model (in ``models``' order)."""
    table = pd.concat(rows, ignore_index=True)
    table["ticker"] = table["ticker"].astype(str)
    table["model"] = pd.Categorical(table["model"], categories=models)
    table = table.sort_values(["ticker", "date", "model"], kind="stable", ignore_index=True)
    table["model"] = table["model"].astype(str)
    return table


def _take(done: dict, k: int, rows: list, fold_rows: list, on_fold: FoldCallback | None) -> dict:
    """A fold an earlier attempt finished (FoldStore): its forecast and folds-table rows; -> the warm-start
    weights after it."""
    rows += done["rows"]
    fold_rows.extend(done["folds"])
    if on_fold is not None and done["folds"]:
        on_fold(k, pd.DataFrame(done["folds"]))
    return done["previous"]


def _calendar_notes(panel: dict) -> list[str]:
    weekend = {t: periods_per_year(p.origin) == 365 for t, p in panel.items()}
    if len(set(weekend.values())) <= 1:
        return []
    return ["the tickers trade on different calendars (" + ", ".join(
        f"{t}: {'7-day' if w else 'weekdays'}" for t, w in weekend.items()) + "): cutoffs step through their "
        "combined calendar, so backtest.refit_every counts its bars (rolling windows count each ticker's own)"]


@dataclass
class _Fold:
    """A fold ready to fit: its tickers' parts and its splits."""
    parts: dict[str, FoldData]
    train: Split  # LSTM training samples
    val: Split  # inner validation (early stopping, ridge's penalty)
    test: Split  # forecasts
    full: Split  # train + val: ridge, the historical mean, in-sample forecasts
    base: dict  # the fold's columns of the folds table


def _prepare(k: int, panel: dict[str, TickerPanel], cuts: np.ndarray, rolling: int | None, cfg: PipelineConfig,
             end: np.datetime64 | None) -> _Fold | None:
    """Fold k's parts and splits; None when no ticker has enough training data and something to forecast in it
    (the first fold must: else the backtest starts too early)."""
    cutoff = cuts[k]
    next_cut = cuts[k + 1] if k + 1 < len(cuts) else None  # the last fold forecasts to the end
    parts = {tk: d for tk, p in panel.items() if (d := _fold_split(p, cutoff, next_cut, rolling, cfg, end)) is not None}
    if not parts:
        if k == 0:
            raise BacktestError(
                f"backtest.start = {cfg.backtest.start or pd.Timestamp(cutoff).date()}: too little training data "
                f"by the first cutoff {pd.Timestamp(cutoff):%Y-%m-%d} (every ticker needs >= {MIN_TRAIN} "
                f"training and >= {MIN_EVAL} validation samples); use a later backtest.start"
                + (" or a longer backtest.window" if rolling else ""))
        return None
    train, val, test = (_split(panel, parts, w, cfg.features.lookback) for w in ("train", "val", "test"))
    full = concat_splits(train, val)
    base = {"fold": k + 1, "cutoff": pd.Timestamp(cutoff), "train_start": pd.Timestamp(full.origin.min()),
            "samples_train": len(full), "samples_test": len(test)}
    return _Fold(parts, train, val, test, full, base)


def _requests(runs: list[tuple[str, ClipConfig, int]], folds: dict[int, _Fold], previous: dict,
              cfg: PipelineConfig) -> list[tuple]:
    """(fold, LSTM name, FitRequest) of every LSTM (one per clip config and seed) of every fold in ``folds``;
    warm starts from ``previous``."""
    b = cfg.backtest
    out = []
    for k, fold in folds.items():
        for name, clip, seed in runs:
            warm = previous.get(name) if b.warm_start else None
            epochs = b.warm_epochs if warm is not None and b.warm_epochs is not None else cfg.train.epochs
            out.append((k, name, FitRequest(clip, fold.train, fold.val, warm, epochs, seed)))
    return out


def _fitted(requests: list[tuple], fits: list[FoldFit], folds: dict[int, _Fold | None], previous: dict,
            cfg: PipelineConfig, seconds: dict) -> dict[int, tuple[dict, list[dict]]]:
    """Per fold (model -> (test forecasts, training-input forecasts)) and its LSTMs' rows of the folds table, from
    the stack's fits (one per request, in order). ``previous`` holds the warm-start weights, updated here."""
    if len(fits) != len(requests):
        raise BacktestError(f"the LSTM fitter returned {len(fits)} fits for {len(requests)} requests")
    t = time.perf_counter()
    out: dict[int, tuple[dict, list[dict]]] = {k: ({}, []) for k, f in folds.items() if f is not None}
    for (k, name, _), fold_fit in zip(requests, fits):
        fold, (preds, rows) = folds[k], out[k]
        if fold_fit.usable:
            preds[name] = (fold_fit.predict(fold.test.x) * fold.test.scale,
                           fold_fit.predict(fold.full.x) * fold.full.scale)
            if cfg.backtest.warm_start:
                previous[name] = fold_fit.weights
        else:
            preds[name] = (np.full(len(fold.test), np.nan), np.full(len(fold.full), np.nan))
            previous.pop(name, None)  # the next fold starts afresh
        rows.append({**fold.base, "model": name, **fold_fit.info, "usable": fold_fit.usable})
    seconds["lstm_predict"] += time.perf_counter() - t
    return out


def _finish(fold: _Fold, fitted: tuple[dict, list[dict]], cutoff: np.datetime64, k: int, cfg: PipelineConfig,
            seconds: dict) -> tuple[list[pd.DataFrame], list[dict]]:
    """The fold's baselines, forecast rows and folds-table rows, given its LSTMs' (``_fit_lstms``)."""
    preds, folds_now = fitted
    t = time.perf_counter()
    alpha = _ridge_alpha(fold.train, fold.val, cfg) if cfg.backtest.ridge_tune else cfg.model.ridge_alpha
    preds.update(_baselines(fold.full, fold.test, fold.parts, alpha))
    seconds["ridge"] += time.perf_counter() - t
    t = time.perf_counter()
    fold_forecasts = _forecast_rows(preds, fold.full, fold.test, fold.parts, cutoff, k)
    base = fold.base
    folds_now += [{**base, "model": RIDGE, "ridge_alpha": alpha}, {**base, "model": MEAN}, {**base, "model": NAIVE}]
    _score_folds(folds_now, preds, fold.test)
    seconds["table"] += time.perf_counter() - t
    return fold_forecasts, folds_now


def _baselines(full, test, parts: dict, alpha: float) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Ridge on the fold's features, each ticker's historical mean, and the naive zero forecast."""
    ridge = Ridge(alpha=alpha).fit(_flat(full), full.y)
    mean = {tk: float(np.mean(full.y_raw[full.ticker == tk])) for tk in parts}
    return {RIDGE: (ridge.predict(_flat(test)) * test.scale, ridge.predict(_flat(full)) * full.scale),
            MEAN: (np.array([mean[tk] for tk in test.ticker]), np.array([mean[tk] for tk in full.ticker])),
            NAIVE: (np.zeros(len(test)), np.zeros(len(full)))}


def _forecast_rows(preds: dict, full, test, parts: dict, cutoff, k: int) -> list[pd.DataFrame]:
    """The fold's rows of the walk-forward table, one frame per model."""
    out = []
    for name, (pred, insample) in preds.items():
        rms = {tk: _rms(insample[full.ticker == tk]) for tk in parts}
        out.append(pd.DataFrame({
            "date": test.date, "ticker": test.ticker, "cutoff": np.full(len(test), cutoff), "model": name,
            "y_true": test.y_raw, "y_pred": pred, "origin": test.origin, "fold": k + 1,
            "pred_rms_train": [rms[tk] for tk in test.ticker]}))
    return out


def _score_folds(rows: list[dict], preds: dict, test) -> None:
    """Each model's test RMSE on the fold, and against the naive forecast's; missing forecasts count as zero
    (no view), as in the evaluation."""
    naive_rmse = math.sqrt(float(np.mean(np.square(test.y_raw))))
    for row in rows:
        pred = preds[row["model"]][0]
        e = np.where(np.isfinite(pred), pred, 0.0) - test.y_raw
        row["test_rmse"] = math.sqrt(float(np.mean(e**2)))
        row["test_rmse_vs_naive_pct"] = 100 * (row["test_rmse"] / naive_rmse - 1) if naive_rmse > 0 else math.nan
