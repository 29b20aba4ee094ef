"""Driving a sweep (layer L4, experiments): trials trained as ordinary runs in worker processes, the parent
run, the advised range, the summary; ``run`` starts or resumes a sweep, ``join`` adds a machine's workers."""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import dataclasses
import json
import logging
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from tqdm import tqdm

from fincast import tracking
from fincast.config import (
    FincastError,
    SweepSettings,
)
from fincast.experiments.coordination import (
    FINISHED,
    MAX_CONSECUTIVE_FAILURES,
    OptunaStudy,
    Trial,
    TrialState,
    _check_same,
    _counts,
    _ensure_grid,
    _heartbeat,
    _open_study,
    _recover,
    _retry,
    _sampler,
    _settle_runs,
    _storage,
    importance,
    suggest,
    trials_table,
    worker_id,
)
from fincast.experiments.sweep.spec import SWEEP_TAG, TRIAL_TAG, Sweep, redact, storage_url, trial_config
from fincast.experiments.workers import plan_workers
from fincast.runs import driver
from fincast.runs.record import ended, git_commit
from fincast.runs.setup import visible_gpus

log = logging.getLogger("fincast.sweep")


def objective(out, penalty: float) -> tuple[float, bool]:
    """(objective, diverged) of a finished training run: its best validation loss, or ``penalty`` x the zero
    forecast's validation loss when training went non-finite or never validated finitely."""
    f = out.fit
    if f.diverged or not math.isfinite(f.best_val_loss):
        return penalty * out.zero_val_loss, True
    return float(f.best_val_loss), False


def _train_trial(sweep: Sweep, study: OptunaStudy, trial: Trial, parent_id: str, threads: int | None,
                 worker: str) -> str:
    """Train one trial and tell Optuna its result; returns its state name."""
    params = suggest(sweep, trial)
    cfg = trial_config(sweep, params, number=trial.number, threads=threads)
    prune = sweep.settings.pruner != "none"

    def on_epoch(epoch: int, val_loss: float) -> bool:
        trial.report(val_loss, epoch)
        return prune and trial.should_prune()

    tags = {"fincast.kind": "sweep-trial", SWEEP_TAG: sweep.name, TRIAL_TAG: str(trial.number),
            "fincast.sweep_worker": worker}
    t0 = time.perf_counter()
    out = driver.train(cfg, tags=tags, parent_run_id=parent_id, on_epoch=on_epoch)
    value, diverged = objective(out, sweep.settings.divergence_penalty)
    f = out.fit
    pruned = f.stop_reason == "pruned"
    attrs = {"fincast.run_id": out.run_id, "fincast.diverged": diverged, "fincast.stop_reason": f.stop_reason,
             "fincast.best_val_loss": f.best_val_loss if math.isfinite(f.best_val_loss) else None,
             "fincast.zero_val_loss": out.zero_val_loss, "fincast.epochs": f.epochs, "fincast.steps": f.steps,
             "fincast.clip_rate": float(np.mean(f.history["clipped"])) if f.steps else None,
             "fincast.seconds": time.perf_counter() - t0}
    for k, v in attrs.items():
        trial.set_user_attr(k, v)
    state = "pruned" if pruned and not diverged else "complete"
    tracking.attach(out.tracking_uri, out.run_id).set_tags(
        {"fincast.sweep_state": state, "fincast.sweep_value": repr(value)})
    if state == "pruned":
        study.tell(trial, state=TrialState.PRUNED)
    else:
        study.tell(trial, value)
    return "diverged" if diverged else state


def train_trials(sweep: Sweep, url: str, parent_id: str, *, worker: int = 0, threads: int | None = None,
         gpu: int | None = None, on_trial=None) -> dict[str, Any]:
    """One worker: ask, train and tell trials until ``sweep.trials`` have finished (counted across every worker
    of the storage). Returns its counts."""
    if gpu is not None:
        import torch

        torch.cuda.set_device(gpu)
    storage = _storage(url)
    study = _open_study(sweep, storage, 0, create=False)
    n0 = len(study.get_trials(deepcopy=False))
    seed = int(np.random.SeedSequence([sweep.settings.seed, worker, n0]).generate_state(1)[0])
    study.sampler = _sampler(sweep, seed)  # every worker (and every resumption) its own stream
    me = worker_id()
    done = {"complete": 0, "pruned": 0, "diverged": 0, "surplus": 0, "failed": []}
    consecutive = 0
    target = sweep.trials
    while True:
        _recover(study)
        c = _counts(study)
        if c["finished"] + c["running"] >= target or (sweep.settings.sampler == "grid" and not c["waiting"]):
            break
        trial = study.ask()
        trial.set_user_attr("fincast.worker", me)
        ahead = sum(t.number < trial.number
                    for t in study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.RUNNING)))
        if ahead >= target:  # another worker took the last trial meanwhile: this one is not needed
            trial.set_user_attr("fincast.surplus", True)
            study.tell(trial, state=TrialState.FAIL)
            done["surplus"] += 1
            break
        try:
            with _heartbeat(storage, trial._trial_id):
                state = _train_trial(sweep, study, trial, parent_id, threads, me)
        except Exception as exc:  # the run is FAILED in MLflow; the trial is retried (MAX_RETRIES)
            with contextlib.suppress(Exception):
                trial.set_user_attr("fincast.error", f"{type(exc).__name__}: {exc}"[:2000])
                study.tell(trial, state=TrialState.FAIL)
                _retry(study, study._storage.get_trial(trial._trial_id))
            done["failed"].append((trial.number, f"{type(exc).__name__}: {exc}"))
            log.warning("trial %d failed: %s: %s", trial.number, type(exc).__name__, exc)
            consecutive += 1
            if consecutive >= MAX_CONSECUTIVE_FAILURES:
                break
            continue
        consecutive = 0
        done["complete" if state == "diverged" else state] += 1
        done["diverged"] += state == "diverged"
        if on_trial is not None:
            on_trial()
    return done


@dataclass
class SweepOutcome:
    name: str
    parent_run_id: str | None
    experiment: str
    tracking_uri: str
    storage: str                  # redacted
    sampler: str
    target: int
    finished_before: int
    trained_now: int
    complete: int
    pruned: int
    diverged: int
    failed: list[tuple[int, str]]
    best: dict[str, Any] | None   # number, params, value, run_id
    trials: pd.DataFrame
    importance: pd.DataFrame
    folder: Path | None
    summary: str
    seconds: float
    joined: bool = False
    advice: dict | None = None


def _execute(sweep: Sweep, url: str, parent_id: str, study: OptunaStudy, bar: tqdm | None,
             tracking_uri: str) -> list[dict]:
    """Run the workers (in this process when there is one) until the budget is spent; update the bar."""
    workers, threads, gpus = plan_workers(sweep, visible_gpus(sweep.base_cfg.train.device))

    def refresh() -> None:
        if bar is not None:
            c = _counts(study)
            bar.n = min(c["finished"], bar.total)
            with contextlib.suppress(ValueError):
                bar.set_postfix(best=f"{study.best_value:.4g}", running=c["running"], refresh=False)
            bar.refresh()

    if workers == 1:
        return [train_trials(sweep, url, parent_id, worker=0, threads=threads, gpu=gpus[0], on_trial=refresh)]
    from fincast.experiments.workers import worker_pool

    # GPU workers come from a forkserver: a process forked after this one touched CUDA could not use it
    with worker_pool(workers, threads, tracking_uri, fork_ok=all(g is None for g in gpus)) as (pool, store_ready):
        store_ready()
        futures = {pool.submit(train_trials, sweep, url, parent_id, worker=i, threads=threads, gpu=gpus[i])
                   for i in range(workers)}
        pending = set(futures)
        while pending:
            _, pending = cf.wait(pending, timeout=2.0)
            refresh()
        results = []
        for fut in futures:
            try:
                results.append(fut.result())
            except cf.process.BrokenProcessPool as exc:
                raise FincastError(f"a sweep worker process died ({exc}); rerun the same command to resume "
                                   "(its trial is retried)") from None
        return results


def _parent(sweep: Sweep, study: OptunaStudy, url: str, fingerprint: str) -> tracking.Run:
    """The sweep's parent run: reopened when the study names one, else created (and named in the study)."""
    cfg = dataclasses.replace(sweep.base_cfg.tracking, experiment=sweep.name)
    run_id = study.user_attrs.get("fincast.parent_run_id")
    if run_id:
        try:
            if tracking.get_run(run_id, cfg).info.lifecycle_stage == "active":
                return tracking.start_run(cfg, sweep.name, f"sweep {sweep.name}", resume_run_id=run_id)
        except Exception:  # gone from this tracking store: start a new parent
            log.warning("sweep %s: its parent run %s is not in %s; starting a new one", sweep.name, run_id,
                        tracking.resolve_uri(cfg))
    tags = {"fincast.kind": "sweep", SWEEP_TAG: sweep.name, "fincast.sweep_role": "parent",
            "fincast.optuna_storage": redact(url), "fincast.data_fingerprint": fingerprint,
            "fincast.git_commit": git_commit(), "fincast.pipeline": sweep.base_cfg.name}
    parent = tracking.start_run(cfg, sweep.name, f"sweep {sweep.name}", tags)
    s = sweep.settings
    parent.log_params({
        "sweep.base": str(sweep.raw.get("base")), "sweep.methods": list(sweep.methods),
        **{f"search.{m}": a.describe() for m, a in sweep.methods.items() if a is not None},
        "search.lr": sweep.lr.describe() if sweep.lr is not None else f"{sweep.base_cfg.train.lr:g} (fixed)",
        **{f"sweep.{f.name}": getattr(s, f.name) for f in dataclasses.fields(SweepSettings) if f.name != "storage"},
        "sweep.trials": sweep.trials, "sweep.storage": redact(url),
        **{f"set.{k}": v for k, v in (sweep.raw.get("set") or {}).items()},
    })
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "sweep.yaml").write_text(yaml.safe_dump(sweep.raw, sort_keys=False))
        parent.log_artifact(Path(tmp) / "sweep.yaml")
    study.set_user_attr("fincast.parent_run_id", parent.run_id)
    return parent


def probe_lr(sweep: Sweep) -> float:
    """The learning rate of the advisor's probe: the middle of search.lr on a log scale (the median of its
    values), else the base's lr. Gradient norms scale with the lr the weights move at."""
    if sweep.lr is None:
        return sweep.base_cfg.train.lr
    if sweep.lr.values is not None:
        return float(np.median(sweep.lr.values))
    return float(math.sqrt(sweep.lr.low * sweep.lr.high))


def _advice(sweep: Sweep, study: OptunaStudy, parent_id: str | None, *, progress: bool) -> dict | None:
    """sweep.range = advised: the advisor's range for clip.norm.max_norm, from the study (the probe runs once)."""
    if sweep.settings.range != "advised":
        return None
    saved = study.user_attrs.get("fincast.advice")
    if saved is not None or parent_id is None:
        return saved
    from fincast.experiments import advise

    lr = probe_lr(sweep)
    cfg = dataclasses.replace(sweep.base_cfg, train=dataclasses.replace(sweep.base_cfg.train, lr=lr),
                              tracking=dataclasses.replace(sweep.base_cfg.tracking, experiment=sweep.name,
                                                           metrics_writer="inline",
                                                           run_name=f"advise-clip {sweep.name} lr={lr:g}"))
    a = advise.advise(cfg, steps=sweep.settings.advise_steps, parent_run_id=parent_id, progress=progress,
                      tags={SWEEP_TAG: sweep.name})
    low, high = a.advice.sweep_range()
    saved = {"run_id": a.run_id, "low": low, "high": high, "lr": lr, "proposals": a.advice.proposals(),
             "diverged_step": a.diverged_step, "plot": str(a.plot)}
    study.set_user_attr("fincast.advice", saved)
    return saved


def run(sweep: Sweep, *, storage: str | None = None, progress: bool = False,
        out_dir: str | Path = "reports") -> SweepOutcome:
    """Start or resume the sweep: trials until ``sweep.trials`` have finished (in ``sweep.workers`` processes,
    and in any worker that joins from elsewhere), then the summary into the parent run and ``out_dir``."""
    t0 = time.perf_counter()
    url = storage_url(sweep, storage)
    check_outputs(sweep, url, [("the sweep report folder", Path(out_dir) / "sweep" / sweep.name)]
                  + ([("the advisor's report folder", Path("reports") / "advise" / sweep.base_cfg.name)]
                     if sweep.settings.range == "advised" else []))
    store = _storage(url)
    study = _open_study(sweep, store, sweep.settings.seed, create=True)
    _check_same(sweep, study, url)
    # the data once, here: a bad source fails now with its own message; trials then read the cache
    fingerprint = driver.load_data(sweep.base_cfg, progress=progress).fingerprint
    saved_fp = study.user_attrs.get("fincast.data_fingerprint")
    if saved_fp not in (None, fingerprint):
        raise FincastError(f"sweep {sweep.name}: the data changed since it started (fingerprint {fingerprint}, the "
                           f"sweep's {saved_fp}); its trials would not be comparable. Start a new sweep "
                           f"(--set name={sweep.name}_2) or use the same data")
    study.set_user_attr("fincast.data_fingerprint", fingerprint)
    study.set_user_attr("fincast.spec_hash", sweep.spec_hash)
    parent = _parent(sweep, study, url, fingerprint)
    status = "FINISHED"
    bar = None
    with ended(parent, lambda: status):
        try:
            advice = _advice(sweep, study, parent.run_id, progress=progress)
            if advice is not None:
                sweep = sweep.with_range("norm", advice["low"], advice["high"])
            recovered = _recover(study)
            if recovered:
                log.info("sweep %s: %d trial(s) of a stopped worker failed and queued again", sweep.name, recovered)
            if sweep.settings.sampler == "grid":
                _ensure_grid(sweep, study)
            _settle_runs(study, parent.uri, parent.run_id)
            before = _counts(study)["finished"]
            if before:
                log.info("sweep %s: %d of %d trials finished before; going on", sweep.name, before, sweep.trials)
            bar = tqdm(total=sweep.trials, initial=min(before, sweep.trials), desc=f"sweep {sweep.name}", unit="trial",
                       disable=not progress)
            results = _execute(sweep, url, parent.run_id, study, bar, parent.uri)
            # workers elsewhere may still run trials (or a last one failed and was queued again): finish them
            while True:
                c = _counts(study)
                if c["finished"] >= sweep.trials:
                    break
                if c["running"]:
                    time.sleep(2.0)
                    _recover(study)
                    continue
                if c["waiting"] or (sweep.settings.sampler != "grid" and not _gave_up(results)):
                    more = train_trials(sweep, url, parent.run_id, worker=len(results), threads=sweep.settings.threads)
                    results.append(more)
                    if not any(more[k] for k in ("complete", "pruned")) and not _counts(study)["running"]:
                        break
                    continue
                break
            if bar is not None:
                bar.n = min(_counts(study)["finished"], sweep.trials)
                bar.close()
            _settle_runs(study, parent.uri, parent.run_id)
            out = _summarise(sweep, study, parent, url, out_dir, results, before, t0, advice)
            if out.complete + out.pruned < sweep.trials:
                status = "FAILED"
        finally:
            if bar is not None:
                bar.close()
    return out


def check_outputs(sweep: Sweep, url: str, reports: list[tuple[str, Path]] = ()) -> None:
    """Before any work: the Optuna storage, the trials' store, artifact and checkpoint folders (and ``reports``)
    can be written."""
    trials = dataclasses.replace(sweep.base_cfg, tracking=dataclasses.replace(sweep.base_cfg.tracking,
                                                                              experiment=sweep.name))
    driver.check_outputs([trials], reports=reports, stores=[("sweep.storage", url)])


def _gave_up(results: list[dict]) -> bool:
    """A worker stopped on consecutive failures: do not start more trials in this process."""
    return any(len(r["failed"]) >= MAX_CONSECUTIVE_FAILURES for r in results)


def _summarise(sweep: Sweep, study: OptunaStudy, parent: tracking.Run, url: str, out_dir: str | Path,
               results: list[dict], before: int, t0: float, advice: dict | None) -> SweepOutcome:
    from fincast.reports import sweep as report

    table = trials_table(sweep, study)
    imp = importance(sweep, study)
    zeros = np.array([t.user_attrs.get("fincast.zero_val_loss") or math.nan
                      for t in study.get_trials(deepcopy=False, states=FINISHED)], float)
    zero_loss = float(np.nanmedian(zeros)) if np.isfinite(zeros).any() else math.nan  # the same data: one value
    failed = [f for r in results for f in r["failed"]]
    unresolved = sum(1 for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
                     if not t.user_attrs.get("fincast.surplus"))
    extra = {"advice.json": json.dumps(advice, indent=1) + "\n"} if advice else {}
    files = report.write(Path(out_dir) / "sweep" / sweep.name, sweep.name, table, imp, thresholds=sweep.thresholds(),
                         sampler=sweep.settings.sampler, penalty=sweep.settings.divergence_penalty, zero_loss=zero_loss,
                         failed=unresolved, parent_run_id=parent.run_id, extra=extra)
    for f in files.files:
        parent.log_artifact(f, "sweep")
    b = report.best_trial(table)
    best = None
    if b is not None:
        t = study.trials[int(b["number"])]
        best = {"number": int(b["number"]), "params": dict(t.params), "value": float(b["value"]),
                "run_id": b["run_id"], "method": b["method"], "threshold_key": b["threshold_key"],
                "threshold": float(b["threshold"]), "lr": float(b["lr"])}
        parent.set_tags({"fincast.best_trial": best["number"], "fincast.best_run_id": best["run_id"],
                         "fincast.best_params": json.dumps(best["params"])})
    n_complete = int((table["state"] == "complete").sum())
    n_pruned = int((table["state"] == "pruned").sum())
    metrics = [("trials/complete", n_complete, 0), ("trials/pruned", n_pruned, 0),
               ("trials/diverged", int(table["diverged"].sum()), 0), ("trials/failed", unresolved, 0),
               ("zero_forecast/val_loss", zero_loss, 0)]
    if best is not None:
        metrics += [("best/value", best["value"], 0), ("best/lr", best["lr"], 0)]
        if best["method"] != "none":
            metrics.append(("best/threshold", best["threshold"], 0))
    for r in report.per_method(table).to_dict("records"):
        if math.isfinite(r["best_value"]):
            metrics.append((f"best/{r['method']}/value", r["best_value"], 0))
            if r["method"] != "none":
                metrics.append((f"best/{r['method']}/threshold", r["best_threshold"], 0))
    parent.log_metrics([(k, float(v), s) for k, v, s in metrics if math.isfinite(float(v))])
    trained = sum(r["complete"] + r["pruned"] for r in results)
    text = report.summary_text(sweep.name, table, imp, sampler=sweep.settings.sampler,
                               penalty=sweep.settings.divergence_penalty, zero_loss=zero_loss, failed=unresolved,
                               parent_run_id=parent.run_id)
    return SweepOutcome(sweep.name, parent.run_id, sweep.name, parent.uri, redact(url), sweep.settings.sampler,
                        sweep.trials, before, trained, n_complete, n_pruned, int(table["diverged"].sum()), failed,
                        best, table, imp, files.folder, text, time.perf_counter() - t0, advice=advice)


def join(sweep: Sweep, *, storage: str | None = None, progress: bool = False) -> SweepOutcome:
    """Work on a running sweep from another process or machine: same spec, same storage, same MLflow store.
    Trains trials until the sweep's budget is spent; the process that started the sweep writes its summary."""
    t0 = time.perf_counter()
    url = storage_url(sweep, storage)
    check_outputs(sweep, url)
    study = _open_study(sweep, _storage(url), sweep.settings.seed, create=False)
    _check_same(sweep, study, url)
    parent_id = None
    for _ in range(30):  # the driver names its parent run right after creating the study
        parent_id = study.user_attrs.get("fincast.parent_run_id")
        advice = study.user_attrs.get("fincast.advice") if sweep.settings.range == "advised" else True
        if parent_id and advice:
            break
        time.sleep(1.0)  # (user_attrs are read from the storage at each access)
    else:
        raise FincastError(f"sweep {sweep.name}: its driver has not started its parent run (or its advisor probe) "
                           "yet; is `fincast sweep SPEC --storage URL` running? Try again in a moment")
    if sweep.settings.range == "advised":
        a = study.user_attrs["fincast.advice"]
        sweep = sweep.with_range("norm", a["low"], a["high"])
    fingerprint = driver.load_data(sweep.base_cfg, progress=progress).fingerprint
    if fingerprint != study.user_attrs.get("fincast.data_fingerprint"):
        raise FincastError(f"sweep {sweep.name}: this machine's data (fingerprint {fingerprint}) differ from the "
                           f"sweep's ({study.user_attrs.get('fincast.data_fingerprint')}); give every worker the "
                           "same data files or cache")
    tracking_uri = tracking.resolve_uri(sweep.base_cfg.tracking)
    tracking.get_run(parent_id, sweep.base_cfg.tracking)  # the same MLflow store as the driver's, or fail here
    before = _counts(study)["finished"]
    bar = tqdm(total=sweep.trials, initial=min(before, sweep.trials), desc=f"join {sweep.name}", unit="trial",
               disable=not progress)
    try:
        results = _execute(sweep, url, parent_id, study, bar, tracking_uri)
    finally:
        bar.close()
    table = trials_table(sweep, study)
    return SweepOutcome(sweep.name, parent_id, sweep.name, tracking_uri, redact(url), sweep.settings.sampler,
                        sweep.trials, before, sum(r["complete"] + r["pruned"] for r in results),
                        int((table["state"] == "complete").sum()), int((table["state"] == "pruned").sum()),
                        int(table["diverged"].sum()), [f for r in results for f in r["failed"]], None, table,
                        pd.DataFrame(), None, "", time.perf_counter() - t0, joined=True)


def describe(sweep: Sweep, storage: str | None = None) -> str:
    """What `fincast sweep --dry-run` prints: the search space, the budget and where it is stored."""
    s = sweep.settings
    lines = [f"sweep {sweep.name}: {sweep.trials} trials, sampler {s.sampler}, pruner {s.pruner}, "
             f"storage {redact(storage_url(sweep, storage))}"]
    for m, a in sweep.methods.items():
        lines.append(f"  clip.method={m}" + ("" if a is None else f": {a.key} in {a.describe()}")
                     + (" (replaced by the advisor's range)" if s.range == "advised" and m == "norm" else ""))
    lines.append(f"  train.lr: {sweep.lr.describe()}" if sweep.lr is not None
                 else f"  train.lr: {sweep.base_cfg.train.lr:g} (fixed)")
    if s.sampler == "grid":
        lines.append(f"  grid ({len(sweep.grid())} points = methods x thresholds x learning rates; sweep.trials is "
                     "not used):")
        lines += ["    " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in p.items())
                  for p in sweep.grid()]
    return "\n".join(lines)
