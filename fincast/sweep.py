"""Clipping-threshold sweeps (layer L4): ``fincast sweep SPEC.yaml``, on Optuna (the only module importing it).

A sweep spec (``pipelines/sweep_*.yaml``)::

    name: sweep_crypto
    base: price_crypto.yaml                   # pipeline spec, relative to this file
    set: {train.optimizer: sgd}               # overrides for every trial
    search:
      clip:                                   # methods searched, each with the range of its threshold
        none: {}                              # unclipped (no threshold)
        norm: {low: 0.01, high: 10}           # clip.norm.max_norm, log-uniform
        zclip: [1.5, 2.5, 4]                  # clip.zclip.z_thresh, these values
      lr: {low: 0.1, high: 3}                 # optional: train.lr, log-uniform (absent: the base's lr)
    sweep: {sampler: tpe, trials: 30}         # SweepSettings

Every trial is one ordinary training run, an MLflow child run of the sweep's parent run. Its objective is the
best validation loss; a trial whose training goes non-finite scores ``sweep.divergence_penalty`` x the zero
forecast's validation loss (worse than predicting nothing) instead of failing the sweep, and the median pruner
stops trials that are behind at an epoch. The sweep's state lives in an Optuna storage (SQLite in the project
by default; any SQLAlchemy URL), so rerunning the command resumes it, ``sweep.workers`` processes share it, and
workers on other machines join it with ``--join NAME``. The parent run gets the results table, the parameter
importances, a summary and the objective-vs-threshold plot.

Exactly ``sweep.trials`` trials finish (complete or pruned), each once: before training, a worker checks that
fewer than that many trials were created ahead of its own (trial numbers are assigned atomically by the
storage); the rare loser of a race is closed as FAIL with ``fincast.surplus`` and trains nothing. Trials of a
killed worker are failed (at once when it ran on this machine, else after a missed heartbeat) and queued again
with the same parameters.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import dataclasses
import datetime
import hashlib
import json
import logging
import math
import os
import socket
import sqlite3
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd
import yaml
from optuna.trial import TrialState
from tqdm import tqdm

from fincast import config as config_mod
from fincast import tracking
from fincast.clipping import label as clip_label
from fincast.clipping import threshold_keys
from fincast.config import (
    CLIP_METHODS,
    ConfigError,
    FincastError,
    PipelineConfig,
    SweepSettings,
    short_float,
)

log = logging.getLogger("fincast.sweep")
optuna.logging.set_verbosity(optuna.logging.WARNING)  # fincast reports trials itself
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
# fincast keeps the heartbeat itself around ask/tell (see _heartbeat), which this warning does not know
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")

SPEC_KEYS = ("name", "base", "set", "search", "sweep")
SEARCH_KEYS = ("clip", "lr")
# the threshold a sweep searches for each clip method
THRESHOLD_KEYS = threshold_keys()  # clip.norm.max_norm, clip.autoclip.percentile, ... (from the methods' registry)
DEFAULT_TRIALS = 30
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
HEARTBEAT_S, GRACE_S = 10, 60  # a worker that misses heartbeats for GRACE_S is dead: its trial is retried
MAX_RETRIES = 2                # a trial's parameters are queued again at most this often (worker died, error)
MAX_CONSECUTIVE_FAILURES = 3   # a worker stops after this many trials in a row raised an error
SWEEP_TAG, TRIAL_TAG = "fincast.sweep", "fincast.sweep_trial"
# keys of a sweep spec that may change between invocations of one sweep (not in its hash)
_MUTABLE = ("sweep.trials", "sweep.workers", "sweep.threads", "sweep.storage")


@dataclass(frozen=True)
class Axis:
    """One searched key: log-uniform on [low, high], or one of ``values``."""
    key: str
    low: float | None = None
    high: float | None = None
    values: tuple[float, ...] | None = None

    def grid(self, points: int) -> list[float]:
        if self.values is not None:
            return list(self.values)
        return [float(v) for v in np.geomspace(self.low, self.high, points)]

    def suggest(self, trial: optuna.Trial) -> float:
        if self.values is not None:
            return float(trial.suggest_categorical(self.key, list(self.values)))
        return trial.suggest_float(self.key, self.low, self.high, log=True)

    def describe(self) -> str:
        if self.values is not None:
            return "{" + ", ".join(f"{v:g}" for v in self.values) + "}"
        return f"[{self.low:g}, {self.high:g}] log-uniform"


@dataclass(frozen=True)
class Sweep:
    name: str
    path: Path
    raw: dict                       # the spec as resolved (after --set), saved with the parent run
    settings: SweepSettings
    methods: dict[str, Axis | None]  # clip method -> its threshold's axis (None for none)
    lr: Axis | None
    base: dict                      # the base pipeline (raw) with `set` applied
    base_cfg: PipelineConfig

    @property
    def trials(self) -> int:
        if self.settings.sampler == "grid":
            return len(self.grid())
        return self.settings.trials or DEFAULT_TRIALS

    def grid(self) -> list[dict[str, Any]]:
        """Every point of the grid: methods x their thresholds x learning rates (the product of the axes)."""
        points = self.settings.grid_points
        lrs = self.lr.grid(points) if self.lr is not None else [None]
        out = []
        for method, axis in self.methods.items():
            for thr in axis.grid(points) if axis is not None else [None]:
                for lr in lrs:
                    p: dict[str, Any] = {"clip.method": method}
                    if axis is not None:
                        p[axis.key] = thr
                    if lr is not None:
                        p["train.lr"] = lr
                    out.append(p)
        return out

    @property
    def spec_hash(self) -> str:
        """What the trials compute and how they are chosen (not the budget, workers or storage)."""
        flat = {k: v for k, v in config_mod.flatten({"search": self.raw.get("search"),
                                                     "sweep": dataclasses.asdict(self.settings)}).items()
                if k not in _MUTABLE}
        flat["base"] = config_mod.flatten(config_mod.to_dict(self.base_cfg))
        return hashlib.sha256(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def with_range(self, method: str, low: float, high: float) -> Sweep:
        methods = dict(self.methods)
        methods[method] = Axis(THRESHOLD_KEYS[method], low, high)
        return dataclasses.replace(self, methods=methods)

    def thresholds(self) -> dict[str, str]:
        """method -> the key of its threshold ("" for none), for tables and plots."""
        return {m: (a.key if a is not None else "") for m, a in self.methods.items()}


# ---------------------------------------------------------------------------------------------
# Loading a spec
# ---------------------------------------------------------------------------------------------


def _axis(key: str, raw: Any, where: str, errors: list[str]) -> Axis | None:
    """{low, high} (log-uniform) or a list of values, all > 0."""
    if isinstance(raw, dict):
        unknown = [k for k in raw if k not in ("low", "high")]
        if unknown:
            errors.append(f"{where}: unknown key(s) {', '.join(map(str, unknown))}; a range is {{low: x, high: y}}")
            return None
        try:
            low, high = float(raw["low"]), float(raw["high"])
        except (KeyError, TypeError, ValueError):
            errors.append(f"{where} = {raw!r}: a range needs numbers low and high, e.g. {{low: 0.01, high: 10}}")
            return None
        if not (0 < low < high) or not math.isfinite(high):
            errors.append(f"{where} = {raw!r}: need 0 < low < high (the range is searched log-uniformly)")
            return None
        return Axis(key, low, high)
    if isinstance(raw, list) and raw:
        try:
            values = tuple(float(v) for v in raw)
        except (TypeError, ValueError):
            errors.append(f"{where} = {raw!r}: expected a list of numbers")
            return None
        if any(not (v > 0 and math.isfinite(v)) for v in values) or len(set(values)) != len(values):
            errors.append(f"{where} = {raw!r}: values must be distinct numbers > 0")
            return None
        return Axis(key, values=values)
    errors.append(f"{where} = {raw!r}: expected a range {{low: x, high: y}} or a list of values")
    return None


def load(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Sweep:
    """Read a sweep spec, apply ``--set`` overrides (``sweep.*``/``search.*``/``name``/``base`` change the spec;
    any other key is a pipeline key set for every trial), and check everything before any work: the spec's
    keys, each range, and the pipeline config at both ends of every range."""
    from fincast.study import read_spec

    raw, name, base_path, errors = read_spec(path, overrides, SPEC_KEYS, "sweep")
    path = Path(path)
    common = raw.get("set") or {}
    if not isinstance(common, dict):
        errors.append("set: expected a mapping of pipeline keys to values, e.g. {train.optimizer: sgd}")
        common = {}
    settings = config_mod.build_section(SweepSettings, raw.get("sweep"), "sweep.", errors)
    search = raw.get("search")
    if not isinstance(search, dict):
        errors.append("search: required, a mapping with clip (methods and their threshold ranges) and optionally lr")
        search = {}
    errors += [f"search.{k}: unknown key; search has: {', '.join(SEARCH_KEYS)}" for k in search
               if k not in SEARCH_KEYS]
    clips = search.get("clip")
    methods: dict[str, Axis | None] = {}
    if isinstance(clips, list) and all(isinstance(c, str) for c in clips):  # [none, norm]: no ranges given
        clips = {c: None for c in clips}
    if not isinstance(clips, dict) or not clips:
        errors.append("search.clip: required, a mapping of clip methods to threshold ranges, e.g. "
                      "{none: {}, norm: {low: 0.01, high: 10}}")
        clips = {}
    for method, rng in clips.items():
        where = f"search.clip.{method}"
        if method not in CLIP_METHODS:
            errors.append(f"{where}: unknown clip method; one of {', '.join(CLIP_METHODS)}")
        elif method == "none":
            if rng not in (None, {}):
                errors.append(f"{where} = {rng!r}: unclipped training has no threshold; write none: {{}}")
            methods[method] = None
        elif rng is None or rng == {}:
            errors.append(f"{where}: give the range of {THRESHOLD_KEYS[method]}, e.g. {{low: 0.01, high: 10}}, "
                          "or a list of values")
        else:
            axis = _axis(THRESHOLD_KEYS[method], rng, where, errors)
            if axis is not None:
                methods[method] = axis
    lr = _axis("train.lr", search["lr"], "search.lr", errors) if search.get("lr") is not None else None
    if settings is not None and settings.range == "advised" and "norm" not in clips:
        errors.append("sweep.range = advised: the advisor proposes clip.norm.max_norm; add norm to search.clip "
                      "(e.g. norm: {low: 0.01, high: 10}, replaced by the advised range)")
    if errors or base_path is None:
        raise ConfigError(f"invalid sweep spec {path}:\n  " + "\n  ".join(errors))

    base_raw = config_mod.read_yaml(base_path)
    for key, value in config_mod.flatten({str(k): v for k, v in common.items()}).items():
        config_mod.set_key(base_raw, key.split("."), value, f"{path}: set.{key}")
    base_cfg = config_mod.from_dict(base_raw, f"{base_path} with {path}: set")
    sweep = Sweep(name.strip(), path, raw, settings, methods, lr, base_raw, base_cfg)
    # every range's ends must make a valid pipeline config (e.g. autoclip percentiles <= 100)
    for method, axis in methods.items():
        ends = [None] if axis is None else ([axis.low, axis.high] if axis.values is None else list(axis.values))
        for v in ends:
            p = {"clip.method": method, **({axis.key: v} if axis is not None else {})}
            try:
                trial_config(sweep, p, number=-1)
            except ConfigError as exc:
                at = "" if v is None else f" at {v:g}"
                errors += [f"search.clip.{method}{at}: {e}" for e in str(exc).split("\n  ")[1:]]
    if lr is not None:
        for v in (lr.values or (lr.low, lr.high)):
            try:
                trial_config(sweep, {"clip.method": next(iter(methods)), "train.lr": v}, number=-1)
            except ConfigError as exc:
                errors += [f"search.lr at {v:g}: {e}" for e in str(exc).split("\n  ")[1:]]
    if errors:
        raise ConfigError(f"invalid sweep spec {path}:\n  " + "\n  ".join(dict.fromkeys(errors)))
    return sweep


def trial_config(sweep: Sweep, params: dict[str, Any], *, number: int, threads: int | None = None) -> PipelineConfig:
    """The pipeline config of one trial: the base with the trial's clip method, threshold and lr."""
    raw = config_mod.apply_overrides(sweep.base, [])
    raw.setdefault("clip", {})
    if not isinstance(raw["clip"], dict):
        raw["clip"] = {}
    raw["clip"]["method"] = params["clip.method"]
    for key, value in params.items():
        if key != "clip.method":
            config_mod.set_key(raw, key.split("."), value, f"{sweep.path}: trial {number}")
    cfg = config_mod.from_dict(raw, f"{sweep.path} (trial {number}: "
                                    + ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                                                for k, v in params.items()) + ")")
    label = clip_label(cfg.clip)
    return dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, refresh_after_hours=math.inf),
        train=dataclasses.replace(cfg.train, threads=cfg.train.threads or threads),
        tracking=dataclasses.replace(cfg.tracking, experiment=sweep.name, metrics_writer="inline",
                                     run_name=f"t{number} {label} lr={short_float(cfg.train.lr)}"))


# ---------------------------------------------------------------------------------------------
# Optuna storage and study
# ---------------------------------------------------------------------------------------------


def storage_url(sweep: Sweep, override: str | None = None) -> str:
    url = override or sweep.settings.storage
    return url or f"sqlite:///{Path('optuna.db').resolve()}"


def redact(url: str) -> str:
    """The URL without its password (for logs and run params)."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not parseable: say nothing about it
        return url.split("@")[-1]


def _storage(url: str) -> optuna.storages.RDBStorage:
    kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("sqlite"):  # parallel writers wait for the lock instead of failing at once
        kwargs = {"connect_args": {"timeout": 120}}
    try:
        storage = optuna.storages.RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=HEARTBEAT_S,
                                             grace_period=GRACE_S, heartbeat_stale_trial_callback=_retry)
    except Exception as exc:  # bad URL, missing driver, unreachable server
        raise FincastError(f"cannot open the Optuna storage {redact(url)}: {exc}") from None
    if url.startswith("sqlite:///"):  # WAL: readers never block writers, commits cost one fsync
        with contextlib.suppress(sqlite3.Error), contextlib.closing(sqlite3.connect(url[len("sqlite:///"):],
                                                                                     timeout=60)) as con:
            con.execute("PRAGMA journal_mode=WAL")
    return storage


def _retry(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """Queue a failed trial's parameters again (at most MAX_RETRIES times per original trial)."""
    retries = int(trial.user_attrs.get("fincast.retries", 0))
    if trial.user_attrs.get("fincast.surplus") or retries >= MAX_RETRIES or not trial.params:
        return
    study.enqueue_trial(trial.params, user_attrs={"fincast.retries": retries + 1, "fincast.retry_of": trial.number})


def _sampler(sweep: Sweep, seed: int) -> optuna.samplers.BaseSampler:
    if sweep.settings.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, constant_liar=True,
                                          n_startup_trials=min(10, max(2, sweep.trials // 3)))
    return optuna.samplers.RandomSampler(seed=seed)  # grid: only the queued points are run


def _pruner(sweep: Sweep) -> optuna.pruners.BasePruner:
    s = sweep.settings
    if s.pruner == "none":
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=s.prune_startup_trials, n_warmup_steps=s.prune_warmup_epochs)


def _open_study(sweep: Sweep, storage: optuna.storages.RDBStorage, seed: int, *, create: bool) -> optuna.Study:
    if create:
        return optuna.create_study(storage=storage, study_name=sweep.name, direction="minimize",
                                   sampler=_sampler(sweep, seed), pruner=_pruner(sweep), load_if_exists=True)
    try:
        return optuna.load_study(study_name=sweep.name, storage=storage, sampler=_sampler(sweep, seed),
                                 pruner=_pruner(sweep))
    except KeyError:
        names = [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]
        raise FincastError(f"no sweep {sweep.name!r} in {redact(storage.url)} (sweeps there: "
                           f"{', '.join(names) or 'none'}); start it with `fincast sweep SPEC --storage URL` "
                           "first, then join") from None


def _worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _recover(study: optuna.Study) -> int:
    """Fail (and queue again) the running trials whose worker is dead: on this machine by its pid, elsewhere by
    its heartbeat. Returns how many were failed."""
    storage = study._storage
    host = socket.gethostname()
    n = 0
    now = datetime.datetime.now()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        h, _, pid = str(t.user_attrs.get("fincast.worker", "")).rpartition(":")
        dead = h == host and pid.isdigit() and not tracking.pid_alive(int(pid))
        # a worker killed between ask() and naming itself left no pid and no heartbeat: presumed dead after GRACE_S
        orphan = not h and t.datetime_start is not None and (now - t.datetime_start).total_seconds() > GRACE_S
        if dead or orphan:
            with contextlib.suppress(RuntimeError, optuna.exceptions.UpdateFinishedTrialError):
                if storage.set_trial_state_values(t._trial_id, TrialState.FAIL):
                    n += 1
                    _retry(study, storage.get_trial(t._trial_id))
    before = len(study.get_trials(deepcopy=False, states=(TrialState.FAIL,)))
    optuna.storages.fail_stale_trials(study)
    return n + len(study.get_trials(deepcopy=False, states=(TrialState.FAIL,))) - before


@contextlib.contextmanager
def _heartbeat(storage: optuna.storages.RDBStorage, trial_id: int):
    """Record the trial's heartbeat every HEARTBEAT_S while it trains (so other machines see it alive)."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT_S):
            with contextlib.suppress(Exception):
                storage.record_heartbeat(trial_id)

    storage.record_heartbeat(trial_id)
    thread = threading.Thread(target=beat, name="fincast-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _counts(study: optuna.Study) -> dict[str, int]:
    states = [t.state for t in study.get_trials(deepcopy=False)]
    return {"finished": sum(s in FINISHED for s in states), "running": states.count(TrialState.RUNNING),
            "waiting": states.count(TrialState.WAITING), "failed": states.count(TrialState.FAIL)}


# ---------------------------------------------------------------------------------------------
# Workers: ask a trial, train it, tell the result
# ---------------------------------------------------------------------------------------------


def suggest(sweep: Sweep, trial: optuna.Trial) -> dict[str, Any]:
    """The trial's parameters: a clip method, that method's threshold, and the lr when it is searched."""
    method = trial.suggest_categorical("clip.method", list(sweep.methods))
    params: dict[str, Any] = {"clip.method": method}
    axis = sweep.methods[method]
    if axis is not None:
        params[axis.key] = axis.suggest(trial)
    if sweep.lr is not None:
        params["train.lr"] = sweep.lr.suggest(trial)
    return params


def objective(out, penalty: float) -> tuple[float, bool]:
    """(objective, diverged) of a finished training run: its best validation loss, or ``penalty`` x the zero
    forecast's validation loss when training went non-finite or never validated finitely."""
    f = out.fit
    if f.diverged or not math.isfinite(f.best_val_loss):
        return penalty * out.zero_val_loss, True
    return float(f.best_val_loss), False


def _train_trial(sweep: Sweep, study: optuna.Study, trial: optuna.Trial, parent_id: str, threads: int | None,
                 worker: str) -> str:
    """Train one trial and tell Optuna its result; returns its state name."""
    from fincast import pipeline

    params = suggest(sweep, trial)
    cfg = trial_config(sweep, params, number=trial.number, threads=threads)
    prune = sweep.settings.pruner != "none"

    def on_epoch(epoch: int, val_loss: float) -> bool:
        trial.report(val_loss, epoch)
        return prune and trial.should_prune()

    tags = {"fincast.kind": "sweep-trial", SWEEP_TAG: sweep.name, TRIAL_TAG: str(trial.number),
            "fincast.sweep_worker": worker}
    t0 = time.perf_counter()
    out = pipeline.train(cfg, tags=tags, parent_run_id=parent_id, on_epoch=on_epoch)
    value, diverged = objective(out, sweep.settings.divergence_penalty)
    f = out.fit
    pruned = f.stop_reason == "pruned"
    attrs = {"fincast.run_id": out.run_id, "fincast.diverged": diverged, "fincast.stop_reason": f.stop_reason,
             "fincast.best_val_loss": f.best_val_loss if math.isfinite(f.best_val_loss) else None,
             "fincast.zero_val_loss": out.zero_val_loss, "fincast.epochs": f.epochs, "fincast.steps": f.steps,
             "fincast.clip_rate": float(np.mean(f.history["clipped"])) if f.steps else None,
             "fincast.seconds": time.perf_counter() - t0}
    for k, v in attrs.items():
        trial.set_user_attr(k, v)
    state = "pruned" if pruned and not diverged else "complete"
    tracking.attach(out.tracking_uri, out.run_id).set_tags(
        {"fincast.sweep_state": state, "fincast.sweep_value": repr(value)})
    if state == "pruned":
        study.tell(trial, state=TrialState.PRUNED)
    else:
        study.tell(trial, value)
    return "diverged" if diverged else state


def work(sweep: Sweep, url: str, parent_id: str, *, worker: int = 0, threads: int | None = None,
         gpu: int | None = None, on_trial=None) -> dict[str, Any]:
    """One worker: ask, train and tell trials until ``sweep.trials`` have finished (counted across every worker
    of the storage). Returns its counts."""
    if gpu is not None:
        import torch

        torch.cuda.set_device(gpu)
    storage = _storage(url)
    study = _open_study(sweep, storage, 0, create=False)
    n0 = len(study.get_trials(deepcopy=False))
    seed = int(np.random.SeedSequence([sweep.settings.seed, worker, n0]).generate_state(1)[0])
    study.sampler = _sampler(sweep, seed)  # every worker (and every resumption) its own stream
    me = _worker_id()
    done = {"complete": 0, "pruned": 0, "diverged": 0, "surplus": 0, "failed": []}
    consecutive = 0
    target = sweep.trials
    while True:
        _recover(study)
        c = _counts(study)
        if c["finished"] + c["running"] >= target or (sweep.settings.sampler == "grid" and not c["waiting"]):
            break
        trial = study.ask()
        trial.set_user_attr("fincast.worker", me)
        ahead = sum(t.number < trial.number
                    for t in study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.RUNNING)))
        if ahead >= target:  # another worker took the last trial meanwhile: this one is not needed
            trial.set_user_attr("fincast.surplus", True)
            study.tell(trial, state=TrialState.FAIL)
            done["surplus"] += 1
            break
        try:
            with _heartbeat(storage, trial._trial_id):
                state = _train_trial(sweep, study, trial, parent_id, threads, me)
        except Exception as exc:  # the run is FAILED in MLflow; the trial is retried (MAX_RETRIES)
            with contextlib.suppress(Exception):
                trial.set_user_attr("fincast.error", f"{type(exc).__name__}: {exc}"[:2000])
                study.tell(trial, state=TrialState.FAIL)
                _retry(study, study._storage.get_trial(trial._trial_id))
            done["failed"].append((trial.number, f"{type(exc).__name__}: {exc}"))
            log.warning("trial %d failed: %s: %s", trial.number, type(exc).__name__, exc)
            consecutive += 1
            if consecutive >= MAX_CONSECUTIVE_FAILURES:
                break
            continue
        consecutive = 0
        done["complete" if state == "diverged" else state] += 1
        done["diverged"] += state == "diverged"
        if on_trial is not None:
            on_trial()
    return done


# ---------------------------------------------------------------------------------------------
# Driving a sweep
# ---------------------------------------------------------------------------------------------


@dataclass
class SweepOutcome:
    name: str
    parent_run_id: str | None
    experiment: str
    tracking_uri: str
    storage: str                  # redacted
    sampler: str
    target: int
    finished_before: int
    trained_now: int
    complete: int
    pruned: int
    diverged: int
    failed: list[tuple[int, str]]
    best: dict[str, Any] | None   # number, params, value, run_id
    trials: pd.DataFrame
    importance: pd.DataFrame
    folder: Path | None
    summary: str
    seconds: float
    joined: bool = False
    advice: dict | None = None


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def plan_workers(sweep: Sweep, gpus: int) -> tuple[int, int | None, list[int | None]]:
    """(workers, threads per worker, GPU of each worker): one worker per GPU (round robin when there are
    more workers than GPUs), else one per core; threads = cores / workers."""
    device = sweep.base_cfg.train.device
    use_gpus = gpus if device in ("auto", "cuda") else 0
    workers = sweep.settings.workers or (use_gpus or _cores())
    workers = max(1, min(workers, sweep.trials))
    threads = sweep.settings.threads or max(1, _cores() // workers)
    return workers, threads, [i % use_gpus if use_gpus else None for i in range(workers)]


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _execute(sweep: Sweep, url: str, parent_id: str, study: optuna.Study, bar: tqdm | None,
             tracking_uri: str) -> list[dict]:
    """Run the workers (in this process when there is one) until the budget is spent; update the bar."""
    workers, threads, gpus = plan_workers(sweep, _gpu_count())

    def refresh() -> None:
        if bar is not None:
            c = _counts(study)
            bar.n = min(c["finished"], bar.total)
            with contextlib.suppress(ValueError):
                bar.set_postfix(best=f"{study.best_value:.4g}", running=c["running"], refresh=False)
            bar.refresh()

    if workers == 1:
        return [work(sweep, url, parent_id, worker=0, threads=threads, gpu=gpus[0], on_trial=refresh)]
    from fincast.study import worker_pool

    # GPU workers come from a forkserver: a process forked after this one touched CUDA could not use it
    with worker_pool(workers, threads, tracking_uri, fork_ok=all(g is None for g in gpus)) as (pool, store_ready):
        store_ready()
        futures = {pool.submit(work, sweep, url, parent_id, worker=i, threads=threads, gpu=gpus[i])
                   for i in range(workers)}
        pending = set(futures)
        while pending:
            _, pending = cf.wait(pending, timeout=2.0)
            refresh()
        results = []
        for fut in futures:
            try:
                results.append(fut.result())
            except cf.process.BrokenProcessPool as exc:
                raise FincastError(f"a sweep worker process died ({exc}); rerun the same command to resume "
                                   "(its trial is retried)") from None
        return results


def _parent(sweep: Sweep, study: optuna.Study, url: str, fingerprint: str) -> tracking.Run:
    """The sweep's parent run: reopened when the study names one, else created (and named in the study)."""
    cfg = dataclasses.replace(sweep.base_cfg.tracking, experiment=sweep.name)
    run_id = study.user_attrs.get("fincast.parent_run_id")
    if run_id:
        try:
            if tracking.get_run(run_id, cfg).info.lifecycle_stage == "active":
                return tracking.start_run(cfg, sweep.name, f"sweep {sweep.name}", resume_run_id=run_id)
        except Exception:  # gone from this tracking store: start a new parent
            log.warning("sweep %s: its parent run %s is not in %s; starting a new one", sweep.name, run_id,
                        tracking.resolve_uri(cfg))
    from fincast import pipeline

    tags = {"fincast.kind": "sweep", SWEEP_TAG: sweep.name, "fincast.sweep_role": "parent",
            "fincast.optuna_storage": redact(url), "fincast.data_fingerprint": fingerprint,
            "fincast.git_commit": pipeline.git_commit(), "fincast.pipeline": sweep.base_cfg.name}
    parent = tracking.start_run(cfg, sweep.name, f"sweep {sweep.name}", tags)
    s = sweep.settings
    parent.log_params({
        "sweep.base": str(sweep.raw.get("base")), "sweep.methods": list(sweep.methods),
        **{f"search.{m}": a.describe() for m, a in sweep.methods.items() if a is not None},
        "search.lr": sweep.lr.describe() if sweep.lr is not None else f"{sweep.base_cfg.train.lr:g} (fixed)",
        **{f"sweep.{f.name}": getattr(s, f.name) for f in dataclasses.fields(SweepSettings) if f.name != "storage"},
        "sweep.trials": sweep.trials, "sweep.storage": redact(url),
        **{f"set.{k}": v for k, v in (sweep.raw.get("set") or {}).items()},
    })
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "sweep.yaml").write_text(yaml.safe_dump(sweep.raw, sort_keys=False))
        parent.log_artifact(Path(tmp) / "sweep.yaml")
    study.set_user_attr("fincast.parent_run_id", parent.run_id)
    return parent


def _ensure_grid(sweep: Sweep, study: optuna.Study) -> int:
    """Queue every grid point that has no trial yet (all of them in a new sweep); returns how many."""
    have = {json.dumps(t.params, sort_keys=True) for t in study.get_trials(deepcopy=False)
            if t.state != TrialState.FAIL}
    n = 0
    for p in sweep.grid():
        if json.dumps(p, sort_keys=True) not in have:
            study.enqueue_trial(p)
            n += 1
    return n


def _settle_runs(study: optuna.Study, uri: str, parent_id: str) -> int:
    """Delete the MLflow child runs that are no finished trial's run (attempts of failed or retried trials), so
    every trial appears exactly once. Runs of trials still running are kept."""
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    stale = []
    for r in tracking.child_runs(uri, parent_id):
        number = r.data.tags.get(TRIAL_TAG)
        if number is None:  # the advisor's probe run
            continue
        t = trials.get(int(number))
        gone = t is None or t.state in (TrialState.FAIL, TrialState.WAITING)
        if gone or (t.state in FINISHED and t.user_attrs.get("fincast.run_id") != r.info.run_id):
            stale.append(r.info.run_id)
    tracking.delete_runs(uri, stale)
    return len(stale)


def trials_table(sweep: Sweep, study: optuna.Study) -> pd.DataFrame:
    """One row per finished trial (complete or pruned), by trial number (reports.sweep.COLUMNS)."""
    from fincast.reports.sweep import COLUMNS

    rows = []
    for t in study.get_trials(deepcopy=False, states=FINISHED):
        a = t.user_attrs
        method = t.params.get("clip.method", "none")
        key = THRESHOLD_KEYS.get(method, "")
        value = t.value if t.state == TrialState.COMPLETE else (
            t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else math.nan)
        rows.append({"number": t.number, "state": "complete" if t.state == TrialState.COMPLETE else "pruned",
                     "method": method, "threshold_key": key, "threshold": t.params.get(key, math.nan),
                     "lr": t.params.get("train.lr", sweep.base_cfg.train.lr), "value": value,
                     "best_val_loss": a.get("fincast.best_val_loss"), "diverged": bool(a.get("fincast.diverged")),
                     "stop_reason": a.get("fincast.stop_reason", ""), "epochs": a.get("fincast.epochs"),
                     "steps": a.get("fincast.steps"), "clip_rate": a.get("fincast.clip_rate"),
                     "seconds": a.get("fincast.seconds"), "run_id": a.get("fincast.run_id", ""),
                     "worker": a.get("fincast.worker", "")})
    df = pd.DataFrame(rows, columns=list(COLUMNS))
    for col in ("threshold", "lr", "value", "best_val_loss", "clip_rate", "seconds"):
        df[col] = pd.to_numeric(df[col], errors="coerce").astype(float)
    df["diverged"] = df["diverged"].astype(bool)
    return df.sort_values("number").reset_index(drop=True)


def importance(sweep: Sweep, study: optuna.Study) -> pd.DataFrame:
    """fANOVA importances over the complete trials: of the method and lr across methods, and within each method
    of its threshold and lr. Scopes with fewer than 4 trials, or nothing varied, are left out."""
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    rows = []

    def add(scope: str, ts: list, params: list[str]) -> None:
        params = [p for p in params if len({t.params.get(p) for t in ts}) > 1]
        if len(ts) < 4 or not params:
            return
        tmp = optuna.create_study(direction="minimize")
        tmp.add_trials(ts)
        try:
            imp = optuna.importance.get_param_importances(
                tmp, params=params, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))
        except (ValueError, RuntimeError) as exc:
            log.info("importance of %s: %s", scope, exc)
            return
        rows.extend({"scope": scope, "param": k, "importance": float(v)} for k, v in imp.items())

    lr = ["train.lr"] if sweep.lr is not None else []
    add("all trials", trials, ["clip.method", *lr])
    for method, axis in sweep.methods.items():
        if axis is not None:
            add(f"clip.method={method}", [t for t in trials if t.params.get("clip.method") == method], [axis.key, *lr])
    return pd.DataFrame(rows, columns=["scope", "param", "importance"])


def probe_lr(sweep: Sweep) -> float:
    """The learning rate of the advisor's probe: the middle of search.lr on a log scale (the median of its
    values), else the base's lr. Gradient norms scale with the lr the weights move at."""
    if sweep.lr is None:
        return sweep.base_cfg.train.lr
    if sweep.lr.values is not None:
        return float(np.median(sweep.lr.values))
    return float(math.sqrt(sweep.lr.low * sweep.lr.high))


def _advice(sweep: Sweep, study: optuna.Study, parent_id: str | None, *, progress: bool) -> dict | None:
    """sweep.range = advised: the advisor's range for clip.norm.max_norm, from the study (the probe runs once)."""
    if sweep.settings.range != "advised":
        return None
    saved = study.user_attrs.get("fincast.advice")
    if saved is not None or parent_id is None:
        return saved
    from fincast import advise

    lr = probe_lr(sweep)
    cfg = dataclasses.replace(sweep.base_cfg, train=dataclasses.replace(sweep.base_cfg.train, lr=lr),
                              tracking=dataclasses.replace(sweep.base_cfg.tracking, experiment=sweep.name,
                                                           metrics_writer="inline",
                                                           run_name=f"advise-clip {sweep.name} lr={lr:g}"))
    a = advise.advise(cfg, steps=sweep.settings.advise_steps, parent_run_id=parent_id, progress=progress,
                      tags={SWEEP_TAG: sweep.name})
    low, high = a.advice.sweep_range()
    saved = {"run_id": a.run_id, "low": low, "high": high, "lr": lr, "proposals": a.advice.proposals(),
             "diverged_step": a.diverged_step, "plot": str(a.plot)}
    study.set_user_attr("fincast.advice", saved)
    return saved


def run(sweep: Sweep, *, storage: str | None = None, progress: bool = False,
        out_dir: str | Path = "reports") -> SweepOutcome:
    """Start or resume the sweep: trials until ``sweep.trials`` have finished (in ``sweep.workers`` processes,
    and in any worker that joins from elsewhere), then the summary into the parent run and ``out_dir``."""
    from fincast import pipeline

    t0 = time.perf_counter()
    url = storage_url(sweep, storage)
    store = _storage(url)
    study = _open_study(sweep, store, sweep.settings.seed, create=True)
    _check_same(sweep, study, url)
    # the data once, here: a bad source fails now with its own message; trials then read the cache
    fingerprint = pipeline.load_data(sweep.base_cfg, progress=progress).fingerprint
    saved_fp = study.user_attrs.get("fincast.data_fingerprint")
    if saved_fp not in (None, fingerprint):
        raise FincastError(f"sweep {sweep.name}: the data changed since it started (fingerprint {fingerprint}, the "
                           f"sweep's {saved_fp}); its trials would not be comparable. Start a new sweep "
                           f"(--set name={sweep.name}_2) or use the same data")
    study.set_user_attr("fincast.data_fingerprint", fingerprint)
    study.set_user_attr("fincast.spec_hash", sweep.spec_hash)
    parent = _parent(sweep, study, url, fingerprint)
    status = "FINISHED"
    bar = None
    try:
        advice = _advice(sweep, study, parent.run_id, progress=progress)
        if advice is not None:
            sweep = sweep.with_range("norm", advice["low"], advice["high"])
        recovered = _recover(study)
        if recovered:
            log.info("sweep %s: %d trial(s) of a stopped worker failed and queued again", sweep.name, recovered)
        if sweep.settings.sampler == "grid":
            _ensure_grid(sweep, study)
        _settle_runs(study, parent.uri, parent.run_id)
        before = _counts(study)["finished"]
        if before:
            log.info("sweep %s: %d of %d trials finished before; going on", sweep.name, before, sweep.trials)
        bar = tqdm(total=sweep.trials, initial=min(before, sweep.trials), desc=f"sweep {sweep.name}", unit="trial",
                   disable=not progress)
        results = _execute(sweep, url, parent.run_id, study, bar, parent.uri)
        # workers elsewhere may still run trials (or a last one failed and was queued again): finish them
        while True:
            c = _counts(study)
            if c["finished"] >= sweep.trials:
                break
            if c["running"]:
                time.sleep(2.0)
                _recover(study)
                continue
            if c["waiting"] or (sweep.settings.sampler != "grid" and not _gave_up(results)):
                more = work(sweep, url, parent.run_id, worker=len(results), threads=sweep.settings.threads)
                results.append(more)
                if not any(more[k] for k in ("complete", "pruned")) and not _counts(study)["running"]:
                    break
                continue
            break
        if bar is not None:
            bar.n = min(_counts(study)["finished"], sweep.trials)
            bar.close()
        _settle_runs(study, parent.uri, parent.run_id)
        out = _summarise(sweep, study, parent, url, out_dir, results, before, t0, advice)
        if out.complete + out.pruned < sweep.trials:
            status = "FAILED"
        return out
    except Exception:
        status = "FAILED"
        raise
    except BaseException:
        status = "KILLED"
        raise
    finally:
        if bar is not None:
            bar.close()
        parent.end(status)


def _gave_up(results: list[dict]) -> bool:
    """A worker stopped on consecutive failures: do not start more trials in this process."""
    return any(len(r["failed"]) >= MAX_CONSECUTIVE_FAILURES for r in results)


def _check_same(sweep: Sweep, study: optuna.Study, url: str) -> None:
    saved = study.user_attrs.get("fincast.spec_hash")
    if saved is not None and saved != sweep.spec_hash:
        raise FincastError(
            f"sweep {sweep.name!r} in {redact(url)} was started from a different spec (its search, its sweep "
            "settings or its base pipeline changed; only sweep.trials, workers, threads and storage may change "
            f"between runs of one sweep). Use another name (--set name={sweep.name}_2), or delete it: "
            f"optuna delete-study --study-name {sweep.name} --storage {redact(url)}")


def _summarise(sweep: Sweep, study: optuna.Study, parent: tracking.Run, url: str, out_dir: str | Path,
               results: list[dict], before: int, t0: float, advice: dict | None) -> SweepOutcome:
    from fincast.reports import sweep as report

    table = trials_table(sweep, study)
    imp = importance(sweep, study)
    zeros = np.array([t.user_attrs.get("fincast.zero_val_loss") or math.nan
                      for t in study.get_trials(deepcopy=False, states=FINISHED)], float)
    zero_loss = float(np.nanmedian(zeros)) if np.isfinite(zeros).any() else math.nan  # the same data: one value
    failed = [f for r in results for f in r["failed"]]
    unresolved = sum(1 for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
                     if not t.user_attrs.get("fincast.surplus"))
    extra = {"advice.json": json.dumps(advice, indent=1) + "\n"} if advice else {}
    files = report.write(Path(out_dir) / "sweep" / sweep.name, sweep.name, table, imp, thresholds=sweep.thresholds(),
                         sampler=sweep.settings.sampler, penalty=sweep.settings.divergence_penalty, zero_loss=zero_loss,
                         failed=unresolved, parent_run_id=parent.run_id, extra=extra)
    for f in files.files:
        parent.log_artifact(f, "sweep")
    b = report.best_trial(table)
    best = None
    if b is not None:
        t = study.trials[int(b["number"])]
        best = {"number": int(b["number"]), "params": dict(t.params), "value": float(b["value"]),
                "run_id": b["run_id"], "method": b["method"], "threshold_key": b["threshold_key"],
                "threshold": float(b["threshold"]), "lr": float(b["lr"])}
        parent.set_tags({"fincast.best_trial": best["number"], "fincast.best_run_id": best["run_id"],
                         "fincast.best_params": json.dumps(best["params"])})
    n_complete = int((table["state"] == "complete").sum())
    n_pruned = int((table["state"] == "pruned").sum())
    metrics = [("trials/complete", n_complete, 0), ("trials/pruned", n_pruned, 0),
               ("trials/diverged", int(table["diverged"].sum()), 0), ("trials/failed", unresolved, 0),
               ("zero_forecast/val_loss", zero_loss, 0)]
    if best is not None:
        metrics += [("best/value", best["value"], 0), ("best/lr", best["lr"], 0)]
        if best["method"] != "none":
            metrics.append(("best/threshold", best["threshold"], 0))
    for r in report.per_method(table).to_dict("records"):
        if math.isfinite(r["best_value"]):
            metrics.append((f"best/{r['method']}/value", r["best_value"], 0))
            if r["method"] != "none":
                metrics.append((f"best/{r['method']}/threshold", r["best_threshold"], 0))
    parent.log_metrics([(k, float(v), s) for k, v, s in metrics if math.isfinite(float(v))])
    trained = sum(r["complete"] + r["pruned"] for r in results)
    text = report.summary_text(sweep.name, table, imp, sampler=sweep.settings.sampler,
                               penalty=sweep.settings.divergence_penalty, zero_loss=zero_loss, failed=unresolved,
                               parent_run_id=parent.run_id)
    return SweepOutcome(sweep.name, parent.run_id, sweep.name, parent.uri, redact(url), sweep.settings.sampler,
                        sweep.trials, before, trained, n_complete, n_pruned, int(table["diverged"].sum()), failed,
                        best, table, imp, files.folder, text, time.perf_counter() - t0, advice=advice)


def join(sweep: Sweep, *, storage: str | None = None, progress: bool = False) -> SweepOutcome:
    """Work on a running sweep from another process or machine: same spec, same storage, same MLflow store.
    Trains trials until the sweep's budget is spent; the process that started the sweep writes its summary."""
    from fincast import pipeline

    t0 = time.perf_counter()
    url = storage_url(sweep, storage)
    study = _open_study(sweep, _storage(url), sweep.settings.seed, create=False)
    _check_same(sweep, study, url)
    parent_id = None
    for _ in range(30):  # the driver names its parent run right after creating the study
        parent_id = study.user_attrs.get("fincast.parent_run_id")
        advice = study.user_attrs.get("fincast.advice") if sweep.settings.range == "advised" else True
        if parent_id and advice:
            break
        time.sleep(1.0)  # (user_attrs are read from the storage at each access)
    else:
        raise FincastError(f"sweep {sweep.name}: its driver has not started its parent run (or its advisor probe) "
                           "yet; is `fincast sweep SPEC --storage URL` running? Try again in a moment")
    if sweep.settings.range == "advised":
        a = study.user_attrs["fincast.advice"]
        sweep = sweep.with_range("norm", a["low"], a["high"])
    fingerprint = pipeline.load_data(sweep.base_cfg, progress=progress).fingerprint
    if fingerprint != study.user_attrs.get("fincast.data_fingerprint"):
        raise FincastError(f"sweep {sweep.name}: this machine's data (fingerprint {fingerprint}) differ from the "
                           f"sweep's ({study.user_attrs.get('fincast.data_fingerprint')}); give every worker the "
                           "same data files or cache")
    tracking_uri = tracking.resolve_uri(sweep.base_cfg.tracking)
    tracking.get_run(parent_id, sweep.base_cfg.tracking)  # the same MLflow store as the driver's, or fail here
    before = _counts(study)["finished"]
    bar = tqdm(total=sweep.trials, initial=min(before, sweep.trials), desc=f"join {sweep.name}", unit="trial",
               disable=not progress)
    try:
        results = _execute(sweep, url, parent_id, study, bar, tracking_uri)
    finally:
        bar.close()
    table = trials_table(sweep, study)
    return SweepOutcome(sweep.name, parent_id, sweep.name, tracking_uri, redact(url), sweep.settings.sampler,
                        sweep.trials, before, sum(r["complete"] + r["pruned"] for r in results),
                        int((table["state"] == "complete").sum()), int((table["state"] == "pruned").sum()),
                        int(table["diverged"].sum()), [f for r in results for f in r["failed"]], None, table,
                        pd.DataFrame(), None, "", time.perf_counter() - t0, joined=True)


def describe(sweep: Sweep, storage: str | None = None) -> str:
    """What `fincast sweep --dry-run` prints: the search space, the budget and where it is stored."""
    s = sweep.settings
    lines = [f"sweep {sweep.name}: {sweep.trials} trials, sampler {s.sampler}, pruner {s.pruner}, "
             f"storage {redact(storage_url(sweep, storage))}"]
    for m, a in sweep.methods.items():
        lines.append(f"  clip.method={m}" + ("" if a is None else f": {a.key} in {a.describe()}")
                     + (" (replaced by the advisor's range)" if s.range == "advised" and m == "norm" else ""))
    lines.append(f"  train.lr: {sweep.lr.describe()}" if sweep.lr is not None
                 else f"  train.lr: {sweep.base_cfg.train.lr:g} (fixed)")
    if s.sampler == "grid":
        lines.append(f"  grid ({len(sweep.grid())} points = methods x thresholds x learning rates; sweep.trials is "
                     "not used):")
        lines += ["    " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in p.items())
                  for p in sweep.grid()]
    return "\n".join(lines)
