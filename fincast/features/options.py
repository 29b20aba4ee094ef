"""Option-pricing samples (layer L1): contract features, the underlying's return window, chronological splits.

One sample is one contract quoted on one day ``d``. Its inputs are

* contract features: ``log_moneyness`` = ln(K / S_d), ``tau`` (years to expiry), ``rate`` (per annum,
  decimal) and ``call`` (+1 call, -1 put), standardised with training statistics;
* the underlying's last ``lookback`` daily log returns **up to and excluding** ``d`` (bars dated strictly before
  the quote date), as channels ``ret`` and optionally ``abs_ret``, divided by the training returns' std.

The model sees them packed into one row ``x = [contract features | floor | window, time-major]`` of width
``n_contract + 1 + lookback * channels``, so the training loop, DDP sharding and prediction stay the price model's.
``floor`` is not a feature: it is the lowest value the target may take, in training units (the no-arbitrage lower
bound divided by the strike for the price target, 0 for implied vols), to which a bounded model adds its output.
Its target is the market price divided by the strike (``options.target = price``) or the Black-Scholes implied
vol of the market price (``iv``, computed by the pipeline into the ``iv`` column).

Splits are chronological by quote date (never random: contracts of one day share their return window and
their information): train < val_start <= val < test_start <= test, from ``features.val_start``/``test_start``
or ``val_frac``/``test_frac`` of the quote dates. Scalers and the target scale see training rows only.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from fincast.config import FeaturesConfig, OptionsConfig
from fincast.features import FeatureError, Split, _split_dates, check_target

CONTRACT_FEATURES = ["log_moneyness", "tau", "rate", "call"]


@dataclass
class OptionSet:
    train: Split
    val: Split
    test: Split
    frames: dict[str, pd.DataFrame]  # split name -> its contracts, row-aligned with the Split
    names: list[str]  # contract features, then the window's channels
    n_contract: int
    lookback: int
    channels: int
    val_start: dt.date
    test_start: dt.date
    target: str
    target_scale: float
    return_scale: float
    contract_mean: np.ndarray = field(default_factory=lambda: np.zeros(0))
    contract_std: np.ndarray = field(default_factory=lambda: np.zeros(0))


def log_returns(close: pd.Series) -> pd.Series:
    """Daily log returns, dated by the bar they end on (the first bar has none)."""
    close = close.astype("float64")
    return np.log(close / close.shift(1)).iloc[1:]


def _refuse_quotes_after_prices(quote_dates: pd.Series, close: pd.Series) -> None:
    """Quote dates outside the underlying's prices are refused: after its last price a contract would see a
    stale return window (and S), before its first price none at all."""
    if close.empty:
        raise FeatureError("the underlying has no prices; check data.tickers and data.start/end")
    first, last = close.index[0], close.index[-1]
    for outside, where in ((quote_dates > last, "after the underlying's last price (their return windows would "
                            "be stale)"), (quote_dates < first, "before the underlying's first price")):
        out = pd.DatetimeIndex(quote_dates[outside])
        if len(out):
            qd = pd.DatetimeIndex(quote_dates)
            raise FeatureError(
                f"{len(out):,} option contracts on {out.nunique()} quote date(s) ({out.min():%Y-%m-%d} .. "
                f"{out.max():%Y-%m-%d}) lie {where}: chain quote dates {qd.min():%Y-%m-%d} .. {qd.max():%Y-%m-%d}, "
                f"underlying prices {first:%Y-%m-%d} .. {last:%Y-%m-%d}. Extend the underlying's history "
                "(data.start, data.end, `make data`) or cut the chain")


def prepare(chain: pd.DataFrame, close: pd.Series, cfg: OptionsConfig, lookback: int, *,
            rates: pd.Series | None = None, vol_index: pd.Series | None = None,
            periods_per_year: int = 252) -> tuple[pd.DataFrame, np.ndarray, dict[str, int]]:
    """Attach to each contract what is known at its quote date ``d``: the underlying price ``S`` (the chain's
    ``underlying_price``, else the close on ``d``), the rate ``r`` (``rates`` as of ``d``, else options.rate), the
    dividend yield ``q``, ``log_moneyness``, realised vols ``hv<w>`` over the ``w`` returns before ``d`` (for the
    Black-Scholes baselines) and ``vol_index`` (as of ``d``, decimal). Returns (contracts, the return windows
    (one row of ``lookback`` returns per quote date; a contract's row is its ``_window``), rows dropped per
    reason). A quote date without ``lookback`` returns before it, or without an
    underlying price, is dropped, as are contracts beyond options.max_log_moneyness."""
    dropped: dict[str, int] = {}

    def drop(mask: np.ndarray, reason: str) -> None:
        if mask.any():
            dropped[reason] = dropped.get(reason, 0) + int(mask.sum())

    close = close.dropna().sort_index()
    _refuse_quotes_after_prices(chain["quote_date"], close)
    rets = log_returns(close)
    ret_dates = rets.index.to_numpy()
    ret_vals = rets.to_numpy(float)
    df = chain.reset_index(drop=True).copy()
    qd = df["quote_date"].to_numpy()
    # returns dated strictly before d: the first `pos` returns
    pos = np.searchsorted(ret_dates, qd, side="left")
    need = max([lookback, *cfg.hist_vols])
    short = pos < need
    drop(short, f"fewer than {need} daily returns of the underlying before the quote date")
    s = df["underlying_price"].to_numpy(float) if "underlying_price" in df else np.full(len(df), np.nan)
    close_on = close.reindex(pd.DatetimeIndex(qd)).to_numpy(float)
    s = np.where(np.isfinite(s) & (s > 0), s, close_on)
    no_s = ~short & ~(np.isfinite(s) & (s > 0))
    drop(no_s, "no underlying price on the quote date")
    keep = ~short & ~no_s
    lm = np.full(len(df), np.nan)
    lm[keep] = np.log(df["strike"].to_numpy(float)[keep] / s[keep])
    far = keep & (np.abs(lm) > cfg.max_log_moneyness)
    drop(far, f"|ln(K/S)| > options.max_log_moneyness = {cfg.max_log_moneyness:g}")
    keep &= ~far
    df = df.assign(S=s, log_moneyness=lm, _pos=pos)[keep].reset_index(drop=True)
    if df.empty:
        reasons = "; ".join(f"{k}: {v}" for k, v in dropped.items())
        raise FeatureError(f"no option contracts left to price after aligning them with the underlying ({reasons}); "
                           "check that data.tickers names the chain's underlying and its history covers the quote dates")

    if rates is not None:
        r = rates.sort_index().reindex(pd.DatetimeIndex(df["quote_date"]), method="ffill").to_numpy(float)
        missing = ~np.isfinite(r)
        if missing.any():
            first = df.loc[missing, "quote_date"].iloc[0]
            raise FeatureError(f"options.rate_ticker: no rate on or before quote date {first:%Y-%m-%d} "
                               f"({int(missing.sum())} contracts); extend its history or set options.rate_ticker=null")
    else:
        r = np.full(len(df), cfg.rate)
    df["r"] = r
    df["q"] = cfg.dividend_yield
    pos = df.pop("_pos").to_numpy()
    dates, inverse = np.unique(pos, return_inverse=True)
    for w in cfg.hist_vols:
        vols = np.array([np.std(ret_vals[p - w:p], ddof=1) for p in dates]) * np.sqrt(periods_per_year)
        df[f"hv{w}"] = vols[inverse]
    if vol_index is not None:
        v = vol_index.sort_index().reindex(pd.DatetimeIndex(df["quote_date"]), method="ffill").to_numpy(float) / 100
        df["vol_index"] = v
    windows = np.stack([ret_vals[p - lookback:p] for p in dates]).astype(np.float64)
    df["_window"] = inverse  # row of `windows` holding this contract's return window
    return df, windows, dropped


def build(contracts: pd.DataFrame, windows: np.ndarray, cfg: OptionsConfig, fcfg: FeaturesConfig,
          ticker: str) -> OptionSet:
    """Samples and chronological splits from ``prepare``'s output (plus an ``iv`` column when target = iv)."""
    L = fcfg.lookback
    df = contracts
    if cfg.target == "iv":
        ok = np.isfinite(df["iv"].to_numpy(float))
        df = df[ok].reset_index(drop=True)
        if df.empty:
            raise FeatureError("options.target = iv: no contract has a Black-Scholes implied vol (market prices outside "
                               "the no-arbitrage bounds?); use options.target=price")
        y_raw = df["iv"].to_numpy(float)
    else:
        y_raw = df["price"].to_numpy(float) / df["strike"].to_numpy(float)
    qd = df["quote_date"].to_numpy()
    dates = np.unique(qd)
    if len(dates) < 3:
        raise FeatureError(f"only {len(dates)} quote date(s) with usable contracts: a chronological train/val/test "
                           "split needs at least 3 (more for a meaningful test)")
    val_start, test_start = _split_dates([dates], fcfg)
    v, t = val_start.to_datetime64(), test_start.to_datetime64()
    split_of = np.select([qd < v, qd < t], [0, 1], default=2)
    for i, name in enumerate(("train", "val", "test")):
        if not (split_of == i).any():
            raise FeatureError(f"no quote dates in the {name} split (val_start {val_start:%Y-%m-%d}, test_start "
                               f"{test_start:%Y-%m-%d}, quote dates {pd.Timestamp(dates[0]):%Y-%m-%d} .. "
                               f"{pd.Timestamp(dates[-1]):%Y-%m-%d}); adjust features.val_start/test_start or the fracs")
    train = split_of == 0
    check_target(y_raw[train], ticker, "implied vol" if cfg.target == "iv" else "option price / strike")

    contract = np.column_stack([df["log_moneyness"].to_numpy(float), df["tau"].to_numpy(float),
                                df["r"].to_numpy(float), np.where(df["call"].to_numpy(bool), 1.0, -1.0)])
    mean = contract[train].mean(axis=0)
    std = contract[train].std(axis=0)
    std = np.where(std > 1e-12, std, 1.0)  # a constant feature (one rate) stays 0 after centring
    contract = (contract - mean) / std

    # the floor of the target (not a feature: the model adds its output to it when model.bounded_output): the
    # no-arbitrage lower bound / strike for the price target, 0 for implied vols
    if cfg.target == "price":
        S, K, tau = df["S"].to_numpy(float), df["strike"].to_numpy(float), df["tau"].to_numpy(float)
        fwd_s = S * np.exp(-df["q"].to_numpy(float) * tau)
        disc_k = K * np.exp(-df["r"].to_numpy(float) * tau)
        lower = np.maximum(np.where(df["call"].to_numpy(bool), fwd_s - disc_k, disc_k - fwd_s), 0.0) / K
    else:
        lower = np.zeros(len(df))

    win_all = windows  # (quote dates, L)
    train_windows = np.unique(df.loc[train, "_window"].to_numpy())
    rscale = float(np.std(win_all[train_windows])) or 1.0
    chans = [win_all / rscale] + ([np.abs(win_all) / rscale] if cfg.abs_returns else [])
    seq = np.stack(chans, axis=-1).reshape(len(win_all), -1)  # time-major: r_1, |r_1|, r_2, |r_2|, ...
    x = np.concatenate([contract, seq[df["_window"].to_numpy()]], axis=1).astype(np.float32)

    tscale = float(np.std(y_raw[train])) if fcfg.scale_target else 1.0
    if not tscale > 0:
        tscale = 1.0
    x = np.concatenate([x[:, :len(CONTRACT_FEATURES)], (lower / tscale)[:, None].astype(np.float32),
                        x[:, len(CONTRACT_FEATURES):]], axis=1)
    splits, frames = {}, {}
    for i, name in enumerate(("train", "val", "test")):
        m = split_of == i
        frame = df[m].drop(columns=["_window"]).reset_index(drop=True)
        frame["y_raw"] = y_raw[m]
        splits[name] = Split(x=x[m], y=(y_raw[m] / tscale).astype(np.float32), y_raw=y_raw[m],
                             scale=np.full(int(m.sum()), tscale), origin=qd[m], date=qd[m],
                             ticker=np.full(int(m.sum()), ticker, dtype=object))
        frames[name] = frame
    names = CONTRACT_FEATURES + ["ret"] + (["abs_ret"] if cfg.abs_returns else [])
    return OptionSet(splits["train"], splits["val"], splits["test"], frames, names, len(CONTRACT_FEATURES), L,
                     1 + int(cfg.abs_returns), val_start.date(), test_start.date(), cfg.target, tscale, rscale,
                     mean, std)


def previous_day_iv(contracts: pd.DataFrame) -> np.ndarray:
    """Each contract's market implied vol on the chain's previous quote date (the last day before its own on
    which the chain was quoted), NaN where it was not quoted that day or had no implied vol: information known
    before the quote date, the baseline a practitioner would price with. Needs contract, quote_date and iv."""
    qd = pd.to_datetime(contracts["quote_date"])
    dates = np.sort(qd.unique())
    previous = pd.Series(dates[:-1], index=dates[1:])
    known = contracts.assign(quote_date=qd).groupby(["contract", "quote_date"])["iv"].mean()
    keys = pd.MultiIndex.from_arrays([contracts["contract"].astype(str), qd.map(previous)])
    return known.reindex(keys).to_numpy(float)

