"""Against the real servers `.ci/run` starts (a PostgreSQL server and an `mlflow server` on it, on loopback;
FINCAST_TEST_POSTGRES and FINCAST_TEST_MLFLOW name them): a sweep driven from two processes, the second joining
with --join, and a study run by two drivers, share an Optuna storage on PostgreSQL and track into the MLflow
server. Every trial or run happens exactly once, both processes train, and the MLflow record matches. Skipped
where the servers are not there (the study's test also runs on SQLite files, always)."""

from __future__ import annotations

import os
import sys
import uuid

import pytest
from driver_pair import drive_and_join
from test_sweep import finished, write_spec
from tiny_study import TINY, _spec

from fincast.experiments import sweep as sw

POSTGRES, MLFLOW = os.environ.get("FINCAST_TEST_POSTGRES"), os.environ.get("FINCAST_TEST_MLFLOW")
SERVERS = pytest.mark.skipif(not (POSTGRES and MLFLOW), reason="no PostgreSQL and MLflow servers (.ci/run starts them)")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning"),
    pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used"),
]
SEARCH = {"clip": {"none": {}, "norm": {"low": 0.05, "high": 2.0}}, "lr": {"low": 0.005, "high": 0.05}}


@SERVERS
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


@pytest.mark.parametrize("backend", [pytest.param("servers", marks=SERVERS), "sqlite"])
def test_a_study_from_two_drivers_runs_every_run_once_ends_the_parent_and_builds_the_report(tmp_path, backend):
    import optuna
    from mlflow.tracking import MlflowClient

    name = f"team_{uuid.uuid4().hex[:8]}"  # the servers outlive a test: a name of its own
    storage, uri = (POSTGRES, MLFLOW) if backend == "servers" else (
        f"sqlite:///{tmp_path / 'optuna.db'}", f"sqlite:///{tmp_path / 'mlflow.db'}")
    over = [*TINY, f"name={name}", f"tracking.uri={uri}", "train.epochs=40", "train.patience=null",
            "train.batch_size=32", "study.batch_runs=2", "study.workers=1"]
    args = [sys.executable, "-m", "fincast", "study", str(_spec(tmp_path)), "--storage", storage, "--quiet",
            *[f"--set={o}" for o in over]]

    def ready() -> bool:  # the first driver has published the plan (the second would otherwise wait for it)
        try:
            return bool(optuna.load_study(study_name=f"fincast-study:{name}", storage=storage)
                        .user_attrs.get("fincast.ready"))
        except KeyError:  # not created yet
            return False

    pair = drive_and_join(args, args, ready, cwd=tmp_path)
    claims = optuna.load_study(study_name=f"fincast-study:{name}", storage=storage)
    runs = [t for t in claims.trials if t.number < 12]
    assert len(runs) == 12 and all(t.state.name == "COMPLETE" for t in runs)  # every run once, none failed
    pids = {int(t.user_attrs["fincast.worker"].rpartition(":")[2]) for t in runs}
    assert pids == {pair.driver.pid, pair.joiner.pid}, pids  # both drivers trained
    client = MlflowClient(uri)
    parent = client.get_run(claims.user_attrs["fincast.parent"])
    assert parent.info.status == "FINISHED" and parent.data.tags["fincast.study_drivers"] == "2"
    children = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == 12 and all(r.info.status == "FINISHED" for r in children)
    assert sorted(r.info.run_id for r in children) == sorted(t.user_attrs["fincast.run_id"] for t in runs)
    assert len({r.data.tags["fincast.config_hash"] for r in children}) == 12
    reported = [out for out in (pair.driver_out, pair.joiner_out) if "report reports/stability" in out]
    assert len(reported) == 1  # the finisher built it, once
    assert (tmp_path / "reports" / "stability" / name / "index.html").is_file()
    assert "report" in {a.path for a in client.list_artifacts(parent.info.run_id)}
