"""The stability report's HTML page (layer L3): the verdict first (a learning rate x clip config table of
outcomes, then the prose), the definitions and method, then the cells, figures, statistics and runs."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import pandas as pd

from fincast.reports import stats
from fincast.reports.html import CSS, img, num, ui_link

e = html.escape


def is_options(runs: pd.DataFrame) -> bool:
    """A study of option-pricing runs (their reference is Black-Scholes with historical vol, not the zero
    forecast)."""
    return bool(len(runs)) and "task" in runs and bool((runs["task"] == "options").all())


def _effect(v: stats.Verdict) -> str:
    """The effect that decided (divergence in points when it did, else the loss) and its simultaneous interval."""
    c = v.comparison
    if v.div_outcome in ("helped", "hurt") or (c.n_pairs < 2 and c.diverged_treated + c.diverged_control):
        return (f"diverged {c.diverged_treated}/{c.n_treated} vs {c.diverged_control}/{c.n_control}<br>"
                f"<small>{v.div_effect:+.0f} pts [{v.div_low:+.0f}, {v.div_high:+.0f}], "
                f"p<sub>adj</sub> {stats.format_p(v.div_p_adj)}</small>")
    if c.n_pairs < 2:
        return f"<small>{c.n_pairs} comparable pair{'' if c.n_pairs == 1 else 's'}</small>"
    return (f"loss {stats.pct(c.diff_pct)}<br><small>[{stats.pct(v.loss_low)}, {stats.pct(v.loss_high)}], "
            f"p<sub>adj</sub> {stats.format_p(v.loss_p_adj)}</small>")


def verdict_grid(comps: dict[str, list[stats.Verdict]], useless: set[str] = frozenset(),
                 reference: str = "the zero forecast") -> str:
    """Learning rates as rows, clip configs as columns; each cell the outcome in colour, its effect and the
    simultaneous interval; ``useless``: learning rates where no model compared beat the reference forecast."""
    configs = list(dict.fromkeys(v.comparison.config for vs in comps.values() for v in vs))
    rows = ["<table class='grid'><tr><th class='l'>learning rate</th>"
            + "".join(f"<th>{e(c)}</th>" for c in configs) + "</tr>"]
    for g, vs in comps.items():
        by = {v.comparison.config: v for v in vs}
        cells = []
        for c in configs:
            v = by.get(c)
            cells.append("<td>-</td>" if v is None else
                         f"<td class='o-{v.outcome}'><b>{v.outcome}</b><br>{_effect(v)}</td>")
        mark = f"<br><small class='hurt'>no model beat {e(reference)}</small>" if g in useless else ""
        rows.append(f"<tr><td class='l'>{e(g)}{mark}</td>{''.join(cells)}</tr>")
    rows.append("</table>")
    return "".join(rows)


def _method(settings: Any, comps: dict[str, list[stats.Verdict]]) -> str:
    first = next((v for vs in comps.values() for v in vs), None)
    m, level = (first.family, first.level) if first else (0, 1 - settings.family_alpha)
    defs = "".join(f"<li><span class='o-{k}'><b>{k}</b></span>: {e(t)}.</li>" for k, t in stats.OUTCOMES.items())
    return (
        f"<p class='note'>Each clip config is compared with <b>none</b> at the same learning rate, paired by seed, on "
        f"two metrics: divergence rate (Boschloo's exact test, Boschloo 1970; Newcombe's score interval of the difference, Newcombe 1998) and final "
        f"validation loss (relative difference, paired t-test; interval: percentile bootstrap widened to at least "
        f"the Student-t interval; Holm 1979 for the adjustment). The study makes <b>{m}</b> such tests; their p-values are adjusted with Holm's "
        f"step-down method, so the chance of any false helped or hurt in this study is at most "
        f"{settings.family_alpha:g} (family-wise). Intervals are simultaneous: each at the Bonferroni level "
        f"{100 * level:.4g}%. Minimum effect size (equivalence margin): +-{settings.equivalence_pct:g}% of the "
        f"unclipped loss. A divergence count with no runs diverged on either side cannot be tested and is not "
        f"counted.</p><ul class='note'>{defs}</ul>")


def page(study: str, parent, store, settings: Any, verdict_lines: list[str], cells: pd.DataFrame,
         comps: dict[str, list[stats.Verdict]], runs: pd.DataFrame, figs: dict[str, str], groups: list[str],
         out: Path) -> str:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>Stability report: {e(study)}</title>"
             f"<style>{CSS}</style></head><body>",
             f"<h1>Stability report: {e(study)}</h1>", "<h2 id='verdict'>1. Verdict</h2>",
             verdict_grid(comps, {g for g in groups if not (cells.loc[cells["group"] == g, "test_rmse_vs_naive_pct"]
                                                            < 0).any()},
                          "BS with hist vol" if is_options(runs) else "the zero forecast")]
    parts += [f"<p class='verdict'>{e(v)}</p>" for v in verdict_lines]
    parts.append(_method(settings, comps))
    parts.append(
        f"<p class='note'>Study parent run {ui_link(store.uri, store.experiment_id, parent.info.run_id)} in "
        f"<code>{e(store.uri)}</code>; {len(runs)} finished runs. Control: <b>none</b> (unclipped). A run counts as "
        f"diverged when its training became non-finite or its final validation loss exceeded "
        f"{settings.divergence_factor:g} x the zero forecast's. Loss comparisons use only seed pairs where neither "
        "run diverged. Files beside this page: verdicts.csv (one row per comparison and metric), summary.csv "
        "(cells), summary.json.</p>")
    parts += _cells(settings, cells, runs)
    parts += ["<h2>3. Loss curves</h2>", img(out, figs["loss"], "training loss curves"),
              img(out, figs["val"], "validation loss curves"),
              "<h2>4. Gradient norms</h2>", img(out, figs["norms"], "gradient norms over steps")]
    parts += [img(out, figs[f"dist:{g}"], f"gradient norm distribution at {g}") for g in groups
              if f"dist:{g}" in figs]
    parts += ["<h2>5. Stability map</h2>", img(out, figs["map"], "stability map")]
    parts += _statistics(comps)
    parts += _runs(store, runs)
    parts.append("</body></html>")
    return "\n".join(parts)


def _cells(settings: Any, cells: pd.DataFrame, runs: pd.DataFrame) -> list[str]:
    parts = ["<h2>2. Cells</h2><p class='note'>Losses are in training units (MSE of the scaled target); "
             "median [IQR] over seeds that did not diverge. Steps to target: first validation at or below the "
             + ("zero forecast's validation loss" if settings.loss_target is None else
                f"loss {settings.loss_target:g}")
             + ". Time per step relative to <b>none</b> at the same learning rate (runs share the machine, so "
             "this is indicative).</p>"]
    options = is_options(runs)
    ref, third = ("BS hist vol", "IV RMSE [vol pts]") if options else ("zero forecast", "dir. acc.")
    head = ["learning rate", "clip", "diverged", "final val loss", "best val loss",
            "test price RMSE" if options else "test RMSE", f"vs {ref}", third,
            *(["no-arb violations"] if options else []), "steps to target", "clipped steps", "spikes/run",
            "time/step vs none"]
    if options:
        parts.append("<p class='note'>Options pricing runs: test price RMSE in the underlying's currency beside "
                     "Black-Scholes with the shortest realised-vol window (same contracts); IV RMSE over contracts "
                     "whose predicted price has an implied vol; no-arbitrage violations: share of test prices below "
                     "the lower or above the upper bound, or non-monotone in strike.</p>")
    parts.append("<table><tr>" + "".join(f"<th class='l'>{h}</th>" if i < 2 else f"<th>{h}</th>"
                                         for i, h in enumerate(head)) + "</tr>")
    for c in cells.itertuples():
        worse = not (c.test_rmse_vs_naive_pct < 0)
        parts.append(
            f"<tr><td class='l'>{e(c.group)}</td><td class='l'>{e(c.clip)}</td><td>{c.diverged} of {c.runs}</td>"
            f"<td>{num(c.final_val_loss_median)} [{num(c.final_val_loss_q25)}, {num(c.final_val_loss_q75)}]</td>"
            f"<td>{num(c.best_val_loss_median)} [{num(c.best_val_loss_q25)}, {num(c.best_val_loss_q75)}]</td>"
            f"<td>{num(c.test_rmse_median, '{:.5f}')} ({ref} {num(c.naive_rmse, '{:.5f}')})</td>"
            f"<td class='{'hurt' if worse else 'helped'}'>{num(c.test_rmse_vs_naive_pct, '{:+.2f}%')}</td>"
            f"<td>{num(c.test_dir_acc_median, '{:.2f}' if options else '{:.3f}')}</td>"
            + (f"<td>{num(c.test_violation_pct_median, '{:.2f}%')}</td>" if options else "") +
            f"<td>{num(c.steps_to_target_median, '{:.0f}')} ({c.reached_target} of {c.runs} reached)</td>"
            f"<td>{num(c.clip_rate_median, '{:.1%}')}</td><td>{num(c.spikes_mean, '{:.1f}')}</td>"
            f"<td>{num(c.time_per_step_vs_none, '{:.2f}x')}</td></tr>")
    parts.append("</table>")
    return parts


def _statistics(comps: dict[str, list[stats.Verdict]]) -> list[str]:
    parts = ["<h2>6. Statistics against none, paired by seed</h2><p class='note'>Raw p-values beside Holm-adjusted "
             "ones; intervals are simultaneous (see the method above). Wilcoxon signed-rank p is shown for reference "
             "only (with 5 pairs its smallest two-sided p is 0.0625); the verdict uses the paired t-test.</p>",
             "<table><tr><th class='l'>learning rate</th><th class='l'>clip</th><th>outcome</th>"
             "<th>diverged (clip vs none)</th><th>Boschloo p</th><th>adjusted</th><th>pairs</th><th>loss difference</th>"
             "<th>simultaneous interval</th><th>t-test p</th><th>adjusted</th><th>Wilcoxon p</th></tr>"]
    for g, vs in comps.items():
        for v in vs:
            c = v.comparison
            parts.append(
                f"<tr><td class='l'>{e(g)}</td><td class='l'>{e(c.config)}</td><td class='o-{v.outcome}'>"
                f"{v.outcome}</td><td>{c.diverged_treated} of {c.n_treated} vs {c.diverged_control} of "
                f"{c.n_control}</td><td>{stats.format_p(c.boschloo_p)}</td><td>{stats.format_p(v.div_p_adj)}</td>"
                f"<td>{c.n_pairs}</td><td>{num(c.diff_pct, '{:+.2f}%')}</td>"
                f"<td>[{num(v.loss_low, '{:+.2f}%')}, {num(v.loss_high, '{:+.2f}%')}]</td>"
                f"<td>{stats.format_p(c.t_p)}</td><td>{stats.format_p(v.loss_p_adj)}</td>"
                f"<td>{stats.format_p(c.wilcoxon_p)}</td></tr>")
    parts.append("</table>")
    return parts


def _runs(store, runs: pd.DataFrame) -> list[str]:
    parts = ["<h2>7. Runs</h2><p class='note'>Open any run in the MLflow UI (<code>make ui</code>); a diverged run's "
             "name ends in [diverged]. A diverged run's final loss is not comparable and not shown.</p>"
             "<table><tr><th class='l'>run</th><th class='l'>learning rate</th><th class='l'>clip</th><th>seed</th>"
             "<th>diverged</th><th>final val loss</th><th>steps</th><th class='l'>run id</th></tr>"]
    for r in runs.sort_values(["group", "clip", "seed"]).itertuples():
        parts.append(f"<tr><td class='l'>{e(r.run_name)}</td><td class='l'>{e(r.group)}</td>"
                     f"<td class='l'>{e(r.clip)}</td><td>{r.seed}</td>"
                     f"<td class='{'hurt' if r.diverged else ''}'>{e(r.diverged_how) if r.diverged else 'no'}</td>"
                     f"<td>{'diverged' if r.diverged else num(r.final_val_loss)}</td><td>{r.steps}</td>"
                     f"<td class='l'>{ui_link(store.uri, store.experiment_id, r.run_id)}</td></tr>")
    parts.append("</table>")
    return parts
