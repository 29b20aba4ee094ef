"""A study run by several drivers (layer L4, experiments): ``fincast study SPEC --storage URL`` on every machine
of a team, against one Optuna storage (PostgreSQL) and one MLflow store (an ``mlflow server``).

The Optuna storage is the coordination engine (``coordination.claim``); nothing here is a protocol of its own:
- The first driver creates the claims study (the storage decides who is first). It creates the MLflow parent run,
  settles runs of earlier attempts, and publishes the plan: the runs to do, the data fingerprint, the parent run.
  The other drivers wait for the plan and check that their spec and data are the same.
- Every driver claims runs K at a time, one trial per run, and trains them in its workers as stacks, like a study
  on one machine. Each trial is closed with its run's id, or failed with its error. A heartbeat marks the trials
  a driver holds.
- The driver that claims the finisher waits until no other driver holds a run. It redoes the runs of drivers
  that died (their trials are failed by pid on the same machine, else after a missed heartbeat). Then it deletes
  their half-written MLflow runs, ends the parent run, and (in the CLI) builds the report.
- Rerunning the command resumes: finished runs stay finished.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from fincast import tracking
from fincast.config import FincastError
from fincast.experiments import coordination
from fincast.experiments import study as study_mod
from fincast.experiments.spec import redact
from fincast.experiments.study import Job, Study, StudyOutcome
from fincast.experiments.workers import Progress, auto_batch, plan_chunks, progress_feed, worker_pool
from fincast.runs import driver
from fincast.runs.record import ended

log = logging.getLogger("fincast.study")


def run(study: Study, url: str, *, progress: bool = False, reports: list[tuple[str, Path]] = ()) -> StudyOutcome:
    """This driver's share of the study in the Optuna storage ``url`` (and, when it gets the finisher, the end
    of the study). ``reports``: folders the caller writes afterwards (checked with the rest before any work)."""
    t0 = time.perf_counter()
    study_mod.check_outputs(study, stores=[("--storage", url)], reports=reports)
    workers, threads, gpus = study_mod.prepare(study)
    bar = tqdm(total=len(study.jobs), desc=f"study {study.name} (starting)", unit="run", disable=not progress)
    try:
        with worker_pool(workers, threads, tracking.resolve_uri(study.tracking), gpus=gpus) as (pool, store_ready):
            data = driver.load_data(study.jobs[0].cfg, progress=progress)
            store = tracking.StudyStore(study.tracking, study.name)
            store_ready()
            claims, created = coordination.open_claims(url, study.name)
            plan = _create(study, store, claims, data) if created else _join(study, claims, url, data.fingerprint)
            by_hash = {j.hash: j for j in study.jobs}
            todo = [by_hash[h] for h in plan["todo"]]
            bar.update(len(study.jobs) - len(todo))
            bar.set_description(f"study {study.name}")
            share = _Share(study, claims, todo, plan["parent"], workers, threads, pool, Progress(bar), progress)
            with coordination.Holding(claims) as held:  # the heartbeat of this driver's trials
                finisher = share.work(held)
                if finisher is not None:
                    return _finish(study, store, share, held, finisher, plan, data.fingerprint, t0)
            state, holder = coordination.finisher_state(claims)
            note = ("the study had ended already" if state == "complete" else
                    f"the study is ended by the driver {holder or 'that claims its finisher'}, which waits for "
                    "the others, redoes the runs of drivers that died and builds the report")
            return StudyOutcome(study.name, plan["parent"], study.name, store.uri, len(study.jobs),
                                len(study.jobs) - len(todo), share.finished, share.diverged, share.failed,
                                time.perf_counter() - t0, ended=False, here=share.finished + len(share.failed),
                                note=note)
    finally:
        bar.close()


def _create(study: Study, store: tracking.StudyStore, claims: Any, data: Any) -> dict[str, Any]:
    """The first driver: the parent run, earlier attempts settled, the plan published, the spec and baselines
    recorded (after publishing: the other drivers start meanwhile)."""
    parent = store.parent_run(params=study_mod.parent_params(study))
    done = store.settle(data.fingerprint)
    todo = [j.hash for j in study.jobs if j.hash not in done]
    plan = {"parent": parent.run_id, "todo": todo, "total": len(todo), "fingerprint": data.fingerprint,
            "jobs": _digest(study)}
    coordination.publish(claims, plan)
    if done:
        log.info("study %s: %d of %d runs already finished; the drivers share the other %d", study.name, len(done),
                 len(study.jobs), len(todo))
    study_mod.log_spec(parent, study, data.fingerprint)
    study_mod.log_baselines(parent, study, data)
    return plan


def _join(study: Study, claims: Any, url: str, fingerprint: str) -> dict[str, Any]:
    """A joining driver: the published plan, after checking this driver's spec and data are the study's."""
    plan = coordination.read_plan(claims, url)
    where = f"study {study.name!r} in {redact(url)}"
    if plan.get("jobs") != _digest(study):
        raise FincastError(f"{where} was started from a different spec (its runs' configs differ from this "
                           f"driver's): run every driver with the same spec and --set overrides, or give this one "
                           f"another name (--set name={study.name}_2)")
    if plan.get("fingerprint") != fingerprint:
        raise FincastError(f"{where} runs on other data than this machine has (data fingerprint "
                           f"{plan.get('fingerprint')} there, {fingerprint} here): give every driver the same data "
                           "(e.g. data.source=csv on the same files)")
    return plan


def _digest(study: Study) -> str:
    return hashlib.sha256("\n".join(j.hash for j in study.jobs).encode()).hexdigest()[:16]


class _Share:
    """This driver's runs: claimed ``workers`` stacks at a time, trained, their trials closed."""

    def __init__(self, study: Study, claims: Any, todo: list[Job], parent_id: str, workers: int, threads: int,
                 pool: Any, moved: Progress, progress: bool):
        self.study, self.claims, self.todo, self.parent_id = study, claims, todo, parent_id
        self.workers, self.threads, self.pool, self.moved, self.progress = workers, threads, pool, moved, progress
        self.keep = study_mod.keeping(study)
        self.me = coordination.worker_id()
        batch = study.settings.batch_runs
        # stacks as large as on one machine (the whole study split over this machine's workers), at least 1
        self.stack = batch if isinstance(batch, int) else (
            auto_batch(todo[0].cfg, len(todo), workers) if todo and driver.batch_key(todo[0].cfg) else 1)
        self.finished, self.diverged, self.failed = 0, 0, []

    def work(self, held: coordination.Holding) -> Any:
        """Claim and train until the runs are handed out; the finisher's trial when this driver got it (held)."""
        finisher, exhausted = None, False
        while not exhausted:
            got, fin, exhausted = coordination.claim(self.claims, len(self.todo), self.stack * self.workers, self.me)
            held.add([t for _, t in got] + ([fin] if fin is not None else []))
            finisher = finisher or fin
            trials = {self.todo[n].cfg.tracking.run_name: t for n, t in got}
            for result in self.train([self.todo[n] for n, _ in got]):
                held.end(trials[result["name"]], run_id=result.get("run_id"), error=result["error"],
                         value=result.get("best_val_loss", math.nan), diverged=result["diverged"])
        return finisher

    def train(self, jobs: list[Job]):
        """Train ``jobs`` as stacks in the workers; yield each result as it comes."""
        if not jobs:
            return
        chunks = plan_chunks(jobs, self.stack, self.workers)
        with progress_feed(self.pool, self.moved if self.progress else None) as feed:
            for result in study_mod.execute(self.pool, chunks, self.parent_id, self.study.name, self.threads,
                                            self.keep, self.moved, feed):
                self.moved.advance(result["name"])
                if result["error"] is None:
                    self.finished += 1
                    self.diverged += int(result["diverged"])
                else:
                    self.failed.append((result["name"], result["error"]))
                    log.warning("run %s failed: %s", result["name"], result["error"])
                self.moved.bar.set_postfix(diverged=self.diverged, failed=len(self.failed), refresh=False)
                yield result


def _finish(study: Study, store: tracking.StudyStore, share: _Share, held: coordination.Holding, finisher: Any,
            plan: dict[str, Any], fingerprint: str, t0: float) -> StudyOutcome:
    """The finisher (``held``): wait for the other drivers, redo the runs of those that died, settle the MLflow
    runs, end the parent run. The outcome counts the whole study's runs."""
    bar = share.moved.bar
    bar.set_description(f"study {study.name} (waiting for the other drivers)")
    redo, closed = coordination.await_others(share.claims, len(share.todo), finisher)
    bar.n = len(study.jobs) - len(share.todo) + len(closed)
    bar.set_description(f"study {study.name}")
    if redo:
        log.warning("study %s: %d run(s) of drivers that died are redone here", study.name, len(redo))
    redone = list(share.train([share.todo[n] for n in redo]))
    done = [t for t in closed.values() if "fincast.error" not in t.user_attrs]
    failed = [(share.todo[n].cfg.tracking.run_name, str(t.user_attrs["fincast.error"]))
              for n, t in closed.items() if "fincast.error" in t.user_attrs]
    failed += [(r["name"], r["error"]) for r in redone if r["error"] is not None]
    store.settle(fingerprint, keep_failed=True)  # the half-written runs of drivers that died
    parent = store.parent_run()
    drivers = {str(t.user_attrs.get("fincast.worker")) for t in closed.values()} | {share.me}
    with ended(parent, lambda: "FAILED" if failed else "FINISHED"):
        parent.set_tags({"fincast.study_runs": len(study.jobs), "fincast.study_failed": len(failed),
                         "fincast.study_drivers": len(drivers)})
    held.end(finisher, run_id=plan["parent"], value=0.0)
    ok = [r for r in redone if r["error"] is None]
    return StudyOutcome(study.name, plan["parent"], study.name, store.uri, len(study.jobs),
                        len(study.jobs) - len(share.todo), len(done) + len(ok),
                        sum(bool(t.user_attrs.get("fincast.diverged")) for t in done)
                        + sum(bool(r["diverged"]) for r in ok), failed, time.perf_counter() - t0, ended=True,
                        here=share.finished + len(share.failed), note=f"{len(drivers)} driver(s)")
