"""Benchmark: how close a stability study comes to perfect parallel use of the machine's cores.

Study: pipelines/stability_crypto.yaml with 4 clip configs (none, norm max_norm 1.0, autoclip, zclip) x 2
learning rates (0.1, 3.0) x 3 seeds = 24 runs of --epochs epochs each (train.epochs; default 8), on BTC-USD
from ../shared/data/crypto when that folder has BTC-USD.csv, else on synthetic prices (the output says which).

Workers = cores (os.sched_getaffinity), torch threads per worker = max(1, cores // workers), as study.run
chooses them. Then:

  single runs  every job of the study trained alone, one after another, in this (warmed-up) process with
               driver.train(job.cfg with train.threads = the per-worker threads), into a temp MLflow store;
               each timed with perf_counter around driver.train (data load, MLflow logging and artifacts
               included: a study's runs do all of that too). One warm-up run (1 epoch) first, not counted.
  study        study.run(study) into a temp MLflow store created beforehand (as the single-run store is by
               the warm-up run): wall time including starting the workers, which is part of a study's
               honest cost.

ideal = sum of the single-run times / cores. Target (issue): study <= 1.2 x ideal. Also printed: throughput
in runs/hour, CPU time of both (this process and its reaped children: a busy machine stretches wall times,
CPU time much less), and where the study's extra time goes (start-up until its first run starts, per-run
durations from the runs' own MLflow start/end times).

Everything goes into a temporary directory (MLflow stores sqlite:///<tmp>/*.db, artifacts, cwd) that is
deleted at the end (--keep keeps it); the project's mlflow.db and reports/ are not touched.
Run: .venv/bin/python bench/study_efficiency.py   (a few minutes on 2 cores; --quick: 12 runs of 2 epochs)
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mlflow.tracking import MlflowClient  # noqa: E402

from fincast import tracking  # noqa: E402
from fincast.experiments import study as study_mod  # noqa: E402
from fincast.runs import driver  # noqa: E402
from fincast.runs.setup import cores as count_cores  # noqa: E402

DATA = (ROOT.parent / "shared" / "data" / "crypto").resolve()
CLIPS = ["none", "{method: norm, norm: {max_norm: 1.0}}", "{method: autoclip}", "{method: zclip}"]
LRS = "[0.1, 3.0]"


def cpu_seconds() -> float:
    """CPU time of this process and of its children that have been waited for (study workers, git)."""
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + kids.ru_utime + kids.ru_stime


def run_durations(uri: str, experiment: str) -> list[tuple[float, float]]:
    """(start, end) in seconds since the epoch of every finished child run (tag fincast.study_role=child)."""
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    runs = client.search_runs([exp.experiment_id], "tags.`fincast.study_role` = 'child'", max_results=1000)
    return [(r.info.start_time / 1000, r.info.end_time / 1000) for r in runs
            if r.info.status == "FINISHED" and r.info.end_time]


def with_store(cfg, uri: str, artifact_dir: str, **train):
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **train),
                               tracking=dataclasses.replace(cfg.tracking, uri=uri, artifact_dir=artifact_dir))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=8, help="train.epochs of every run (default 8)")
    ap.add_argument("--seeds", type=int, default=3, help="seeds per cell (default 3, the minimum a study takes)")
    ap.add_argument("--quick", action="store_true",
                    help="2 epochs, 2 clip configs (none, norm) x 2 lrs x 3 seeds = 12 runs")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (stores, artifacts)")
    args = ap.parse_args()
    clips = CLIPS
    if args.quick:
        args.epochs, args.seeds, clips = 2, 3, CLIPS[:2]

    tmp = Path(tempfile.mkdtemp(prefix="fincast-bench-study-"))
    if (DATA / "BTC-USD.csv").is_file():
        data, data_note = ["data.source=csv", f"data.path={DATA}"], f"csv, BTC-USD from {DATA}"
    else:
        data, data_note = ["data.source=synthetic"], f"synthetic (no BTC-USD.csv in {DATA})"
    overrides = [f"matrix.clip=[{', '.join(clips)}]", f"matrix.lr={LRS}", f"matrix.seeds={args.seeds}",
                 f"train.epochs={args.epochs}", *data,
                 f"tracking.uri=sqlite:///{tmp}/study.db", f"tracking.artifact_dir={tmp}/art-study"]
    try:
        study = study_mod.load(ROOT / "pipelines" / "stability_crypto.yaml", overrides)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    jobs = study.jobs
    cores = count_cores()
    workers = min(study.settings.workers or cores, max(1, len(jobs)))  # as study.run chooses them
    threads = study.settings.threads or max(1, cores // workers)
    n_lr = len({j.lr for j in jobs})
    n_seeds = len({j.seed for j in jobs})
    print(f"data: {data_note}")
    print(f"study: {len(jobs)} runs ({len(jobs) // (n_lr * n_seeds)} clip configs x {n_lr} learning rates x "
          f"{n_seeds} seeds), {args.epochs} epochs each; {cores} cores -> {workers} workers x {threads} torch "
          f"thread(s) each")
    print(f"temp dir: {tmp}")
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())} "
          "(other processes on the machine stretch both measurements)")

    os.chdir(tmp)  # anything written to a relative path lands here
    try:
        single_uri, single_art = f"sqlite:///{tmp}/single.db", f"{tmp}/art-single"
        t0 = time.perf_counter()
        driver.train(with_store(jobs[0].cfg, single_uri, single_art, threads=threads, epochs=1),
                       tags={"bench": "warm-up"})
        print(f"warm-up run (1 epoch, also creates the single-run store): {time.perf_counter() - t0:.1f} s, "
              "not counted")

        def single_pass(label: str) -> list[float]:
            times: list[float] = []
            for i, job in enumerate(jobs):
                cfg = with_store(job.cfg, single_uri, single_art, threads=threads)
                t0 = time.perf_counter()
                out = driver.train(cfg, tags=job.tags(study.name))
                times.append(time.perf_counter() - t0)
                if sys.stdout.isatty():
                    print(f"\r  {label} single run {i + 1}/{len(jobs)}: {times[-1]:.2f} s ({out.fit.steps} steps"
                          f"{', diverged' if out.fit.diverged else ''})        ", end="", flush=True)
            if sys.stdout.isatty():
                print()
            return times

        # single runs before AND after the study: this VM's speed drifts by 10-30% over minutes, and the
        # baseline is the mean of the two passes that bracket the study
        cpu0 = cpu_seconds()
        single = single_pass("before")
        single_cpu = cpu_seconds() - cpu0
        single_runs = run_durations(single_uri, study.name)

        # the study's store is created beforehand too (in another process, so this one still opens it, as
        # `fincast study` does), like the single-run store by the warm-up: neither side pays table creation
        subprocess.run([sys.executable, "-c", "from mlflow.tracking import MlflowClient; "
                        f"MlflowClient('sqlite:///{tmp}/study.db').search_experiments()"], check=True,
                       capture_output=True)
        cpu0 = cpu_seconds()
        wall0 = time.time()
        t0 = time.perf_counter()
        outcome = study_mod.run(study)
        study_s = time.perf_counter() - t0
        study_cpu = cpu_seconds() - cpu0
        study_runs = run_durations(tracking.resolve_uri(study.tracking), study.name)
        single_after = single_pass("after")
    finally:
        os.chdir(ROOT)
        study_mod.lock_path(study).unlink(missing_ok=True)
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    total = (sum(single) + sum(single_after)) / 2
    ideal = total / cores
    ratio = study_s / ideal
    n = len(jobs)
    print()
    print(f"runs                     {n}")
    print(f"cores / workers / threads per worker   {cores} / {workers} / {threads}")
    print(f"single runs, sum         {total:8.1f} s  (mean of the pass before the study, {sum(single):.1f} s, and "
          f"after it, {sum(single_after):.1f} s)")
    print(f"ideal = sum / cores      {ideal:8.1f} s")
    print(f"study wall time          {study_s:8.1f} s  ({outcome.finished} finished, {outcome.diverged} diverged, "
          f"{len(outcome.failed)} failed)")
    print(f"ratio study / ideal      {ratio:8.2f}    (target <= 1.2: {'yes' if ratio <= 1.2 else 'NO'})")
    print(f"throughput               sequential {3600 * n / total:.0f} runs/h, ideal {3600 * n / ideal:.0f} runs/h, "
          f"study {3600 * n / study_s:.0f} runs/h")
    print(f"CPU time                 single runs {single_cpu:.1f} s, study {study_cpu:.1f} s (driver + workers; "
          f"x{study_cpu / single_cpu:.2f})")
    if study_runs and single_runs:
        first = min(s for s, _ in study_runs) - wall0
        last = study_s - (max(e for _, e in study_runs) - wall0)
        study_runs.sort()
        in_study = statistics.mean(e - s for s, e in study_runs)
        alone = statistics.mean(e - s for s, e in single_runs)
        cold = [e - s for s, e in study_runs[:workers]]  # each fresh worker's first run
        warm = [e - s for s, e in study_runs[workers:]]
        print(f"study start-up           {first:8.1f} s until its first run started (data load, store, parent run, "
              "spawning workers and their imports, the run's own data load)")
        print(f"study wind-down          {last:8.1f} s after its last run ended")
        print(f"run duration in MLflow   mean {alone:.2f} s alone, {in_study:.2f} s in the study (x{in_study / alone:.2f}:"
              f" runs share the cores with each other and the driver)")
        if warm:
            print(f"                         in the study: first run of each worker mean {statistics.mean(cold):.2f} s "
                  f"(cold process), the other runs mean {statistics.mean(warm):.2f} s")
    for name, err in outcome.failed:
        print(f"failed in the study: {name}: {err}")
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
