"""Benchmark: a stability study at scale, end to end with its report, against the plain loop.

Study (the studies-at-scale issue): pipelines/stability_crypto.yaml's 5 clip configs x 5 learning rates
(0.01, 0.03, 0.1, 0.3, 1.0) x --seeds seeds (default 40: 1,000 runs) of the default model, BTC-USD daily from
../shared/data/crypto (synthetic prices when it is absent; the output says which), 15 epochs with early
stopping, the spec's defaults otherwise (batch_runs=auto, a worker per core).

Each part runs in a fresh process into its own temporary MLflow store (created beforehand, as a user's is):

  plain loop  `runs.driver.train` of an even sample of the study's runs (--plain-sample, default 20), one after
              another, after a 1-epoch warm-up run: what a user without studies does, per run. Its runs/hour
              is the sample's; the whole loop is not run (at ~2 s a run it would take ~40 minutes here). This
              VM's speed drifts by 10-40% over minutes, so half the sample (every other run) is timed before
              the study and half after it, each in its own process; the two halves are printed and summed.
  study       `fincast study` (experiments.study.run) of every run, then `fincast report stability`
              (reports.stability.build) in the same process.

Tracking's share: every public method of MlflowClient is wrapped with a timer in the study's process before
its workers fork (they inherit it; outermost calls only), summed over the processes into a shared counter.
Printed against the workers' time (wall x workers): with every worker busy from start to end, that is the share
of the wall time tracking takes (each worker spends it, side by side); summed over the processes and divided by
one wall time it counts the workers' parallel seconds twice, printed too.

Targets (issue): study runs/hour >= 4 x the plain loop on 2 CPU cores (>= 100 x on one GPU, under 3 minutes on
an H200: not measured here); tracking <= 10% of the wall time; the report < 10 s.
Run: .venv/bin/python bench/study_scale.py [--seeds 40] [--plain-sample 20] [--quick]  (~15 min on 2 cores;
--quick: 4 seeds = 100 runs, 6 plain runs)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = Path(os.environ.get("DATA") or ROOT.parent / "shared" / "data" / "crypto").resolve()  # DATA=dir: elsewhere
LRS = "[0.01, 0.03, 0.1, 0.3, 1.0]"


def load(tmp: Path, seeds: int, extra: list[str] = ()):
    from fincast.experiments import study as study_mod

    data = ["data.source=csv", f"data.path={DATA}"] if (DATA / "BTC-USD.csv").is_file() else ["data.source=synthetic"]
    return study_mod.load(ROOT / "pipelines" / "stability_crypto.yaml", [
        f"matrix.lr={LRS}", f"matrix.seeds={seeds}", "train.epochs=15", *data,
        f"tracking.uri=sqlite:///{tmp}/m.db", f"tracking.artifact_dir={tmp}/art", *extra])


def _fresh_store(tmp: Path) -> None:
    """The store exists, as a user's mlflow.db does after the first run (made by another process: a study's
    driver must not fork workers with the store open)."""
    subprocess.run([sys.executable, "-c", "import sys; from fincast import tracking; tracking.open_store(sys.argv[1])",
                    f"sqlite:///{tmp}/m.db"], check=True, cwd=ROOT)


def _mlflow_methods() -> list[str]:
    from mlflow.tracking import MlflowClient

    return sorted(n for n, fn in vars(MlflowClient).items() if callable(fn) and not n.startswith("_"))


def _time_mlflow(spent) -> None:
    """Wrap MlflowClient's public methods: outermost calls add their seconds and a count to ``spent`` (an
    mp.Array: [seconds, calls] per method of ``_mlflow_methods()``)."""
    from mlflow.tracking import MlflowClient

    depth = [0]

    def wrap(i, fn):
        def timed(*args, **kwargs):
            depth[0] += 1
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                depth[0] -= 1
                if depth[0] == 0:
                    with spent.get_lock():
                        spent[2 * i] += time.perf_counter() - t0
                        spent[2 * i + 1] += 1
        return timed

    for i, name in enumerate(_mlflow_methods()):
        setattr(MlflowClient, name, wrap(i, getattr(MlflowClient, name)))


def measure(part: str, seeds: int, sample: int, extra: list[str] = ()) -> dict:
    from fincast.runs import driver

    tmp = Path(tempfile.mkdtemp(prefix=f"fincast-bench-scale-{part}-"))
    os.chdir(tmp)
    _fresh_store(tmp)
    try:
        study = load(tmp, seeds, extra)
        if part.startswith("plain"):  # plain0, plain1: the even or odd picks of the sample
            jobs = study.jobs
            picks = [jobs[round(i * (len(jobs) - 1) / max(1, sample - 1))] for i in range(sample)]
            picks = picks[int(part[-1])::2]
            first = jobs[0].cfg
            driver.train(dataclasses.replace(first, train=dataclasses.replace(first.train, epochs=1)))
            t0 = time.perf_counter()
            outs = [driver.train(j.cfg, tags=j.tags(study.name)) for j in picks]
            return {"seconds": time.perf_counter() - t0, "runs": len(outs), "steps": sum(o.fit.steps for o in outs)}
        from fincast.experiments import study as study_mod
        from fincast.reports import stability
        from fincast.runs.setup import cores

        names = _mlflow_methods()
        spent = mp.Array("d", 2 * len(names))
        _time_mlflow(spent)
        t0 = time.perf_counter()
        out = study_mod.run(study)
        study_s = time.perf_counter() - t0
        tracked_study = sum(spent[0::2])
        calls = sorted(((spent[2 * i], int(spent[2 * i + 1]), n) for i, n in enumerate(names) if spent[2 * i + 1]),
                       reverse=True)
        t0 = time.perf_counter()
        report = stability.build(study.name, tracking_uri=f"sqlite:///{tmp}/m.db", out_dir=tmp / "reports")
        report_s = time.perf_counter() - t0
        return {"seconds": study_s, "report_s": report_s, "runs": out.finished, "failed": len(out.failed),
                "diverged": out.diverged, "tracking_s": tracked_study, "workers": study.settings.workers or cores(),
                "report_runs": report.runs, "calls": calls[:8]}
    finally:
        os.chdir(ROOT)
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=40, help="seeds per cell (default 40: 5 x 5 x 40 = 1,000 runs)")
    ap.add_argument("--plain-sample", type=int, default=20, help="plain-loop runs timed (default 20)")
    ap.add_argument("--quick", action="store_true", help="4 seeds (100 runs), 6 plain runs")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a study or pipeline key for both parts (repeatable), e.g. --set tracking.metric_every=50")
    ap.add_argument("--part", help=argparse.SUPPRESS)  # one measurement, in a child process
    args = ap.parse_args()
    if args.quick:
        args.seeds, args.plain_sample = 4, 6
    if args.part:
        print("RESULT " + json.dumps(measure(args.part, args.seeds, args.plain_sample, args.set)))
        return
    print(f"data: {'BTC-USD csv from ' + str(DATA) if (DATA / 'BTC-USD.csv').is_file() else 'synthetic'}; "
          f"{os.cpu_count()} cores; load average {os.getloadavg()[0]:.2f}"
          + (f"; --set {' '.join(args.set)}" if args.set else ""))
    res = {}
    for part in ("plain0", "study", "plain1"):
        proc = subprocess.run([sys.executable, __file__, "--part", part, "--seeds", str(args.seeds),
                               "--plain-sample", str(args.plain_sample), *[f"--set={x}" for x in args.set]],
                              capture_output=True, text=True)
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not line:
            sys.exit(f"{part} failed:\n{proc.stderr[-3000:]}")
        res[part] = json.loads(line[-1][len("RESULT "):])
    halves, study = (res["plain0"], res["plain1"]), res["study"]
    plain = {k: sum(h[k] for h in halves) for k in ("seconds", "runs", "steps")}
    plain_rph = 3600 * plain["runs"] / plain["seconds"]
    study_rph = 3600 * study["runs"] / (study["seconds"] + study["report_s"])
    share_workers = study["tracking_s"] / (study["seconds"] * study["workers"])
    share_wall = study["tracking_s"] / study["seconds"]
    print(f"plain loop: {plain['runs']} runs in {plain['seconds']:.1f} s ({plain['seconds'] / plain['runs']:.2f} s a run, "
          f"{plain['steps'] / plain['runs']:.0f} steps a run; before the study {halves[0]['seconds'] / halves[0]['runs']:.2f} "
          f"s a run, after it {halves[1]['seconds'] / halves[1]['runs']:.2f}): {plain_rph:,.0f} runs/h")
    print(f"study: {study['runs']} runs ({study['diverged']} diverged, {study['failed']} failed) in "
          f"{study['seconds']:.1f} s + report {study['report_s']:.1f} s ({study['report_runs']} runs): "
          f"{study_rph:,.0f} runs/h")
    print(f"study / plain loop: x{study_rph / plain_rph:.2f} runs per hour  (target >= 4 on 2 CPU cores: "
          f"{'yes' if study_rph >= 4 * plain_rph else 'NO'})")
    print(f"tracking (MlflowClient calls, all processes): {study['tracking_s']:.1f} s = {100 * share_workers:.1f}% of "
          f"the workers' time ({study['workers']} x wall): the share of the wall time it takes, the workers being busy "
          f"throughout (target <= 10%: {'yes' if share_workers <= 0.10 else 'NO'}); summed over the processes it is "
          f"{100 * share_wall:.1f}% of one wall time")
    print("  by call: " + ", ".join(f"{n} {sec:.1f} s / {k} calls" for sec, k, n in study["calls"]))
    print(f"report: {study['report_s']:.1f} s  (target < 10 s: {'yes' if study['report_s'] < 10 else 'NO'})")


if __name__ == "__main__":
    main()
