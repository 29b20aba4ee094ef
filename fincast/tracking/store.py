"""MLflow itself (layer L1, tracking): the only module that imports mlflow. Runs, batches of metrics, the writer
process's storing loop, and a study's runs found by tags."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import tempfile
import time
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no download bars in reports and tests

import mlflow  # noqa: E402
import numpy as np  # noqa: E402
from mlflow.entities import Metric, Param, RunTag  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from fincast.config import TrackingConfig  # noqa: E402
from fincast.tracking import series  # noqa: E402
from fincast.tracking.common import (  # noqa: E402
    _MAX_METRICS,
    _MAX_PARAMS,
    _MAX_TAGS,
    HASH_TAG,
    ROLE_TAG,
    STUDY_TAG,
    TrackingError,
    WriterError,
    _is_local,
    _param_str,
    _receive,
    ensure_store,
    resolve_uri,
)

log = logging.getLogger("fincast.tracking")
logging.getLogger("mlflow").setLevel(logging.WARNING)  # mlflow sets INFO on import; keep its chatter out


def _client(uri: str) -> MlflowClient:
    """A client of the store ``uri`` (whose making opens the store). A new local SQLite store is created first, by
    one process at a time (``common.ensure_store``): every client of this module comes from here."""
    ensure_store(uri, lambda: MlflowClient(tracking_uri=uri))
    return MlflowClient(tracking_uri=uri)  # (MLflow keeps the store it opened: this costs nothing more)


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

    def __init__(self, client: MlflowClient, run_id: str, uri: str, writer: Any = None):
        # writer: a tracking.writer.MetricWriter, or None (metrics stored from this process); not imported here
        # because the writer imports this module (its process runs _writer_main)
        self.client = client
        self.run_id = run_id
        self.uri = uri
        self.writer = writer
        self.held: list[tuple[str, float, int]] | None = None  # metrics held until the next log_values or flush

    def hold_metrics(self) -> None:
        """Hold the metrics logged from now on and send them with the next ``log_values`` (the run's closing
        values) or ``flush``/``end``: one MLflow call where there would be one per ``log_metrics`` (each ~5 ms
        on SQLite). For the runs of a study, whose per-step series are in the stack's file on the parent run
        anyway; their UI charts appear when they close."""
        if self.writer is None:
            self.held = []

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
        """rows of (key, value, step), sent in as few calls as MLflow allows (through the writer process
        when the run has one: then this returns at once and ``flush()`` waits for them)."""
        now = int(time.time() * 1000)
        rows = [(k, float(v), int(s)) for k, v, s in rows]
        if self.held is not None:
            self.held += rows
        elif self.writer is not None:
            self.writer.put(self.run_id, rows, now)
        else:
            _log_rows(self.client, self.run_id, rows, now)

    def log_values(self, metrics: Iterable[tuple[str, float, int]] = (), params: dict[str, Any] | None = None,
                   tags: dict[str, Any] | None = None) -> None:
        """Metrics (key, value, step), params and tags in one MLflow call when they fit one ``log_batch`` (each
        call costs ~5 ms on SQLite whatever it holds); metrics go through the writer process when the run has
        one."""
        rows = [(k, float(v), int(s)) for k, v, s in metrics]
        if self.held:
            rows, self.held = self.held + rows, []
        if self.writer is not None and rows:
            self.log_metrics(rows)
            rows = []
        p = [Param(k, _param_str(v)) for k, v in (params or {}).items()]
        t = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
        if len(rows) <= _MAX_METRICS and len(p) <= _MAX_PARAMS and len(t) <= _MAX_TAGS \
                and len(rows) + len(p) + len(t) <= _MAX_METRICS:
            if rows or p or t:
                now = int(time.time() * 1000)
                self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, s) for k, v, s in rows], params=p,
                                      tags=t)
            return
        _log_rows(self.client, self.run_id, rows, int(time.time() * 1000))
        self.log_params(params or {})
        self.set_tags(tags or {})

    def flush(self) -> None:
        """Wait until every metric sent so far is stored (the held ones sent now)."""
        if self.held:
            rows, self.held = self.held, []
            _log_rows(self.client, self.run_id, rows, int(time.time() * 1000))
        if self.writer is not None:
            self.writer.flush()

    # -- files -------------------------------------------------------------------------------
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_files(self, files: list[Path]) -> None:
        """Log files as artifacts at the run's root: one MLflow call when they are a folder's whole content."""
        files = [Path(f) for f in files]
        folders = {f.parent for f in files}
        if len(files) > 1 and len(folders) == 1 and sorted(files) == sorted(next(iter(folders)).iterdir()):
            self.client.log_artifacts(self.run_id, str(next(iter(folders))))
            return
        for f in files:
            self.log_artifact(f)

    def log_text(self, text: str, name: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            p = Path(tmp) / name
            p.write_text(text)
            self.log_artifact(p)

    def log_model(self, model: Any, example: np.ndarray, prediction: np.ndarray, *, fmt: str = "pt2",
                  code_paths: list[str] | None = None) -> str:
        """Log a torch model (on the CPU) with its signature and input example; returns the model URI. ``fmt``:
        "pt2" (torch.export: a graph, no pickle; loads on the CPU) or "pickle" (the module pickled, with
        ``code_paths`` beside it for its classes; loads on any device)."""
        import torch
        from mlflow import pytorch as mlflow_pytorch
        from mlflow.models import infer_signature

        signature = infer_signature(example, prediction)
        mlflow.set_tracking_uri(self.uri)
        with mlflow.start_run(run_id=self.run_id, log_system_metrics=False), warnings.catch_warnings(), \
                _cpu_prediction(), _quiet("mlflow.pytorch"):
            # torch.export (MLflow's default pt2 format) warns about nn.LSTM's flat weights; harmless
            warnings.filterwarnings("ignore", message=".*were assigned during export.*")
            info = mlflow_pytorch.log_model(
                model, name="model", signature=signature, input_example=example, serialization_format=fmt,
                code_paths=code_paths if fmt == "pickle" else None,
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
            )
        return info.model_uri

    def end(self, status: str = "FINISHED") -> None:
        """Wait for every metric, then close the run; a run whose metrics could not be stored is FAILED."""
        try:
            self.flush()
        except BaseException as exc:  # (stopped meanwhile: KILLED)
            stopped = isinstance(exc, KeyboardInterrupt)
            self.client.set_terminated(self.run_id, "KILLED" if stopped else "FAILED" if status == "FINISHED" else status)
            raise
        self.client.set_terminated(self.run_id, status)

    @property
    def artifact_uri(self) -> str:
        return self.client.get_run(self.run_id).info.artifact_uri


@contextlib.contextmanager
def _quiet(logger: str) -> Iterator[None]:
    """Only errors from ``logger`` for the block (MLflow warns on every pickled model that pickles run code when
    loaded: fincast's own models, loaded by their owners; docs/training.md says so once)."""
    log_ = logging.getLogger(logger)
    level = log_.level
    log_.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log_.setLevel(level)


@contextlib.contextmanager
def _cpu_prediction() -> Iterator[None]:
    """MLflow checks a logged model by loading it and predicting its input example, on the GPU when one is
    visible; a model exported (torch.export) from the CPU cannot load there, and MLflow prints "Got error: ...
    can't be loaded on 'cuda' device". The model is always logged from the CPU (portable), so its check runs
    there too (MLFLOW_DEFAULT_PREDICTION_DEVICE, unless the user set it)."""
    if os.environ.get("MLFLOW_DEFAULT_PREDICTION_DEVICE"):
        yield
        return
    os.environ["MLFLOW_DEFAULT_PREDICTION_DEVICE"] = "cpu"
    try:
        yield
    finally:
        os.environ.pop("MLFLOW_DEFAULT_PREDICTION_DEVICE", None)


def start_run(cfg: TrackingConfig, experiment: str, run_name: str, tags: dict[str, Any] | None = None,
              writer: Any = None, resume_run_id: str | None = None) -> Run:
    """A new run in ``experiment``, or, with ``resume_run_id``, that run reopened (status RUNNING again)."""
    uri = resolve_uri(cfg)
    if writer is not None:
        if writer.uri != uri:
            raise ValueError(f"the metric writer stores into {writer.uri}, the run is tracked in {uri}")
        try:
            writer.ready()
        except WriterError as exc:
            log.warning("%s; logging metrics from the training process instead", exc)
            writer = None
    try:
        client = _client(uri)
        if resume_run_id is not None:
            client.update_run(resume_run_id, status="RUNNING")
            for k, v in (tags or {}).items():
                client.set_tag(resume_run_id, k, str(v))
            return Run(client, resume_run_id, uri, writer)
        exp_id = _experiment_id(client, experiment, uri, cfg.artifact_dir)
        run = client.create_run(exp_id, run_name=run_name, tags={k: str(v) for k, v in (tags or {}).items()})
    except MlflowException as exc:
        raise TrackingError(f"cannot start an MLflow run in {uri}: {exc}") from None
    return Run(client, run.info.run_id, uri, writer)


def _log_rows(client: MlflowClient, run_id: str, rows: list[tuple[str, float, int]], now: int) -> None:
    """Metric rows through MLflow's public ``log_batch``, in as few calls as it allows."""
    items = [Metric(k, v, now, s) for k, v, s in rows]
    for i in range(0, len(items), _MAX_METRICS):
        client.log_batch(run_id, metrics=items[i:i + _MAX_METRICS])


def _writer_main(uri: str, inbox: Any, outbox: Any, parent: int) -> None:
    # Ctrl-C (SIGTERM, SIGHUP) may reach the whole process group; the trainer handles it and still flushes
    # through us (and we end when it is gone)
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    while True:  # the store is opened only when asked: a run that fails before tracking leaves no store
        message = _receive(inbox, parent)
        if message is None:
            return
        if message[0] == "open":
            break
        outbox.put((message[0], None))
        if message[0] == "close":
            return
    try:
        client = _client(uri)
        client.search_experiments(max_results=1)  # open (and on first use create) the store now
    except Exception as exc:
        outbox.put(("error", f"cannot open the MLflow store {uri}: {type(exc).__name__}: {exc}"))
        return
    outbox.put(("ready", None))
    failure = None
    while (message := _receive(inbox, parent)) is not None:
        kind, run_id, rows, now = message
        if kind == "rows":
            if failure is None:
                try:
                    _log_rows(client, run_id, rows, now)
                except Exception as exc:  # reported at the trainer's next flush or close
                    failure = f"{type(exc).__name__}: {exc}"
            continue
        outbox.put(("error", failure) if failure is not None else (kind, None))
        failure = None
        if kind == "close":
            return


def get_run(run_id: str, cfg: TrackingConfig) -> Any:
    """The stored run (info, data.params, data.tags, data.metrics) for tests and reports."""
    return _client(resolve_uri(cfg)).get_run(run_id)


def metric_history(run_id: str, key: str, cfg: TrackingConfig) -> list[tuple[int, float]]:
    client = _client(resolve_uri(cfg))
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def list_artifacts(run_id: str, cfg: TrackingConfig, path: str | None = None) -> list[str]:
    client = _client(resolve_uri(cfg))
    return [a.path for a in client.list_artifacts(run_id, path)]


def _search_all(client: MlflowClient, experiment_ids: list[str], filter_string: str) -> list[Any]:
    runs, token = [], None
    while True:
        page = client.search_runs(experiment_ids, filter_string, max_results=1000, page_token=token,
                                  order_by=["attributes.start_time ASC"])
        runs += list(page)
        token = page.token
        if not token:
            return runs


def preload_store(uri: str) -> None:
    """Import the store's code without opening it (SQLite: MLflow's SQLAlchemy store, ~1 s of imports), so that
    processes forked afterwards start with it imported and only open the store (~0.1 s). Nothing is connected:
    a connection must never be shared with a forked child."""
    if _is_local(uri):
        import mlflow.store.tracking.sqlalchemy_store  # noqa: F401


def open_store(uri: str) -> None:
    """Open (and cache, per process) the store's client: schema checks and engine set-up take ~1 s once."""
    _client(uri).search_experiments(max_results=1)


class StudyStore:
    """A study's runs in MLflow: one parent run (tag ``fincast.study_role=parent``) and its child runs (tags
    ``fincast.study=<name>``, ``fincast.config_hash``, ``mlflow.parentRunId``). The experiment is the study's
    name."""

    def __init__(self, cfg: TrackingConfig, study: str, *, create: bool = True):
        self.cfg, self.study, self.uri = cfg, study, resolve_uri(cfg)
        try:
            self.client = _client(self.uri)
            if create:
                self.experiment_id = _experiment_id(self.client, study, self.uri, cfg.artifact_dir)
            else:
                exp = self.client.get_experiment_by_name(study)
                if exp is None or exp.lifecycle_stage == "deleted":
                    names = [e.name for e in self.client.search_experiments(max_results=200)]
                    raise TrackingError(f"no study {study!r} in {self.uri} (experiments there: "
                                        f"{', '.join(names) or 'none'}); run `fincast study SPEC` first, or point "
                                        "--tracking-uri / MLFLOW_TRACKING_URI at the store it ran against")
                self.experiment_id = exp.experiment_id
        except MlflowException as exc:
            raise TrackingError(f"cannot open the MLflow store {self.uri}: {exc}") from None

    def runs(self, role: str) -> list[Any]:
        """Active runs of this study with the given role, oldest first."""
        return _search_all(self.client, [self.experiment_id],
                           f"tags.`{STUDY_TAG}` = '{self.study}' and tags.`{ROLE_TAG}` = '{role}'")

    def parent_run(self, params: dict[str, Any] | None = None) -> Run:
        """The study's parent run, reopened (status RUNNING) when it exists, else created with ``params``."""
        parents = self.runs("parent")
        if parents:
            run_id = parents[-1].info.run_id
            self.client.update_run(run_id, status="RUNNING")
            return Run(self.client, run_id, self.uri)
        run = self.client.create_run(self.experiment_id, run_name=f"study {self.study}",
                                     tags={STUDY_TAG: self.study, ROLE_TAG: "parent"})
        parent = Run(self.client, run.info.run_id, self.uri)
        if params:
            parent.log_params(params)
        return parent

    def settle(self, fingerprint: str | None = None, *, keep_failed: bool = False) -> set[str]:
        """Config hashes of the finished child runs that count (on data with ``fingerprint``, when given), after
        one pass that deletes what does not: unfinished runs (killed or failed attempts, to be redone; with
        ``keep_failed`` the FAILED ones stay, as the end of a study does), the older of two finished runs with
        one hash, and finished runs on other data (redone on the current data). Every run of a study then
        appears exactly once; deleted runs stay restorable until `mlflow gc`."""
        latest: dict[str, Any] = {}
        unfinished, stale = [], []
        for r in self.runs("child"):  # oldest first
            if keep_failed and r.info.status == "FAILED":
                continue
            if r.info.status != "FINISHED":
                unfinished.append(r.info.run_id)
            elif fingerprint not in (None, r.data.tags.get("fincast.data_fingerprint")):
                stale.append(r.info.run_id)
            else:
                h = r.data.tags.get(HASH_TAG, "")
                if h in latest:
                    unfinished.append(latest[h])
                latest[h] = r.info.run_id
        for run_id in unfinished + stale:
            self.client.delete_run(run_id)
        if unfinished:
            log.info("study %s: deleted %d unfinished or duplicate run(s) of an earlier attempt; they are redone",
                     self.study, len(unfinished))
        if stale:
            log.warning("study %s: the data changed since %d run(s) finished (now fingerprint %s); they are "
                        "deleted and redone on the current data", self.study, len(stale), fingerprint)
        return set(latest)

    def histories(self, parent_run_id: str, run_ids: list[str],
                  keys: list[str]) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
        """{key: {run_id: (steps, values)}} of the runs' per-step series: every step, from the stacks' series files
        on the parent run (``tracking.series``); a run without one (a study of an earlier version) falls back
        to its MLflow metric history."""
        with tempfile.TemporaryDirectory() as tmp:
            try:  # the folder in one call (one per file costs ~25 ms each)
                folder = Path(self.client.download_artifacts(parent_run_id, series.FOLDER, tmp))
                local = sorted(folder.glob("*.parquet"))
            except (MlflowException, OSError):
                local = []
            table = series.read(local, run_ids)
        out = series.histories(table, keys)
        missing = [r for r in run_ids if r not in out[keys[0]]] if keys else []
        if missing:
            older = metric_histories(self.uri, missing, keys)
            for key in keys:
                out[key].update(older[key])
        return out

    def download(self, run_id: str, path: str, dst: str | Path) -> Path | None:
        """An artifact of a run into ``dst``, or None when the run has none by that name."""
        try:
            return Path(self.client.download_artifacts(run_id, path, str(dst)))
        except (MlflowException, OSError):
            return None


def metric_histories(uri: str, run_ids: list[str], keys: list[str]) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """{key: {run_id: (steps, values)}} through MLflow's public API (one ``get_metric_history`` call per run and
    key, in 16 threads), steps ascending (a step logged twice, e.g. by a resumed run, keeps its latest value).
    For runs of a study prefer :meth:`StudyStore.histories`, which reads the stacks' series files."""
    from concurrent.futures import ThreadPoolExecutor

    client = _client(uri)
    out: dict[str, dict[str, list[tuple[int, int, float]]]] = {k: {} for k in keys}
    pairs = [(r, k) for r in run_ids for k in keys]
    with ThreadPoolExecutor(16) as pool:
        for (r, k), hist in zip(pairs, pool.map(lambda p: client.get_metric_history(*p), pairs)):
            if hist:
                out[k][r] = [(m.step, m.timestamp, m.value) for m in hist]
    result: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    for key, per_run in out.items():
        result[key] = {}
        for run_id, rows in per_run.items():
            rows.sort()  # by step, then timestamp: the last row of a step is its latest value
            steps = np.fromiter((r[0] for r in rows), np.int64, len(rows))
            values = np.fromiter((r[2] for r in rows), np.float64, len(rows))
            last = np.append(steps[1:] != steps[:-1], True)
            result[key][run_id] = (steps[last], values[last])
    return result


def download_artifact(uri: str, run_id: str, path: str, dst: str | Path) -> Path:
    """An artifact of a run into ``dst``; a clear error when the run has none by that name."""
    try:
        return Path(_client(uri).download_artifacts(run_id, path, str(dst)))
    except (MlflowException, OSError) as exc:
        raise TrackingError(f"run {run_id} in {uri} has no artifact {path!r} ({type(exc).__name__})") from None


def attach(uri: str, run_id: str) -> Run:
    """A handle to log more into an existing run (also a finished one) without changing its status."""
    return Run(_client(uri), run_id, uri)


def child_runs(uri: str, parent_run_id: str) -> list[Any]:
    """The active child runs of a run (tag ``mlflow.parentRunId``), oldest first."""
    client = _client(uri)
    try:
        exp = client.get_run(parent_run_id).info.experiment_id
    except MlflowException as exc:
        raise TrackingError(f"no run {parent_run_id} in {uri}: {exc}") from None
    return _search_all(client, [exp], f"tags.`mlflow.parentRunId` = '{parent_run_id}'")


def delete_runs(uri: str, run_ids: Iterable[str]) -> None:
    """Delete runs (restorable until `mlflow gc`)."""
    client = _client(uri)
    for run_id in run_ids:
        client.delete_run(run_id)
