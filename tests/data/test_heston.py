"""The Heston market (fincast.data.heston): formula, simulation, Monte Carlo and the generated chain."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pandas as pd
import pytest
from scipy import integrate

from fincast.config import HestonConfig
from fincast.data import heston
from fincast.models import pricing

MODEL = dict(kappa=2.0, theta=0.04, xi=0.5, rho=-0.7)


def _reference_price(S, K, tau, r, v, call, *, kappa, theta, xi, rho):
    """An independent high-precision reference: Lewis's (2000) single integral on the contour Im u = -1/2,

        C = S - sqrt(S K) e^{-r tau / 2} / pi int_0^inf Re[e^{i u ln(S e^{r tau} / K)} phi(u - i/2)] / (u^2 + 1/4) du,

    phi the characteristic function of ln(S_tau / F), written out plainly here (Albrecher et al.'s form, no
    rearrangements), integrated by adaptive quadrature panel by panel on the scale of the variance."""

    def phi(u):
        b = kappa - 1j * rho * xi * u
        d = np.sqrt(b * b + xi * xi * (1j * u + u * u))
        g = (b - d) / (b + d)
        e = np.exp(-d * tau)
        c = kappa * theta / xi**2 * ((b - d) * tau - 2 * np.log((1 - g * e) / (1 - g)))
        return np.exp(c + v / xi**2 * (b - d) * (1 - e) / (1 - g * e))

    x = np.log(S / K) + r * tau
    w = theta * tau + (v - theta) * (1 - np.exp(-kappa * tau)) / kappa
    s = 1 / np.sqrt(w)
    edges = [0, 0.5 * s, s, 2 * s, 4 * s, 8 * s, 16 * s, 64 * s, 256 * s, np.inf]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quad's warnings on the far tail, which is ~0
        total = sum(integrate.quad(lambda u: (np.exp(1j * u * x) * phi(u - 0.5j)).real / (u * u + 0.25), a, b,
                                   limit=2000, epsabs=1e-15, epsrel=1e-12)[0] for a, b in zip(edges[:-1], edges[1:]))
    c = S - np.sqrt(S * K) * np.exp(-r * tau / 2) / np.pi * total
    return c if call else c - S + K * np.exp(-r * tau)


def test_published_reference_values():
    """Fang & Oosterlee (2008, the COS method), Heston test case: S = K = 100, r = 0, v0 = 0.0175,
    kappa = 1.5768, theta = 0.0398, xi = 0.5751, rho = -0.5711; calls at T = 1 and T = 10."""
    p = dict(kappa=1.5768, theta=0.0398, xi=0.5751, rho=-0.5711)
    assert float(heston.heston_price(100, 100, 1.0, 0.0, 0.0175, True, **p)) == pytest.approx(5.785155450, abs=1e-7)
    assert float(heston.heston_price(100, 100, 10.0, 0.0, 0.0175, True, **p)) == pytest.approx(22.318945791, abs=1e-7)


def test_matches_quadrature_reference_incl_short_maturity_and_low_variance():
    rng = np.random.default_rng(0)
    rows = [(tau, v, m, call) for tau in (2 / 252, 5 / 252, 0.25, 2.0) for v in (0.005, 0.04, 0.5)
            for m in (0.6, 0.9, 1.0, 1.12, 1.5) for call in (rng.random() < 0.5,)]
    tau, v, m, call = (np.array(c) for c in zip(*rows))
    model = dict(kappa=3.0, theta=0.04, xi=0.6, rho=-0.7)
    got = heston.heston_price(100.0, 100.0 * m, tau, 0.02, v, call.astype(bool), **model)
    ref = np.array([_reference_price(100.0, 100.0 * mi, ti, 0.02, vi, bool(ci), **model)
                    for ti, vi, mi, ci in rows])
    err = np.abs(got - ref)
    assert np.all((err < 1e-4 * ref) | (err < 1e-6 * 100.0)), np.column_stack([tau, v, m, got, ref])[err > 1e-6 * 100]
    # and not by the absolute allowance alone: contracts worth something are matched in relative terms
    worth = ref > 0.01
    assert worth.sum() > 30 and np.all(err[worth] < 1e-5 * ref[worth])


def test_monte_carlo_agrees():
    """Formula vs simulation (antithetic Euler, 150 steps) for ITM / ATM / OTM calls and puts with rho < 0:
    within 4 standard errors plus 0.01 for the scheme's bias (1e-4 S)."""
    cases = [(100.0, 0.5, 0.04, True), (90.0, 0.5, 0.04, True), (115.0, 0.5, 0.04, True),
             (85.0, 0.5, 0.06, False), (100.0, 0.25, 0.02, False), (110.0, 1.0, 0.04, False)]
    skew_matters = 0
    for i, (K, tau, v, call) in enumerate(cases):
        mc, se = heston.monte_carlo_price(100.0, K, tau, 0.03, v, call, paths=160_000, steps=150, seed=i, **MODEL)
        formula = float(heston.heston_price(100.0, K, tau, 0.03, v, call, **MODEL))
        assert abs(mc - formula) < 4 * se + 0.01, (K, tau, v, call, mc, se, formula)
        flipped = float(heston.heston_price(100.0, K, tau, 0.03, v, call, **{**MODEL, "rho": 0.7}))
        skew_matters += abs(mc - flipped) > 10 * se + 0.01  # the test can tell a wrong correlation
    assert skew_matters >= 4


@pytest.mark.slow
def test_monte_carlo_agrees_tightly():
    for i, (K, tau, call) in enumerate([(80.0, 1.0, False), (100.0, 1.0, True), (125.0, 1.0, True)]):
        mc, se = heston.monte_carlo_price(100.0, K, tau, 0.01, 0.05, call, paths=600_000, steps=250, seed=10 + i,
                                          q=0.02, **MODEL)
        formula = float(heston.heston_price(100.0, K, tau, 0.01, 0.05, call, q=0.02, **MODEL))
        assert abs(mc - formula) < 4 * se + 0.005, (K, mc, se, formula)


def test_black_scholes_limit():
    """xi -> 0: the variance is deterministic, E[v_t] = theta + (v - theta) e^{-kappa t}, and the price is
    Black-Scholes at the mean integrated variance (sigma = sqrt(theta) when v = theta). The first-order term
    in xi carries rho, so rho = 0 converges faster."""
    K = np.array([60.0, 80.0, 95.0, 100.0, 105.0, 120.0, 150.0])
    for tau in (2 / 252, 0.25, 2.0):
        for call in (True, False):
            bs = pricing.bs_price(100.0, K, tau, 0.02, 0.2, call, 0.01)
            h = heston.heston_price(100.0, K, tau, 0.02, 0.04, call, kappa=3.0, theta=0.04, xi=1e-6, rho=-0.7, q=0.01)
            np.testing.assert_allclose(h, bs, rtol=0, atol=1e-5)
            h0 = heston.heston_price(100.0, K, tau, 0.02, 0.04, call, kappa=3.0, theta=0.04, xi=1e-4, rho=0.0, q=0.01)
            np.testing.assert_allclose(h0, bs, rtol=0, atol=1e-7)
        # v != theta: the variance reverts deterministically
        v, theta, kappa = 0.09, 0.04, 1.5
        w = theta * tau + (v - theta) * (1 - np.exp(-kappa * tau)) / kappa
        bs = pricing.bs_price(100.0, K, tau, 0.02, np.sqrt(w / tau), True)
        h = heston.heston_price(100.0, K, tau, 0.02, v, True, kappa=kappa, theta=theta, xi=1e-7, rho=0.3)
        np.testing.assert_allclose(h, bs, rtol=0, atol=1e-5)


def test_put_call_parity_bounds_and_expiry():
    rng = np.random.default_rng(1)
    n = 3000
    S = 100.0 * np.exp(rng.normal(0, 0.2, n))
    K = S * rng.uniform(0.6, 1.5, n)
    tau, v = rng.uniform(1 / 252, 3.0, n), rng.uniform(0.003, 0.6, n)
    r, q = rng.uniform(-0.01, 0.06, n), rng.uniform(0.0, 0.03, n)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        c = heston.heston_price(S, K, tau, r, v, True, q=q, **MODEL)
        p = heston.heston_price(S, K, tau, r, v, False, q=q, **MODEL)
    np.testing.assert_allclose(c - p, S * np.exp(-q * tau) - K * np.exp(-r * tau), rtol=0, atol=1e-10)
    for price, call in ((c, True), (p, False)):
        lower, upper = pricing.bounds(S, K, tau, r, call, q)
        assert np.all(price >= lower) and np.all(price <= upper)
    # convex and decreasing in the strike
    Ks = np.linspace(60, 150, 181)
    cs = heston.heston_price(100.0, Ks, 0.5, 0.02, 0.04, True, **MODEL)
    assert np.all(np.diff(cs) < 0) and np.all(np.diff(cs, 2) > -1e-12)
    # expired: intrinsic value; shapes broadcast
    out = heston.heston_price(np.array([[90.0], [110.0]]), np.array([100.0, 105.0]), 0.0, 0.02, 0.04, True, **MODEL)
    np.testing.assert_array_equal(out, [[0.0, 0.0], [10.0, 5.0]])
    assert heston.heston_price(100, 100, 0.5, 0.0, 0.04, True, **MODEL).shape == ()


def test_chunking_does_not_change_prices(monkeypatch):
    rng = np.random.default_rng(2)
    K, tau = 100 * rng.uniform(0.7, 1.4, 500), rng.uniform(0.01, 2, 500)
    whole = heston.heston_price(100.0, K, tau, 0.01, 0.05, True, **MODEL)
    monkeypatch.setattr(heston, "_CHUNK", 448)  # a handful of contracts at a time
    np.testing.assert_array_equal(heston.heston_price(100.0, K, tau, 0.01, 0.05, True, **MODEL), whole)


def test_simulate():
    kw = dict(s0=50.0, v0=0.09, kappa=3.0, theta=0.04, xi=0.5, rho=-0.6, r=0.02)
    S, v = heston.simulate(500, seed=3, **kw)
    assert S.shape == v.shape == (501,) and S[0] == 50.0 and v[0] == 0.09
    S2, v2 = heston.simulate(500, seed=3, **kw)
    np.testing.assert_array_equal(S, S2)
    np.testing.assert_array_equal(v, v2)
    S3, _ = heston.simulate(500, seed=4, **kw)
    assert not np.allclose(S, S3)
    assert np.all(S > 0) and np.all(np.isfinite(S))
    # a long path: variance never negative (full truncation; xi^2 > 2 kappa theta, so it hits 0), its mean near
    # theta, and daily log-price and variance moves correlated like the shocks
    S, v = heston.simulate(20_000, s0=100.0, v0=0.04, kappa=3.0, theta=0.04, xi=0.6, rho=-0.7, r=0.0, seed=7)
    assert v.min() >= 0 and (v == 0).any()
    assert v.mean() == pytest.approx(0.04, rel=0.1)
    corr = np.corrcoef(np.diff(np.log(S)), np.diff(v))[0, 1]
    assert corr == pytest.approx(-0.7, abs=0.05)
    # the daily variance of log returns is the mean variance / 252
    assert np.var(np.diff(np.log(S))) * 252 == pytest.approx(v.mean(), rel=0.05)


def _small_cfg(**over) -> HestonConfig:
    return HestonConfig(**{"days": 120, "maturities": (5, 21, 63), "moneyness": (-1.0, 0.0, 1.5),
                           "contracts_per_day": 7, **over})


CHAIN_DTYPES = {"quote_date": "datetime64[ns]", "expiry": "datetime64[ns]", "tau": "float64", "strike": "float64",
                "call": "bool", "bid": "float64", "ask": "float64", "last": "float64", "volume": "float64",
                "open_interest": "float64", "implied_vol": "float64", "underlying_price": "float64",
                "price": "float64", "contract": None, "true_price": "float64", "true_var": "float64"}


def test_generate_market_contract():
    cfg = _small_cfg()
    under, chain = heston.generate_market(cfg, start="2015-03-02")
    # underlying
    assert list(under.columns) == ["open", "high", "low", "close", "adj_close", "volume", "variance"]
    assert (under.dtypes == "float64").all() and under.index.name == "date"
    assert under.index.dtype == "datetime64[ns]" and len(under) == cfg.days + 1
    np.testing.assert_array_equal(under.index, pd.bdate_range("2015-03-02", periods=cfg.days + 1))
    for col in ("open", "high", "low", "adj_close"):
        np.testing.assert_array_equal(under[col], under["close"])
    assert (under["volume"] == 0).all() and under["close"].iloc[0] == cfg.s0 and under["variance"].iloc[0] == cfg.theta
    S, v = heston.simulate(cfg.days, s0=cfg.s0, v0=cfg.theta, kappa=cfg.kappa, theta=cfg.theta, xi=cfg.xi, rho=cfg.rho,
                           r=cfg.rate, substeps=cfg.substeps, seed=cfg.seed)
    np.testing.assert_array_equal(under["close"], S)
    np.testing.assert_array_equal(under["variance"], v)
    # chain: columns, dtypes, order, index
    assert list(chain.columns) == list(CHAIN_DTYPES)
    for col, dtype in CHAIN_DTYPES.items():
        if dtype is None:
            assert pd.api.types.is_string_dtype(chain[col])
        else:
            assert chain[col].dtype == dtype, col
    assert isinstance(chain.index, pd.RangeIndex)
    keys = chain[["quote_date", "expiry", "call", "strike"]]
    assert keys.equals(keys.sort_values(["quote_date", "expiry", "call", "strike"], ignore_index=True))
    # every day from the second, 7 distinct contracts of the 3 x 3 x 2 grid
    assert list(chain["quote_date"].unique()) == list(under.index[1:])
    assert (chain.groupby("quote_date").size() == 7).all()
    assert not chain.duplicated(["quote_date", "expiry", "strike", "call"]).any()
    # maturities, expiries and strikes on the grid
    n = np.rint(chain["tau"] * 252).astype(int)
    assert set(n) == {5, 21, 63} and np.allclose(chain["tau"], n / 252) and (chain["tau"] > 0).all()
    bdays = pd.bdate_range("2015-03-02", periods=cfg.days + 64)
    pos = bdays.get_indexer(chain["quote_date"])
    np.testing.assert_array_equal(chain["expiry"], bdays[pos + n])
    assert (chain["expiry"] > chain["quote_date"]).all()
    spot = under["close"].to_numpy()[pos]
    np.testing.assert_array_equal(chain["underlying_price"], spot)
    m = np.log(chain["strike"] / spot) / np.sqrt(cfg.theta * chain["tau"])
    assert np.all(np.min(np.abs(m.to_numpy()[:, None] - np.array([-1.0, 0.0, 1.5])), axis=1) < 0.01)
    np.testing.assert_array_equal(chain["strike"], np.round(chain["strike"], 2))
    # prices: the Heston formula at the day's true variance, no spread, inside the no-arbitrage bounds
    np.testing.assert_array_equal(chain["true_var"], under["variance"].to_numpy()[pos])
    for col in ("bid", "ask", "last", "true_price"):
        np.testing.assert_array_equal(chain[col], chain["price"])
    assert chain[["volume", "open_interest", "implied_vol"]].isna().all().all()
    some = chain.sample(20, random_state=0)
    again = heston.heston_price(some["underlying_price"], some["strike"], some["tau"], cfg.rate, some["true_var"],
                                some["call"], kappa=cfg.kappa, theta=cfg.theta, xi=cfg.xi, rho=cfg.rho)
    np.testing.assert_allclose(some["price"], again, rtol=1e-12)
    lower, upper = pricing.bounds(spot, chain["strike"], chain["tau"], cfg.rate, chain["call"])
    assert np.all(chain["price"] >= lower) and np.all(chain["price"] <= upper) and np.all(chain["price"] >= 0)
    # the implied vols of a Heston chain with rho < 0 are finite and skewed: lower strikes, higher vols
    iv = pricing.implied_vol(chain["price"], spot, chain["strike"], chain["tau"], cfg.rate, chain["call"])
    assert np.isfinite(iv).mean() > 0.99
    # contract ids
    for row in chain.head(30).itertuples():
        want = f"HSTN{row.expiry:%y%m%d}{'C' if row.call else 'P'}{int(round(row.strike * 1000)):08d}"
        assert row.contract == want
    assert chain["contract"].str.fullmatch(r"HSTN\d{6}[CP]\d{8}").all()
    assert re.fullmatch(r"HSTN\d{6}[CP]\d{8}", chain["contract"].iloc[0])


def test_generate_market_sampling_and_seeds():
    cfg = _small_cfg()
    u1, c1 = heston.generate_market(cfg)
    u2, c2 = heston.generate_market(cfg)
    pd.testing.assert_frame_equal(u1, u2)
    pd.testing.assert_frame_equal(c1, c2)
    # the full grid: 3 x 3 x 2 a day; the sample does not touch the path's random stream
    uf, cf = heston.generate_market(_small_cfg(contracts_per_day=None))
    pd.testing.assert_frame_equal(uf, u1)
    assert (cf.groupby("quote_date").size() == 18).all()
    assert (cf.groupby("quote_date")["call"].mean() == 0.5).all()
    merged = c1.merge(cf, on=["quote_date", "expiry", "strike", "call"], suffixes=("", "_full"), validate="1:1")
    assert len(merged) == len(c1)  # the sample is a subset of the grid
    np.testing.assert_array_equal(merged["price"], merged["price_full"])
    # contracts_per_day above the grid size = the full grid
    assert len(heston.generate_market(_small_cfg(contracts_per_day=500))[1]) == len(cf)
    # the sample differs from day to day, and another seed gives another path and another sample
    per_day = c1.assign(n=np.rint(c1["tau"] * 252)).groupby("quote_date")[["n", "call"]].apply(
        lambda d: tuple(sorted(zip(d["n"], d["call"]))))
    assert per_day.nunique() > 10
    u3, c3 = heston.generate_market(_small_cfg(seed=1))
    assert not np.allclose(u3["close"], u1["close"])
    assert not c3[["tau", "call"]].equals(c1[["tau", "call"]])


def test_generate_market_default_size():
    """The default market: 1,500 days of 40 contracts, every price finite and non-negative."""
    under, chain = heston.generate_market(HestonConfig())
    assert len(under) == 1501 and len(chain) == 1500 * 40
    assert np.isfinite(chain["price"]).all() and (chain["price"] >= 0).all()
