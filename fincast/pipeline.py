"""Pipelines (layer L4): wire data -> features -> model -> clipped training -> MLflow records.

Each step writes into the same tracked run, in the order a reader would want it: params and tags
first (so a crashed run still says what it was), per-step metrics while training, then test metrics
beside the baselines, then artifacts (resolved config, curves, predictions, model).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import fincast
from fincast import config as config_mod
from fincast import features, tracking
from fincast.clipping import bounds_global_l2
from fincast.clipping import label as clip_label
from fincast.config import FincastError, PipelineConfig, short_float
from fincast.data import Prices, load_prices
from fincast.models import LSTMForecaster, build_model, forecast_metrics, naive_forecast, ridge_forecast
from fincast.reports import plots
from fincast.training import (
    FitResult,
    dist_info,
    evaluate,
    fit,
    predict,
    resolve_device,
    resolve_precision,
    seed_everything,
    train_runs,
)


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
    checkpoint: str | None = None  # continue with `fincast resume <run_id>`
    task: str = "forecast"
    report: str | None = None  # options task: folder of its tables and figures
    dropped: dict[str, int] = field(default_factory=dict)  # options task: chain rows dropped, per reason
    zero_val_loss: float = math.nan  # validation loss of predicting 0 (training units): the scale of val losses


def run_name(cfg: PipelineConfig) -> str:
    if cfg.tracking.run_name:
        return cfg.tracking.run_name
    return f"{cfg.model.type}-{'+'.join(cfg.data.tickers)}-{clip_label(cfg.clip)}-lr{short_float(cfg.train.lr)}-s{cfg.train.seed}"


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


def warm_up() -> None:
    """Pay a process's one-off first-use costs (torch's lazy modules and kernels, matplotlib's fonts) on a
    tiny model, so that a study worker's first run is as fast as its others."""
    model = torch.nn.LSTM(4, 4, batch_first=True)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 3, 4))[0].square().mean().backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    from fincast.models.grouped_lstm import loaded_kernel
    from fincast.models.stacked import StackedNet

    if loaded_kernel() is not None:  # a study driver loaded it before forking: the engine's first step too
        net = StackedNet([LSTMForecaster(4, 4), LSTMForecaster(4, 4)])
        net.backward(net(torch.randn(2, 2, 3, 4)).sum())
    with tempfile.TemporaryDirectory() as tmp:
        plots.training_curves(Path(tmp) / "warm.png", loss=[1.0, 0.5], norm_pre=[1.0, 2.0], norm_post=[1.0, 1.0],
                              val_loss=[0.7], val_steps=[2], threshold=1.0, title="warm-up")


def load_data(cfg: PipelineConfig, *, progress: bool = False, refresh: bool = False) -> Prices:
    """The pipeline's data: prices (forecast task), or the option market (options task: chain, underlying, rate;
    it has a ``fingerprint`` too)."""
    if cfg.task == "options":
        from fincast.pipeline_options import load_market

        return load_market(cfg, progress=progress, refresh=refresh)
    return load_prices(cfg.data, min_rows=features.required_rows(cfg.features), refresh=refresh, progress=progress)


def train(cfg: PipelineConfig, *, progress: bool = False, tags: dict[str, str] | None = None,
          parent_run_id: str | None = None,
          on_epoch: Callable[[int, float], bool] | None = None) -> TrainOutcome | None:
    """Run one training pipeline end to end; returns what the CLI summarises.

    ``tags`` are added to the run's tags; ``parent_run_id`` makes it a child run (a study's runs).
    ``on_epoch(epoch, val_loss) -> stop?`` sees each epoch's validation loss (a sweep's pruner).
    Under ``torchrun`` every rank trains its shard of each global batch (DDP); only rank 0 tracks the run,
    writes checkpoints and returns an outcome (the others return None)."""
    extra = dict(tags or {})
    if parent_run_id is not None:
        extra["mlflow.parentRunId"] = parent_run_id
    return _run(cfg, progress=progress, extra_tags=extra, on_epoch=on_epoch)


def resume(run_id: str, overrides: list[str] | tuple[str, ...] = (), *, checkpoint_dir: str = "checkpoints",
           progress: bool = False) -> TrainOutcome | None:
    """Continue a run from its checkpoint (``checkpoint_dir/<run_id>.pt``) into the same MLflow run, exactly
    as if it had not stopped: same data (checked by fingerprint), weights, optimizer, schedule, scaler,
    clipper state, data order and RNG. ``overrides`` may change only RESUME_KEYS (e.g. more epochs)."""
    path = Path(checkpoint_dir) / f"{run_id}.pt"
    saved = load_checkpoint(path)
    raw = config_mod.apply_overrides(saved["config"], list(overrides))
    raw["train"]["checkpoint_dir"] = str(checkpoint_dir)  # new checkpoints go beside the one resumed from
    for text in overrides:
        key = ".".join(config_mod.parse_override(text)[0])
        if key not in RESUME_KEYS:
            raise config_mod.ConfigError(f"--set {text!r}: a resumed run keeps its config; only "
                                         f"{', '.join(sorted(RESUME_KEYS))} may change")
    cfg = config_mod.from_dict(raw, f"checkpoint {path}")
    return _run(cfg, progress=progress, resume=saved, resume_overrides=list(overrides))


def resume_spec(cfg: PipelineConfig, run_id: str, *, checkpoint_dir: str = "checkpoints",
                progress: bool = False) -> TrainOutcome | None:
    """``fincast train SPEC --resume RUN_ID``: continue the run from its checkpoint, provided the spec (with
    its --set overrides) resolves to the run's config; only RESUME_KEYS may differ (e.g. more epochs)."""
    saved = load_checkpoint(Path(checkpoint_dir) / f"{run_id}.pt")
    then = config_mod.flatten(saved["config"])
    now = config_mod.flatten(config_mod.to_dict(cfg))
    ignore = RESUME_KEYS | {"train.checkpoint_dir"}
    changed = [k for k in sorted(set(then) | set(now))
               if k not in ignore and not k.startswith("backtest.") and then.get(k) != now.get(k)]
    if changed:
        raise config_mod.ConfigError(
            f"--resume {run_id}: the spec does not match the run's config; a resumed run keeps its config "
            f"(only {', '.join(sorted(RESUME_KEYS))} may change). Differences: "
            + "; ".join(f"{k}: run {then.get(k)!r}, spec {now.get(k)!r}" for k in changed[:8])
            + (f" (and {len(changed) - 8} more)" if len(changed) > 8 else ""))
    overrides = [f"{k}={_yaml_scalar(now[k])}" for k in sorted(RESUME_KEYS) if then.get(k) != now.get(k)]
    return resume(run_id, overrides, checkpoint_dir=checkpoint_dir, progress=progress)


def _yaml_scalar(value) -> str:
    return "null" if value is None else str(value)


RESUME_KEYS = {"train.epochs", "train.max_steps", "train.patience", "train.threads", "train.checkpoint_every",
               "tracking.log_every"}
CHECKPOINT_FORMAT = 1


def save_checkpoint(path: Path, payload: dict) -> None:
    """torch.save, atomically: a crash mid-write leaves the previous checkpoint intact."""
    with config_mod.atomic_file(path) as fh:
        torch.save(payload, fh)


def load_checkpoint(path: Path) -> dict:
    if not path.is_file():
        raise FincastError(f"no checkpoint {path}: runs save one at each epoch end into train.checkpoint_dir "
                           "(unless train.checkpoint=false); pass --checkpoint-dir if it is elsewhere")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated or foreign file
        raise FincastError(f"checkpoint {path} cannot be read: {exc}") from None
    if not isinstance(saved, dict) or saved.get("format") != CHECKPOINT_FORMAT:
        raise FincastError(f"checkpoint {path}: not a fincast checkpoint of format {CHECKPOINT_FORMAT}")
    return saved


def _threads(cfg: PipelineConfig, writer: tracking.MetricWriter | None, device: torch.device) -> int:
    """torch CPU threads: train.threads, else this process's share of the cores, less one for the metric
    writer (the default model is as fast on one thread as on two, and idle OpenMP threads spin and starve
    the writer)."""
    if cfg.train.threads is not None:
        return cfg.train.threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    cores //= max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, cores - (1 if writer is not None and device.type == "cpu" else 0))


def _init_distributed(cfg: PipelineConfig) -> bool:
    """Join the torchrun process group when launched by torchrun (WORLD_SIZE > 1): NCCL on CUDA, gloo on
    CPU. Returns whether this call initialised it (and so must tear it down)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or torch.distributed.is_initialized():
        return False
    cuda = cfg.train.device in ("auto", "cuda") and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group("nccl" if cuda else "gloo")
    return True


def _run(cfg: PipelineConfig, *, progress: bool, resume: dict | None = None,
         resume_overrides: list[str] | None = None, extra_tags: dict[str, str] | None = None,
         on_epoch: Callable[[int, float], bool] | None = None) -> TrainOutcome | None:
    owns_group = _init_distributed(cfg)
    rank, _ = dist_info()
    writer = tracking.MetricWriter.maybe(cfg.tracking) if rank == 0 else None  # opens the store while data loads
    try:
        return _train(cfg, writer, progress=progress and rank == 0, resume=resume,
                      resume_overrides=resume_overrides or [], extra_tags=extra_tags or {}, on_epoch=on_epoch)
    finally:
        if writer is not None:
            writer.close()
        if owns_group:
            torch.distributed.destroy_process_group()


def run_tags(cfg: PipelineConfig, device: torch.device, precision: str, *, source: str, fingerprint: str,
             tickers: str, extra: dict[str, str]) -> dict:
    """The tags every training run carries (price and options tasks), then ``extra``."""
    return {
        "fincast.version": fincast.__version__,
        "fincast.git_commit": git_commit(),
        "fincast.data_source": source,
        "fincast.data_fingerprint": fingerprint,
        "fincast.tickers": tickers,
        "fincast.device": str(device) + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else ""),
        "fincast.precision": precision,
        "fincast.threads": torch.get_num_threads(),
        "fincast.world_size": dist_info()[1],
        "fincast.clip": clip_label(cfg.clip),
        "fincast.pipeline": cfg.name,
        **extra,
    }


def open_run(cfg: PipelineConfig, name: str, tags: dict, *, writer: tracking.MetricWriter | None,
             resume: dict | None, resume_overrides: list[str]) -> tracking.Run:
    """Start the run (or reopen the resumed one, tagged with where and how it was resumed)."""
    if resume is not None:
        tags = {**tags, "fincast.resumed_from_step": resume["run"]["step"]}
        if resume_overrides:
            tags["fincast.resumed_with"] = " ".join(resume_overrides)
    return tracking.start_run(cfg.tracking, cfg.tracking.experiment or cfg.name, name, tags, writer=writer,
                              resume_run_id=resume["run_id"] if resume is not None else None)


@contextlib.contextmanager
def ended(run: tracking.Run) -> Iterator[tracking.Run]:
    """End ``run`` when the block ends: FINISHED, FAILED on an error, KILLED on an interrupt (re-raised)."""
    with ended_on_error(run):
        yield run
    run.end("FINISHED")


def _load_for_run(cfg: PipelineConfig, rank: int, resume: dict | None, progress: bool) -> Prices:
    """Rank 0 fetches (and caches) first, the other ranks then read the cache. A resumed run never
    refreshes the cache: it needs exactly the data it started with."""
    if resume is not None:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, refresh_after_hours=math.inf))
    distributed = torch.distributed.is_initialized()
    prices = load_data(cfg, progress=progress) if rank == 0 else None
    if distributed:
        torch.distributed.barrier()
    if prices is None:
        prices = load_data(cfg)
    if resume is not None and prices.fingerprint != resume["data_fingerprint"]:
        raise FincastError(f"the data changed since the checkpoint (fingerprint {prices.fingerprint}, checkpoint "
                           f"{resume['data_fingerprint']}); a resumed run needs exactly the data it started with")
    return prices


def _train(cfg: PipelineConfig, writer: tracking.MetricWriter | None, *, progress: bool, resume: dict | None,
           resume_overrides: list[str], extra_tags: dict[str, str],
           on_epoch: Callable[[int, float], bool] | None = None) -> TrainOutcome | None:
    if cfg.task == "options":
        from fincast.pipeline_options import train_options

        return train_options(cfg, writer, progress=progress, resume=resume, resume_overrides=resume_overrides,
                             extra_tags=extra_tags, on_epoch=on_epoch)
    rank, world = dist_info()
    prices = _load_for_run(cfg, rank, resume, progress)
    fs = features.build(prices.frames, cfg.features, price=cfg.data.price)

    device = resolve_device(cfg.train.device)
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.set_num_threads(_threads(cfg, writer, device))
    precision = resolve_precision(cfg.train.precision, device)
    seed_everything(cfg.train.seed)
    model = build_model(cfg.model, len(fs.names)).to(device)
    if rank != 0:  # the other ranks train their shards; rank 0 tracks, checkpoints and evaluates
        fit(model, fs.train, fs.val, cfg.train, cfg.clip, device=device, precision=precision,
            log_every=cfg.tracking.log_every, monitor=cfg.monitor, resume=resume, on_epoch=on_epoch,
            cuda_graphs=cfg.train.cuda_graphs)
        return None

    run, name = _open_forecast_run(cfg, prices, fs, model, device, precision, writer=writer, extra_tags=extra_tags,
                                   resume=resume, resume_overrides=resume_overrides)
    with ended(run):  # FINISHED, or FAILED / KILLED with the exception re-raised
        checkpoint, path = checkpointer(cfg, run.run_id, prices.fingerprint)
        result = fit(model, fs.train, fs.val, cfg.train, cfg.clip, device=device, precision=precision,
                     log_every=cfg.tracking.log_every, sink=run.log_metrics, progress=progress,
                     monitor=cfg.monitor, checkpoint=checkpoint, resume=resume, on_epoch=on_epoch,
                     cuda_graphs=cfg.train.cuda_graphs)
        return _close_forecast_run(run, name, cfg, prices, fs, model, device, precision, result, path)


def checkpointer(cfg: PipelineConfig, run_id: str, fingerprint: str) -> tuple[Callable[[dict], None] | None,
                                                                              Path | None]:
    """(the function that saves run ``run_id``'s training state, its file), or (None, None) without checkpoints."""
    if not (cfg.train.checkpoint or cfg.train.checkpoint_every):
        return None, None
    path = Path(cfg.train.checkpoint_dir) / f"{run_id}.pt"
    common = {"format": CHECKPOINT_FORMAT, "run_id": run_id, "config": config_mod.to_dict(cfg),
              "data_fingerprint": fingerprint, "fincast_version": fincast.__version__}

    def save(state: dict) -> None:
        save_checkpoint(path, {**common, **state})

    return save, path


def _open_forecast_run(cfg: PipelineConfig, prices: Prices, fs: features.FeatureSet, model: torch.nn.Module,
                       device: torch.device, precision: str, *, writer: tracking.MetricWriter | None,
                       extra_tags: dict[str, str], resume: dict | None = None,
                       resume_overrides: list[str] | None = None) -> tuple[tracking.Run, str]:
    """Start a price-forecast run: tags, then params (what a crashed run still says it was)."""
    name = run_name(cfg)
    tags = run_tags(cfg, device, precision, source=prices.source, fingerprint=prices.fingerprint,
                    tickers=",".join(cfg.data.tickers), extra=extra_tags)
    run = open_run(cfg, name, tags, writer=writer, resume=resume, resume_overrides=resume_overrides or [])
    if resume is None:
        with ended_on_error(run):
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
    return run, name


def _close_forecast_run(run: tracking.Run, name: str, cfg: PipelineConfig, prices: Prices, fs: features.FeatureSet,
                        model: torch.nn.Module, device: torch.device, precision: str, result: FitResult,
                        path: Path | None = None) -> TrainOutcome:
    """After training: test metrics beside the baselines, the closing metrics and tags, artifacts, the model."""
    metrics, predictions = _evaluate_test(model, fs, cfg, device, result)
    zero_val = log_fit_outcome(run, result, fs.val.y, [(f"{m}/{k}", v) for m, vals in metrics.items()
                                                         for k, v in vals.items()])
    _log_artifacts(run, cfg, fs, result, predictions, prices, name)
    if cfg.tracking.log_model and result.best_epoch > 0:  # weights from an epoch that validated finitely
        log_model(run, model, fs.test.x[:2], device)
    return TrainOutcome(run.run_id, name, cfg.tracking.experiment or cfg.name, run.uri, str(device), precision, result,
                        metrics, {"train": len(fs.train), "val": len(fs.val), "test": len(fs.test)}, prices.warnings,
                        str(path) if path is not None and path.is_file() else None, zero_val_loss=zero_val)


@contextlib.contextmanager
def ended_on_error(run: tracking.Run) -> Iterator[tracking.Run]:
    """End ``run`` only if the block fails (FAILED, or KILLED on an interrupt, re-raised)."""
    try:
        yield run
    except Exception:
        run.end("FAILED")
        raise
    except BaseException:  # KeyboardInterrupt, SystemExit
        run.end("KILLED")
        raise


BATCH_TAG = "fincast.batch_runs"


def batch_key(cfg: PipelineConfig) -> str | None:
    """Runs with the same key can train stacked (``train_batch``): the same task, data, features, model (dropout
    included: each run draws its own masks), batch size, precision, device and tracking store; they may differ in
    seed, learning rate, optimizer, schedule, early stopping, epochs, step limits, checkpoints and clipping."""
    per_run = ("train.seed", "train.lr", "train.optimizer", "train.weight_decay", "train.momentum", "train.schedule",
               "train.warmup_steps", "train.step_size", "train.gamma", "train.min_lr_ratio", "train.patience",
               "train.min_delta", "train.epochs", "train.max_steps", "train.threads", "train.checkpoint",
               "clip.", "tracking.run_name", "backtest.")
    flat = {k: v for k, v in config_mod.flatten(config_mod.to_dict(cfg)).items() if not k.startswith(per_run)}
    return json.dumps(flat, sort_keys=True, default=str)


def train_batch(cfgs: list[PipelineConfig], *, tags: list[dict[str, str]] | None = None,
                parent_run_id: str | None = None, progress: bool = False) -> list[TrainOutcome]:
    """Train runs of equal ``batch_key`` as one stack (``training.train_runs``). Each run is its own MLflow run
    with the params, metrics, tags, artifacts and checkpoint ``train`` would give it, plus the tag
    ``fincast.batch_runs`` = K. Data and features are loaded once for all of them."""
    keys = {batch_key(c) for c in cfgs}
    if None in keys or len(keys) != 1:
        raise FincastError("train_batch: these runs cannot train stacked (see pipeline.batch_key)")
    cfg0 = cfgs[0]
    if cfg0.task == "options":
        from fincast.pipeline_options import train_options_batch

        return train_options_batch(cfgs, tags=tags, parent_run_id=parent_run_id, progress=progress)
    prices = load_data(cfg0, progress=progress)
    fs = features.build(prices.frames, cfg0.features, price=cfg0.data.price)
    device = resolve_device(cfg0.train.device)
    torch.set_num_threads(_threads(cfg0, None, device))
    precision = resolve_precision(cfg0.train.precision, device)
    models = []
    for cfg in cfgs:
        seed_everything(cfg.train.seed)
        models.append(build_model(cfg.model, len(fs.names)).to(device))

    def open_one(cfg, model, extra):
        return _open_forecast_run(cfg, prices, fs, model, device, precision, writer=None, extra_tags=extra)

    def close_one(run, name, cfg, model, result, path):
        return _close_forecast_run(run, name, cfg, prices, fs, model, device, precision, result, path)

    return train_stacked(cfgs, models, (fs.train, fs.val), prices.fingerprint, device, precision, open_one,
                         close_one, tags=tags, parent_run_id=parent_run_id, progress=progress)


def train_stacked(cfgs: list[PipelineConfig], models: list[torch.nn.Module], splits: tuple, fingerprint: str,
                  device: torch.device, precision: str, open_one: Callable, close_one: Callable, *,
                  tags: list[dict[str, str]] | None, parent_run_id: str | None, progress: bool) -> list[TrainOutcome]:
    """Open one MLflow run per config (``open_one(cfg, model, extra_tags) -> (run, name)``), train all of them
    as one stack, each with its own sink and checkpoint, then close each (``close_one(run, name, cfg, model,
    result, checkpoint_path)``). A failure while opening or training marks every run of the stack FAILED; once
    trained, each run is closed on its own, so one that fails to close (FAILED) costs the others nothing: they
    finish, and :class:`StackCloseError` then carries every run's outcome or error."""
    runs = []
    with contextlib.ExitStack() as stack:
        for i, cfg in enumerate(cfgs):
            extra = {**((tags or [{}] * len(cfgs))[i]), BATCH_TAG: str(len(cfgs))}
            if parent_run_id is not None:
                extra["mlflow.parentRunId"] = parent_run_id
            run, name = open_one(cfg, models[i], extra)
            stack.enter_context(ended_on_error(run))
            runs.append((run, name, *checkpointer(cfg, run.run_id, fingerprint)))
        cfg0 = cfgs[0]
        results = train_runs(models, *splits, [c.train for c in cfgs], [c.clip for c in cfgs], device=device,
                             precision=precision, log_every=cfg0.tracking.log_every,
                             sinks=[r.log_metrics for r, *_ in runs], monitor=cfg0.monitor, progress=progress,
                             checkpoints=[save for _, _, save, _ in runs], cuda_graphs=cfg0.train.cuda_graphs)
        stack.pop_all()  # trained: from here each run ends on its own
    outcomes: list[TrainOutcome | Exception] = []
    for i, ((run, name, _, path), cfg, model, result) in enumerate(zip(runs, cfgs, models, results)):
        try:
            with ended(run):
                outcomes.append(close_one(run, name, cfg, model, result, path))
        except Exception as error:  # noqa: BLE001 - this run is FAILED; the others still close
            outcomes.append(error)
        except BaseException:  # an interrupt: the runs not closed yet are KILLED too
            for later, *_ in runs[i + 1:]:
                later.end("KILLED")
            raise
    if any(isinstance(o, Exception) for o in outcomes):
        raise StackCloseError(outcomes, [name for _, name, *_ in runs])
    return outcomes


class StackCloseError(FincastError):
    """Some runs of a trained stack failed to close (test metrics, artifacts, model); the others finished.
    ``outcomes[k]`` is run k's :class:`TrainOutcome` or the error that failed it."""

    def __init__(self, outcomes: list, names: list[str]):
        self.outcomes = outcomes
        failed = [f"{n}: {type(o).__name__}: {o}" for n, o in zip(names, outcomes) if isinstance(o, Exception)]
        super().__init__(f"{len(failed)} of {len(outcomes)} stacked runs failed after training (the others "
                         f"finished): " + "; ".join(failed))


def log_fit_outcome(run: tracking.Run, result: FitResult, val_y: np.ndarray,
                    test_metrics: list[tuple[str, float]]) -> float:
    """Log what every training run ends with (price and options tasks): its test metrics, step time, best
    validation loss, the zero forecast's validation loss (same units as val/loss), the share of steps clipped,
    and the divergence tags. Returns the zero forecast's validation loss."""
    zero_val = float(np.mean(np.square(val_y, dtype=np.float64)))
    final = [(k, float(v), result.steps) for k, v in test_metrics]
    final += [("time/step_ms", result.step_ms, result.steps), ("best_val_loss", result.best_val_loss, result.steps),
              ("baseline_naive/val_loss", zero_val, result.steps),
              ("grad/clip_rate", float(np.mean(result.history["clipped"])) if result.steps else math.nan,
               result.steps)]
    run.log_metrics([(k, v, s) for k, v, s in final if math.isfinite(v)])
    run.set_tags({
        "fincast.diverged": str(result.diverged).lower(),
        "fincast.stop_reason": result.stop_reason,
        **({"fincast.diverged_step": result.diverged_step, "fincast.diverged_reason": result.diverged_reason}
           if result.diverged else {}),
    })
    return zero_val


def log_model(run, model: torch.nn.Module, example: np.ndarray, device: torch.device) -> None:
    """Log the model with an input example and its prediction (the signature), computed on the CPU."""
    with torch.no_grad():
        prediction = model.cpu().eval()(torch.as_tensor(example)).numpy()
    run.log_model(model, example, prediction)
    model.to(device)


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
        l2_global = bounds_global_l2(cfg.clip)  # such thresholds can be drawn against the norm
        threshold = result.history.get("threshold") if l2_global else None
        plots.training_curves(d / "training_curves.png", loss=result.history["loss"],
                              norm_pre=result.history["norm_pre"], norm_post=result.history["norm_post"],
                              val_loss=result.val_history, val_steps=val_steps,
                              threshold=threshold, title=name,
                              diverged_step=result.diverged_step)
        files = ["config.yaml", "predictions.csv", "training_curves.png"]
        if prices.warnings:
            (d / "data_warnings.txt").write_text("\n".join(prices.warnings) + "\n")
            files.append("data_warnings.txt")
        for f in files:
            run.log_artifact(d / f)


# ---------------------------------------------------------------------------------------------
# Walk-forward backtest: data -> folds (refit, forecast) -> evaluation -> report, into one MLflow run
# ---------------------------------------------------------------------------------------------


@dataclass
class BacktestOutcome:
    run_id: str
    experiment: str
    tracking_uri: str
    report: Path
    stats: pd.DataFrame  # one row per (ticker, model), buy and hold included
    training: pd.DataFrame  # per LSTM: divergence, clipping, time
    folds: int
    forecasts: int
    device: str
    seconds: dict[str, float]  # where the time went; "total" and "model_training" included
    warnings: list[str] = field(default_factory=list)


def _metric_name(text: str) -> str:
    """'Max. Drawdown [%]' -> 'max_drawdown_pct' (MLflow metric names)."""
    text = text.replace("[%]", "pct").replace("[x]", "x").replace("(ann.)", "ann").replace("R2", "r2")
    return "_".join(w for w in "".join(c.lower() if c.isalnum() else " " for c in text).split())


def lstm_fitter(cfg: PipelineConfig, device: torch.device, precision: str = "fp32"):
    """The backtest's LSTM trainer: (clip, train, val, warm-start weights, max epochs) -> FoldFit. A fresh model
    seeded with train.seed (or the warm-start weights), trained by training.fit with early stopping on val, the
    best epoch's weights kept."""
    from fincast.backtest import FoldFit
    from fincast.backtest.walkforward import concat_splits

    monitor = dataclasses.replace(cfg.monitor, every=None)  # no per-layer monitoring inside folds

    def train_once(clip, train, val, warm, epochs, refit: bool = False):
        """refit: a fixed number of epochs (no early stopping), keeping the last epoch's weights."""
        seed_everything(cfg.train.seed)
        model = build_model(cfg.model, train.x.shape[2]).to(device)
        if warm is not None:
            model.load_state_dict(warm)
        train_cfg = dataclasses.replace(cfg.train, epochs=epochs,
                                        **({"patience": None, "max_steps": None} if refit else {}))
        res = fit(model, train, val, train_cfg, clip, device=device, precision=precision,
                  log_every=cfg.tracking.log_every, monitor=monitor, restore_best=not refit,
                  cuda_graphs=cfg.train.cuda_graphs)
        return model, res

    def fit_fold(clip, train: features.Split, val: features.Split, warm: dict | None, epochs: int) -> FoldFit:
        model, res = train_once(clip, train, val, warm, epochs)
        h = res.history
        steps, norms, clipped = res.steps, list(h["norm_pre"]), list(h["clipped"])
        usable = res.best_epoch > 0  # weights from an epoch that validated finitely
        refit, diverged = "off", res.diverged
        if usable and cfg.backtest.refit_full:  # the same recipe on everything up to the cutoff, best epoch count
            again, res2 = train_once(clip, concat_splits(train, val), val, warm, res.best_epoch, refit=True)
            steps += res2.steps
            norms += res2.history["norm_pre"]
            clipped += res2.history["clipped"]
            refit = "diverged: kept the early-stopped model" if res2.diverged else f"{res.best_epoch} epochs"
            diverged = diverged or res2.diverged
            if not res2.diverged:
                model = again
        info = {"steps": steps, "epochs": res.epochs, "stop_reason": res.stop_reason,
                "best_val_loss": res.best_val_loss, "diverged": diverged, "refit": refit,
                "clip_rate": float(np.mean(clipped)) if clipped else math.nan,
                "grad_norm_median": float(np.nanmedian(norms)) if norms else math.nan,
                "grad_norm_max": float(np.nanmax(norms)) if norms else math.nan}
        weights = {k: v.detach().clone() for k, v in model.state_dict().items()} if usable else None
        return FoldFit(lambda x: predict(model, x, device), usable, weights, info)

    return fit_fold


def backtest(cfg: PipelineConfig, *, progress: bool = False, out_dir: str | Path = "reports") -> BacktestOutcome:
    """Walk-forward backtest of ``cfg`` (its ``backtest`` section): one MLflow run holding the configuration,
    each fold's training outcome as metrics stepped by fold, the final statistics, the walk-forward table and
    the report, which is also written to ``out_dir/backtest/<name>/``."""
    from fincast import backtest as bt
    from fincast.backtest import evaluate as bt_eval
    from fincast.reports import backtest as report_mod

    t_start = time.perf_counter()
    prices = load_data(cfg, progress=progress)
    t_data = time.perf_counter() - t_start
    device = resolve_device(cfg.train.device)
    torch.set_num_threads(_threads(cfg, None, device))
    precision = resolve_precision(cfg.train.precision, device)
    b = cfg.backtest
    experiment = cfg.tracking.experiment or cfg.name
    window = "expanding" if b.window == "expanding" else f"rolling{b.window}"
    name = cfg.tracking.run_name or f"backtest-{'+'.join(cfg.data.tickers)}-{window}-every{b.refit_every}"
    tags = {
        "fincast.kind": "backtest", "fincast.version": fincast.__version__, "fincast.git_commit": git_commit(),
        "fincast.data_source": prices.source, "fincast.data_fingerprint": prices.fingerprint,
        "fincast.tickers": ",".join(cfg.data.tickers), "fincast.pipeline": cfg.name,
        "fincast.device": str(device) + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else ""),
        "fincast.precision": precision, "fincast.models": ",".join(bt.model_names(cfg)),
    }
    run = tracking.start_run(cfg.tracking, experiment, name, tags)
    with ended(run):  # FINISHED, or FAILED / KILLED with the exception re-raised
        run.log_params(config_mod.flatten(config_mod.to_dict(cfg)))
        fold_keys = ("test_rmse", "test_rmse_vs_naive_pct", "best_val_loss", "steps", "clip_rate", "grad_norm_median",
                     "grad_norm_max", "fit_seconds")
        log_seconds = 0.0

        def on_fold(k: int, rows: pd.DataFrame) -> None:  # folds as metrics stepped by fold number
            nonlocal log_seconds
            t = time.perf_counter()
            out = []
            for r in rows.to_dict("records"):
                out += [(f"fold/{r['model']}/{key}", float(r[key]), k) for key in fold_keys
                        if r.get(key) is not None and math.isfinite(float(r[key]))]
                if isinstance(r.get("diverged"), bool | np.bool_):
                    out.append((f"fold/{r['model']}/diverged", float(r["diverged"]), k))
            run.log_metrics(out)
            log_seconds += time.perf_counter() - t

        wf = bt.walk_forward(prices.frames, cfg, fit_lstm=lstm_fitter(cfg, device, precision), progress=progress,
                             on_fold=on_fold)
        t = time.perf_counter()
        ev = bt_eval.evaluate(wf.forecasts, prices.frames, models=wf.models, horizon=cfg.features.horizon,
                              rule=b.position, max_position=b.max_position, cost_bps=b.cost_bps,
                              vol_target=b.vol_target, vol_window=b.vol_window, price=cfg.data.price)
        t_eval = time.perf_counter() - t
        t = time.perf_counter()
        exp_id = tracking.get_run(run.run_id, cfg.tracking).info.experiment_id
        ctx = report_mod.Context(
            name=cfg.name, tickers=list(cfg.data.tickers), source=prices.source, horizon=cfg.features.horizon,
            window=b.window, refit_every=b.refit_every, warm_start=b.warm_start, rule=b.position,
            cost_bps=b.cost_bps, max_position=b.max_position, vol_target=b.vol_target, sharpe_window=b.sharpe_window,
            device=f"{device} ({precision})", run_id=run.run_id, tracking_uri=run.uri, experiment_id=exp_id,
            refit_full=b.refit_full, notes=[*wf.notes, *prices.warnings])
        out = Path(out_dir) / "backtest" / cfg.name
        training = report_mod.training_summary(wf.folds, wf.lstms)
        index = report_mod.build(out, ctx, wf.forecasts, wf.folds, ev, wf.lstms, training)
        t_report = time.perf_counter() - t
        t = time.perf_counter()
        multi = len(ev.periods) > 1
        final = []
        for r in ev.stats.to_dict("records"):
            prefix = f"{r['ticker']}/{r['model']}" if multi else r["model"]
            final += [(f"{prefix}/{_metric_name(k)}", float(v), 0) for k, v in r.items()
                      if k not in ("ticker", "model") and isinstance(v, float | int) and math.isfinite(v)]
        run.log_metrics(final)
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "config.yaml").write_text(config_mod.dump_yaml(cfg))
            run.log_artifact(Path(tmp) / "config.yaml")
        for f in sorted(out.iterdir()):
            if f.is_file() and not f.name.startswith("."):
                run.log_artifact(f, "backtest")
        log_seconds += time.perf_counter() - t
    seconds = {"data": t_data, **wf.seconds, "evaluate": t_eval, "report": t_report, "tracking": log_seconds}
    seconds["total"] = time.perf_counter() - t_start
    seconds["model_training"] = wf.seconds["lstm_fit"] + wf.seconds["ridge"]
    return BacktestOutcome(run.run_id, experiment, run.uri, index, ev.stats, training, int(wf.folds["fold"].nunique()),
                           len(wf.forecasts), f"{device} ({precision})", seconds, [*wf.notes, *prices.warnings])
