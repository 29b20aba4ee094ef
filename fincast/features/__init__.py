"""Features, chronological splits and input windows (layer L1).

For each ticker, on its own calendar, the feature row of bar t uses only bars up to and including t:

* ``ret``       log return of the price (adj_close or close) from t-1 to t
* ``vol_<w>``   realized volatility: std of ``ret`` over the last w bars, one per ``features.vol_windows``
* ``range``     log(high / low) of bar t
* ``body``      log(close / open) of bar t
* ``volume``    log1p(volume) minus its mean over the last 21 bars (optional)

A sample with origin t has inputs = feature rows t-lookback+1 .. t and target = log(p[t+h] / p[t]),
the log return over the next h bars. Its ``date`` is the last bar of the target period (t+h).

Splits are by that date: train < val_start <= val < test_start <= test; with h > 1 the samples whose
target period straddles val_start or test_start are dropped (purged), so every training target ends
before any validation target starts, and every validation target before any test target. Scalers
(scikit-learn StandardScaler, one per ticker) are fit only on feature rows dated at or before the
ticker's last training origin; target scales are the std of training targets. Nothing from validation
or test reaches them.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import numpy as np
import pandas as pd
from numpy.lib.stride_tricks import sliding_window_view
from sklearn.preprocessing import StandardScaler

from fincast.config import FeaturesConfig, FincastError

VOLUME_WINDOW = 21
MIN_TRAIN, MIN_EVAL = 32, 4


class FeatureError(FincastError):
    pass


@dataclass
class Split:
    x: np.ndarray  # (N, lookback, F) float32, scaled
    y: np.ndarray  # (N,) float32: target / scale (what the model is trained on)
    y_raw: np.ndarray  # (N,) float64 log return over the target period
    scale: np.ndarray  # (N,) float64 target scale of the sample's ticker
    origin: np.ndarray  # (N,) datetime64: last input bar
    date: np.ndarray  # (N,) datetime64: last bar of the target period
    ticker: np.ndarray  # (N,) object

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class FeatureSet:
    train: Split
    val: Split
    test: Split
    names: list[str]
    val_start: dt.date
    test_start: dt.date
    scalers: dict[str, StandardScaler]
    target_scale: dict[str, float]


def feature_names(cfg: FeaturesConfig) -> list[str]:
    return ["ret", *[f"vol_{w}" for w in cfg.vol_windows], "range", "body"] + (["volume"] if cfg.volume else [])


def warmup(cfg: FeaturesConfig) -> int:
    """Bars lost before the first complete feature row."""
    return max([1, *[w for w in cfg.vol_windows], VOLUME_WINDOW if cfg.volume else 1])


def required_rows(cfg: FeaturesConfig) -> int:
    """Bars one ticker needs so that train/val/test can each hold a few samples."""
    return warmup(cfg) + cfg.lookback + cfg.horizon - 1 + _min_sample_dates(cfg)


def _min_sample_dates(cfg: FeaturesConfig) -> int:
    """Fewest sample dates (of one ticker) for which the split leaves train, val and test at least
    MIN_TRAIN, MIN_EVAL and MIN_EVAL samples: exact for the val_frac/test_frac split (it mirrors
    _split_dates, and the h-1 samples purged at each boundary); explicit split dates depend on the data."""
    h = cfg.horizon
    base = MIN_TRAIN + 2 * (MIN_EVAL + h - 1)
    if cfg.val_start is not None or cfg.test_start is not None or cfg.val_frac + cfg.test_frac >= 1:
        return base

    def enough(n: int) -> bool:
        n_before = int(n * (1 - cfg.test_frac))
        n_train = int(n_before * (1 - cfg.val_frac / (1 - cfg.test_frac)))
        return n_train >= MIN_TRAIN and n_before - n_train - (h - 1) >= MIN_EVAL and n - n_before - (h - 1) >= MIN_EVAL

    hi = base
    while not enough(hi):
        hi *= 2
    lo = base
    while lo < hi:  # the counts never shrink as n grows: bisect for the smallest n that is enough
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if enough(mid) else (mid + 1, hi)
    return hi


def ticker_features(df: pd.DataFrame, cfg: FeaturesConfig, price: str = "adj_close") -> tuple[pd.DataFrame, pd.DataFrame]:
    """(feature rows, targets) of one ticker. Feature rows with incomplete windows are dropped;
    targets hold ``y`` (log return over the next h bars, NaN where unknown) and ``date`` (its last bar)."""
    p = df[price].to_numpy(float)
    logp = np.log(p)
    ret = pd.Series(np.diff(logp, prepend=np.nan), index=df.index)
    cols = {"ret": ret}
    for w in cfg.vol_windows:
        cols[f"vol_{w}"] = ret.rolling(w, min_periods=w).std()
    cols["range"] = np.log(df["high"] / df["low"])
    cols["body"] = np.log(df["close"] / df["open"])
    if cfg.volume:
        lv = np.log1p(df["volume"])
        cols["volume"] = lv - lv.rolling(VOLUME_WINDOW, min_periods=VOLUME_WINDOW).mean()
    feats = pd.DataFrame(cols, index=df.index)[feature_names(cfg)]
    h = cfg.horizon
    target = pd.DataFrame({
        "y": pd.Series(logp, index=df.index).shift(-h) - logp,
        "date": pd.Series(df.index, index=df.index).shift(-h),
    })
    keep = feats.notna().all(axis=1)
    return feats[keep], target[keep]


def check_target(y: np.ndarray, ticker: str, what: str, where: str = "the training split") -> None:
    """Refuse a target that cannot be learned: constant (zero variance) over ``where``. A price that never moves
    has every return 0: the model would fit noise around it, and every metric relative to the zero forecast
    (whose error is then 0) would divide by zero."""
    y = np.asarray(y, float)
    y = y[np.isfinite(y)]
    if len(y) > 1 and float(np.std(y)) <= 1e-12 * max(1.0, float(np.max(np.abs(y)))):
        split = " or the split (data.start, features.val_start)" if where == "the training split" else ""
        raise FeatureError(f"{ticker}: the target ({what}) is constant in {where} ({len(y)} samples, all "
                           f"{float(np.mean(y)):.6g}: zero variance), nothing to learn; check the data (prices that "
                           f"never move?){split}")


def _split_dates(ends: list[np.ndarray], cfg: FeaturesConfig) -> tuple[pd.Timestamp, pd.Timestamp]:
    if cfg.val_start is not None and cfg.test_start is not None:
        return pd.Timestamp(cfg.val_start), pd.Timestamp(cfg.test_start)
    dates = np.unique(np.concatenate(ends))
    n = len(dates)
    test = pd.Timestamp(cfg.test_start) if cfg.test_start else pd.Timestamp(dates[int(n * (1 - cfg.test_frac))])
    if cfg.val_start:
        val = pd.Timestamp(cfg.val_start)
    else:
        before = dates[dates < test.to_datetime64()]
        if cfg.test_start:  # test_frac does not apply: validation is the last val_frac of all sample dates
            k = len(before) - int(n * cfg.val_frac)
        else:
            k = int(len(before) * (1 - cfg.val_frac / (1 - cfg.test_frac)))
        val = pd.Timestamp(before[min(max(k, 0), len(before) - 1)]) if len(before) else test
    return val, test


def build(frames: dict[str, pd.DataFrame], cfg: FeaturesConfig, price: str = "adj_close") -> FeatureSet:
    """Features, windows and chronological splits for all tickers (pooled into one dataset)."""
    L = cfg.lookback
    per: dict[str, tuple[pd.DataFrame, pd.DataFrame]] = {}
    ends = []
    for ticker, df in frames.items():
        feats, target = ticker_features(df, cfg, price)
        per[ticker] = (feats, target)
        valid = target["y"].notna().to_numpy().copy()
        valid[: L - 1] = False
        ends.append(target["date"].to_numpy()[valid])
    if not any(len(e) for e in ends):
        raise FeatureError("no samples: every ticker's history is shorter than warm-up + lookback + horizon")
    val_start, test_start = _split_dates(ends, cfg)

    parts: dict[str, list[Split]] = {"train": [], "val": [], "test": []}
    scalers: dict[str, StandardScaler] = {}
    target_scale: dict[str, float] = {}
    for ticker, (feats, target) in per.items():
        y = target["y"].to_numpy(float)
        end = target["date"].to_numpy()
        origin = feats.index.to_numpy()
        pos = np.arange(len(feats))
        valid = (pos >= L - 1) & ~np.isnan(y)
        # first bar of each target period (the bar after the origin). A target period that straddles val_start
        # or test_start (only when h > 1) is in no split, so target periods of different splits never overlap.
        df = frames[ticker]
        first = pd.Series(df.index, index=df.index).shift(-1).loc[feats.index].to_numpy()
        v, t = val_start.to_datetime64(), test_start.to_datetime64()
        split_of = np.select([end < v, (first >= v) & (end < t), first >= t], [0, 1, 2], default=-1)
        train_pos = pos[valid & (split_of == 0)]
        if len(train_pos) == 0:
            raise FeatureError(f"{ticker}: no training samples before {val_start:%Y-%m-%d}; use an earlier "
                               "data.start or later features.val_start")
        check_target(y[train_pos], ticker, f"log return over {cfg.horizon} bar(s)")
        last_train_origin = origin[train_pos[-1]]
        fit_rows = feats.index <= last_train_origin  # inputs of training samples, nothing later
        scaler = StandardScaler().fit(feats.to_numpy(float)[fit_rows])
        scalers[ticker] = scaler
        xs = scaler.transform(feats.to_numpy(float)).astype(np.float32)
        tscale = float(np.std(y[train_pos])) if cfg.scale_target else 1.0
        if not tscale > 0:
            tscale = 1.0
        target_scale[ticker] = tscale
        windows = sliding_window_view(xs, (L, xs.shape[1]))[:, 0]  # windows[i] = rows i .. i+L-1
        for k, name in enumerate(("train", "val", "test")):
            sel = pos[valid & (split_of == k)]
            if not len(sel):
                continue
            parts[name].append(Split(
                x=np.ascontiguousarray(windows[sel - L + 1]),
                y=(y[sel] / tscale).astype(np.float32),
                y_raw=y[sel],
                scale=np.full(len(sel), tscale),
                origin=origin[sel],
                date=end[sel],
                ticker=np.full(len(sel), ticker, dtype=object),
            ))

    def cat(name: str) -> Split:
        items = parts[name]
        if not items:
            return Split(np.zeros((0, L, len(feature_names(cfg))), np.float32), *(np.zeros(0) for _ in range(5)),
                         np.zeros(0, dtype=object))
        return Split(*(np.concatenate([getattr(s, f) for s in items]) for f in Split.__dataclass_fields__))

    out = FeatureSet(cat("train"), cat("val"), cat("test"), feature_names(cfg), val_start.date(), test_start.date(),
                     scalers, target_scale)
    sizes = {"train": len(out.train), "val": len(out.val), "test": len(out.test)}
    need = {"train": MIN_TRAIN, "val": MIN_EVAL, "test": MIN_EVAL}
    short = [f"{k} has {sizes[k]} (needs >= {need[k]})" for k in sizes if sizes[k] < need[k]]
    if short:
        raise FeatureError(f"split too small: {'; '.join(short)} samples (val_start {val_start:%Y-%m-%d}, test_start "
                           f"{test_start:%Y-%m-%d}); use more history (data.start) or other split dates/fractions")
    return out
