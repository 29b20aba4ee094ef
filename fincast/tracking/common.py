"""What the tracking room shares without importing mlflow: where the store is, SQLite tuning, errors, the
limits of a batch, and the writer process's message loop helpers."""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from fincast.config import FincastError, TrackingConfig

log = logging.getLogger("fincast.tracking")


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


def _tune_sqlite(uri: str) -> None:
    """Put a local SQLite store in WAL mode (a persistent setting of the file): commits cost one fsync instead
    of three, and readers (the report, the UI) never block the runs writing. Study workers write at once."""
    path = sqlite_file(uri)
    if path is None:
        return
    try:
        with contextlib.closing(sqlite3.connect(path, timeout=30)) as con:
            con.execute("PRAGMA journal_mode=WAL")
    except sqlite3.Error as exc:  # e.g. a file system without shared memory: the default journal still works
        log.debug("could not switch %s to WAL: %s", uri, exc)


def sqlite_file(uri: str) -> Path | None:
    """The database file of a local SQLite store (``sqlite:///PATH``); None for any other store."""
    path = uri[len("sqlite:///"):].split("?", 1)[0] if uri.startswith("sqlite:///") else ""
    return Path(path) if path and path != ":memory:" else None


def _in_wal(path: Path) -> bool:
    """Whether the SQLite file ``path`` is in WAL mode (bytes 18 and 19 of its header are 2)."""
    try:
        with open(path, "rb") as fh:
            header = fh.read(20)
    except OSError:
        return False
    return len(header) == 20 and header[18] == 2 and header[19] == 2


STORE_LOCK_SECONDS = 300.0


def ensure_store(uri: str, open_store: Callable[[], object]) -> None:
    """Create a local SQLite store once, however many processes start on it at once: its first open
    (``open_store()``: MLflow creates the tables of a new file) and the switch to WAL run under a lock file beside
    the database (``<db>.lock``), one process at a time. Unserialised, processes opening a new store together
    collide in MLflow's schema migrations (``table _alembic_tmp_experiments already exists``) and lose their runs.
    A file in WAL mode is done: the switch comes only after a first open has created every table (the check reads
    20 bytes, so a created store costs its openers nothing). Other stores: nothing to do."""
    path = sqlite_file(uri)
    if path is None or _in_wal(path):
        return
    path.parent.mkdir(parents=True, exist_ok=True)  # (as MLflow would)
    lock = f"{path}.lock"
    try:
        with FileLock(lock, timeout=STORE_LOCK_SECONDS):
            if not _in_wal(path):
                open_store()
                _tune_sqlite(uri)
    except Timeout:
        raise TrackingError(f"cannot open the MLflow store {path}: another process has been creating it for "
                            f"{STORE_LOCK_SECONDS:.0f} s (it holds {lock}); retry when it is done, or stop it") from None


class TrackingError(FincastError):
    """The tracking store cannot be used (unreachable server, unreadable database, ...)."""


class WriterError(TrackingError):
    """The metric writer could not open the store or store a value."""


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` (of this machine) still runs."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _receive(inbox: Any, parent: int) -> tuple | None:
    """The next message, or None once the trainer is gone (nothing more will come)."""
    while True:
        try:
            return inbox.get(timeout=2.0)
        except queue.Empty:
            if not pid_alive(parent):  # (under forkserver the writer's parent is the server)
                return None


def _param_str(v: Any) -> str:
    s = str(v) if not isinstance(v, list | tuple) else "[" + ", ".join(map(str, v)) + "]"
    return s if len(s) <= _PARAM_LEN else s[: _PARAM_LEN - 3] + "..."


STUDY_TAG, ROLE_TAG, HASH_TAG = "fincast.study", "fincast.study_role", "fincast.config_hash"
DIVERGED_SUFFIX = "[diverged]"  # appended to a diverged run's MLflow name
