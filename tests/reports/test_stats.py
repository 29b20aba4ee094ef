"""fincast.reports.stats against references computed in this file.

Fisher's exact test and the exact Wilcoxon signed-rank test are checked against hand enumerations (math.comb,
all 2^n sign assignments); the confidence interval against the Student-t interval written out here. Nothing
from fincast is used to compute an expected value.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from fincast.reports.stats import (
    compare,
    format_lr,
    format_p,
    holm,
    judge,
    paired_difference_ci,
    rate_difference_ci,
    verdict,
)

T_975_DF2 = 4.302652729911275  # Student-t 97.5% quantile, 2 degrees of freedom


def fisher_two_sided(a: int, n1: int, b: int, n2: int) -> float:
    """Sum of hypergeometric probabilities of all tables (same margins) no more likely than the observed one."""
    k, n = a + b, n1 + n2

    def prob(x):
        return math.comb(n1, x) * math.comb(n2, k - x) / math.comb(n, k)

    observed = prob(a)
    xs = range(max(0, k - n2), min(k, n1) + 1)
    return min(1.0, sum(prob(x) for x in xs if prob(x) <= observed * (1 + 1e-9)))


def boschloo_two_sided(a: int, n1: int, b: int, n2: int, grid: int = 20001) -> float:
    """Boschloo's test from its definition: the statistic is Fisher's one-sided p (hypergeometric tail of the
    treated count given the margins); the p-value the largest, over the common divergence probability pi, binomial
    probability of tables whose statistic is no larger; two-sided = twice the smaller one-sided p."""
    def tail(x1, x2, lower):
        k, n = x1 + x2, n1 + n2
        xs = range(max(0, k - n2), min(k, n1) + 1)
        pick = [x for x in xs if (x <= x1 if lower else x >= x1)]
        return sum(math.comb(n1, x) * math.comb(n2, k - x) for x in pick) / math.comb(n, k)

    pis = np.linspace(0, 1, grid)
    sides = []
    for lower in (True, False):
        obs = tail(a, b, lower)
        prob = np.zeros(grid)
        for x1 in range(n1 + 1):
            for x2 in range(n2 + 1):
                if tail(x1, x2, lower) <= obs * (1 + 1e-12):
                    prob += math.comb(n1, x1) * math.comb(n2, x2) * pis ** (x1 + x2) * (1 - pis) ** (n1 + n2 - x1 - x2)
        sides.append(float(prob.max()))
    return min(1.0, 2 * min(sides))


def wilcoxon_exact(d) -> float:
    """Two-sided exact p of the signed-rank statistic, by enumerating every sign assignment of the ranks."""
    ranks = np.argsort(np.argsort(np.abs(d))) + 1  # distinct |d| assumed
    w_obs = ranks[np.asarray(d) > 0].sum()
    sums = [sum(r for r, s in zip(ranks, signs) if s) for signs in itertools.product([0, 1], repeat=len(d))]
    lower = sum(w <= w_obs for w in sums) / len(sums)
    upper = sum(w >= w_obs for w in sums) / len(sums)
    return min(1.0, 2 * min(lower, upper))


def runs(losses, diverged=()):
    return {s: (float(v), s in diverged) for s, v in enumerate(losses)}


CONTROL = [1.00, 1.10, 0.95, 1.20, 1.05]


# ---------------------------------------------------------------- Fisher exact


@pytest.mark.parametrize("dt,nt,dc,nc", [(0, 5, 4, 5), (0, 5, 3, 5), (5, 5, 0, 5), (1, 3, 3, 3), (2, 10, 7, 8),
                                          (1, 5, 1, 5), (0, 4, 2, 6)])
def test_fisher_matches_hand_enumeration(dt, nt, dc, nc):
    treated = {s: (1.0, s < dt) for s in range(nt)}
    control = {s: (1.0, s < dc) for s in range(nc)}
    c = compare(1e-2, "x", treated, control, n_boot=200)
    assert (c.n_treated, c.n_control, c.diverged_treated, c.diverged_control) == (nt, nc, dt, dc)
    assert c.fisher_p == pytest.approx(fisher_two_sided(dt, nt, dc, nc), rel=1e-9)


@pytest.mark.parametrize("dt,nt,dc,nc", [(0, 5, 5, 5), (1, 5, 5, 5), (0, 5, 3, 5), (2, 10, 7, 8), (3, 40, 12, 40)])
def test_boschloo_matches_its_definition(dt, nt, dc, nc):
    treated = {s: (1.0, s < dt) for s in range(nt)}
    control = {s: (1.0, s < dc) for s in range(nc)}
    got = compare(1e-2, "x", treated, control, n_boot=200).boschloo_p
    assert got == pytest.approx(boschloo_two_sided(dt, nt, dc, nc), rel=2e-3)
    assert got <= compare(1e-2, "x", treated, control, n_boot=200).fisher_p + 1e-12  # never less powerful


def test_fisher_known_values_and_no_divergence():
    assert fisher_two_sided(0, 5, 4, 5) == pytest.approx(0.047619, abs=1e-6)  # the reference itself: 2 * 5/105
    assert compare(1e-2, "x", runs(CONTROL), runs(CONTROL), n_boot=200).fisher_p == 1.0


# ---------------------------------------------------------------- Wilcoxon


@pytest.mark.parametrize("rel", [[0.02, 0.03, 0.01, 0.05, 0.04], [0.02, -0.03, 0.011, -0.05, 0.04],
                                 [-0.02, -0.031, -0.01, 0.05, -0.04]])
def test_wilcoxon_exact_for_five_pairs(rel):
    treated = [c * (1 + r) for c, r in zip(CONTROL, rel)]
    got = compare(1e-2, "x", runs(treated), runs(CONTROL), n_boot=200).wilcoxon_p
    assert got == pytest.approx(wilcoxon_exact(np.array(treated) - np.array(CONTROL)), rel=1e-9)


def test_wilcoxon_all_equal_and_too_few():
    assert compare(1e-2, "x", runs(CONTROL), runs(CONTROL), n_boot=200).wilcoxon_p == 1.0
    assert math.isnan(compare(1e-2, "x", runs([1.0]), runs([2.0]), n_boot=200).wilcoxon_p)


# ---------------------------------------------------------------- confidence interval


def t_interval(d, confidence=0.95, tq=None):
    from scipy import stats

    d = np.asarray(d, dtype=float)
    n = d.size
    tq = tq if tq is not None else stats.t.ppf((1 + confidence) / 2, n - 1)
    half = tq * d.std(ddof=1) / math.sqrt(n)
    return d.mean() - half, d.mean() + half


def test_three_pairs_never_narrower_than_t_interval():
    t, c = [1.02, 0.97, 1.06], [1.0, 1.0, 1.0]
    d = [2.0, -3.0, 6.0]
    mean, low, high = paired_difference_ci(t, c, seed=1)
    t_low, t_high = t_interval(d, tq=T_975_DF2)
    assert mean == pytest.approx(np.mean(d))
    assert low <= t_low + 1e-9 and high >= t_high - 1e-9
    # with 3 pairs the bootstrap can't go beyond the data range, so the t interval is what is reported
    assert (low, high) == pytest.approx((t_low, t_high))
    assert high - low > max(d) - min(d)


def test_many_pairs_bootstrap_close_to_t_interval():
    rng = np.random.default_rng(42)
    c = rng.uniform(0.5, 2.0, 200)
    t = c * (1 - 0.02 + 0.01 * rng.standard_normal(200))
    d = 100 * (t / c - 1)
    mean, low, high = paired_difference_ci(t, c, seed=3)
    t_low, t_high = t_interval(d)
    assert low <= t_low + 1e-12 and high >= t_high - 1e-12
    assert (high - low) < 1.1 * (t_high - t_low)
    assert low < -2.0 < high and high < 0


def test_ci_coverage_with_five_seeds():
    """With 5 pairs the nominal 95% interval must cover the true mean about 95% of the time (bootstrap alone:
    roughly 80-85%)."""
    rng = np.random.default_rng(7)
    hits, trials = 0, 300
    for i in range(trials):
        c = rng.uniform(0.5, 1.5, 5)
        t = c * (1 + 0.01 * (1 + rng.standard_normal(5)))  # true mean difference +1%
        _, low, high = paired_difference_ci(t, c, n_boot=1000, seed=i)
        hits += low <= 1.0 <= high
    assert hits / trials >= 0.9


def test_ci_degenerate_sizes():
    assert all(math.isnan(x) for x in paired_difference_ci([], []))
    mean, low, high = paired_difference_ci([1.1], [1.0])
    assert mean == pytest.approx(10.0) and math.isnan(low) and math.isnan(high)


def test_deterministic_and_seed_dependent():
    t = [c * (1 + r) for c, r in zip(CONTROL, [0.02, -0.01, 0.03, 0.0, 0.015])]
    a = compare(1e-3, "x", runs(t), runs(CONTROL), seed=5)
    assert a == compare(1e-3, "x", runs(t), runs(CONTROL), seed=5)
    rng = np.random.default_rng(0)
    c = rng.uniform(1, 2, 30)
    t2 = c * (1 + 0.05 * rng.lognormal(0, 1.5, 30))  # skewed: the bootstrap's upper tail beats the t interval
    assert paired_difference_ci(t2, c, seed=1) == paired_difference_ci(t2, c, seed=1)
    assert paired_difference_ci(t2, c, seed=1) != paired_difference_ci(t2, c, seed=2)


def test_scaling_both_losses_changes_nothing():
    t = [c * (1 + r) for c, r in zip(CONTROL, [0.02, -0.01, 0.03, 0.004, 0.015])]
    a = compare(1e-3, "x", runs(t), runs(CONTROL))
    b = compare(1e-3, "x", runs(np.array(t) * 37.5), runs(np.array(CONTROL) * 37.5))
    for field in ("diff_pct", "ci_low", "ci_high", "wilcoxon_p"):
        assert getattr(b, field) == pytest.approx(getattr(a, field), rel=1e-9)
    assert a.diff_pct == pytest.approx(np.mean([2, -1, 3, 0.4, 1.5]))


# ---------------------------------------------------------------- pairing by seed


def test_pairing_by_seed_excludes_missing_diverged_and_nonfinite():
    control = {0: (1.0, False), 1: (1.0, False), 2: (1.0, True), 3: (1.0, False), 4: (math.nan, False),
               5: (2.0, False), 6: (1.0, False)}
    treated = {0: (1.1, False), 1: (0.9, True), 2: (0.5, False), 3: (math.inf, False), 4: (1.0, False),
               5: (1.8, False), 9: (5.0, False)}
    c = compare(1e-2, "x", treated, control, n_boot=500)
    assert c.n_pairs == 2  # seeds 0 and 5 only
    assert c.diff_pct == pytest.approx((10.0 + -10.0) / 2)
    assert (c.n_treated, c.n_control, c.diverged_treated, c.diverged_control) == (7, 7, 1, 1)


def test_pairs_by_seed_not_by_position():
    control = {10: (1.0, False), 20: (2.0, False), 30: (4.0, False)}
    treated = {30: (4.4, False), 10: (1.1, False), 20: (2.2, False)}  # +10% each, in another order
    c = compare(1e-2, "x", treated, control, n_boot=500)
    assert c.diff_pct == pytest.approx(10.0)
    assert c.ci_low == pytest.approx(10.0) and c.ci_high == pytest.approx(10.0)


# ---------------------------------------------------------------- verdicts: one family per study


def one(c, **kw):
    """A comparison judged as a family of its own."""
    return judge([c], n_boot=500, **kw)[0]


def helped_by_divergence():
    return compare(1e-2, "norm1.0", runs([0.9] * 5), runs(CONTROL, diverged={0, 1, 2, 3}))


def test_holm_against_hand_computation():
    p = [0.01, 0.04, math.nan, 0.03, 0.005]
    # sorted 0.005, 0.01, 0.03, 0.04 (m=4): 4*0.005=0.02, 3*0.01=0.03, 2*0.03=0.06, max(0.06, 1*0.04)=0.06
    got = holm(p)
    assert got[[4, 0, 3, 1]] == pytest.approx([0.02, 0.03, 0.06, 0.06]) and math.isnan(got[2])
    assert holm([0.9, 0.8]) == pytest.approx([1.0, 1.0])  # 2 x 0.8 capped at 1; monotone after it
    assert holm([0.01, 0.5]) == pytest.approx([0.02, 0.5])


def test_newcombe_interval_matches_the_paper():
    """Newcombe (1998), Statistics in Medicine 17:873, table II, method 10: 56/70 - 48/80 = 0.2000,
    95% CI 0.0524 to 0.3339."""
    d, low, high = rate_difference_ci(56, 70, 48, 80, 0.95)
    assert d == pytest.approx(0.2) and low == pytest.approx(0.0524, abs=5e-4) and high == pytest.approx(0.3339, abs=5e-4)


def test_helped_by_divergence():
    v = one(helped_by_divergence())
    assert v.outcome == "helped" and v.family == 1  # the divergence counts (one comparable loss pair: no test)
    text = verdict([v])
    assert text.startswith("At lr=1e-2: unclipped training diverged in 4 of 5 seeds.")
    assert text.count("4 of 5") == 1
    for phrase in ("norm1.0 helped", "0 of 5", "Boschloo exact p=0.", "Holm-adjusted"):
        assert phrase in text
    assert "p=0.000" not in text


def test_hurt_by_divergence():
    v = one(compare(1e-2, "norm9", runs([0.9] * 5, diverged={0, 1, 2, 3, 4}), runs(CONTROL)))
    assert v.outcome == "hurt" and v.div_effect == pytest.approx(100.0)
    assert "norm9 hurt" in verdict([v]) and "5 of 5" in verdict([v])


def test_helped_by_loss():
    rel = [-0.05, -0.052, -0.048, -0.051, -0.049]
    v = one(compare(3e-4, "autoclip-p10", runs([c * (1 + r) for c, r in zip(CONTROL, rel)]), runs(CONTROL)))
    assert v.loss_high < 0 and v.outcome == "helped"
    text = verdict([v])
    assert text.startswith("At lr=3e-4: unclipped training diverged in 0 of 5 seeds.")
    for phrase in ("autoclip-p10 helped", "lower", "difference -5.0%", "simultaneous 95% interval [-", "5 pairs"):
        assert phrase in text


def test_hurt_by_loss():
    rel = [0.10, 0.12, 0.09, 0.11, 0.105]
    v = one(compare(0.1, "norm0.1", runs([c * (1 + r) for c, r in zip(CONTROL, rel)]), runs(CONTROL)))
    assert v.loss_low > 0 and v.outcome == "hurt"
    for phrase in ("At lr=0.1:", "norm0.1 hurt", "higher", "difference +10.5%", "interval [+"):
        assert phrase in verdict([v])


def test_equivalent_only_inside_the_margin():
    rel = [0.001, -0.002, 0.0005, -0.0003, 0.0001]
    c = compare(1.0, "norm5", runs([c * (1 + r) for c, r in zip(CONTROL, rel)]), runs(CONTROL))
    v = one(c)
    assert -2 < v.loss_low < v.loss_high < 2 and v.outcome == "equivalent"
    assert "norm5 was equivalent" in verdict([v]) and "+-2% margin" in verdict([v])
    assert one(c, margin_pct=0.1).outcome == "inconclusive"  # the same interval, a smaller minimum effect
    rel = [0.2, -0.15, 0.1, -0.12, 0.05]  # spread of ~15 points: no difference shown, and no equivalence either
    wide = one(compare(1.0, "norm5", runs([c * (1 + r) for c, r in zip(CONTROL, rel)]), runs(CONTROL)))
    assert wide.outcome == "inconclusive" and wide.loss_low < -2 and wide.loss_high > 2
    assert "no equivalence within +-2%" in verdict([wide]) and "more seeds" in verdict([wide])


def test_equivalent_losses_with_unequal_divergences_are_inconclusive():
    rel = [0.001, -0.002, 0.0005, -0.0003, 0.0001, 0.0, 0.0002]
    control = {s: (1.0 + 0.1 * s, s == 7) for s in range(8)}
    treated = {s: ((1.0 + 0.1 * s) * (1 + rel[s]), False) if s < 7 else (1.0, False) for s in range(8)}
    v = one(compare(1.0, "x", treated, control))
    assert v.loss_outcome == "equivalent" and v.outcome == "inconclusive"


def test_nonsignificant_divergence_is_called_not_conclusive():
    v = one(compare(3.0, "zclip", runs([0.9] * 5, diverged={0, 1, 2}), runs(CONTROL)))
    assert v.comparison.fisher_p == pytest.approx(fisher_two_sided(3, 5, 0, 5))  # 1/6
    text = verdict([v])
    assert "At lr=3:" in text and "3 of 5 vs 0 of 5 (Boschloo exact p=0.062" in text
    assert "not conclusive with this many seeds" in text and v.outcome == "inconclusive"


def test_inconclusive_with_fewer_than_two_pairs():
    c = compare(1e-2, "norm2", runs([1.0, 1.0, 1.0], diverged={1, 2}), runs([1.0, 1.1, 1.2], diverged={0}))
    assert c.n_pairs == 0 and math.isnan(c.diff_pct) and math.isnan(c.ci_low)
    assert one(c).outcome == "inconclusive"
    assert "too few comparable runs to tell" in verdict([one(c)])
    single = compare(1e-2, "norm2", runs([1.0, 1.0]), runs([1.0, 1.1], diverged={0}))
    assert single.n_pairs == 1 and one(single).outcome == "inconclusive"
    assert "1 pair where" in verdict([one(single)])


def test_verdict_states_control_once_for_several_configs():
    rel = [0.01, -0.02, 0.005, -0.003, 0.001]
    comps = [compare(1e-2, "autoclip-p10", runs([c * (1 + r) for c, r in zip(CONTROL, rel)], diverged={0, 1, 2}),
                     runs(CONTROL, diverged={0, 1, 2, 3})), helped_by_divergence()]
    text = verdict(judge(comps, n_boot=500))
    assert text.count("unclipped training") == 1 and text.count("diverged in 4 of 5 seeds") == 1
    assert "autoclip-p10 diverged in 3 of 5 vs 4 of 5 (Boschloo exact p=" in text
    assert "autoclip-p10: inconclusive: too few comparable runs to tell (1 pair where" in text
    # alone norm1.0 helped (p=0.021); as one of two tests, Holm's adjusted p is 0.043
    assert "norm1.0 helped: it diverged in 0 of 5 seeds (Boschloo exact p=0.021, Holm-adjusted p=0.043)" in text
    assert verdict([]) == ""


def test_the_family_makes_a_single_call_harder():
    """Alone, a divergence difference of 4/5 vs 0/5 (p=0.048) is 'helped'; among 11 tests it is not."""
    assert one(helped_by_divergence()).outcome == "helped"
    rel = [0.01, -0.02, 0.005, -0.003, 0.001]
    others = [compare(1e-2, f"c{i}", runs([c * (1 + r) for c, r in zip(CONTROL, rel)], diverged={0}),
                      runs(CONTROL)) for i in range(5)]
    v = judge([helped_by_divergence(), *others], n_boot=200)[0]
    assert v.family == 11 and v.div_p_adj > 0.05 and v.outcome == "inconclusive"


def test_a_loss_verdict_against_the_divergences_is_no_verdict():
    """Losses compare only the survivors: a config that diverged more often (not significantly) is not
    'helped' by a lower loss of its surviving seeds."""
    seeds = range(8)
    control = {s: (1.0 + 0.1 * s, False) for s in seeds}
    treated = {s: ((1.0 + 0.1 * s) * 0.9, s < 2) for s in seeds}
    v = one(compare(3.0, "x", treated, control))
    assert v.loss_outcome == "helped" and v.outcome == "inconclusive"
    assert "in the opposite direction to its divergences" in verdict([v])
    treated = {s: ((1.0 + 0.1 * s) * 0.9, False) for s in seeds}
    assert one(compare(3.0, "x", treated, control)).outcome == "helped"


# ---------------------------------------------------------------- verdicts on simulated studies


def _simulated_study(rng, effect=0.0, lrs=5, configs=4, seeds=5, p_div=0.1):
    """A study of configs x lrs comparisons on null data (or with the first config's loss lowered by effect)."""
    comps = []
    for lr in range(lrs):
        control = {s: (float(rng.lognormal(0, 0.3)), bool(rng.random() < p_div)) for s in range(seeds)}
        for k in range(configs):
            shift = effect if k == 0 else 0.0
            treated = {s: (control[s][0] * (1 + shift) * float(rng.lognormal(0, 0.02)), bool(rng.random() < p_div))
                       for s in range(seeds)}
            comps.append(compare(10.0 ** -lr, f"c{k}", treated, control, n_boot=200, seed=int(rng.integers(1 << 30))))
    return judge(comps, n_boot=200)


def test_null_studies_call_helped_or_hurt_at_most_at_the_family_rate():
    """Where no arm differs, a study with 20 comparisons (40 tests) calls any helped/hurt in at most ~5% of
    studies (uncorrected, ~1 in 5 studies or more would)."""
    rng = np.random.default_rng(2026)
    studies = 200
    false = uncorrected = 0
    for _ in range(studies):
        verdicts = _simulated_study(rng)
        false += any(v.outcome in ("helped", "hurt") for v in verdicts)
        uncorrected += any(v.comparison.t_p < 0.05 or v.comparison.fisher_p < 0.05 for v in verdicts)
    assert false / studies <= 0.085  # 0.05 plus binomial noise (sd 1.5 points at 200 studies)
    assert uncorrected / studies >= 0.3  # the same studies judged test by test


def test_a_planted_effect_is_found():
    rng = np.random.default_rng(7)
    found = false = 0
    for _ in range(20):
        verdicts = _simulated_study(rng, effect=-0.10, p_div=0.0)
        found += all(v.outcome == "helped" for v in verdicts if v.comparison.config == "c0")
        false += any(v.outcome in ("helped", "hurt") for v in verdicts if v.comparison.config != "c0")
    assert found >= 18 and false <= 3  # each study's chance of any false call is at most 5%


@pytest.mark.parametrize("p,text", [(0.0476, "0.048"), (0.81, "0.81"), (0.17, "0.17"), (1e-5, "<0.001"),
                                    (0.0, "<0.001"), (math.nan, "n/a"), (1.0, "1")])
def test_format_p(p, text):
    assert format_p(p) == text


@pytest.mark.parametrize("lr,text", [(1e-2, "1e-2"), (3e-4, "3e-4"), (0.1, "0.1"), (1, "1"), (3, "3"),
                                     (2.5e-3, "2.5e-3"), (0.3, "0.3"), (1e-5, "1e-5")])
def test_format_lr(lr, text):
    assert format_lr(lr) == text


def test_no_zero_p_values_printed():
    rng = np.random.default_rng(1)
    c = rng.uniform(1, 2, 60)
    big = compare(1e-2, "norm1.0", runs(c * 1.3), runs(c), n_boot=500)
    assert big.wilcoxon_p < 0.001
    text = verdict([one(big)])
    assert "Holm-adjusted p<0.001" in text and "0.000" not in text
