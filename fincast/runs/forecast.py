"""The price-forecast task (layer L4, runs): prices -> lagged-return features -> an LSTM's next-period return
forecast, tested beside the zero (naive) forecast and ridge regression on the same samples.
See ``fincast.runs.task`` for the protocol."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from fincast import config as config_mod
from fincast import features
from fincast.clipping import bounds_global_l2
from fincast.clipping import label as clip_label
from fincast.config import PipelineConfig, short_float
from fincast.data import Prices, load_prices
from fincast.models import build_model as build_forecaster
from fincast.models import forecast_metrics, naive_forecast, ridge_forecast
from fincast.reports import figures
from fincast.runs.record import TrainOutcome, summary_head, summary_tail
from fincast.runs.task import Description, Finished
from fincast.training import FitResult, evaluate


def load(cfg: PipelineConfig, *, progress: bool = False, refresh: bool = False) -> Prices:
    return load_prices(cfg.data, min_rows=features.required_rows(cfg.features), refresh=refresh, progress=progress)


def fetch(cfg: PipelineConfig, *, progress: bool = False, refresh: bool = True) -> list[str]:
    prices = load(cfg, progress=progress, refresh=refresh)
    lines = [f"source {prices.source}, fingerprint {prices.fingerprint}, network calls {prices.network_calls}"]
    lines += [f"  {t:<10} {len(f):>6} bars  {f.index[0]:%Y-%m-%d} .. {f.index[-1]:%Y-%m-%d}"
              for t, f in prices.frames.items()]
    return lines


def prepare(cfg: PipelineConfig, data: Prices) -> features.FeatureSet:
    return features.build(data.frames, cfg.features, price=cfg.data.price)


def build_model(cfg: PipelineConfig, splits: features.FeatureSet) -> torch.nn.Module:
    return build_forecaster(cfg.model, len(splits.names))


def run_name(cfg: PipelineConfig) -> str:
    if cfg.tracking.run_name:
        return cfg.tracking.run_name
    return f"{cfg.model.type}-{'+'.join(cfg.data.tickers)}-{clip_label(cfg.clip)}-lr{short_float(cfg.train.lr)}-s{cfg.train.seed}"


def describe(cfg: PipelineConfig, data: Prices, splits: features.FeatureSet) -> Description:
    frames = data.frames.values()
    params = {
        "data.rows": sum(len(f) for f in frames),
        "data.first_date": min(f.index[0] for f in frames).date().isoformat(),
        "data.last_date": max(f.index[-1] for f in frames).date().isoformat(),
        "features.names": splits.names, "split.val_start": splits.val_start.isoformat(),
        "split.test_start": splits.test_start.isoformat(), "samples.train": len(splits.train),
        "samples.val": len(splits.val), "samples.test": len(splits.test),
    }
    return Description(run_name(cfg), ",".join(cfg.data.tickers), {}, params)


def finish(cfg: PipelineConfig, data: Prices, splits: features.FeatureSet, model: torch.nn.Module,
           device: torch.device, result: FitResult, name: str, artifact_dir: Path, *,
           draw_figures: bool = True, shared: dict | None = None, precision: str = "fp32",
           progress: bool = False) -> Finished:
    metrics, predictions = evaluate_test(model, splits, cfg, device, result, shared=shared)
    files = write_artifacts(artifact_dir, cfg, splits, result, predictions, data.warnings, name,
                            draw_figures=draw_figures)
    return Finished([(f"{m}/{k}", v) for m, vals in metrics.items() for k, v in vals.items()], metrics, files)


def evaluate_test(model: torch.nn.Module, fs: features.FeatureSet, cfg: PipelineConfig, device: torch.device,
                  result: FitResult, shared: dict | None = None) -> tuple[dict[str, dict[str, float]], pd.DataFrame]:
    """The LSTM's (when an epoch validated finitely), the zero forecast's and ridge's test metrics; predictions.
    The baselines are computed once per ``shared`` dict (a stack's runs share their samples)."""
    test = fs.test
    out: dict[str, dict[str, float]] = {}
    predictions = pd.DataFrame({
        "date": pd.to_datetime(test.date).strftime("%Y-%m-%d"), "ticker": test.ticker, "y_true": test.y_raw,
    })
    if result.best_epoch > 0:  # weights from an epoch that validated finitely
        _, out["test"], pred = evaluate(model, test, device)
        predictions["y_pred"] = pred
    else:
        predictions["y_pred"] = np.nan
    shared = {} if shared is None else shared
    if "forecast_baselines" not in shared:
        shared["forecast_baselines"] = baseline_metrics(fs, cfg)
    out.update({k: dict(v) for k, v in shared["forecast_baselines"].items()})
    return out, predictions


def baseline_metrics(fs: features.FeatureSet, cfg: PipelineConfig) -> dict[str, dict[str, float]]:
    """The zero forecast's and ridge's test metrics."""
    test = fs.test
    ridge = ridge_forecast(fs.train.x, fs.train.y, test.x, alpha=cfg.model.ridge_alpha) * test.scale
    return {"baseline_naive": forecast_metrics(test.y_raw, naive_forecast(len(test))),
            "baseline_ridge": forecast_metrics(test.y_raw, ridge)}


def baselines(cfg: PipelineConfig, data: Prices, splits: features.FeatureSet) -> list[tuple[str, float]]:
    return [(f"{m}/{k}", v) for m, vals in baseline_metrics(splits, cfg).items() for k, v in vals.items()]


def write_artifacts(d: Path, cfg: PipelineConfig, fs: features.FeatureSet, result: FitResult,
                    predictions: pd.DataFrame, warnings: list[str], name: str, *,
                    draw_figures: bool = True) -> list[Path]:
    """config.yaml, predictions.csv, training_curves.png (unless not ``draw_figures``; and data_warnings.txt)
    into ``d``."""
    (d / "config.yaml").write_text(config_mod.dump_yaml(cfg))
    predictions.to_csv(d / "predictions.csv", index=False)
    files = ["config.yaml", "predictions.csv"]
    if draw_figures:
        files.append(_curves(d, cfg, fs, result, name))
    if warnings:
        (d / "data_warnings.txt").write_text("\n".join(warnings) + "\n")
        files.append("data_warnings.txt")
    return [d / f for f in files]


def _curves(d: Path, cfg: PipelineConfig, fs: features.FeatureSet, result: FitResult, name: str) -> str:
    steps_per_epoch = math.ceil(len(fs.train) / cfg.train.batch_size)
    val_steps = [min((i + 1) * steps_per_epoch, result.steps) for i in range(len(result.val_history))]
    threshold = result.history.get("threshold") if bounds_global_l2(cfg.clip) else None  # drawn against the norm
    figures.training_curves(d / "training_curves.png", loss=result.history["loss"],
                          norm_pre=result.history["norm_pre"], norm_post=result.history["norm_post"],
                          val_loss=result.val_history, val_steps=val_steps, threshold=threshold, title=name,
                          diverged_step=result.diverged_step)
    return "training_curves.png"


def summary(out: TrainOutcome, seconds: float) -> str:
    lines = [*summary_head(out, seconds, "samples"), "", f"  {'model':<16}{'RMSE':>10}{'MAE':>10}{'dir. acc':>10}"]
    names = {"test": "LSTM", "baseline_naive": "naive (zero)", "baseline_ridge": "ridge"}
    for key in ("test", "baseline_naive", "baseline_ridge"):
        m = out.metrics.get(key)
        if m is None:
            lines.append(f"  {names[key]:<16}{'(no finite epoch)':>30}")
            continue
        lines.append(f"  {names[key]:<16}{m['rmse']:>10.5f}{m['mae']:>10.5f}{m['directional_accuracy']:>10.3f}")
    if "test" in out.metrics and out.metrics["baseline_naive"]["rmse"] > 0:  # (0: a test split without moves)
        rel = out.metrics["test"]["rmse"] / out.metrics["baseline_naive"]["rmse"] - 1
        lines.append(f"  LSTM RMSE vs naive: {100 * rel:+.2f}% ({'better' if rel < 0 else 'not better'})")
    lines += ["", "  look: make ui  (MLflow UI at http://127.0.0.1:5000; PORT=... to change)"]
    return "\n".join(lines + summary_tail(out))


def missing_local_data(cfg: PipelineConfig) -> list[str]:
    if cfg.data.source == "csv" and cfg.data.path and not Path(cfg.data.path).exists():
        return [f"data.path {cfg.data.path}"]
    return []


def outputs(cfg: PipelineConfig) -> list[tuple[str, Path]]:
    return []  # the run's files are all MLflow artifacts
