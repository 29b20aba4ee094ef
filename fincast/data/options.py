"""Option chains (layer L1): one contract for every source.

``load_chain(cfg.options, ticker)`` returns a :class:`Chain` whose ``frame`` is the canonical chain, one row per
contract and quote date, sorted by quote_date, expiry, call, strike (RangeIndex):

==================  ================  =========================================================================
column              dtype             meaning
==================  ================  =========================================================================
quote_date          datetime64[ns]    the quote's (trade) date, normalised
expiry              datetime64[ns]    expiration date
tau                 float64           calendar days to expiry / 365
strike              float64           strike price
call                bool              True for a call, False for a put
bid, ask, last      float64           quotes (NaN when the source lacks the column)
volume              float64           contracts traded on the quote date (NaN if absent)
open_interest       float64           open interest (NaN if absent)
implied_vol         float64           vendor implied vol as a decimal (a column in percent, median > 3, is / 100)
underlying_price    float64           the underlying's price at the quote (NaN if absent)
price               float64           market price: options.price = mid ((bid + ask) / 2) or last
contract            str               the file's option symbol, else ROOT + YYMMDD + C/P + strike*1000 (8 digits)
line                int64             1-based line in the source file (-1 for the store)
file                str               source path
==================  ================  =========================================================================

Sources (``options.source``): ``csv`` (``options.path``: one end-of-day chain file or a directory of ``*.csv``)
and ``store`` (dated parquet snapshots collected from yfinance by :func:`snapshot`, one file per ticker and
quote date under ``options.store_dir``). ``synthetic`` chains are built elsewhere.

Column names of a csv file are recognised by these names (case-insensitive; spaces, underscores and dots are
ignored); ``options.columns.<field>`` overrides them:

=================  ==========================================================================================
field              recognised names
=================  ==========================================================================================
quote_date         quotedate, quote_date, date, trade_date, dataDate
expiry             expiration, expiry, expiration_date, expdate, exdate
strike             strike, strike_price
type               type, call_put, callput, cp, option_type, putcall, cp_flag (values call/put/c/p)
bid                bid
ask                ask, offer
last               last, lastprice, last_price, close
volume             volume, vol
open_interest      openinterest, open_interest, openint, oi
implied_vol        impliedvol, implied_volatility, iv, impliedvolatility, impvol
underlying_price   underlying_last, underlying_price, underlyingprice, underlying_close, spot, S
underlying         underlying, underlying_symbol, root, symbol, ticker (filtered by options.symbol)
last_trade_date    lasttradedate, last_trade_date
days_to_expiry     days_to_expiration, dte, days (expiry = quote_date + days, when there is no expiry column)
(option symbol)    optionroot, contractsymbol, option_symbol, optionsymbol (the contract id)
=================  ==========================================================================================

Layouts (``options.layout``): ``long`` has one row per contract and a call/put column; ``wide`` has one row per
strike with the call and put fields side by side, paired as ``<name>.c``/``<name>.p``, ``<name>_c``/``<name>_p``,
``call_<name>``/``put_<name>`` or ``c_<name>``/``p_<name>`` (each wide row becomes two contracts; an explicit
column name then names the stem, e.g. ``bid``); ``auto`` = wide when no call/put column is found but such pairs are.

Quotes are cleaned, never silently: each dropped row is counted under the first reason it fails, in this order
(``DROP_REASONS``): symbol filter (options.symbol set and the underlying column differs; a filter, not bad data),
missing field (quote date, expiry, strike, call/put or the price inputs empty or unparseable), unknown call/put,
non-positive strike, expiry before quote date, crossed quote (bid > ask), zero quote (price = mid and bid <= 0 or
ask <= 0, or the price <= 0), stale quote (last trade more than options.stale_days before the quote date, or
price = last and volume 0), outside min_days..max_days (calendar days to expiry), duplicate contract (the same
contract on the same quote date again: the last one is kept). Dates are read as YYYY-MM-DD, MM/DD/YYYY or
YYYYMMDD; when more than half of a date column does not parse, the column map is wrong and that is an error."""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from fincast.config import OptionsConfig, atomic_file
from fincast.data.chain_columns import CHAIN_COLUMNS, DROP_REASONS, FLOAT_COLUMNS, SORT_KEYS
from fincast.data.chain_files import ALIASES, OPTION_SYMBOL_ALIASES, _parse_file
from fincast.data.validate import DataError

__all__ = ["ALIASES", "CHAIN_COLUMNS", "DROP_REASONS", "OPTION_SYMBOL_ALIASES", "Chain", "append_snapshot",
           "chain_fingerprint", "load_chain", "read_chain_file", "read_store", "snapshot", "store_path"]


log = logging.getLogger("fincast.data")


OFFLINE_ADVICE = ("to continue offline use options.source=csv with end-of-day vendor chain files "
                  "(--set options.source=csv --set options.path=FILE_OR_DIR) or --set options.source=synthetic "
                  "(a seeded Heston market)")


@dataclass
class Chain:
    frame: pd.DataFrame
    source: str
    fingerprint: str
    dropped: dict[str, int]
    warnings: list[str]
    rows_read: int


def chain_fingerprint(frame: pd.DataFrame) -> str:
    """Stable hash of the chain's values (``line`` and ``file`` describe provenance and are left out, so moving the
    data directory keeps the fingerprint)."""
    data = frame.drop(columns=["line", "file"], errors="ignore")
    h = hashlib.sha256(",".join(map(str, data.columns)).encode())
    h.update(pd.util.hash_pandas_object(data, index=True).to_numpy().tobytes())
    return h.hexdigest()[:16]


def _symbol_key(values: pd.Series) -> pd.Series:
    return values.astype("str").str.strip().str.upper().str.lstrip("^")


def _contract_ids(frame: pd.DataFrame, symbol: str | None) -> pd.Series:
    """ROOT + YYMMDD + C/P + strike*1000 as 8 digits (the OCC layout) where the source has no option symbol."""
    root = pd.Series(symbol or "OPT", index=frame.index, dtype="str")
    if "underlying" in frame.columns:
        root = frame["underlying"].astype("str").str.strip().where(frame["underlying"].notna(), root)
    made = (root + frame["expiry"].dt.strftime("%y%m%d") + np.where(frame["call"].astype(bool), "C", "P")
            + (frame["strike"] * 1000).round().astype("int64").astype("str").str.zfill(8))
    if "contract" not in frame.columns:
        return made.astype("str")
    given = frame["contract"].astype("str").str.strip()
    return given.where(frame["contract"].notna() & given.ne(""), made).astype("str")


def _validate(frame: pd.DataFrame, cfg: OptionsConfig, where: str) -> tuple[pd.DataFrame, dict[str, int]]:
    """Parsed rows -> (canonical frame of the usable rows, rows dropped per reason). Each row counts once, under
    the first reason (in DROP_REASONS order) it fails."""
    n = len(frame)
    frame = frame.reset_index(drop=True)
    qd, exp, strike = frame["quote_date"], frame["expiry"], frame["strike"]
    call = frame["call"].astype("boolean")
    bid, ask, last = frame["bid"], frame["ask"], frame["last"]
    false = pd.Series(False, index=frame.index)
    unknown = frame["_unknown_type"].fillna(False).astype(bool) if "_unknown_type" in frame else false
    has_underlying = "underlying" in frame.columns and frame["underlying"].notna().any()
    if has_underlying and cfg.symbol is None:
        names = sorted(frame["underlying"].dropna().astype("str").str.strip().unique())
        if len(names) > 1:
            shown = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
            raise DataError(f"{where}: the chain holds {len(names)} underlyings ({shown}); set options.symbol to the "
                            f"one to price, e.g. --set options.symbol={names[0]}")
    price = (bid + ask) / 2 if cfg.price == "mid" else last
    price_inputs = [bid, ask] if cfg.price == "mid" else [last]
    days = (exp - qd).dt.days

    symbol = false  # rows without an underlying value (a source without the column) are not filtered
    if cfg.symbol is not None and "underlying" in frame.columns:
        wanted = _symbol_key(pd.Series([cfg.symbol])).iloc[0]
        symbol = frame["underlying"].notna() & _symbol_key(frame["underlying"]).ne(wanted)
    missing = qd.isna() | exp.isna() | strike.isna() | (call.isna() & ~unknown)
    for s in price_inputs:
        missing |= s.isna()
    zero = price <= 0
    if cfg.price == "mid":
        zero |= (bid <= 0) | (ask <= 0)
    stale = frame["last_trade_date"] < qd - pd.Timedelta(days=cfg.stale_days) if "last_trade_date" in frame else false
    if cfg.price == "last":
        stale = stale | (frame["volume"] == 0)
    checks = [symbol, missing, unknown, strike <= 0, exp < qd, bid > ask, zero, stale,
              (days < cfg.min_days) | (days > cfg.max_days)]
    code = np.full(n, -1, dtype=np.int64)
    for i, mask in enumerate(checks):
        code[(code < 0) & mask.fillna(False).to_numpy(dtype=bool)] = i
    keep = code < 0
    good = frame[keep].assign(call=call[keep].astype(bool), price=price[keep])
    good = good.assign(contract=_contract_ids(good, cfg.symbol))
    dup = good.duplicated(["contract", "quote_date"], keep="last").to_numpy()
    code[np.flatnonzero(keep)[dup]] = len(checks)
    good = good[~dup]
    dropped = {reason: int((code == i).sum()) for i, reason in enumerate(DROP_REASONS)}
    return _canonical(good), dropped


def _canonical(frame: pd.DataFrame, *, extra: tuple[str, ...] = ()) -> pd.DataFrame:
    """Contract columns with their dtypes, sorted, RangeIndex (plus ``extra`` columns kept as they are)."""
    out = frame.assign(
        quote_date=frame["quote_date"].astype("datetime64[ns]").dt.normalize(),
        expiry=frame["expiry"].astype("datetime64[ns]").dt.normalize())
    out = out.assign(tau=(out["expiry"] - out["quote_date"]).dt.days.astype("float64") / 365.0)
    for col in FLOAT_COLUMNS:
        out[col] = out[col].astype("float64") if col in out else np.nan
    out = out.assign(call=out["call"].astype(bool), contract=out["contract"].astype("str"),
                     line=out["line"].astype("int64"), file=out["file"].astype("str"))
    out = out[list(CHAIN_COLUMNS) + [c for c in extra if c in out.columns]]
    return out.sort_values(SORT_KEYS, kind="mergesort").reset_index(drop=True)


def _summary(where: str, dropped: dict[str, int], rows: int) -> str:
    counts = ", ".join(f"{reason} {k}" for reason, k in dropped.items() if k)
    return f"{where}: dropped {sum(dropped.values())} of {rows} contract rows ({counts})"


def _finish(parsed: pd.DataFrame, cfg: OptionsConfig, where: str) -> tuple[pd.DataFrame, dict[str, int]]:
    frame, dropped = _validate(parsed, cfg, where)
    if frame.empty:
        counts = "\n  ".join(f"{reason}: {k}" for reason, k in dropped.items())
        raise DataError(f"{where}: no usable option quotes: all {len(parsed)} contract rows were dropped:\n  {counts}\n"
                        "check options.symbol, options.price, options.min_days/max_days, options.stale_days and "
                        "the column map (options.columns.*)")
    return frame, dropped


def read_chain_file(path: str | Path, cfg: OptionsConfig) -> tuple[pd.DataFrame, dict[str, int]]:
    """One end-of-day chain file -> (canonical frame, rows dropped per reason)."""
    parsed, notes = _parse_file(Path(path), cfg)
    for note in notes:
        log.info(note)
    return _finish(parsed, cfg, str(path))


def _csv_files(cfg: OptionsConfig) -> list[Path]:
    if not cfg.path:
        raise DataError("options.path: required when options.source = 'csv' (a chain file or a directory of them)")
    p = Path(cfg.path)
    if p.is_dir():
        files = sorted(f for f in p.glob("*.csv") if f.is_file())
        if not files:
            raise DataError(f"options.path = {p}: the directory holds no *.csv chain files")
        return files
    if not p.is_file():
        raise DataError(f"options.path = {p}: no such file or directory")
    return [p]


def load_chain(cfg: OptionsConfig, ticker: str | None = None) -> Chain:
    """Load and clean the chain of ``cfg.source`` (csv: ``cfg.path``; store: the snapshots of ``ticker``)."""
    warnings: list[str] = []
    if cfg.source == "csv":
        files = _csv_files(cfg)
        parts = []
        for f in files:
            part, notes = _parse_file(f, cfg)
            parts.append(part)
            warnings.extend(notes)
        parsed = pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]
        names = ", ".join(f.name for f in files)
        where = str(files[0]) if len(files) == 1 else f"{cfg.path} ({len(files)} files: {names})"
    elif cfg.source == "store":
        if ticker is None:
            raise ValueError("load_chain: options.source = store needs the ticker whose snapshots to read")
        parsed = read_store(cfg.store_dir, ticker)
        where = f"options store {Path(cfg.store_dir) / ticker}"
    else:
        raise ValueError(f"load_chain reads csv files and the store, not options.source = {cfg.source!r}")
    frame, dropped = _finish(parsed, cfg, where)
    if sum(dropped.values()):
        warnings.append(_summary(where, dropped, len(parsed)))
    for w in warnings:
        log.warning(w)
    return Chain(frame, cfg.source, chain_fingerprint(frame), dropped, warnings, len(parsed))


def store_path(store_dir: str | Path, ticker: str, quote_date: dt.date | pd.Timestamp | str) -> Path:
    """``<store_dir>/<ticker>/<YYYY-MM-DD>.parquet`` (the ticker as is, ``^`` kept)."""
    return Path(store_dir) / ticker / f"{pd.Timestamp(quote_date):%Y-%m-%d}.parquet"


def _read_parquet(path: Path) -> pd.DataFrame:
    try:
        return pd.read_parquet(path)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: unreadable snapshot ({exc}); delete it and collect the day again") from None


def append_snapshot(store_dir: str | Path, ticker: str, frame: pd.DataFrame) -> list[Path]:
    """Merge a chain snapshot into the store, one file per quote date; a contract already stored for that date is
    replaced by the new row. Each file is replaced atomically. Returns the files written."""
    written: list[Path] = []
    if frame.empty:
        return written
    frame = frame.drop(columns=["line", "file"], errors="ignore")
    for quote_date, part in frame.groupby("quote_date", sort=True):
        path = store_path(store_dir, ticker, quote_date)
        merged = pd.concat([_read_parquet(path), part], ignore_index=True) if path.is_file() else part
        merged = merged.drop_duplicates(subset="contract", keep="last")
        merged = merged.sort_values(SORT_KEYS, kind="mergesort").reset_index(drop=True)
        with atomic_file(path) as fh:
            merged.to_parquet(fh, index=False)
        written.append(path)
    return written


def read_store(store_dir: str | Path, ticker: str) -> pd.DataFrame:
    """Every stored snapshot of ``ticker`` (canonical columns, file = the parquet path, line = -1; a stored
    ``last_trade_date`` column is kept for the stale-quote check). Not yet cleaned: ``load_chain`` does that."""
    directory = Path(store_dir) / ticker
    files = sorted(f for f in directory.glob("*.parquet") if f.is_file()) if directory.is_dir() else []
    if not files:
        raise DataError(
            f"options store: no snapshots of {ticker} in {directory}. Collect them on an online machine with "
            f"`fincast data <options pipeline>` (task: options, options.source: store), one snapshot per day; or "
            f"{OFFLINE_ADVICE}")
    frame = pd.concat([_read_parquet(f).assign(file=str(f), line=-1) for f in files], ignore_index=True)
    if "price" not in frame:
        frame["price"] = np.nan
    return _canonical(frame, extra=("last_trade_date",))


def snapshot(cfg: OptionsConfig, ticker: str, *, timeout_s: float, now: dt.datetime | None = None,
             fetch=None) -> tuple[list[Path], int]:
    """Fetch today's chain of ``ticker`` from yfinance (or ``fetch``) into the store. Returns (files, rows)."""
    from fincast.data import yahoo  # imports yfinance: only when snapshots are collected

    now = now or dt.datetime.now(dt.UTC)
    deadline = time.monotonic() + timeout_s
    try:
        frame = (fetch or yahoo.fetch_option_chain)(ticker, deadline=deadline, now=now)
    except yahoo.YahooError as exc:
        raise DataError(f"Yahoo Finance did not deliver the option chain of {ticker}: {exc.reason}; "
                        f"{OFFLINE_ADVICE}") from None
    return append_snapshot(cfg.store_dir, ticker, frame), len(frame)
