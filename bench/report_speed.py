"""Benchmark: time to build the stability report of a large study (fincast.reports.stability.build).

Targets (issues): the report for 100 runs x 2000 steps takes < 10 s; for a 1,000-run study (--runs 1000 --steps 700)
< 10 s.

The study is fabricated, not trained, in a temporary MLflow store (sqlite:///<tmp>/mlflow.db, deleted at the
end unless --keep): pipelines/stability_crypto.yaml's grid sized by --runs (default 100 = its 5 clip configs x
4 learning rates 0.1, 0.3, 1, 3 x 5 seeds), expanded by fincast.study.load so runs carry the real config
hashes, tags (Job.tags + mlflow.parentRunId), run names and params. One parent run (tags fincast.study and
study_role=parent, study.run's parameters, study.yaml and plan.json artifacts) and --runs FINISHED child
runs with, as a real run logs them: per step train/loss, grad/norm_pre, grad/norm_post, grad/clipped,
grad/clip_fraction, lr; grad/threshold when it changes (one point for norm, every step for autoclip and
zclip); grad/spikes when it changes; per-layer norms and update ratios every 50 steps; val/loss, val/rmse,
val/mae, val/directional_accuracy and epoch every 100 steps; and at the end test/*, baseline_naive/*,
baseline_ridge/*, best_val_loss, time/step_ms, grad/clip_rate. At the highest learning rates some runs
diverge: non-finite (tag fincast.diverged=true, losses blowing up to nan, the run stops there) or finite
but with a final validation loss far above the zero forecast's.

Runs, params, tags, the validation and final metrics are created through MlflowClient (its public API); the
per-step series go into one series file per stack of STACK runs on the parent run (``series/<first run
id>.parquet``, ``fincast.tracking.series``), as a study stores them, all in a child process, so the timed
process opens the store for the first time when the report does, as a user's `fincast report` would. After
the timing the script checks that the report's histories (``StudyStore.histories``) and
``get_run().data.metrics`` return exactly the values fabricated.

Timed: the first stability.build(study, tracking_uri=..., out_dir=<tmp>, log_to_mlflow=True) in this process
(after imports), with a breakdown by phase (the phases' functions wrapped with timers during that call),
then StudyStore.histories alone once more.
Run: .venv/bin/python bench/report_speed.py   (fabricating 100 x 2000 takes well under a minute; --quick: 20
runs x 300 steps)
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import json
import math
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mlflow.tracking import MlflowClient  # noqa: E402

import fincast  # noqa: E402
from fincast import config as config_mod  # noqa: E402
from fincast import tracking  # noqa: E402
from fincast.clipping import label as clip_label  # noqa: E402
from fincast.experiments import study as study_mod  # noqa: E402
from fincast.reports import stability  # noqa: E402
from fincast.tracking import series as series_mod  # noqa: E402

SPEC = ROOT / "pipelines" / "stability_crypto.yaml"
LRS = [0.1, 0.3, 1.0, 3.0]
TARGET_S = 10.0
EPOCH_STEPS, MONITOR_EVERY, LOG_EVERY, STEP_MS = 100, 50, 50, 3
STACK = 8  # runs per stack (one series file each)
PER_STEP = {"train/loss": "loss", "grad/norm_pre": "norm_pre", "grad/norm_post": "norm_post",
            "grad/clipped": "clipped", "grad/clip_fraction": "clip_fraction", "lr": "lr"}
LAYERS = ("lstm.l0", "head")  # the default LSTM's layers, as the monitor names them
NAIVE_VAL = 0.9731  # the zero forecast's validation loss (training units): a property of the data, one value
NAIVE = {"rmse": 0.0352, "mae": 0.0241, "directional_accuracy": 0.5}
RIDGE = {"rmse": 0.0354, "mae": 0.0243, "directional_accuracy": 0.51}


def grid(runs: int) -> tuple[int, int, int]:
    """(clip configs, learning rates, seeds) with that many runs: 5 seeds if possible, then the widest grid."""
    options = [(c, n_lr, runs // (c * n_lr)) for c, n_lr in itertools.product(range(5, 1, -1), range(4, 0, -1))
               if runs % (c * n_lr) == 0 and runs // (c * n_lr) >= study_mod.MIN_SEEDS]
    if not options:
        raise SystemExit(f"--runs {runs}: expected (2 to 5 clip configs) x (1 to 4 learning rates) x (at least "
                         f"{study_mod.MIN_SEEDS} seeds), e.g. 20, 60 or 100")
    return min(options, key=lambda g: (g[2] != 5, -g[0] * g[1], -g[1]))


def load_study(runs: int, tmp: Path) -> study_mod.Study:
    n_clips, n_lr, seeds = grid(runs)
    clips = config_mod.read_yaml(SPEC)["matrix"]["clip"][:n_clips]
    return study_mod.load(SPEC, [f"matrix.clip={json.dumps(clips)}", f"matrix.lr={json.dumps(LRS[-n_lr:])}",
                                 f"matrix.seeds={seeds}", "data.source=synthetic", f"tracking.uri={uri_of(tmp)}",
                                 f"tracking.artifact_dir={tmp / 'mlartifacts'}"])


def uri_of(tmp: Path) -> str:
    return f"sqlite:///{tmp / 'mlflow.db'}"


# ---------------------------------------------------------------------------------------------
# One run's metrics (deterministic in the run's index, so the check can regenerate them)
# ---------------------------------------------------------------------------------------------


def fake_run(index: int, job: study_mod.Job, steps: int, lrs: list[float], start_ms: int):
    """({key: (steps, values)}, tags logged at the end, end time in ms, timestamp of a step (function))."""
    rng = np.random.default_rng([index, 2024])
    clip = job.cfg.clip
    method = clip.method
    top, second = job.lr == max(lrs), len(lrs) > 1 and job.lr == sorted(lrs)[-2]
    p_nonfinite = {"none": 0.8, "norm": 0.0 if method == "norm" and clip.norm.max_norm < 0.5 else 0.2,
                   "zclip": 0.4}.get(method, 0.2) if top else (0.2 if second and method == "none" else 0.0)
    nonfinite = rng.random() < p_nonfinite
    exploded = top and not nonfinite and rng.random() < 0.3
    n = int(rng.integers(steps // 10, steps)) + 1 if nonfinite else steps
    t = np.arange(1, n + 1)

    pre = 0.5 * (job.lr / 0.1) ** 0.3 * np.exp(0.5 * rng.standard_normal(n))
    spike = rng.random(n) < 0.01
    pre[spike] *= rng.uniform(5, 20, int(spike.sum()))
    loss = (0.95 + 0.3 * np.exp(-t / (steps / 5))) * np.exp(0.3 * rng.standard_normal(n))
    if exploded:
        loss *= 1 + 4 * t / steps
    if nonfinite:  # blows up over the last steps, then nan (the run stops at that step)
        k = min(50, n - 1)
        ramp = np.logspace(0, 8, k)
        loss[n - 1 - k:n - 1] *= ramp
        pre[n - 1 - k:n - 1] *= ramp
        loss[-1], pre[-1] = math.nan, math.inf
    finite_pre = np.where(np.isfinite(pre), pre, 0.0)
    if method == "none":
        thr = None
    elif method == "norm":
        thr = np.full(n, float(clip.norm.max_norm))
    elif method == "zclip":
        mean = np.cumsum(finite_pre) / t
        var = np.maximum(np.cumsum(finite_pre**2) / t - mean**2, 0.0)
        thr = mean + clip.zclip.z_thresh * np.sqrt(var)
    else:  # autoclip and the rest: a running statistic that changes every step
        thr = 0.8 * np.cumsum(finite_pre) / t
    post = pre.copy() if thr is None else np.minimum(pre, thr)
    clipped = np.zeros(n) if thr is None else (pre > thr).astype(float)
    with np.errstate(invalid="ignore"):
        frac = np.where(clipped > 0, 1 - post / pre, 0.0)
    if nonfinite:
        post[-1], frac[-1] = math.nan, math.nan
    lr = job.lr * np.minimum(1.0, t / 100) * 0.5 * (1 + np.cos(np.pi * t / steps))

    series = {"train/loss": (t, loss), "grad/norm_pre": (t, pre), "grad/norm_post": (t, post),
              "grad/clipped": (t, clipped), "grad/clip_fraction": (t, frac), "lr": (t, lr),
              "threshold (every step)": (t, np.full(n, np.nan) if thr is None else thr)}
    if method == "norm":
        series["grad/threshold"] = (t[:1], thr[:1])  # constant: one point
    elif thr is not None:
        series["grad/threshold"] = (t, thr)
    counts = np.cumsum(spike).astype(float)
    changed = np.r_[0, np.nonzero(np.diff(counts))[0] + 1]
    series["grad/spikes"] = (t[changed], counts[changed])
    ms = np.arange(MONITOR_EVERY, n + 1, MONITOR_EVERY)
    for scale, name in zip((0.9, 0.4), LAYERS, strict=True):
        series[f"grad/layer/{name}"] = (ms, scale * pre[ms - 1])
        series[f"update/ratio/{name}"] = (ms, 1e-3 * job.lr * np.exp(0.3 * rng.standard_normal(len(ms))))
    ends = [min((e + 1) * EPOCH_STEPS, steps) for e in range(math.ceil(steps / EPOCH_STEPS))]
    ve = np.array([s for s in ends if s < n or (s == n and not nonfinite)], dtype=np.int64)
    val = NAIVE_VAL * (0.99 + 0.05 * np.exp(-ve / (steps / 4)) + 0.01 * rng.standard_normal(len(ve)))
    if exploded:
        val *= 1 + 4 * ve / steps
    series["val/loss"] = (ve, val)
    series["val/rmse"] = (ve, NAIVE["rmse"] * np.sqrt(val / NAIVE_VAL))
    series["val/mae"] = (ve, 0.7 * NAIVE["rmse"] * np.sqrt(val / NAIVE_VAL))
    series["val/directional_accuracy"] = (ve, 0.5 + 0.02 * rng.standard_normal(len(ve)))
    series["epoch"] = (ve, np.arange(1, len(ve) + 1, dtype=float))

    final: dict[str, float] = {}
    if len(ve):  # weights from an epoch that validated finitely: test metrics
        factor = 1.5 if exploded else 1.0 + 0.01 * rng.standard_normal()
        final |= {"test/rmse": NAIVE["rmse"] * factor, "test/mae": NAIVE["mae"] * factor,
                  "test/directional_accuracy": 0.5 + 0.02 * rng.standard_normal()}
        final["best_val_loss"] = float(val.min())
    final |= {f"baseline_naive/{k}": v for k, v in NAIVE.items()}
    final |= {f"baseline_ridge/{k}": v for k, v in RIDGE.items()}
    final |= {"time/step_ms": STEP_MS * (1.0 if method == "none" else 1.02) * (1 + 0.05 * rng.standard_normal()),
              "baseline_naive/val_loss": NAIVE_VAL, "grad/clip_rate": float(clipped.mean())}
    for k, v in final.items():
        series[k] = (np.array([n]), np.array([v]))
    series = {k: sv for k, sv in series.items() if len(sv[0])}  # e.g. no validation before a short run diverged

    end_ms = start_ms + 1500 + n * STEP_MS + 800

    def stamp(key: str, s: np.ndarray) -> np.ndarray:  # per-step rows go in batches of LOG_EVERY steps
        if key in final:
            return np.full(len(s), end_ms)
        return start_ms + 1500 + ((s + LOG_EVERY - 1) // LOG_EVERY) * LOG_EVERY * STEP_MS

    tags = {"fincast.diverged": str(nonfinite).lower(), "fincast.stop_reason": "diverged" if nonfinite else "epochs"}
    if nonfinite:
        tags |= {"fincast.diverged_step": str(n), "fincast.diverged_reason": "non-finite training loss (nan)"}
    return series, tags, end_ms, stamp


# ---------------------------------------------------------------------------------------------
# Fabricating the store (in a child process)
# ---------------------------------------------------------------------------------------------


def fabricate(runs: int, steps: int, tmp: str) -> None:
    t0 = time.perf_counter()
    tmp_path = Path(tmp)
    study = load_study(runs, tmp_path)
    store = tracking.StudyStore(study.tracking, study.name)
    client = store.client
    parent = store.parent_run(params=study_mod.parent_params(study))
    with tempfile.TemporaryDirectory() as d:  # as study.run logs them
        spec, plan = Path(d) / "study.yaml", Path(d) / "plan.json"
        spec.write_text(yaml.safe_dump(study.raw, sort_keys=False))
        plan.write_text(json.dumps([{"cell": j.cell, "group": j.group, "clip": j.clip, "lr": j.lr, "seed": j.seed,
                                     "axes": dict(j.axes), "hash": j.hash} for j in study.jobs], indent=1))
        parent.log_artifact(spec)
        parent.log_artifact(plan)
    lrs = sorted({j.lr for j in study.jobs})
    start0 = int(time.time() * 1000) - 3_600_000
    manifest, values, nonfinite, stack = {}, 0, 0, []
    kept = study_mod.keeping(study).params
    for i, job in enumerate(study.jobs):
        start_ms = start0 + i * 10_000
        fake, end_tags, end_ms, _ = fake_run(i, job, steps, lrs, start_ms)
        tags = {"fincast.version": fincast.__version__, "fincast.git_commit": "bench", "fincast.data_source":
                "synthetic", "fincast.data_fingerprint": "bench", "fincast.tickers": ",".join(job.cfg.data.tickers),
                "fincast.device": "cpu", "fincast.precision": "fp32", "fincast.threads": "1",
                "fincast.world_size": "1", "fincast.clip": clip_label(job.cfg.clip), "fincast.pipeline": job.cfg.name,
                **job.tags(study.name), "mlflow.parentRunId": parent.run_id}
        run = client.create_run(store.experiment_id, start_time=start_ms, tags=tags,
                                run_name=job.cfg.tracking.run_name)
        rid = run.info.run_id
        r = tracking.Run(client, rid, store.uri)
        flat = config_mod.flatten(config_mod.to_dict(job.cfg))
        r.log_params({k: v for k, v in flat.items() if k in kept})  # as a study logs them (study.keeping)
        r.log_params({"data.rows": 3900, "samples.train": 2700, "samples.val": 580, "samples.test": 580,
                      "model.parameters": 5409})
        # MLflow: what is not per step (validations, the final metrics); the series file: every step
        r.log_metrics([(k, float(v), int(st)) for k, (ss, vv) in fake.items()
                       if in_mlflow(k)
                       for st, v in zip(ss, vv)])
        t_steps, _ = fake["train/loss"]
        history = {col: fake[key][1] for key, col in PER_STEP.items()} | {"threshold": fake["threshold (every step)"][1]}
        stack.append(series_mod.frame(rid, history, list(fake["val/loss"][0]) if "val/loss" in fake else [],
                                      list(fake["val/loss"][1]) if "val/loss" in fake else []))
        values += len(t_steps) * len(series_mod.HISTORY)
        if len(stack) == STACK or i == len(study.jobs) - 1:
            with tempfile.TemporaryDirectory() as d:
                path = series_mod.write(stack, Path(d) / f"{stack[0]['run_id'].iloc[0]}.parquet")
                parent.log_artifact(path, series_mod.FOLDER)
            stack = []
        r.set_tags(end_tags)
        client.set_terminated(rid, "FINISHED", end_time=end_ms)
        manifest[rid] = i
        nonfinite += end_tags["fincast.diverged"] == "true"
    parent.set_tags({"fincast.study_runs": len(study.jobs), "fincast.study_failed": 0})
    parent.end("FINISHED")
    (tmp_path / "manifest.json").write_text(json.dumps({
        "name": study.name, "runs": manifest, "values": values, "nonfinite": nonfinite,
        "seconds": time.perf_counter() - t0}))


# ---------------------------------------------------------------------------------------------
# Timing and checking (in this process)
# ---------------------------------------------------------------------------------------------


class Phases:
    """Wraps functions (module or class attributes) with timers for the duration of a `with`."""

    def __init__(self, targets: list[tuple[object, str, str]]):
        self.targets = targets
        self.seconds: dict[str, float] = defaultdict(float)
        self.results: dict[str, object] = {}

    def _wrap(self, fn, label: str):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                out = fn(*args, **kwargs)
            finally:
                self.seconds[label] += time.perf_counter() - t0
            self.results[label] = out
            return out
        return timed

    @contextlib.contextmanager
    def active(self):
        saved = [(obj, attr, getattr(obj, attr)) for obj, attr, _ in self.targets]
        for (obj, attr, label), (_, _, fn) in zip(self.targets, saved, strict=True):
            setattr(obj, attr, self._wrap(fn, label))
        try:
            yield self
        finally:
            for obj, attr, fn in saved:
                setattr(obj, attr, fn)


def in_mlflow(key: str) -> bool:
    """Whether the fabricated store has this series in MLflow (validations, final metrics, spike counts) rather
    than only in the series files (per-step series)."""
    return key not in PER_STEP and key not in ("grad/threshold", "threshold (every step)") \
        and not key.startswith(("grad/layer/", "update/ratio/"))


def summary_parent(store: tracking.StudyStore) -> str:
    return store.runs("parent")[-1].info.run_id


def check(uri: str, study: study_mod.Study, manifest: dict, steps: int) -> tuple[list[str], int]:
    """Compare what MLflow returns with what was inserted, for a few runs (first, last, a non-finite one, one
    with a per-step threshold). Returns the problems found and how many runs were checked."""
    client = MlflowClient(tracking_uri=uri)
    lrs = sorted({j.lr for j in study.jobs})
    by_index = {i: rid for rid, i in manifest["runs"].items()}
    picks = {0, len(by_index) - 1}
    for rid, i in manifest["runs"].items():
        run = client.get_run(rid)
        if run.data.tags.get("fincast.diverged") == "true":
            picks.add(i)
            break
    picks.add(next((i for i, j in enumerate(study.jobs) if j.cfg.clip.method in ("autoclip", "zclip")), 0))
    problems = []
    for i in sorted(picks):
        rid, job = by_index[i], study.jobs[i]
        series, *_ = fake_run(i, job, steps, lrs, 0)
        got_latest = client.get_run(rid).data.metrics
        logged = {k for k in series if in_mlflow(k)}
        if set(got_latest) != logged:
            problems.append(f"run {i}: get_run metrics keys differ: {sorted(set(got_latest) ^ logged)}")
        store = tracking.StudyStore(study.tracking, study.name, create=False)
        parent = store.runs("parent")[-1].info.run_id
        hists = store.histories(parent, [rid], [*PER_STEP, "val/loss"])
        for key in [*PER_STEP, "val/loss"]:
            s, want = series.get(key, (np.array([], dtype=np.int64), np.array([])))
            bs, bv = hists[key].get(rid, (np.array([]), np.array([])))
            if not (np.array_equal(bs, s) and np.array_equal(bv, want, equal_nan=True)):
                problems.append(f"run {i} {key}: StudyStore.histories differs ({len(bs)} points, {len(s)} made)")
        for key in logged:
            last, want = got_latest.get(key), series[key][1][-1]
            if last is None or not (last == want or (math.isnan(last) and math.isnan(want))):
                problems.append(f"run {i} {key}: get_run().data.metrics = {last}, logged latest {want}")
    return problems, len(picks)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=100, help="finished child runs (default 100 = 5 x 4 x 5)")
    ap.add_argument("--steps", type=int, default=2000, help="training steps per run (default 2000)")
    ap.add_argument("--quick", action="store_true", help="20 runs x 300 steps")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (store, report)")
    args = ap.parse_args()
    if args.quick:
        args.runs, args.steps = 20, 300
    if args.steps < 100:
        ap.error("--steps: at least 100 (one validation per 100 steps)")
    grid(args.runs)  # a bad --runs fails before any work

    tmp = Path(tempfile.mkdtemp(prefix="fincast-bench-report-"))
    cwd = os.getcwd()
    os.chdir(tmp)  # anything written to a relative path lands here
    try:
        proc = mp.get_context("spawn").Process(target=fabricate, args=(args.runs, args.steps, str(tmp)))
        proc.start()
        proc.join()
        if proc.exitcode != 0:
            raise SystemExit(f"fabricating the study failed (exit code {proc.exitcode})")
        manifest = json.loads((tmp / "manifest.json").read_text())
        study = load_study(args.runs, tmp)
        uri = uri_of(tmp)
        n_clips, n_lr, seeds = grid(args.runs)
        print(f"fabricated study {manifest['name']!r}: {len(manifest['runs'])} runs ({n_clips} clip configs x {n_lr} "
              f"learning rates x {seeds} seeds), {args.steps} steps each, {manifest['nonfinite']} of them non-finite "
              f"(stopped early); {manifest['values']:,} metric values; store "
              f"{(tmp / 'mlflow.db').stat().st_size / 2**20:.0f} MiB; made in {manifest['seconds']:.1f} s "
              "(not timed)")

        phases = Phases([
            (tracking.StudyStore, "__init__", "open store"),
            (tracking.StudyStore, "runs", "find runs (search_runs)"),
            (tracking.StudyStore, "download", "plan.json"),
            (tracking.StudyStore, "histories", "series files (histories)"),
            (stability, "comparisons", "statistics"),
            (stability, "_figures", "figures"),
            (stability, "_html", "html"),
            (MlflowClient, "log_artifact", "log artifacts"),
        ])
        with phases.active():
            t0 = time.perf_counter()
            report = stability.build(manifest["name"], tracking_uri=uri, out_dir=tmp / "reports", log_to_mlflow=True)
            build_s = time.perf_counter() - t0
        hist = phases.results["series files (histories)"]
        hist_values = sum(len(v) for per_run in hist.values() for _, v in per_run.values())
        t0 = time.perf_counter()
        again = tracking.StudyStore(study.tracking, manifest["name"], create=False)
        again.histories(summary_parent(again), list(manifest["runs"]), stability.STEP_KEYS)
        hist_again = time.perf_counter() - t0
        summary = json.loads((tmp / "reports" / manifest["name"] / "summary.json").read_text())
        problems, checked = check(uri, study, manifest, args.steps)
    finally:
        os.chdir(cwd)
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    diverged = sum(r["diverged"] for r in summary["runs"])
    print(f"report: {report.runs} runs, {diverged} counted as diverged (non-finite or val loss > "
          f"{summary['settings']['divergence_factor']:g} x the zero forecast's), {len(summary['cells'])} cells")
    print()
    print(f"runs {report.runs}, steps {args.steps}: stability.build {build_s:.2f} s  (target < {TARGET_S:g} s: "
          f"{'yes' if build_s < TARGET_S else 'NO'}; first call in this process, the store not opened here before)")
    other = build_s - sum(phases.seconds.values())
    for _, _, label in phases.targets:
        extra = f"  ({hist_values:,} values of {', '.join(stability.STEP_KEYS)})" if label.startswith("series") \
            else ""
        print(f"  {label:<25}{phases.seconds.get(label, 0.0):7.2f} s{extra}")
    print(f"  {'other (tables, json)':<25}{other:7.2f} s")
    print(f"StudyStore.histories alone, again: {hist_again:.2f} s")
    if problems:
        print(f"CHECK FAILED: the store does not return what was fabricated ({len(problems)} problems):")
        for p in problems[:20]:
            print(f"  {p}")
    else:
        print("check: StudyStore.histories (the series files) and get_run().data.metrics return exactly the "
              f"fabricated values ({checked} runs, every key)")


if __name__ == "__main__":
    main()
