"""The stability report (layer L3): did clipping make training more stable here, and at what cost?

Reads MLflow only: the study's parent run (its plan, settings and the stacks' per-step series files) and its
finished child runs (tags, final metrics), so it works for studies run against a remote server.
Writes ``<out>/<study>/index.html`` (self-contained, images inlined), the PNGs, ``summary.csv`` (one row per
cell) and ``summary.json`` (verdicts, statistics, cells, runs), and logs them to the parent run.
"""

from __future__ import annotations

import json
import math
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fincast import tracking
from fincast.clipping import bounds_global_l2_of
from fincast.config import FincastError, TrackingConfig, atomic_write, name_problem
from fincast.reports import figures, stability_page, stats
from fincast.reports.html import plain as _plain

CONTROL = "none"
STEP_KEYS = ["train/loss", "grad/norm_pre", "grad/threshold", "val/loss"]


@dataclass
class Report:
    index: Path
    runs: int
    parent_run_id: str
    verdict_text: str


@dataclass
class Settings:
    divergence_factor: float = 3.0
    loss_target: float | None = None
    confidence: float = 0.95
    bootstrap: int = 10000
    family_alpha: float = 0.05
    equivalence_pct: float = 2.0


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def _metric(run, key: str) -> float:
    v = run.data.metrics.get(key)
    return math.nan if v is None else float(v)


def runs_frame(children: list[Any], settings: Settings) -> pd.DataFrame:
    """One row per finished child run: its cell, seed and final numbers, and whether it diverged (non-finite
    training, or a final validation loss above divergence_factor x the zero forecast's)."""
    rows = []
    for r in children:
        t, p = r.data.tags, r.data.params
        final_val, naive_val = _metric(r, "val/loss"), _metric(r, "baseline_naive/val_loss")
        nonfinite = t.get("fincast.diverged") == "true"
        exploded = math.isfinite(final_val) and math.isfinite(naive_val) and \
            final_val > settings.divergence_factor * naive_val
        rows.append({
            "run_id": r.info.run_id, "run_name": r.info.run_name, "cell": t.get("fincast.cell"),
            "group": t.get("fincast.group"), "clip": t.get("fincast.study_clip"),
            "lr": float(t.get("fincast.study_lr", "nan")), "seed": int(t.get("fincast.seed", -1)),
            "hash": t.get(tracking.HASH_TAG), "diverged": bool(nonfinite or exploded or not math.isfinite(final_val)),
            "diverged_how": (t.get("fincast.diverged_reason") or "non-finite training") if nonfinite else
                            (f"val loss > {settings.divergence_factor:g} x zero forecast" if exploded else ""),
            "final_val_loss": final_val, "best_val_loss": _metric(r, "best_val_loss"), "naive_val_loss": naive_val,
            **_test_numbers(r),
            "step_ms": _metric(r, "time/step_ms"),
            "clip_rate": _metric(r, "grad/clip_rate"), "spikes": _metric(r, "grad/spikes"),
            "l2_threshold": bounds_global_l2_of(p.get("clip.method", ""), norm_type=p.get("clip.norm.norm_type", 2),
                                                scope=p.get("clip.norm.scope", "global")),
            "start_time": r.info.start_time,
        })
    return pd.DataFrame(rows)


def _test_numbers(run) -> dict:
    """Test metrics beside the reference baseline. Forecast runs: RMSE of returns vs the zero forecast, ridge,
    directional accuracy. Options runs (param task = options): price RMSE vs Black-Scholes with the shortest
    realised-vol window, the true model's price RMSE (synthetic markets), IV RMSE in vol points, and the share of
    prices that break a no-arbitrage bound."""
    if run.data.params.get("task") != "options":
        return {"task": "forecast", "test_rmse": _metric(run, "test/rmse"), "naive_rmse": _metric(run, "baseline_naive/rmse"),
                "ridge_rmse": _metric(run, "baseline_ridge/rmse"),
                "test_dir_acc": _metric(run, "test/directional_accuracy"), "test_violation_pct": math.nan}
    hv = sorted((int(k.split("/")[0][len("baseline_bs_hv"):]), k) for k in run.data.metrics
                if k.startswith("baseline_bs_hv") and k.endswith("/price_rmse"))
    return {"task": "options", "test_rmse": _metric(run, "test/price_rmse"),
            "naive_rmse": _metric(run, hv[0][1]) if hv else math.nan,
            "ridge_rmse": _metric(run, "baseline_true_model/price_rmse"),
            "test_dir_acc": _metric(run, "test/iv_rmse_vol_pts"),
            "test_violation_pct": _metric(run, "test/any_violation_pct")}


def _settings(parent, saved: dict | None) -> Settings:
    """The study's settings as of its latest invocation (settings.json), else the parent's params."""
    s = Settings()
    if saved is None:
        p = parent.data.params
        saved = {k[len("study."):]: v for k, v in p.items() if k.startswith("study.")}
    for name, cast in (("divergence_factor", float), ("confidence", float), ("bootstrap", int),
                       ("loss_target", float), ("family_alpha", float), ("equivalence_pct", float)):
        value = saved.get(name)
        if value not in (None, "None", "null"):
            setattr(s, name, cast(value))
    return s


# ---------------------------------------------------------------------------------------------
# Numbers
# ---------------------------------------------------------------------------------------------


def _q(values: pd.Series, q: float) -> float:
    v = values[np.isfinite(values)]
    return float(np.percentile(v, q)) if len(v) else math.nan


def steps_to_target(steps: np.ndarray, values: np.ndarray, target: float) -> float:
    """First step at which the (validation) loss is at or below ``target``; nan if never."""
    hit = np.nonzero(np.isfinite(values) & (values <= target))[0]
    return float(steps[hit[0]]) if len(hit) else math.nan


def cell_table(runs: pd.DataFrame, groups: list[str], clips: list[str]) -> pd.DataFrame:
    """One row per cell (group x clip config): divergence, losses (median and IQR over seeds), test metrics
    beside the zero forecast, steps to the loss target, clip rate, time per step relative to `none`."""
    rows = []
    for g in groups:
        in_group = runs[runs["group"] == g]
        none_ms = in_group.loc[in_group["clip"] == CONTROL, "step_ms"].median()
        for c in clips:
            r = in_group[in_group["clip"] == c]
            if r.empty:
                continue
            ok = r[~r["diverged"]]
            reached = r["steps_to_target"].notna().sum()
            rows.append({
                "group": g, "clip": c, "lr": r["lr"].iloc[0], "runs": len(r), "diverged": int(r["diverged"].sum()),
                "divergence_rate": float(r["diverged"].mean()),
                "final_val_loss_median": _q(ok["final_val_loss"], 50), "final_val_loss_q25": _q(ok["final_val_loss"], 25),
                "final_val_loss_q75": _q(ok["final_val_loss"], 75),
                "best_val_loss_median": _q(ok["best_val_loss"], 50), "best_val_loss_q25": _q(ok["best_val_loss"], 25),
                "best_val_loss_q75": _q(ok["best_val_loss"], 75),
                "test_rmse_median": _q(r["test_rmse"], 50), "naive_rmse": _q(r["naive_rmse"], 50),
                "test_rmse_vs_naive_pct": 100 * (_q(r["test_rmse"], 50) / _q(r["naive_rmse"], 50) - 1),
                "ridge_rmse": _q(r["ridge_rmse"], 50), "test_dir_acc_median": _q(r["test_dir_acc"], 50),
                "test_violation_pct_median": _q(r["test_violation_pct"], 50) if "test_violation_pct" in r else math.nan,
                "steps_to_target_median": _q(r["steps_to_target"], 50), "reached_target": int(reached),
                "clip_rate_median": _q(r["clip_rate"], 50), "spikes_mean": float(r["spikes"].mean()),
                "time_per_step_vs_none": float(r["step_ms"].median() / none_ms) if none_ms > 0 else math.nan,
                "run_ids": " ".join(r.sort_values("seed")["run_id"]),
            })
    return pd.DataFrame(rows)


def comparisons(runs: pd.DataFrame, groups: list[str], clips: list[str], settings: Settings) -> dict[str, list]:
    out: dict[str, list] = {}
    for g in groups:
        r = runs[runs["group"] == g]
        control = {int(x.seed): (x.final_val_loss, bool(x.diverged)) for x in r[r["clip"] == CONTROL].itertuples()}
        if not control:
            continue
        out[g] = []
        for c in clips:
            if c == CONTROL or (r["clip"] == c).sum() == 0:
                continue
            treated = {int(x.seed): (x.final_val_loss, bool(x.diverged)) for x in r[r["clip"] == c].itertuples()}
            out[g].append(stats.compare(float(r["lr"].iloc[0]), c, treated, control, confidence=settings.confidence,
                                        n_boot=settings.bootstrap))
    return out


def _mark_diverged(store, runs: pd.DataFrame) -> None:
    """Runs the report counts as diverged because their final loss exploded (training stayed finite, so the
    trainer did not name them) get the same run-name suffix as non-finite ones: recognisable in the MLflow UI."""
    for r in runs[runs["diverged"] & runs["diverged_how"].str.startswith("val loss")].itertuples():
        if r.run_name and not r.run_name.endswith(tracking.DIVERGED_SUFFIX):
            store.client.set_tag(r.run_id, "mlflow.runName", f"{r.run_name} {tracking.DIVERGED_SUFFIX}")
            store.client.set_tag(r.run_id, "fincast.diverged_reason", r.diverged_how)


def judged(comps: dict[str, list[stats.Comparison]], settings: Settings) -> dict[str, list[stats.Verdict]]:
    """Every group's comparisons judged as one family (Holm across the whole study)."""
    flat = [c for cs in comps.values() for c in cs]
    verdicts = iter(stats.judge(flat, alpha=settings.family_alpha, margin_pct=settings.equivalence_pct,
                                n_boot=settings.bootstrap))
    return {g: [next(verdicts) for _ in cs] for g, cs in comps.items()}


def _comparison_record(v: stats.Verdict) -> dict:
    c = asdict(v.comparison)
    c.pop("diffs")
    return c | {k: getattr(v, k) for k in ("outcome", "loss_outcome", "loss_p_adj", "loss_low", "loss_high",
                                           "div_outcome", "div_effect", "div_low", "div_high", "div_p_adj", "level",
                                           "family", "margin_pct")}


def verdict_table(comps: dict[str, list[stats.Verdict]]) -> pd.DataFrame:
    """verdicts.csv: one row per comparison and metric, with the comparison's overall outcome beside the
    metric's own. Effects: loss in percent of the unclipped loss, divergence in percentage points."""
    rows = []
    for g, vs in comps.items():
        for v in vs:
            c = v.comparison
            common = {"group": g, "lr": c.lr, "clip": c.config, "outcome": v.outcome}
            rows.append(common | {"metric": "divergence_rate_pp", "metric_outcome": v.div_outcome,
                                  "effect": v.div_effect, "ci_low": v.div_low, "ci_high": v.div_high,
                                  "p": c.boschloo_p, "p_adjusted": v.div_p_adj, "test": "Boschloo exact",
                                  "n_treated": c.n_treated, "n_control": c.n_control,
                                  "diverged_treated": c.diverged_treated, "diverged_control": c.diverged_control})
            rows.append(common | {"metric": "final_val_loss_pct", "metric_outcome": v.loss_outcome,
                                  "effect": c.diff_pct, "ci_low": v.loss_low, "ci_high": v.loss_high,
                                  "p": c.t_p, "p_adjusted": v.loss_p_adj, "test": "paired t",
                                  "n_treated": c.n_pairs, "n_control": c.n_pairs})
    table = pd.DataFrame(rows)
    if len(table):
        first = next(v for vs in comps.values() for v in vs)
        table["interval_level"], table["family_tests"] = first.level, first.family
        table["equivalence_margin_pct"] = first.margin_pct
    return table


def _no_better_than_reference(cells: pd.DataFrame, group: str, ref: str = "the zero forecast") -> str:
    """A sentence when models compared at this learning rate do not beat the reference on the test set (the
    zero forecast; Black-Scholes with historical vol for options): their difference is between useless models."""
    r = cells[cells["group"] == group]
    worse = r[~(r["test_rmse_vs_naive_pct"] < 0)]
    if worse.empty:
        return ""
    names = "every model compared here" if len(worse) == len(r) else ", ".join(worse["clip"])
    spread = ", ".join(f"{x.clip} {x.test_rmse_vs_naive_pct:+.1f}%" for x in worse.itertuples())
    return (f"Note: {names} did not beat {ref} on the test set (median test RMSE vs {ref}: {spread}); a "
            "difference between such models says nothing about forecasting value.")


def _stack(per_run: dict[str, tuple[np.ndarray, np.ndarray]], run_ids: list[str], smooth: int = 1,
           fill: dict[str, int] | None = None, index: str = "step") -> np.ndarray:
    """runs x steps array (nan-padded) of the given runs' histories; ``fill`` (run id -> steps of the run)
    forward-fills step functions (metrics logged only when they change) to the end of each run;
    ``index='position'`` stacks by order (per-epoch values)."""
    series = [per_run.get(r) for r in run_ids]
    if index == "position":
        width = max((len(s[1]) for s in series if s is not None), default=0)
        out = np.full((len(run_ids), width), np.nan)
        for i, s in enumerate(series):
            if s is not None:
                out[i, :len(s[1])] = s[1]
        return out
    ends = [max(int(s[0][-1]), (fill or {}).get(r, 0)) for r, s in zip(run_ids, series)
            if s is not None and len(s[0])]
    width = max(ends, default=0)
    out = np.full((len(run_ids), width), np.nan)
    for i, s in enumerate(series):
        if s is None or not len(s[0]):
            continue
        steps, values = s
        if fill is not None:
            end = max(int(steps[-1]), fill.get(run_ids[i], 0))
            idx = np.searchsorted(steps, np.arange(1, end + 1), side="right") - 1
            row = np.where(idx >= 0, values[np.clip(idx, 0, None)], np.nan)
            out[i, :len(row)] = row
        else:
            out[i, steps[(steps >= 1) & (steps <= width)] - 1] = values[(steps >= 1) & (steps <= width)]
        if smooth > 1:
            row = out[i]
            n = int(np.isfinite(row).sum())
            if n >= smooth:
                kernel = np.ones(smooth) / smooth
                valid = np.isfinite(row)
                sm = np.convolve(np.where(valid, row, 0), kernel, mode="same") / np.maximum(
                    np.convolve(valid.astype(float), kernel, mode="same"), 1e-12)
                out[i] = np.where(valid, sm, np.nan)
    return out


# ---------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------


def build(study: str, *, tracking_uri: str | None = None, out_dir: str | Path = "reports/stability",
          log_to_mlflow: bool = True) -> Report:
    if problem := name_problem(study, "study name"):  # it names the report's folder
        raise FincastError(problem)
    cfg = TrackingConfig(uri=tracking_uri)
    store = tracking.StudyStore(cfg, study, create=False)
    parents = store.runs("parent")
    if not parents:
        raise FincastError(f"study {study!r} in {store.uri} has no parent run; run `fincast study SPEC` first")
    parent = parents[-1]
    children = [r for r in store.runs("child") if r.info.status == "FINISHED"]
    with tempfile.TemporaryDirectory() as tmp:
        plan_file = store.download(parent.info.run_id, "plan.json", tmp)
        plan = json.loads(plan_file.read_text()) if plan_file else None
        settings_file = store.download(parent.info.run_id, "settings.json", tmp)
        saved = json.loads(settings_file.read_text()) if settings_file else None
        settings = _settings(parent, saved)
    fingerprint = (saved or {}).get("data_fingerprint")
    if fingerprint:  # the data of the latest invocation (runs on other data were redone)
        children = [r for r in children if r.data.tags.get("fincast.data_fingerprint") == fingerprint]
    if plan:  # the latest spec's runs, in its order (runs of cells since dropped from the spec are left out)
        wanted = {p["hash"] for p in plan}
        children = [r for r in children if r.data.tags.get(tracking.HASH_TAG) in wanted]
    if not children:
        raise FincastError(f"study {study!r}: no finished runs yet; run (or rerun) `fincast study SPEC`")
    runs = runs_frame(children, settings)
    order = pd.DataFrame(plan) if plan else runs
    groups = [g for g in dict.fromkeys(order["group"]) if g in set(runs["group"])]
    clips = [c for c in dict.fromkeys(order["clip"]) if c in set(runs["clip"])]
    if CONTROL in clips:
        clips.remove(CONTROL)
        clips.insert(0, CONTROL)

    hist = store.histories(parent.info.run_id, list(runs["run_id"]), STEP_KEYS)
    runs["steps"] = [len(hist["train/loss"].get(r, ((), ()))[0]) for r in runs["run_id"]]
    targets = runs["naive_val_loss"] if settings.loss_target is None else pd.Series(settings.loss_target, runs.index)
    runs["steps_to_target"] = [steps_to_target(*hist["val/loss"].get(r, (np.array([]), np.array([]))), t)
                               for r, t in zip(runs["run_id"], targets)]
    cells = cell_table(runs, groups, clips)
    comps = judged(comparisons(runs, groups, clips, settings), settings)
    ref = "Black-Scholes with historical vol" if stability_page.is_options(runs) else "the zero forecast"
    verdicts = {g: " ".join(filter(None, [stats.verdict(cs, label=g), _no_better_than_reference(cells, g, ref)]))
                for g, cs in comps.items() if cs}
    for g in groups:
        if g not in comps:
            verdicts[g] = f"At {g}: no finished unclipped (none) runs, so nothing to compare against."
    expected = len(plan) if plan else len(runs)
    missing = expected - len(runs)
    verdict_lines = [verdicts[g] for g in groups if g in verdicts]
    if missing:
        verdict_lines.append(f"{missing} of the study's {expected} runs have not finished; rerun `fincast study` "
                             "to complete it (these verdicts use the finished runs only).")

    out = Path(out_dir) / study
    out.mkdir(parents=True, exist_ok=True)
    with np.errstate(all="ignore"), warnings.catch_warnings():  # exploded runs reach 1e38: drawn capped, quietly
        warnings.simplefilter("ignore", RuntimeWarning)
        figures = _figures(out, runs, hist, groups, clips, cells)
    summary = {
        "study": study, "parent_run_id": parent.info.run_id, "tracking_uri": store.uri,
        "experiment_id": store.experiment_id, "settings": asdict(settings), "verdict": verdicts,
        "comparisons": {g: [_comparison_record(v) for v in vs] for g, vs in comps.items()},
        "outcomes": stats.OUTCOMES,
        "cells": cells.to_dict(orient="records"), "runs": runs.drop(columns=["start_time"]).to_dict(orient="records"),
        "missing_runs": missing,
    }
    atomic_write(out / "summary.json", json.dumps(_plain(summary), indent=1, allow_nan=False))
    atomic_write(out / "summary.csv", cells.to_csv(index=False))
    atomic_write(out / "verdicts.csv", verdict_table(comps).to_csv(index=False))
    index = out / "index.html"
    atomic_write(index, stability_page.page(study, parent, store, settings, verdict_lines, cells, comps, runs, figures, groups, out))
    if log_to_mlflow:
        _mark_diverged(store, runs)
        for f in ["index.html", "summary.csv", "summary.json", "verdicts.csv", *figures.values()]:
            store.client.log_artifact(parent.info.run_id, str(out / f), "report")
    return Report(index, len(runs), parent.info.run_id, "\n".join(verdict_lines))


def _figures(out: Path, runs: pd.DataFrame, hist: dict, groups: list[str], clips: list[str],
             cells: pd.DataFrame) -> dict[str, str]:
    def per_cell(key: str, **kw) -> dict[str, dict[str, np.ndarray]]:
        return {g: {c: _stack(hist[key], list(runs[(runs["group"] == g) & (runs["clip"] == c)]["run_id"]), **kw)
                    for c in clips if ((runs["group"] == g) & (runs["clip"] == c)).any()} for g in groups}

    longest = int(max(runs["steps"].max(), 1))
    smooth = max(1, longest // 100)
    figs = {}
    figures.band_curves(out / "loss_curves.png", per_cell("train/loss", smooth=smooth),
                      ylabel=f"training loss ({smooth}-step mean)", title="Training loss: median and IQR over seeds",
                      max_points=600)
    figs["loss"] = "loss_curves.png"
    figures.band_curves(out / "val_curves.png", per_cell("val/loss", index="position"), xlabel="epoch",
                      ylabel="validation loss", title="Validation loss per epoch: median and IQR over seeds")
    figs["val"] = "val_curves.png"
    # only thresholds on the global L2 norm belong on this axis (not value, agc, per-layer, L1 or inf clipping)
    l2 = set(runs.loc[runs["l2_threshold"], "clip"])
    thresholds = {g: {c: (np.nanmedian(a, axis=0) if c in l2 and a.size and np.isfinite(a).any() else None)
                      for c, a in d.items()}
                  for g, d in per_cell("grad/threshold", fill=dict(zip(runs["run_id"], runs["steps"]))).items()}
    figures.band_curves(out / "grad_norms.png", per_cell("grad/norm_pre", smooth=1), thresholds=thresholds,
                      ylabel="global L2 norm before clipping", max_points=600,
                      title="Gradient norm before clipping (median, IQR) and the effective threshold (dashed)")
    figs["norms"] = "grad_norms.png"
    for i, g in enumerate(groups):
        r = runs[runs["group"] == g]
        values = {c: np.concatenate([hist["grad/norm_pre"].get(x, (None, np.array([])))[1]
                                     for x in r[r["clip"] == c]["run_id"]] or [np.array([])]) for c in clips}
        counts = {c: float(r.loc[r["clip"] == c, "spikes"].mean()) for c in clips}
        name = f"grad_norm_dist_{i + 1}.png"
        figures.distributions(out / name, values, counts, xlabel="global L2 norm before clipping (all steps, all seeds)",
                            title=f"Gradient norm distribution at {g}")
        figs[f"dist:{g}"] = name
    rate = cells.pivot(index="group", columns="clip", values="divergence_rate").reindex(index=groups, columns=clips)
    loss = cells.pivot(index="group", columns="clip", values="final_val_loss_median").reindex(index=groups,
                                                                                              columns=clips)
    figures.heatmaps(out / "stability_map.png", [
        ("divergence rate", rate, {"fmt": "{:.0%}", "cmap": "Reds", "vmin": 0, "vmax": 1}),
        ("final validation loss (median, runs that did not diverge)", loss, {"fmt": "{:.3g}", "cmap": "viridis_r"}),
    ])
    figs["map"] = "stability_map.png"
    return figs
