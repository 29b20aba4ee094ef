"""Stability studies (layer L4, experiments): one base pipeline trained over a grid of clip configs x learning rates x
seeds (x optional other axes), each run an MLflow child run of one parent study run.

A study spec (``pipelines/stability_*.yaml``)::

    name: stability_crypto
    base: price_crypto.yaml          # pipeline spec, relative to this file
    set: {train.optimizer: sgd}      # overrides for every run
    matrix:
      clip: [none, {method: norm, norm: {max_norm: 1.0}}, autoclip]   # must include none
      lr: [0.1, 1.0, 3.0]
      seeds: 5                       # or a list of seeds; at least 3
      axes: {features.lookback: [30, 60]}                             # optional
    study: {workers: null}           # StudySettings

Runs execute in warm worker processes (imports paid once per worker, torch threads = cores / workers), in
batches that train stacked (``study.batch_runs``; ``driver.train_batch``) where the runs allow it.
Rerunning a study skips runs that finished (matched by a hash of their resolved config) and redoes the
others; leftovers of killed or failed attempts are deleted so every run appears exactly once."""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import dataclasses
import hashlib
import itertools
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from tqdm import tqdm

from fincast import config as config_mod
from fincast import tracking
from fincast.clipping import label as clip_label
from fincast.config import ConfigError, FincastError, PipelineConfig, StudySettings, short_float
from fincast.experiments.spec import _UNHASHED, _merge, base_config, config_hash, read_spec, spec_common
from fincast.experiments.workers import Progress, plan_chunks, progress_feed, worker_count, worker_pool
from fincast.runs import driver, stopping
from fincast.runs.record import Keeping, ended
from fincast.runs.setup import visible_gpus
from fincast.tracking import HASH_TAG, ROLE_TAG, STUDY_TAG

log = logging.getLogger("fincast.study")


SPEC_KEYS = ("name", "base", "set", "matrix", "study")


MATRIX_KEYS = ("clip", "lr", "seeds", "axes")


MIN_SEEDS = 3


@dataclass(frozen=True)
class Job:
    """One run of a study: a cell of the grid and a seed."""
    cfg: PipelineConfig
    cell: str     # e.g. "norm1.0 lr=1" (+ " features.lookback=60" per extra axis)
    group: str    # the cell without its clip config: what the report compares within, e.g. "lr=1"
    clip: str     # clip_label of the cell
    lr: float
    axes: tuple[tuple[str, Any], ...]
    seed: int
    hash: str

    def tags(self, study: str) -> dict[str, str]:
        return {STUDY_TAG: study, ROLE_TAG: "child", HASH_TAG: self.hash, "fincast.cell": self.cell,
                "fincast.group": self.group, "fincast.study_clip": self.clip, "fincast.study_lr": repr(self.lr),
                "fincast.seed": str(self.seed), "fincast.study_axes": json.dumps(dict(self.axes), default=str)}


@dataclass(frozen=True)
class Study:
    name: str
    path: Path
    raw: dict                      # the spec as resolved (after --set), saved with the parent run
    settings: StudySettings
    jobs: tuple[Job, ...]
    tracking: config_mod.TrackingConfig

    @property
    def cells(self) -> list[str]:
        return list(dict.fromkeys(j.cell for j in self.jobs))


def load(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Study:
    """Read a study spec, apply ``--set`` overrides (``study.*``/``matrix.*``/``name``/``base`` change the
    spec; any other key is a pipeline key set for every run), check it and expand it into jobs. Every problem
    is reported before any work starts, naming the file and key."""
    raw, name, base_path, errors = read_spec(path, overrides, SPEC_KEYS, "study")
    path = Path(path)
    common = spec_common(raw, errors)
    settings = config_mod.build_section(StudySettings, raw.get("study"), "study.", errors)
    clips, lrs, seeds, axes = _matrix(raw, errors)
    if errors or base_path is None:
        raise ConfigError(f"invalid study spec {path}:\n  " + "\n  ".join(errors))
    base_raw = base_config(path, base_path, common)
    cells = _cells(path, base_raw, clips, lrs, axes, errors)
    if errors:
        raise ConfigError(f"invalid study spec {path}:\n  " + "\n  ".join(errors))
    name = name.strip()
    jobs: list[Job] = []
    for seed in seeds:  # seed-major: a study stopped early has every cell for its first seeds
        for cfg, label, group, lr, combo in cells:
            cfg = dataclasses.replace(
                cfg, train=dataclasses.replace(cfg.train, seed=seed),
                tracking=dataclasses.replace(cfg.tracking, experiment=name, metrics_writer="inline",
                                             run_name=f"{label} {group} s{seed}"))
            jobs.append(Job(cfg, f"{label} {group}", group, label, lr, combo, seed, config_hash(cfg)))
    if len({j.hash for j in jobs}) != len(jobs):  # a bug guard: every run must be told apart by its hash
        raise ConfigError(f"invalid study spec {path}: two runs resolve to the same config")
    return Study(name, path, raw, settings, tuple(jobs), jobs[0].cfg.tracking)


def _matrix(raw: dict, errors: list[str]) -> tuple[list[dict], list[float], list[int], dict]:
    """The matrix's clip configs, learning rates, seeds and extra axes, each checked (problems into ``errors``)."""
    matrix = raw.get("matrix")
    if not isinstance(matrix, dict):
        errors.append("matrix: required, a mapping with clip, lr, seeds (and optionally axes)")
        matrix = {}
    errors += [f"matrix.{k}: unknown key; matrix has: {', '.join(MATRIX_KEYS)}" for k in matrix
               if k not in MATRIX_KEYS]
    clips = _clips(matrix.get("clip"), errors)
    lrs = matrix.get("lr")
    lrs = [lrs] if isinstance(lrs, int | float | str) else lrs
    try:
        lrs = [float(v) for v in lrs] if isinstance(lrs, list) and lrs else None
    except (TypeError, ValueError):
        lrs = None
    if lrs is None:
        errors.append(f"matrix.lr = {matrix.get('lr')!r}: required, a list of learning rates")
        lrs = []
    if lrs and len(set(lrs)) != len(lrs):
        errors.append(f"matrix.lr = {matrix.get('lr')!r}: duplicate learning rates")
    seeds = matrix.get("seeds", 5)
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = list(range(seeds))
    if (not isinstance(seeds, list) or not all(isinstance(s, int) and s >= 0 for s in seeds)
            or len(set(seeds)) != len(seeds)):
        errors.append(f"matrix.seeds = {matrix.get('seeds')!r}: expected a count or a list of distinct seeds >= 0")
        seeds = []
    elif len(seeds) < MIN_SEEDS:
        errors.append(f"matrix.seeds = {matrix.get('seeds')!r}: at least {MIN_SEEDS} seeds (a comparison over fewer "
                      "cannot tell noise from effect)")
    return clips, lrs, seeds, _axes(matrix.get("axes") or {}, errors)


def _clips(clips: Any, errors: list[str]) -> list[dict]:
    if not isinstance(clips, list) or not clips:
        errors.append("matrix.clip: required, a list of clip configs (e.g. none, {method: norm, norm: {max_norm: 1.0}})")
        clips = []
    clips = [{"method": c} if isinstance(c, str) else c for c in clips]
    for i, c in enumerate(clips):
        if not isinstance(c, dict):
            errors.append(f"matrix.clip[{i}] = {c!r}: expected a method name or a clip section mapping")
    clips = [c for c in clips if isinstance(c, dict)]
    if clips and not any(c.get("method") == "none" for c in clips):
        errors.append("matrix.clip: must include none (unclipped training is what every config is compared with)")
    return clips


def _axes(axes: Any, errors: list[str]) -> dict:
    if not isinstance(axes, dict) or not all(isinstance(v, list) and v for v in axes.values()):
        errors.append("matrix.axes: expected a mapping of pipeline key -> list of values, e.g. "
                      "{features.lookback: [30, 60]}")
        return {}
    for key in axes:
        if key in ("train.lr", "train.seed") or key.startswith("clip."):
            errors.append(f"matrix.axes.{key}: use matrix.lr, matrix.seeds or matrix.clip for this axis")
        elif key.startswith(_UNHASHED):
            errors.append(f"matrix.axes.{key}: does not change what a run computes (tracking, threads and "
                          "checkpoint keys), so it cannot be an axis")
    return axes


def _cells(path: Path, base_raw: dict, clips: list[dict], lrs: list[float], axes: dict, errors: list[str]) -> list:
    """(config, clip label, group, lr, axis values) of every cell of the grid; duplicates into ``errors``."""
    seen: dict[tuple, int] = {}
    axis_items = [[(k, v) for v in vals] for k, vals in axes.items()]
    cells = []
    for (ci, clip), lr, combo in itertools.product(enumerate(clips), lrs, itertools.product(*axis_items)):
        run_raw = config_mod.apply_overrides(base_raw, [])
        run_raw["clip"] = _merge(run_raw.get("clip") or {}, clip)
        run_raw.setdefault("train", {})["lr"] = lr
        for k, v in combo:
            config_mod.set_key(run_raw, k.split("."), v, f"{path}: matrix.axes.{k}")
        where = f"{path} (matrix.clip[{ci}], lr={lr:g}" + "".join(f", {k}={v}" for k, v in combo) + ")"
        try:
            cfg = config_mod.from_dict(run_raw, where)
        except ConfigError as exc:
            errors.append(str(exc).replace("\n  ", "\n    "))
            continue
        label = clip_label(cfg.clip)
        group = f"lr={short_float(lr)}" + "".join(f" {k.rsplit('.', 1)[-1]}={_fmt(v)}" for k, v in combo)
        section = json.dumps(config_mod.clip_section(cfg.clip), sort_keys=True)
        if (section, group) in seen:
            errors.append(f"matrix.clip[{ci}]: the same clip config as matrix.clip[{seen[section, group]}] ({label})")
            continue
        seen[section, group] = ci
        if any(c[1] == label and c[2] == group for c in cells):  # differs in keys the label does not show
            label = f"{label}#{ci}"
        cells.append((cfg, label, group, lr, tuple(combo)))
    return cells


def _fmt(v: Any) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


@dataclass
class StudyOutcome:
    name: str
    parent_run_id: str
    experiment: str
    tracking_uri: str
    total: int
    skipped: int          # finished before this invocation
    finished: int         # finished now
    diverged: int         # of those finished now
    failed: list[tuple[str, str]]  # (run name, error)
    seconds: float
    ended: bool = True    # the study ended here (a team driver other than the finisher: False)
    here: int = -1        # runs trained by this driver (a team driver's share; -1: all of them)
    note: str = ""        # what else to know (a team driver: who ends the study)


def lock_path(study: Study) -> Path:
    """The lock file of a study and store, per user (left in the temp directory after the study)."""
    key = hashlib.sha256(f"{tracking.resolve_uri(study.tracking)}|{study.name}".encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"fincast-study-{key}-{os.getuid()}.lock"


@contextlib.contextmanager
def _lock(study: Study):
    """One driver per study and store at a time on this machine (a second would delete the first one's runs in
    progress). Drivers on several machines share a study through an Optuna storage instead (experiments.team)."""
    try:
        import fcntl
    except ImportError:  # Windows: no lock
        yield
        return
    with open(lock_path(study), "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            raise FincastError(f"study {study.name!r} is already running in this store (pid {fh.read().strip()}); "
                               "wait for it or stop it first") from None
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        yield


def run(study: Study, *, progress: bool = False) -> StudyOutcome:
    """Run every job of the study not finished before, in ``study.workers`` processes."""
    t0 = time.perf_counter()
    check_outputs(study)
    workers, threads, gpus = prepare(study)
    # the bar shows from the start (kernel build, data, store, worker start-up), then moves once per run
    bar = tqdm(total=len(study.jobs), desc=f"study {study.name} (starting)", unit="run", disable=not progress)
    try:
        return _run(study, bar, workers, threads, progress, t0, gpus)
    finally:
        bar.close()


def check_outputs(study: Study, *, stores: list[tuple[str, str]] = (), reports: list[tuple[str, Path]] = ()) -> None:
    """Before any work: the study's store, artifact and checkpoint folders (and ``stores``, ``reports``) can be
    written."""
    driver.check_outputs([j.cfg for j in study.jobs], keep=keeping(study), stores=stores, reports=reports)


def prepare(study: Study) -> tuple[int, int, int]:
    """(workers, torch threads each, GPUs visible) of this machine's share of the study, after the checks and
    one-off set-up that come before the workers start (the CPU kernel, the store's imports: forked workers
    inherit them)."""
    import torch

    device = study.jobs[0].cfg.train.device
    gpus = visible_gpus(device)
    amp = sorted({j.cfg.train.precision for j in study.jobs} - {"fp32"})
    if amp and not torch.cuda.is_available():  # they would silently train in fp32: cells that differ in name only
        raise FincastError(f"study {study.name}: train.precision={','.join(amp)} needs CUDA, and this machine has "
                           "none; drop that axis or run the study on a GPU machine")
    workers, threads = worker_count(study.settings, device, len(study.jobs), gpus)
    # no CUDA query here (torch.cuda.is_available() would set up the driver and poison the fork of the workers):
    # CPU means device: cpu, or a torch built without CUDA
    cpu = device == "cpu" or (device == "auto" and not torch.backends.cuda.is_built())
    if cpu and study.settings.batch_runs != 1 and any(driver.batch_key(j.cfg) for j in study.jobs):
        from fincast.models.grouped_lstm import cpu_kernel

        cpu_kernel()  # built (once per machine) or loaded here, before the workers fork: they inherit it
    tracking.preload_store(tracking.resolve_uri(study.tracking))  # (imports only, inherited by forked workers)
    return workers, threads, gpus


def _run(study: Study, bar: tqdm, workers: int, threads: int, progress: bool, t0: float,
         gpus: int = 0) -> StudyOutcome:
    uri = tracking.resolve_uri(study.tracking)
    with _lock(study), worker_pool(workers, threads, uri, gpus=gpus) as (pool, store_ready):
        # load (and cache) the data once here: a bad source fails now, with its own message, not in every
        # worker; the workers then use exactly these data (no refresh), and runs on other data are not "done"
        data = driver.load_data(study.jobs[0].cfg, progress=progress)
        fingerprint = data.fingerprint
        store = tracking.StudyStore(study.tracking, study.name)
        store_ready()  # the workers may open the store now (two processes creating it at once collide)
        parent = store.parent_run(params=parent_params(study))
        finished, diverged, failed = 0, 0, []
        with ended(parent, lambda: "FAILED" if failed else "FINISHED"):
            try:
                done = store.settle(fingerprint)
                todo = [j for j in study.jobs if j.hash not in done]
                skipped = len(study.jobs) - len(todo)
                log_spec(parent, study, fingerprint)
                log_baselines(parent, study, data)
                if skipped:
                    log.info("study %s: %d of %d runs already finished; running the other %d", study.name, skipped,
                             len(study.jobs), len(todo))
                chunks = plan_chunks(todo, study.settings.batch_runs, workers)
                if any(len(c) > 1 for c in chunks):
                    log.info("study %s: %d runs in %d batches (%s runs each)", study.name, len(todo), len(chunks),
                             "/".join(str(n) for n in sorted({len(c) for c in chunks}, reverse=True)))
                bar.update(skipped)
                bar.set_description(f"study {study.name}")
                moved = Progress(bar)
                with progress_feed(pool, moved if progress else None) as feed:
                    for result in execute(pool, chunks, parent.run_id, study.name, threads, keeping(study), moved,
                                           feed):
                        moved.advance(result["name"])  # (a run whose stack failed before closing it)
                        if result["error"] is None:
                            finished += 1
                            diverged += int(result["diverged"])
                        else:
                            failed.append((result["name"], result["error"]))
                            log.warning("run %s failed: %s", result["name"], result["error"])
                        bar.set_postfix(diverged=diverged, failed=len(failed), refresh=False)
            finally:
                parent.set_tags({"fincast.study_runs": len(study.jobs), "fincast.study_failed": len(failed)})
    return StudyOutcome(study.name, parent.run_id, study.name, parent.uri, len(study.jobs), skipped, finished,
                        diverged, failed, time.perf_counter() - t0)


# what every run of a study records as params besides the keys that vary across the study
KEY_SETTINGS = ("data.source", "data.tickers", "data.start", "data.end", "features.lookback", "features.horizon",
                "model.type", "model.hidden_size", "model.num_layers", "model.dropout", "train.optimizer", "train.lr",
                "train.seed", "train.epochs", "train.batch_size", "train.schedule", "train.precision", "clip.method")


def keeping(study: Study) -> Keeping:
    """What a study's runs keep: their weights and per-step series on the parent run, one file of each per stack
    (no MLflow model each, no training-curves figure each: the report draws the study's), and as params the
    keys that vary across the study and the key settings (the whole config is each run's config.yaml)."""
    flats = [config_mod.flatten(config_mod.to_dict(j.cfg)) for j in study.jobs]
    varying = {k for k in flats[0] if any(json.dumps(f.get(k), default=str) != json.dumps(flats[0][k], default=str)
                                          for f in flats[1:])}
    varying -= {"tracking.run_name"}  # the run's name is its MLflow name already
    return Keeping("weights", frozenset(varying | set(KEY_SETTINGS)), series="parent", figures=False)


def log_baselines(parent: tracking.Run, study: Study, data: Any) -> None:
    """The baselines' test metrics, once, on the parent run (every run of the study shares its data and test
    samples; runs on other features or data axes differ, and record their own as well)."""
    try:
        parent.log_values([(k, v, 0) for k, v in driver.baselines(study.jobs[0].cfg, data)])
    except Exception as exc:  # noqa: BLE001 - a study goes on without them; its runs still record theirs
        log.warning("study %s: the baselines could not be computed for the parent run: %s", study.name, exc)


def log_spec(parent: tracking.Run, study: Study, fingerprint: str) -> None:
    """The spec as resolved, the plan of runs and the settings the report judges by, on the parent run."""
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "study.yaml"
        spec.write_text(yaml.safe_dump(study.raw, sort_keys=False))
        plan = Path(tmp) / "plan.json"
        plan.write_text(json.dumps([{"cell": j.cell, "group": j.group, "clip": j.clip, "lr": j.lr, "seed": j.seed,
                                     "axes": dict(j.axes), "hash": j.hash} for j in study.jobs], indent=1,
                                   default=str))
        settings = Path(tmp) / "settings.json"  # what the report judges by (params keep the first run's)
        settings.write_text(json.dumps({**dataclasses.asdict(study.settings), "data_fingerprint": fingerprint},
                                       indent=1))
        for f in (spec, plan, settings):
            parent.log_artifact(f)


def parent_params(study: Study) -> dict[str, Any]:
    jobs = study.jobs
    return {
        "study.base": str(study.raw.get("base")), "study.runs": len(jobs),
        "study.clip": list(dict.fromkeys(j.clip for j in jobs)),
        "study.lr": list(dict.fromkeys(j.lr for j in jobs)), "study.seeds": list(dict.fromkeys(j.seed for j in jobs)),
        "study.groups": list(dict.fromkeys(j.group for j in jobs)),
        **{f"study.{f.name}": getattr(study.settings, f.name) for f in dataclasses.fields(StudySettings)},
        **{f"set.{k}": v for k, v in (study.raw.get("set") or {}).items()},
    }


def execute(pool: cf.ProcessPoolExecutor | None, chunks: list[list[Job]], parent_id: str, study: str,
             threads: int, keep: Keeping, progress: Progress | None = None, feed: Any = None):
    """Yield one result dict per job as runs complete (in this process when there is no pool); a chunk of
    several jobs trains stacked and its results come together, while ``progress`` moves as each of its runs
    closes (here directly, from workers through ``feed``)."""
    if pool is None:
        for chunk in chunks:
            yield from _run_chunk(chunk, parent_id, study, threads, keep, progress.advance if progress else None)
        return
    futures = [pool.submit(_run_chunk, chunk, parent_id, study, threads, keep, feed.put if feed is not None else None)
               for chunk in chunks]
    try:
        for fut in cf.as_completed(futures):
            try:
                yield from fut.result()
            except cf.process.BrokenProcessPool as exc:
                raise FincastError(f"a study worker process died ({exc}); rerun the study to redo the "
                                   "unfinished runs") from None
    except BaseException:
        for fut in futures:
            fut.cancel()
        raise


def _worker_cfg(job: Job, threads: int) -> PipelineConfig:
    """The job's config as a worker trains it: the driver's data (no refresh), a share of the cores (the hash
    ignores threads)."""
    cfg = dataclasses.replace(job.cfg, data=dataclasses.replace(job.cfg.data, refresh_after_hours=math.inf))
    if cfg.train.threads is None:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, threads=threads))
    return cfg


def _run_chunk(jobs: list[Job], parent_id: str, study: str, threads: int, keep: Keeping,
               closed: Callable[[str], None] | None = None) -> list[dict]:
    """Train the chunk's jobs, stacked when there are several: one result dict per job. ``closed(name)`` is
    called as each run ends (its progress)."""
    stopping.refuse_if_stopped()  # a worker stopped with its driver opens no more runs
    if len(jobs) == 1:
        return [_run_job(jobs[0], parent_id, study, threads, keep)]
    names = [j.cfg.tracking.run_name for j in jobs]
    try:
        outs = driver.train_batch([_worker_cfg(j, threads) for j in jobs], tags=[j.tags(study) for j in jobs],
                                  parent_run_id=parent_id,
                                  on_closed=(lambda k, _: closed(names[k])) if closed is not None else None,
                                  keep=keep)
    except driver.StackCloseError as exc:  # trained; some runs failed to close (FAILED), the others finished
        outs = exc.outcomes
    except Exception as exc:  # every run of the batch is marked FAILED in MLflow; the study goes on
        return [{"name": n, "error": f"{type(exc).__name__}: {exc}", "diverged": False} for n in names]
    return [{"name": n, "error": f"{type(o).__name__}: {o}", "diverged": False} if isinstance(o, Exception)
            else {"name": n, "error": None, "diverged": o.fit.diverged, "run_id": o.run_id,
                  "best_val_loss": o.fit.best_val_loss}
            for n, o in zip(names, outs)]


def _run_job(job: Job, parent_id: str, study: str, threads: int, keep: Keeping) -> dict:
    cfg = _worker_cfg(job, threads)
    name = job.cfg.tracking.run_name
    try:
        out = driver.train(cfg, tags=job.tags(study), parent_run_id=parent_id, keep=keep)
    except Exception as exc:  # the run is marked FAILED in MLflow; the study goes on
        return {"name": name, "error": f"{type(exc).__name__}: {exc}", "diverged": False}
    return {"name": name, "error": None, "diverged": out.fit.diverged, "run_id": out.run_id,
            "best_val_loss": out.fit.best_val_loss}
