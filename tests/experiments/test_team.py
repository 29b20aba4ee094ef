"""A study shared by several drivers through an Optuna storage (``fincast study SPEC --storage URL``): the claims
(every run handed out once, one finisher, surplus trials failed), the finisher's wait and its redo of a dead
driver's runs, and a team study end to end in one process. Two driver processes: test_servers.py (slow)."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest
from tiny_study import TINY, _spec

from fincast.experiments import coordination as co
from fincast.experiments import study as study_mod
from fincast.experiments import team

pytestmark = [pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning"),
              pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used")]


def _storage(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'optuna.db'}"


def _dead_worker() -> str:
    """A driver on this machine whose process has exited."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return f"{socket.gethostname()}:{proc.pid}"


def _planned(tmp_path: Path, total: int):
    claims, created = co.open_claims(_storage(tmp_path), "s")
    assert created
    co.publish(claims, {"total": total, "todo": [f"h{i}" for i in range(total)]})
    return claims


def test_the_first_driver_creates_and_the_others_join_and_read_its_plan(tmp_path):
    claims = _planned(tmp_path, 3)
    joined, created = co.open_claims(_storage(tmp_path), "s")
    assert not created and joined.study_name == claims.study_name == "fincast-study:s"
    plan = co.read_plan(joined, _storage(tmp_path), timeout=1)
    assert plan["total"] == 3 and plan["todo"] == ["h0", "h1", "h2"] and plan["ready"] is True


def test_a_joiner_does_not_wait_for_a_plan_whose_creator_died(tmp_path):
    claims, created = co.open_claims(_storage(tmp_path), "s")
    claims.set_user_attr("fincast.creator", _dead_worker())  # died before publishing
    joined, _ = co.open_claims(_storage(tmp_path), "s")
    with pytest.raises(co.FincastError, match=r"died before its runs were planned; delete it .*delete-study"):
        co.read_plan(joined, _storage(tmp_path), timeout=60)


def test_claims_hand_out_every_run_once_then_one_finisher_then_surplus(tmp_path):
    claims = _planned(tmp_path, 5)
    a, fin_a, done_a = co.claim(claims, 5, 2, "host:1")
    b, fin_b, done_b = co.claim(claims, 5, 2, "host:2")
    a2, fin_a2, done_a2 = co.claim(claims, 5, 2, "host:1")
    b2, fin_b2, done_b2 = co.claim(claims, 5, 2, "host:2")
    numbers = [n for n, _ in a + b + a2 + b2]
    assert sorted(numbers) == [0, 1, 2, 3, 4]  # each run once
    assert [len(a), len(b), len(a2), len(b2)] == [2, 2, 1, 0]
    assert (fin_a, fin_b, fin_b2) == (None, None, None) and fin_a2 is not None  # the one finisher
    assert (done_a, done_b, done_a2, done_b2) == (False, False, True, True)
    trials = {t.number: t for t in claims.get_trials(deepcopy=False)}
    assert trials[5].user_attrs["fincast.role"] == co.FINISHER and trials[5].user_attrs["fincast.worker"] == "host:1"
    assert trials[6].state.name == "FAIL" and trials[6].user_attrs["fincast.surplus"]  # B's surplus trial
    assert {trials[n].user_attrs["fincast.worker"] for n, _ in b} == {"host:2"}


def test_the_finisher_waits_then_redoes_the_runs_of_a_dead_driver(tmp_path):
    claims = _planned(tmp_path, 4)
    dead, _, _ = co.claim(claims, 4, 2, _dead_worker())  # runs 0, 1: their driver died holding them
    live, finisher, _ = co.claim(claims, 4, 3, "elsewhere:7")
    assert [n for n, _ in live] == [2, 3] and finisher is not None
    with co.Holding(claims) as held:
        held.add([t for _, t in live])
        held.end(live[0][1], run_id="r2", value=0.5)
        held.end(live[1][1], error="ValueError: bad")
    redo, closed = co.await_others(claims, 4, finisher, poll=0.01)
    assert redo == [0, 1]  # failed by pid (same machine), to be redone by the finisher
    assert sorted(closed) == [2, 3] and closed[2].user_attrs["fincast.run_id"] == "r2"
    assert closed[3].user_attrs["fincast.error"] == "ValueError: bad"  # an error of its own: not redone
    states = {t.number: t.state.name for t in claims.get_trials(deepcopy=False)}
    assert states[0] == states[1] == "FAIL" and states[2] == "COMPLETE"


def test_a_finisher_that_stops_is_queued_again_for_the_next_driver(tmp_path):
    claims = _planned(tmp_path, 1)
    co.claim(claims, 1, 1, "host:1")
    _, finisher, _ = co.claim(claims, 1, 1, "host:1")
    with pytest.raises(KeyboardInterrupt), co.Holding(claims) as held:
        held.add([finisher])
        raise KeyboardInterrupt
    assert claims.get_trials(deepcopy=False)[finisher.number].state.name == "FAIL"
    assert co.finisher_state(claims)[0] == "none"
    got, again, _ = co.claim(claims, 1, 1, "host:2")
    assert got == [] and again is not None and again.user_attrs["fincast.retry_of"] == finisher.number


def test_a_team_study_in_one_driver_runs_every_run_once_and_a_rerun_starts_a_new_round(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    store = [f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", f"tracking.artifact_dir={tmp_path / 'art'}"]
    study = study_mod.load(_spec(tmp_path), [*TINY, *store, "study.batch_runs=2"])
    out = team.run(study, _storage(tmp_path))
    assert out.ended and out.finished == out.here == len(study.jobs) == 12 and not out.failed
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent = client.get_run(out.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["fincast.study_drivers"] == "1"
    children = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{out.parent_run_id}'")
    assert sorted(r.data.tags["fincast.config_hash"] for r in children) == sorted(j.hash for j in study.jobs)
    again = team.run(study, _storage(tmp_path))  # the study ended: a new claims round, with nothing left to do
    assert again.ended and again.finished == 0 and again.skipped == 12 and again.parent_run_id == out.parent_run_id
    import optuna

    assert sorted(optuna.get_all_study_names(_storage(tmp_path))) == ["fincast-study:tiny_study",
                                                                      "fincast-study:tiny_study#2"]
