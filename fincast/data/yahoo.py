"""yfinance adapter: the only module that imports yfinance.

Facts this module is built around (yfinance 0.2.5x-1.x):

* ``yf.download`` does not raise when Yahoo is unreachable or rate-limits: it logs the failure on the
  ``yfinance`` logger and returns an EMPTY frame. We capture those log records to tell "unreachable"
  (retry, then fail or fall back to the cache) from "no new bars in this range" (fine for an
  incremental refresh).
* On a half-open network a call can hang ~2 minutes despite ``timeout=``. Each call runs in a daemon
  thread and is abandoned at a deadline shared by all tickers of one load (``data.timeout_s``).
* Columns come back as a MultiIndex (Price, Ticker) by default, and ``auto_adjust`` now defaults to
  True. We pass ``auto_adjust=False`` explicitly (so both Close and Adj Close arrive, as in the
  classic CSV layout) and flatten the MultiIndex by picking the ticker's level.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import queue
import re
import threading
import time
import warnings
from collections.abc import Callable

import pandas as pd
import yfinance as yf

from fincast.data.chain_columns import CHAIN_COLUMNS
from fincast.data.validate import DataError, normalize_columns

_log = logging.getLogger("yfinance")
_log.addHandler(logging.NullHandler())  # yfinance's own stderr noise is replaced by our messages
# yfinance 1.x still uses pandas' deprecated inplace= internally; not actionable for our users
warnings.filterwarnings("ignore", message=".*inplace keyword.*", module=r"yfinance\..*")

_TRANSIENT = ("rate limit", "too many requests", "timed out", "timeout", "connection", "temporar",
              "could not resolve", "curl: (6)", "curl: (7)", "curl: (28)", "curl: (35)", "curl: (56)",
              " 500", " 502", " 503", " 504", "dnserror", "unreachable", "reset by peer")


class YahooError(DataError):
    """Yahoo did not deliver data for ``tickers``; ``reason`` says what it said (or that it hung)."""

    def __init__(self, tickers: list[str], reason: str, transient: bool = True):
        self.tickers = tickers
        self.reason = reason
        self.transient = transient
        super().__init__(f"Yahoo Finance gave no data for {', '.join(tickers)}: {reason}")


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):  # never let logging break a fetch
            self.messages.append(record.getMessage())


def summarize(messages: list[str]) -> str:
    """yfinance logs the same failure several ways; keep the most telling line, without boilerplate."""
    lines = []
    for m in messages:
        m = re.sub(r"\s*See https://curl\.se\S*.*$", "", m.strip()).strip().rstrip(".")
        if m and not re.fullmatch(r"\d+ Failed downloads?:", m) and m not in lines:
            lines.append(m)
    network = [m for m in lines if is_transient(m)]
    return "; ".join(network[-1:] if network else lines[-2:])


def is_transient(message: str) -> bool:
    m = message.lower()
    return any(k in m for k in _TRANSIENT)


def normalize(raw: pd.DataFrame, ticker: str) -> pd.DataFrame:
    """yf.download output (flat or MultiIndex columns) -> contract columns, tz-naive date index."""
    df = raw
    if isinstance(df.columns, pd.MultiIndex):
        wanted = ticker.upper()
        for level in range(df.columns.nlevels):
            values = [str(v).upper() for v in df.columns.get_level_values(level)]
            if wanted in values:
                key = df.columns.get_level_values(level)[values.index(wanted)]
                df = df.xs(key, axis=1, level=level)
                break
        else:
            if df.columns.nlevels == 2 and len(set(df.columns.get_level_values(1))) == 1:
                df = df.droplevel(1, axis=1)
            else:
                raise DataError(f"yfinance returned columns for other tickers than {ticker}: "
                                f"{sorted(set(map(str, df.columns.get_level_values(-1))))}")
    # the MultiIndex's "Price" level name would survive xs() and differ from flat and cached frames
    df = normalize_columns(df, f"yfinance {ticker}").rename_axis(None, axis=1)
    idx = pd.DatetimeIndex(df.index)
    if idx.tz is not None:
        idx = idx.tz_localize(None)
    df = df.set_axis(idx.normalize().rename("date"), axis=0)
    return df.dropna(how="all")


def _call_with_deadline(fn: Callable[[], pd.DataFrame], seconds: float) -> tuple[str, object]:
    """Run fn in a daemon thread; ('ok', frame) | ('error', exc) | ('timeout', None)."""
    box: queue.Queue = queue.Queue(maxsize=1)

    def target() -> None:
        try:
            box.put(("ok", fn()))
        except BaseException as exc:  # noqa: BLE001 - reported to the caller
            box.put(("error", exc))

    threading.Thread(target=target, name="fincast-yfinance", daemon=True).start()
    try:
        return box.get(timeout=max(seconds, 0.0))
    except queue.Empty:
        return ("timeout", None)


def fetch(ticker: str, start: dt.date | None, end: dt.date | None, *, interval: str = "1d",
          deadline: float, retries: int = 3, download: Callable[..., pd.DataFrame] | None = None,
          sleep: Callable[[float], None] = time.sleep) -> pd.DataFrame:
    """Daily bars of one ticker from ``start`` to ``end`` (both inclusive; None = open-ended).

    Returns a frame in the contract layout; it may be empty when Yahoo answered but has no bars in
    the range (e.g. an incremental refresh on a weekend). Raises YahooError when Yahoo is unreachable,
    rate-limits past ``retries`` attempts, does not know the ticker, or ``deadline`` (a
    ``time.monotonic()`` value) passes.
    """
    download = download or yf.download
    kwargs = dict(
        start=start.isoformat() if start else None,
        # yfinance's end is exclusive
        end=(end + dt.timedelta(days=1)).isoformat() if end else None,
        interval=interval, auto_adjust=False, actions=False, progress=False, threads=False,
        multi_level_index=True,
    )
    if start is None:
        kwargs["period"] = "max"
    reason = "no answer"
    for attempt in range(retries):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        capture = _Capture()
        _log.addHandler(capture)
        try:
            status, value = _call_with_deadline(
                lambda r=remaining: download(ticker, timeout=max(1.0, min(10.0, r)), **kwargs), remaining)
        finally:
            _log.removeHandler(capture)
        said = summarize(capture.messages)
        if status == "timeout":
            raise YahooError([ticker], f"no answer within the time limit (data.timeout_s); the network may be "
                                       f"half-open{' (' + said + ')' if said else ''}")
        if status == "error":
            reason = f"{type(value).__name__}: {value}"
            transient = is_transient(reason) or "ratelimit" in type(value).__name__.lower()
        elif value is None or (isinstance(value, pd.DataFrame) and value.empty):
            if not said:
                return normalize(pd.DataFrame(columns=["Open", "High", "Low", "Close", "Adj Close", "Volume"],
                                              index=pd.DatetimeIndex([], name="Date")), ticker)
            reason = said
            transient = is_transient(said)
        else:
            return normalize(value, ticker)
        if not transient:
            raise YahooError([ticker], reason, transient=False)
        if attempt + 1 < retries:
            wait = min(2.0**attempt, max(0.0, deadline - time.monotonic() - 0.5))
            if wait <= 0:
                break
            sleep(wait)
    raise YahooError([ticker], reason)


_CHAIN_NAMES = {"contractSymbol": "contract", "strike": "strike", "lastPrice": "last", "bid": "bid", "ask": "ask",
                "volume": "volume", "openInterest": "open_interest", "impliedVolatility": "implied_vol"}


def _chain_side(raw: pd.DataFrame, *, call: bool, expiry: pd.Timestamp, quote_date: pd.Timestamp,
                underlying_price: float) -> pd.DataFrame:
    """One side (calls or puts) of ``Ticker.option_chain(expiry)`` -> snapshot columns."""
    df = pd.DataFrame({new: (raw[old] if old in raw.columns else pd.Series(float("nan"), index=raw.index))
                       for old, new in _CHAIN_NAMES.items()})
    if "lastTradeDate" in raw.columns:
        last_trade = pd.to_datetime(raw["lastTradeDate"], errors="coerce", utc=True)
        last_trade = last_trade.dt.tz_convert("America/New_York").dt.tz_localize(None).dt.normalize()
    else:
        last_trade = pd.Series(pd.NaT, index=raw.index)
    return df.assign(
        # Yahoo leaves volume out when nothing traded that day
        volume=pd.to_numeric(df["volume"], errors="coerce").fillna(0.0),
        contract=df["contract"].astype("str"), call=call, expiry=expiry, quote_date=quote_date,
        underlying_price=underlying_price, last_trade_date=last_trade.astype("datetime64[ns]"))


def fetch_option_chain(ticker: str, *, deadline: float, now: dt.datetime, ticker_factory: Callable | None = None,
                       max_expiries: int | None = None) -> pd.DataFrame:
    """Today's option chain of ``ticker`` (all listed expiries, or the first ``max_expiries``) in the canonical
    chain layout of ``fincast.data.options`` (file = "yfinance", line = -1, price = mid), plus a
    ``last_trade_date`` column for the stale-quote check. Not cleaned: the store's reader does that.

    The quote date is ``now`` in New York. Every yfinance call is abandoned at ``deadline`` (a
    ``time.monotonic()`` value). Raises YahooError when Yahoo lists no expiries (unreachable, rate-limited or
    no listed options), fails, or hangs.
    """
    factory = ticker_factory or yf.Ticker
    if now.tzinfo is None:
        now = now.replace(tzinfo=dt.UTC)
    quote_date = pd.Timestamp(now).tz_convert("America/New_York").tz_localize(None).normalize()

    said: list[str] = []  # what yfinance logged during the last call

    def call(fn: Callable[[], object], what: str) -> object:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise YahooError([ticker], f"no time left before {what} (the time limit passed)")
        capture = _Capture()
        _log.addHandler(capture)
        try:
            status, value = _call_with_deadline(fn, remaining)
        finally:
            _log.removeHandler(capture)
        said[:] = [summarize(capture.messages)] if capture.messages else []
        if status == "timeout":
            raise YahooError([ticker], f"{what} hung: no answer within the time limit; the network may be "
                                       f"half-open{' (' + said[0] + ')' if said else ''}")
        if status == "error":
            reason = f"{what} failed: {type(value).__name__}: {value}"
            raise YahooError([ticker], reason, transient=is_transient(reason))
        return value

    t = call(lambda: factory(ticker), "opening the ticker")
    expiries = tuple(call(lambda: tuple(t.options or ()), "listing the option expiries"))
    if not expiries:
        raise YahooError([ticker], "Yahoo listed no option expiries (unreachable, rate-limited, or the ticker has no "
                                   f"listed options){': ' + said[0] if said and said[0] else ''}",
                         transient=not said or is_transient(said[0]))
    parts = []
    for expiry in expiries[:max_expiries]:
        chain = call(lambda e=expiry: t.option_chain(e), f"fetching the {expiry} chain")
        info = getattr(chain, "underlying", None)
        try:
            spot = float(info.get("regularMarketPrice")) if isinstance(info, dict) else float("nan")
        except (TypeError, ValueError):
            spot = float("nan")
        exp = pd.Timestamp(expiry).normalize()
        for side, is_call in ((chain.calls, True), (chain.puts, False)):
            if side is not None and len(side):
                parts.append(_chain_side(side, call=is_call, expiry=exp, quote_date=quote_date, underlying_price=spot))
    if not parts:
        raise YahooError([ticker], f"Yahoo listed {len(expiries)} expiries but no contracts")
    frame = pd.concat(parts, ignore_index=True)
    frame = frame.assign(
        quote_date=frame["quote_date"].astype("datetime64[ns]"), expiry=frame["expiry"].astype("datetime64[ns]"),
        tau=(frame["expiry"] - frame["quote_date"]).dt.days.astype("float64") / 365.0,
        price=(frame["bid"] + frame["ask"]) / 2, line=-1, file="yfinance")
    for col in ("strike", "bid", "ask", "last", "volume", "open_interest", "implied_vol", "underlying_price", "price"):
        frame[col] = pd.to_numeric(frame[col], errors="coerce").astype("float64")
    frame = frame.assign(call=frame["call"].astype(bool), contract=frame["contract"].astype("str"),
                         line=frame["line"].astype("int64"), file=frame["file"].astype("str"))
    frame = frame[[*CHAIN_COLUMNS, "last_trade_date"]]
    return frame.sort_values(["quote_date", "expiry", "call", "strike", "contract"], kind="mergesort").reset_index(
        drop=True)
