"""Day-first or month-first: ``31/01/2020`` can only be day-first, ``01/31/2020`` only month-first, and
``01/02/2020`` either. A file's numeric dates are read in the one order its own dates allow; when none of them
has a day above 12, no order is guessed (the caller asks for a declared format), and a file with both kinds is
refused."""

from __future__ import annotations

import pandas as pd

from fincast.data.validate import DataError

SLASHED = r"^(\d{1,2})[/.-](\d{1,2})[/.-](\d{2}|\d{4})(?:$|[ T])"


def day_month_order(text: pd.Series, where: str, line_of=None) -> str | None:
    """'dmy' or 'mdy' for the numeric dates in ``text`` (d/m/y, d.m.y or d-m-y, 2- or 4-digit years), None when
    there are none or no field above 12 decides; a DataError when both orders appear. ``line_of(i)``: the file
    line of position i, for messages."""
    parts = text.astype("str").str.strip().str.extract(SLASHED)
    parts = parts[parts[0].notna()]
    if parts.empty:
        return None
    first, second = parts[0].astype(int).to_numpy() > 12, parts[1].astype(int).to_numpy() > 12

    def show(mask) -> str:
        i = int(parts.index[mask.argmax()])
        return f"{text.iloc[i]!r}" + (f" (line {line_of(i)})" if line_of else "")

    if first.any() and second.any():
        raise DataError(f"{where}: dates in both orders: {show(first)} is day-first, {show(second)} month-first; "
                        "write one order throughout (YYYY-MM-DD is unambiguous)")
    return "dmy" if first.any() else "mdy" if second.any() else None


def parse_ordered(text: pd.Series, order: str) -> pd.Series:
    """Numeric dates in ``order`` ('dmy' or 'mdy') -> datetime64 (NaT where not such a date)."""
    parts = text.astype("str").str.strip().str.extract(SLASHED)
    day, month = (parts[0], parts[1]) if order == "dmy" else (parts[1], parts[0])
    year = parts[2].where(parts[2].str.len() != 2, "20" + parts[2])  # 2-digit years: 20yy (pandas' %y: 1969-2068)
    year = year.where(~((parts[2].str.len() == 2) & (parts[2].astype(float) >= 69)), "19" + parts[2])
    return pd.to_datetime(year + "-" + month.str.zfill(2) + "-" + day.str.zfill(2), format="%Y-%m-%d",
                          errors="coerce")


def spelling(date: str) -> tuple[str, str]:
    """(separator, %Y or %y) of one numeric day/month date, for a format hint."""
    parts = pd.Series([date]).str.strip().str.extract(SLASHED).iloc[0]
    sep = date.strip()[len(parts[0])]
    return sep, "%Y" if len(parts[2]) == 4 else "%y"
