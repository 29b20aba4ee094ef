"""The ``fincast`` command line's parser (layer L4, cli): commands, flags, help texts and examples."""

from __future__ import annotations

import argparse

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
  # a team: the same command on every machine, one Optuna storage and one MLflow server (docs/studies.md)
  fincast study pipelines/stability_crypto.yaml --storage postgresql://user:pw@db-host/optuna  # + MLFLOW_TRACKING_URI
"""

SET_HELP = ("override a config key, repeatable: --set train.lr=3e-3 --set data.tickers=[BTC-USD,ETH-USD]; "
            "run `fincast keys` for every key")


def build_parser() -> argparse.ArgumentParser:
    """The ``fincast`` parser: one sub-command per job, each with its help, description and examples."""
    p = argparse.ArgumentParser(
        prog="fincast",
        description="Train LSTM forecasters on market data with configurable gradient clipping, tracked in MLflow.",
        epilog=EXAMPLES)
    p.add_argument("--version", action="version", version=f"fincast {_version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    _add_train(sub)
    _add_resume(sub)
    _add_data(sub)
    _add_study(sub)
    _add_sweep(sub)
    _add_advise_clip(sub)
    _add_report(sub)
    _add_backtest(sub)
    _add_export(sub)
    _add_keys(sub)
    return p


def _add_train(sub) -> None:
    t = _command(
        sub, "train", help="train one model from a pipeline spec and log it to MLflow",
        description="Load data, build features, train an LSTM with the configured gradient clipping, evaluate it "
                    "on the test split beside the naive (zero-return) and ridge baselines, and log params, "
                    "per-step metrics, artifacts and the model to MLflow. Prints the run id and a summary. "
                    "Exit status: 0 when the run finished (a diverged run is a recorded result, not a failure), "
                    "2 for bad config or data, 130 when interrupted.",
        epilog=EXAMPLES)
    t.add_argument("pipeline", help="pipeline spec (YAML), e.g. pipelines/price_equities.yaml")
    _add_set(t, SET_HELP)
    t.add_argument("--resume", metavar="RUN_ID", default=None,
                   help="continue this run from its last checkpoint instead of starting a new one; the spec with "
                        "its --set overrides must resolve to the run's config (only train.epochs, max_steps, "
                        "patience, threads, checkpoint_every, tracking.log_every and tracking.metric_every may differ)")
    t.add_argument("--checkpoint-dir", default=None,
                   help="with --resume: where the checkpoint is (default: the spec's train.checkpoint_dir)")
    t.add_argument("--skip-missing-data", action="store_true",
                   help="exit 0 with a message, instead of failing, when the spec's local CSV data (data.path, "
                        "options.path, options.aux_path) are absent (make train-options runs the real-chain spec so)")
    _add_quiet(t, "no progress bars or warnings, summary only (for CI)")


def _add_resume(sub) -> None:
    r = _command(
        sub, "resume", help="continue a run from its last checkpoint, into the same MLflow run",
        description="Continue a run exactly where its last checkpoint left it (saved at each epoch end, and every "
                    "train.checkpoint_every steps, in train.checkpoint_dir/<run id>.pt): same data (checked), "
                    "weights, optimizer, learning-rate schedule, GradScaler, clipper state (AutoClip history, "
                    "ZClip EMAs), data order and RNG. Metrics continue in the same MLflow run. Only "
                    "train.epochs, train.max_steps, train.patience, train.threads, train.checkpoint_every, "
                    "tracking.log_every and tracking.metric_every may be changed with --set.",
        epilog=EXAMPLES)
    r.add_argument("run_id", help="the MLflow run id printed by `fincast train`")
    _add_set(r, "e.g. --set train.epochs=60 to train longer")
    r.add_argument("--checkpoint-dir", default="checkpoints", help="where the checkpoint is (default: checkpoints)")
    _add_quiet(r, "no progress bars or warnings, summary only")


def _add_data(sub) -> None:
    d = _command(
        sub, "data", help="fetch or refresh the data cache only (no training)",
        description="Fetch the pipeline's tickers into the cache (yfinance source), or check the CSV/synthetic "
                    "source, and print what each ticker holds. For yfinance the missing tail is fetched even when "
                    "the cache is fresh, unless --no-refresh.")
    d.add_argument("pipeline", help="pipeline spec (YAML)")
    _add_set(d, SET_HELP)
    d.add_argument("--no-refresh", action="store_true", help="use a fresh cache as is (no network call)")
    _add_quiet(d, "no progress bars")


def _add_study(sub) -> None:
    st = _command(
        sub, "study", help="run a stability study: clip configs x learning rates x seeds, in parallel workers",
        description="Expand a study spec (pipelines/stability_*.yaml: a base pipeline, a matrix of clip configs, "
                    "learning rates, seeds and optional axes) and train every run in study.workers parallel "
                    "processes, runs of one architecture stacked into batches trained as one model "
                    "(study.batch_runs: auto, K, or 1), each an MLflow child run of one parent run named after the study. Rerunning the "
                    "same command skips finished runs (matched by a hash of their resolved config) and redoes "
                    "killed or failed ones. A diverged run is a result, not a failure. Exit status: 0 when every "
                    "run finished, 1 when some failed (rerun to retry them), 2 for bad specs or data.",
        epilog=STUDY_EXAMPLES)
    st.add_argument("spec", help="study spec (YAML), e.g. pipelines/stability_crypto.yaml")
    _add_set(st, "study.*/matrix.* keys change the study (--set matrix.seeds=3, --set 'matrix.lr=[0.1,1]', "
                         "--set study.workers=2); any other key is a pipeline key set for every run "
                         "(--set data.source=synthetic)")
    st.add_argument("--dry-run", action="store_true", help="list the runs the spec expands to, and stop")
    st.add_argument("--storage", default=None, metavar="URL",
                    help="share the study's runs among drivers on several machines through this Optuna storage "
                         "(any SQLAlchemy URL; a team uses PostgreSQL, with MLflow on a shared `mlflow server`): "
                         "run the same command on each machine; each claims runs as its workers free up, and the "
                         "last one ends the study and builds the report. Default: this machine runs it alone")
    _add_quiet(st, "no progress bar")


def _add_sweep(sub) -> None:
    sw = _command(
        sub, "sweep", help="search the clipping threshold (and lr): grid, random or Bayesian (TPE), on Optuna",
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
        epilog=SWEEP_EXAMPLES)
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
    _add_out(sw)
    _add_quiet(sw, "no progress bar")


def _add_advise_clip(sub) -> None:
    ad = _command(
        sub, "advise-clip", help="propose clipping thresholds from a short unclipped probe run's gradient norms",
        description="Train the pipeline unclipped for --steps optimizer steps (an ordinary MLflow run tagged "
                    "fincast.kind=advise-clip), record the global L2 gradient norm of every step and propose "
                    "thresholds for clip.norm.max_norm: an AutoClip-style percentile of the norms, a multiple of "
                    "the median, and the spike onset (Tukey's upper fence on log norms). Prints them, writes a "
                    "histogram marking them to reports/advise/<name>/grad_norms.png (with advice.json and "
                    "grad_norms.csv), and logs all of it to the probe run. A sweep with sweep.range: advised "
                    "searches around them.",
        epilog=ADVISE_EXAMPLES)
    ad.add_argument("pipeline", help="pipeline spec (YAML); its optimizer and lr are probed (clip is ignored)")
    _add_set(ad, SET_HELP)
    ad.add_argument("--steps", type=int, default=300, help="optimizer steps of the probe (default 300, at least 20)")
    ad.add_argument("--percentile", type=float, default=None,
                    help="AutoClip percentile (default: the spec's clip.autoclip.percentile, 10)")
    ad.add_argument("--multiple", type=float, default=2.0, help="median multiple (default 2)")
    _add_out(ad)
    _add_quiet(ad, "no progress bar")


def _add_report(sub) -> None:
    rp = _command(
        sub, "report", help="write a report from MLflow (stability: clipped vs unclipped runs of a study)",
        description="Build a report from what is stored in MLflow only (so it works against a remote tracking "
                    "server too). `report stability --study NAME` writes reports/stability/NAME/index.html "
                    "(self-contained), its PNGs, summary.csv and summary.json, and logs them to the study's "
                    "parent run.")
    rp.add_argument("kind", choices=["stability"], help="which report")
    rp.add_argument("--study", required=True, help="the study's name (its spec's `name`, e.g. stability_crypto)")
    rp.add_argument("--tracking-uri", default=None,
                    help="MLflow store; default $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here")
    _add_out(rp)
    _add_quiet(rp, "print only the report's path")


def _add_backtest(sub) -> None:
    bt = _command(
        sub, "backtest", help="walk-forward backtest: refit at each cutoff, forecast, trade after costs, report",
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
        epilog=BACKTEST_EXAMPLES)
    bt.add_argument("pipeline", help="pipeline spec (YAML) with an optional backtest section, e.g. "
                                     "pipelines/backtest_crypto.yaml")
    _add_set(bt, SET_HELP)
    _add_out(bt)
    _add_quiet(bt, "no progress bar; print the stats table and paths")


def _add_export(sub) -> None:
    ex = _command(
        sub, "export", help="log a study run's trained model as an MLflow model (on demand)",
        description="A study's runs do not each export a model: the weights of each stacked batch go into one "
                    "weights-only file on the study's parent run (weights/<id>.pt), and each run is tagged "
                    "fincast.weights. This command rebuilds the run's model from its config.yaml, loads its weights, "
                    "and logs it into the run as an MLflow model (signature and input example from the run's "
                    "data, read from the cache). Single runs (fincast train) log their model themselves.")
    ex.add_argument("run_id", help="the MLflow run id of a study's run (see the MLflow UI or the study's report)")
    ex.add_argument("--tracking-uri", default=None,
                    help="MLflow store; default $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here")


def _add_keys(sub) -> None:
    k = sub.add_parser("keys", help="list every config key with its default and meaning",
                       description="List every pipeline config key, its default and what it does; with "
                                   "--markdown, the configuration reference docs/config.md is generated from.")
    k.add_argument("--markdown", action="store_true",
                   help="print the reference as Markdown (make docs writes it to docs/config.md)")


def _add_set(parser: argparse.ArgumentParser, help: str) -> None:
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help)


def _version() -> str:
    import fincast

    return fincast.__version__


def _command(sub, name: str, help: str, description: str, epilog: str | None = None) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help, description=description, epilog=epilog,
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def _add_quiet(parser: argparse.ArgumentParser, help: str) -> None:
    parser.add_argument("-q", "--quiet", action="store_true", help=help)


def _add_out(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="reports", help="reports directory (default: reports)")
