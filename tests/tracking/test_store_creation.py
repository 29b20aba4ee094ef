"""A new local SQLite store is created by one process at a time (a lock file beside it), so runs started together
on a new store all succeed; a store once created is opened without the lock."""

from __future__ import annotations

import fcntl
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fincast import tracking
from fincast.config import TrackingConfig
from fincast.tracking import common

ROOT = Path(__file__).resolve().parents[2]


def _tables(db: Path) -> list[str]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
        return [n for (n,) in con.execute("select name from sqlite_master where type = 'table'")]


def test_a_new_store_is_created_under_its_lock_and_a_created_one_is_opened_without(tmp_path, monkeypatch):
    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    monkeypatch.setattr(common, "STORE_LOCK_SECONDS", 0.3, raising=False)
    with open(f"{db}.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # (as another process creating the store holds it)
        t0 = time.perf_counter()
        with pytest.raises(tracking.TrackingError, match="mlflow.db.lock"):
            tracking.open_store(uri)
        assert time.perf_counter() - t0 >= 0.3  # it waited for the lock
        assert not db.exists() or "experiments" not in _tables(db)  # and created nothing meanwhile
    tracking.open_store(uri)
    assert "experiments" in _tables(db)
    with open(f"{db}.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        run = tracking.start_run(TrackingConfig(uri=uri, artifact_dir=str(tmp_path / "art")), "exp", "r")
        run.end()
    assert tracking.get_run(run.run_id, TrackingConfig(uri=uri)).info.status == "FINISHED"


@pytest.mark.slow
def test_four_runs_started_at_once_on_a_new_store_all_finish(tmp_path):
    """Four `fincast train` at once on a new SQLite store (unserialised, they collided in MLflow's schema
    creation: "table _alembic_tmp_experiments already exists", runs lost): four FINISHED runs with complete
    metric histories, and no leftover of a half-done migration."""
    db = tmp_path / "mlflow.db"
    store = [f"tracking.uri=sqlite:///{db}", f"tracking.artifact_dir={tmp_path / 'art'}",
             f"train.checkpoint_dir={tmp_path / 'ckpt'}"]
    tiny = ["data.source=synthetic", "data.start=2019-01-01", "data.end=2021-12-31", "features.lookback=10",
            "train.epochs=3", "train.patience=null", "train.batch_size=128", "model.hidden_size=4",
            "tracking.log_model=false", "tracking.log_every=1", "tracking.metric_every=1"]
    procs = []
    for seed in range(4):
        args = [sys.executable, "-m", "fincast", "train", str(ROOT / "pipelines/price_crypto.yaml"), "--quiet",
                *[f"--set={o}" for o in (*store, *tiny, f"train.seed={seed}")]]
        log = open(tmp_path / f"stderr{seed}.txt", "w")  # noqa: SIM115 - closed below
        procs.append((subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=log), log))
    for proc, log in procs:
        try:
            proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
            log.close()
    errors = [(tmp_path / f"stderr{i}.txt").read_text() for i in range(4)]
    assert [p.returncode for p, _ in procs] == [0] * 4, errors
    assert not [t for t in _tables(db) if t.startswith("_alembic_tmp")], _tables(db)
    from mlflow.tracking import MlflowClient

    runs = MlflowClient(f"sqlite:///{db}").search_runs(["1"])
    assert sorted(r.info.status for r in runs) == ["FINISHED"] * 4
    cfg = TrackingConfig(uri=f"sqlite:///{db}")
    for r in runs:
        steps = _last_step(r, cfg)
        assert [s for s, _ in tracking.metric_history(r.info.run_id, "train/loss", cfg)] == list(range(1, steps + 1))
        assert len(tracking.metric_history(r.info.run_id, "val/loss", cfg)) == 3  # one per epoch


def _last_step(run, cfg) -> int:
    """The run's step count, as its closing metric best_val_loss is logged at it."""
    return tracking.metric_history(run.info.run_id, "best_val_loss", cfg)[-1][0]
