"""Command line (layer L4): ``fincast train|resume|data|study|sweep|advise-clip|report|backtest|keys``, also as ``python -m fincast`` (what torchrun
launches). Heavy imports (torch, mlflow) happen inside the
commands, so ``--help`` answers at once."""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from pathlib import Path

from fincast import config as config_mod
from fincast.config import FincastError

EXAMPLES = """examples:
  fincast train pipelines/price_equities.yaml
  fincast train pipelines/price_crypto.yaml --set data.source=csv --set data.path=../shared/data/crypto
  fincast train pipelines/price_crypto.yaml --set data.source=synthetic --set clip.method=none
  fincast train pipelines/price_equities.yaml --set data.tickers=[SPY,QQQ] --set train.lr=3e-3
  fincast train pipelines/price_equities.yaml --set clip.method=zclip --set clip.zclip.z_thresh=3
  fincast resume 3f2a...c9 --set train.epochs=60
  fincast train pipelines/price_equities.yaml --resume 3f2a...c9
  torchrun --nproc_per_node=2 -m fincast train pipelines/price_equities.yaml
  fincast data pipelines/price_equities.yaml
  fincast study pipelines/stability_crypto.yaml --set data.source=synthetic
  fincast report stability --study stability_crypto
  fincast sweep pipelines/sweep_crypto.yaml --set data.source=synthetic
  fincast advise-clip pipelines/price_crypto.yaml --set data.source=synthetic --set train.optimizer=sgd
  fincast backtest pipelines/backtest_crypto.yaml --set data.source=csv --set data.path=../shared/data/crypto
  fincast keys
"""

SWEEP_EXAMPLES = """examples:
  fincast sweep pipelines/sweep_crypto.yaml --set data.source=csv --set data.path=../shared/data/crypto
  fincast sweep pipelines/sweep_crypto.yaml --set data.source=synthetic --set sweep.sampler=grid
  fincast sweep pipelines/sweep_crypto.yaml --set sweep.sampler=random --set sweep.trials=50 --set sweep.workers=2
  fincast sweep pipelines/sweep_crypto.yaml --set sweep.range=advised --dry-run
  fincast sweep pipelines/sweep_crypto.yaml --set data.source=synthetic        # again: resumes where it stopped

one sweep on several machines (a database both reach, and an MLflow server):
  export MLFLOW_TRACKING_URI=http://mlflow-host:5000
  fincast sweep pipelines/sweep_crypto.yaml --storage postgresql://user:pw@db-host/optuna     # machine 1
  fincast sweep pipelines/sweep_crypto.yaml --storage postgresql://user:pw@db-host/optuna --join sweep_crypto
                                                                              # machines 2, 3, ... (same spec, data)
"""

ADVISE_EXAMPLES = """examples:
  fincast advise-clip pipelines/price_crypto.yaml --set data.source=csv --set data.path=../shared/data/crypto
  fincast advise-clip pipelines/price_crypto.yaml --set data.source=synthetic --set train.optimizer=sgd --set train.lr=1
  fincast advise-clip pipelines/options_synthetic.yaml --steps 500 --percentile 25
"""

BACKTEST_EXAMPLES = """examples:
  fincast backtest pipelines/backtest_crypto.yaml --set data.source=csv --set data.path=../shared/data/crypto
  fincast backtest pipelines/backtest_equities.yaml --set data.source=csv --set data.path=../shared/data/equities
  fincast backtest pipelines/backtest_crypto.yaml --set data.source=synthetic
  fincast backtest pipelines/price_equities.yaml --set backtest.start=2015-01-01 --set backtest.window=756
  fincast backtest pipelines/backtest_crypto.yaml --set 'backtest.clips=[none, {method: norm, norm: {max_norm: 0.25}}, zclip]'
  fincast backtest pipelines/backtest_crypto.yaml --set backtest.position=vol_target --set backtest.cost_bps=10
"""

STUDY_EXAMPLES = """examples:
  fincast study pipelines/stability_crypto.yaml --set data.source=synthetic
  fincast study pipelines/stability_crypto.yaml --set data.source=csv --set data.path=../shared/data/crypto
  fincast study pipelines/stability_equities.yaml --set matrix.seeds=3 --set study.workers=2
  fincast study pipelines/stability_crypto.yaml --dry-run
  fincast report stability --study stability_crypto
"""

SET_HELP = ("override a config key, repeatable: --set train.lr=3e-3 --set data.tickers=[BTC-USD,ETH-USD]; "
            "run `fincast keys` for every key")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fincast",
        description="Train LSTM forecasters on market data with configurable gradient clipping, tracked in MLflow.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"fincast {_version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    t = sub.add_parser(
        "train", help="train one model from a pipeline spec and log it to MLflow",
        description="Load data, build features, train an LSTM with the configured gradient clipping, evaluate it "
                    "on the test split beside the naive (zero-return) and ridge baselines, and log params, "
                    "per-step metrics, artifacts and the model to MLflow. Prints the run id and a summary. "
                    "Exit status: 0 when the run finished (a diverged run is a recorded result, not a failure), "
                    "2 for bad config or data, 130 when interrupted.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("pipeline", help="pipeline spec (YAML), e.g. pipelines/price_equities.yaml")
    _add_set(t, SET_HELP)
    t.add_argument("--resume", metavar="RUN_ID", default=None,
                   help="continue this run from its last checkpoint instead of starting a new one; the spec with "
                        "its --set overrides must resolve to the run's config (only train.epochs, max_steps, "
                        "patience, threads, checkpoint_every and tracking.log_every may differ)")
    t.add_argument("--checkpoint-dir", default=None,
                   help="with --resume: where the checkpoint is (default: the spec's train.checkpoint_dir)")
    t.add_argument("--skip-missing-data", action="store_true",
                   help="exit 0 with a message, instead of failing, when the spec's local CSV data (data.path, "
                        "options.path, options.aux_path) are absent (make train-options runs the real-chain spec so)")
    t.add_argument("-q", "--quiet", action="store_true", help="no progress bars or warnings, summary only (for CI)")

    r = sub.add_parser(
        "resume", help="continue a run from its last checkpoint, into the same MLflow run",
        description="Continue a run exactly where its last checkpoint left it (saved at each epoch end, and every "
                    "train.checkpoint_every steps, in train.checkpoint_dir/<run id>.pt): same data (checked), "
                    "weights, optimizer, learning-rate schedule, GradScaler, clipper state (AutoClip history, "
                    "ZClip EMAs), data order and RNG. Metrics continue in the same MLflow run. Only "
                    "train.epochs, train.max_steps, train.patience, train.threads, train.checkpoint_every and "
                    "tracking.log_every may be changed with --set.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("run_id", help="the MLflow run id printed by `fincast train`")
    _add_set(r, "e.g. --set train.epochs=60 to train longer")
    r.add_argument("--checkpoint-dir", default="checkpoints", help="where the checkpoint is (default: checkpoints)")
    r.add_argument("-q", "--quiet", action="store_true", help="no progress bars or warnings, summary only")

    d = sub.add_parser(
        "data", help="fetch or refresh the data cache only (no training)",
        description="Fetch the pipeline's tickers into the cache (yfinance source), or check the CSV/synthetic "
                    "source, and print what each ticker holds. For yfinance the missing tail is fetched even when "
                    "the cache is fresh, unless --no-refresh.")
    d.add_argument("pipeline", help="pipeline spec (YAML)")
    _add_set(d, SET_HELP)
    d.add_argument("--no-refresh", action="store_true", help="use a fresh cache as is (no network call)")
    d.add_argument("-q", "--quiet", action="store_true", help="no progress bars")

    st = sub.add_parser(
        "study", help="run a stability study: clip configs x learning rates x seeds, in parallel workers",
        description="Expand a study spec (pipelines/stability_*.yaml: a base pipeline, a matrix of clip configs, "
                    "learning rates, seeds and optional axes) and train every run in study.workers parallel "
                    "processes, runs of one architecture stacked into batches trained as one model "
                    "(study.batch_runs: auto, K, or 1), each an MLflow child run of one parent run named after the study. Rerunning the "
                    "same command skips finished runs (matched by a hash of their resolved config) and redoes "
                    "killed or failed ones. A diverged run is a result, not a failure. Exit status: 0 when every "
                    "run finished, 1 when some failed (rerun to retry them), 2 for bad specs or data.",
        epilog=STUDY_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    st.add_argument("spec", help="study spec (YAML), e.g. pipelines/stability_crypto.yaml")
    _add_set(st, "study.*/matrix.* keys change the study (--set matrix.seeds=3, --set 'matrix.lr=[0.1,1]', "
                         "--set study.workers=2); any other key is a pipeline key set for every run "
                         "(--set data.source=synthetic)")
    st.add_argument("--dry-run", action="store_true", help="list the runs the spec expands to, and stop")
    st.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    sw = sub.add_parser(
        "sweep", help="search the clipping threshold (and lr): grid, random or Bayesian (TPE), on Optuna",
        description="Search clip.method and its threshold (log-uniform ranges or value lists), and optionally the "
                    "learning rate, as given by a sweep spec (pipelines/sweep_*.yaml: a base pipeline, `search` "
                    "and `sweep` settings). Each trial trains the base pipeline once, as an MLflow child run of the "
                    "sweep's parent run; the objective is its best validation loss. A trial whose training goes "
                    "non-finite scores sweep.divergence_penalty x the zero forecast's validation loss; the median "
                    "pruner stops trials behind the others at an epoch. The sweep lives in an Optuna storage "
                    "(sqlite:///optuna.db here by default): rerunning the command resumes it, sweep.workers "
                    "processes share it, and workers on other machines join it with --storage URL --join NAME. "
                    "At the end the parent run gets the best trial, trials.csv, importance.csv, summary.md and "
                    "objective_vs_threshold.png (also in reports/sweep/<name>/). Exit status: 0 when the trial "
                    "budget is spent, 1 when failures left it short (rerun to retry), 2 for bad specs or data.",
        epilog=SWEEP_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sw.add_argument("spec", help="sweep spec (YAML), e.g. pipelines/sweep_crypto.yaml")
    _add_set(sw, "sweep.*/search.*/name/base change the sweep (--set sweep.sampler=grid, --set sweep.trials=50, "
                 "--set 'search.lr={low: 0.1, high: 3}'); any other key is a pipeline key for every trial "
                 "(--set data.source=synthetic)")
    sw.add_argument("--storage", default=None, metavar="URL",
                    help="Optuna storage, any SQLAlchemy URL (default: sweep.storage, else sqlite:///optuna.db here); "
                         "a PostgreSQL/MySQL URL that several machines reach lets them work on one sweep")
    sw.add_argument("--join", default=None, metavar="NAME",
                    help="work on the running sweep NAME in --storage (started elsewhere with the same spec) "
                         "instead of starting one; its driver writes the summary")
    sw.add_argument("--dry-run", action="store_true", help="print the search space (and the grid), and stop")
    sw.add_argument("--out", default="reports", help="reports directory (default: reports)")
    sw.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    ad = sub.add_parser(
        "advise-clip", help="propose clipping thresholds from a short unclipped probe run's gradient norms",
        description="Train the pipeline unclipped for --steps optimizer steps (an ordinary MLflow run tagged "
                    "fincast.kind=advise-clip), record the global L2 gradient norm of every step and propose "
                    "thresholds for clip.norm.max_norm: an AutoClip-style percentile of the norms, a multiple of "
                    "the median, and the spike onset (Tukey's upper fence on log norms). Prints them, writes a "
                    "histogram marking them to reports/advise/<name>/grad_norms.png (with advice.json and "
                    "grad_norms.csv), and logs all of it to the probe run. A sweep with sweep.range: advised "
                    "searches around them.",
        epilog=ADVISE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    ad.add_argument("pipeline", help="pipeline spec (YAML); its optimizer and lr are probed (clip is ignored)")
    _add_set(ad, SET_HELP)
    ad.add_argument("--steps", type=int, default=300, help="optimizer steps of the probe (default 300, at least 20)")
    ad.add_argument("--percentile", type=float, default=None,
                    help="AutoClip percentile (default: the spec's clip.autoclip.percentile, 10)")
    ad.add_argument("--multiple", type=float, default=2.0, help="median multiple (default 2)")
    ad.add_argument("--out", default="reports", help="reports directory (default: reports)")
    ad.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    rp = sub.add_parser(
        "report", help="write a report from MLflow (stability: clipped vs unclipped runs of a study)",
        description="Build a report from what is stored in MLflow only (so it works against a remote tracking "
                    "server too). `report stability --study NAME` writes reports/stability/NAME/index.html "
                    "(self-contained), its PNGs, summary.csv and summary.json, and logs them to the study's "
                    "parent run.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    rp.add_argument("kind", choices=["stability"], help="which report")
    rp.add_argument("--study", required=True, help="the study's name (its spec's `name`, e.g. stability_crypto)")
    rp.add_argument("--tracking-uri", default=None,
                    help="MLflow store; default $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here")
    rp.add_argument("--out", default="reports", help="reports directory (default: reports)")
    rp.add_argument("-q", "--quiet", action="store_true", help="print only the report's path")

    bt = sub.add_parser(
        "backtest", help="walk-forward backtest: refit at each cutoff, forecast, trade after costs, report",
        description="Walk forward from backtest.start: at each cutoff (every backtest.refit_every bars) train fresh "
                    "models on what was known by then (expanding or rolling backtest.window; scalers refit per "
                    "fold), forecast the next bars, move on. Models compared: the LSTM under each of backtest.clips "
                    "(default: unclipped and the spec's clip), ridge regression on the same features, the "
                    "historical mean and the naive zero-return forecast. Forecasts are scored (RMSE, MAE, vs naive, "
                    "direction, out-of-sample R2, Diebold-Mariano) and traded (backtest.position rule, "
                    "backtest.cost_bps per unit of turnover) beside buy and hold. Writes "
                    "reports/backtest/<name>/index.html with its PNGs and CSVs, and logs everything to one MLflow run "
                    "(folds as metrics stepped by fold). Every backtest.* key is listed by `fincast keys`. Exit "
                    "status: 0 when done, 2 for bad config or data, 130 when interrupted.",
        epilog=BACKTEST_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    bt.add_argument("pipeline", help="pipeline spec (YAML) with an optional backtest section, e.g. "
                                     "pipelines/backtest_crypto.yaml")
    _add_set(bt, SET_HELP)
    bt.add_argument("--out", default="reports", help="reports directory (default: reports)")
    bt.add_argument("-q", "--quiet", action="store_true", help="no progress bar; print the stats table and paths")

    sub.add_parser("keys", help="list every config key with its default and meaning",
                   description="List every pipeline config key, its default and what it does.")
    return p


def _add_set(parser: argparse.ArgumentParser, help: str) -> None:
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help)


def _version() -> str:
    import fincast

    return fincast.__version__


class _Format(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {record.getMessage()}"


def _setup_logging(quiet: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Format())
    root = logging.getLogger("fincast")
    root.handlers[:] = [handler]
    root.setLevel(logging.ERROR if quiet else logging.INFO)
    root.propagate = False
    for noisy in ("mlflow", "alembic", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def _progress(quiet: bool) -> bool:
    return not quiet and sys.stderr.isatty() and not os.environ.get("CI")


def cmd_train(args: argparse.Namespace) -> int:
    cfg = config_mod.load(args.pipeline, args.overrides)  # all config errors before any work
    if args.skip_missing_data:
        missing = _missing_local_data(cfg)
        if missing:
            print(f"skipped {args.pipeline}: its local data are not here ({', '.join(missing)})")
            return 0
    from fincast import pipeline  # torch + mlflow

    t0 = time.perf_counter()
    if args.resume:
        out = pipeline.resume_spec(cfg, args.resume, checkpoint_dir=args.checkpoint_dir or cfg.train.checkpoint_dir,
                                   progress=_progress(args.quiet))
    else:
        out = pipeline.train(cfg, progress=_progress(args.quiet))
    if out is not None:  # under torchrun, rank 0 reports
        print(format_summary(out, time.perf_counter() - t0))
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    from fincast import pipeline

    t0 = time.perf_counter()
    out = pipeline.resume(args.run_id, args.overrides, checkpoint_dir=args.checkpoint_dir,
                          progress=_progress(args.quiet))
    if out is not None:
        print(format_summary(out, time.perf_counter() - t0))
    return 0


def _summary_head(out, seconds: float, unit: str) -> list[str]:
    f = out.fit
    status = (f"DIVERGED at step {f.diverged_step}: {f.diverged_reason}" if f.diverged
              else f"finished ({f.stop_reason.replace('_', ' ')})")
    return [
        f"run {out.run_id}  {out.run_name}",
        f"  experiment {out.experiment!r} in {out.tracking_uri}",
        f"  {status}: {f.steps} steps, {f.epochs} epochs, best val loss {f.best_val_loss:.4g} (epoch {f.best_epoch}), "
        f"{f.step_ms:.2f} ms/step on {out.device} ({out.precision}), {seconds:.1f} s in all",
        f"  test set: {out.samples['test']} {unit} (train {out.samples['train']}, val {out.samples['val']})",
    ]


def _summary_tail(out) -> list[str]:
    lines = []
    if out.checkpoint:
        where = Path(out.checkpoint).parent
        flag = "" if where == Path("checkpoints") else f" --checkpoint-dir {where}"
        lines.append(f"  checkpoint {out.checkpoint}: continue with  fincast resume {out.run_id}{flag}")
    if out.warnings:
        lines.append(f"  data warnings: {len(out.warnings)} (see data_warnings.txt in the run's artifacts)")
    return lines


def format_summary(out, seconds: float) -> str:
    if out.task == "options":
        return format_options_summary(out, seconds)
    lines = [
        *_summary_head(out, seconds, "samples"),
        "",
        f"  {'model':<16}{'RMSE':>10}{'MAE':>10}{'dir. acc':>10}",
    ]
    names = {"test": "LSTM", "baseline_naive": "naive (zero)", "baseline_ridge": "ridge"}
    for key in ("test", "baseline_naive", "baseline_ridge"):
        m = out.metrics.get(key)
        if m is None:
            lines.append(f"  {names[key]:<16}{'(no finite epoch)':>30}")
            continue
        lines.append(f"  {names[key]:<16}{m['rmse']:>10.5f}{m['mae']:>10.5f}{m['directional_accuracy']:>10.3f}")
    if "test" in out.metrics:
        rel = out.metrics["test"]["rmse"] / out.metrics["baseline_naive"]["rmse"] - 1
        lines.append(f"  LSTM RMSE vs naive: {100 * rel:+.2f}% ({'better' if rel < 0 else 'not better'})")
    lines += ["", "  look: make ui  (MLflow UI at http://127.0.0.1:5000; PORT=... to change)"]
    return "\n".join(lines + _summary_tail(out))


OPTION_NAMES = {"lstm": "LSTM", "bs_vol_index": "BS vol index", "true_model": "true model"}


def format_options_summary(out, seconds: float) -> str:
    """Test price and implied-vol errors of the LSTM beside every baseline, on the same contracts."""
    lines = _summary_head(out, seconds, "contracts")
    if out.dropped:
        lines.append("  dropped: " + "; ".join(f"{k} {v}" for k, v in out.dropped.items()))
    lines += ["", f"  {'model':<14}{'price RMSE':>12}{'MAE':>10}{'IV RMSE':>10}{'no-arb viol.':>14}",
              f"  {'':<14}{'':>12}{'':>10}{'[vol pts]':>10}{'[%]':>14}"]
    for name, m in out.metrics.items():
        label = OPTION_NAMES.get(name, name.replace("bs_hv", "BS hist vol ").replace("bs_", "BS "))
        if not math.isfinite(m["Price RMSE"]):
            lines.append(f"  {label:<14}{'(no finite epoch)':>30}")
            continue
        lines.append(f"  {label:<14}{m['Price RMSE']:>12.4f}{m['Price MAE']:>10.4f}{m['IV RMSE [vol pts]']:>10.2f}"
                     f"{m['Any violation [%]']:>14.2f}")
    lstm = out.metrics.get("lstm", {}).get("Price RMSE", math.nan)
    for name in [k for k in out.metrics if k.startswith("bs_hv")]:
        ref = out.metrics[name]["Price RMSE"]
        if math.isfinite(lstm) and ref > 0:
            rel = lstm / ref - 1
            lines.append(f"  LSTM price RMSE vs BS hist vol {name[len('bs_hv'):]}: {100 * rel:+.1f}% "
                         f"({'better' if rel < 0 else 'not better'})")
    lines += ["", f"  tables and figures: {out.report}/ (stats.csv, buckets.csv, bucket_errors.png, "
                  "predicted_vs_market.png), also in the run's artifacts",
              "  look: make ui  (MLflow UI at http://127.0.0.1:5000; PORT=... to change)"]
    return "\n".join(lines + _summary_tail(out))


def _missing_local_data(cfg) -> list[str]:
    """Local files a spec reads that do not exist (csv sources): for --skip-missing-data."""
    missing = []
    if cfg.data.source == "csv" and cfg.data.path and not Path(cfg.data.path).exists():
        missing.append(f"data.path {cfg.data.path}")
    if cfg.task == "options":
        o = cfg.options
        if o.source == "csv" and o.path and not Path(o.path).exists():
            missing.append(f"options.path {o.path}")
        if o.source != "synthetic" and cfg.data.source == "csv" and o.aux_path and not Path(o.aux_path).exists() \
                and (o.rate_ticker or o.vol_index):
            missing.append(f"options.aux_path {o.aux_path}")
    return missing


def cmd_data(args: argparse.Namespace) -> int:
    cfg = config_mod.load(args.pipeline, args.overrides)
    from fincast import pipeline

    if cfg.task == "options":
        from fincast import pipeline_options

        for line in pipeline_options.collect(cfg, progress=_progress(args.quiet), refresh=not args.no_refresh):
            print(line)
        return 0

    prices = pipeline.load_data(cfg, progress=_progress(args.quiet), refresh=not args.no_refresh)
    print(f"source {prices.source}, fingerprint {prices.fingerprint}, network calls {prices.network_calls}")
    for t, f in prices.frames.items():
        print(f"  {t:<10} {len(f):>6} bars  {f.index[0]:%Y-%m-%d} .. {f.index[-1]:%Y-%m-%d}")
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    from fincast import study as study_mod

    spec = study_mod.load(args.spec, args.overrides)  # every spec error before any work
    cells = spec.cells
    print(f"study {spec.name}: {len(spec.jobs)} runs = {len(cells)} cells x "
          f"{len(spec.jobs) // max(1, len(cells))} seeds")
    if args.dry_run:
        for job in spec.jobs:
            print(f"  {job.cfg.tracking.run_name:<40} {job.hash}")
        return 0
    out = study_mod.run(spec, progress=_progress(args.quiet))
    print(f"parent run {out.parent_run_id}  (experiment {out.experiment!r} in {out.tracking_uri})")
    print(f"  {out.finished} runs trained now ({out.diverged} went non-finite), {out.skipped} finished before, "
          f"{len(out.failed)} failed; {out.seconds:.0f} s")
    for name, error in out.failed[:10]:
        print(f"  FAILED {name}: {error}")
    if out.failed:
        print("  rerun the same command to retry the failed runs (finished ones are kept)")
        return 1
    print(f"  next: fincast report stability --study {out.name}   (or: make report STUDY_NAME={out.name})")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from fincast import sweep as sweep_mod

    overrides = list(args.overrides) + ([f"name={args.join}"] if args.join else [])
    spec = sweep_mod.load(args.spec, overrides)  # every spec error before any work
    if args.dry_run:
        print(sweep_mod.describe(spec, args.storage))
        return 0
    if args.join:
        out = sweep_mod.join(spec, storage=args.storage, progress=_progress(args.quiet))
        print(f"joined sweep {out.name} (parent run {out.parent_run_id}, storage {out.storage})")
        print(f"  trained {out.trained_now} trials here; the sweep has {out.complete + out.pruned} of {out.target} "
              f"finished; {out.seconds:.0f} s")
        for number, error in out.failed[:10]:
            print(f"  FAILED trial {number}: {error}")
        print("  the process that started the sweep writes its summary (or rerun `fincast sweep SPEC --storage URL`)")
        return 1 if out.failed and out.complete + out.pruned < out.target else 0
    out = sweep_mod.run(spec, storage=args.storage, progress=_progress(args.quiet), out_dir=args.out)
    print(format_sweep(out))
    return 0 if out.complete + out.pruned >= out.target else 1


def format_sweep(out) -> str:
    lines = [f"sweep {out.name}: parent run {out.parent_run_id}  (experiment {out.experiment!r} in {out.tracking_uri})",
             f"  {out.complete + out.pruned} of {out.target} trials finished ({out.sampler}; {out.trained_now} now, "
             f"{out.finished_before} before): {out.complete} complete, {out.pruned} pruned, {out.diverged} diverged "
             f"(penalised); {len(out.failed)} failed; {out.seconds:.0f} s; storage {out.storage}"]
    b = out.best
    if b is None:
        lines.append("  no trial completed: no threshold found")
    else:
        thr = "unclipped (clip.method=none)" if b["method"] == "none" else \
            f"clip.method={b['method']} {b['threshold_key']}={b['threshold']:.4g}"
        lines += [f"  best threshold: {thr}, train.lr={b['lr']:.4g}",
                  f"    trial {b['number']}, best validation loss {b['value']:.5g}, run {b['run_id']}"]
    summary = out.summary.splitlines()
    start = next((i for i, line in enumerate(summary) if line.startswith("| method")), len(summary))
    lines += ["", *("  " + line if line else "" for line in summary[start:])]
    if out.advice:
        lines.append(f"  advised range of clip.norm.max_norm: [{out.advice['low']:.3g}, {out.advice['high']:.3g}] "
                     f"(probe run {out.advice['run_id']})")
    for number, error in out.failed[:10]:
        lines.append(f"  FAILED trial {number}: {error}")
    if out.folder is not None:
        lines.append(f"  report {out.folder}/ (summary.md, trials.csv, importance.csv, objective_vs_threshold.png)")
    lines.append("  look: make ui  (the sweep's parent run holds every trial as a child run)")
    return "\n".join(lines)


def cmd_advise(args: argparse.Namespace) -> int:
    cfg = config_mod.load(args.pipeline, args.overrides)
    if args.steps < 20:
        raise config_mod.ConfigError(f"--steps {args.steps}: at least 20 steps are needed for a distribution")
    from fincast import advise

    out = advise.advise(cfg, steps=args.steps, percentile=args.percentile, multiple=args.multiple, out_dir=args.out,
                        progress=_progress(args.quiet))
    print(advise.format_advice(out))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from fincast.reports import stability

    t0 = time.perf_counter()
    rep = stability.build(args.study, tracking_uri=args.tracking_uri, out_dir=Path(args.out) / "stability")
    if not args.quiet:
        print(rep.verdict_text)
        print()
        print(f"report {rep.index}  ({rep.runs} runs, {time.perf_counter() - t0:.1f} s)")
        print(f"  logged to the study's parent run {rep.parent_run_id}")
    else:
        print(rep.index)
    return 0


def cmd_backtest(args: argparse.Namespace) -> int:
    cfg = config_mod.load(args.pipeline, args.overrides)
    if cfg.task != "forecast":
        raise FincastError(f"{args.pipeline}: task = {cfg.task}; walk-forward backtests trade return forecasts "
                           "(task: forecast)")
    from fincast import pipeline

    out = pipeline.backtest(cfg, progress=_progress(args.quiet), out_dir=args.out)
    print(format_backtest(out))
    return 0


def format_backtest(out) -> str:
    s = out.seconds
    machinery = s["total"] - s["model_training"]
    lines = [f"backtest run {out.run_id}  (experiment {out.experiment!r} in {out.tracking_uri})",
             f"  {out.folds} folds, {out.forecasts} forecasts on {out.device}; {s['total']:.0f} s in all, "
             f"model training {s['model_training']:.0f} s, everything else {machinery:.1f} s "
             f"({100 * machinery / max(s['total'], 1e-9):.1f}%)", ""]
    cols = [("RMSE vs Naive [%]", "vs naive", "{:+.2f}%"), ("Directional Accuracy [%]", "dir.acc", "{:.1f}%"),
            ("R2 OOS [%]", "R2 OOS", "{:+.2f}%"), ("DM p-value", "DM p", "{:.3f}"),
            ("Total Return [%]", "return", "{:+.0f}%"), ("CAGR [%]", "CAGR", "{:+.1f}%"),
            ("Sharpe Ratio", "Sharpe", "{:.2f}"), ("Max. Drawdown [%]", "max DD", "{:.1f}%"),
            ("Turnover (ann.) [x]", "turnover", "{:.0f}x")]
    for ticker, rows in out.stats.groupby("ticker", sort=True):
        table = [[ticker, *(h for _, h, _ in cols)]]
        for r in rows.to_dict("records"):
            table.append([r["model"], *(fmt.format(v) if isinstance(v := r.get(key), float) and v == v else ""
                                        for key, _, fmt in cols)])
        widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
        lines += ["  " + row[0].ljust(widths[0]) + "".join(c.rjust(w + 2) for c, w in zip(row[1:], widths[1:]))
                  for row in table]
        lines.append("")
    for r in out.training.to_dict("records"):
        lines.append(f"  {r['model']}: {r['diverged']} of {r['folds']} folds diverged, {r['unusable']} unusable; "
                     f"median clip rate {100 * r['clip_rate_median']:.1f}%, max grad norm {r['grad_norm_max']:.3g}")
    lines += [f"  report {out.report}", "  look: make ui  (the run's metrics fold/<model>/* are stepped by fold)"]
    lines += [f"  note: {w}" for w in out.warnings]
    return "\n".join(lines)


def cmd_keys(args: argparse.Namespace) -> int:
    rows = config_mod.describe_keys()
    width = max(len(k) for k, _, _ in rows)
    for key, default, text in rows:
        print(f"{key:<{width}}  {default:<14}  {text}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    _setup_logging(getattr(args, "quiet", False))
    try:
        return {"train": cmd_train, "resume": cmd_resume, "data": cmd_data, "study": cmd_study, "sweep": cmd_sweep,
                "advise-clip": cmd_advise, "report": cmd_report, "backtest": cmd_backtest,
                "keys": cmd_keys}[args.command](args)
    except FincastError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
