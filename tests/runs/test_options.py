"""The options-pricing task: no look-ahead in the return window, `prepare` and `build` (drops, as-of values, splits,
training-only scalers, target and floor), the OptionLSTM's packing and bounded output, no-arbitrage checks and
evaluation, the Black-Scholes baselines, `fincast train` end to end on the synthetic Heston market, the CLI's exit
codes, and the real SPX chain when ../shared/data holds it (never trained on here)."""

from __future__ import annotations

import math
import re
import statistics
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import norm

from fincast import cli
from fincast import config as config_mod
from fincast.config import TrackingConfig
from fincast.features import FeatureError
from fincast.features import options as ofeat
from fincast.models import options as omodel
from fincast.reports.stability import _test_numbers
from fincast.runs import options as options_task

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared" / "data"
SPX_CHAIN = SHARED / "options" / "SPXW_eod_chain_2018-01-02_2018-02-28.csv"
SYNTHETIC_SPEC = ROOT / "pipelines" / "options_synthetic.yaml"
SPX_SPEC = ROOT / "pipelines" / "options_spx.yaml"
N_CONTRACT = 4  # log_moneyness, tau, rate, call; then the floor column; then the window
FLOOR = N_CONTRACT
WIN = N_CONTRACT + 1


# --------------------------------------------------------------------------------------------- helpers


def ref_bs(S, K, tau, r, sigma, call, q=0.0) -> np.ndarray:
    """Textbook Black-Scholes-Merton (scipy's normal cdf), the reference the pricing module is checked against."""
    S, K, tau, r, sigma, call, q = np.broadcast_arrays(*(np.asarray(a, float) for a in (S, K, tau, r, sigma, call, q)))
    d1 = (np.log(S / K) + (r - q + 0.5 * sigma**2) * tau) / (sigma * np.sqrt(tau))
    d2 = d1 - sigma * np.sqrt(tau)
    c = S * np.exp(-q * tau) * norm.cdf(d1) - K * np.exp(-r * tau) * norm.cdf(d2)
    p = K * np.exp(-r * tau) * norm.cdf(-d2) - S * np.exp(-q * tau) * norm.cdf(-d1)
    return np.where(call.astype(bool), c, p)


def lower_bound(S, K, tau, r, q, call) -> float:
    fwd, disc = S * math.exp(-q * tau), K * math.exp(-r * tau)
    return max(fwd - disc, 0.0) if call else max(disc - fwd, 0.0)


def cfg_of(options: dict | None = None, features: dict | None = None, model: dict | None = None):
    return config_mod.from_dict({"task": "options", "options": options or {},
                                 "features": features or {}, "model": model or {}})


def make_close(n: int = 90, seed: int = 0) -> pd.Series:
    rng = np.random.default_rng(seed)
    idx = pd.bdate_range("2021-01-04", periods=n)
    return pd.Series(100 * np.exp(np.cumsum(rng.normal(0.0, 0.012, n))), index=idx, name="close")


def make_chain(dates, close: pd.Series, per_day: int = 3, seed: int = 1, spread: float = 0.15,
               underlying: dict | None = None) -> pd.DataFrame:
    """``per_day`` contracts per quote date, strikes within exp(+-spread) of the close, priced by Black-Scholes at
    20% vol. ``underlying``: quote date -> the chain's own underlying price (else NaN: the close is used)."""
    rng = np.random.default_rng(seed)
    rows = []
    for d in dates:
        d = pd.Timestamp(d)
        s = float(close.asof(d)) if d >= close.index[0] else float(close.iloc[0])
        for j in range(per_day):
            k = round(s * math.exp(rng.uniform(-spread, spread)), 2)
            days = int(rng.integers(7, 120))
            call = j % 2 == 0
            price = float(ref_bs(s, k, days / 365, 0.02, 0.2, call))
            rows.append({"quote_date": d, "expiry": d + pd.Timedelta(days=days), "tau": days / 365, "strike": k,
                         "call": call, "price": price, "contract": f"{d:%Y%m%d}-{j}",
                         "underlying_price": (underlying or {}).get(d, np.nan)})
    df = pd.DataFrame(rows)
    df["quote_date"] = df["quote_date"].astype("datetime64[ns]")
    df["expiry"] = df["expiry"].astype("datetime64[ns]")
    return df


def returns_before(close: pd.Series, d: pd.Timestamp) -> np.ndarray:
    """Log returns of the bars dated strictly before ``d`` (each ends on a bar < d), recomputed by hand."""
    c = close[close.index < d].to_numpy(float)
    return np.array([math.log(c[i] / c[i - 1]) for i in range(1, len(c))])


def by_contract(frame: pd.DataFrame, x: np.ndarray) -> dict[str, np.ndarray]:
    return dict(zip(frame["contract"], x))


# --------------------------------------------------------------------------------------------- 1. no look-ahead


LOOK = 10


def _look_ahead_setup():
    close = make_close(90)
    dates = close.index[25:]
    chain = make_chain(dates, close, per_day=3)
    cfg = cfg_of({"hist_vols": [5], "rate": 0.02}, {"lookback": LOOK, "val_start": str(close.index[55].date()),
                                                    "test_start": str(close.index[70].date())})
    return close, chain, cfg


def _build(chain, close, cfg):
    contracts, windows, _ = ofeat.prepare(chain, close, cfg.options, cfg.features.lookback)
    return contracts, windows, ofeat.build(contracts, windows, cfg.options, cfg.features, "X")


def test_window_is_the_returns_strictly_before_the_quote_date():
    close, chain, cfg = _look_ahead_setup()
    contracts, windows, _ = ofeat.prepare(chain, close, cfg.options, LOOK)
    assert len(contracts) == len(chain)
    for _, c in contracts.iterrows():
        expected = returns_before(close, c["quote_date"])[-LOOK:]
        assert len(expected) == LOOK
        np.testing.assert_allclose(windows[c["_window"]], expected, rtol=1e-12, atol=1e-15)
        # S is the close on the quote date itself (no underlying_price in this chain)
        assert c["S"] == close[c["quote_date"]]
    # one window per quote date
    assert len(windows) == chain["quote_date"].nunique()


@pytest.mark.parametrize("d_pos", [40, 60, 75])  # in train, val, test
def test_closes_after_a_date_do_not_change_what_contracts_up_to_it_see(d_pos):
    close, chain, cfg = _look_ahead_setup()
    D = close.index[d_pos]
    rng = np.random.default_rng(7)
    perturbed = close.copy()
    after = perturbed.index > D
    perturbed[after] *= np.exp(rng.normal(0, 0.05, after.sum()))
    c1, w1, o1 = _build(chain, close, cfg)
    c2, w2, o2 = _build(chain, perturbed, cfg)

    # what prepare attaches is identical for contracts quoted on or before D
    old = c1["quote_date"] <= D
    assert (c2["quote_date"] <= D).equals(old)
    cols = ["S", "log_moneyness", "hv5", "r"]
    pd.testing.assert_frame_equal(c1.loc[old, cols], c2.loc[old, cols], check_exact=True)
    assert np.array_equal(w1[c1.loc[old, "_window"]], w2[c2.loc[old, "_window"]])
    assert not np.array_equal(w1[c1.loc[~old, "_window"]], w2[c2.loc[~old, "_window"]])  # the check can fail

    # the packed rows too, bit for bit, when D is past the training period (the scalers see train rows only)
    if pd.Timestamp(cfg.features.val_start) <= D:
        changed = 0
        for name in ("train", "val", "test"):
            f1, f2 = o1.frames[name], o2.frames[name]
            x1, x2 = by_contract(f1, getattr(o1, name).x), by_contract(f2, getattr(o2, name).x)
            assert x1.keys() == x2.keys()
            for k, q in zip(f1["contract"], f1["quote_date"]):
                if q <= D:
                    assert np.array_equal(x1[k], x2[k]), (name, k)
                else:
                    changed += not np.array_equal(x1[k], x2[k])
        assert changed > 0


def test_the_close_on_the_quote_date_moves_S_but_not_the_window():
    close, chain, cfg = _look_ahead_setup()
    d = close.index[78]  # a test date
    perturbed = close.copy()
    perturbed[d] *= 1.07
    c1, w1, o1 = _build(chain, close, cfg)
    c2, w2, o2 = _build(chain, perturbed, cfg)
    on = (c1["quote_date"] == d).to_numpy()
    assert on.sum() == 3
    assert np.array_equal(w1[c1.loc[on, "_window"]], w2[c2.loc[on, "_window"]])
    np.testing.assert_allclose(c2.loc[on, "S"], 1.07 * c1.loc[on, "S"], rtol=1e-12)
    # the next day's window holds the return ending on d: it moves
    nxt = (c1["quote_date"] == close.index[79]).to_numpy()
    assert not np.array_equal(w1[c1.loc[nxt, "_window"]], w2[c2.loc[nxt, "_window"]])

    t1, t2 = o1.frames["test"], o2.frames["test"]
    m = (t1["quote_date"] == d).to_numpy()
    x1, x2 = o1.test.x[m], o2.test.x[m]
    assert np.array_equal(x1[:, WIN:], x2[:, WIN:])  # the window part of x
    assert not np.array_equal(x1[:, 0], x2[:, 0])  # log-moneyness did move
    assert list(t1.loc[m, "contract"]) == list(t2.loc[m, "contract"])


# --------------------------------------------------------------------------------------------- 2. prepare


@pytest.mark.parametrize("hist_vols, need", [((8,), 8), ((3,), 5)])
def test_prepare_drops_quote_dates_without_enough_returns(hist_vols, need):
    close = make_close(40)
    chain = make_chain(close.index, close, per_day=2)
    cfg = cfg_of({"hist_vols": list(hist_vols)})
    contracts, windows, dropped = ofeat.prepare(chain, close, cfg.options, 5)
    # the bar at position i has i - 1 returns dated before it (returns start at the second bar)
    kept_dates = [d for i, d in enumerate(close.index) if i - 1 >= need]
    assert sorted(contracts["quote_date"].unique()) == list(kept_dates)
    n_short = 2 * (len(close) - len(kept_dates))
    assert dropped == {f"fewer than {need} daily returns of the underlying before the quote date": n_short}
    assert len(contracts) + n_short == len(chain)
    assert windows.shape == (len(kept_dates), 5)


def test_prepare_uses_the_chains_underlying_price_else_the_close():
    close = make_close(40)
    dates = list(close.index[20:30])
    given = {dates[1]: 123.45, dates[4]: 99.5}
    saturday = close.index[33] + pd.Timedelta(days=(5 - close.index[33].weekday()) % 7)
    assert saturday.weekday() == 5 and saturday not in close.index
    given[saturday] = 101.0
    sunday = saturday + pd.Timedelta(days=1)  # no bar, no underlying price: dropped
    chain = make_chain([*dates, saturday, sunday], close, per_day=2, underlying=given)
    cfg = cfg_of({"hist_vols": [5]})
    contracts, windows, dropped = ofeat.prepare(chain, close, cfg.options, 5)
    assert dropped == {"no underlying price on the quote date": 2}
    assert sunday not in set(contracts["quote_date"])
    for _, c in contracts.iterrows():
        d = c["quote_date"]
        expected_s = given.get(d, close.get(d))
        assert c["S"] == expected_s
        assert c["log_moneyness"] == pytest.approx(math.log(c["strike"] / expected_s), rel=1e-12)
        np.testing.assert_allclose(windows[c["_window"]], returns_before(close, d)[-5:], rtol=1e-12)
    # the Saturday quote sees Friday's return as its last one
    sat = contracts[contracts["quote_date"] == saturday].iloc[0]
    friday = saturday - pd.Timedelta(days=1)
    assert windows[sat["_window"]][-1] == pytest.approx(math.log(close[friday] / close.shift(1)[friday]), rel=1e-12)


def test_prepare_hist_vols_are_the_annualised_sample_std_of_the_returns_before():
    close = make_close(60, seed=3)
    chain = make_chain(close.index[25:], close, per_day=2)
    cfg = cfg_of({"hist_vols": [5, 20]})
    contracts, _, _ = ofeat.prepare(chain, close, cfg.options, 10)
    for _, c in contracts.iterrows():
        r = list(returns_before(close, c["quote_date"]))
        for w in (5, 20):
            assert c[f"hv{w}"] == pytest.approx(statistics.stdev(r[-w:]) * math.sqrt(252), rel=1e-10)


def test_prepare_rates_and_vol_index_are_as_of_the_quote_date():
    close = make_close(60)
    chain = make_chain(close.index[20:], close, per_day=2)
    cfg = cfg_of({"hist_vols": [5], "rate": 0.5, "dividend_yield": 0.013})
    rate_dates = close.index[15::7]  # weekly values, some of them on quote dates
    rates = pd.Series(np.linspace(0.01, 0.04, len(rate_dates)), index=rate_dates)
    vix = pd.Series(np.linspace(12.0, 30.0, len(rate_dates)), index=rate_dates)
    shuffled = np.random.default_rng(0).permutation(len(rates))  # given out of order
    contracts, _, _ = ofeat.prepare(chain, close, cfg.options, 5, rates=rates.iloc[shuffled],
                                    vol_index=vix.iloc[shuffled])
    for _, c in contracts.iterrows():
        known = [i for i, t in enumerate(rate_dates) if t <= c["quote_date"]]
        assert c["r"] == rates.iloc[known[-1]]
        assert c["vol_index"] == pytest.approx(vix.iloc[known[-1]] / 100, rel=1e-12)
        assert c["q"] == 0.013
    assert set(contracts["quote_date"]) & set(rate_dates)  # exact dates were exercised

    # without a rate series: options.rate for every contract
    plain, _, _ = ofeat.prepare(chain, close, cfg.options, 5)
    assert (plain["r"] == 0.5).all() and "vol_index" not in plain


def test_prepare_refuses_a_quote_date_before_the_first_rate():
    close = make_close(60)
    chain = make_chain(close.index[20:], close, per_day=2)
    cfg = cfg_of({"hist_vols": [5]})
    rates = pd.Series(0.02, index=close.index[30:])
    with pytest.raises(FeatureError, match=rf"no rate on or before quote date {close.index[20]:%Y-%m-%d} \(20 "):
        ofeat.prepare(chain, close, cfg.options, 5, rates=rates)


def test_prepare_drops_and_counts_contracts_beyond_max_log_moneyness():
    close = make_close(40)
    d = close.index[30]
    s = close[d]
    lms = [-0.4, -0.3, -0.2, 0.0, 0.1, 0.24, 0.26, 0.6]
    chain = pd.DataFrame({"quote_date": [d] * len(lms), "strike": [s * math.exp(m) for m in lms],
                          "call": [True, False] * 4, "tau": 0.1, "price": 1.0,
                          "contract": [str(m) for m in lms]})
    cfg = cfg_of({"hist_vols": [5], "max_log_moneyness": 0.25})
    contracts, _, dropped = ofeat.prepare(chain, close, cfg.options, 5)
    assert dropped == {"|ln(K/S)| > options.max_log_moneyness = 0.25": 4}
    assert list(contracts["contract"]) == ["-0.2", "0.0", "0.1", "0.24"]
    np.testing.assert_allclose(contracts["log_moneyness"], [-0.2, 0.0, 0.1, 0.24], atol=1e-12)


# --------------------------------------------------------------------------------------------- 3. build


def _built(options: dict | None = None, features: dict | None = None, *, n: int = 120, per_day: int = 4,
           mutate=None):
    close = make_close(n, seed=5)
    chain = make_chain(close.index[20:], close, per_day=per_day, seed=9)
    cfg = cfg_of({"hist_vols": [5], "rate": 0.03, "dividend_yield": 0.01, **(options or {})},
                 {"lookback": LOOK, "val_frac": 0.2, "test_frac": 0.2, **(features or {})})
    if mutate is not None:
        chain, close = mutate(chain, close)
    contracts, windows, _ = ofeat.prepare(chain, close, cfg.options, LOOK)
    if cfg.options.target == "iv":
        ivs = np.linspace(0.1, 0.5, len(contracts))
        ivs[::7] = np.nan
        contracts["iv"] = ivs
    return close, contracts, windows, ofeat.build(contracts, windows, cfg.options, cfg.features, "X")


def test_build_splits_are_chronological_by_quote_date():
    _, contracts, _, os_ = _built()
    dates = {name: os_.frames[name]["quote_date"] for name in ("train", "val", "test")}
    assert dates["train"].max() < dates["val"].min() <= dates["val"].max() < dates["test"].min()
    sets = [set(v) for v in dates.values()]
    assert not (sets[0] & sets[1]) and not (sets[1] & sets[2]) and not (sets[0] & sets[2])
    assert set.union(*sets) == set(contracts["quote_date"])
    assert sum(len(getattr(os_, n)) for n in ("train", "val", "test")) == len(contracts)
    assert os_.val_start == dates["val"].min().date() and os_.test_start == dates["test"].min().date()
    for name in ("train", "val", "test"):
        s = getattr(os_, name)
        assert np.array_equal(s.date, os_.frames[name]["quote_date"].to_numpy())
        assert len(s.x) == len(s.y) == len(os_.frames[name])


def test_build_scalers_come_from_training_rows_only():
    close, contracts, windows, os_ = _built()
    tr = os_.frames["train"]
    raw_train = np.column_stack([tr["log_moneyness"], tr["tau"], tr["r"], np.where(tr["call"], 1.0, -1.0)])
    mean, std = raw_train.mean(axis=0), raw_train.std(axis=0)
    std[std < 1e-12] = 1.0  # one rate: a constant column stays 0 after centring
    np.testing.assert_allclose(os_.contract_mean, mean, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(os_.contract_std, std, rtol=1e-12)
    for name in ("train", "val", "test"):
        f = os_.frames[name]
        raw = np.column_stack([f["log_moneyness"], f["tau"], f["r"], np.where(f["call"], 1.0, -1.0)])
        np.testing.assert_allclose(getattr(os_, name).x[:, :N_CONTRACT], (raw - mean) / std, rtol=1e-5, atol=1e-5)

    # the return scale: std of the training quote dates' windows (each date once), recomputed from the closes
    train_windows = np.stack([returns_before(close, d)[-LOOK:] for d in sorted(tr["quote_date"].unique())])
    assert os_.return_scale == pytest.approx(float(np.std(train_windows)), rel=1e-10)
    # window part: time-major (ret, |ret|) / return_scale
    for name in ("train", "test"):
        f, x = os_.frames[name], getattr(os_, name).x
        w = np.stack([returns_before(close, d)[-LOOK:] for d in f["quote_date"]])
        assert x.shape[1] == WIN + 2 * LOOK
        np.testing.assert_allclose(x[:, WIN::2] * os_.return_scale, w, rtol=1e-5, atol=1e-8)
        np.testing.assert_allclose(x[:, WIN + 1::2] * os_.return_scale, np.abs(w), rtol=1e-5, atol=1e-8)

    # changing test-period data moves none of the training statistics
    test_start = pd.Timestamp(os_.test_start)

    def mutate(chain, cl):
        chain = chain.copy()
        later = chain["quote_date"] >= test_start
        chain.loc[later, "price"] *= 3.0
        chain.loc[later, "strike"] *= 1.1
        cl = cl.copy()
        cl[cl.index >= test_start] *= 1.3
        return chain, cl

    _, _, _, os2 = _built(mutate=mutate)
    assert os2.test_start == os_.test_start and os2.val_start == os_.val_start
    assert np.array_equal(os2.contract_mean, os_.contract_mean) and np.array_equal(os2.contract_std, os_.contract_std)
    assert os2.return_scale == os_.return_scale and os2.target_scale == os_.target_scale
    assert np.array_equal(os2.train.x, os_.train.x) and np.array_equal(os2.train.y, os_.train.y)
    assert not np.allclose(os2.test.y, os_.test.y)  # the test targets did change


@pytest.mark.parametrize("scale_target", [True, False])
def test_build_price_target_and_floor(scale_target):
    _, _, _, os_ = _built(features={"scale_target": scale_target})
    assert os_.target == "price"
    y_train = os_.frames["train"]["price"] / os_.frames["train"]["strike"]
    tscale = float(np.std(y_train)) if scale_target else 1.0
    assert os_.target_scale == pytest.approx(tscale, rel=1e-12)
    n_itm = 0
    for name in ("train", "val", "test"):
        f, s = os_.frames[name], getattr(os_, name)
        y_raw = (f["price"] / f["strike"]).to_numpy()
        np.testing.assert_allclose(s.y_raw, y_raw, rtol=1e-14)
        np.testing.assert_allclose(s.y, y_raw / tscale, rtol=1e-6)
        floor = np.array([lower_bound(c.S, c.strike, c.tau, c.r, c.q, c.call) / c.strike / tscale
                          for c in f.itertuples()])
        np.testing.assert_allclose(s.x[:, FLOOR], floor, rtol=1e-6, atol=1e-9)
        n_itm += int((floor > 0).sum())
    assert n_itm > 10  # some floors are not 0 (in-the-money forwards)
    assert 0.0 < os_.frames["train"]["q"].iloc[0] == 0.01  # the dividend yield entered the bound


def test_build_iv_target_drops_contracts_without_one_and_floors_at_zero():
    _, contracts, _, os_ = _built({"target": "iv"})
    ok = np.isfinite(contracts["iv"])
    assert sum(len(getattr(os_, n)) for n in ("train", "val", "test")) == int(ok.sum()) < len(contracts)
    assert os_.target == "iv"
    assert os_.target_scale == pytest.approx(float(np.std(os_.frames["train"]["iv"])), rel=1e-12)
    for name in ("train", "val", "test"):
        f, s = os_.frames[name], getattr(os_, name)
        np.testing.assert_array_equal(s.y_raw, f["iv"].to_numpy())
        assert np.isfinite(s.y_raw).all()
        assert (s.x[:, FLOOR] == 0).all()


def test_build_without_abs_returns_has_one_channel():
    close, _, _, os_ = _built({"abs_returns": False})
    assert os_.channels == 1 and os_.names == ["log_moneyness", "tau", "rate", "call", "ret"]
    assert os_.train.x.shape[1] == WIN + LOOK
    f = os_.frames["val"]
    w = np.stack([returns_before(close, d)[-LOOK:] for d in f["quote_date"]])
    np.testing.assert_allclose(os_.val.x[:, WIN:] * os_.return_scale, w, rtol=1e-5, atol=1e-8)


def test_build_needs_three_quote_dates():
    close = make_close(40)
    chain = make_chain(close.index[30:32], close, per_day=5)
    cfg = cfg_of({"hist_vols": [5]}, {"lookback": 5})
    contracts, windows, _ = ofeat.prepare(chain, close, cfg.options, 5)
    with pytest.raises(FeatureError, match=r"only 2 quote date\(s\)"):
        ofeat.build(contracts, windows, cfg.options, cfg.features, "X")


# --------------------------------------------------------------------------------------------- 4. OptionLSTM


def _model(bounded: bool, seed: int = 0, lookback: int = 6, channels: int = 2) -> omodel.OptionLSTM:
    torch.manual_seed(seed)
    return omodel.OptionLSTM(N_CONTRACT, lookback, channels, hidden_size=8, head_hidden=16, head_layers=2,
                             bounded=bounded).eval()


def _x(batch: int = 64, lookback: int = 6, channels: int = 2, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, WIN + lookback * channels, generator=g)
    x[:, FLOOR] = torch.rand(batch, generator=g) * 2  # floors in [0, 2)
    return x


def test_bounded_output_is_floor_plus_softplus_and_never_below_the_floor():
    bounded, plain = _model(True), _model(False)
    plain.load_state_dict(bounded.state_dict())
    x = _x()
    with torch.no_grad():
        z = plain(x).double().numpy()
        out = bounded(x).double().numpy()
    floor = x[:, FLOOR].double().numpy()
    np.testing.assert_allclose(out, floor + np.logaddexp(0.0, z), rtol=1e-5, atol=1e-6)
    assert (out >= floor).all()
    # huge negative (and huge positive) head outputs
    for bias in (-1e4, -50.0, 1e3):
        with torch.no_grad():
            bounded.head.bias.fill_(bias)
            out = bounded(x).numpy()
        assert np.isfinite(out).all() and (out >= x[:, FLOOR].numpy()).all()
        if bias < 0:
            np.testing.assert_allclose(out, x[:, FLOOR].numpy(), atol=1e-6)


def test_unbounded_output_is_the_heads_linear_output_and_ignores_the_floor():
    model = _model(False)
    x = _x()
    x2 = x.clone()
    x2[:, FLOOR] += 5.0
    with torch.no_grad():
        out, out2 = model(x), model(x2)
        state = model.lstm(x[:, WIN:].reshape(len(x), 6, 2))[0][:, -1]
        expected = model.head(model.mlp(torch.cat([state, x[:, :N_CONTRACT]], dim=1))).squeeze(-1)
    assert torch.equal(out, out2)
    torch.testing.assert_close(out, expected)
    assert (out < 0).any()  # not floored
    bounded = _model(False)
    bounded.bounded = True
    with torch.no_grad():
        torch.testing.assert_close(bounded(x2) - bounded(x), torch.full((len(x),), 5.0), rtol=0, atol=1e-5)


def test_the_window_is_read_time_major_with_channels_side_by_side():
    L, C = 7, 2
    model = _model(False, lookback=L, channels=C)
    g = torch.Generator().manual_seed(3)
    seq = torch.randn(16, L, C, generator=g)  # (batch, time, channel)
    contract = torch.randn(16, N_CONTRACT, generator=g)
    x = torch.zeros(16, WIN + L * C)
    x[:, :N_CONTRACT] = contract
    for t in range(L):  # r_1, |r_1|, r_2, |r_2|, ...
        for c in range(C):
            x[:, WIN + t * C + c] = seq[:, t, c]
    with torch.no_grad():
        state = model.lstm(seq)[0][:, -1]
        expected = model.head(model.mlp(torch.cat([state, contract], dim=1))).squeeze(-1)
        out = model(x)
        channel_major = x.clone()
        for c in range(C):
            for t in range(L):
                channel_major[:, WIN + c * L + t] = seq[:, t, c]
        wrong = model(channel_major)
        last_step = x.clone()
        last_step[:, WIN + (L - 1) * C] += 1.0  # the last day's return
        moved = model(last_step)
    torch.testing.assert_close(out, expected)
    assert not torch.allclose(wrong, expected)
    assert not torch.allclose(moved, out)


def test_build_option_model_follows_the_model_config():
    mc = cfg_of(model={"hidden_size": 5, "head_hidden": 11, "head_layers": 3, "bounded_output": False}).model
    model = omodel.build_option_model(mc, N_CONTRACT, 9, 2)
    linears = [m for m in model.mlp if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(5 + N_CONTRACT, 11), (11, 11), (11, 11)]
    assert model.head.in_features == 11 and model.lstm.hidden_size == 5 and model.lstm.input_size == 2
    assert model.bounded is False and model.lookback == 9
    assert omodel.build_option_model(cfg_of().model, N_CONTRACT, 9, 2).bounded is True


# --------------------------------------------------------------------------------------------- 5. violations, evaluate


Q1, Q2 = pd.Timestamp("2021-03-01"), pd.Timestamp("2021-03-02")
S0, R0, DIV = 100.0, 0.05, 0.01


def _contract(qd, days, strike, call, price=None, sigma=0.2):
    tau = days / 365
    if price is None:
        price = float(ref_bs(S0, strike, tau, R0, sigma, call, DIV))
    return {"quote_date": qd, "expiry": qd + pd.Timedelta(days=days), "tau": tau, "strike": float(strike),
            "call": call, "S": S0, "r": R0, "q": DIV, "price": price}


def _violation_chain() -> tuple[pd.DataFrame, dict[str, set[int]]]:
    bs = lambda days, k, call: float(ref_bs(S0, k, days / 365, R0, 0.2, call, DIV))  # noqa: E731
    rows = [
        _contract(Q1, 10, 80, True, lower_bound(S0, 80, 10 / 365, R0, DIV, True) - 0.5),  # 0: below the bound
        _contract(Q1, 20, 120, False, 120 * math.exp(-R0 * 20 / 365) + 0.5),  # 1: put above K e^{-r tau}
        _contract(Q1, 20, 100, True),  # 2: a call of the same expiry: not compared with the put
        _contract(Q1, 30, 90, True),  # 3..7: calls of one expiry; 110 dearer than 100: row 6 flagged
        _contract(Q1, 30, 95, True, bs(30, 90, True)),  # 4: flat in strike: allowed
        _contract(Q1, 30, 100, True),  # 5
        _contract(Q1, 30, 110, True, bs(30, 100, True) + 1.0),  # 6
        _contract(Q1, 30, 120, True),  # 7
        _contract(Q1, 30, 90, False), _contract(Q1, 30, 100, False), _contract(Q1, 30, 110, False),  # 8..10: fine
        _contract(Q1, 45, 90, False), _contract(Q1, 45, 100, False),  # 11, 12
        _contract(Q1, 45, 101, False, bs(45, 100, False) - 0.5),  # 13: put cheaper than the lower strike's
        _contract(Q2, 30, 130, True, bs(30, 90, True)),  # 14: another quote date: not compared with row 7
        _contract(Q1, 60, 50, True, lower_bound(S0, 50, 60 / 365, R0, DIV, True)),  # 15: exactly on the bound
        _contract(Q1, 60, 150, False, 150 * math.exp(-R0 * 60 / 365)),  # 16: exactly on the upper bound
    ]
    return pd.DataFrame(rows), {"below": {0}, "above": {1}, "monotone": {6, 13}}


def test_violations_flag_exactly_the_broken_contracts_in_any_row_order():
    chain, expected = _violation_chain()
    v = omodel.violations(chain["price"].to_numpy(), chain)
    for key in ("below", "above", "monotone"):
        assert set(np.flatnonzero(v[key])) == expected[key], key
    perm = np.random.default_rng(0).permutation(len(chain))
    shuffled = chain.iloc[perm].reset_index(drop=True)
    v2 = omodel.violations(shuffled["price"].to_numpy(), shuffled)
    for key in ("below", "above", "monotone"):
        assert set(perm[np.flatnonzero(v2[key])]) == expected[key], key


def _eval_chain() -> pd.DataFrame:
    rows = []
    for days in (10, 14, 20, 45, 200):
        for k in (89, 90, 95, 97, 100, 103, 110, 112):
            for call in (True, False):
                rows.append(_contract(Q1, days, k, call))
    return pd.DataFrame(rows)


def _hand_bucket(kS: float, days: int) -> tuple[str, str]:
    if kS < 0.9:
        m = "<0.9"
    elif kS < 0.97:
        m = "0.9-0.97"
    elif kS < 1.03:
        m = "0.97-1.03"
    elif kS < 1.1:
        m = "1.03-1.1"
    else:
        m = ">=1.1"
    if days < 14:
        t = "<14d"
    elif days < 30:
        t = "14d-30d"
    elif days < 60:
        t = "30d-60d"
    elif days < 120:
        t = "60d-120d"
    else:
        t = ">=120d"
    return m, t


def test_evaluate_errors_violations_and_buckets():
    c = _eval_chain()
    market = c["price"].to_numpy()
    shift = np.where(np.arange(len(c)) % 2 == 0, 0.1, -0.3)
    vol25 = ref_bs(c["S"], c["strike"], c["tau"], c["r"], 0.25, c["call"], c["q"])
    ev = omodel.evaluate(c, {"perfect": market.copy(), "shifted": market + shift, "vol25": vol25})
    s = ev.stats
    assert list(s.index) == ["perfect", "shifted", "vol25"] and list(s.columns) == omodel.STATS
    assert (s["Contracts"] == len(c)).all()

    p = s.loc["perfect"]
    assert p["Price RMSE"] == 0 and p["Price MAE"] == 0 and p["Any violation [%]"] == 0
    assert p["IV RMSE [vol pts]"] == pytest.approx(0, abs=1e-6) and p["IV defined [%]"] == 100

    sh = s.loc["shifted"]
    assert sh["Price RMSE"] == pytest.approx(math.sqrt(sum(e * e for e in shift) / len(c)), rel=1e-12)
    assert sh["Price MAE"] == pytest.approx(sum(abs(e) for e in shift) / len(c), rel=1e-12)
    rms = math.sqrt(sum(m * m for m in market) / len(c))
    assert sh["Price RMSE / market RMS [%]"] == pytest.approx(100 * sh["Price RMSE"] / rms, rel=1e-12)
    # a 5-vol-point error everywhere
    assert s.loc["vol25", "IV RMSE [vol pts]"] == pytest.approx(5.0, abs=1e-5)
    assert s.loc["vol25", "IV MAE [vol pts]"] == pytest.approx(5.0, abs=1e-5)
    assert s.loc["vol25", "Any violation [%]"] == 0

    # every contract in exactly one bucket, labelled by hand (edges belong to the bucket above)
    labels = [_hand_bucket(k / S0, (e - q).days) for k, e, q in zip(c["strike"], c["expiry"], c["quote_date"])]
    counts: dict[tuple[str, str], int] = {}
    for lab in labels:
        counts[lab] = counts.get(lab, 0) + 1
    for name in ("perfect", "shifted", "vol25"):
        b = ev.buckets[ev.buckets["model"] == name]
        got = {(m, t): n for m, t, n in zip(b["moneyness"], b["maturity"], b["contracts"])}
        assert got == counts
        assert b["contracts"].sum() == len(c)
    b = ev.buckets[ev.buckets["model"] == "shifted"].set_index(["moneyness", "maturity"])
    for lab in counts:
        errs = [shift[i] for i, lb in enumerate(labels) if lb == lab]
        assert b.loc[lab, "price_rmse"] == pytest.approx(math.sqrt(sum(e * e for e in errs) / len(errs)), rel=1e-12)
        assert b.loc[lab, "price_mae"] == pytest.approx(sum(abs(e) for e in errs) / len(errs), rel=1e-12)


def test_evaluate_counts_violations_like_the_hand_flags():
    chain, expected = _violation_chain()
    ev = omodel.evaluate(chain, {"m": chain["price"].to_numpy()})
    n = len(chain)
    row = ev.stats.loc["m"]
    assert row["Below lower bound [%]"] == pytest.approx(100 * len(expected["below"]) / n)
    assert row["Above upper bound [%]"] == pytest.approx(100 * len(expected["above"]) / n)
    assert row["Non-monotone in strike [%]"] == pytest.approx(100 * len(expected["monotone"]) / n)
    assert row["Any violation [%]"] == pytest.approx(100 * 4 / n)


# --------------------------------------------------------------------------------------------- 6. pipeline helpers


def _frame_for_baselines() -> pd.DataFrame:
    c = _eval_chain()
    rng = np.random.default_rng(2)
    c["hv10"] = rng.uniform(0.1, 0.4, len(c))
    c["hv20"] = rng.uniform(0.1, 0.4, len(c))
    return c


def test_baseline_prices_are_black_scholes_with_each_vol():
    c = _frame_for_baselines()
    out = options_task.baseline_prices(c, (10, 20))
    assert set(out) == {"bs_hv10", "bs_hv20"}
    for w in (10, 20):
        np.testing.assert_allclose(out[f"bs_hv{w}"], ref_bs(c["S"], c["strike"], c["tau"], c["r"], c[f"hv{w}"],
                                                           c["call"], c["q"]), rtol=1e-9, atol=1e-12)
    c["true_price"] = np.arange(len(c), dtype=float)
    c["vol_index"] = 0.3
    out = options_task.baseline_prices(c, (20,))
    assert set(out) == {"bs_hv20", "true_model", "bs_vol_index"}
    np.testing.assert_array_equal(out["true_model"], np.arange(len(c), dtype=float))
    np.testing.assert_allclose(out["bs_vol_index"], ref_bs(c["S"], c["strike"], c["tau"], c["r"], 0.3, c["call"],
                                                           c["q"]), rtol=1e-9, atol=1e-12)


def test_to_prices_multiplies_by_strike_or_reprices_the_vol():
    c = _frame_for_baselines()
    raw = np.linspace(0.01, 0.2, len(c))
    np.testing.assert_allclose(options_task.to_prices(raw, c, "price"), raw * c["strike"], rtol=1e-15)
    vols = np.linspace(0.1, 0.6, len(c))
    np.testing.assert_allclose(options_task.to_prices(vols, c, "iv"),
                               ref_bs(c["S"], c["strike"], c["tau"], c["r"], vols, c["call"], c["q"]),
                               rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("target", ["price", "iv"])
def test_pipeline_prepare_on_a_small_heston_market_round_trips_the_target(target):
    cfg = config_mod.from_dict({"task": "options", "options": {
        "source": "synthetic", "target": target, "hist_vols": [5, 10],
        "heston": {"days": 120, "contracts_per_day": 10}}, "features": {"lookback": 10}})
    market = options_task.load(cfg)
    assert len(market.close) == 121 and market.chain["quote_date"].nunique() == 120
    os_, contracts, dropped = options_task.align(cfg, market)
    # days 1..10 have fewer than 10 returns before them
    assert dropped == {"fewer than 10 daily returns of the underlying before the quote date": 100}
    assert (contracts["r"] == cfg.options.heston.rate).all() and (contracts["q"] == 0).all()
    assert np.isfinite(contracts["iv"]).mean() > 0.95
    f = os_.frames["test"]
    back = options_task.to_prices(os_.test.y_raw, f, target)
    np.testing.assert_allclose(back, f["price"], rtol=1e-7, atol=1e-9)
    assert set(options_task.baseline_prices(f, (5, 10))) == {"bs_hv5", "bs_hv10", "true_model"}


def test_stability_report_reads_option_metrics_for_options_runs():
    metrics = {"test/price_rmse": 1.5, "baseline_bs_hv60/price_rmse": 3.0, "baseline_bs_hv20/price_rmse": 2.0,
               "baseline_bs_hv5/price_rmse": 2.5, "baseline_true_model/price_rmse": 0.0,
               "test/iv_rmse_vol_pts": 4.0, "test/any_violation_pct": 1.25, "test/rmse": 99.0}
    run = SimpleNamespace(data=SimpleNamespace(params={"task": "options"}, metrics=metrics))
    got = _test_numbers(run)
    assert got == {"task": "options", "test_rmse": 1.5, "naive_rmse": 2.5, "ridge_rmse": 0.0, "test_dir_acc": 4.0,
                   "test_violation_pct": 1.25}  # naive = the shortest window (5 days, not "hv20" < "hv5")
    forecast = SimpleNamespace(data=SimpleNamespace(params={"task": "forecast"}, metrics=metrics))
    assert _test_numbers(forecast)["task"] == "forecast" and _test_numbers(forecast)["test_rmse"] == 99.0


# --------------------------------------------------------------------------------------------- 7. end to end


E2E = ("options.heston.days=260", "options.heston.contracts_per_day=20", "features.lookback=20",
       "options.hist_vols=[10,20]", "train.epochs=2", "tracking.log_model=false")
FILES = {"stats.csv", "buckets.csv", "predictions.csv", "bucket_errors.png", "predicted_vs_market.png",
         "training_curves.png", "config.yaml"}


def test_train_options_end_to_end(tmp_path, monkeypatch, capsys):
    from fincast import tracking

    monkeypatch.chdir(tmp_path)
    store = (f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", f"tracking.artifact_dir={tmp_path / 'art'}")
    overrides = [*E2E, *store]
    code = cli.main(["train", str(SYNTHETIC_SPEC), "--quiet", *[f"--set={o}" for o in overrides]])
    out, err = capsys.readouterr()
    assert code == 0, err
    first = out.strip().splitlines()[0]
    assert first.startswith("run "), out
    run_id = first.split()[1]
    steps = int(re.search(r"(\d+) steps, 2 epochs", out).group(1))

    report = tmp_path / "reports" / "options" / "options_synthetic"
    assert {p.name for p in report.iterdir()} >= FILES
    stats = pd.read_csv(report / "stats.csv", index_col="model")
    assert list(stats.index) == ["lstm", "bs_hv10", "bs_hv20", "true_model"]
    # the summary names each model with its price RMSE
    for model, label in [("lstm", "LSTM"), ("bs_hv10", "BS hist vol 10"), ("bs_hv20", "BS hist vol 20"),
                         ("true_model", "true model")]:
        line = next(ln for ln in out.splitlines() if ln.strip().startswith(label + " "))
        assert f"{stats.loc[model, 'Price RMSE']:.4f}" in line, line

    # predictions.csv: the numbers behind stats.csv
    pred = pd.read_csv(report / "predictions.csv", parse_dates=["quote_date", "expiry"])
    assert len(pred) == stats.loc["lstm", "Contracts"]
    assert stats.loc["true_model", "Price RMSE"] == 0
    for model in ("lstm", "bs_hv10", "bs_hv20"):
        rmse = math.sqrt(((pred[f"{model}_price"] - pred["market_price"]) ** 2).mean())
        assert stats.loc[model, "Price RMSE"] == pytest.approx(rmse, rel=1e-9)
    assert stats.loc["lstm", "Below lower bound [%]"] == 0  # the bounded output
    lower = np.maximum(np.where(pred["call"], pred["S"] * np.exp(-pred["q"] * pred["tau"])
                                - pred["strike"] * np.exp(-pred["r"] * pred["tau"]),
                                pred["strike"] * np.exp(-pred["r"] * pred["tau"])
                                - pred["S"] * np.exp(-pred["q"] * pred["tau"])), 0)
    assert (pred["lstm_price"] >= lower - 1e-6 * pred["strike"]).all()

    cfg_t = TrackingConfig(uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = tracking.get_run(run_id, cfg_t)
    assert run.info.status == "FINISHED"
    params, m = run.data.params, run.data.metrics
    assert params["task"] == "options" and params["options.source"] == "synthetic"
    assert pred["quote_date"].min() >= pd.Timestamp(params["split.test_start"])
    assert int(params["samples.test"]) == len(pred)
    for key in ("test/price_rmse", "test/price_mae", "test/iv_rmse_vol_pts", "test/any_violation_pct",
                "baseline_bs_hv10/price_rmse", "baseline_bs_hv20/price_rmse", "baseline_true_model/price_rmse",
                "baseline_naive/val_loss", "best_val_loss", "time/step_ms"):
        assert key in m, key
    assert m["test/price_rmse"] == pytest.approx(stats.loc["lstm", "Price RMSE"], rel=1e-9)
    assert m["baseline_bs_hv10/price_rmse"] == pytest.approx(stats.loc["bs_hv10", "Price RMSE"], rel=1e-9)
    assert m["baseline_true_model/price_rmse"] == 0

    # the zero forecast's validation loss: mean squared (scaled) validation target, rebuilt independently
    cfg = config_mod.load(SYNTHETIC_SPEC, overrides)
    os_, _, _ = options_task.align(cfg, options_task.load(cfg))
    assert m["baseline_naive/val_loss"] == pytest.approx(float(np.mean(os_.val.y.astype(np.float64) ** 2)), rel=1e-6)
    assert len(os_.test) == len(pred)
    # the baselines without a model (what a study records once on its parent) are what the run logged
    market = options_task.load(cfg)
    base = dict(options_task.baselines(cfg, market, options_task.prepare(cfg, market)))
    assert any(k.startswith("baseline_bs_hv") for k in base) and "baseline_true_model/price_rmse" in base
    for key, value in base.items():
        assert m[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key

    # per-step training series: every step in the run's series file, MLflow's at its cadence (each epoch's end)
    series = pd.read_parquet(tracking.download_artifact(cfg_t.uri, run_id, "series.parquet", tmp_path / "dl"))
    assert list(series["step"]) == list(range(1, steps + 1))
    ends = list(series.loc[series["validated"], "step"])
    assert len(ends) == 2 and ends[-1] == steps
    for key in ("train/loss", "grad/norm_pre", "grad/norm_post"):
        hist = tracking.metric_history(run_id, key, cfg_t)
        assert [s for s, _ in hist] == sorted({s for s in range(1, steps + 1) if s % 10 == 0} | set(ends)), key
    assert len(tracking.metric_history(run_id, "val/loss", cfg_t)) == 2

    arts = set(tracking.list_artifacts(run_id, cfg_t))
    assert arts >= FILES | {"seeds.csv"}

    # the seed spread (options.seeds = 3 by default): seeds 1 and 2 trained beside the run, each scored like it
    seeds = pd.read_csv(report / "seeds.csv")
    assert list(seeds["seed"]) == [0, 1, 2]
    assert seeds.loc[0, "lstm_rmse"] == pytest.approx(stats.loc["lstm", "Price RMSE"], rel=1e-9)
    rmse = {s: math.sqrt(((pred[f"lstm_seed{s}_price"] - pred["market_price"]) ** 2).mean()) for s in (1, 2)}
    assert list(seeds["lstm_rmse"].iloc[1:]) == pytest.approx([rmse[1], rmse[2]], rel=1e-9)
    assert len({round(v, 9) for v in seeds["lstm_rmse"]}) == 3  # three different models
    best = (seeds["lstm_rmse"] / stats.loc[seeds["best_baseline"], "Price RMSE"].to_numpy() - 1) * 100
    assert list(seeds["lstm_vs_best_pct"]) == pytest.approx(list(best), rel=1e-9)  # all priced every contract
    assert m["test/seeds/price_rmse_median"] == pytest.approx(float(np.median(seeds["lstm_rmse"])), rel=1e-9)
    assert m["test/seeds/price_rmse_max"] == pytest.approx(float(seeds["lstm_rmse"].max()), rel=1e-9)
    assert "Across 3 training seeds (0, 1, 2): LSTM price RMSE median" in out

    # the stability report's numbers for this run
    nums = _test_numbers(run)
    assert nums["task"] == "options" and nums["naive_rmse"] == m["baseline_bs_hv10/price_rmse"]

    # the HTML report: the verdict first, against the best baseline (the true model is not one)
    assert "for the best baseline, BS hist vol" in out
    page_html = (report / "index.html").read_text()
    assert page_html.index("id='verdict'") < page_html.index("Test prices, every model")
    assert "<h3>Across training seeds</h3>" in page_html and page_html.count("<tr><td>") >= 3
    assert "report/index.html" in arts or "index.html" in {a.split("/")[-1] for a in arts}
    from browser import check_page, find_chromium

    if find_chromium() is None:
        pytest.skip("Chromium not installed: the report was not opened in a browser")
    page = check_page(report / "index.html")
    assert page.images == 3 and page.images_loaded == 3 and page.console_errors == []
    assert page.verdict_first, (page.headings, page.verdict_top)


# --------------------------------------------------------------------------------------------- 8. CLI exit codes


def test_train_skip_missing_data_and_missing_chain(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    store = f"--set=tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"
    code = cli.main(["train", str(SPX_SPEC), "--quiet", "--skip-missing-data", "--set", "options.path=/nonexistent.csv",
                     store])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.startswith("skipped") and "options.path /nonexistent.csv" in out

    # without the flag: exit 2 naming the file (underlying from the synthetic source, so the chain is what fails)
    code = cli.main(["train", str(SPX_SPEC), "--quiet", "--set", "options.path=/nonexistent.csv",
                     "--set", "data.source=synthetic", store])
    out, err = capsys.readouterr()
    assert code == 2
    assert "/nonexistent.csv" in err and "Traceback" not in err
    assert not (tmp_path / "reports").exists()


def test_backtest_refuses_an_options_spec(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = cli.main(["backtest", str(SYNTHETIC_SPEC), "--quiet"])
    _, err = capsys.readouterr()
    assert code == 2 and "task = options" in err


def test_data_command_on_the_synthetic_options_spec(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = cli.main(["data", str(SYNTHETIC_SPEC), "--set", "options.heston.days=100",
                     "--set", "options.heston.contracts_per_day=5"])
    out, err = capsys.readouterr()
    assert code == 0, err
    # 101 closes (day 0 and 100 days), a chain on each of the 100 later days, 5 contracts each
    assert "synthetic Heston market: 101 days, 500 contracts over 100 quote dates" in out


# --------------------------------------------------------------------------------------------- 9. real SPX chain


@pytest.mark.skipif(not SPX_CHAIN.exists() or not (SHARED / "equities" / "GSPC.csv").exists(),
                    reason="../shared/data (SPXW chain, GSPC) not available")
def test_real_spx_chain_aligns_with_the_index():
    cfg = config_mod.load(SPX_SPEC, [f"data.path={SHARED / 'equities'}", f"options.path={SPX_CHAIN}",
                                     f"options.aux_path={SHARED / 'rates_vol'}"])
    market = options_task.load(cfg)
    os_, contracts, dropped = options_task.align(cfg, market)
    close_on = market.close.reindex(pd.DatetimeIndex(contracts["quote_date"])).to_numpy()
    assert np.isfinite(close_on).all()
    assert (np.abs(contracts["S"].to_numpy() / close_on - 1) < 0.01).all()
    # the market's implied vol: defined for every out-of-the-money contract; in-the-money mids of this file often
    # sit below the discounted intrinsic value (about 11% of all contracts have no Black-Scholes vol)
    iv_ok = np.isfinite(contracts["iv"].to_numpy())
    otm = np.where(contracts["call"], contracts["strike"] > contracts["S"], contracts["strike"] < contracts["S"])
    assert iv_ok[otm].all()
    assert iv_ok.mean() > 0.85
    assert (np.abs(contracts["log_moneyness"]) <= 0.25).all()
    assert 0.005 < contracts["r"].min() <= contracts["r"].max() < 0.03  # ^IRX / 100, early 2018
    assert contracts["vol_index"].min() > 0.08 and contracts["vol_index"].max() < 0.5  # ^VIX / 100
    tr, va, te = (os_.frames[n]["quote_date"] for n in ("train", "val", "test"))
    assert tr.max() < va.min() <= va.max() < te.min()
    assert len(tr) and len(va) and len(te)


def test_a_study_run_keeps_its_tables_to_itself(tmp_path, monkeypatch):
    """Runs of a study (no figures) write their tables into their own artifact folder, not the shared
    reports/options/<name>/ that concurrent workers would overwrite under each other."""
    monkeypatch.chdir(tmp_path)
    cfg = config_mod.load(SYNTHETIC_SPEC, [*E2E, f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
                                           f"tracking.artifact_dir={tmp_path / 'art'}"])
    market = options_task.load(cfg)
    splits = options_task.prepare(cfg, market)
    model = options_task.build_model(cfg, splits)
    from fincast.training import FitResult

    result = FitResult(steps=0, epochs=0, stop_reason="epochs", best_val_loss=math.nan, best_epoch=0, step_ms=0.0,
                       history={"loss": [], "norm_pre": [], "norm_post": []})
    own = tmp_path / "run_artifacts"
    own.mkdir()
    done = options_task.finish(cfg, market, splits, model, torch.device("cpu"), result, "r", own,
                               draw_figures=False)
    assert {f.parent for f in done.files} == {own} and (own / "predictions.csv").is_file()
    assert not (tmp_path / "reports").exists()
    assert not list(own.glob("*.png"))
