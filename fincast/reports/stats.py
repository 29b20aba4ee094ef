"""Statistics for the clipping stability study: each clip config against unclipped training, paired by seed.

Pure functions (numpy + scipy). Few seeds must give wide intervals, never false certainty: the bootstrap
confidence interval is never narrower than the Student-t interval of the same mean.

A study makes many comparisons (every clip config at every learning rate, each on two metrics: divergence
rate and final validation loss), so :func:`judge` controls the family-wise error rate across all of them:
Holm's step-down adjustment of the p-values (Holm 1979) decides, and every interval is a simultaneous one at
the Bonferroni level 1 - alpha/m. A verdict is one of four outcomes: helped, hurt, equivalent (the simultaneous
interval of the loss difference lies inside +-margin and the divergence counts are equal), inconclusive.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class Comparison:
    """One clip config against the control ("none") at one learning rate."""

    lr: float
    config: str
    n_treated: int
    n_control: int
    diverged_treated: int
    diverged_control: int
    fisher_p: float
    n_pairs: int
    diff_pct: float
    ci_low: float
    ci_high: float
    wilcoxon_p: float
    confidence: float
    t_p: float = math.nan  # paired t-test of the relative differences (the test the verdict adjusts)
    boschloo_p: float = math.nan  # Boschloo's exact test of the divergence counts (the test the verdict adjusts)
    diffs: tuple[float, ...] = ()  # the pairs' relative differences (percent), for intervals at other levels


def paired_difference_ci(treated, control, *, confidence=0.95, n_boot=10000, seed=0) -> tuple[float, float, float]:
    """(mean of 100*(t/c - 1), low, high): percentile bootstrap over pairs, widened to at least the t interval."""
    d = 100.0 * (np.asarray(treated, dtype=float) / np.asarray(control, dtype=float) - 1.0)
    return mean_ci(d, confidence=confidence, n_boot=n_boot, seed=seed)


def mean_ci(d, *, confidence=0.95, n_boot=10000, seed=0) -> tuple[float, float, float]:
    """(mean, low, high) of the values d: percentile bootstrap widened to at least the Student-t interval."""
    d = np.asarray(d, dtype=float)
    n = d.size
    mean = float(d.mean()) if n else math.nan
    if n < 2:
        return mean, math.nan, math.nan
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    boot = d[idx].mean(axis=1)
    tail = (1.0 - confidence) / 2.0
    b_low, b_high = np.quantile(boot, [tail, 1.0 - tail])
    half = stats.t.ppf(1.0 - tail, n - 1) * d.std(ddof=1) / math.sqrt(n)
    return mean, float(min(b_low, mean - half)), float(max(b_high, mean + half))


def _fisher(dt: int, nt: int, dc: int, nc: int) -> float:
    if dt == 0 and dc == 0 or nt == 0 or nc == 0:
        return 1.0
    return float(stats.fisher_exact([[dt, nt - dt], [dc, nc - dc]]).pvalue)


@functools.lru_cache(maxsize=4096)  # a study repeats the same few counts
def _boschloo(dt: int, nt: int, dc: int, nc: int) -> float:
    """Boschloo's exact unconditional test (Boschloo 1970, Statistica Neerlandica 24:1): uniformly more powerful
    than Fisher's; 1 when nothing (or everything) diverged on both sides."""
    if nt == 0 or nc == 0 or dt + dc in (0, nt + nc):
        return 1.0
    return float(stats.boschloo_exact([[dt, dc], [nt - dt, nc - dc]]).pvalue)  # columns: the two samples


def compare(lr: float, config: str, treated: dict[int, tuple[float, bool]], control: dict[int, tuple[float, bool]],
            *, confidence=0.95, n_boot=10000, seed=0) -> Comparison:
    """treated/control: seed -> (final validation loss, diverged). Loss is compared on seeds present on both
    sides where neither run diverged and both losses are finite (and the control loss positive, so the
    relative difference is defined)."""
    dt = sum(bool(div) for _, div in treated.values())
    dc = sum(bool(div) for _, div in control.values())
    pairs = []
    for s in sorted(treated.keys() & control.keys()):
        (lt, div_t), (lc, div_c) = treated[s], control[s]
        if not (div_t or div_c) and math.isfinite(lt) and math.isfinite(lc) and lc > 0:
            pairs.append((lt, lc))
    t = np.array([p[0] for p in pairs], dtype=float)
    c = np.array([p[1] for p in pairs], dtype=float)
    diff, low, high = paired_difference_ci(t, c, confidence=confidence, n_boot=n_boot, seed=seed)
    if len(pairs) < 2:
        w = math.nan
    elif np.all(t == c):
        w = 1.0
    else:
        w = float(stats.wilcoxon(t, c).pvalue)
    d = 100.0 * (t / c - 1.0) if len(pairs) else np.array([])
    return Comparison(lr=lr, config=config, n_treated=len(treated), n_control=len(control),
                      diverged_treated=dt, diverged_control=dc, fisher_p=_fisher(dt, len(treated), dc, len(control)),
                      n_pairs=len(pairs), diff_pct=diff, ci_low=low, ci_high=high, wilcoxon_p=w,
                      confidence=confidence, t_p=t_test_p(d), diffs=tuple(float(x) for x in d),
                      boschloo_p=_boschloo(dt, len(treated), dc, len(control)))


def t_test_p(d) -> float:
    """Two-sided p of the one-sample t-test of mean(d) = 0; nan below 2 values; 1 or 0 when d has no spread."""
    d = np.asarray(d, dtype=float)
    if d.size < 2:
        return math.nan
    sd = float(d.std(ddof=1))
    if sd == 0:
        return 1.0 if float(d.mean()) == 0 else 0.0
    tstat = float(d.mean()) / (sd / math.sqrt(d.size))
    return float(2 * stats.t.sf(abs(tstat), d.size - 1))


OUTCOMES = {
    "helped": "clipping lowered the divergence rate or the final validation loss, significant after Holm's "
              "adjustment across every test of the study, with the simultaneous interval excluding zero (and no "
              "divergence change, even an insignificant one, the other way)",
    "hurt": "the same, in the other direction: more divergences or a higher final validation loss",
    "equivalent": "the simultaneous interval of the loss difference lies inside +-margin and both sides diverged "
                  "equally often: any effect is smaller than the stated minimum",
    "inconclusive": "none of the above: with this many seeds the data cannot tell",
}


def holm(pvalues) -> np.ndarray:
    """Holm's step-down adjusted p-values (nan entries stay nan and do not count in the family)."""
    p = np.asarray(pvalues, dtype=float)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    m = ok.size
    order = ok[np.argsort(p[ok], kind="stable")]
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out


def wilson(x: int, n: int, z: float) -> tuple[float, float]:
    """Wilson score interval of a proportion x/n."""
    if n == 0:
        return 0.0, 1.0
    p = x / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def rate_difference_ci(dt: int, nt: int, dc: int, nc: int, confidence: float) -> tuple[float, float, float]:
    """Treated minus control proportion with Newcombe's hybrid score interval (Newcombe 1998, method 10)."""
    if nt == 0 or nc == 0:
        return math.nan, math.nan, math.nan
    z = float(stats.norm.ppf(0.5 + confidence / 2))
    pt, pc = dt / nt, dc / nc
    (lt, ut), (lc, uc) = wilson(dt, nt, z), wilson(dc, nc, z)
    d = pt - pc
    return d, d - math.sqrt((pt - lt) ** 2 + (uc - pc) ** 2), d + math.sqrt((ut - pt) ** 2 + (pc - lc) ** 2)


@dataclass(frozen=True)
class Verdict:
    """One comparison judged within its study's family of tests."""

    comparison: Comparison
    outcome: str
    loss_outcome: str
    loss_p_adj: float
    loss_low: float  # simultaneous interval of the relative loss difference (percent)
    loss_high: float
    div_outcome: str
    div_effect: float  # treated minus control divergence rate (percentage points)
    div_low: float
    div_high: float
    div_p_adj: float
    level: float  # the simultaneous intervals' per-comparison confidence (1 - alpha/m)
    family: int  # m: the tests in the study's family
    margin_pct: float


def _divergence_tested(c: Comparison) -> bool:
    """A divergence count with nothing (or everything) diverged on both sides can never be rejected (p = 1):
    it is left out of the family (the simulated null studies in the tests check the family-wise rate)."""
    total = c.diverged_treated + c.diverged_control
    return c.n_treated > 0 and c.n_control > 0 and 0 < total < c.n_treated + c.n_control


def judge(comps: list[Comparison], *, alpha: float = 0.05, margin_pct: float = 2.0, n_boot: int = 10000,
          seed: int = 0) -> list[Verdict]:
    """Every comparison of a study judged together: Holm-adjusted p-values over the family (each tested
    divergence count and each loss difference with at least 2 pairs), simultaneous intervals at 1 - alpha/m."""
    p = [c.boschloo_p if _divergence_tested(c) else math.nan for c in comps] + \
        [c.t_p if c.n_pairs >= 2 else math.nan for c in comps]
    adj = holm(p)
    m = int(np.isfinite(np.asarray(p, dtype=float)).sum())
    level = 1 - alpha / max(m, 1)
    out = []
    for i, c in enumerate(comps):
        div_adj, loss_adj = adj[i], adj[len(comps) + i]
        _, low, high = mean_ci(c.diffs, confidence=level, n_boot=n_boot, seed=seed) if c.n_pairs >= 2 else \
            (math.nan, math.nan, math.nan)
        d, dlow, dhigh = rate_difference_ci(c.diverged_treated, c.n_treated, c.diverged_control, c.n_control, level)
        div = ("helped" if d < 0 else "hurt") if div_adj < alpha and dhigh * dlow > 0 else "inconclusive"
        loss = "inconclusive"
        if loss_adj < alpha and high < 0:
            loss = "helped"
        elif loss_adj < alpha and low > 0:
            loss = "hurt"
        elif -margin_pct < low and high < margin_pct:
            loss = "equivalent"
        out.append(Verdict(c, _overall(c, div, loss), loss, loss_adj, low, high, div, 100 * d, 100 * dlow,
                           100 * dhigh, div_adj, level, m, margin_pct))
    return out


def _overall(c: Comparison, div: str, loss: str) -> str:
    """Divergence first; a loss verdict (which compares only the runs that did not diverge) stands only when
    the divergence counts do not point the other way."""
    if div in ("helped", "hurt"):
        return div
    change = _divergence_change(c)
    if loss == "helped":
        return "helped" if change <= 0 else "inconclusive"
    if loss == "hurt":
        return "hurt" if change >= 0 else "inconclusive"
    if loss == "equivalent" and change == 0:
        return "equivalent"
    return "inconclusive"


def _divergence_change(c: Comparison) -> float:
    """Treated minus control divergence rate (0 when either side has no runs)."""
    if c.n_treated == 0 or c.n_control == 0:
        return 0.0
    return c.diverged_treated / c.n_treated - c.diverged_control / c.n_control


def format_p(p: float) -> str:
    """'<0.001', '0.048', '0.81'; 'n/a' for nan."""
    if p is None or math.isnan(p):
        return "n/a"
    return "<0.001" if p < 0.001 else f"{p:.2g}"


def format_lr(lr: float) -> str:
    """Short learning rate: 1e-2, 3e-4, 2.5e-3, 0.1, 1, 3."""
    if lr == 0 or abs(lr) >= 0.1:
        return f"{lr:g}"
    mantissa, exponent = f"{lr:.6e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"


def _p(p: float) -> str:
    text = format_p(p)
    return f"p{text}" if text.startswith("<") else f"p={text}"


def pct(x: float) -> str:
    """'+1.2%', '-0.5%', '0.0%' (no signed zero); 'n/a' for nan."""
    if x is None or not math.isfinite(x):
        return "n/a"
    return "0.0%" if round(x, 1) == 0 else f"{x:+.1f}%"


def _interval(v: Verdict) -> str:
    return f"simultaneous {100 * v.level:.4g}% interval [{pct(v.loss_low)}, {pct(v.loss_high)}]"


def _sentences(v: Verdict) -> list[str]:
    c, result = v.comparison, v.outcome
    change = _divergence_change(c)
    fisher = f"Boschloo exact {_p(c.boschloo_p)}, Holm-adjusted {_p(v.div_p_adj)}"
    if v.div_outcome in ("helped", "hurt"):
        return [f"{c.config} {result}: it diverged in {c.diverged_treated} of {c.n_treated} seeds ({fisher})."]
    out = []
    if change != 0:
        out.append(f"{c.config} diverged in {c.diverged_treated} of {c.n_treated} vs {c.diverged_control} of "
                   f"{c.n_control} ({fisher}): not conclusive with this many seeds.")
    elif c.diverged_treated:
        out.append(f"{c.config} also diverged in {c.diverged_treated} of {c.n_treated}.")
    if c.n_pairs < 2:
        if change != 0 and c.diverged_control == c.n_control:
            return out  # every unclipped run diverged: the divergence counts are all there is to say
        if c.diverged_control == c.n_control and c.diverged_treated == c.n_treated:
            out.append(f"{c.config}: every run on both sides diverged, so there is no loss to compare.")
        else:
            pairs = f"{c.n_pairs} pair{'' if c.n_pairs == 1 else 's'}"
            out.append(f"{c.config}: inconclusive: too few comparable runs to tell ({pairs} where neither run "
                       "diverged); more seeds are needed.")
        return out
    numbers = (f"difference {pct(c.diff_pct)}, {_interval(v)}, Holm-adjusted {_p(v.loss_p_adj)}, "
               f"{c.n_pairs} pairs")
    if result == "inconclusive" and v.loss_outcome in ("helped", "hurt"):
        out.append(f"{c.config}: inconclusive: its final validation loss differed ({numbers}) in the opposite "
                   "direction to its divergences, and the loss compares only runs that did not diverge.")
    elif result == "helped":
        out.append(f"{c.config} helped: final validation loss was lower ({numbers}).")
    elif result == "hurt":
        out.append(f"{c.config} hurt: final validation loss was higher ({numbers}).")
    elif result == "equivalent":
        out.append(f"{c.config} was equivalent: final validation loss differed by less than the "
                   f"+-{v.margin_pct:g}% margin ({numbers}).")
    else:
        out.append(f"{c.config}: inconclusive: final validation loss showed no significant difference and no "
                   f"equivalence within +-{v.margin_pct:g}% ({numbers}); more seeds are needed to narrow the "
                   "interval.")
    return out


def verdict(verdicts: list[Verdict], *, control_label: str = "unclipped training", label: str | None = None) -> str:
    """Plain-words paragraph for one learning rate (all comparisons share lr and control runs)."""
    if not verdicts:
        return ""
    first = verdicts[0].comparison
    parts = [f"At {label or 'lr=' + format_lr(first.lr)}: {control_label} diverged in {first.diverged_control} of "
             f"{first.n_control} seeds."]
    for v in verdicts:
        parts.extend(_sentences(v))
    return " ".join(parts)
