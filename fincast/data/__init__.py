"""Price data (layer L1): one contract for every source.

``load_prices(cfg.data)`` returns a :class:`Prices`: per ticker a DataFrame indexed by ``date`` with
float columns ``open, high, low, close, adj_close, volume`` (see ``validate``), sliced to
[data.start, data.end], checked, plus a fingerprint of exactly those frames.

Sources (``data.source``):

* ``yfinance``: daily bars from Yahoo, cached as parquet in ``data.cache_dir``. A cache younger than
  ``data.refresh_after_hours`` (or one that already reaches ``data.end``) is used without any network
  call; otherwise only the missing tail is fetched. If the adjustment of the overlapping bar changed
  (a dividend or split since the last fetch), the full history is fetched again so Adj Close stays
  consistent. When Yahoo is unreachable and a cache exists, the cache is used with a warning naming
  its last date; without a cache the error says how to continue offline.
* ``csv``: ``data.path`` holds one ``<TICKER>.csv`` per ticker (yfinance classic or multi-row header).
* ``synthetic``: seeded GARCH + jumps bars (``fincast.data.synthetic``).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from fincast.config import DataConfig
from fincast.data import cache, csvsource, plausible, synthetic
from fincast.data.validate import COLUMNS, DataError, normalize_columns, validate

__all__ = ["COLUMNS", "DataError", "Prices", "fingerprint", "load_prices", "offline_hint"]

log = logging.getLogger("fincast.data")


@dataclass
class Prices:
    frames: dict[str, pd.DataFrame]
    source: str
    fingerprint: str
    warnings: list[str] = field(default_factory=list)
    network_calls: int = 0


def fingerprint(frames: dict[str, pd.DataFrame]) -> str:
    """Stable hash of the exact frames used (tickers, dates, values)."""
    h = hashlib.sha256()
    for ticker in sorted(frames):
        h.update(ticker.encode())
        h.update(pd.util.hash_pandas_object(frames[ticker], index=True).to_numpy().tobytes())
    return h.hexdigest()[:16]


def offline_hint(tickers: list[str]) -> str:
    return (
        "To continue without Yahoo:\n"
        f"  * CSV files:  --set data.source=csv --set data.path=DIR   (DIR holds {tickers[0]}.csv etc. in "
        "yfinance's layout: Date,Open,High,Low,Close,Adj Close,Volume)\n"
        "  * synthetic:  --set data.source=synthetic                 (seeded, realistic bars; offline demo)\n"
        "  * the cache:  run `make data` once while online; later runs use data/ without the network\n"
        "  e.g.  make train ARGS=\"--set data.source=synthetic\"")


def _slice(df: pd.DataFrame, start: dt.date | None, end: dt.date | None) -> pd.DataFrame:
    if start is not None:
        df = df[df.index >= pd.Timestamp(start)]
    if end is not None:
        df = df[df.index <= pd.Timestamp(end)]
    return df


def _from_csv(cfg: DataConfig) -> dict[str, tuple[pd.DataFrame, str, Callable]]:
    directory = Path(cfg.path or ".")
    if not directory.is_dir():
        raise DataError(f"csv source: data.path = {directory} is not a directory")
    out = {}
    for ticker in cfg.tickers:
        p = csvsource.find_file(directory, ticker)
        frame, lines = csvsource.read_csv(p, ticker, cfg.date_format)
        out[ticker] = (normalize_columns(frame, str(p)), str(p), lines.get)
    return out


def _from_yahoo(cfg: DataConfig, *, refresh: bool, progress: bool, download, now: dt.datetime,
                counter: list[int]) -> tuple[dict[str, pd.DataFrame], list[str]]:
    from fincast.data import yahoo  # imports yfinance: only when the source is used

    deadline = time.monotonic() + cfg.timeout_s
    frames: dict[str, pd.DataFrame] = {}
    warnings: list[str] = []
    failed: dict[str, str] = {}

    def fetch(start: dt.date | None) -> pd.DataFrame:
        counter[0] += 1
        return yahoo.fetch(ticker, start, cfg.end, interval=cfg.interval, deadline=deadline,
                           retries=cfg.retries, download=download)

    bar = tqdm(cfg.tickers, desc="fetch", unit="ticker", disable=not progress, leave=False)
    for ticker in bar:
        bar.set_postfix_str(ticker)
        path = cache.path_for(cfg.cache_dir, ticker, cfg.interval)
        entry = cache.read(path)
        extendable = entry is not None and entry.covers_start(cfg.start)  # holds the requested start
        if extendable and not refresh:
            fresh = (math.isinf(cfg.refresh_after_hours)  # pinned: resumed runs, a study's workers
                     or (now - entry.fetched_at) < dt.timedelta(hours=cfg.refresh_after_hours))
            # fresh only counts if that fetch reached as far as this request (a cache fetched with an earlier
            # data.end must not pass for "up to the latest bar")
            if (fresh and entry.covers_end(cfg.end)) or (cfg.end is not None and entry.last_date >= cfg.end):
                frames[ticker] = entry.frame
                continue
        try:
            if extendable:
                tail = fetch(entry.last_date)
                old = entry.frame
                overlap = old.index[-1]
                if len(tail) and overlap in tail.index and not np.allclose(
                        old.loc[overlap, ["close", "adj_close"]].to_numpy(float),
                        tail.loc[overlap, ["close", "adj_close"]].to_numpy(float), rtol=1e-6):
                    warnings.append(f"{ticker}: Yahoo's adjustment of {overlap:%Y-%m-%d} changed since the cache was "
                                    "written (dividend or split); fetched the full history again")
                    full = fetch(entry.requested_start)
                else:
                    full = pd.concat([old[old.index < tail.index.min()] if len(tail) else old, tail])
                requested = entry.requested_start
            else:
                full = fetch(cfg.start)
                requested = cfg.start
        except yahoo.YahooError as exc:
            if entry is not None and not entry.frame.empty:
                first = entry.frame.index[0].date()
                later = (f", first date {first:%Y-%m-%d} (after data.start {cfg.start:%Y-%m-%d})"
                         if cfg.start is not None and first > cfg.start and not entry.covers_start(cfg.start) else "")
                warnings.append(f"{ticker}: {exc.reason}; using the cache in {path}, last date "
                                f"{entry.last_date:%Y-%m-%d}{later} (fetched {entry.fetched_at:%Y-%m-%d %H:%M} UTC)")
                frames[ticker] = entry.frame
            else:
                failed[ticker] = exc.reason
            continue
        if full.empty:
            failed[ticker] = "Yahoo answered with no bars for this range (unknown or delisted ticker?)"
            continue
        full = full[~full.index.duplicated(keep="last")].sort_index()
        cache.write(path, full, fetched_at=now, requested_start=requested, requested_end=cfg.end)
        frames[ticker] = full
    if failed:
        reasons = "\n".join(f"  {t}: {r}" for t, r in failed.items())
        raise DataError(
            f"Yahoo Finance did not deliver {', '.join(failed)} and {cfg.cache_dir}/ has no cache for "
            f"{'it' if len(failed) == 1 else 'them'}:\n{reasons}\n{offline_hint(list(failed))}")
    return frames, warnings


def load_prices(cfg: DataConfig, *, min_rows: int = 1, refresh: bool = False, progress: bool = False,
                download: Callable | None = None, now: dt.datetime | None = None, positive: bool = True) -> Prices:
    """Load, slice and validate the bars of every ticker in ``cfg.tickers``. ``positive=False`` accepts zero and
    negative values (interest-rate series)."""
    now = now or dt.datetime.now(dt.UTC)
    if now.tzinfo is None:
        now = now.replace(tzinfo=dt.UTC)
    counter = [0]
    warnings: list[str] = []
    raw: dict[str, tuple[pd.DataFrame, str, Callable | None]] = {}
    if cfg.source == "synthetic":
        for t in cfg.tickers:
            raw[t] = (synthetic.generate(t, cfg.start, cfg.end, seed=cfg.seed, calendar=cfg.calendar),
                      "synthetic", None)
    elif cfg.source == "csv":
        raw = _from_csv(cfg)
    else:
        frames, warnings = _from_yahoo(cfg, refresh=refresh, progress=progress, download=download, now=now,
                                       counter=counter)
        raw = {t: (f, f"yfinance cache {cache.path_for(cfg.cache_dir, t, cfg.interval)}", None)
               for t, f in frames.items()}
    out: dict[str, pd.DataFrame] = {}
    for ticker in cfg.tickers:
        frame, where, row_of = raw[ticker]
        checked = validate(_slice(frame, cfg.start, cfg.end), ticker, where, max_fill_gap=cfg.max_fill_gap,
                           min_rows=min_rows, row_of=row_of, positive=positive)
        out[ticker] = checked.frame
        warnings.extend(checked.warnings)
        found = plausible.findings(checked.frame, f"{ticker} ({where})", max_gap_days=cfg.max_gap_days,
                                   max_move=cfg.max_move, today=now.date(), moves=positive)
        plausible.refuse_if_strict(found, cfg.strict)
        warnings.extend(found)
    for w in warnings:
        log.warning(w)
    return Prices(out, cfg.source, fingerprint(out), warnings, counter[0])
