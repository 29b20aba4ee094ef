"""Coordination on Optuna (layer L4, experiments; the only module importing optuna): the storage, and the
trial bookkeeping of clipping-threshold sweeps (``fincast sweep SPEC.yaml``: sampler, pruner, retries) and of
studies whose runs are claimed by several drivers (``fincast study SPEC --storage URL``, see ``claim``).

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
import time
import warnings
from typing import Any

import optuna
import pandas as pd
from optuna.trial import TrialState

from fincast import tracking
from fincast.config import (
    FincastError,
)
from fincast.experiments.spec import THRESHOLD_KEYS, TRIAL_TAG, redact

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
    """Queue a failed trial's parameters again (at most MAX_RETRIES times per original trial); of a team study,
    queue its finisher again (its runs are redone by the finisher, see ``claim``)."""
    if trial.user_attrs.get("fincast.role") == FINISHER or (
            study.user_attrs.get("fincast.ready") and trial.number == study.user_attrs.get("fincast.total")):
        study.enqueue_trial({}, user_attrs={"fincast.role": FINISHER, "fincast.retry_of": trial.number})
        return
    retries = int(trial.user_attrs.get("fincast.retries", 0))
    if trial.user_attrs.get("fincast.surplus") or retries >= MAX_RETRIES or not trial.params:
        return
    study.enqueue_trial(trial.params, user_attrs={"fincast.retries": retries + 1, "fincast.retry_of": trial.number})


def _sampler(sweep: Any, seed: int) -> optuna.samplers.BaseSampler:
    if sweep.settings.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, constant_liar=True,
                                          n_startup_trials=min(10, max(2, sweep.trials // 3)))
    return optuna.samplers.RandomSampler(seed=seed)  # grid: only the queued points are run


def _pruner(sweep: Any) -> optuna.pruners.BasePruner:
    s = sweep.settings
    if s.pruner == "none":
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=s.prune_startup_trials, n_warmup_steps=s.prune_warmup_epochs)


def _open_study(sweep: Any, storage: optuna.storages.RDBStorage, seed: int, *, create: bool) -> optuna.Study:
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


def worker_id() -> str:
    """This process as its trials name it: host:pid."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _dead_here(worker: str) -> bool:
    """Whether ``worker`` (host:pid) ran on this machine and its process is gone."""
    host, _, pid = worker.rpartition(":")
    return host == socket.gethostname() and pid.isdigit() and not tracking.pid_alive(int(pid))


def _recover(study: optuna.Study) -> int:
    """Fail (and queue again) the running trials whose worker is dead: on this machine by its pid, elsewhere by
    its heartbeat. Returns how many were failed."""
    storage = study._storage
    n = 0
    now = datetime.datetime.now()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = str(t.user_attrs.get("fincast.worker", ""))
        dead = _dead_here(worker)
        # a worker killed between ask() and naming itself left no pid and no heartbeat: presumed dead after GRACE_S
        orphan = not worker and t.datetime_start is not None and (now - t.datetime_start).total_seconds() > GRACE_S
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


def suggest(sweep: Any, trial: optuna.Trial) -> dict[str, Any]:
    """The trial's parameters: a clip method, that method's threshold, and the lr when it is searched."""
    method = trial.suggest_categorical("clip.method", list(sweep.methods))
    params: dict[str, Any] = {"clip.method": method}
    axis = sweep.methods[method]
    if axis is not None:
        params[axis.key] = axis.suggest(trial)
    if sweep.lr is not None:
        params["train.lr"] = sweep.lr.suggest(trial)
    return params


def _ensure_grid(sweep: Any, study: optuna.Study) -> int:
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


def trials_table(sweep: Any, study: optuna.Study) -> pd.DataFrame:
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


def importance(sweep: Any, study: optuna.Study) -> pd.DataFrame:
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


def _check_same(sweep: Any, study: optuna.Study, url: str) -> None:
    saved = study.user_attrs.get("fincast.spec_hash")
    if saved is not None and saved != sweep.spec_hash:
        raise FincastError(
            f"sweep {sweep.name!r} in {redact(url)} was started from a different spec (its search, its sweep "
            "settings or its base pipeline changed; only sweep.trials, workers, threads and storage may change "
            f"between runs of one sweep). Use another name (--set name={sweep.name}_2), or delete it: "
            f"optuna delete-study --study-name {sweep.name} --storage {redact(url)}")


# --- a study's runs claimed by several drivers (`fincast study SPEC --storage URL`, experiments.team) ------------
# Trial n < total of the Optuna study "fincast-study:NAME" is run n of the plan (trial numbers are assigned
# atomically by the storage: every run is handed out once); trial `total` is the finisher: its driver waits for
# the others, redoes the runs of drivers that died, ends the parent run and builds the report; later trials are
# surplus (failed at once: their driver has nothing left to claim). The trials carry no parameters.

FINISHER = "finisher"


READY_TIMEOUT_S = 300  # a joining driver waits this long for the first driver to publish the plan


def claims_name(study: str, generation: int = 1) -> str:
    return f"fincast-study:{study}" + (f"#{generation}" if generation > 1 else "")


def open_claims(url: str, study: str) -> tuple[optuna.Study, bool]:
    """(the Optuna study holding a fincast study's claims, whether this driver created it): the first driver
    to call this creates it (the storage decides the race) and publishes the plan; the others join. A study
    that ended (its finisher complete) and is run again gets a new claims study, ``NAME#2`` and so on: its plan
    holds the runs not finished yet (failed ones are retried)."""
    storage = _storage(url)
    sampler = optuna.samplers.RandomSampler(seed=0)  # no search: a trial's ask() stays cheap at any size
    prefix = claims_name(study)
    names = set(optuna.get_all_study_names(storage))
    generation = max([1] + [int(n.rpartition("#")[2]) for n in names
                            if n.startswith(prefix + "#") and n.rpartition("#")[2].isdigit()])
    if claims_name(study, generation) in names:
        last = optuna.load_study(study_name=claims_name(study, generation), storage=storage, sampler=sampler)
        if finisher_state(last)[0] != "complete":
            return last, False
        generation += 1
    try:
        claims = optuna.create_study(storage=storage, study_name=claims_name(study, generation),
                                     direction="minimize", sampler=sampler)
    except optuna.exceptions.DuplicatedStudyError:
        return optuna.load_study(study_name=claims_name(study, generation), storage=storage, sampler=sampler), False
    claims.set_user_attr("fincast.creator", worker_id())
    return claims, True


def publish(claims: optuna.Study, plan: dict[str, Any]) -> None:
    """Record the plan (``plan[k]`` as user attribute ``fincast.k``) for the joining drivers, then say it is ready."""
    for k, v in plan.items():
        claims.set_user_attr(f"fincast.{k}", v)
    claims.set_user_attr("fincast.ready", True)


def read_plan(claims: optuna.Study, url: str, timeout: float = READY_TIMEOUT_S) -> dict[str, Any]:
    """The plan the first driver published, waiting for it up to ``timeout`` seconds."""
    t0 = time.monotonic()
    while True:
        attrs = claims.user_attrs
        if attrs.get("fincast.ready"):
            return {k.removeprefix("fincast."): v for k, v in attrs.items()}
        creator = str(attrs.get("fincast.creator", ""))
        dead = _dead_here(creator)
        if dead or time.monotonic() - t0 > timeout:
            what = "died" if dead else f"has not published its plan after {timeout:.0f} s"
            raise FincastError(
                f"{claims.study_name} in {redact(url)} was created by {creator or 'a driver'}, which {what} before "
                f"its runs were planned; delete it and start again: optuna delete-study --study-name "
                f"'{claims.study_name}' --storage {redact(url)}")
        time.sleep(1.0)


def claim(claims: optuna.Study, total: int, k: int, worker: str) -> tuple[list[tuple[int, optuna.Trial]],
                                                                         optuna.Trial | None, bool]:
    """Up to ``k`` runs for this driver: ([(run number, trial)], the finisher's trial when this driver got it,
    whether the runs are all handed out)."""
    got: list[tuple[int, optuna.Trial]] = []
    while len(got) < k:
        trial = claims.ask()
        role = trial.user_attrs.get("fincast.role")
        if role is None and trial.number < total:
            trial.set_user_attr("fincast.worker", worker)
            got.append((trial.number, trial))
            continue
        if role == FINISHER or trial.number == total:
            trial.set_user_attr("fincast.role", FINISHER)
            trial.set_user_attr("fincast.worker", worker)
            return got, trial, True
        trial.set_user_attr("fincast.surplus", True)
        claims.tell(trial, state=TrialState.FAIL)
        return got, None, True
    return got, None, False


class Holding:
    """The trials this driver holds, kept alive by a heartbeat every HEARTBEAT_S (drivers on other machines
    tell a dead driver by its missing heartbeat); on an error every held trial is failed at once (a held
    finisher is queued again)."""

    def __init__(self, claims: optuna.Study):
        self.claims, self.ids = claims, {}
        self.lock, self.stop = threading.Lock(), threading.Event()
        self.thread = threading.Thread(target=self._beat, name="fincast-heartbeat", daemon=True)

    def _beat(self) -> None:
        while not self.stop.wait(HEARTBEAT_S):
            with self.lock:
                ids = list(self.ids)
            for trial_id in ids:
                with contextlib.suppress(Exception):
                    self.claims._storage.record_heartbeat(trial_id)

    def add(self, trials: list[optuna.Trial]) -> None:
        """Hold these trials (their heartbeat from now on)."""
        for t in trials:
            self.claims._storage.record_heartbeat(t._trial_id)
            with self.lock:
                self.ids[t._trial_id] = t

    def end(self, trial: optuna.Trial, *, run_id: str | None = None, value: float = math.nan,
            error: str | None = None, diverged: bool = False) -> None:
        """Close a held trial: COMPLETE with its run id and best validation loss, or FAIL with its error."""
        with self.lock:
            self.ids.pop(trial._trial_id, None)
        try:
            if error is None:
                trial.set_user_attr("fincast.run_id", run_id or "")
                trial.set_user_attr("fincast.diverged", bool(diverged))
                self.claims.tell(trial, value if math.isfinite(value) else math.inf)
            else:
                trial.set_user_attr("fincast.error", error[:2000])
                self.claims.tell(trial, state=TrialState.FAIL)
        except (RuntimeError, ValueError, optuna.exceptions.UpdateFinishedTrialError) as exc:
            # failed by another driver that took this one for dead: the finisher redoes the run
            log.warning("trial %d was closed elsewhere (%s); its run counts as not done", trial.number, exc)

    def __enter__(self) -> Holding:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join()
        with self.lock:
            left, self.ids = list(self.ids.values()), {}
        for t in left:  # (an error or interrupt): the others need not wait for this driver's heartbeat to stop
            with contextlib.suppress(Exception):
                if self.claims._storage.set_trial_state_values(t._trial_id, TrialState.FAIL):
                    _retry(self.claims, self.claims._storage.get_trial(t._trial_id))


def await_others(claims: optuna.Study, total: int, finisher: optuna.Trial, poll: float = 2.0,
                 ) -> tuple[list[int], dict[int, optuna.trial.FrozenTrial]]:
    """(runs to redo, the closed trial of every other run) once no other driver holds a run: the finisher's
    wait. Dead drivers' trials are failed on the way (by pid on this machine, else by heartbeat); their runs,
    and runs whose trial was failed without an error of its own, are redone by the finisher."""
    while True:
        _recover(claims)
        trials = claims.get_trials(deepcopy=False)
        if not any(t.state == TrialState.RUNNING and t.number < total for t in trials):
            break
        time.sleep(poll)
    closed = {t.number: t for t in trials if t.number < total and (
        t.state == TrialState.COMPLETE or (t.state == TrialState.FAIL and "fincast.error" in t.user_attrs))}
    return [n for n in range(total) if n not in closed], closed


def finisher_state(claims: optuna.Study) -> tuple[str, str]:
    """("complete" | "running" | "none", its driver) of the study's finisher."""
    for t in reversed(claims.get_trials(deepcopy=False)):
        if t.user_attrs.get("fincast.role") == FINISHER and t.state in (TrialState.COMPLETE, TrialState.RUNNING):
            return ("complete" if t.state == TrialState.COMPLETE else "running"), str(t.user_attrs.get("fincast.worker"))
    return "none", ""
