"""Against the real servers `.ci/run` starts (a PostgreSQL server and an `mlflow server` on it, on loopback;
FINCAST_TEST_POSTGRES and FINCAST_TEST_MLFLOW name them): a sweep driven from two processes, the second joining
with --join, shares an Optuna storage on PostgreSQL and tracks into the MLflow server. Every trial runs exactly
once, both processes train, and the MLflow record matches. Skipped where the servers are not there."""

from __future__ import annotations

import os
import sys
import uuid

import pytest
from driver_pair import drive_and_join
from test_sweep import finished, write_spec
from tiny_study import TINY

from fincast.experiments import sweep as sw

POSTGRES, MLFLOW = os.environ.get("FINCAST_TEST_POSTGRES"), os.environ.get("FINCAST_TEST_MLFLOW")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (POSTGRES and MLFLOW), reason="no PostgreSQL and MLflow servers (.ci/run starts them)"),
    pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning"),
    pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used"),
]
SEARCH = {"clip": {"none": {}, "norm": {"low": 0.05, "high": 2.0}}, "lr": {"low": 0.005, "high": 0.05}}


def test_a_sweep_from_two_processes_on_postgresql_and_an_mlflow_server(tmp_path):
    import optuna
    from mlflow.tracking import MlflowClient

    n = 6
    name = f"servers_{uuid.uuid4().hex[:8]}"  # the servers outlive a test: a name of its own
    path = write_spec(tmp_path, SEARCH, {"sampler": "random", "trials": n, "threads": 1, "pruner": "none"},
                      name=name)
    over = [*TINY, f"tracking.uri={MLFLOW}", "train.epochs=15", "train.patience=null", "train.batch_size=16"]
    args = [sys.executable, "-m", "fincast", "sweep", str(path), "--storage", POSTGRES, "--quiet",
            *[f"--set={o}" for o in over]]

    def ready() -> bool:  # the driver has created the sweep and its parent run
        try:
            return "fincast.parent_run_id" in optuna.load_study(study_name=name, storage=POSTGRES).user_attrs
        except KeyError:  # not created yet
            return False

    pair = drive_and_join(args, [*args, "--join", name], ready, cwd=tmp_path)
    driver, joiner = pair.driver, pair.joiner

    study = optuna.load_study(study_name=name, storage=POSTGRES)
    done = finished(study)
    assert len(done) == n and len({t.number for t in done}) == n  # every trial once
    assert all(t.state.name == "FAIL" and t.user_attrs.get("fincast.surplus") for t in study.trials
               if t.state not in sw.FINISHED)
    pids = {int(t.user_attrs["fincast.worker"].rpartition(":")[2]) for t in done}
    assert pids == {driver.pid, joiner.pid}, pids  # both processes trained
    client = MlflowClient(MLFLOW)
    parent = client.get_run(study.user_attrs["fincast.parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.metrics["trials/complete"] == n
    runs = client.search_runs([parent.info.experiment_id],
                              f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(runs) == n and all(r.info.status == "FINISHED" for r in runs)
    assert sorted(int(r.data.tags[sw.TRIAL_TAG]) for r in runs) == sorted(t.number for t in done)
