"""Black-Scholes-Merton prices, vega, no-arbitrage bounds and implied volatility (pure numpy, vectorised).

Every function broadcasts its array arguments (scalars allowed) and returns float64 arrays. ``call`` is a bool
array (True = call, False = put); the rate ``r`` and the dividend yield ``q`` are continuously compounded per
annum, ``tau`` is in years and ``sigma`` is annualised. With forward F = S e^{(r-q) tau} and discount
D = e^{-r tau}, the call is D (F N(d1) - K N(d2)) and the put D (K N(-d2) - F N(-d1)),
d1,2 = (ln(F/K) +- sigma^2 tau / 2) / (sigma sqrt(tau)).
"""

from __future__ import annotations

import numpy as np
from scipy.special import ndtr

__all__ = ["bounds", "bs_price", "bs_vega", "implied_vol", "realized_vol"]

_SQRT_2PI = float(np.sqrt(2.0 * np.pi))


def _arrays(*args) -> list[np.ndarray]:
    return [np.asarray(a, dtype=float) for a in np.broadcast_arrays(*args)]


def _bs(S: np.ndarray, K: np.ndarray, tau: np.ndarray, r: np.ndarray, q: np.ndarray, sigma: np.ndarray,
        call: np.ndarray) -> np.ndarray:
    """The formula for tau > 0, sigma > 0 (callers pass safe values elsewhere). Each option is written with
    N() of the arguments that make both terms small when it is out of the money, so its price keeps its
    relative precision there."""
    sd = sigma * np.sqrt(tau)
    with np.errstate(divide="ignore", invalid="ignore"):
        d1 = (np.log(S / K) + (r - q) * tau) / sd + 0.5 * sd
    d2 = d1 - sd
    fs, dk = S * np.exp(-q * tau), K * np.exp(-r * tau)
    c = fs * ndtr(d1) - dk * ndtr(d2)
    p = dk * ndtr(-d2) - fs * ndtr(-d1)
    return np.where(call, c, p)


def bounds(S, K, tau, r, call, q=0.0) -> tuple[np.ndarray, np.ndarray]:
    """No-arbitrage bounds (lower, upper) of a European option: call in [max(S e^{-q tau} - K e^{-r tau}, 0),
    S e^{-q tau}], put in [max(K e^{-r tau} - S e^{-q tau}, 0), K e^{-r tau}]. With tau <= 0 both are the
    intrinsic value max(S - K, 0) / max(K - S, 0)."""
    S, K, tau, r, q, call = _arrays(S, K, tau, r, q, call)
    call = call.astype(bool)
    t = np.maximum(tau, 0.0)
    fs, dk = S * np.exp(-q * t), K * np.exp(-r * t)
    lower = np.where(call, np.maximum(fs - dk, 0.0), np.maximum(dk - fs, 0.0))
    upper = np.where(call, fs, dk)
    expired = tau <= 0
    upper = np.where(expired, lower, upper)
    return lower, upper


def bs_price(S, K, tau, r, sigma, call, q=0.0) -> np.ndarray:
    """Black-Scholes-Merton price. Limits are exact: tau <= 0 gives the intrinsic value max(S-K, 0) /
    max(K-S, 0); sigma <= 0 (tau > 0) gives the discounted forward intrinsic value
    max(S e^{-q tau} - K e^{-r tau}, 0) / max(K e^{-r tau} - S e^{-q tau}, 0)."""
    S, K, tau, r, q, sigma, call = _arrays(S, K, tau, r, q, sigma, call)
    call = call.astype(bool)
    live = (tau > 0) & (sigma > 0)
    tau_s, sig_s = np.where(live, tau, 1.0), np.where(live, sigma, 1.0)
    price = _bs(S, K, tau_s, r, q, sig_s, call)
    lower, _ = bounds(S, K, tau, r, call, q)  # tau <= 0: intrinsic; tau > 0: discounted forward intrinsic
    return np.where(live, price, lower)


def bs_vega(S, K, tau, r, sigma, q=0.0) -> np.ndarray:
    """dPrice/dsigma = S e^{-q tau} phi(d1) sqrt(tau) (the same for calls and puts). 0 where tau <= 0; at
    sigma <= 0 its limit, which is 0 except exactly at the money forward (S e^{-q tau} sqrt(tau) / sqrt(2 pi))."""
    S, K, tau, r, q, sigma = _arrays(S, K, tau, r, q, sigma)
    live_t = tau > 0
    t = np.where(live_t, tau, 1.0)
    sig = np.where(sigma > 0, sigma, 1.0)
    sd = sig * np.sqrt(t)
    with np.errstate(divide="ignore", invalid="ignore"):
        x = np.log(S / K) + (r - q) * t  # ln(F/K)
        d1 = np.where(sigma > 0, x / sd + 0.5 * sd, np.where(x == 0, 0.0, np.inf))
    vega = S * np.exp(-q * t) * np.sqrt(t) * np.exp(-0.5 * d1 * d1) / _SQRT_2PI
    return np.where(live_t, vega, 0.0)


def implied_vol(price, S, K, tau, r, call, q=0.0, *, lo: float = 1e-4, hi: float = 5.0, tol: float = 1e-10,
                max_iter: int = 100) -> np.ndarray:
    """Black-Scholes implied volatility by a safeguarded Newton iteration, all elements together.

    NaN where tau <= 0, the price is not finite, or it lies outside the open interval (bs_price(lo),
    bs_price(hi)). The option is first turned into its out-of-the-money twin by put-call parity (same vol,
    small and precise). Each element keeps a bracket [a, b] with the root inside; it starts at the inflection
    point sigma_c = sqrt(2 |ln(F/K)| / tau) of the price in sigma, from which Newton converges monotonically.
    Below sigma_c (where the price is convex in sigma, like exp(-c / sigma^2)) the step is Newton's on
    ln(price), which is concave there and so does not crawl; above it, Newton's on the price; bisection when
    the step leaves the bracket or vega vanishes. An element stops when its step or its bracket is below
    ``tol`` (or, for an in-the-money option, when the price error is at the rounding level of S and K: the
    parity conversion loses the rest); the loop stops when all have, or after ``max_iter`` rounds (elements
    still moving are NaN).
    """
    price, S, K, tau, r, q, call = _arrays(price, S, K, tau, r, q, call)
    call = call.astype(bool)
    shape = price.shape
    price, S, K, tau, r, q, call = (a.ravel() for a in (price, S, K, tau, r, q, call))
    out = np.full(price.shape, np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        ok = (tau > 0) & np.isfinite(price) & (S > 0) & (K > 0) & np.isfinite(S * K * tau * r * q)
    t = np.where(ok, tau, 1.0)
    p_lo = bs_price(S, K, t, r, lo, call, q)
    p_hi = bs_price(S, K, t, r, hi, call, q)
    ok &= (price > p_lo) & (price < p_hi)
    if not ok.any():
        return out.reshape(shape)
    idx = np.flatnonzero(ok)
    price, S, K, t, r, q, call = (a[idx] for a in (price, S, K, t, r, q, call))
    fs, dk = S * np.exp(-q * t), K * np.exp(-r * t)
    otm_call = S * np.exp((r - q) * t) <= K  # F <= K: the call is out of the money
    converted = call != otm_call
    target = np.where(converted, np.where(call, price - fs + dk, price + fs - dk), price)
    a, b = np.full(idx.size, lo), np.full(idx.size, hi)
    inflection = np.sqrt(2.0 * np.abs(np.log(fs / dk)) / t)
    x = np.clip(inflection, lo, hi)
    noise = np.where(converted, 2 * np.finfo(float).eps * (fs + dk), 0.0)  # rounding error of the parity step
    active = np.ones(idx.size, dtype=bool)
    log_target = np.log(np.where(target > 0, target, 1.0))
    for _ in range(max_iter):
        model = _bs(S, K, t, r, q, x, otm_call)
        vega = bs_vega(S, K, t, r, x, q)
        below = model < target
        a = np.where(active & below, x, a)
        b = np.where(active & ~below, x, b)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            use_log = (x < inflection) & (model > 0) & (target > 0)
            step = np.where(use_log, (log_target - np.log(np.where(use_log, model, 1.0))) * model / vega,
                            (target - model) / vega)
            new = x + step
        small = np.abs(step) < tol  # converged: accept the Newton step even if it grazes the bracket
        bad = ~small & (~np.isfinite(new) | (new <= a) | (new >= b) | (vega <= 0))
        new = np.where(bad, 0.5 * (a + b), new)
        exact = np.abs(model - target) <= noise  # nothing left to resolve: keep x
        new = np.where(exact, x, new)
        done = small | exact | (b - a < tol)
        x = np.where(active, new, x)
        active &= ~done
        if not active.any():
            break
    x[active] = np.nan  # not converged within max_iter
    out[idx] = x
    return out.reshape(shape)


def realized_vol(log_returns_2d, periods_per_year: float = 252) -> np.ndarray:
    """Annualised realised volatility: the sample standard deviation (ddof=1) of the log returns along the
    last axis, times sqrt(periods_per_year)."""
    x = np.asarray(log_returns_2d, dtype=float)
    return np.std(x, axis=-1, ddof=1) * np.sqrt(float(periods_per_year))
