"""The walk-forward backtest run (layer L4, runs): data -> folds (refit, forecast) -> evaluation -> report, into
one MLflow run. The forecast task's data; its own models (``fincast.backtest``) and report."""

from __future__ import annotations

import collections
import concurrent.futures as cf
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import fincast
from fincast import backtest as bt
from fincast import config as config_mod
from fincast import features, tracking
from fincast.backtest import FoldFit
from fincast.backtest import evaluate as bt_eval
from fincast.backtest.walkforward import concat_splits
from fincast.config import FincastError, PipelineConfig
from fincast.models import build_model
from fincast.reports import backtest as report_mod
from fincast.runs import forecast, preflight, setup, stopping
from fincast.runs.checkpoints import save_checkpoint
from fincast.runs.record import device_tag, ended, git_commit, metric_name
from fincast.training import predict, seed_everything, train_runs

log = logging.getLogger("fincast.backtest")


@dataclass
class BacktestOutcome:
    run_id: str
    experiment: str
    tracking_uri: str
    report: Path
    stats: pd.DataFrame  # one row per (ticker, model), buy and hold included
    training: pd.DataFrame  # per LSTM: divergence, clipping, time
    folds: int
    forecasts: int
    device: str
    seconds: dict[str, float]  # where the time went; "total" and "model_training" included
    warnings: list[str] = field(default_factory=list)
    verdict: list[str] = field(default_factory=list)  # per ticker: the edge over buy and hold; seed spread


class FoldFiles:
    """A backtest's finished folds on disk, ``train.checkpoint_dir/backtest/<name>-<key>/fold-<k>.pt``, where the
    key is a hash of the config (less tracking) and the data's fingerprint: a rerun of the same backtest on the
    same data takes them instead of refitting; any other config or data starts afresh. Written atomically;
    removed once the backtest has finished."""

    def __init__(self, cfg: PipelineConfig, fingerprint: str):
        raw = config_mod.to_dict(cfg)
        raw.pop("tracking", None)
        for key in ("stack_folds", "workers"):  # how folds are grouped and where they train: not what they compute
            raw.get("backtest", {}).pop(key, None)
        key = hashlib.sha256(json.dumps([raw, fingerprint], sort_keys=True, default=str).encode()).hexdigest()[:16]
        self.dir = Path(cfg.train.checkpoint_dir) / "backtest" / f"{cfg.name}-{key}"

    def _path(self, k: int) -> Path:
        return self.dir / f"fold-{k:05d}.pt"

    def get(self, k: int) -> dict | None:
        path = self._path(k)
        if not path.is_file():
            return None
        try:
            return torch.load(path, weights_only=False)  # our own file (forecast tables, weights)
        except Exception as exc:  # noqa: BLE001 - a damaged file: the fold is refit
            log.warning("backtest fold file %s could not be read (%s); fold %d is refit", path, exc, k)
            return None

    def put(self, k: int, done: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        save_checkpoint(self._path(k), done)

    def clear(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def lstm_fitter(cfg: PipelineConfig, device: torch.device, precision: str = "fp32",
                progress: bool = False) -> bt.LSTMFitter:
    """The backtest's LSTM fitter in this process, one stack after the other (``stack_trainer``)."""
    train = stack_trainer(cfg, device, precision, progress)

    def fit_stacks(stacks):
        for requests in stacks:
            yield train(requests) if requests else []

    return fit_stacks


def stack_trainer(cfg: PipelineConfig, device: torch.device, precision: str = "fp32", progress: bool = False):
    """The backtest's LSTM trainer: [FitRequest] -> [FoldFit], every request's LSTM trained in one stack (each on
    its fold's samples: ``training.train_runs``). Each a fresh model seeded with train.seed (or the warm-start
    weights), early-stopped on its fold's inner validation split with the best epoch's weights kept; with
    backtest.refit_full then retrained, again in one stack, on all its fold's training data for its best epoch
    count."""
    monitor = dataclasses.replace(cfg.monitor, every=None)  # no per-layer monitoring inside folds

    def train_stack(requests: list[bt.FitRequest], refit: bool = False) -> list:
        """-> [(model, FitResult)]; refit: a fixed number of epochs (no early stopping), keeping the last weights,
        on training and validation samples together."""
        models = []
        for r in requests:
            seed_everything(r.seed)
            model = build_model(cfg.model, r.train.x.shape[2]).to(device)
            if r.warm is not None:
                model.load_state_dict(r.warm)
            models.append(model)
        cfgs = [dataclasses.replace(cfg.train, epochs=r.epochs, seed=r.seed,
                                    **({"patience": None, "max_steps": None} if refit else {})) for r in requests]
        joined: dict[tuple[int, int], features.Split] = {}  # a fold's LSTMs share its samples
        trains = [joined.setdefault((id(r.train), id(r.val)), concat_splits(r.train, r.val)) if refit else r.train
                  for r in requests]
        results = train_runs(models, trains, [r.val for r in requests], cfgs, [r.clip for r in requests],
                             device=device, precision=precision, log_every=cfg.tracking.log_every,
                             metric_every=cfg.tracking.metric_every, monitor=monitor, restore_best=not refit,
                             cuda_graphs=cfg.train.cuda_graphs, progress=progress)
        return list(zip(models, results))

    def fit_folds(requests: list[bt.FitRequest]) -> list[FoldFit]:
        t = time.perf_counter()
        first = train_stack(requests)
        again = [i for i, (_, res) in enumerate(first) if res.best_epoch > 0] if cfg.backtest.refit_full else []
        refits = dict(zip(again, train_stack([dataclasses.replace(requests[i], epochs=first[i][1].best_epoch)
                                               for i in again], refit=True))) if again else {}
        share = (time.perf_counter() - t) / len(requests)  # each LSTM's share of the stack's time
        return [_fold_fit(model, res, refits.get(i), share) for i, (model, res) in enumerate(first)]

    def _fold_fit(model, res, refit, seconds: float) -> FoldFit:
        h = res.history
        steps, norms, clipped = res.steps, list(h["norm_pre"]), list(h["clipped"])
        usable = res.best_epoch > 0  # weights from an epoch that validated finitely
        outcome, diverged = "off", res.diverged
        if refit is not None:  # the same recipe on everything up to the cutoff, best epoch count
            again, res2 = refit
            steps += res2.steps
            norms += res2.history["norm_pre"]
            clipped += res2.history["clipped"]
            outcome = "diverged: kept the early-stopped model" if res2.diverged else f"{res.best_epoch} epochs"
            diverged = diverged or res2.diverged
            if not res2.diverged:
                model = again
        info = {"steps": steps, "epochs": res.epochs, "stop_reason": res.stop_reason,
                "best_val_loss": res.best_val_loss, "diverged": diverged, "refit": outcome,
                "clip_rate": float(np.mean(clipped)) if clipped else math.nan,
                "grad_norm_median": float(np.nanmedian(norms)) if norms else math.nan,
                "grad_norm_max": float(np.nanmax(norms)) if norms else math.nan, "fit_seconds": seconds}
        weights = {k: v.detach().clone() for k, v in model.state_dict().items()} if usable else None
        return FoldFit(lambda x: predict(model, x, device), usable, weights, info)

    return fit_folds


def stack_fitter(cfg: PipelineConfig, device: torch.device, precision: str, workers: int, threads: int,
                 gpus: int = 0, progress: bool = False) -> bt.LSTMFitter:
    """The backtest's LSTM fitter: with several ``workers``, each stack trained in one of that many processes
    (``threads`` torch threads each; on CUDA worker i on GPU i mod ``gpus``), up to two stacks a worker asked for
    ahead; the fits come back as weights, and the models predict here. One worker: ``lstm_fitter``, here."""
    if workers <= 1:
        return lstm_fitter(cfg, device, precision, progress)

    def fit_stacks(stacks):
        with _stack_pool(workers, threads, gpus) as pool:
            ahead: collections.deque = collections.deque()

            def ask() -> bool:
                requests = next(stacks, None)
                if requests is None:
                    return False
                future = pool.submit(_fit_in_worker, cfg, precision, requests) if requests else None
                ahead.append((requests, future))
                return True

            while len(ahead) < 2 * workers and ask():
                pass
            while ahead:
                requests, future = ahead.popleft()
                fits = future.result() if future is not None else []
                ask()
                yield [_received(cfg, device, r, *fit) for r, fit in zip(requests, fits)]

    return fit_stacks


@contextlib.contextmanager
def _stack_pool(workers: int, threads: int, gpus: int):
    """Worker processes for stacks (``setup.worker_context``, ``setup.start_worker``)."""
    ctx = setup.worker_context(torch.get_num_threads(), gpus, "fincast.runs.backtest")
    started = ctx.Value("i", 0)
    pool = cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=setup.start_worker,
                                  initargs=(threads, gpus, started))
    try:
        yield pool
    except BaseException as exc:
        if not isinstance(exc, Exception):  # interrupted (Ctrl-C, SIGTERM, SIGHUP): the workers stop too
            stopping.stop_workers(pool)
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _fit_in_worker(cfg: PipelineConfig, precision: str, requests: list[bt.FitRequest]) -> list[tuple]:
    """A stack trained in a worker process: per request (its model's final weights on the CPU or None when it
    never validated, usable, info)."""
    stopping.refuse_if_stopped()  # (a stopped worker trains none of the stacks still queued for it)
    fits = stack_trainer(cfg, setup.device(cfg), precision)(requests)
    return [({k: v.cpu() for k, v in f.weights.items()} if f.weights is not None else None, f.usable, f.info)
            for f in fits]


def _received(cfg: PipelineConfig, device: torch.device, request: bt.FitRequest, weights: dict | None, usable: bool,
              info: dict) -> FoldFit:
    """A fit from a worker process as a FoldFit: its model rebuilt here (to predict) from its weights."""
    model = build_model(cfg.model, request.train.x.shape[2]).to(device)
    if weights is not None:
        model.load_state_dict(weights)
    return FoldFit(lambda x: predict(model, x, device), usable, weights, info)


def _machine(cfg: PipelineConfig) -> tuple[torch.device, str, int, int, int]:
    """(device, precision, workers, torch threads per worker, GPUs): folds one at a time (warm_start,
    backtest.stack_folds = 1) train here on one thread (a lone small LSTM trains as fast on one as on all cores,
    and far faster on a loaded machine); stacks of folds in backtest.workers processes (default: one per GPU on
    CUDA, else one per core), the cores shared out (measured: docs/backtests.md). This process keeps one thread
    when there are workers (it only predicts). train.threads, when set, is every process's."""
    b = cfg.backtest
    if b.warm_start or b.stack_folds == 1:
        device, precision = setup.prepare(cfg, default_threads=1)
        return device, precision, 1, torch.get_num_threads(), 0
    gpus = setup.visible_gpus(cfg.train.device)
    device, precision = setup.prepare(cfg, default_threads=1)
    use = gpus if device.type == "cuda" else 0
    workers = b.workers or use or setup.cores()
    threads = cfg.train.threads or max(1, setup.cores() // workers)
    if workers == 1:
        torch.set_num_threads(threads)
    return device, precision, workers, threads, use


def backtest(cfg: PipelineConfig, *, progress: bool = False, out_dir: str | Path = "reports") -> BacktestOutcome:
    """Walk-forward backtest of ``cfg`` (its ``backtest`` section): one MLflow run holding the configuration,
    each fold's training outcome as metrics stepped by fold, the final statistics, the walk-forward table and
    the report, which is also written to ``out_dir/backtest/<name>/``."""
    if cfg.task != "forecast":
        raise FincastError(f"{cfg.name}: task = {cfg.task}; walk-forward backtests trade return forecasts "
                           "(task: forecast)")
    preflight.check_outputs([cfg], checkpoints=cfg.backtest.resume,  # before any work: nothing half-written
                            reports=[("the backtest report folder", Path(out_dir) / "backtest" / cfg.name)])
    t_start = time.perf_counter()
    prices = forecast.load(cfg, progress=progress)
    for ticker, frame in prices.frames.items():  # a target that cannot be learned: refused before the run starts
        y = features.ticker_features(frame, cfg.features, price=cfg.data.price)[1]["y"].to_numpy(float)
        features.check_target(y, ticker, f"log return over {cfg.features.horizon} bar(s)", "its whole history")
    t_data = time.perf_counter() - t_start
    device, precision, workers, threads, gpus = _machine(cfg)
    b = cfg.backtest
    experiment = cfg.tracking.experiment or cfg.name
    window = "expanding" if b.window == "expanding" else f"rolling{b.window}"
    name = cfg.tracking.run_name or f"backtest-{'+'.join(cfg.data.tickers)}-{window}-every{b.refit_every}"
    run = tracking.start_run(cfg.tracking, experiment, name, _tags(cfg, prices, device, precision, workers, threads))
    with ended(run):  # FINISHED, or FAILED / KILLED with the exception re-raised
        run.log_params(config_mod.flatten(config_mod.to_dict(cfg)))
        fold_keys = ("test_rmse", "test_rmse_vs_naive_pct", "best_val_loss", "steps", "clip_rate", "grad_norm_median",
                     "grad_norm_max", "fit_seconds")
        log_seconds = 0.0

        def on_fold(k: int, rows: pd.DataFrame) -> None:  # folds as metrics stepped by fold number
            nonlocal log_seconds
            t = time.perf_counter()
            out = []
            for r in rows.to_dict("records"):
                out += [(f"fold/{r['model']}/{key}", float(r[key]), k) for key in fold_keys
                        if r.get(key) is not None and math.isfinite(float(r[key]))]
                if isinstance(r.get("diverged"), bool | np.bool_):
                    out.append((f"fold/{r['model']}/diverged", float(r["diverged"]), k))
            run.log_metrics(out)
            log_seconds += time.perf_counter() - t

        store = FoldFiles(cfg, prices.fingerprint) if cfg.backtest.resume else None
        fitter = stack_fitter(cfg, device, precision, workers, threads, gpus, progress and workers <= 1)
        wf = bt.walk_forward(prices.frames, cfg, fit_lstm=fitter, progress=progress, on_fold=on_fold, store=store,
                             stack=bt.stack_folds(cfg, device.type == "cuda"), workers=workers)
        if wf.resumed:
            run.set_tags({"fincast.resumed_folds": wf.resumed})
            log.info("backtest %s: %d finished folds taken from %s", cfg.name, wf.resumed, store.dir)
        t = time.perf_counter()
        ev = bt_eval.evaluate(wf.forecasts, prices.frames, models=wf.models, horizon=cfg.features.horizon,
                              rule=b.position, max_position=b.max_position, cost_bps=b.cost_bps,
                              vol_target=b.vol_target, vol_window=b.vol_window, price=cfg.data.price,
                              borrow_bps=b.borrow_bps, n_boot=b.bootstrap, block=b.block_days, seed=cfg.train.seed)
        t_eval = time.perf_counter() - t
        t = time.perf_counter()
        exp_id = tracking.get_run(run.run_id, cfg.tracking).info.experiment_id
        ctx = report_mod.Context(
            name=cfg.name, tickers=list(cfg.data.tickers), source=prices.source, horizon=cfg.features.horizon,
            window=b.window, refit_every=b.refit_every, warm_start=b.warm_start, rule=b.position,
            cost_bps=b.cost_bps, max_position=b.max_position, vol_target=b.vol_target, sharpe_window=b.sharpe_window,
            device=f"{device} ({precision})", run_id=run.run_id, tracking_uri=run.uri, experiment_id=exp_id,
            refit_full=b.refit_full, borrow_bps=b.borrow_bps, seeds=b.seeds, bootstrap=b.bootstrap,
            block_days=b.block_days, notes=[*wf.notes, *prices.warnings])
        out = Path(out_dir) / "backtest" / cfg.name
        training = report_mod.training_summary(wf.folds, wf.lstms)
        index = report_mod.build(out, ctx, wf.forecasts, wf.folds, ev, wf.lstms, training)
        t_report = time.perf_counter() - t
        t = time.perf_counter()
        _log_results(run, cfg, ev, out)
        log_seconds += time.perf_counter() - t
    if store is not None:
        store.clear()
    seconds = {"data": t_data, **wf.seconds, "evaluate": t_eval, "report": t_report, "tracking": log_seconds}
    seconds["total"] = time.perf_counter() - t_start
    seconds["model_training"] = wf.seconds["lstm_fit"] + wf.seconds["ridge"]
    return BacktestOutcome(run.run_id, experiment, run.uri, index, ev.stats, training, int(wf.folds["fold"].nunique()),
                           len(wf.forecasts), f"{device} ({precision})", seconds, [*wf.notes, *prices.warnings],
                           report_mod.verdict_lines(ev))


def _tags(cfg: PipelineConfig, prices, device: torch.device, precision: str, workers: int = 1,
          threads: int | None = None) -> dict[str, str]:
    return {
        "fincast.kind": "backtest", "fincast.version": fincast.__version__, "fincast.git_commit": git_commit(),
        "fincast.data_source": prices.source, "fincast.data_fingerprint": prices.fingerprint,
        "fincast.tickers": ",".join(cfg.data.tickers), "fincast.pipeline": cfg.name,
        "fincast.device": device_tag(device), "fincast.precision": precision,
        "fincast.threads": threads or torch.get_num_threads(), "fincast.workers": workers,
        "fincast.models": ",".join(bt.model_names(cfg)),
    }


def _log_results(run: tracking.Run, cfg: PipelineConfig, ev, out: Path) -> None:
    """The final statistics as metrics (per ticker when there are several), the config and the report files."""
    multi = len(ev.periods) > 1
    final = []
    for r in ev.stats.to_dict("records"):
        prefix = f"{r['ticker']}/{r['model']}" if multi else r["model"]
        final += [(f"{prefix}/{metric_name(k)}", float(v), 0) for k, v in r.items()
                  if k not in ("ticker", "model", "seed") and isinstance(v, float | int) and math.isfinite(v)]
    run.log_metrics(final)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.yaml").write_text(config_mod.dump_yaml(cfg))
        run.log_artifact(Path(tmp) / "config.yaml")
    for f in sorted(out.iterdir()):
        if f.is_file() and not f.name.startswith("."):
            run.log_artifact(f, "backtest")


def summary(out: BacktestOutcome) -> str:
    """``fincast backtest``'s printed summary."""
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
    lines[2:2] = [f"  {line}" for line in out.verdict]
    main = out.stats[out.stats["seed"].isna()] if "seed" in out.stats else out.stats
    for ticker, rows in main.groupby("ticker", sort=True):
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
