"""A synthetic option market under Heston (1993) stochastic volatility (layer L1).

Under the pricing measure the underlying and its variance follow

    dS = (r - q) S dt + sqrt(v) S dW1,    dv = kappa (theta - v) dt + xi sqrt(v) dW2,    d<W1, W2> = rho dt.

* :func:`heston_price` prices European options in semi-closed form (Fourier inversion of the characteristic
  function, vectorised over contracts).
* :func:`simulate` draws one daily path of (S, v); :func:`monte_carlo_price` prices one contract by simulation
  (for checking the formula).
* :func:`generate_market` builds the whole synthetic market of a :class:`~fincast.config.HestonConfig`: the
  underlying's daily bars and, every day, a chain priced by the formula at that day's true variance.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy.special import log1p as _clog1p  # accurate for small complex arguments (numpy's is not)

from fincast.config import HestonConfig

__all__ = ["generate_market", "heston_price", "monte_carlo_price", "simulate"]

TRADING_DAYS = 252


# Quadrature of the inversion integral (see ``_plan``): 8-node Gauss-Legendre panels; the grid is planned per
# contract from the integrand's width s at u = 0, the phase speed and decay rate seen at probe points, and
# where its envelope falls below _TAIL_TOL of the central bump's mass.
_NODES_PER_PANEL = 8
_CORE = 8.0  # the central bump: [0, 8 s], at least 4 panels
_RATIO = 4.0  # tail segments [8 s 4^i, 8 s 4^(i+1)], at least 2 panels each
_SEGMENTS = 10  # so the grid may reach 8 s 4^10, about 8e6 s
_PER_PANEL = 5.0  # at most this many radians of phase or e-folds of decay per panel (8-node error ~1e-11)
_TAIL_TOL = 1e-11
_PANEL_BINS = np.array([8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 4096])
_CHUNK = 2**16  # grid points (contracts x nodes) evaluated at once: about 1 MB per complex temporary
_P_CAP = 1e4  # largest |moment| considered when choosing the integration contour
_GOLDEN_ITERS = 24
_EDGE_SHARE = 0.99  # stay off the moment explosion, where the integrand turns into a spike

_GL_T, _GL_W = np.polynomial.legendre.leggauss(_NODES_PER_PANEL)


def _log_cf(z: np.ndarray, tau: np.ndarray, v: np.ndarray, kappa: float, theta: float, xi: float,
            rho: float) -> np.ndarray:
    """ln E[exp(i z X)] for X = ln(S_tau / F) (F the forward), complex z, by the "little Heston trap"
    (Albrecher, Mayer, Schoutens & Tistaert 2007): with beta = kappa - i rho xi z, d = sqrt(beta^2 + xi^2 (i z +
    z^2)) (Re d >= 0), g = (beta - d) / (beta + d), E = exp(-d tau),

        ln phi = kappa theta / xi^2 [(beta - d) tau - 2 ln((1 - g E) / (1 - g))]
                 + v (beta - d) / xi^2 (1 - E) / (1 - g E).

    Written so that nothing is divided by xi^2: (beta - d) / xi^2 = -(i z + z^2) / (beta + d), and the log term is
    2 (y / xi^2) ln(1 + y) / y with y = g (1 - E) / (1 - g), which keeps the xi -> 0 (Black-Scholes) limit exact.
    """
    z = np.asarray(z, dtype=complex)
    x2 = xi * xi
    zz = 1j * z + z * z
    beta = kappa - (1j * rho * xi) * z
    d = np.sqrt(beta * beta + x2 * zz)
    # the larger of beta -+ d is accurate, the other follows from (beta - d)(beta + d) = -xi^2 zz;
    # |beta + d| >= |beta - d| exactly when Re(beta conj(d)) >= 0
    bp = beta + d
    small_p = beta.real * d.real + beta.imag * d.imag < 0
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if small_p.any():
            np.divide(-x2 * zz, beta - d, out=bp, where=small_p)
        inv = 1.0 / bp
        a = -zz * inv  # (beta - d) / xi^2
        g = x2 * a * inv
        e = np.exp(-d * tau)
        one_e = 1.0 - e
        y_over = a * inv * one_e / (1.0 - g)  # y / xi^2
        y = x2 * y_over
        # for tiny xi, y is tiny too: 2 (y / xi^2) ln(1 + y) / y (y = 0 only at z = 0 or -i, never on a contour)
        log_term = _clog1p(y) * (2.0 / x2) if x2 > 1e-4 else 2.0 * y_over * _clog1p(y) / y
        return kappa * theta * (a * tau - log_term) + v * a * one_e / (1.0 - g * e)


def _explosion_time(p: np.ndarray, kappa: float, xi: float, rho: float) -> np.ndarray:
    """Time at which E[(S_t/F)^p] becomes infinite (Andersen & Piterbarg 2007): the blow-up time of the Riccati
    equation D' = xi^2/2 D^2 + b D + (p^2 - p)/2, b = rho xi p - kappa, D(0) = 0. With disc = b^2 - xi^2 (p^2 - p):
    never if p in [0, 1] or (disc >= 0 and b < 0); ln((b + sqrt disc) / (b - sqrt disc)) / sqrt disc if disc > 0
    and b > 0; 2 (pi/2 - arctan(b / sqrt(-disc))) / sqrt(-disc) if disc < 0."""
    b = rho * xi * p - kappa
    c = p * p - p
    disc = b * b - xi * xi * c
    with np.errstate(divide="ignore", invalid="ignore"):
        root = np.sqrt(np.abs(disc))
        t_neg = 2.0 * (0.5 * np.pi - np.arctan(b / root)) / root
        t_pos = np.where(root > 1e-12 * np.abs(b), np.log((b + root) / (b - root)) / root, 2.0 / b)
    t = np.where(disc < 0, t_neg, np.where(b < 0, np.inf, t_pos))
    return np.where(c <= 0, np.inf, t)


def _critical_moments(tau: np.ndarray, kappa: float, xi: float, rho: float) -> tuple[np.ndarray, np.ndarray]:
    """(p-, p+): E[(S_tau/F)^p] is finite for p in (p-, p+) (capped at -+_P_CAP); bisection on ln|p - edge|, as
    the explosion time falls monotonically in |p| outside [0, 1]."""
    out = []
    for sign, edge in ((1.0, 1.0), (-1.0, 0.0)):
        lo = np.full(tau.shape, np.log(1e-9))  # ln(sign (p - edge)): finite moment at lo
        hi = np.full(tau.shape, np.log(_P_CAP))
        ok_cap = _explosion_time(edge + sign * _P_CAP, kappa, xi, rho) > tau
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            fine = _explosion_time(edge + sign * np.exp(mid), kappa, xi, rho) > tau
            lo, hi = np.where(fine, mid, lo), np.where(fine, hi, mid)
        out.append(np.where(ok_cap, edge + sign * _P_CAP, edge + sign * np.exp(lo)))
    p_plus, p_minus = out
    return p_minus, p_plus


def _psi(alpha: np.ndarray, k: np.ndarray, tau: np.ndarray, v: np.ndarray, params: tuple) -> np.ndarray:
    """ln of the integrand at u = 0: -alpha k + ln E[exp((alpha + 1) X)] - ln(alpha (alpha + 1))."""
    m = _log_cf(-1j * (alpha + 1.0), tau, v, *params).real
    with np.errstate(divide="ignore", invalid="ignore"):
        return -alpha * k + m - np.log(alpha * (alpha + 1.0))


def _contour(k: np.ndarray, tau: np.ndarray, v: np.ndarray, p_minus: np.ndarray, p_plus: np.ndarray,
             params: tuple) -> tuple[np.ndarray, np.ndarray]:
    """(alpha, s) per contract: the contour Im = -(alpha + 1) and the width of the integrand's bump at u = 0.

    alpha minimises Psi(alpha), the log of the integrand at u = 0 (Lord & Kahl 2007), over alpha > 0 for an out
    of the money call (k >= 0) and alpha < -1 for a put, inside the moments that exist (golden section on a log
    scale; Psi is convex between the poles at 0, -1 and the moment explosions). The contour then passes through
    the saddle point: the integrand starts as a smooth bump, without the e^{-iuk} oscillation that plagues far
    out-of-the-money options and tiny variances. s = 1 / sqrt(Psi''(alpha)) by central differences."""
    call = k >= 0
    # search variable: beta = alpha (call) or -1 - alpha (put), in (0, beta_max), on a log scale
    beta_max = np.where(call, p_plus - 1.0, -p_minus) * _EDGE_SHARE

    def to_alpha(b: np.ndarray) -> np.ndarray:
        return np.where(call, b, -1.0 - b)

    def f(t: np.ndarray) -> np.ndarray:
        return _psi(to_alpha(np.exp(t)), k, tau, v, params)

    lo, hi = np.full(k.shape, np.log(1e-6)), np.log(beta_max)
    gr = (np.sqrt(5.0) - 1.0) / 2.0
    c, d = hi - gr * (hi - lo), lo + gr * (hi - lo)
    fc, fd = f(c), f(d)
    for _ in range(_GOLDEN_ITERS):
        left = ~(fc > fd)  # minimum in [lo, d]
        hi, lo = np.where(left, d, hi), np.where(left, lo, c)
        c_new, d_new = hi - gr * (hi - lo), lo + gr * (hi - lo)
        f_new = f(np.where(left, c_new, d_new))
        fd, fc = np.where(left, fc, f_new), np.where(left, f_new, fd)
        c, d = np.where(left, c_new, d), np.where(left, c, d_new)
    b_opt = np.exp(0.5 * (lo + hi))
    alpha = to_alpha(b_opt)
    h = 0.05 * np.minimum(b_opt, np.minimum(beta_max - b_opt, 1.0 + b_opt))
    sgn = np.where(call, 1.0, -1.0)
    f0 = _psi(alpha, k, tau, v, params)
    curv = (_psi(alpha + sgn * h, k, tau, v, params) - 2 * f0 + _psi(alpha - sgn * h, k, tau, v, params)) / (h * h)
    poles = 1.0 / alpha**2 + 1.0 / (alpha + 1.0) ** 2  # fallback: the poles' share of the curvature
    curv = np.where(np.isfinite(curv) & (curv > 0), curv, poles)
    return alpha, 1.0 / np.sqrt(curv)


def _integrand(u: np.ndarray, alpha: np.ndarray, k: np.ndarray, tau: np.ndarray, v: np.ndarray,
               params: tuple) -> np.ndarray:
    """e^{-(alpha + i u) k} phi(u - i (alpha + 1)) / ((alpha + i u)(alpha + 1 + i u)) for u of shape
    (contracts, points) and the other arguments per contract."""
    a, iu = alpha[:, None], 1j * u
    with np.errstate(under="ignore", over="ignore"):
        g = np.exp(_log_cf(u - 1j * (a + 1.0), tau[:, None], v[:, None], *params) - (a + iu) * k[:, None])
    return g / ((a + iu) * (a + 1.0 + iu))


def _plan(alpha: np.ndarray, s: np.ndarray, k: np.ndarray, tau: np.ndarray, v: np.ndarray,
          params: tuple) -> tuple[np.ndarray, np.ndarray]:
    """Segment edges (contracts x segments + 1) and panels per segment (contracts x segments; 0 = not integrated).

    Segment 0 is the bump [0, 8 s], segment i >= 1 is [8 s 4^(i-1), 8 s 4^i]. The integrand g is probed at the
    edges and just beside them, which gives its envelope |g|, its phase speed and its local decay rate there.
    The tail is cut where what is left can no longer matter: with the envelope's log taken as falling no faster
    than both its tangent at the segment's start and its chord across the segment (one of the two bounds it from
    above, whether it is concave, as a Gaussian's, or convex, as the 1/u^2 the denominator gives), the cut is
    where |g(u)| u drops below _TAIL_TOL times the bump's mass |g(0)| s. Each segment (up to the cut) gets enough
    panels that none spans more than _PER_PANEL radians of phase or e-folds of decay. Where the contour sits at a
    saddle point that is a dozen panels; where a moment explosion stopped it short (large vol of vol, low
    variance), the integrand keeps oscillating through a long exponential tail and gets as many as that needs."""
    n_seg = _SEGMENTS + 1
    edges = np.concatenate([np.zeros((s.size, 1)), _CORE * s[:, None] * _RATIO ** np.arange(n_seg)], axis=1)
    delta = 1e-4 * np.minimum(s, 1.0)[:, None]
    probe = np.concatenate([edges, edges + delta, 0.5 * edges[:, 1:2], 0.5 * edges[:, 1:2] + delta], axis=1)
    g = _integrand(probe, alpha, k, tau, v, params)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        ratio = g[:, n_seg + 1:2 * n_seg + 2] / g[:, :n_seg + 1]
        speed = np.nan_to_num(np.abs(np.angle(ratio)) / delta, nan=0.0, posinf=0.0)
        speed_mid = np.nan_to_num(np.abs(np.angle(g[:, -1] / g[:, -2])) / delta[:, 0], nan=0.0, posinf=0.0)
        log_amp = np.log(np.abs(g[:, :n_seg + 1]))
        tangent = np.nan_to_num(-np.log(np.abs(ratio)) / delta, nan=np.inf)  # local decay rate at each edge
    width = np.diff(edges, axis=1)
    share = np.ones_like(width)  # the share of each segment that is integrated
    with np.errstate(divide="ignore", invalid="ignore"):
        chord = np.nan_to_num((log_amp[:, :-1] - log_amp[:, 1:]) / width, nan=np.inf, posinf=np.inf)
        rate = np.clip(np.minimum(tangent[:, :-1], chord), 0.0, None)
        rate[:, 0] = np.clip(chord[:, 0], 0.0, None)  # the bump (log-concave): its chord is the safe rate
        # e-folds of slack at each segment's start: how far |g| u may fall before the rest stops mattering
        slack = log_amp[:, :-1] + np.log(edges[:, 1:]) - np.log(_TAIL_TOL * s[:, None]) - log_amp[:, :1]
        slack = np.nan_to_num(slack, nan=-np.inf)
        share[:, 1:] = np.clip(np.where(rate[:, 1:] > 0, slack[:, 1:] / (rate[:, 1:] * width[:, 1:]), 1.0), 0.0, 1.0)
    # a segment is integrated if it has slack and every earlier one was, in full
    prev_full = np.concatenate([np.ones((s.size, 1), bool), np.cumprod(share[:, :-1] >= 1.0, axis=1).astype(bool)],
                               axis=1)
    # where g(0) itself underflows (a price below 1e-300) only the bump is integrated, to about 0
    keep = prev_full & ((slack > 0) | (np.arange(n_seg) == 0)) & (np.isfinite(log_amp[:, :1]) | (np.arange(n_seg) == 0))
    share = np.nan_to_num(share, nan=0.0)
    share = np.where(keep, share, 0.0)
    span = share * width
    phase = np.maximum(speed[:, :-1], speed[:, 1:]) * span
    phase[:, 0] = np.maximum(phase[:, 0], speed_mid * span[:, 0])
    decay = np.where(span > 0, np.where(span > 0, rate, 0.0) * span, 0.0)
    panels = np.ceil(np.maximum(np.nan_to_num(np.maximum(phase, decay), posinf=0.0) / _PER_PANEL, 2.0))
    panels[:, 0] = np.maximum(panels[:, 0], 4.0)
    edges[:, 1:] = edges[:, :-1] + span  # integrated parts (zero-width where not integrated)
    return edges, np.where(keep, panels, 0.0)


def _integrate(edges: np.ndarray, panels: np.ndarray, n_panels: int, alpha: np.ndarray, k: np.ndarray,
               tau: np.ndarray, v: np.ndarray, params: tuple) -> np.ndarray:
    """int_0^end Re g(u) du with n_panels Gauss-Legendre panels per contract, laid out in proportion to
    ``panels`` (each segment gets its share of n_panels >= panels.sum(), spread evenly inside it)."""
    cum = np.concatenate([np.zeros((panels.shape[0], 1)), np.cumsum(panels, axis=1)], axis=1)
    total = cum[:, -1:]
    target = total * (np.arange(n_panels + 1) / n_panels)[None, :]
    seg = (cum[:, None, 1:-1] <= target[:, :, None]).sum(axis=2)  # segment of each panel edge
    last = (panels > 0).sum(axis=1, keepdims=True) - 1
    seg = np.minimum(seg, last)
    rows = np.arange(panels.shape[0])[:, None]
    frac = (target - cum[rows, seg]) / panels[rows, seg]
    u_edges = edges[rows, seg] + np.clip(frac, 0.0, 1.0) * (edges[rows, seg + 1] - edges[rows, seg])
    lo, hi = u_edges[:, :-1, None], u_edges[:, 1:, None]
    u = (0.5 * (hi - lo) * _GL_T + 0.5 * (hi + lo)).reshape(len(rows), -1)
    w = (0.5 * (hi - lo) * _GL_W).reshape(len(rows), -1)
    return (_integrand(u, alpha, k, tau, v, params).real * w).sum(axis=1)


def _otm_prices(k: np.ndarray, tau: np.ndarray, v: np.ndarray, p_minus: np.ndarray, p_plus: np.ndarray,
                params: tuple) -> np.ndarray:
    """Forward-normalised out-of-the-money prices E[(e^X - e^k)^+] (k >= 0) or E[(e^k - e^X)^+] (k < 0),
    k = ln(K/F), by Fourier inversion along a shifted contour (Carr & Madan 1999; Lee 2004):

        price = e^{-alpha k} / pi int_0^inf Re[e^{-i u k} phi(u - i (alpha + 1)) / ((alpha + i u)(alpha + 1 + i u))] du,

    alpha > 0 giving the call and alpha < -1 the put (``_contour`` picks it, ``_plan`` the grid). Contracts are
    integrated in groups of similar panel counts, in chunks of about _CHUNK points."""
    out = np.empty(k.size)
    alpha, edges, panels = np.empty(k.size), np.empty((k.size, _SEGMENTS + 2)), np.empty((k.size, _SEGMENTS + 1))
    step = max(1, _CHUNK // 64)
    for lo in range(0, k.size, step):
        j = slice(lo, lo + step)
        alpha[j], s = _contour(k[j], tau[j], v[j], p_minus[j], p_plus[j], params)
        edges[j], panels[j] = _plan(alpha[j], s, k[j], tau[j], v[j], params)
    n_bin = _PANEL_BINS[np.minimum(np.searchsorted(_PANEL_BINS, panels.sum(axis=1)), _PANEL_BINS.size - 1)]
    for nb in np.unique(n_bin):
        idx = np.flatnonzero(n_bin == nb)
        step = max(1, _CHUNK // (int(nb) * _NODES_PER_PANEL))
        for lo in range(0, idx.size, step):
            j = idx[lo:lo + step]
            out[j] = _integrate(edges[j], panels[j], int(nb), alpha[j], k[j], tau[j], v[j], params)
    return out / np.pi


def heston_price(S, K, tau, r, v, call, *, kappa: float, theta: float, xi: float, rho: float,
                 q=0.0) -> np.ndarray:
    """Heston (1993) price of European options at spot S, strike K, years to expiry tau, rate r, dividend yield
    q and current variance v, vectorised over contracts (all arguments broadcast).

    The out-of-the-money option of each contract (the call if K >= F = S e^{(r-q) tau}, else the put) is priced
    by Fourier inversion (``_otm_prices``) and the other one follows by put-call parity; tau <= 0 gives the
    intrinsic value. Results are clipped into the no-arbitrage bounds (only rounding noise is ever clipped).
    Against adaptive quadrature (tau from a day to 3 years, v from 0.001 to 1, K/S from 0.5 to 2): errors below
    1e-9 S (relative 1e-8 on contracts worth over 1e-4 S) with the default HestonConfig, below 1e-7 S
    (relative 1e-5) with vol of vol up to 3 and |rho| up to 0.95. Memory: chunks of about _CHUNK grid points.
    """
    S, K, tau, r, v, q, call = (np.asarray(a, dtype=float) for a in np.broadcast_arrays(S, K, tau, r, v, q, call))
    call = call.astype(bool)
    shape = S.shape
    S, K, tau, r, v, q, call = (a.ravel() for a in (S, K, tau, r, v, q, call))
    live = tau > 0
    t = np.where(live, tau, 1.0)
    fs, dk = S * np.exp(-q * t), K * np.exp(-r * t)
    with np.errstate(divide="ignore", invalid="ignore"):
        k = np.log(dk / fs)  # ln(K / F)
    params = (float(kappa), float(theta), float(xi), float(rho))
    otm = np.zeros(S.shape)
    live_idx = np.flatnonzero(live)
    if live_idx.size:
        # a call and a put of the same strike share their out-of-the-money price: price each (k, tau, v) once
        keys, back = np.unique(np.stack([k[live_idx], t[live_idx], np.maximum(v[live_idx], 0.0)], axis=1), axis=0,
                               return_inverse=True)
        taus, inv = np.unique(keys[:, 1], return_inverse=True)
        p_minus, p_plus = _critical_moments(taus, params[0], params[2], params[3])
        vals = _otm_prices(keys[:, 0], keys[:, 1], keys[:, 2], p_minus[inv], p_plus[inv], params)
        otm[live_idx] = vals[back.ravel()]
    otm_price = fs * otm
    call_otm = k >= 0
    price = np.where(call == call_otm, otm_price, np.where(call, otm_price + fs - dk, otm_price - fs + dk))
    lower = np.where(call, np.maximum(fs - dk, 0.0), np.maximum(dk - fs, 0.0))
    upper = np.where(call, fs, dk)
    price = np.clip(price, lower, upper)
    intrinsic = np.where(call, np.maximum(S - K, 0.0), np.maximum(K - S, 0.0))
    return np.where(live, price, intrinsic).reshape(shape)


def _step(log_s: np.ndarray, var: np.ndarray, z1: np.ndarray, z2: np.ndarray, dt: float, mu: float,
          kappa: float, theta: float, xi: float, rho: float) -> tuple[np.ndarray, np.ndarray]:
    vp = np.maximum(var, 0.0)
    sq = np.sqrt(vp * dt)
    log_s = log_s + (mu - 0.5 * vp) * dt + sq * (rho * z2 + np.sqrt(1.0 - rho * rho) * z1)
    var = var + kappa * (theta - vp) * dt + xi * sq * z2
    return log_s, var


def simulate(days: int, *, s0: float, v0: float, kappa: float, theta: float, xi: float, rho: float, r: float,
             q: float = 0.0, substeps: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """One Heston path: daily closes S (length days + 1, S[0] = s0) and the daily variance v (length days + 1,
    v[0] = v0). Steps of dt = 1 / (252 substeps): full-truncation Euler for the variance (v+ = max(v, 0) in
    drift and diffusion; the reported variance is v+, so it is never negative), and Euler in ln S with drift
    r - q - v+/2, so S stays positive. The price shock is rho Z2 + sqrt(1 - rho^2) Z1 with Z2 the variance's;
    normals from numpy's Generator(PCG64(seed))."""
    dt = 1.0 / TRADING_DAYS / substeps
    rng = np.random.Generator(np.random.PCG64(seed))
    z = rng.standard_normal((days, substeps, 2))
    log_s, var = math.log(s0), float(v0)
    out_s, out_v = np.empty(days + 1), np.empty(days + 1)
    out_s[0], out_v[0] = s0, max(v0, 0.0)
    c = math.sqrt(1.0 - rho * rho)
    mu = r - q
    # a loop over time steps (scalars), not over anything vectorisable: each step needs the previous variance
    for i, day in enumerate(z.tolist(), start=1):
        for z1, z2 in day:
            vp = var if var > 0.0 else 0.0
            sq = math.sqrt(vp * dt)
            log_s += (mu - 0.5 * vp) * dt + sq * (rho * z2 + c * z1)
            var += kappa * (theta - vp) * dt + xi * sq * z2
        out_s[i], out_v[i] = math.exp(log_s), max(var, 0.0)
    return out_s, out_v


def monte_carlo_price(S: float, K: float, tau: float, r: float, v0: float, call: bool, *, kappa: float,
                      theta: float, xi: float, rho: float, q: float = 0.0, paths: int = 200_000, steps: int = 200,
                      seed: int = 0) -> tuple[float, float]:
    """Monte Carlo price of one European option and its standard error: the scheme of :func:`simulate` with
    ``steps`` steps to expiry, ``paths`` paths in antithetic pairs (Z, -Z), and the discounted S_T as a control
    variate; the error is that of the (controlled) pair averages. On top of it comes the Euler scheme's bias,
    of the order of 1e-4 S for a hundred or more steps."""
    half = max(1, paths // 2)
    dt = tau / steps
    rng = np.random.Generator(np.random.PCG64(seed))
    log_s = np.full(2 * half, np.log(S))
    var = np.full(2 * half, float(v0))
    for _ in range(steps):
        z = rng.standard_normal((2, half))
        z = np.concatenate([z, -z], axis=1)
        log_s, var = _step(log_s, var, z[0], z[1], dt, r - q, kappa, theta, xi, rho)
    st = np.exp(log_s)
    payoff = (np.maximum(st - K, 0.0) if call else np.maximum(K - st, 0.0)) * np.exp(-r * tau)
    y = 0.5 * (payoff[:half] + payoff[half:])
    # control variate: the discounted S_T, whose mean S e^{-q tau} the scheme keeps exactly (each step's
    # exp(sqrt(v dt) Z - v dt / 2) has mean 1 given v)
    x = 0.5 * (st[:half] + st[half:]) * np.exp(-r * tau) - S * np.exp(-q * tau)
    if half > 2 and x.var() > 0:
        b = np.cov(y, x)[0, 1] / x.var(ddof=1)
        y = y - b * x
    return float(y.mean()), float(y.std(ddof=1) / np.sqrt(half))


def generate_market(cfg: HestonConfig, *, start: str = "2010-01-04") -> tuple[pd.DataFrame, pd.DataFrame]:
    """The synthetic market of ``cfg``: (underlying, chain).

    ``underlying``: indexed by business days from ``start`` (``date``, days + 1 rows), float columns open, high,
    low, close, adj_close (all the simulated close S_t), volume (0) and variance (the true v_t).

    ``chain``: for every day from the second on, the grid maturities x moneyness x {call, put} (or a random sample
    of ``contracts_per_day`` of it, drawn per day from a stream seeded by ``cfg.seed`` but apart from the path's):
    tau = n / 252 for n trading days, expiry the business day n days after the quote date, strike
    K = S_t exp(m sqrt(theta tau)) rounded to cents, priced by :func:`heston_price` at S_t, v_t, rate cfg.rate and
    q = 0. Columns as in ``fincast.data.options`` (bid = ask = last = price, no spread; volume, open_interest and
    implied_vol NaN) plus true_price (= price) and true_var (= v_t); sorted by quote_date, expiry, call, strike.
    """
    v0 = cfg.theta if cfg.v0 is None else cfg.v0
    model = dict(kappa=cfg.kappa, theta=cfg.theta, xi=cfg.xi, rho=cfg.rho)
    S, var = simulate(cfg.days, s0=cfg.s0, v0=v0, r=cfg.rate, substeps=cfg.substeps, seed=cfg.seed, **model)
    mats = np.asarray(cfg.maturities, dtype=int)
    all_dates = pd.bdate_range(start, periods=cfg.days + 1 + int(mats.max())).astype("datetime64[ns]")
    dates = pd.DatetimeIndex(all_dates[: cfg.days + 1], name="date")
    underlying = pd.DataFrame({c: S for c in ("open", "high", "low", "close", "adj_close")}, index=dates)
    underlying["volume"] = 0.0
    underlying["variance"] = var

    # the grid, flattened as (maturity, moneyness, call/put)
    m_idx, x_idx, c_idx = (a.ravel() for a in np.meshgrid(np.arange(mats.size), np.arange(len(cfg.moneyness)),
                                                          [True, False], indexing="ij"))
    grid = m_idx.size
    days = np.arange(1, cfg.days + 1)
    n_pick = grid if cfg.contracts_per_day is None else min(cfg.contracts_per_day, grid)
    if n_pick < grid:
        rng = np.random.default_rng([cfg.seed, 0x0C4A1])  # its own stream: the path's draws do not change
        pick = np.sort(np.argsort(rng.random((days.size, grid)), axis=1)[:, :n_pick], axis=1)
    else:
        pick = np.broadcast_to(np.arange(grid), (days.size, grid))
    day = np.repeat(days, n_pick)
    g = pick.ravel()
    n_days = mats[m_idx[g]]
    tau = n_days / TRADING_DAYS
    moneyness = np.asarray(cfg.moneyness, dtype=float)[x_idx[g]]
    call = c_idx[g].astype(bool)
    spot = S[day]
    strike = np.round(spot * np.exp(moneyness * np.sqrt(cfg.theta * tau)), 2)
    price = heston_price(spot, strike, tau, cfg.rate, var[day], call, **model)
    expiry = all_dates[day + n_days]
    nan = np.full(day.size, np.nan)
    chain = pd.DataFrame({
        "quote_date": all_dates[day], "expiry": expiry, "tau": tau, "strike": strike, "call": call,
        "bid": price, "ask": price, "last": price, "volume": nan, "open_interest": nan, "implied_vol": nan,
        "underlying_price": spot, "price": price,
        "contract": _symbols(expiry, call, strike),
        "true_price": price, "true_var": var[day],
    })
    chain = chain.sort_values(["quote_date", "expiry", "call", "strike"], kind="stable", ignore_index=True)
    return underlying, chain


def _symbols(expiry: pd.DatetimeIndex, call: np.ndarray, strike: np.ndarray) -> np.ndarray:
    """OCC-style ids: HSTN + YYMMDD + C/P + strike * 1000 in 8 digits."""
    codes, uniq = pd.factorize(expiry)
    ymd = np.asarray(uniq.strftime("%y%m%d"), dtype=object)[codes]
    cp = np.where(call, "C", "P").astype(object)
    mills = np.char.zfill(np.rint(strike * 1000).astype(np.int64).astype(str), 8).astype(object)
    return "HSTN" + ymd + cp + mills
