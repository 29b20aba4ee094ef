"""MLflow tracking (layer L1): the only module that imports mlflow.

Store: ``tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db`` in the working
directory, with artifacts of new experiments under ``tracking.artifact_dir`` (``mlartifacts/``).
A team points ``MLFLOW_TRACKING_URI`` at an MLflow server instead; nothing else changes.

Everything goes through an explicit ``MlflowClient`` and run id (no fluent active-run state), and
metrics are sent in batches (``log_batch``): one call per flush instead of one per value, because a
single ``log_metric`` costs milliseconds on SQLite, as much as a training step of a small model.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from fincast.config import TrackingConfig

logging.getLogger("mlflow").setLevel(logging.WARNING)  # mlflow sets INFO on import; keep its chatter out

_MAX_METRICS, _MAX_PARAMS, _MAX_TAGS = 1000, 100, 100  # MLflow's log_batch limits
_PARAM_LEN = 6000


def resolve_uri(cfg: TrackingConfig) -> str:
    if cfg.uri:
        return cfg.uri
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{Path('mlflow.db').resolve()}"


def _is_local(uri: str) -> bool:
    return uri.startswith("sqlite:")


def _experiment_id(client: MlflowClient, name: str, uri: str, artifact_dir: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    location = (Path(artifact_dir).resolve() / name).as_uri() if _is_local(uri) else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:  # created meanwhile by a parallel process
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


class Run:
    """One MLflow run, written through an explicit client."""

    def __init__(self, client: MlflowClient, run_id: str, uri: str):
        self.client = client
        self.run_id = run_id
        self.uri = uri

    # -- values ------------------------------------------------------------------------------
    def log_params(self, params: dict[str, Any]) -> None:
        items = [Param(k, _param_str(v)) for k, v in params.items()]
        for i in range(0, len(items), _MAX_PARAMS):
            self.client.log_batch(self.run_id, params=items[i:i + _MAX_PARAMS])

    def set_tags(self, tags: dict[str, Any]) -> None:
        items = [RunTag(k, str(v)) for k, v in tags.items()]
        for i in range(0, len(items), _MAX_TAGS):
            self.client.log_batch(self.run_id, tags=items[i:i + _MAX_TAGS])

    def log_metrics(self, rows: Iterable[tuple[str, float, int]]) -> None:
        """rows of (key, value, step), sent in as few calls as MLflow allows."""
        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, int(s)) for k, v, s in rows]
        for i in range(0, len(items), _MAX_METRICS):
            self.client.log_batch(self.run_id, metrics=items[i:i + _MAX_METRICS])

    # -- files -------------------------------------------------------------------------------
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_text(self, text: str, name: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            p = Path(tmp) / name
            p.write_text(text)
            self.log_artifact(p)

    def log_model(self, model: Any, example: np.ndarray, prediction: np.ndarray) -> str:
        """Log a torch model with its signature and input example; returns the model URI."""
        import torch
        from mlflow import pytorch as mlflow_pytorch
        from mlflow.models import infer_signature

        signature = infer_signature(example, prediction)
        mlflow.set_tracking_uri(self.uri)
        with mlflow.start_run(run_id=self.run_id, log_system_metrics=False), warnings.catch_warnings():
            # torch.export (MLflow's default pt2 format) warns about nn.LSTM's flat weights; harmless
            warnings.filterwarnings("ignore", message=".*were assigned during export.*")
            info = mlflow_pytorch.log_model(
                model, name="model", signature=signature, input_example=example,
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
            )
        return info.model_uri

    def end(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status)

    @property
    def artifact_uri(self) -> str:
        return self.client.get_run(self.run_id).info.artifact_uri


def start_run(cfg: TrackingConfig, experiment: str, run_name: str, tags: dict[str, Any] | None = None) -> Run:
    uri = resolve_uri(cfg)
    client = MlflowClient(tracking_uri=uri)
    exp_id = _experiment_id(client, experiment, uri, cfg.artifact_dir)
    run = client.create_run(exp_id, run_name=run_name, tags={k: str(v) for k, v in (tags or {}).items()})
    return Run(client, run.info.run_id, uri)


def get_run(run_id: str, cfg: TrackingConfig) -> Any:
    """The stored run (info, data.params, data.tags, data.metrics) for tests and reports."""
    return MlflowClient(tracking_uri=resolve_uri(cfg)).get_run(run_id)


def metric_history(run_id: str, key: str, cfg: TrackingConfig) -> list[tuple[int, float]]:
    client = MlflowClient(tracking_uri=resolve_uri(cfg))
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def list_artifacts(run_id: str, cfg: TrackingConfig, path: str | None = None) -> list[str]:
    client = MlflowClient(tracking_uri=resolve_uri(cfg))
    return [a.path for a in client.list_artifacts(run_id, path)]


def _param_str(v: Any) -> str:
    s = str(v) if not isinstance(v, list | tuple) else "[" + ", ".join(map(str, v)) + "]"
    return s if len(s) <= _PARAM_LEN else s[: _PARAM_LEN - 3] + "..."
