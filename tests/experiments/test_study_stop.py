"""A study stopped by SIGTERM or SIGHUP ends in a true state: its parent run and every child run it had started
and not finished end KILLED (none left RUNNING), whether the signal reached the driver alone (`kill PID`, `docker
stop`: the driver passes it on to its workers) or the whole process group (`timeout`, a closed terminal)."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny_study import TINY, _spec


def _store(tmp_path: Path) -> list[str]:
    return [f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", f"tracking.artifact_dir={tmp_path / 'art'}"]


def _runs(db: Path) -> list[tuple[str, str]]:
    """(study role, status) of every run, read with sqlite3 (read-only, while the driver may be creating the
    store)."""
    if not db.exists():
        return []
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as con:
            return con.execute("select coalesce(t.value, ''), r.status from runs r left join tags t on "
                               "t.run_uuid = r.run_uuid and t.key = 'fincast.study_role'").fetchall()
    except sqlite3.Error:
        return []


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "to_group"), [(signal.SIGTERM, False), (signal.SIGHUP, True)],
                         ids=["SIGTERM-to-the-driver", "SIGHUP-to-the-group"])
def test_a_study_stopped_by_a_signal_ends_its_parent_and_unfinished_runs_killed(tmp_path, signum, to_group):
    args = [sys.executable, "-m", "fincast", "study", str(_spec(tmp_path)), "--quiet",
            *[f"--set={o}" for o in (*TINY, *_store(tmp_path), "train.epochs=400", "train.patience=null",
                                          "study.workers=2", "study.batch_runs=2")]]
    log = tmp_path / "stderr.txt"
    with open(log, "w") as stderr:  # (a file: a pipe would also wait for every process that inherited it)
        proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)
    db = tmp_path / "mlflow.db"
    try:
        deadline = time.monotonic() + 180
        while sum(status == "RUNNING" for role, status in _runs(db) if role == "child") < 2:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "no run started"
            time.sleep(0.2)
        time.sleep(1.0)  # training
        if to_group:
            os.killpg(proc.pid, signum)
        else:
            proc.send_signal(signum)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    err = log.read_text()
    assert proc.returncode == 128 + signum, err
    runs = _runs(db)
    assert [s for role, s in runs if role == "parent"] == ["KILLED"], runs
    children = [s for role, s in runs if role == "child"]
    assert "KILLED" in children and set(children) <= {"KILLED", "FINISHED"}, runs
    time.sleep(2)  # no worker outlived its driver to go on training
    assert _runs(db) == runs
