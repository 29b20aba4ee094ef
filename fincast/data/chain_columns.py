"""The canonical option chain's columns (layer L1, data): shared by the chain readers and the yfinance
snapshot, so neither imports the other."""

from __future__ import annotations

CHAIN_COLUMNS = ("quote_date", "expiry", "tau", "strike", "call", "bid", "ask", "last", "volume", "open_interest",
                 "implied_vol", "underlying_price", "price", "contract", "line", "file")


FLOAT_COLUMNS = ("tau", "strike", "bid", "ask", "last", "volume", "open_interest", "implied_vol", "underlying_price",
                 "price")


SORT_KEYS = ["quote_date", "expiry", "call", "strike", "contract"]


DROP_REASONS = ("symbol filter", "missing field", "unknown call/put", "non-positive strike",
                "expiry before quote date", "crossed quote (bid > ask)", "zero quote", "stale quote",
                "outside min_days..max_days", "duplicate contract")
