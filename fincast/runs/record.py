"""A run's MLflow record (layer L4, runs): the tags every run carries, opening and ending runs in a true
state, the closing metrics and tags of a trained run, the model, and the outcome the CLI summarises."""

from __future__ import annotations

import contextlib
import functools
import math
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import fincast
from fincast import tracking
from fincast.clipping import label as clip_label
from fincast.config import PipelineConfig
from fincast.training import FitResult, dist_info

BATCH_TAG = "fincast.batch_runs"
DIVERGED_SUFFIX = tracking.DIVERGED_SUFFIX  # appended to a diverged run's MLflow name


@dataclass(frozen=True)
class Keeping:
    """What a run keeps in MLflow besides its metrics, tags and artifacts. ``models``: "log" (an MLflow model per
    run, when tracking.log_model) or "weights" (a study's runs: one weights file per batch on the parent run,
    ``runs.weights``). ``params``: the config keys logged as params (None: every key; the resolved config is
    always an artifact, config.yaml). ``series``: where the per-step series file goes (``tracking.series``):
    "run" (series.parquet in each run's artifacts) or "parent" (one file per stack on the parent run; the
    run's MLflow step metrics are then held and sent in one call when it closes, ``tracking.Run.hold_metrics``).
    ``figures``: whether each run draws its figures (training_curves.png; a study's report draws them all)."""
    models: str = "log"
    params: frozenset[str] | None = None
    series: str = "run"
    figures: bool = True


@dataclass
class TrainOutcome:
    run_id: str
    run_name: str
    experiment: str
    tracking_uri: str
    device: str
    precision: str
    fit: FitResult
    metrics: dict[str, dict[str, float]]  # model -> its test metrics
    samples: dict[str, int]
    warnings: list[str] = field(default_factory=list)
    checkpoint: str | None = None  # continue with `fincast resume <run_id>`
    task: str = "forecast"
    report: str | None = None  # options task: folder of its tables and figures
    dropped: dict[str, int] = field(default_factory=dict)  # options task: chain rows dropped, per reason
    verdict: list[str] = field(default_factory=list)  # options task: the headline against the best baseline, notes
    zero_val_loss: float = math.nan  # validation loss of predicting 0 (training units): the scale of val losses


@functools.cache
def git_commit() -> str:
    """Commit of the fincast checkout that is running (not of the working directory), '-dirty' if modified. Once
    per process: the code it runs was read when it started (and two ``git`` processes per run cost a study's
    workers ~5 ms a run)."""
    where = Path(fincast.__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True,
                             cwd=where)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=5, cwd=where)
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_tag(device: torch.device) -> str:
    return str(device) + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else "")


def run_tags(cfg: PipelineConfig, device: torch.device, precision: str, *, source: str, fingerprint: str,
             tickers: str, extra: dict[str, str]) -> dict:
    """The tags every training run carries (every task), then ``extra``."""
    return {
        "fincast.version": fincast.__version__,
        "fincast.git_commit": git_commit(),
        "fincast.data_source": source,
        "fincast.data_fingerprint": fingerprint,
        "fincast.tickers": tickers,
        "fincast.device": device_tag(device),
        "fincast.precision": precision,
        "fincast.threads": torch.get_num_threads(),
        "fincast.world_size": dist_info()[1],
        "fincast.clip": clip_label(cfg.clip),
        "fincast.pipeline": cfg.name,
        **extra,
    }


def open_run(cfg: PipelineConfig, name: str, tags: dict, *, writer: tracking.MetricWriter | None,
             resume: dict | None, resume_overrides: list[str]) -> tracking.Run:
    """Start the run (or reopen the resumed one, tagged with where and how it was resumed)."""
    if resume is not None:
        tags = {**tags, "fincast.resumed_from_step": resume["run"]["step"]}
        if resume_overrides:
            tags["fincast.resumed_with"] = " ".join(resume_overrides)
    return tracking.start_run(cfg.tracking, cfg.tracking.experiment or cfg.name, name, tags, writer=writer,
                              resume_run_id=resume["run_id"] if resume is not None else None)


@contextlib.contextmanager
def all_ended_on_error(runs: list[tracking.Run]) -> Iterator[list[tracking.Run]]:
    """End every run in ``runs`` (a list the block may append to) only if the block fails: FAILED, or KILLED on
    an interrupt (KeyboardInterrupt, SystemExit; re-raised)."""
    try:
        yield runs
    except Exception:
        for run in runs:
            run.end("FAILED")
        raise
    except BaseException:
        for run in runs:
            run.end("KILLED")
        raise


@contextlib.contextmanager
def ended_on_error(run: tracking.Run) -> Iterator[tracking.Run]:
    """End ``run`` only if the block fails (FAILED, or KILLED on an interrupt, re-raised)."""
    with all_ended_on_error([run]):
        yield run


@contextlib.contextmanager
def ended(run: tracking.Run, status: Callable[[], str] = lambda: "FINISHED") -> Iterator[tracking.Run]:
    """End ``run`` when the block ends: ``status()`` when it completes (FINISHED; a study or sweep whose runs
    partly failed says FAILED), FAILED on an error, KILLED on an interrupt (re-raised). The one place runs,
    studies and sweeps get their end state."""
    with ended_on_error(run):
        yield run
    run.end(status())


def log_fit_outcome(run: tracking.Run, result: FitResult, val_y: np.ndarray,
                    test_metrics: list[tuple[str, float]], name: str | None = None,
                    tags: dict[str, str] | None = None) -> float:
    """Log what every training run ends with (every task): its test metrics, step time, best validation loss,
    the zero forecast's validation loss (same units as val/loss), the share of steps clipped, and the
    divergence tags; a diverged run's name gets the suffix " [diverged]" (visible at a glance in the UI's run
    lists); ``tags``: more tags, in the same call. Returns the zero forecast's validation loss."""
    zero_val = float(np.mean(np.square(val_y, dtype=np.float64)))
    final = [(k, float(v), result.steps) for k, v in test_metrics]
    final += [("time/step_ms", result.step_ms, result.steps), ("best_val_loss", result.best_val_loss, result.steps),
              ("baseline_naive/val_loss", zero_val, result.steps),
              ("grad/clip_rate", float(np.mean(result.history["clipped"])) if result.steps else math.nan,
               result.steps)]
    run.log_values([(k, v, s) for k, v, s in final if math.isfinite(v)], tags={
        "fincast.diverged": str(result.diverged).lower(),
        "fincast.stop_reason": result.stop_reason,
        **({"fincast.diverged_step": result.diverged_step, "fincast.diverged_reason": result.diverged_reason}
           if result.diverged else {}),
        **({"mlflow.runName": f"{name} {DIVERGED_SUFFIX}"} if result.diverged and name else {}),
        **(tags or {}),
    })
    return zero_val


def log_model(run: tracking.Run, model: torch.nn.Module, example: np.ndarray, device: torch.device,
              fmt: str = "pickle") -> None:
    """Log the model with an input example and its prediction (the signature), computed on the CPU; ``fmt``:
    tracking.model_format (pickle ships fincast's code beside the model, so it loads without fincast)."""
    with torch.no_grad():
        prediction = model.cpu().eval()(torch.as_tensor(example)).numpy()
    run.log_model(model, example, prediction, fmt=fmt, code_paths=[str(Path(fincast.__file__).parent)])
    model.to(device)


def metric_name(text: str) -> str:
    """'Max. Drawdown [%]' -> 'max_drawdown_pct' (MLflow metric names)."""
    text = text.replace("[%]", "pct").replace("[x]", "x").replace("(ann.)", "ann").replace("R2", "r2")
    return "_".join(w for w in "".join(c.lower() if c.isalnum() else " " for c in text).split())


def summary_head(out: TrainOutcome, seconds: float, unit: str) -> list[str]:
    """The first lines of ``fincast train``'s summary, every task."""
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


def summary_tail(out: TrainOutcome) -> list[str]:
    """The last lines of ``fincast train``'s summary: how to resume, data warnings."""
    lines = []
    if out.checkpoint:
        where = Path(out.checkpoint).parent
        flag = "" if where == Path("checkpoints") else f" --checkpoint-dir {where}"
        lines.append(f"  checkpoint {out.checkpoint}: continue with  fincast resume {out.run_id}{flag}")
    if out.warnings:
        lines.append(f"  data warnings: {len(out.warnings)} (see data_warnings.txt in the run's artifacts)")
    return lines
