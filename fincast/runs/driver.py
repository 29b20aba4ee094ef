"""The run driver (layer L4, runs): one training run of any task end to end, or several of one task trained as
one stack, each into its own MLflow run.

What every run does is here, once: the torchrun process group and rank, the device, torch threads and precision,
the seed, data loaded by rank 0 first, the MLflow run (tags and params first, so a crashed run still says what
it was), checkpoints and exact resume, training on the engine, the closing metrics and tags, artifacts and the
model, and the run's end state (FINISHED, FAILED, KILLED). What differs between tasks (data, samples, model,
evaluation, artifacts) comes from the task module that ``cfg.task`` names (``fincast.runs.registry``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from fincast import config as config_mod
from fincast import tracking
from fincast.config import FincastError, PipelineConfig
from fincast.runs import preflight, setup, weights
from fincast.runs.checkpoints import RESUME_KEYS, checkpointer, load_checkpoint, resume_lock
from fincast.runs.record import (
    BATCH_TAG,
    Keeping,
    TrainOutcome,
    all_ended_on_error,
    ended,
    ended_on_error,
    log_fit_outcome,
    open_run,
    run_tags,
)
from fincast.runs.record import (
    log_model as log_run_model,
)
from fincast.runs.registry import task as task_named
from fincast.runs.task import Data, Splits
from fincast.tracking import series
from fincast.training import FitResult, dist_info, fit, seed_everything, train_runs

OnEpoch = Callable[[int, float], bool]
KEEP_ALL = Keeping()  # every config key as a param, the model as an MLflow model


def load_data(cfg: PipelineConfig, *, progress: bool = False, refresh: bool = False) -> Data:
    """The run's data, as its task loads it."""
    return task_named(cfg.task).load(cfg, progress=progress, refresh=refresh)


def baselines(cfg: PipelineConfig, data: Data) -> list[tuple[str, float]]:
    """The task's baselines' test metrics on these data (no model): a study records them once, on its parent."""
    task = task_named(cfg.task)
    return task.baselines(cfg, data, task.prepare(cfg, data))


def check_outputs(cfgs: list[PipelineConfig], *, keep: Keeping = KEEP_ALL,
                  reports: Iterable[tuple[str, Path]] = (), stores: Iterable[tuple[str, str]] = ()) -> None:
    """Before any work: every place runs of ``cfgs`` write (store, artifacts, checkpoints, the task's report
    folders unless ``keep`` draws no figures) and ``reports``/``stores`` besides can be written, else one
    ``preflight.OutputError`` naming each that cannot."""
    tasks = [task_named(c.task).outputs(c) for c in cfgs] if keep.figures else []
    preflight.check_outputs(cfgs, reports=[*(o for t in tasks for o in t), *reports], stores=stores)


def train(cfg: PipelineConfig, *, progress: bool = False, tags: dict[str, str] | None = None,
          parent_run_id: str | None = None, on_epoch: OnEpoch | None = None,
          keep: Keeping = KEEP_ALL) -> TrainOutcome | None:
    """Run one training run end to end; returns what the CLI summarises.

    ``tags`` are added to the run's tags; ``parent_run_id`` makes it a child run (a study's runs).
    ``on_epoch(epoch, val_loss) -> stop?`` sees each epoch's validation loss (a sweep's pruner).
    Under ``torchrun`` every rank trains its shard of each global batch (DDP); only rank 0 tracks the run,
    writes checkpoints and returns an outcome (the others return None). ``keep`` (``record.Keeping``): whether the
    model is logged as an MLflow model (tracking.log_model) or its weights go on the parent run (a study's runs;
    ``fincast export RUN_ID`` makes the MLflow model on demand), and which config keys become params."""
    extra = dict(tags or {})
    if parent_run_id is not None:
        extra["mlflow.parentRunId"] = parent_run_id
    return _run(cfg, progress=progress, extra_tags=extra, on_epoch=on_epoch, keep=keep)


def resume(run_id: str, overrides: list[str] | tuple[str, ...] = (), *, checkpoint_dir: str = "checkpoints",
           progress: bool = False) -> TrainOutcome | None:
    """Continue a run from its checkpoint (``checkpoint_dir/<run_id>.pt``) into the same MLflow run, exactly
    as if it had not stopped: same data (checked by fingerprint), weights, optimizer, schedule, scaler,
    clipper state, data order and RNG. ``overrides`` may change only RESUME_KEYS (e.g. more epochs). One resume
    of a run at a time (``checkpoints.resume_lock``; the checkpoint is read under the lock)."""
    path = Path(checkpoint_dir) / f"{run_id}.pt"
    with resume_lock(path, run_id):
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
    overrides = [f"{k}={'null' if now[k] is None else now[k]}" for k in sorted(RESUME_KEYS)
                 if then.get(k) != now.get(k)]
    return resume(run_id, overrides, checkpoint_dir=checkpoint_dir, progress=progress)


def _run(cfg: PipelineConfig, *, progress: bool, resume: dict | None = None,
         resume_overrides: list[str] | None = None, extra_tags: dict[str, str] | None = None,
         on_epoch: OnEpoch | None = None, keep: Keeping = KEEP_ALL) -> TrainOutcome | None:
    check_outputs([cfg], keep=keep)  # (every rank: they fail together, before joining the group)
    owns_group = setup.init_distributed(cfg)
    rank, _ = dist_info()
    writer = tracking.MetricWriter.maybe(cfg.tracking) if rank == 0 else None  # opens the store while data loads
    try:
        return _train(cfg, writer, progress=progress and rank == 0, resume=resume,
                      resume_overrides=resume_overrides or [], extra_tags=extra_tags or {}, on_epoch=on_epoch,
                      keep=keep)
    finally:
        if writer is not None:
            writer.close()
        if owns_group:
            torch.distributed.destroy_process_group()


def _load_for_run(cfg: PipelineConfig, rank: int, resume: dict | None, progress: bool) -> Data:
    """Rank 0 fetches (and caches) first, the other ranks then read the cache. A resumed run never
    refreshes the cache: it needs exactly the data it started with."""
    if resume is not None:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, refresh_after_hours=math.inf))
    data = load_data(cfg, progress=progress) if rank == 0 else None
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    if data is None:
        data = load_data(cfg)
    if resume is not None and data.fingerprint != resume["data_fingerprint"]:
        raise FincastError(f"the data changed since the checkpoint (fingerprint {data.fingerprint}, checkpoint "
                           f"{resume['data_fingerprint']}); a resumed run needs exactly the data it started with")
    return data


def _train(cfg: PipelineConfig, writer: tracking.MetricWriter | None, *, progress: bool, resume: dict | None,
           resume_overrides: list[str], extra_tags: dict[str, str],
           on_epoch: OnEpoch | None = None, keep: Keeping = KEEP_ALL) -> TrainOutcome | None:
    task = task_named(cfg.task)
    rank, _ = dist_info()
    data = _load_for_run(cfg, rank, resume, progress)
    splits = task.prepare(cfg, data)
    device, precision = setup.prepare(cfg, writer=writer is not None)
    seed_everything(cfg.train.seed)
    model = task.build_model(cfg, splits).to(device)
    fit_args = dict(device=device, precision=precision, log_every=cfg.tracking.log_every, monitor=cfg.monitor,
                    metric_every=cfg.tracking.metric_every,
                    resume=resume, on_epoch=on_epoch, cuda_graphs=cfg.train.cuda_graphs)
    if rank != 0:  # the other ranks train their shards; rank 0 tracks, checkpoints and evaluates
        fit(model, splits.train, splits.val, cfg.train, cfg.clip, **fit_args)
        return None
    run, name = open_one(cfg, data, splits, model, device, precision, writer=writer, extra_tags=extra_tags,
                         resume=resume, resume_overrides=resume_overrides, params=keep.params,
                         hold=keep.series == "parent")
    with ended(run):  # FINISHED, or FAILED / KILLED with the exception re-raised
        checkpoint, path = checkpointer(cfg, run.run_id, data.fingerprint)
        with contextlib.ExitStack() as held:  # a resume of this run is refused while its first training goes on
            if path is not None and resume is None:
                path.parent.mkdir(parents=True, exist_ok=True)
                held.enter_context(resume_lock(path, run.run_id, training=True))
            result = fit(model, splits.train, splits.val, cfg.train, cfg.clip, sink=run.log_metrics,
                         progress=progress, checkpoint=checkpoint, **fit_args)
        parent = extra_tags.get("mlflow.parentRunId")
        saved = _save_weights(cfg, parent, keep, [(run.run_id, result, model)])
        out = close_one(run, name, cfg, data, splits, model, device, precision, result, path, keep=keep,
                        progress=progress, tags=saved.get(run.run_id))
    _save_series(cfg, parent, keep, [(run.run_id, result)])
    return out


def open_one(cfg: PipelineConfig, data: Data, splits: Splits, model: torch.nn.Module, device: torch.device,
             precision: str, *, writer: tracking.MetricWriter | None, extra_tags: dict[str, str],
             resume: dict | None = None, resume_overrides: list[str] | None = None,
             params: frozenset[str] | None = None, hold: bool = False) -> tuple[tracking.Run, str]:
    """Start a run: tags, then params (what a crashed run still says it was); a resumed run is reopened.
    ``hold``: its metrics are held until it closes (``tracking.Run.hold_metrics``; a study's runs)."""
    about = task_named(cfg.task).describe(cfg, data, splits)
    tags = run_tags(cfg, device, precision, source=data.source, fingerprint=data.fingerprint, tickers=about.tickers,
                    extra={**about.tags, **extra_tags})
    run = open_run(cfg, about.name, tags, writer=writer, resume=resume, resume_overrides=resume_overrides or [])
    if resume is None:
        with ended_on_error(run):
            flat = config_mod.flatten(config_mod.to_dict(cfg))
            run.log_values(params={**(flat if params is None else {k: v for k, v in flat.items() if k in params}),
                                   **about.params, "model.parameters": sum(p.numel() for p in model.parameters())})
    if hold:
        run.hold_metrics()
    return run, about.name


def close_one(run: tracking.Run, name: str, cfg: PipelineConfig, data: Data, splits: Splits,
              model: torch.nn.Module, device: torch.device, precision: str, result: FitResult,
              path: Path | None, *, keep: Keeping = KEEP_ALL, shared: dict | None = None,
              progress: bool = False, tags: dict[str, str] | None = None) -> TrainOutcome:
    """After training: the task's test evaluation beside its baselines, the closing metrics and tags (``tags``
    among them, in the same MLflow call), the artifacts (the run's series file among them unless it goes to the
    parent), the model."""
    with tempfile.TemporaryDirectory() as tmp:
        done = task_named(cfg.task).finish(cfg, data, splits, model, device, result, name, Path(tmp),
                                           draw_figures=keep.figures, shared=shared, precision=precision,
                                           progress=progress)
        zero_val = log_fit_outcome(run, result, splits.val.y, done.test_metrics, name, tags)
        files = list(done.files)
        if keep.series == "run":
            files.append(series.write([_series(run.run_id, result)], Path(tmp) / series.FILE))
        run.log_files(files)
    if keep.models == "log" and cfg.tracking.log_model and result.best_epoch > 0:  # weights that validated finitely
        log_run_model(run, model, splits.test.x[:2], device, fmt=cfg.tracking.model_format)
    return TrainOutcome(run.run_id, name, cfg.tracking.experiment or cfg.name, run.uri, str(device), precision, result,
                        done.metrics, {"train": len(splits.train), "val": len(splits.val), "test": len(splits.test)},
                        data.warnings, str(path) if path is not None and path.is_file() else None, task=cfg.task,
                        zero_val_loss=zero_val, **done.outcome)


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
                parent_run_id: str | None = None, progress: bool = False,
                on_closed: Callable[[int, TrainOutcome | Exception], None] | None = None,
                keep: Keeping = KEEP_ALL) -> list[TrainOutcome]:
    """Train runs of equal ``batch_key`` as one stack (``training.train_runs``). Each run is its own MLflow run
    with the params, metrics, tags, artifacts and checkpoint ``train`` would give it, plus the tag
    ``fincast.batch_runs`` = K. Data and samples are prepared once for all of them.

    A failure while opening or training marks every run of the stack FAILED; once trained, each run is closed
    on its own, so one that fails to close (FAILED) costs the others nothing: they finish, and
    :class:`StackCloseError` then carries every run's outcome or error. ``on_closed(k, outcome or error)`` is
    called as each run k is closed (a study's progress bar moves per run, not per stack). ``keep`` as for
    :func:`train`: with models="weights" the stack's weights go into one file on the parent run."""
    keys = {batch_key(c) for c in cfgs}
    if None in keys or len(keys) != 1:
        raise FincastError("train_batch: these runs cannot train stacked (see runs.driver.batch_key)")
    cfg0 = cfgs[0]
    task = task_named(cfg0.task)
    data = load_data(cfg0, progress=progress)
    splits = task.prepare(cfg0, data)
    device, precision = setup.prepare(cfg0)
    models = []
    for cfg in cfgs:
        seed_everything(cfg.train.seed)
        models.append(task.build_model(cfg, splits).to(device))
    runs: list = []
    # until trained, a failure ends every opened run (FAILED, or KILLED on an interrupt); from then on each run
    # ends on its own. (Not an ExitStack of per-run context managers popped after training: the popped
    # generators, collected, would end every run KILLED before it closed.)
    with all_ended_on_error([]) as opened:
        for i, cfg in enumerate(cfgs):
            extra = {**((tags or [{}] * len(cfgs))[i]), BATCH_TAG: str(len(cfgs))}
            if parent_run_id is not None:
                extra["mlflow.parentRunId"] = parent_run_id
            run, name = open_one(cfg, data, splits, models[i], device, precision, writer=None, extra_tags=extra,
                                 params=keep.params, hold=keep.series == "parent")
            opened.append(run)
            runs.append((run, name, *checkpointer(cfg, run.run_id, data.fingerprint)))
        results = train_runs(models, splits.train, splits.val, [c.train for c in cfgs], [c.clip for c in cfgs],
                             device=device, precision=precision, log_every=cfg0.tracking.log_every,
                             metric_every=cfg0.tracking.metric_every,
                             sinks=[r.log_metrics for r, *_ in runs], monitor=cfg0.monitor, progress=progress,
                             checkpoints=[save for _, _, save, _ in runs], cuda_graphs=cfg0.train.cuda_graphs)
        saved = _save_weights(cfg0, parent_run_id, keep, [(r.run_id, res, m) for (r, *_), res, m in
                                                          zip(runs, results, models)])

    shared: dict = {}  # the baselines, computed by the first run to close

    def close(run, name, cfg, model, result, path):
        return close_one(run, name, cfg, data, splits, model, device, precision, result, path, keep=keep,
                         shared=shared, tags=saved.get(run.run_id))

    outcomes: list = []
    try:
        outcomes = _close_stack(runs, cfgs, models, results, close, on_closed)
    except StackCloseError as exc:
        outcomes = exc.outcomes
        raise
    finally:
        _save_series(cfg0, parent_run_id, keep, [(r.run_id, res) for (r, *_), res in zip(runs, results)])
    return outcomes


def _save_weights(cfg: PipelineConfig, parent_run_id: str | None, keep: Keeping,
                  trained: list[tuple[str, FitResult, torch.nn.Module]]) -> dict[str, dict[str, str]]:
    """With models="weights" and a parent run: the weights of the trained runs ((run id, result, model)) whose
    validation was finite once, in one file on the parent, before the runs close. Returns each such run's tag
    saying where (sent with its closing values: no MLflow call of its own)."""
    if keep.models != "weights" or parent_run_id is None or not cfg.tracking.log_model:
        return {}
    usable = [(run_id, m) for run_id, result, m in trained if result.best_epoch > 0]
    where = weights.save_batch(tracking.resolve_uri(cfg.tracking), parent_run_id, usable)
    return {run_id: {weights.WEIGHTS_TAG: where} for run_id, _ in usable} if where else {}


def _series(run_id: str, result: FitResult) -> Any:
    return series.frame(run_id, result.history, result.val_steps, result.val_history)


def _save_series(cfg: PipelineConfig, parent_run_id: str | None, keep: Keeping, trained: list) -> None:
    """With series="parent" and a parent run: the stack's per-step series (every run trained) in one file on the
    parent, ``series/<first run id>.parquet``."""
    if keep.series != "parent" or parent_run_id is None or not trained:
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = series.write([_series(run_id, result) for run_id, result in trained],
                            Path(tmp) / f"{trained[0][0]}.parquet")
        tracking.attach(tracking.resolve_uri(cfg.tracking), parent_run_id).log_artifact(path, series.FOLDER)


def _close_stack(runs: list, cfgs: list[PipelineConfig], models: list, results: list, close: Callable[..., Any],
                 on_closed: Callable[[int, TrainOutcome | Exception], None] | None = None) -> list[TrainOutcome]:
    outcomes: list[TrainOutcome | Exception] = []
    for i, ((run, name, _, path), cfg, model, result) in enumerate(zip(runs, cfgs, models, results)):
        try:
            with ended(run):
                outcomes.append(close(run, name, cfg, model, result, path))
        except Exception as error:  # noqa: BLE001 - this run is FAILED; the others still close
            outcomes.append(error)
        except BaseException:  # an interrupt: the runs not closed yet are KILLED too
            for later, *_ in runs[i + 1:]:
                later.end("KILLED")
            raise
        if on_closed is not None:
            on_closed(i, outcomes[-1])
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
