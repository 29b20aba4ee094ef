"""Clipping-threshold sweeps (layer L4, experiments): ``fincast sweep SPEC.yaml``; this module is their
coordination on Optuna (the only module importing it): storage, sampler, pruner, trial bookkeeping.

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
with the same parameters."""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import math
import os
import socket
import sqlite3
import threading
import warnings
from typing import Any

import optuna
import pandas as pd
from optuna.trial import TrialState

from fincast import tracking
from fincast.config import (
    FincastError,
)
from fincast.experiments.sweep.spec import THRESHOLD_KEYS, TRIAL_TAG, Sweep, redact

log = logging.getLogger("fincast.sweep")
OptunaStudy, Trial = optuna.Study, optuna.Trial  # for the other sweep modules' annotations


optuna.logging.set_verbosity(optuna.logging.WARNING)  # fincast reports trials itself


warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


# fincast keeps the heartbeat itself around ask/tell (see _heartbeat), which this warning does not know
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")


FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


HEARTBEAT_S, GRACE_S = 10, 60  # a worker that misses heartbeats for GRACE_S is dead: its trial is retried


MAX_RETRIES = 2                # a trial's parameters are queued again at most this often (worker died, error)


MAX_CONSECUTIVE_FAILURES = 3   # a worker stops after this many trials in a row raised an error


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


def _check_same(sweep: Sweep, study: optuna.Study, url: str) -> None:
    saved = study.user_attrs.get("fincast.spec_hash")
    if saved is not None and saved != sweep.spec_hash:
        raise FincastError(
            f"sweep {sweep.name!r} in {redact(url)} was started from a different spec (its search, its sweep "
            "settings or its base pipeline changed; only sweep.trials, workers, threads and storage may change "
            f"between runs of one sweep). Use another name (--set name={sweep.name}_2), or delete it: "
            f"optuna delete-study --study-name {sweep.name} --storage {redact(url)}")
