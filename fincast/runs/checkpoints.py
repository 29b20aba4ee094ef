"""A run's checkpoint files (layer L4, runs): what they hold, written atomically, read with clear errors, and
the lock a resume holds beside them."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from filelock import FileLock, Timeout

import fincast
from fincast import config as config_mod
from fincast.config import FincastError, PipelineConfig

# the keys a resumed run may change (``fincast resume RUN --set ...``); every other key is the run's own
RESUME_KEYS = {"train.epochs", "train.max_steps", "train.patience", "train.threads", "train.checkpoint_every",
               "tracking.log_every", "tracking.metric_every"}
CHECKPOINT_FORMAT = 1


def save_checkpoint(path: Path, payload: dict) -> None:
    """torch.save, atomically: a crash mid-write leaves the previous checkpoint intact."""
    with config_mod.atomic_file(path) as fh:
        torch.save(payload, fh)


def load_checkpoint(path: Path) -> dict:
    if not path.is_file():
        raise FincastError(f"no checkpoint {path}: runs save one at each epoch end into train.checkpoint_dir "
                           "(unless train.checkpoint=false); pass --checkpoint-dir if it is elsewhere")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated or foreign file
        raise FincastError(f"checkpoint {path} cannot be read: {exc}") from None
    if not isinstance(saved, dict) or saved.get("format") != CHECKPOINT_FORMAT:
        raise FincastError(f"checkpoint {path}: not a fincast checkpoint of format {CHECKPOINT_FORMAT}")
    return saved


@contextlib.contextmanager
def resume_lock(path: Path, run_id: str, *, training: bool = False) -> Iterator[None]:
    """Hold run ``run_id``'s resume lock (``<run id>.lock`` beside its checkpoint ``path``) for the block: a second
    resume of the run meanwhile is refused (it would train the same steps again into the same MLflow run). The
    lock is the OS's: it goes with the process, also when it crashes. Under torchrun rank 0 takes it for all ranks;
    without a checkpoint file there is nothing to lock (``load_checkpoint`` says so). ``training``: the run's
    first training holds it too (its checkpoint is still to come), so a resume cannot start beside it."""
    if int(os.environ.get("RANK", "0")) != 0 or not (training or path.is_file()):
        yield
        return
    lock = path.with_suffix(".lock")
    held = FileLock(lock, timeout=0)
    try:
        held.acquire()
    except Timeout:
        raise FincastError(f"run {run_id} is being trained or resumed by another process, which holds {lock}; a "
                           "second resume would train its steps again into the same MLflow run. Wait for that one to "
                           "end (or stop it), then resume again if the run is not finished") from None
    try:
        yield
    finally:
        held.release()


def checkpointer(cfg: PipelineConfig, run_id: str, fingerprint: str) -> tuple[Callable[[dict], None] | None,
                                                                              Path | None]:
    """(the function that saves run ``run_id``'s training state, its file), or (None, None) without checkpoints."""
    if not (cfg.train.checkpoint or cfg.train.checkpoint_every):
        return None, None
    path = Path(cfg.train.checkpoint_dir) / f"{run_id}.pt"
    common = {"format": CHECKPOINT_FORMAT, "run_id": run_id, "config": config_mod.to_dict(cfg),
              "data_fingerprint": fingerprint, "fincast_version": fincast.__version__}

    def save(state: dict) -> None:
        save_checkpoint(path, {**common, **state})

    return save, path
