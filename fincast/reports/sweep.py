"""Sweep results (layer L3): the trials table, the parameter importances, a plain-text summary and the
objective-vs-threshold figure, written into one folder (``reports/sweep/<name>/``) and logged to the sweep's
parent run by the caller. Everything here is a function of the tables it is given (no tracking, no Optuna)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from fincast.config import atomic_write
from fincast.reports import figures

# columns of the trials table, in order (trials.csv)
COLUMNS = ("number", "state", "method", "threshold_key", "threshold", "lr", "value", "best_val_loss", "diverged",
           "stop_reason", "epochs", "steps", "clip_rate", "seconds", "run_id", "worker")


@dataclass(frozen=True)
class SweepFiles:
    folder: Path
    files: list[Path]


def best_trial(trials: pd.DataFrame) -> pd.Series | None:
    """The complete trial with the lowest objective (ties: the earliest), or None."""
    done = trials[(trials["state"] == "complete") & trials["value"].notna()]
    if done.empty:
        return None
    return done.sort_values(["value", "number"]).iloc[0]


def per_method(trials: pd.DataFrame) -> pd.DataFrame:
    """Per clip method: trials, complete, pruned, diverged, and its best trial's objective, threshold and lr."""
    rows = []
    for method, t in trials.groupby("method", sort=False):
        b = best_trial(t)
        rows.append({"method": method, "trials": len(t), "complete": int((t["state"] == "complete").sum()),
                     "pruned": int((t["state"] == "pruned").sum()), "diverged": int(t["diverged"].sum()),
                     "best_value": b["value"] if b is not None else math.nan,
                     "best_threshold": b["threshold"] if b is not None else math.nan,
                     "best_lr": b["lr"] if b is not None else math.nan,
                     "best_trial": int(b["number"]) if b is not None else -1})
    return pd.DataFrame(rows)


def _fmt(v) -> str:
    if isinstance(v, float):
        return "" if not math.isfinite(v) else f"{v:.4g}"
    return str(v)


def summary_text(name: str, trials: pd.DataFrame, importance: pd.DataFrame, *, sampler: str, penalty: float,
                 zero_loss: float, failed: int, parent_run_id: str) -> str:
    """The sweep's outcome in a few lines of Markdown (also printed by the CLI)."""
    b = best_trial(trials)
    lines = [f"# Sweep {name}", "",
             f"{len(trials)} trials ({sampler}): {int((trials['state'] == 'complete').sum())} complete, "
             f"{int((trials['state'] == 'pruned').sum())} pruned, {int(trials['diverged'].sum())} diverged "
             f"(scored {penalty:g} x the zero forecast's validation loss {zero_loss:.4g}), {failed} failed.",
             f"Parent run: {parent_run_id}", ""]
    if b is not None:
        thr = "" if b["method"] == "none" else f" {b['threshold_key']}={b['threshold']:.4g}"
        lines += [f"Best: trial {int(b['number'])}, clip.method={b['method']}{thr}, train.lr={b['lr']:.4g}: "
                  f"validation loss {b['value']:.5g} ({100 * (b['value'] / zero_loss - 1):+.1f}% vs the zero "
                  f"forecast), run {b['run_id']}", ""]
    pm = per_method(trials)
    lines += ["| method | trials | complete | pruned | diverged | best value | threshold | lr |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['method']} | {r['trials']} | {r['complete']} | {r['pruned']} | {r['diverged']} | "
              f"{_fmt(r['best_value'])} | {_fmt(r['best_threshold'])} | {_fmt(r['best_lr'])} |"
              for r in pm.to_dict("records")]
    lines.append("")
    if importance.empty:
        lines.append("Parameter importance: not enough complete trials to estimate it.")
    else:
        lines += ["Parameter importance (fANOVA over complete trials; shares of the objective's variance):", ""]
        for scope, imp in importance.groupby("scope", sort=False):
            lines.append(f"- {scope}: " + ", ".join(f"{r['param']} {r['importance']:.2f}"
                                                     for r in imp.to_dict("records")))
    return "\n".join(lines) + "\n"


def write(folder: str | Path, name: str, trials: pd.DataFrame, importance: pd.DataFrame, *,
          thresholds: dict[str, str], sampler: str, penalty: float, zero_loss: float, failed: int,
          parent_run_id: str, extra: dict[str, str] | None = None) -> SweepFiles:
    """trials.csv, importance.csv, summary.md and objective_vs_threshold.png into ``folder`` (atomically), plus
    ``extra`` files given as {name: text}."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = [atomic_write(folder / "trials.csv", trials.to_csv(index=False)),
             atomic_write(folder / "importance.csv", importance.to_csv(index=False)),
             atomic_write(folder / "summary.md", summary_text(name, trials, importance, sampler=sampler,
                                                              penalty=penalty, zero_loss=zero_loss, failed=failed,
                                                              parent_run_id=parent_run_id))]
    files.append(figures.sweep_objective(folder / "objective_vs_threshold.png", trials, thresholds,
                                       title=f"sweep {name}: objective vs threshold", zero_loss=zero_loss))
    for fname, text in (extra or {}).items():
        files.append(atomic_write(folder / fname, text))
    return SweepFiles(folder, files)
