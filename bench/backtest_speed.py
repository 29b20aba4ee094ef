"""Benchmark: the walk-forward backtest with its folds x models stacked on the run axis, in worker processes,
against the same backtest one fold at a time (one LSTM after the other, one thread: how backtests trained before),
measured in this one invocation.

pipelines/backtest_equities.yaml on SPY daily from ../shared/data/equities (DATA=dir to point elsewhere): 129
monthly folds from 2015, a rolling 3-year window, two LSTMs a fold (unclipped and clip-norm 1.0) with early
stopping and a refit on all the fold's data. Each variant runs ``fincast.runs.backtest.backtest`` end to end (data,
folds, evaluation, report, MLflow logging into a temporary store) in a fresh process.

Target (studies-at-scale issue): at least 3x faster than the 231 s the issue measured on 2 idle cores, with the same
forecasts within float tolerance. This prints both variants' times, the ratio between them, the ratio to 231 s,
and how far their forecasts differ.

Run: .venv/bin/python bench/backtest_speed.py [--quick]   (~4 min on 2 cores; --quick: folds from 2022-06 only)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
ISSUE_SECONDS = 231.0


def _run(label: str, sets: list[str], data: Path, tmp: Path) -> tuple[float, pd.DataFrame]:
    out = tmp / label
    args = [sys.executable, "-m", "fincast", "backtest", str(ROOT / "pipelines" / "backtest_equities.yaml"),
            "--quiet", "--out", str(out), "--set", "data.source=csv", "--set", f"data.path={data}",
            "--set", "backtest.resume=false", "--set", f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}",
            "--set", f"tracking.artifact_dir={tmp / 'artifacts'}"]
    for s in sets:
        args += ["--set", s]
    t = time.perf_counter()
    subprocess.run(args, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - t
    print(f"  {label}: {seconds:.1f} s", flush=True)
    return seconds, pd.read_csv(out / "backtest" / "backtest_equities" / "forecasts.csv")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="folds from 2022-06-01 only (a smoke test)")
    args = ap.parse_args()
    data = Path(os.environ.get("DATA", ROOT.parent / "shared" / "data")) / "equities"
    if not (data / "SPY.csv").is_file():
        print(f"no SPY.csv in {data}: set DATA=dir (a folder with equities/SPY.csv)")
        return
    extra = ["backtest.start=2022-06-01"] if args.quick else []
    print(f"SPY walk-forward backtest ({'folds from 2022-06-01' if args.quick else '129 folds'}), "
          f"{os.cpu_count()} CPUs, each variant in a fresh process:")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        alone_s, alone = _run("one fold at a time (stack_folds=1, one thread)", ["backtest.stack_folds=1", *extra],
                              data, tmp)
        stacked_s, stacked = _run("stacked (defaults: stack_folds=auto, a worker per core)", extra, data, tmp)
    same = (alone[["date", "ticker", "model"]].to_numpy() == stacked[["date", "ticker", "model"]].to_numpy()).all()
    diff = np.abs(alone["y_pred"].to_numpy() - stacked["y_pred"].to_numpy())
    scale = np.nanmedian(np.abs(alone["y_pred"].to_numpy()[alone["model"].str.startswith("lstm")]))
    print(f"\nstacked vs one fold at a time: x{alone_s / stacked_s:.2f} faster")
    if not args.quick:
        print(f"stacked vs the issue's 231 s: x{ISSUE_SECONDS / stacked_s:.2f} (target >= 3)")
    print(f"forecasts: same rows {same}; largest difference {np.nanmax(diff):.2e} (median |LSTM forecast| "
          f"{scale:.2e}); bit-identical {np.mean(diff == 0):.1%}")


if __name__ == "__main__":
    main()
