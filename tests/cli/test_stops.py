"""Runs end in a true state: SIGTERM and SIGHUP end a run KILLED as Ctrl-C does (exit status 128 + the signal),
the CLI's handlers go away when it returns, and a second resume of a run that is being resumed is refused."""

from __future__ import annotations

import fcntl
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fincast import cli, tracking
from fincast.cli import commands
from fincast.config import TrackingConfig

ROOT = Path(__file__).resolve().parents[2]
TINY = ("data.source=synthetic", "data.start=2016-01-01", "data.end=2021-12-31", "features.lookback=10",
        "train.batch_size=128", "train.warmup_steps=5", "model.hidden_size=8", "tracking.log_model=false")


def _store(tmp_path: Path) -> list[str]:
    return [f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", f"tracking.artifact_dir={tmp_path / 'art'}",
            f"train.checkpoint_dir={tmp_path / 'ckpt'}"]


def _statuses(db: Path) -> list[str]:
    """Every run's status, read with sqlite3 (read-only: opening the store through MLflow while the trainer
    creates it would race its schema creation)."""
    if not db.exists():
        return []
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as con:
            return [s for (s,) in con.execute("select status from runs")]
    except sqlite3.Error:
        return []


# ---------------------------------------------------------------------------------------------
# The CLI's handlers, in this process
# ---------------------------------------------------------------------------------------------


def _command(monkeypatch, body):
    monkeypatch.setitem(commands.COMMANDS, "keys", lambda args: body())


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_signal_interrupts_a_command_once_and_exits_128_plus_its_number(monkeypatch, capsys, signum):
    """The signal raises a KeyboardInterrupt in the command (so its cleanup runs); a second one during that cleanup
    is ignored (the cleanup finishes); the exit status is 128 + the signal; the handlers before come back. A signal
    ignored before stays ignored."""
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)}
    cleaned = []

    def body():
        assert callable(signal.getsignal(signum)), "no handler: the signal would end the test process"
        try:
            os.kill(os.getpid(), signum)
            time.sleep(5)
        except KeyboardInterrupt:
            os.kill(os.getpid(), signum)  # a second one, during the cleanup
            time.sleep(0.05)
            cleaned.append(True)
            raise
        return 0

    _command(monkeypatch, body)
    assert cli.main(["keys"]) == 128 + signum
    assert cleaned == [True]
    assert f"stopped by {signal.Signals(signum).name}" in capsys.readouterr().err
    assert {s: signal.getsignal(s) for s in before} == before

    # a signal ignored when the command starts stays ignored (SIGHUP under nohup: the run outlives the terminal)
    previous = signal.signal(signum, signal.SIG_IGN)
    try:
        def ignored():
            os.kill(os.getpid(), signum)
            time.sleep(0.05)
            return 0

        _command(monkeypatch, ignored)
        assert cli.main(["keys"]) == 0
        assert signal.getsignal(signum) is signal.SIG_IGN
    finally:
        signal.signal(signum, previous)


# ---------------------------------------------------------------------------------------------
# A training run stopped by a signal
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_run_stopped_by_a_signal_ends_killed_with_exit_status_128_plus_it(tmp_path, signum):
    """`fincast train` sent SIGTERM (timeout, a scheduler, docker stop) or SIGHUP (the terminal closed) once its
    run exists: the run ends KILLED (not RUNNING forever), the exit status is 143 or 129."""
    args = [sys.executable, "-m", "fincast", "train", str(ROOT / "pipelines/price_crypto.yaml"), "--quiet",
            *[f"--set={o}" for o in (*_store(tmp_path), *TINY, "train.epochs=500", "train.patience=null")]]
    log = tmp_path / "stderr.txt"
    with open(log, "w") as stderr:  # (a file: a pipe would also wait for every process that inherited it)
        proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        deadline = time.monotonic() + 120
        while _statuses(tmp_path / "mlflow.db") != ["RUNNING"]:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the run did not start"
            time.sleep(0.2)
        time.sleep(1.0)  # training
        proc.send_signal(signum)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = log.read_text()
    assert proc.returncode == 128 + signum, err
    assert f"stopped by {signal.Signals(signum).name}" in err
    assert _statuses(tmp_path / "mlflow.db") == ["KILLED"]


# ---------------------------------------------------------------------------------------------
# One resume of a run at a time
# ---------------------------------------------------------------------------------------------


def test_a_second_resume_of_a_run_being_resumed_is_refused(tmp_path, capsys):
    """While another process holds the run's resume lock (an OS lock on <run id>.lock beside its checkpoint),
    `fincast resume RUN` is refused with a message naming the run and the lock, exit status 2, and the run's
    metric history and status stay as they were; once the lock is free the resume goes on, every step once."""
    code = cli.main(["train", str(ROOT / "pipelines/price_crypto.yaml"), "--quiet",
                     *[f"--set={o}" for o in (*_store(tmp_path), *TINY, "train.epochs=1")]])
    out = capsys.readouterr()
    assert code == 0, out.err
    run_id = out.out.split()[1]
    cfg = TrackingConfig(uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    history = tracking.metric_history(run_id, "train/loss", cfg)
    assert history
    lock = tmp_path / "ckpt" / f"{run_id}.lock"
    resume = ["resume", run_id, "--checkpoint-dir", str(tmp_path / "ckpt"), "--quiet", "--set", "train.epochs=2"]
    with open(lock, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # (as a resume in another process holds it)
        code = cli.main(resume)
        err = capsys.readouterr().err
    assert code == 2
    assert run_id in err and str(lock) in err and "being trained or resumed" in err, err
    assert tracking.metric_history(run_id, "train/loss", cfg) == history
    assert tracking.get_run(run_id, cfg).info.status == "FINISHED"

    code = cli.main(resume)  # the lock is free again
    assert code == 0, capsys.readouterr().err
    after = tracking.metric_history(run_id, "train/loss", cfg)
    steps = [s for s, _ in after]
    assert after[:len(history)] == history and len(steps) == len(set(steps)) and len(steps) > len(history)


def test_a_runs_first_training_holds_its_resume_lock(tmp_path, capsys, monkeypatch):
    """`fincast resume RUN` must not start while the `fincast train` that made RUN still trains: the training
    holds the lock a resume takes (and lets it go when it ends)."""
    from fincast.runs import driver

    held = []
    real_fit = driver.fit

    def fit(*args, **kwargs):
        out = real_fit(*args, **kwargs)
        (lock,) = (tmp_path / "ckpt").glob("*.lock")
        with open(lock, "a") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held.append(False)
            except BlockingIOError:
                held.append(True)
        return out

    monkeypatch.setattr(driver, "fit", fit)
    code = cli.main(["train", str(ROOT / "pipelines/price_crypto.yaml"), "--quiet",
                     *[f"--set={o}" for o in (*_store(tmp_path), *TINY, "train.epochs=1")]])
    assert code == 0, capsys.readouterr().err
    assert held == [True]
    (lock,) = (tmp_path / "ckpt").glob("*.lock")
    with open(lock, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free once the run ended
