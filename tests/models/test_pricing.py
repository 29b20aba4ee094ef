"""Black-Scholes-Merton prices, vega, bounds, implied vol and realised vol (fincast.models.pricing)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy import integrate, stats

from fincast.models import pricing


def _grid(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random contracts: S = 100, K/S in [0.5, 1.6], tau in [2/365, 3], sigma in [0.05, 2], r, q, call/put."""
    rng = np.random.default_rng(seed)
    return dict(S=np.full(n, 100.0), K=100.0 * rng.uniform(0.5, 1.6, n), tau=rng.uniform(2 / 365, 3.0, n),
                r=rng.uniform(-0.01, 0.08, n), sigma=rng.uniform(0.05, 2.0, n), call=rng.random(n) < 0.5,
                q=rng.uniform(0.0, 0.05, n))


def _price(g: dict, **over) -> np.ndarray:
    a = {**g, **over}
    return pricing.bs_price(a["S"], a["K"], a["tau"], a["r"], a["sigma"], a["call"], a["q"])


def test_textbook_values():
    # Hull, Options Futures and Other Derivatives, Example 15.6 (to 2 decimals as printed)
    assert round(float(pricing.bs_price(42, 40, 0.5, 0.1, 0.2, True)), 2) == 4.76
    assert round(float(pricing.bs_price(42, 40, 0.5, 0.1, 0.2, False)), 2) == 0.81
    # Haug, The Complete Guide to Option Pricing Formulas: Black-Scholes call 2.1334 and Merton (dividend
    # yield 5%) put 2.4648, both to 4 decimals as printed
    assert round(float(pricing.bs_price(60, 65, 0.25, 0.08, 0.3, True)), 4) == 2.1334
    assert round(float(pricing.bs_price(100, 95, 0.5, 0.10, 0.2, False, q=0.05)), 4) == 2.4648


@pytest.mark.parametrize("S,K,tau,r,sigma,q", [(100, 80, 0.3, 0.03, 0.25, 0.01), (50, 65, 2.0, -0.005, 0.6, 0.04),
                                               (10, 10, 0.05, 0.1, 1.2, 0.0)])
def test_matches_the_lognormal_expectation(S, K, tau, r, sigma, q):
    """e^{-r tau} E[(S_T - K)^+] with ln S_T ~ N(ln S + (r - q - sigma^2/2) tau, sigma^2 tau), integrated
    numerically: an implementation that shares nothing with the closed form."""
    m, s = np.log(S) + (r - q - 0.5 * sigma**2) * tau, sigma * np.sqrt(tau)

    def expect(payoff):
        val, _ = integrate.quad(lambda z: payoff(np.exp(m + s * z)) * stats.norm.pdf(z), -12, 12, points=[0.0],
                                epsabs=1e-12, epsrel=1e-12, limit=500)
        return np.exp(-r * tau) * val

    call = expect(lambda st: max(st - K, 0.0))
    put = expect(lambda st: max(K - st, 0.0))
    assert pricing.bs_price(S, K, tau, r, sigma, True, q) == pytest.approx(call, rel=1e-8, abs=1e-10)
    assert pricing.bs_price(S, K, tau, r, sigma, False, q) == pytest.approx(put, rel=1e-8, abs=1e-10)


def test_put_call_parity_with_dividend_yield():
    g = _grid(5000, seed=1)
    c, p = _price(g, call=True), _price(g, call=False)
    forward_gap = g["S"] * np.exp(-g["q"] * g["tau"]) - g["K"] * np.exp(-g["r"] * g["tau"])
    np.testing.assert_allclose(c - p, forward_gap, rtol=0, atol=1e-11)


def test_limits_are_exact_and_warning_free():
    S, K, r, q = np.array([90.0, 100.0, 110.0]), 100.0, 0.05, 0.02
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RuntimeWarning from 0/0, log(0) or 1/0
        for tau in (0.0, -0.5):
            np.testing.assert_array_equal(pricing.bs_price(S, K, tau, r, 0.3, True, q), np.maximum(S - K, 0.0))
            np.testing.assert_array_equal(pricing.bs_price(S, K, tau, r, 0.3, False, q), np.maximum(K - S, 0.0))
            np.testing.assert_array_equal(pricing.bs_vega(S, K, tau, r, 0.3, q), 0.0)
        tau = 0.7
        fs, dk = S * np.exp(-q * tau), K * np.exp(-r * tau)
        np.testing.assert_array_equal(pricing.bs_price(S, K, tau, r, 0.0, True, q), np.maximum(fs - dk, 0.0))
        np.testing.assert_array_equal(pricing.bs_price(S, K, tau, r, 0.0, False, q), np.maximum(dk - fs, 0.0))
        np.testing.assert_array_equal(pricing.bs_price(S, K, tau, r, -1.0, True, q), np.maximum(fs - dk, 0.0))
        # the formula approaches those limits continuously
        np.testing.assert_allclose(pricing.bs_price(S, K, tau, r, 1e-6, True, q), np.maximum(fs - dk, 0.0), atol=1e-9)
        np.testing.assert_allclose(pricing.bs_price(S, K, 1e-12, r, 0.3, False, q), np.maximum(K - S, 0.0), atol=1e-4)
        # sigma -> infinity: the call is worth the (dividend-discounted) share, the put the discounted strike
        np.testing.assert_allclose(pricing.bs_price(S, K, tau, r, 1e3, True, q), fs, rtol=1e-12)
        np.testing.assert_allclose(pricing.bs_price(S, K, tau, r, 1e3, False, q), np.full(3, dk), rtol=1e-12)
        assert np.all(pricing.bs_price(S, K, tau, r, 3.0, True, q) < fs)
        # zero strike: the call is the share
        np.testing.assert_allclose(pricing.bs_price(100.0, 0.0, tau, r, 0.3, True, q), 100 * np.exp(-q * tau))


def test_monotone_in_strike_and_vol():
    K = np.linspace(50, 160, 221)
    for tau, sigma in ((0.05, 0.15), (1.0, 0.4), (3.0, 1.5)):
        c = pricing.bs_price(100.0, K, tau, 0.03, sigma, True, 0.01)
        p = pricing.bs_price(100.0, K, tau, 0.03, sigma, False, 0.01)
        assert np.all(np.diff(c) <= 0) and np.all(np.diff(p) >= 0)
        assert np.all(np.diff(c, 2) >= -1e-12)  # convex in strike (butterflies are worth something)
    sig = np.linspace(0.01, 3.0, 300)
    for K0, call in ((80.0, True), (100.0, False), (130.0, True)):
        v = pricing.bs_price(100.0, K0, 0.5, 0.03, sig, call, 0.01)
        assert np.all(np.diff(v) >= 0)
        assert np.all(np.diff(v[sig > 0.1]) > 0)  # strictly, once the time value is above rounding


def test_vega_matches_finite_difference():
    g = _grid(2000, seed=2)
    h = 1e-5
    fd = (_price(g, sigma=g["sigma"] + h) - _price(g, sigma=g["sigma"] - h)) / (2 * h)
    vega = pricing.bs_vega(g["S"], g["K"], g["tau"], g["r"], g["sigma"], g["q"])
    np.testing.assert_allclose(vega, fd, rtol=1e-6, atol=1e-6)
    # the same for puts (vega does not depend on the type)
    fd_put = (_price(g, sigma=g["sigma"] + h, call=False) - _price(g, sigma=g["sigma"] - h, call=False)) / (2 * h)
    np.testing.assert_allclose(vega, fd_put, rtol=1e-6, atol=1e-6)


def test_bounds_contain_prices():
    g = _grid(5000, seed=3)
    for call in (True, False):
        price = _price(g, call=call)
        lower, upper = pricing.bounds(g["S"], g["K"], g["tau"], g["r"], call, g["q"])
        assert np.all(lower >= 0) and np.all(lower <= upper)
        assert np.all(price >= lower) and np.all(price <= upper)
        # the bounds are tight: vol -> 0 reaches the lower one, vol -> infinity the upper one
        np.testing.assert_allclose(_price(g, call=call, sigma=1e-9), lower, atol=1e-9)
        np.testing.assert_allclose(_price(g, call=call, sigma=1e4), upper, rtol=1e-9)
    lower, upper = pricing.bounds(100.0, [90.0, 110.0], 0.0, 0.05, [True, False])
    np.testing.assert_array_equal(lower, [10.0, 10.0])
    np.testing.assert_array_equal(upper, [10.0, 10.0])


def test_implied_vol_round_trip():
    """sigma -> price -> implied vol recovers sigma to 1e-8 where vega is not negligible; elsewhere (deep in the
    money, short-dated: the time value is below rounding) it is NaN or a vol that reprices within 1e-12."""
    g = _grid(50_000, seed=4)
    price = _price(g)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        iv = pricing.implied_vol(price, g["S"], g["K"], g["tau"], g["r"], g["call"], g["q"])
    vega = pricing.bs_vega(g["S"], g["K"], g["tau"], g["r"], g["sigma"], g["q"])
    good = vega > 1e-7 * g["S"]
    assert good.mean() > 0.97
    assert np.all(np.abs(iv[good] - g["sigma"][good]) < 1e-8)
    rest = ~good & np.isfinite(iv)
    repriced = _price(g, sigma=np.where(rest, iv, 1.0))
    assert np.all(np.abs(repriced[rest] - price[rest]) < 1e-12)


def test_implied_vol_deep_out_of_the_money_and_shapes():
    K = np.array([[120.0, 160.0], [200.0, 80.0]])
    call = np.array([[True, True], [True, False]])
    price = pricing.bs_price(100.0, K, 2 / 365, 0.01, 0.3, call)
    assert price.max() < 1e-15  # below the rounding of S: only a relative-precision scheme recovers 0.3
    iv = pricing.implied_vol(price, 100.0, K, 2 / 365, 0.01, call)
    assert iv.shape == (2, 2)
    np.testing.assert_allclose(iv, 0.3, rtol=0, atol=1e-8)
    scalar = pricing.implied_vol(pricing.bs_price(100, 95, 0.5, 0.02, 0.35, False), 100, 95, 0.5, 0.02, False)
    assert scalar.shape == () and abs(float(scalar) - 0.35) < 1e-10


def test_implied_vol_nan_outside_the_attainable_range():
    S, K, tau, r, q = 100.0, 95.0, 0.5, 0.03, 0.01
    lower, upper = pricing.bounds(S, K, tau, r, True, q)
    p_hi = pricing.bs_price(S, K, tau, r, 5.0, True, q)
    prices = np.array([lower - 1.0, lower, p_hi, (p_hi + upper) / 2, upper, upper + 1.0, np.nan, np.inf, -np.inf])
    assert np.isnan(pricing.implied_vol(prices, S, K, tau, r, True, q)).all()
    ok = pricing.bs_price(S, K, tau, r, 0.25, True, q)
    assert np.isnan(pricing.implied_vol(ok, S, K, 0.0, r, True, q))  # expired
    assert np.isnan(pricing.implied_vol(ok, S, K, -1.0, r, True, q))
    # the open interval is (price at lo, price at hi): just inside it works, with a custom range too
    near_hi = pricing.bs_price(S, K, tau, r, 4.9, True, q)
    assert pricing.implied_vol(near_hi, S, K, tau, r, True, q) == pytest.approx(4.9)
    assert np.isnan(pricing.implied_vol(pricing.bs_price(S, K, tau, r, 0.3, True, q), S, K, tau, r, True, q, hi=0.2))


def test_realized_vol():
    r = np.array([[0.01, -0.01, 0.01, -0.01], [0.0, 0.0, 0.0, 0.03]])
    # sample std by hand: row 0 has mean 0 and sum of squares 4e-4; row 1 has mean 0.0075 and
    # squares 3 * 0.0075^2 + 0.0225^2 = 6.75e-4
    expected = np.sqrt(np.array([4e-4, 6.75e-4]) / 3) * np.sqrt(252)
    np.testing.assert_allclose(pricing.realized_vol(r), expected, rtol=1e-12)
    np.testing.assert_allclose(pricing.realized_vol(r[0], periods_per_year=12), np.sqrt(4e-4 / 3 * 12), rtol=1e-12)
    x = np.random.default_rng(5).normal(0.0, 0.01, (3, 200_000))
    np.testing.assert_allclose(pricing.realized_vol(x), 0.01 * np.sqrt(252), rtol=0.01)
