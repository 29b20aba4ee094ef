"""``fincast export RUN_ID`` (layer L4, runs): log any run's trained model as an MLflow model on demand. A
study's runs keep their weights in one file per batch on the parent run (``runs.weights``) instead of each
exporting a model; this rebuilds the run's model from its own config.yaml, loads its weights, and logs the model
into the run with an input example from its data (read from the cache; the data's fingerprint must match)."""

from __future__ import annotations

import dataclasses
import math
import tempfile
from dataclasses import dataclass

import torch

from fincast import config as config_mod
from fincast import tracking
from fincast.config import FincastError, TrackingConfig
from fincast.runs import registry, weights
from fincast.runs.record import log_model


@dataclass
class Exported:
    run_id: str
    run_name: str
    tracking_uri: str
    parameters: int


def export(run_id: str, *, tracking_uri: str | None = None) -> Exported:
    """Log run ``run_id``'s model (weights from its batch file) as an MLflow model in that run."""
    uri = tracking.resolve_uri(TrackingConfig(uri=tracking_uri))
    run = tracking.get_run(run_id, TrackingConfig(uri=uri))
    tags = run.data.tags
    where, parent = tags.get(weights.WEIGHTS_TAG), tags.get("mlflow.parentRunId")
    if where is None or parent is None:
        raise FincastError(f"run {run_id} has no weights file on a parent run (tag {weights.WEIGHTS_TAG}): only a "
                           "study's runs keep their weights that way; a single run logs its model itself, and a run "
                           "with no finite validation epoch has no weights to export")
    with tempfile.TemporaryDirectory() as tmp:
        cfg = config_mod.from_dict(config_mod.read_yaml(tracking.download_artifact(uri, run_id, "config.yaml", tmp)),
                                   f"config.yaml of run {run_id}")
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, refresh_after_hours=math.inf))  # the cache
    task = registry.task(cfg.task)
    data = task.load(cfg)
    if data.fingerprint != tags.get("fincast.data_fingerprint"):
        raise FincastError(f"run {run_id} trained on data with fingerprint {tags.get('fincast.data_fingerprint')}; "
                           f"the data here have {data.fingerprint}: its input example would not be its own")
    splits = task.prepare(cfg, data)
    model = task.build_model(cfg, splits)
    model.load_state_dict(weights.load(uri, run_id, parent, where))
    log_model(tracking.attach(uri, run_id), model, splits.test.x[:2], torch.device("cpu"), fmt=cfg.tracking.model_format)
    return Exported(run_id, run.info.run_name, uri, sum(p.numel() for p in model.parameters()))


