"""Parquet cache of downloaded bars: one file per ticker and interval in ``data.cache_dir``.

Files are written atomically (temporary file in the same folder, fsync, rename), so a crash or a
concurrent reader never sees half a file. Each file carries metadata: when it was fetched and from
which start date it was requested, so a rerun can decide without a network call whether it is fresh.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from fincast.config import atomic_file

_META_KEY = b"fincast.cache"


@dataclass
class CacheEntry:
    frame: pd.DataFrame
    fetched_at: dt.datetime  # UTC
    requested_start: dt.date | None  # None = full history was asked for
    requested_end: dt.date | None = None  # None = up to the latest bar at fetched_at

    @property
    def last_date(self) -> dt.date:
        return self.frame.index[-1].date()

    def covers_end(self, end: dt.date | None) -> bool:
        """Whether the fetch behind this cache reached as far as ``end`` (None = the latest bar)."""
        if self.requested_end is None:
            return True
        return end is not None and end <= self.requested_end

    def covers_start(self, start: dt.date | None) -> bool:
        if self.requested_start is None:
            return True
        return start is not None and start >= self.requested_start


def path_for(cache_dir: str | Path, ticker: str, interval: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", ticker)  # ^GSPC -> _GSPC, keeps BTC-USD
    return Path(cache_dir) / f"{safe}_{interval}.parquet"


def read(path: Path) -> CacheEntry | None:
    if not path.is_file():
        return None
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException):
        return None  # unreadable cache: treated as absent and rewritten on the next fetch
    meta = json.loads((table.schema.metadata or {}).get(_META_KEY, b"{}"))
    frame = table.to_pandas()
    if frame.empty or "fetched_at" not in meta:
        return None
    frame.index = pd.DatetimeIndex(frame.index, name="date")
    start, end = meta.get("requested_start"), meta.get("requested_end")
    return CacheEntry(frame, dt.datetime.fromisoformat(meta["fetched_at"]),
                      dt.date.fromisoformat(start) if start else None, dt.date.fromisoformat(end) if end else None)


def write(path: Path, frame: pd.DataFrame, *, fetched_at: dt.datetime, requested_start: dt.date | None,
          requested_end: dt.date | None = None) -> None:
    """Atomically replace ``path`` with ``frame`` and its metadata."""
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pandas(frame, preserve_index=True)
    meta = dict(table.schema.metadata or {})
    meta[_META_KEY] = json.dumps({
        "fetched_at": fetched_at.isoformat(),
        "requested_start": requested_start.isoformat() if requested_start else None,
        "requested_end": requested_end.isoformat() if requested_end else None,
    }).encode()
    table = table.replace_schema_metadata(meta)
    with atomic_file(path) as fh:
        pq.write_table(table, fh)
