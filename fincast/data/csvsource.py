"""CSV source: one file per ticker, as yfinance writes them.

Two layouts are read:

* classic (older yfinance, ``auto_adjust=False``)::

    Date,Open,High,Low,Close,Adj Close,Volume
    2020-01-02,...

* the newer multi-row header of ``yf.download(...).to_csv()`` (columns in any order; ``Adj Close``
  may be absent when auto_adjust=True, then Close is used)::

    Price,Adj Close,Close,High,Low,Open,Volume
    Ticker,SPY,SPY,SPY,SPY,SPY,SPY
    Date,,,,,,
    2020-01-02,...

The file for ticker ``^GSPC`` may be named ``^GSPC.csv`` or ``GSPC.csv``.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pandas as pd

from fincast.config import ticker_problem
from fincast.data import dates as dates_mod
from fincast.data.validate import DataError


def find_file(directory: Path, ticker: str) -> Path:
    if ticker_problem(ticker, "ticker"):  # the config refuses such tickers; this guards other callers
        raise DataError(f"csv source: {ticker!r} is not a ticker name; refusing to read a path built from it")
    candidates = [directory / f"{ticker}.csv", directory / f"{ticker.lstrip('^')}.csv",
                  directory / f"{ticker.upper()}.csv", directory / f"{ticker.lower()}.csv"]
    for p in candidates:
        if p.is_file():
            return p
    raise DataError(f"csv source: no file for {ticker} in {directory} (looked for {candidates[0].name}"
                    f"{' or ' + candidates[1].name if candidates[1] != candidates[0] else ''})")


def read_csv(path: Path, ticker: str, date_format: str | None = None) -> tuple[pd.DataFrame, dict[pd.Timestamp, int]]:
    """Read one ticker file. Returns (frame indexed by date with the file's columns as strings,
    date -> line number in the file). Values are left as text; ``validate`` parses them. ``date_format``
    (data.date_format): the strptime format of the Date column; None = YYYY-MM-DD, or numeric day/month dates
    in the one order the file's own dates allow (:mod:`fincast.data.dates`)."""
    try:
        with open(path, newline="") as fh:
            head = [row for _, row in zip(range(3), csv.reader(fh))]
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc}") from None
    if not head or not head[0]:
        raise DataError(f"{path}: empty file; expected a header Date,Open,High,Low,Close,Adj Close,Volume")
    first = head[0][0].strip().lower()
    multi = first == "price" and len(head) > 1 and head[1] and head[1][0].strip().lower() == "ticker"
    if multi:
        header_lines = 3 if len(head) > 2 and head[2] and head[2][0].strip().lower() in {"date", "datetime"} else 2
        names = ["date"] + [c.strip() for c in head[0][1:]]
        tick_row = [c.strip() for c in head[1][1:]]
        if tick_row and any(t and t.upper() != ticker.upper() for t in tick_row):
            others = sorted({t for t in tick_row if t and t.upper() != ticker.upper()})
            raise DataError(f"{path}: header row 'Ticker' names {', '.join(others)}, expected {ticker}")
        raw = pd.read_csv(path, skiprows=header_lines, header=None, names=names, dtype=str,
                          keep_default_na=False)
    else:
        header_lines = 1
        raw = pd.read_csv(path, dtype=str, keep_default_na=False)
        raw = raw.rename(columns={raw.columns[0]: "date"})
    if raw.empty:
        raise DataError(f"{path}: no data rows")
    dates = _parse_dates(raw["date"].str.strip(), path, header_lines, date_format)
    index = pd.DatetimeIndex(dates)
    if index.tz is not None:
        index = index.tz_localize(None)  # local wall time, not UTC
    index = index.normalize()
    frame = raw.drop(columns=["date"]).set_axis(index, axis=0)
    frame = frame.replace({"": None, "null": None, "NaN": None, "nan": None})
    lines = {d: i + header_lines + 1 for i, d in enumerate(index)}
    return frame, lines


def _parse_dates(text: pd.Series, path: Path, header_lines: int, date_format: str | None) -> pd.Series:
    def line(i: int) -> int:
        return i + header_lines + 1

    how = f"data.date_format = {date_format!r}" if date_format else "YYYY-MM-DD"
    if date_format:  # the date part may be followed by a time the format does not spell (exact=False)
        try:
            dates = pd.to_datetime(text, errors="coerce", format=date_format, exact=False)
        except ValueError as exc:  # e.g. offsets that change with daylight saving under %z
            raise DataError(f"{path}: column Date with data.date_format = {date_format!r}: {exc}") from None
        if getattr(dates.dt, "tz", None) is not None:
            dates = dates.dt.tz_localize(None)
    elif text.str.match(r"^\d{4}-\d{2}-\d{2}").all():
        # the bar's own calendar day, whatever time or UTC offset follows (2020-01-06 00:00:00+01:00 is the
        # Monday 6 January of a European exchange, not Sunday the 5th in UTC)
        dates = pd.to_datetime(text.str.slice(0, 10), errors="coerce", format="%Y-%m-%d")
    elif text.str.match(dates_mod.SLASHED).any():
        order = dates_mod.day_month_order(text, str(path), line)
        if order is None:
            i = int(text.str.match(dates_mod.SLASHED).to_numpy().argmax())
            sep, year = dates_mod.spelling(text.iloc[i])
            raise DataError(f"{path}: dates such as {text.iloc[i]!r} (line {line(i)}) read day-first and month-first "
                            "alike, and no date in the file has a day above 12 to tell which; declare the format: "
                            f"--set data.date_format=%d{sep}%m{sep}{year} (day first) or %m{sep}%d{sep}{year} "
                            "(month first)")
        dates = dates_mod.parse_ordered(text, order)
        how = "DD/MM/YYYY (day first, as the file's own dates show)" if order == "dmy" else \
            "MM/DD/YYYY (month first, as the file's own dates show)"
    else:
        dates = pd.to_datetime(text, errors="coerce", format="mixed")
    if dates.isna().any():
        i = int(dates.isna().to_numpy().argmax())
        raise DataError(f"{path}: line {line(i)}: unparseable date {text.iloc[i]!r} in column Date; expected {how}")
    return dates
