"""Reading one vendor chain file (layer L1, data): column names recognised by alias, long or wide layouts
(a call and a put per row), dates and numbers parsed strictly; rows keep their file and line. The result is
validated and made canonical by ``fincast.data.options``."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import numpy as np
import pandas as pd

from fincast.config import ChainColumns, OptionsConfig
from fincast.data import dates as dates_mod
from fincast.data.validate import DataError

ALIASES: dict[str, tuple[str, ...]] = {
    "quote_date": ("quotedate", "quote_date", "date", "trade_date", "dataDate"),
    "expiry": ("expiration", "expiry", "expiration_date", "expdate", "exdate"),
    "strike": ("strike", "strike_price"),
    "type": ("type", "call_put", "callput", "cp", "option_type", "putcall", "cp_flag"),
    "bid": ("bid",),
    "ask": ("ask", "offer"),
    "last": ("last", "lastprice", "last_price", "close"),
    "volume": ("volume", "vol"),
    "open_interest": ("openinterest", "open_interest", "openint", "oi"),
    "implied_vol": ("impliedvol", "implied_volatility", "iv", "impliedvolatility", "impvol"),
    "underlying_price": ("underlying_last", "underlying_price", "underlyingprice", "underlying_close", "spot", "S"),
    "underlying": ("underlying", "underlying_symbol", "root", "symbol", "ticker"),
    "last_trade_date": ("lasttradedate", "last_trade_date"),
    "days_to_expiry": ("days_to_expiration", "dte", "days"),
}


OPTION_SYMBOL_ALIASES = ("optionroot", "contractsymbol", "option_symbol", "optionsymbol")


_TYPES = {"call": True, "c": True, "calls": True, "put": False, "p": False, "puts": False}


_WIDE_PATTERNS = (
    re.compile(r"^(?P<stem>.+?)[._](?P<side>[cp])$", re.IGNORECASE),
    re.compile(r"^(?P<side>call|put)[._](?P<stem>.+)$", re.IGNORECASE),
    re.compile(r"^(?P<side>[cp])[._](?P<stem>.+)$", re.IGNORECASE),
)


_TYPE_COLUMN = "__call_put__"  # the side of a wide row once it is split into two contracts


_DATE_FORMATS = ("%m/%d/%Y", "%Y%m%d", "%Y/%m/%d", "%d.%m.%Y", "%m/%d/%y")


def _norm(name: object) -> str:
    return re.sub(r"[\s_.]", "", str(name)).lower()


def _lookup(columns: list[str], name: str) -> str | None:
    """The column called ``name``: exactly, else ignoring case, spaces, underscores and dots."""
    if name in columns:
        return name
    return next((c for c in columns if _norm(c) == _norm(name)), None)


def _wide_pairs(columns: list[str]) -> dict[str, tuple[str, str]]:
    """stem -> (call column, put column) for every recognised call/put pair."""
    pairs: dict[str, tuple[str, str]] = {}
    taken: set[str] = set()
    for pattern in _WIDE_PATTERNS:
        sides: dict[tuple[str, str], tuple[str, str]] = {}  # (stem lower, c|p) -> (stem, column)
        for col in columns:
            m = pattern.match(col)
            if m and col not in taken:
                sides.setdefault((m["stem"].lower(), m["side"][0].lower()), (m["stem"], col))
        for (key, side), (stem, col) in sides.items():
            put = sides.get((key, "p"))
            if side == "c" and put is not None and stem not in pairs:
                pairs[stem] = (col, put[1])
                taken.update((col, put[1]))
    return pairs


def _found(columns: list[str]) -> str:
    return ", ".join(map(str, columns))


def _resolve(columns: list[str], cfg: OptionsConfig, path: Path, *, skip: set[str]) -> dict[str, str]:
    """field -> column of ``columns``: explicit options.columns.* first, then the aliases."""
    out: dict[str, str] = {}
    used: set[str] = set()
    for f in fields(ChainColumns):
        name = getattr(cfg.columns, f.name)
        if name is None or f.name in skip:
            continue
        col = _lookup(columns, name)
        if col is None:
            raise DataError(f"{path}: options.columns.{f.name} = {name!r}: no such column (found: {_found(columns)})")
        out[f.name] = col
        used.add(col)
    for key, names in [*ALIASES.items(), ("option_symbol", OPTION_SYMBOL_ALIASES)]:
        if key in out or key in skip:
            continue
        for name in names:
            col = _lookup(columns, name)
            if col is not None and col not in used:
                out[key] = col
                used.add(col)
                break
    return out


def _parse_dates(text: pd.Series, order: str | None = None) -> pd.Series:
    """Text -> datetime64[ns] (normalised; NaT where empty or unparseable). Each distinct value is parsed once.
    Slashed dates are month-first (US chain files) unless ``order`` is "dmy" (the file's own dates show
    day-first: a day above 12 in the first field; ``dates.day_month_order``)."""
    text = text.astype("str").str.strip()
    uniq = pd.Series(pd.unique(text), dtype="str")
    token = uniq.str.split(r"[ T]", n=1, regex=True).str[0].fillna("")
    parsed = pd.Series(pd.to_datetime(uniq.str.slice(0, 10), format="%Y-%m-%d", errors="coerce")
                       .astype("datetime64[ns]"))
    formats = _DATE_FORMATS
    if order == "dmy":
        formats = tuple(f.replace("%m/%d/", "%d/%m/") for f in _DATE_FORMATS)
    for fmt in formats:
        todo = parsed.isna() & token.ne("")
        if not todo.any():
            break
        parsed[todo] = pd.to_datetime(token[todo], format=fmt, errors="coerce").astype("datetime64[ns]")
    named = parsed.isna() & uniq.str.contains(r"[A-Za-z]{3}", regex=True)  # Jan 2 2018, 02-Jan-2018
    if named.any():
        parsed[named] = pd.to_datetime(uniq[named], format="mixed", errors="coerce").astype("datetime64[ns]")
    idx = pd.Index(uniq).get_indexer(text)
    return pd.Series(parsed.to_numpy()[idx], index=text.index).astype("datetime64[ns]").dt.normalize()


def _parse_numbers(text: pd.Series) -> pd.Series:
    return pd.to_numeric(text.astype("str").str.strip(), errors="coerce").astype("float64")


def _check_dates(parsed: pd.Series, text: pd.Series, lines: np.ndarray, path: Path, col: str, key: str,
                 *, blanks_count: bool) -> None:
    """More than half of a date column unparseable: the column map is wrong, not the rows."""
    bad = parsed.isna()
    if not blanks_count:
        bad &= text.astype("str").str.strip().ne("")
    if int(bad.sum()) * 2 > len(parsed):
        i = int(bad.to_numpy().argmax())
        raise DataError(
            f"{path}: line {lines[i]}: column {col!r} ({key}) has {int(bad.sum())} of {len(parsed)} values that are "
            f"not dates, the first {text.iloc[i]!r}; expected YYYY-MM-DD, MM/DD/YYYY or YYYYMMDD. Is the column map "
            "right? (set options.columns.<field>)")


def _read_raw(path: Path) -> pd.DataFrame:
    try:
        raw = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig", skipinitialspace=True)
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: empty file; expected a header row of an option chain") from None
    except (OSError, UnicodeDecodeError, pd.errors.ParserError) as exc:
        raise DataError(f"{path}: cannot read: {exc}") from None
    raw.columns = [str(c).strip() for c in raw.columns]
    if raw.empty:
        raise DataError(f"{path}: no data rows")
    return raw


def _to_long(raw: pd.DataFrame, cfg: OptionsConfig, path: Path) -> tuple[pd.DataFrame, bool]:
    """The file's rows as one row per contract (a wide file is split into its call and put halves); also whether
    the file was wide. A ``__line__`` column holds each row's line in the file."""
    columns = list(raw.columns)
    raw = raw.assign(__line__=np.arange(len(raw), dtype="int64") + 2)  # line 1 is the header
    has_type = ((cfg.columns.type is not None and _lookup(columns, cfg.columns.type) is not None)
                or any(_lookup(columns, n) is not None for n in ALIASES["type"]))
    pairs = _wide_pairs(columns)
    wide = cfg.layout == "wide" or (cfg.layout == "auto" and not has_type and bool(pairs))
    if not wide:
        return raw, False
    if not pairs:
        raise DataError(f"{path}: options.layout = wide but no paired call/put columns were found (like bid.c/bid.p, "
                        f"bid_c/bid_p, call_bid/put_bid or c_bid/p_bid; found: {_found(columns)})")
    paired = {c for pair in pairs.values() for c in pair}
    shared = [c for c in raw.columns if c not in paired and c not in pairs]
    halves = [raw[shared].assign(**{stem: raw[pair[i]] for stem, pair in pairs.items()}, **{_TYPE_COLUMN: side})
              for i, side in enumerate(("call", "put"))]
    return pd.concat(halves, ignore_index=True), True


def _parse_file(path: Path, cfg: OptionsConfig) -> tuple[pd.DataFrame, list[str]]:
    """One chain file -> the parsed rows (typed, not yet checked) and notes for the warnings."""
    raw = _read_raw(path)
    long, wide = _to_long(raw, cfg, path)
    columns = [c for c in long.columns if c not in ("__line__", _TYPE_COLUMN)]
    cols = _resolve(columns, cfg, path, skip={"type"} if wide else set())
    if wide:
        cols["type"] = _TYPE_COLUMN
    lines = long["__line__"].to_numpy()

    price_inputs = ("bid", "ask") if cfg.price == "mid" else ("last",)
    required = {"quote_date": ALIASES["quote_date"], "strike": ALIASES["strike"]}
    if not wide:
        required["type"] = ALIASES["type"]
    required.update({k: ALIASES[k] for k in price_inputs})
    missing = [f"{key} (looked for {', '.join(names)}; or set options.columns.{key})"
               for key, names in required.items() if key not in cols]
    if "expiry" not in cols and "days_to_expiry" not in cols:
        missing.append(f"expiry (looked for {', '.join(ALIASES['expiry'])}, or days to expiry as "
                       f"{', '.join(ALIASES['days_to_expiry'])}; or set options.columns.expiry)")
    if missing:
        why = f" (options.price = {cfg.price})" if any(k in price_inputs for k in required if k not in cols) else ""
        layout = "wide" if wide else "long"
        raise DataError(f"{path}: missing required column(s) of the {layout} layout{why}:\n  " + "\n  ".join(missing)
                        + f"\nfound: {_found(list(raw.columns))}")

    def text(key: str) -> pd.Series:
        return long[cols[key]].astype("str").str.strip()

    def number(key: str) -> pd.Series:
        return _parse_numbers(long[cols[key]]) if key in cols else pd.Series(np.nan, index=long.index)

    notes: list[str] = []
    date_cols = [k for k in ("quote_date", "expiry", "last_trade_date") if k in cols]  # one order for the file
    order = dates_mod.day_month_order(pd.concat([text(k) for k in date_cols], ignore_index=True), str(path))
    quote_date = _parse_dates(text("quote_date"), order)
    _check_dates(quote_date, text("quote_date"), lines, path, cols["quote_date"], "quote date", blanks_count=True)
    expiry = pd.Series(pd.NaT, index=long.index, dtype="datetime64[ns]")
    if "expiry" in cols:
        expiry = _parse_dates(text("expiry"), order)
        _check_dates(expiry, text("expiry"), lines, path, cols["expiry"], "expiry",
                     blanks_count="days_to_expiry" not in cols)
    if "days_to_expiry" in cols:
        days = number("days_to_expiry")
        expiry = expiry.fillna(quote_date + pd.to_timedelta(days, unit="D")).dt.normalize()
    last_trade = pd.Series(pd.NaT, index=long.index, dtype="datetime64[ns]")
    if "last_trade_date" in cols:
        last_trade = _parse_dates(text("last_trade_date"), order)
        _check_dates(last_trade, text("last_trade_date"), lines, path, cols["last_trade_date"], "last trade date",
                     blanks_count=False)
    kind = text("type").str.lower()
    call = kind.map(_TYPES).astype("boolean")
    unknown = call.isna() & kind.ne("")
    iv = number("implied_vol")
    if iv.notna().any() and iv.median() > 3:
        iv = iv / 100
        notes.append(f"{path}: column {cols['implied_vol']!r} is in percent (median {iv.median() * 100:.3g}); "
                     "divided by 100")
    out = pd.DataFrame({
        "quote_date": quote_date, "expiry": expiry, "strike": number("strike"), "call": call,
        "bid": number("bid"), "ask": number("ask"), "last": number("last"), "volume": number("volume"),
        "open_interest": number("open_interest"), "implied_vol": iv, "underlying_price": number("underlying_price"),
        "last_trade_date": last_trade, "line": lines.astype("int64"), "file": str(path),
        "_unknown_type": unknown.to_numpy(),
    })
    for key, col in (("underlying", "underlying"), ("option_symbol", "contract")):
        if key in cols:  # absent: no symbol filter, and generated contract ids
            out[col] = text(key).where(text(key).ne(""))
    return out, notes
