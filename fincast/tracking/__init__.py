"""MLflow tracking (layer L1): mlflow is imported only in ``tracking.store``.

Store: ``tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db`` in the working
directory, with artifacts of new experiments under ``tracking.artifact_dir`` (``mlartifacts/``).
A team points ``MLFLOW_TRACKING_URI`` at an MLflow server instead; nothing else changes.

Everything goes through an explicit ``MlflowClient`` and run id (no fluent active-run state), and
metrics are sent in batches (``log_batch``): one call per flush instead of one per value, because a
single ``log_metric`` costs milliseconds on SQLite, as much as a training step of a small model.

Even batched, MLflow's ORM spends ~0.1 ms per stored value (docs/performance.md, metric logging), and
nothing here writes into MLflow's tables behind its API. So MLflow gets the per-step series at a cadence
(``tracking.metric_every``) and every step goes into a columnar file (``series``). By default (``tracking.metrics_writer: process``) a :class:`MetricWriter` process stores the batches:
it is started before the data loads, so its imports are done when training begins, and the trainer
only enqueues tuples. (MLflow's async logging thread was measured too and was slower:
it shares the trainer's GIL.) ``Run.end()`` waits until every metric is stored and raises if one failed.

Modules: ``common`` (store location, errors, limits), ``store`` (mlflow: runs, metrics, study queries), ``writer``
(the metric writer process), ``series`` (the per-step series files).
"""

from fincast.tracking.common import (
    DIVERGED_SUFFIX,
    HASH_TAG,
    ROLE_TAG,
    STUDY_TAG,
    TrackingError,
    WriterError,
    pid_alive,
    resolve_uri,
    sqlite_file,
)
from fincast.tracking.store import (
    Run,
    StudyStore,
    _log_rows,
    attach,
    child_runs,
    delete_runs,
    download_artifact,
    get_run,
    list_artifacts,
    metric_histories,
    metric_history,
    open_store,
    preload_store,
    start_run,
)
from fincast.tracking.writer import MetricWriter

__all__ = ["DIVERGED_SUFFIX", "HASH_TAG", "ROLE_TAG", "STUDY_TAG", "MetricWriter", "Run", "StudyStore", "TrackingError", "WriterError",
           "_log_rows", "attach", "child_runs", "delete_runs", "download_artifact", "get_run", "list_artifacts", "metric_histories",
           "metric_history", "open_store", "pid_alive", "preload_store", "resolve_uri", "sqlite_file", "start_run"]
