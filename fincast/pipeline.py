"""Pipelines (layer L4): wire data -> features -> model -> clipped training -> MLflow records.

Each step writes into the same tracked run, in the order a reader would want it: params and tags
first (so a crashed run still says what it was), per-step metrics while training, then test metrics
beside the baselines, then artifacts (resolved config, curves, predictions, model).
"""

from __future__ import annotations

import math
import os
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import fincast
from fincast import config as config_mod
from fincast import features, tracking
from fincast.config import PipelineConfig
from fincast.data import Prices, load_prices
from fincast.models import build_model, forecast_metrics, naive_forecast, ridge_forecast
from fincast.reports import plots
from fincast.training import FitResult, evaluate, fit, resolve_device, resolve_precision, seed_everything


@dataclass
class TrainOutcome:
    run_id: str
    run_name: str
    experiment: str
    tracking_uri: str
    device: str
    precision: str
    fit: FitResult
    metrics: dict[str, dict[str, float]]  # model -> {rmse, mae, directional_accuracy}
    samples: dict[str, int]
    warnings: list[str] = field(default_factory=list)


def _short(x: float) -> str:
    """1e-3 -> '1e-3', 0.01 -> '0.01', 3e-4 -> '3e-4'."""
    if x != 0 and (abs(x) < 1e-2 or abs(x) >= 1e4):
        mant, exp = f"{x:.2e}".split("e")
        mant = mant.rstrip("0").rstrip(".")
        return f"{mant}e{int(exp)}"
    return f"{x:g}"


def clip_label(cfg: config_mod.ClipConfig) -> str:
    if cfg.method == "norm":
        suffix = "" if cfg.norm_type == 2 else f"-L{'inf' if math.isinf(cfg.norm_type) else f'{cfg.norm_type:g}'}"
        return f"norm{float(cfg.max_norm)}{suffix}"
    if cfg.method == "value":
        return f"value{float(cfg.value)}"
    return "none"


def run_name(cfg: PipelineConfig) -> str:
    if cfg.tracking.run_name:
        return cfg.tracking.run_name
    return f"{cfg.model.type}-{'+'.join(cfg.data.tickers)}-{clip_label(cfg.clip)}-lr{_short(cfg.train.lr)}-s{cfg.train.seed}"


def git_commit() -> str:
    """Commit of the fincast checkout that is running (not of the working directory), '-dirty' if modified."""
    where = Path(fincast.__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True,
                             cwd=where)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=5, cwd=where)
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def load_data(cfg: PipelineConfig, *, progress: bool = False, refresh: bool = False) -> Prices:
    return load_prices(cfg.data, min_rows=features.required_rows(cfg.features), refresh=refresh, progress=progress)


def train(cfg: PipelineConfig, *, progress: bool = False) -> TrainOutcome:
    """Run one training pipeline end to end; returns what the CLI summarises."""
    writer = tracking.MetricWriter.maybe(cfg.tracking)  # opens the store in the background while data loads
    try:
        return _train(cfg, writer, progress=progress)
    finally:
        if writer is not None:
            writer.close()


def _threads(cfg: PipelineConfig, writer: tracking.MetricWriter | None, device: torch.device) -> int:
    """torch CPU threads: train.threads, else every core, less one for the metric writer (the default
    model is as fast on one thread as on two, and idle OpenMP threads spin and starve the writer)."""
    if cfg.train.threads is not None:
        return cfg.train.threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores - (1 if writer is not None and device.type == "cpu" else 0))


def _train(cfg: PipelineConfig, writer: tracking.MetricWriter | None, *, progress: bool) -> TrainOutcome:
    prices = load_data(cfg, progress=progress)
    fs = features.build(prices.frames, cfg.features, price=cfg.data.price)

    device = resolve_device(cfg.train.device)
    torch.set_num_threads(_threads(cfg, writer, device))
    precision = resolve_precision(cfg.train.precision, device)
    seed_everything(cfg.train.seed)
    model = build_model(cfg.model, len(fs.names)).to(device)

    experiment = cfg.tracking.experiment or cfg.name
    name = run_name(cfg)
    tags = {
        "fincast.version": fincast.__version__,
        "fincast.git_commit": git_commit(),
        "fincast.data_source": prices.source,
        "fincast.data_fingerprint": prices.fingerprint,
        "fincast.tickers": ",".join(cfg.data.tickers),
        "fincast.device": str(device) + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else ""),
        "fincast.precision": precision,
        "fincast.threads": torch.get_num_threads(),
        "fincast.clip": clip_label(cfg.clip),
        "fincast.pipeline": cfg.name,
    }
    run = tracking.start_run(cfg.tracking, experiment, name, tags, writer=writer)
    try:
        run.log_params(config_mod.flatten(config_mod.to_dict(cfg)))
        run.log_params({
            "data.rows": sum(len(f) for f in prices.frames.values()),
            "data.first_date": min(f.index[0] for f in prices.frames.values()).date().isoformat(),
            "data.last_date": max(f.index[-1] for f in prices.frames.values()).date().isoformat(),
            "features.names": fs.names, "split.val_start": fs.val_start.isoformat(),
            "split.test_start": fs.test_start.isoformat(), "samples.train": len(fs.train),
            "samples.val": len(fs.val), "samples.test": len(fs.test),
            "model.parameters": sum(p.numel() for p in model.parameters()),
        })
        result = fit(model, fs.train, fs.val, cfg.train, cfg.clip, device=device, precision=precision,
                     log_every=cfg.tracking.log_every, sink=run.log_metrics, progress=progress)

        metrics, predictions = _evaluate_test(model, fs, cfg, device, result)
        final = [(f"{m}/{k}", v, result.steps) for m, vals in metrics.items() for k, v in vals.items()]
        final += [("time/step_ms", result.step_ms, result.steps), ("best_val_loss", result.best_val_loss, result.steps)]
        run.log_metrics([(k, v, s) for k, v, s in final if math.isfinite(v)])
        run.set_tags({
            "fincast.diverged": str(result.diverged).lower(),
            "fincast.stop_reason": result.stop_reason,
            **({"fincast.diverged_step": result.diverged_step, "fincast.diverged_reason": result.diverged_reason}
               if result.diverged else {}),
        })
        _log_artifacts(run, cfg, fs, result, predictions, prices, name)
        if cfg.tracking.log_model and result.best_epoch > 0:  # weights from an epoch that validated finitely
            example = fs.test.x[:2]
            with torch.no_grad():
                prediction = model.cpu().eval()(torch.as_tensor(example)).numpy()
            run.log_model(model, example, prediction)
            model.to(device)
    except Exception:
        run.end("FAILED")
        raise
    except BaseException:  # KeyboardInterrupt, SystemExit
        run.end("KILLED")
        raise
    run.end("FINISHED")
    return TrainOutcome(run.run_id, name, experiment, run.uri, str(device), precision, result, metrics,
                        {"train": len(fs.train), "val": len(fs.val), "test": len(fs.test)}, prices.warnings)


def _evaluate_test(model, fs: features.FeatureSet, cfg: PipelineConfig, device, result: FitResult):
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
    out["baseline_naive"] = forecast_metrics(test.y_raw, naive_forecast(len(test)))
    ridge = ridge_forecast(fs.train.x, fs.train.y, test.x, alpha=cfg.model.ridge_alpha) * test.scale
    out["baseline_ridge"] = forecast_metrics(test.y_raw, ridge)
    return out, predictions


def _log_artifacts(run, cfg, fs, result: FitResult, predictions: pd.DataFrame, prices: Prices, name: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        (d / "config.yaml").write_text(config_mod.dump_yaml(cfg))
        predictions.to_csv(d / "predictions.csv", index=False)
        steps_per_epoch = math.ceil(len(fs.train) / cfg.train.batch_size)
        val_steps = [min((i + 1) * steps_per_epoch, result.steps) for i in range(len(result.val_history))]
        threshold = {"norm": cfg.clip.max_norm, "value": None, "none": None}[cfg.clip.method]
        plots.training_curves(d / "training_curves.png", loss=result.history["loss"],
                              norm_pre=result.history["norm_pre"], norm_post=result.history["norm_post"],
                              val_loss=result.val_history, val_steps=val_steps,
                              threshold=threshold if cfg.clip.norm_type == 2 else None, title=name,
                              diverged_step=result.diverged_step)
        files = ["config.yaml", "predictions.csv", "training_curves.png"]
        if prices.warnings:
            (d / "data_warnings.txt").write_text("\n".join(prices.warnings) + "\n")
            files.append("data_warnings.txt")
        for f in files:
            run.log_artifact(d / f)
