"""fincast.features: no look-ahead, chronological splits, scalers fit on training data only.

Every expectation here is recomputed from the raw prices with plain numpy, never read back from
fincast.features.
"""

from __future__ import annotations

import datetime as dt
import functools

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fincast import features as F
from fincast.config import FeaturesConfig, from_dict
from fincast.data.synthetic import generate

START, END = dt.date(2016, 1, 1), dt.date(2019, 12, 31)


@functools.cache
def _frame(ticker: str, seed: int = 7, start: dt.date = START, end: dt.date = END) -> pd.DataFrame:
    return generate(ticker, start, end, seed=seed)


def frame(ticker: str, **kw) -> pd.DataFrame:
    return _frame(ticker, **kw).copy()


def fcfg(**kw) -> FeaturesConfig:
    return from_dict({"features": kw}).features


# ---------------------------------------------------------------------------------------------
# Independent reference: features and targets from the raw prices, with numpy only
# ---------------------------------------------------------------------------------------------


def reference_features(df: pd.DataFrame, cfg: FeaturesConfig, price: str = "adj_close") -> np.ndarray:
    """(n_bars, F) matrix in the documented column order; NaN where a window is incomplete."""
    n = len(df)
    p = df[price].to_numpy(float)
    ret = np.full(n, np.nan)
    ret[1:] = np.log(p[1:] / p[:-1])
    cols = [ret]
    for w in cfg.vol_windows:
        vol = np.full(n, np.nan)
        # std (ddof 1) of ret[k-w+1 .. k]: complete once ret[1 .. w] exist
        vol[w:] = np.lib.stride_tricks.sliding_window_view(ret[1:], w).std(axis=1, ddof=1)
        cols.append(vol)
    cols.append(np.log(df["high"].to_numpy(float) / df["low"].to_numpy(float)))
    cols.append(np.log(df["close"].to_numpy(float) / df["open"].to_numpy(float)))
    if cfg.volume:
        lv = np.log1p(df["volume"].to_numpy(float))
        rel = np.full(n, np.nan)
        rel[20:] = lv[20:] - np.lib.stride_tricks.sliding_window_view(lv, 21).mean(axis=1)
        cols.append(rel)
    return np.column_stack(cols)


def positions(df: pd.DataFrame, dates: np.ndarray) -> np.ndarray:
    pos = df.index.get_indexer(pd.DatetimeIndex(dates))
    assert (pos >= 0).all(), "a sample date is not a bar of its ticker"
    return pos


def ticker_rows(split: F.Split, ticker: str) -> np.ndarray:
    return np.flatnonzero(split.ticker == ticker)


SPLITS = ("train", "val", "test")


def check_no_look_ahead(fs: F.FeatureSet, frames: dict[str, pd.DataFrame], cfg: FeaturesConfig, price="adj_close"):
    h, L = cfg.horizon, cfg.lookback
    val_start, test_start = np.datetime64(fs.val_start), np.datetime64(fs.test_start)
    assert fs.names[0] == "ret"
    for ticker, df in frames.items():
        ref = reference_features(df, cfg, price)
        complete = np.flatnonzero(~np.isnan(ref).any(axis=1))
        first_row = complete[0]
        assert (complete == np.arange(first_row, len(df))).all()
        p = df[price].to_numpy(float)
        idx = df.index.to_numpy()
        scaler = fs.scalers[ticker]
        n_samples = 0
        for name in SPLITS:
            split = getattr(fs, name)
            rows = ticker_rows(split, ticker)
            n_samples += len(rows)
            if not len(rows):
                continue
            o = positions(df, split.origin[rows])
            d = positions(df, split.date[rows])
            # the target period is bars o+1 .. o+h; inputs end at o
            assert (d == o + h).all()
            first_target_bar = idx[o + 1]
            assert (idx[o] < first_target_bar).all() and (first_target_bar <= idx[d]).all()
            # target recomputed from the raw prices
            np.testing.assert_allclose(split.y_raw[rows], np.log(p[o + h] / p[o]), rtol=1e-12, atol=1e-15)
            np.testing.assert_allclose(split.scale[rows], fs.target_scale[ticker], rtol=0)
            np.testing.assert_allclose(split.y[rows], split.y_raw[rows] / fs.target_scale[ticker], rtol=1e-5,
                                       atol=1e-7)
            # last input row: its ret is log(p[o] / p[o-1]), the return of the origin bar itself
            last_ret = split.x[rows, -1, 0].astype(float) * scaler.scale_[0] + scaler.mean_[0]
            np.testing.assert_allclose(last_ret, np.log(p[o] / p[o - 1]), rtol=1e-4, atol=1e-6 * scaler.scale_[0])
            # the whole window: rows o-L+1 .. o of the reference features, scaled with the ticker's scaler
            assert (o - L + 1 >= first_row).all()
            win = (o - L + 1)[:, None] + np.arange(L)[None, :]
            expect = (ref[win] - scaler.mean_) / scaler.scale_
            np.testing.assert_allclose(split.x[rows], expect, rtol=1e-4, atol=1e-5)
            # split membership by target period: train ends before val_start, val/test start on or after
            first_bar = first_target_bar.astype("datetime64[ns]")
            end = idx[d].astype("datetime64[ns]")
            if name == "train":
                assert (end < val_start).all()
            elif name == "val":
                assert (first_bar >= val_start).all() and (end < test_start).all()
            else:
                assert (first_bar >= test_start).all()
        # every candidate sample is in a split, except those whose target period straddles a split date
        o_all = np.arange(first_row + L - 1, len(df) - h)
        first_all, end_all = idx[o_all + 1], idx[o_all + h]
        straddle = ((first_all < val_start) & (end_all >= val_start)) | ((first_all < test_start) & (end_all >= test_start))
        assert n_samples == len(o_all) - straddle.sum()


def check_split_order(fs: F.FeatureSet):
    val_start, test_start = np.datetime64(fs.val_start), np.datetime64(fs.test_start)
    assert val_start < test_start
    assert len(fs.train) and len(fs.val) and len(fs.test)
    assert (fs.train.date < val_start).all()
    assert (val_start <= fs.val.date).all() and (fs.val.date < test_start).all()
    assert (test_start <= fs.test.date).all()
    assert fs.train.date.max() < fs.val.date.min() and fs.val.date.max() < fs.test.date.min()
    for split in (fs.train, fs.val, fs.test):
        assert (split.origin < split.date).all()


CASES = {
    "SPY-h1-fracs": (("SPY",), {}),
    "SPY-h5-L20": (("SPY",), {"horizon": 5, "lookback": 20, "vol_windows": [10, 63]}),
    "BTC+SPY-h3-dates": (("BTC-USD", "SPY"), {"horizon": 3, "lookback": 15, "vol_windows": [7, 30],
                                            "val_start": "2018-07-01", "test_start": "2019-03-09"}),
    "ETH-h1-novolume": (("ETH-USD",), {"volume": False, "vol_windows": [], "lookback": 5, "val_frac": 0.2,
                                       "test_frac": 0.25, "scale_target": False}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_no_look_ahead(case):
    tickers, kw = CASES[case]
    cfg = fcfg(**kw)
    frames = {t: frame(t) for t in tickers}
    fs = F.build(frames, cfg)
    check_split_order(fs)
    check_no_look_ahead(fs, frames, cfg)
    assert fs.names == ["ret", *[f"vol_{w}" for w in cfg.vol_windows], "range", "body"] + (
        ["volume"] if cfg.volume else [])
    assert fs.train.x.shape[1:] == (cfg.lookback, len(fs.names)) and fs.train.x.dtype == np.float32


@pytest.mark.parametrize("case", list(CASES))
def test_scalers_and_target_scales_come_from_training_data_only(case):
    tickers, kw = CASES[case]
    cfg = fcfg(**kw)
    frames = {t: frame(t) for t in tickers}
    fs = F.build(frames, cfg)
    for ticker, df in frames.items():
        ref = reference_features(df, cfg)
        rows = ticker_rows(fs.train, ticker)
        last_origin = positions(df, fs.train.origin[rows]).max()
        fit = ref[: last_origin + 1]
        fit = fit[~np.isnan(fit).any(axis=1)]
        np.testing.assert_allclose(fs.scalers[ticker].mean_, fit.mean(axis=0), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(fs.scalers[ticker].scale_, fit.std(axis=0), rtol=1e-9)
        p = df["adj_close"].to_numpy(float)
        o = positions(df, fs.train.origin[rows])
        expect = np.std(np.log(p[o + cfg.horizon] / p[o])) if cfg.scale_target else 1.0
        assert fs.target_scale[ticker] == pytest.approx(expect, rel=1e-12)


def test_fraction_split_sizes():
    cfg = fcfg(val_frac=0.2, test_frac=0.1)
    fs = F.build({"SPY": frame("SPY")}, cfg)
    n = len(fs.train) + len(fs.val) + len(fs.test)
    assert len(fs.test) / n == pytest.approx(0.1, abs=2 / n)
    assert len(fs.val) / n == pytest.approx(0.2, abs=2 / n)


def test_horizon_targets_are_multi_bar_log_returns():
    df = frame("SPY")
    for h in (1, 2, 10):
        cfg = fcfg(horizon=h, val_frac=0.1, test_frac=0.1)
        fs = F.build({"SPY": df}, cfg)
        p = df["adj_close"].to_numpy(float)
        for split in (fs.train, fs.val, fs.test):
            o = positions(df, split.origin)
            # sum of the h one-bar returns after the origin
            one_bar = np.log(p[1:] / p[:-1])
            expect = np.array([one_bar[k: k + h].sum() for k in o])
            np.testing.assert_allclose(split.y_raw, expect, rtol=1e-9, atol=1e-12)
            assert (positions(df, split.date) - o == h).all()


def test_close_price_option_uses_close():
    df = frame("SPY")
    df["adj_close"] = df["close"] * np.exp(np.linspace(0, -0.3, len(df)))  # a dividend-like drift
    cfg = fcfg()
    fs = F.build({"SPY": df}, cfg, price="close")
    check_no_look_ahead(fs, {"SPY": df}, cfg, price="close")
    fs_adj = F.build({"SPY": df}, cfg)
    assert not np.allclose(fs_adj.train.y_raw, fs.train.y_raw)


def test_split_dates_from_config_are_used():
    cfg = fcfg(val_start="2018-01-02", test_start="2019-01-02")
    fs = F.build({"SPY": frame("SPY")}, cfg)
    assert (fs.val_start, fs.test_start) == (dt.date(2018, 1, 2), dt.date(2019, 1, 2))
    assert fs.val.date.min() == np.datetime64("2018-01-02") and fs.test.date.min() == np.datetime64("2019-01-02")


def test_horizon_purges_target_periods_that_straddle_a_split_date():
    """With h > 1, a validation target must not share bars with a training target (nor test with val)."""
    h = 5
    cfg = fcfg(horizon=h, val_start="2018-01-02", test_start="2019-01-02")
    df = frame("SPY")
    fs = F.build({"SPY": df}, cfg)
    idx = df.index.to_numpy()
    for earlier, later in ((fs.train, fs.val), (fs.val, fs.test)):
        last_end = earlier.date.max()
        first_start = idx[positions(df, later.origin) + 1].min()
        assert last_end < first_start
    # the first val sample is the first whose whole target period is on or after val_start
    first_val_origin = positions(df, fs.val.origin).min()
    assert idx[first_val_origin + 1] == np.datetime64("2018-01-02")


# ---------------------------------------------------------------------------------------------
# Scaler proof: perturbing the future changes nothing that training sees
# ---------------------------------------------------------------------------------------------


def perturb(df: pd.DataFrame, mask: np.ndarray, seed: int) -> pd.DataFrame:
    """Wildly change every price and volume on the rows in mask, keeping the bars well formed."""
    rng = np.random.default_rng(seed)
    out = df.copy()
    k = int(mask.sum())
    a = np.exp(rng.normal(0, 1.0, k))  # close / adj_close
    b = np.exp(rng.normal(0, 1.0, k))  # open
    wick = np.exp(np.abs(rng.normal(0, 0.5, (2, k))))
    out.loc[mask, "close"] *= a
    out.loc[mask, "adj_close"] *= a
    out.loc[mask, "open"] *= b
    out.loc[mask, "high"] *= np.maximum(a, b) * wick[0]
    out.loc[mask, "low"] *= np.minimum(a, b) / wick[1]
    out.loc[mask, "volume"] = np.round(out.loc[mask, "volume"] * np.exp(rng.normal(0, 2.0, k)))
    assert (out["high"] >= out[["open", "close"]].max(axis=1)).all()
    assert (out["low"] <= out[["open", "close"]].min(axis=1)).all()
    return out


PERTURB_CFGS = {
    "h1": {"val_start": "2018-07-02", "test_start": "2019-03-04"},
    "h4": {"horizon": 4, "lookback": 10, "vol_windows": [3, 40], "val_start": "2018-07-02",
           "test_start": "2019-03-04"},
}


def _same_split(a: F.Split, b: F.Split, rows: np.ndarray | None = None):
    for f in F.Split.__dataclass_fields__:
        x, y = getattr(a, f), getattr(b, f)
        if rows is not None:
            x, y = x[rows], y[rows]
        assert np.array_equal(x, y), f


@pytest.mark.parametrize("which", list(PERTURB_CFGS))
def test_prices_after_the_last_training_origin_do_not_reach_scalers_or_training_inputs(which):
    cfg = fcfg(**PERTURB_CFGS[which])
    frames = {t: frame(t) for t in ("SPY", "BTC-USD")}
    fs = F.build(frames, cfg)
    changed = {}
    for i, (ticker, df) in enumerate(frames.items()):
        last_origin = fs.train.origin[ticker_rows(fs.train, ticker)].max()
        changed[ticker] = perturb(df, np.asarray(df.index > last_origin), seed=i)
    fs2 = F.build(changed, cfg)
    assert (fs2.val_start, fs2.test_start) == (fs.val_start, fs.test_start)
    for ticker in frames:
        s1, s2 = fs.scalers[ticker], fs2.scalers[ticker]
        assert np.array_equal(s1.mean_, s2.mean_) and np.array_equal(s1.scale_, s2.scale_)
        assert s1.n_samples_seen_ == s2.n_samples_seen_
    # training inputs, origins and dates are identical; targets too where they end by the last origin
    assert np.array_equal(fs.train.x, fs2.train.x)
    for f in ("origin", "date", "ticker"):
        assert np.array_equal(getattr(fs.train, f), getattr(fs2.train, f))
    last_origin = {t: fs.train.origin[ticker_rows(fs.train, t)].max() for t in frames}
    known = np.array([d <= last_origin[t] for d, t in zip(fs.train.date, fs.train.ticker)])
    assert known.sum() > len(fs.train) * 0.9
    assert np.array_equal(fs.train.y_raw[known], fs2.train.y_raw[known])
    # the perturbation is real: what comes after does change
    assert not np.array_equal(fs.val.x, fs2.val.x)
    assert not np.array_equal(fs.test.y_raw, fs2.test.y_raw)


@pytest.mark.parametrize("which", list(PERTURB_CFGS))
def test_prices_from_val_start_on_do_not_reach_training_at_all(which):
    cfg = fcfg(**PERTURB_CFGS[which])
    frames = {t: frame(t) for t in ("SPY", "BTC-USD")}
    fs = F.build(frames, cfg)
    val_start = pd.Timestamp(cfg.val_start)
    changed = {t: perturb(df, np.asarray(df.index >= val_start), seed=10 + i)
               for i, (t, df) in enumerate(frames.items())}
    fs2 = F.build(changed, cfg)
    for ticker in frames:
        s1, s2 = fs.scalers[ticker], fs2.scalers[ticker]
        assert np.array_equal(s1.mean_, s2.mean_) and np.array_equal(s1.scale_, s2.scale_)
        assert fs.target_scale[ticker] == fs2.target_scale[ticker]
    _same_split(fs.train, fs2.train)  # x, y, y_raw, scale, origin, date, ticker: bit for bit
    assert not np.array_equal(fs.val.y_raw, fs2.val.y_raw)
    assert not np.array_equal(fs.test.x, fs2.test.x)


@settings(max_examples=25, deadline=None)
@given(cut=st.integers(1, 299), horizon=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_a_feature_row_uses_only_bars_up_to_its_own(cut, horizon, seed):
    """Changing bars cut.. leaves every feature row before cut, and every target ending before cut, unchanged."""
    cfg = fcfg(horizon=horizon, vol_windows=[3, 10], lookback=5)
    df = frame("SPY").iloc[:300]
    feats, target = F.ticker_features(df, cfg)
    mask = np.arange(len(df)) >= cut
    feats2, target2 = F.ticker_features(perturb(df, mask, seed), cfg)
    before = feats.index < df.index[cut]
    pd.testing.assert_frame_equal(feats[before], feats2[before], check_exact=True)
    ends_before = (target["date"] < df.index[cut]).to_numpy()
    assert np.array_equal(target["y"].to_numpy()[ends_before], target2["y"].to_numpy()[ends_before])
    # the change shows up from bar cut on (non-vacuous): the return of bar cut itself differs
    if df.index[cut] in feats.index:
        assert feats.loc[df.index[cut], "ret"] != feats2.loc[df.index[cut], "ret"]


# ---------------------------------------------------------------------------------------------
# Several tickers on their own calendars
# ---------------------------------------------------------------------------------------------


def test_crypto_and_equity_samples_stay_on_their_own_calendars():
    h = 2
    cfg = fcfg(horizon=h, val_frac=0.15, test_frac=0.15)
    frames = {"BTC-USD": frame("BTC-USD"), "SPY": frame("SPY")}
    fs = F.build(frames, cfg)
    check_split_order(fs)
    check_no_look_ahead(fs, frames, cfg)
    for name in SPLITS:
        split = getattr(fs, name)
        assert set(split.ticker) == {"BTC-USD", "SPY"}, name
    for split in (fs.train, fs.val, fs.test):
        btc, spy = ticker_rows(split, "BTC-USD"), ticker_rows(split, "SPY")
        btc_days = (split.date[btc] - split.origin[btc]) / np.timedelta64(1, "D")
        assert (btc_days == h).all()  # every day is a crypto bar
        spy_days = (split.date[spy] - split.origin[spy]) / np.timedelta64(1, "D")
        assert (spy_days >= h).all()
        spy_dates = pd.DatetimeIndex(np.concatenate([split.origin[spy], split.date[spy]]))
        assert (spy_dates.day_of_week < 5).all()  # no weekend bars for the equity
    all_spy = pd.DatetimeIndex(fs.train.date[ticker_rows(fs.train, "SPY")])
    all_btc = pd.DatetimeIndex(fs.train.date[ticker_rows(fs.train, "BTC-USD")])
    assert (all_btc.day_of_week >= 5).any() and not (all_spy.day_of_week >= 5).any()
    spy_gap = (fs.train.date - fs.train.origin)[ticker_rows(fs.train, "SPY")] / np.timedelta64(1, "D")
    assert (spy_gap > h).any()  # h bars over a weekend are more than h days
    # one scaler and one target scale per ticker, each from its own data
    assert set(fs.scalers) == set(fs.target_scale) == {"BTC-USD", "SPY"}
    assert fs.target_scale["BTC-USD"] > 2 * fs.target_scale["SPY"]  # crypto is far more volatile


# ---------------------------------------------------------------------------------------------
# Too little data
# ---------------------------------------------------------------------------------------------


def test_split_too_small_names_the_counts():
    df = frame("SPY").iloc[:150]
    idx = df.index
    # h = 1: the test split holds exactly the samples dated idx[-2] and idx[-1]
    cfg = fcfg(val_start=idx[-20].date().isoformat(), test_start=idx[-2].date().isoformat())
    with pytest.raises(F.FeatureError) as info:
        F.build({"SPY": df}, cfg)
    msg = str(info.value)
    assert "split too small" in msg
    assert "test has 2 (needs >= 4)" in msg
    assert "train has" not in msg and "val has" not in msg
    assert idx[-2].strftime("%Y-%m-%d") in msg


def test_split_too_small_with_fractions():
    cfg = fcfg()
    df = frame("SPY").iloc[: cfg.lookback + 21 + 30]  # about 30 samples
    with pytest.raises(F.FeatureError, match=r"train has \d+ \(needs >= 32\)"):
        F.build({"SPY": df}, cfg)


def test_no_training_samples_before_val_start():
    df = frame("SPY").iloc[:200]
    cfg = fcfg(val_start=df.index[5].date().isoformat(), test_start=df.index[150].date().isoformat())
    with pytest.raises(F.FeatureError, match="SPY: no training samples"):
        F.build({"SPY": df}, cfg)


def test_history_shorter_than_warmup():
    cfg = fcfg()
    with pytest.raises(F.FeatureError, match="no samples"):
        F.build({"SPY": frame("SPY").iloc[: cfg.lookback + 10]}, cfg)


@functools.cache
def _long(ticker: str) -> pd.DataFrame:
    return generate(ticker, dt.date(2000, 1, 1), dt.date(2012, 12, 31), seed=3)


@settings(max_examples=30, deadline=None)
@given(lookback=st.integers(1, 60), horizon=st.integers(1, 10),
       vol_windows=st.lists(st.integers(2, 60), max_size=3, unique=True), volume=st.booleans(),
       val_frac=st.floats(0.03, 0.4), test_frac=st.floats(0.03, 0.4),
       ticker=st.sampled_from(["SPY", "BTC-USD"]))
def test_required_rows_is_enough(lookback, horizon, vol_windows, volume, val_frac, test_frac, ticker):
    cfg = fcfg(lookback=lookback, horizon=horizon, vol_windows=vol_windows, volume=volume,
               val_frac=min(val_frac, 0.85 - test_frac), test_frac=test_frac)
    n = F.required_rows(cfg)
    df = _long(ticker).iloc[:n]
    assert len(df) == n
    fs = F.build({ticker: df}, cfg)  # raises FeatureError if any split is below its minimum
    assert len(fs.train) >= F.MIN_TRAIN and len(fs.val) >= F.MIN_EVAL and len(fs.test) >= F.MIN_EVAL


@pytest.mark.parametrize("kw", [{}, {"horizon": 5}, {"vol_windows": [7, 30]}, {"val_frac": 0.3, "test_frac": 0.3},
                                {"val_frac": 0.05, "test_frac": 0.05}])
def test_required_rows_is_enough_for_the_shipped_style_configs(kw):
    cfg = fcfg(**kw)
    n = F.required_rows(cfg)
    F.build({"SPY": _long("SPY").iloc[:n]}, cfg)
    F.build({"BTC-USD": _long("BTC-USD").iloc[:n]}, cfg)


def test_too_short_a_history_is_an_error_the_cli_reports():
    """A history shorter than warm-up + lookback + horizon fails with a message saying so, as the error type the
    CLI turns into `error: ...` and exit status 2 (FincastError), not a traceback."""
    from fincast.config import FincastError

    with pytest.raises(FincastError, match="no samples: every ticker's history is shorter than warm-up"):
        F.build({"SPY": _long("SPY").iloc[:5]}, fcfg())


def test_explicit_test_start_with_val_frac_takes_val_frac_of_all_dates():
    """With features.test_start set, test_frac does not apply; validation is val_frac of all sample dates."""
    cfg = fcfg(test_start=dt.date(2019, 1, 2), val_frac=0.2, test_frac=0.5)
    frames = {"SPY": frame("SPY")}
    fs = F.build(frames, cfg)
    n_all = len(fs.train) + len(fs.val) + len(fs.test)
    assert fs.test_start == dt.date(2019, 1, 2)
    assert abs(len(fs.val) - 0.2 * n_all) <= 2  # not 0.2 / (1 - 0.5) of the dates before the test start


def test_a_ticker_whose_price_never_moves_in_training_is_refused():
    """A constant training target (every log return 0 until the validation split starts) cannot be learned and
    gives the zero forecast an error of 0: refused, naming the ticker, whatever the other tickers do."""
    cfg = fcfg(val_start=dt.date(2018, 6, 1), test_start=dt.date(2019, 3, 1))
    flat = frame("SPY")
    before = flat.index < pd.Timestamp(cfg.val_start)  # every price a training target spans
    for col in ("open", "high", "low", "close", "adj_close"):
        flat.loc[before, col] = 100.0
    with pytest.raises(F.FeatureError, match=r"^SPY: the target \(log return over 1 bar\(s\)\) is constant in the "
                                             r"training split \(\d+ samples, all 0: zero variance\)"):
        F.build({"BTC-USD": frame("BTC-USD"), "SPY": flat}, cfg)
    flat.loc[before, "adj_close"] = 100.0 * np.exp(np.arange(before.sum()) % 2 * 1e-3)
    F.build({"SPY": flat}, cfg)  # a tiny but real variance trains


def test_a_constant_option_target_is_refused():
    from fincast.config import OptionsConfig
    from fincast.features import options as ofeat

    days = pd.bdate_range("2020-01-01", periods=30)
    n = 2 * len(days)
    strike = np.tile([90.0, 110.0], len(days))
    contracts = pd.DataFrame({"quote_date": np.repeat(days, 2), "strike": strike, "price": strike * 0.05,
                              "log_moneyness": np.log(strike / 100.0), "tau": np.full(n, 0.25), "r": 0.03,
                              "q": 0.0, "call": np.tile([True, False], len(days)), "S": 100.0,
                              "_window": np.repeat(np.arange(len(days)), 2)})
    windows = np.random.default_rng(0).normal(0, 0.01, (len(days), 3))
    with pytest.raises(F.FeatureError, match=r"^X: the target \(option price / strike\) is constant in the training"):
        ofeat.build(contracts, windows, OptionsConfig(), fcfg(lookback=3), "X")
    contracts["price"] = strike * np.linspace(0.04, 0.06, n)
    assert len(ofeat.build(contracts, windows, OptionsConfig(), fcfg(lookback=3), "X").train) > 0
