"""A run's checkpoint files (layer L4, runs): what they hold, written atomically, read with clear errors."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

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
