"""Statistics for the clipping stability study: each clip config against unclipped training, paired by seed.

Pure functions (numpy + scipy). Few seeds must give wide intervals, never false certainty: the bootstrap
confidence interval is never narrower than the Student-t interval of the same mean.
"""

from __future__ import annotations

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


def paired_difference_ci(treated, control, *, confidence=0.95, n_boot=10000, seed=0) -> tuple[float, float, float]:
    """(mean of 100*(t/c - 1), low, high): percentile bootstrap over pairs, widened to at least the t interval."""
    d = 100.0 * (np.asarray(treated, dtype=float) / np.asarray(control, dtype=float) - 1.0)
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
    return Comparison(lr=lr, config=config, n_treated=len(treated), n_control=len(control),
                      diverged_treated=dt, diverged_control=dc, fisher_p=_fisher(dt, len(treated), dc, len(control)),
                      n_pairs=len(pairs), diff_pct=diff, ci_low=low, ci_high=high, wilcoxon_p=w,
                      confidence=confidence)


def _divergence_change(c: Comparison) -> float:
    """Treated minus control divergence rate (0 when either side has no runs)."""
    if c.n_treated == 0 or c.n_control == 0:
        return 0.0
    return c.diverged_treated / c.n_treated - c.diverged_control / c.n_control


def outcome(c: Comparison, alpha: float = 0.05) -> str:
    """'helped', 'hurt', 'no difference' or 'inconclusive': divergence first, then the loss CI."""
    change = _divergence_change(c)
    if change != 0 and c.fisher_p < alpha:
        return "helped" if change < 0 else "hurt"
    if c.n_pairs >= 2:
        # a loss verdict against the (not significant) direction of divergences would judge survivors only
        if c.ci_high < 0:
            return "helped" if change <= 0 else "inconclusive"
        if c.ci_low > 0:
            return "hurt" if change >= 0 else "inconclusive"
        return "no clear difference"
    return "inconclusive"


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


def _pct(x: float) -> str:
    return "0.0%" if round(x, 1) == 0 else f"{x:+.1f}%"


def _sentences(c: Comparison, alpha: float) -> list[str]:
    result = outcome(c, alpha)
    change = _divergence_change(c)
    fisher = f"Fisher exact {_p(c.fisher_p)}"
    if change != 0 and c.fisher_p < alpha:
        return [f"{c.config} {result}: it diverged in {c.diverged_treated} of {c.n_treated} seeds ({fisher})."]
    out = []
    if change != 0:
        out.append(f"{c.config} diverged in {c.diverged_treated} of {c.n_treated} vs {c.diverged_control} of "
                   f"{c.n_control} ({fisher}): not conclusive with this many seeds.")
    elif c.diverged_treated:
        out.append(f"{c.config} also diverged in {c.diverged_treated} of {c.n_treated}.")
    if result == "inconclusive" and c.n_pairs >= 2:
        out.append(f"{c.config}: no verdict: its final validation loss differed (difference {_pct(c.diff_pct)}, "
                   f"{100 * c.confidence:g}% CI [{_pct(c.ci_low)}, {_pct(c.ci_high)}], {c.n_pairs} pairs) in the "
                   "opposite direction to its divergences, and the loss compares only runs that did not diverge.")
        return out
    if result == "inconclusive" and c.diverged_control == c.n_control and c.diverged_treated == c.n_treated:
        out.append(f"{c.config}: every run on both sides diverged, so there is no loss to compare.")
        return out
    if result == "inconclusive":
        pairs = f"{c.n_pairs} pair{'' if c.n_pairs == 1 else 's'}"
        out.append(f"{c.config}: too few comparable runs to tell ({pairs} where neither run diverged); "
                   "more seeds are needed.")
        return out
    numbers = (f"difference {_pct(c.diff_pct)}, {100 * c.confidence:g}% CI [{_pct(c.ci_low)}, {_pct(c.ci_high)}], "
               f"Wilcoxon {_p(c.wilcoxon_p)}, {c.n_pairs} pairs")
    words = {"helped": "helped: final validation loss was lower",
             "hurt": "hurt: final validation loss was higher",
             "no clear difference": "made no clear difference: final validation loss did not clearly differ"}[result]
    out.append(f"{c.config} {words} ({numbers}).")
    if c.ci_high - c.ci_low > 10 or (c.n_pairs < 5 and c.ci_high - c.ci_low > 1):
        out.append("More seeds are needed to narrow that interval.")
    return out


def verdict(comparisons: list[Comparison], *, control_label: str = "unclipped training", alpha: float = 0.05,
            label: str | None = None) -> str:
    """Plain-words paragraph for one learning rate (all comparisons share lr and control runs)."""
    if not comparisons:
        return ""
    first = comparisons[0]
    parts = [f"At {label or 'lr=' + format_lr(first.lr)}: {control_label} diverged in {first.diverged_control} of "
             f"{first.n_control} seeds."]
    for c in comparisons:
        parts.extend(_sentences(c, alpha))
    return " ".join(parts)
