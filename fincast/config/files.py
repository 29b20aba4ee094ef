"""Errors and files of the config layer: fincast's error types, atomic writes (no half-written file after a
crash), and reading a YAML spec with a clear error."""

from __future__ import annotations

import contextlib
import os
import tempfile
import typing
from collections.abc import Iterator
from pathlib import Path

import yaml


class FincastError(Exception):
    """An error the user can fix (bad config, bad data, unreachable source). Printed without traceback."""


class ConfigError(FincastError):
    pass


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it; done once, at import, before any thread exists
    os.umask(mask)
    return mask


_UMASK = _umask()


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[typing.BinaryIO]:
    """A binary file handle whose content replaces ``path`` only when the block succeeds: readers see the old
    or the new file, never a half-written one (a crash leaves the old one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; a report or cache file is an ordinary file
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def atomic_write(path: str | Path, data: str | bytes) -> Path:
    with atomic_file(path) as fh:
        fh.write(data.encode() if isinstance(data, str) else data)
    return Path(path)


def read_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"pipeline spec {p}: file not found")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"pipeline spec {p}: not valid YAML: {exc}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"pipeline spec {p}: expected a mapping at the top level")
    return raw
