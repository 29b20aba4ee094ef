"""Benchmark: study throughput with runs trained stacked (study.batch_runs) against the plain loop.

Study: pipelines/stability_crypto.yaml with 4 clip configs (none, norm max_norm 1.0, autoclip, zclip) x 2
learning rates (0.1, 3.0) x 3 seeds = 24 runs of the default model (LSTM 32 units, lookback 30, batch 64,
SGD momentum 0.9, 15 epochs with early stopping), on BTC-USD daily from ../shared/data/crypto when it is
there, else on synthetic prices (the output says which).

Each measurement runs in a fresh process (its imports not counted), into its own temporary MLflow store,
created beforehand (as a user's store exists after the first run):

  plain loop   every run through driver.train, one after another (torch threads: fincast's default, all
               cores); one 1-epoch warm-up run first, not counted. What a user without studies would do.
  study x1     study.run with batch_runs=1: runs one at a time in warm worker processes (one per core).
  study auto   study.run with batch_runs=auto (the default): the runs stacked, about four batches per worker
               (8 x 3 on 2 cores), the time loops in the compiled kernel (models/grouped_lstm.cpp).
  study auto, torch ops
               stacked 2 x 12 with FINCAST_LSTM_KERNEL=python: the stacked model's time loops in torch ops, what
               a machine without a C++ compiler gets (there auto trains one at a time; here batch_runs is set).
  fit only     training.fit of each run alone vs training.train_runs of all 24 at once, in one process with
               one thread: the training loop alone, without data loading, MLflow and artifacts.

Printed: wall time, runs/hour and the ratio to the plain loop, peak resident memory (the process and its
largest child, from getrusage), and for `fit only` the time per run-step. The study modes are interleaved and
repeated (--repeats, default 3); the median reading is shown, with all readings. Everything is measured in this
one invocation. Run: .venv/bin/python bench/batched_study.py [--epochs N] [--repeats N] (~7 min on 2 cores)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = (ROOT.parent / "shared" / "data" / "crypto").resolve()
CLIPS = "[none, {method: norm, norm: {max_norm: 1.0}}, {method: autoclip}, {method: zclip}]"


def load(tmp: Path, epochs: int, extra: list[str]):
    from fincast.experiments import study as study_mod

    if (DATA / "BTC-USD.csv").is_file():
        data = ["data.source=csv", f"data.path={DATA}"]
    else:
        data = ["data.source=synthetic"]
    return study_mod.load(ROOT / "pipelines" / "stability_crypto.yaml", [
        f"matrix.clip={CLIPS}", "matrix.lr=[0.1, 3.0]", "matrix.seeds=3", f"train.epochs={epochs}", *data,
        f"tracking.uri=sqlite:///{tmp}/m.db", f"tracking.artifact_dir={tmp}/art", *extra])


def peak_mb() -> tuple[float, float]:
    """(this process, largest reaped child) peak resident memory in MB (Linux: ru_maxrss in KB)."""
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)


def measure(mode: str, epochs: int) -> dict:
    import torch

    from fincast import features, training
    from fincast.experiments import study as study_mod
    from fincast.experiments.workers import plan_chunks
    from fincast.models import build_model
    from fincast.runs import driver
    from fincast.runs.setup import cores

    tmp = Path(tempfile.mkdtemp(prefix=f"fincast-bench-batched-{mode}-"))
    os.chdir(tmp)
    # the store exists, as a user's mlflow.db does after the first run (MLflow's migrations of a new store take
    # ~2 s): created by another process, since a study's driver must not fork workers with the store open
    subprocess.run([sys.executable, "-c", "import sys; from fincast import tracking; tracking.open_store(sys.argv[1])",
                    f"sqlite:///{tmp}/m.db"], check=True, cwd=ROOT)
    try:
        if mode == "plain":
            study = load(tmp, epochs, [])
            first = study.jobs[0].cfg
            driver.train(dataclasses.replace(first, train=dataclasses.replace(first.train, epochs=1)))
            t0 = time.perf_counter()
            outs = [driver.train(j.cfg, tags=j.tags(study.name)) for j in study.jobs]
            seconds = time.perf_counter() - t0
            return {"seconds": seconds, "runs": len(outs), "diverged": sum(o.fit.diverged for o in outs),
                    "steps": sum(o.fit.steps for o in outs), "peak": peak_mb()}
        if mode in ("study1", "studyauto", "studytorch"):
            k = {"study1": "1", "studyauto": "auto", "studytorch": str(-(-24 // cores()))}[mode]
            study = load(tmp, epochs, [f"study.batch_runs={k}"])
            chunks = plan_chunks(list(study.jobs), study.settings.batch_runs,
                                           min(study.settings.workers or cores(), len(study.jobs)))
            t0 = time.perf_counter()
            out = study_mod.run(study)
            seconds = time.perf_counter() - t0
            return {"seconds": seconds, "runs": out.finished, "diverged": out.diverged, "failed": len(out.failed),
                    "batches": [len(c) for c in chunks], "peak": peak_mb()}
        # fit only: the training loops, one thread
        torch.set_num_threads(1)
        study = load(tmp, epochs, [])
        cfg = study.jobs[0].cfg
        prices = driver.load_data(cfg)
        fs = features.build(prices.frames, cfg.features, price=cfg.data.price)
        device = torch.device("cpu")

        def model(job):
            training.seed_everything(job.cfg.train.seed)
            return build_model(job.cfg.model, len(fs.names))

        jobs = study.jobs
        warm = dataclasses.replace(cfg.train, epochs=1)
        training.fit(model(jobs[0]), fs.train, fs.val, warm, cfg.clip, device=device)
        t0 = time.perf_counter()
        solo = [training.fit(model(j), fs.train, fs.val, j.cfg.train, j.cfg.clip, device=device, monitor=j.cfg.monitor)
                for j in jobs]
        solo_s = time.perf_counter() - t0
        peak_solo = peak_mb()[0]
        t0 = time.perf_counter()
        batched = training.train_runs([model(j) for j in jobs], fs.train, fs.val, [j.cfg.train for j in jobs],
                                     [j.cfg.clip for j in jobs], device=device, monitor=cfg.monitor)
        batched_s = time.perf_counter() - t0
        steps = sum(r.steps for r in solo)
        return {"solo_s": solo_s, "batched_s": batched_s, "solo_steps": steps,
                "batched_steps": sum(r.steps for r in batched), "peak_solo": peak_solo, "peak": peak_mb(),
                "slots": len(batched) * max(r.steps for r in batched)}
    finally:
        os.chdir(ROOT)
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=15, help="train.epochs of every run (default 15, the spec's)")
    ap.add_argument("--repeats", type=int, default=3, help="readings of each study mode, interleaved (default 3)")
    ap.add_argument("--mode", help=argparse.SUPPRESS)  # one measurement, in a child process
    args = ap.parse_args()
    if args.mode:
        print("RESULT " + json.dumps(measure(args.mode, args.epochs)))
        return
    print(f"data: {'BTC-USD csv from ' + str(DATA) if (DATA / 'BTC-USD.csv').is_file() else 'synthetic'}; "
          f"{os.cpu_count()} cores; load average {os.getloadavg()[0]:.2f}")
    results = {}
    from fincast.models.grouped_lstm import cpu_kernel

    if cpu_kernel() is None:
        sys.exit("the stacked-LSTM kernel could not be built (see the warning above); nothing to compare")
    runs: dict[str, list[dict]] = {}
    # the study modes interleaved and repeated (this kind of VM drifts by 10-30% within minutes); medians below
    order = [m for _ in range(args.repeats) for m in ("plain", "study1", "studyauto", "studytorch")] + ["fit"]
    for i, mode in enumerate(order):
        env = {**os.environ, "FINCAST_LSTM_KERNEL": "python"} if mode == "studytorch" else None
        proc = subprocess.run([sys.executable, __file__, "--mode", mode, "--epochs", str(args.epochs)],
                              capture_output=True, text=True, env=env)
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not line:
            sys.exit(f"{mode} failed:\n{proc.stderr[-3000:]}")
        runs.setdefault(mode, []).append(json.loads(line[0][7:]))
        print(f"  {i + 1}/{len(order)} {mode}: {runs[mode][-1].get('seconds', 0):.1f} s", flush=True)
    results = {}
    for mode, rs in runs.items():
        results[mode] = sorted(rs, key=lambda r: r.get("seconds", 0))[len(rs) // 2]  # the median reading
        results[mode]["all"] = [round(r.get("seconds", 0), 1) for r in rs]
    plain = results["plain"]["seconds"]
    print(f"\n24-run study, {args.epochs} epochs (early stopping on), median of {args.repeats} readings, runs/hour and "
          "ratio to the plain loop:")
    for mode, label in (("plain", "plain loop, one run at a time"), ("study1", "study, batch_runs=1"),
                        ("studyauto", "study, batch_runs=auto (stacked)"),
                        ("studytorch", "study, stacked, torch-ops loops")):
        r = results[mode]
        extra = f", batches {r['batches']}" if "batches" in r else ""
        print(f"  {label:32s} {r['seconds']:7.1f} s  {3600 * r['runs'] / r['seconds']:6.0f} runs/h  "
              f"x{plain / r['seconds']:.2f}   peak RSS {r['peak'][0]:.0f} MB (largest child {r['peak'][1]:.0f} MB)"
              f"{extra}; readings {r['all']}")
    f = results["fit"]
    print(f"\ntraining loop only (1 thread, 24 runs): fit one at a time {f['solo_s']:.1f} s "
          f"({1000 * f['solo_s'] / f['solo_steps']:.2f} ms per run-step), all 24 stacked {f['batched_s']:.1f} s "
          f"({1000 * f['batched_s'] / f['batched_steps']:.2f} ms per run-step): "
          f"x{(f['solo_s'] / f['solo_steps']) / (f['batched_s'] / f['batched_steps']):.2f}; the stack computed "
          f"{f['slots']} run-steps for {f['batched_steps']} that trained ({100 * f['batched_steps'] / f['slots']:.0f}%: "
          "stopped runs keep their slot); "
          f"peak RSS {f['peak_solo']:.0f} MB after the solo fits, {f['peak'][0]:.0f} MB after the batched one")
    ratio = plain / results["studyauto"]["seconds"]
    print(f"\nbatched study vs plain loop: x{ratio:.2f} (target >= 3 on 2 CPU cores: {'yes' if ratio >= 3 else 'NO'}); "
          f"vs the unbatched study: x{results['study1']['seconds'] / results['studyauto']['seconds']:.2f}")


if __name__ == "__main__":
    main()
