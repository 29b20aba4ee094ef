"""Sweeps across processes: worker processes on one SQLite storage, a second process joining with --join, and a
sweep SIGKILLed mid-trial and resumed. Each finished trial must exist exactly once, in Optuna and in MLflow."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import test_sweep
from driver_pair import drive_and_join
from test_sweep import check_runs_match_trials, finished, load_study, write_spec

from fincast.experiments import sweep as sw

# the fast tests' fixtures: fresh MLflow and Optuna stores in tmp_path, copied from empty ones made once
empty_stores, stores = test_sweep.empty_stores, test_sweep.stores

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning"),
              pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used")]

SEARCH = {"clip": {"none": {}, "norm": {"low": 0.05, "high": 2.0}, "zclip": [1.5, 3.0]},
          "lr": {"low": 0.005, "high": 0.05}}


def _query(db: Path, sql: str) -> list[tuple]:
    """Rows from a store, read-only with sqlite3 (the processes writing it are not disturbed); [] while it is
    being created."""
    if not db.exists():
        return []
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as con:
            return con.execute(sql).fetchall()
    except sqlite3.Error:
        return []


def _trials(db: Path) -> dict[int, tuple[str, str | None]]:
    """Optuna trial number -> (state, fincast.worker or None)."""
    rows = _query(db, "select t.number, t.state, a.value_json from trials t left join trial_user_attributes a "
                      "on a.trial_id = t.trial_id and a.key = 'fincast.worker'")
    return {n: (state, json.loads(w) if w else None) for n, state, w in rows}


def _running_trial_runs(db: Path) -> set[int]:
    """Trial numbers of the MLflow sweep-trial runs that are RUNNING."""
    rows = _query(db, "select t.value from runs r join tags t on t.run_uuid = r.run_uuid "
                      f"where t.key = '{sw.TRIAL_TAG}' and r.status = 'RUNNING' and r.lifecycle_stage = 'active'")
    return {int(v) for (v,) in rows}


def _args(path: Path, storage: str, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "fincast", "sweep", str(path), "--storage", storage, "--quiet",
            *[f"--set={o}" for o in overrides]]


def _pid(worker: str) -> int:
    return int(worker.rpartition(":")[2])


def test_four_worker_processes_on_one_storage_finish_each_trial_once(tmp_path, stores):
    n = 8
    path = write_spec(tmp_path, SEARCH, {"sampler": "random", "trials": n, "workers": 4, "threads": 1,
                                         "prune_startup_trials": 2, "prune_warmup_epochs": 1})
    s = sw.load(path, [*stores.overrides, "train.epochs=4"])
    out = sw.run(s, storage=stores.storage, out_dir=tmp_path / "reports")
    assert out.complete + out.pruned == n and out.trained_now == n and out.failed == []
    study = load_study(stores.storage, "tiny_sweep")
    done = finished(study)
    assert len(done) == n and len({t.number for t in done}) == n
    # anything else is a surplus trial, closed untrained by a worker that lost the race for the last one
    assert all(t.state.name == "FAIL" and t.user_attrs.get("fincast.surplus") for t in study.trials
               if t.state not in sw.FINISHED)
    check_runs_match_trials(stores, study, out.parent_run_id)  # n FINISHED child runs, distinct trial tags
    pids = {_pid(t.user_attrs["fincast.worker"]) for t in done}
    assert os.getpid() not in pids and 1 <= len(pids) <= 4  # trained in the worker processes


def test_a_second_process_joins_a_running_sweep(tmp_path, stores):
    n = 8
    path = write_spec(tmp_path, SEARCH, {"sampler": "random", "trials": n, "threads": 1, "pruner": "none"})
    # trials long enough that the joiner, starting seconds later, trains some too
    over = [*stores.overrides, "train.epochs=20", "train.patience=null", "train.batch_size=16"]
    args = _args(path, stores.storage, over)
    db = tmp_path / "optuna.db"
    started = "select 1 from study_user_attributes where key = 'fincast.parent_run_id'"
    pair = drive_and_join(args, [*args, "--join", "tiny_sweep"], lambda: bool(_query(db, started)), cwd=tmp_path,
                          wait_s=60, timeout=180)
    driver, joiner = pair.driver, pair.joiner
    assert "joined sweep tiny_sweep" in pair.joiner_out and f"{n} of {n} trials finished" in pair.driver_out

    study = load_study(stores.storage, "tiny_sweep")
    done = finished(study)
    assert len(done) == n and len({t.number for t in done}) == n
    assert all(t.state.name == "FAIL" and t.user_attrs.get("fincast.surplus") for t in study.trials
               if t.state not in sw.FINISHED)
    by_pid = {}
    for t in done:
        by_pid.setdefault(_pid(t.user_attrs["fincast.worker"]), []).append(t.number)
    assert set(by_pid) == {driver.pid, joiner.pid}, by_pid  # both trained some of the trials
    check_runs_match_trials(stores, study, study.user_attrs["fincast.parent_run_id"])
    from fincast import tracking

    parent = tracking.get_run(study.user_attrs["fincast.parent_run_id"], stores.tracking)
    assert parent.info.status == "FINISHED" and parent.data.metrics["trials/complete"] == n


def test_a_sweep_killed_mid_trial_resumes_and_retries_that_trial(tmp_path, stores):
    n = 5
    path = write_spec(tmp_path, SEARCH, {"sampler": "random", "trials": n, "threads": 1, "pruner": "none"})
    args = _args(path, stores.storage, [*stores.overrides, "train.epochs=10", "train.batch_size=16"])
    optuna_db, mlflow_db = tmp_path / "optuna.db", tmp_path / "mlflow.db"
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    killed = None
    try:
        while time.monotonic() < deadline:
            trials = _trials(optuna_db)
            n_finished = sum(state in ("COMPLETE", "PRUNED") for state, _ in trials.values())
            running = [k for k, (state, worker) in trials.items() if state == "RUNNING" and worker]
            # a trial is training: its worker is recorded and its MLflow run is open
            if n_finished >= 1 and len(running) == 1 and running[0] in _running_trial_runs(mlflow_db):
                killed = running[0]
                break
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert killed is not None, "no trial was caught training"
    trials = _trials(optuna_db)
    assert trials[killed][0] == "RUNNING" and _pid(trials[killed][1]) == proc.pid
    before = sum(state in ("COMPLETE", "PRUNED") for state, _ in trials.values())
    assert 1 <= before < n

    done = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    assert f"{n} of {n} trials finished" in done.stdout

    study = load_study(stores.storage, "tiny_sweep")
    fin = finished(study)
    assert len(fin) == n
    dead = study.trials[killed]
    assert dead.number == killed and dead.state.name == "FAIL"
    (retry,) = [t for t in study.trials if t.user_attrs.get("fincast.retry_of") == killed]
    assert retry.state in sw.FINISHED and retry.params == dead.params and retry.number > killed
    # the killed trial's MLflow run is deleted; every remaining child run is FINISHED, one per finished trial
    parent_id = study.user_attrs["fincast.parent_run_id"]
    check_runs_match_trials(stores, study, parent_id)
    rows = _query(mlflow_db, "select r.lifecycle_stage from runs r join tags t on t.run_uuid = r.run_uuid "
                             f"where t.key = '{sw.TRIAL_TAG}' and t.value = '{killed}'")
    assert sorted(stage for (stage,) in rows) == ["deleted"]
    from fincast import tracking

    assert tracking.get_run(parent_id, stores.tracking).info.status == "FINISHED"
