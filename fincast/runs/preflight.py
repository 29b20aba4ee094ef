"""Where a run writes, checked before its work (layer L4, runs): the MLflow store (a local SQLite file or file
store), the artifact folder, the checkpoint folder and the report folders. Every entry point (train, resume, a
study, a sweep, a backtest) calls :func:`check_outputs` before it loads data or opens an MLflow run, so a path
it cannot write ends in one clear error instead of a trained run marked FAILED, or a traceback.

A folder that does not exist yet passes when it can be created: its nearest existing ancestor is a folder this
process can write (a file is created there and removed at once). Nothing is left behind: no folder, no store."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import unquote, urlparse

from fincast.config import FincastError, PipelineConfig
from fincast.tracking import resolve_uri, sqlite_file

Location = tuple[str, Path, str]  # (what it is for, path, "dir" | "file")


class OutputError(FincastError):
    """A place a run would write to cannot be written (found before any data are loaded or any step trained)."""


def store_locations(key: str, uri: str, name: str = "the MLflow store") -> list[Location]:
    """What a store URI (the setting ``key``) writes on this machine: a SQLite database file and its folder
    (``sqlite:///PATH``), a file store's folder (``file:///PATH`` or a plain path); nothing for a server or an
    in-memory database."""
    folder = f"{key} ({name}'s folder)"
    if uri.startswith("sqlite:"):
        path = sqlite_file(uri)
        if path is None:
            return []
        return [(folder, path.parent, "dir"), (f"{key} ({name}'s database)", path, "file")]
    scheme = urlparse(uri).scheme
    if scheme == "file":
        return [(folder, Path(unquote(urlparse(uri).path)), "dir")]
    if not scheme and uri not in ("databricks", "databricks-uc"):  # a plain path: MLflow's file store
        return [(folder, Path(uri), "dir")]
    return []


def run_locations(cfg: PipelineConfig, *, checkpoints: bool | None = None) -> list[Location]:
    """The MLflow store, the experiment's artifact folder (a local store's) and, when the run saves checkpoints
    (``checkpoints``, default: train.checkpoint or train.checkpoint_every), the checkpoint folder."""
    uri = resolve_uri(cfg.tracking)
    out = store_locations("tracking.uri", uri)
    if uri.startswith("sqlite:"):  # a server keeps the artifacts itself; a file store inside its folder
        experiment = cfg.tracking.experiment or cfg.name
        out.append((f"tracking.artifact_dir (experiment {experiment}'s artifacts)",
                    Path(cfg.tracking.artifact_dir) / experiment, "dir"))
    if checkpoints if checkpoints is not None else (cfg.train.checkpoint or cfg.train.checkpoint_every):
        out.append(("train.checkpoint_dir (checkpoints)", Path(cfg.train.checkpoint_dir), "dir"))
    return out


def check_outputs(cfgs: Iterable[PipelineConfig], *, reports: Iterable[tuple[str, Path]] = (),
                  stores: Iterable[tuple[str, str]] = (), checkpoints: bool | None = None) -> None:
    """Raise :class:`OutputError` naming every place the runs of ``cfgs`` would write that cannot be written:
    their :func:`run_locations`, the report folders ``reports`` ((what, path)) and the stores ``stores`` ((what,
    setting, URI or URL), e.g. an Optuna storage)."""
    places = [loc for cfg in cfgs for loc in run_locations(cfg, checkpoints=checkpoints)]
    places += [(what, Path(path), "dir") for what, path in reports]
    places += [loc for key, url in stores for loc in store_locations(key, url, "the Optuna storage")]
    check(places)


def check(places: Iterable[Location]) -> None:
    """Raise :class:`OutputError` listing each of ``places`` that cannot be written (each once; not a place
    inside one already listed)."""
    problems, seen, failed = [], set(), []
    for what, path, kind in places:
        path = Path(os.path.abspath(path))
        if (path, kind) in seen or any(f == path or f in path.parents for f in failed):
            continue
        seen.add((path, kind))
        reason = problem(path, kind)
        if reason is not None:
            failed.append(path)
            problems.append(f"{what} {path} is not writable: {reason}")
    if problems:
        head = problems[0] if len(problems) == 1 else "\n  ".join(["outputs that cannot be written:", *problems])
        raise OutputError(f"{head}\n  (checked before any work: nothing was loaded, trained or recorded; fix the "
                          "permissions or point the setting elsewhere)")


def problem(path: Path, kind: str = "dir") -> str | None:
    """Why this process cannot write ``path`` (a folder, or with kind "file" a file), or None when it can: an
    existing folder takes a new file, an existing file opens for writing, a missing one can be created."""
    try:
        if path.exists():
            if kind == "file":
                if path.is_dir():
                    return "it is a folder, not a file"
                with open(path, "r+b"):  # opened for writing, nothing written
                    return None
            return "it is a file, not a folder" if not path.is_dir() else _try_write(path)
        parent = next(p for p in (path, *path.parents) if os.path.lexists(p))
        if not parent.is_dir():
            return f"it cannot be created: {parent} is {'a file' if parent.exists() else 'a broken link'}, not a folder"
        reason = _try_write(parent)
        return None if reason is None else f"it cannot be created in {parent}: {reason}"
    except OSError as exc:
        return exc.strerror or str(exc)


def _try_write(folder: Path) -> str | None:
    try:
        fd, name = tempfile.mkstemp(dir=folder, prefix=".fincast-write-check-")
    except OSError as exc:
        return exc.strerror or str(exc)
    os.close(fd)
    os.unlink(name)
    return None
