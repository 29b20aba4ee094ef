"""Trained weights without an MLflow model per run (layer L4, runs): a study's runs, instead of each exporting
a model (torch.export and a logged model: seconds each), put their weights into one weights-only file per batch
on the parent run, and each run is tagged with where its weights are. ``fincast export RUN_ID`` turns any of
them into an MLflow model when it is wanted (``fincast.runs.export``)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from fincast import tracking
from fincast.config import FincastError

WEIGHTS_TAG = "fincast.weights"  # on a run: the parent run's artifact holding its weights
FORMAT = 1


def save_batch(uri: str, parent_run_id: str, trained: list[tuple[str, torch.nn.Module]]) -> str | None:
    """One file with the weights of ``trained`` runs ((run id, model)), logged to the parent run under
    ``weights/``. Returns its artifact path (None: nothing to save), which each run records as its tag
    ``fincast.weights`` (``WEIGHTS_TAG``) when it closes."""
    if not trained:
        return None
    name = f"{trained[0][0]}.pt"
    payload = {"format": FORMAT,
               "runs": {run_id: {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
                        for run_id, model in trained}}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        torch.save(payload, path)
        tracking.attach(uri, parent_run_id).log_artifact(path, "weights")
    return f"weights/{name}"


def load(uri: str, run_id: str, parent_run_id: str, where: str) -> dict[str, torch.Tensor]:
    """Run ``run_id``'s weights from its batch's file on the parent run."""
    with tempfile.TemporaryDirectory() as tmp:
        path = tracking.download_artifact(uri, parent_run_id, where, tmp)
        saved = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(saved, dict) or saved.get("format") != FORMAT or run_id not in saved.get("runs", {}):
        raise FincastError(f"{where} of run {parent_run_id} holds no weights of run {run_id}")
    return saved["runs"][run_id]
