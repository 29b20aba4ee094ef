"""Benchmark: what a walk-forward backtest spends beyond model training.

Target (issue): on a 10-year daily backtest with monthly refits, the backtest machinery beyond model training
(feature building, splitting and scaling per fold, prediction, the walk-forward table, evaluation, the report
and MLflow logging) costs < 10% of the total time.

Runs ``fincast.runs.backtest.backtest`` end to end, as ``fincast backtest`` does, on pipelines/backtest_equities.yaml
with the synthetic source (an equity calendar, data from 2012; cutoffs monthly, every 21 bars, from 2015-01-01 to
the end of 2024: ten years, 120 folds), into a temporary MLflow store and report folder. Model training is the
time inside the LSTMs' fit (training steps and per-epoch validation) and ridge's fits (its penalty search
included); everything else from the first line of the backtest (data loading included) to the end is machinery.

Run: .venv/bin/python bench/backtest_overhead.py [--epochs N] [--window expanding|756] [--quick]
(--quick: 2 years of cutoffs, for a smoke test; the ratio is then not the target's)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=None, help="train.epochs (default: the spec's)")
    ap.add_argument("--window", default=None, help="backtest.window (default: the spec's, 756 bars)")
    ap.add_argument("--quick", action="store_true", help="2 years of cutoffs instead of 10")
    args = ap.parse_args()

    from fincast import config
    from fincast.runs.backtest import backtest

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
        sets = ["data.source=synthetic", "data.start=2012-01-01", "data.end=2025-01-31", "backtest.start=2015-01-01",
                f"backtest.end={'2016-12-31' if args.quick else '2024-12-31'}", "backtest.refit_every=21",
                f"tracking.artifact_dir={tmp}/artifacts"]
        if args.epochs:
            sets.append(f"train.epochs={args.epochs}")
        if args.window:
            sets.append(f"backtest.window={args.window}")
        cfg = config.load(ROOT / "pipelines" / "backtest_equities.yaml", sets)
        t0 = time.perf_counter()
        out = backtest(cfg, out_dir=Path(tmp) / "reports")
        wall = time.perf_counter() - t0

    s = out.seconds
    training = s["model_training"]
    machinery = s["total"] - training
    print(f"backtest_equities on synthetic data: {out.folds} folds (monthly refits), {out.forecasts} forecasts, "
          f"window {cfg.backtest.window}, {cfg.train.epochs} max epochs, {len(out.training)} LSTMs + ridge, "
          f"{out.device}")
    print(f"  total {s['total']:.1f} s (wall {wall:.1f} s); model training {training:.1f} s "
          f"(LSTM fit {s['lstm_fit']:.1f} s, ridge {s['ridge']:.2f} s)")
    for key in ("data", "features", "split", "lstm_predict", "table", "evaluate", "report", "tracking"):
        print(f"    {key:<13}{s[key]:7.2f} s  ({100 * s[key] / s['total']:.1f}%)")
    other = machinery - sum(s[k] for k in ("data", "features", "split", "lstm_predict", "table", "evaluate",
                                           "report", "tracking"))
    print(f"    {'unaccounted':<13}{other:7.2f} s  ({100 * other / s['total']:.1f}%)")
    ratio = machinery / s["total"]
    print(f"machinery share: {100 * ratio:.1f}% of the total (target < 10%): {'met' if ratio < 0.10 else 'NOT met'}")


if __name__ == "__main__":
    main()
