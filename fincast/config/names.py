"""Names that become parts of paths: pipeline, study and sweep names (folders under reports/ and the
checkpoint directory) and tickers (file names in data.path, the cache and the option store). A name is a name:
letters, digits and a few separators, never a path (no ``/``, ``\\``, ``..``, leading dot or dash)."""

from __future__ import annotations

import re

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_TICKER = re.compile(r"\^?[A-Za-z0-9][A-Za-z0-9.=&_-]{0,31}")  # ^GSPC, BTC-USD, BRK.B, EURUSD=X, ES=F, M&M.NS


def name_problem(value: object, key: str) -> str | None:
    """One error line when ``value`` (at config key ``key``) cannot serve as a folder name, else None."""
    if isinstance(value, str) and _NAME.fullmatch(value) and ".." not in value:
        return None
    return (f"{key} = {value!r}: a name must be 1-128 letters, digits, '.', '_' or '-', starting with a letter or "
            "digit, without '..' (it names folders under reports/ and the checkpoint directory)")


def ticker_problem(value: object, key: str) -> str | None:
    """One error line when ``value`` is not a plausible ticker (and could reach outside a data folder)."""
    if isinstance(value, str) and _TICKER.fullmatch(value) and ".." not in value:
        return None
    return (f"{key}: {value!r} is not a ticker: expected 1-32 letters, digits, '.', '=', '&', '_' or '-', optionally "
            "after a '^' (e.g. SPY, ^GSPC, BTC-USD, BRK.B, EURUSD=X), no path separators or '..'")


def duplicate_tickers(tickers: tuple[str, ...] | list[str]) -> list[str]:
    """Tickers listed more than once, ignoring case (BTC-USD and btc-usd load the same file twice)."""
    seen: dict[str, str] = {}
    dup = []
    for t in tickers:
        k = str(t).upper()
        if k in seen:
            dup.append(f"{seen[k]} and {t}" if seen[k] != t else str(t))
        seen.setdefault(k, str(t))
    return dup
