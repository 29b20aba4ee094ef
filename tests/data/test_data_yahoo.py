"""yfinance adapter and parquet cache against fabricated ``yf.download`` responses. Never touches the network:
every test passes a fake through ``download=``."""

from __future__ import annotations

import datetime as dt
import inspect
import logging
import os
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yfinance as yf
from yfinance.exceptions import YFRateLimitError

from fincast.config import from_dict
from fincast.data import COLUMNS, DataError, cache, load_prices, synthetic, yahoo

YAHOO_NAMES = {"open": "Open", "high": "High", "low": "Low", "close": "Close", "adj_close": "Adj Close",
               "volume": "Volume"}
DOWNLOAD_SIGNATURE = inspect.signature(yf.download)
T0 = dt.datetime(2024, 3, 4, 22, 0, tzinfo=dt.UTC)
DNS_ERROR = ("['SPY']: DNSError('Failed to perform, curl: (6) Could not resolve host: "
             "query2.finance.yahoo.com. See https://curl.se/libcurl/c/libcurl-errors.html first for more details.')")


def data_cfg(tmp_path: Path, **data):
    base = {"source": "yfinance", "tickers": ["SPY"], "start": "2024-01-01", "cache_dir": str(tmp_path / "data"),
            "retries": 1, "timeout_s": 10}
    return from_dict({"data": {**base, **data}}).data


def market(ticker: str = "SPY", end: str = "2024-06-28", *, dividend_factor: float = 0.98) -> pd.DataFrame:
    """Yahoo-style bars (contract names) up to ``end``, with Adj Close below Close before a dividend on
    2024-02-15. The bars of a date do not depend on ``end``: a longer market only adds later bars."""
    frame = synthetic.generate(ticker, dt.date(2024, 1, 1), dt.date(2024, 6, 28), seed=3)
    factor = np.where(frame.index < pd.Timestamp("2024-02-15"), dividend_factor, 1.0)
    return frame.assign(adj_close=frame["close"] * factor).loc[:end]


def yf_response(frame: pd.DataFrame, ticker: str, *, multi: bool = True, tz: str | None = None) -> pd.DataFrame:
    """Shape ``frame`` like ``yf.download`` output: Yahoo column names, ``Date`` index (ns, optionally
    tz-aware), MultiIndex (Price, Ticker) columns sorted by Price unless ``multi`` is False."""
    flat = frame.rename(columns=YAHOO_NAMES)
    idx = pd.DatetimeIndex(flat.index).as_unit("ns")
    if tz:
        idx = idx.tz_localize(tz)
    flat = flat.set_axis(idx.rename("Date"), axis=0)
    if not multi:
        return flat
    out = pd.concat([flat], axis=1, keys=[ticker], names=["Ticker", "Price"])
    out.columns = out.columns.swaplevel(0, 1)
    return out.sort_index(level=0, axis=1)


def empty_response(ticker: str) -> pd.DataFrame:
    """What yf.download returns for a failed ticker: all-NaN template reindexed to no dates."""
    empty = pd.DataFrame(columns=["Open", "High", "Low", "Close", "Adj Close", "Volume"],
                         index=pd.DatetimeIndex([], name="Date"), dtype=float)
    return yf_response(empty, ticker)


def log_failure(message: str) -> None:
    """Log a failure the way yf.download does (it does not raise)."""
    logger = logging.getLogger("yfinance")
    logger.error("\n1 Failed download:")
    logger.error(message)


class FakeDownload:
    """Stands in for ``yf.download``: checks the keyword arguments against the real signature, records each
    call and serves ``self.frame`` between start (inclusive) and end (exclusive), like Yahoo."""

    def __init__(self, frame: pd.DataFrame | None = None, ticker: str = "SPY", **shape):
        self.frame = frame
        self.ticker = ticker
        self.shape = shape
        self.calls: list[dict] = []
        self.fail: str | None = None  # log this and return an empty frame

    def __call__(self, tickers, **kwargs):
        DOWNLOAD_SIGNATURE.bind(tickers, **kwargs)  # TypeError on a keyword yf.download does not take
        self.calls.append({"tickers": tickers, **kwargs})
        if self.fail:
            log_failure(self.fail)
            return empty_response(tickers)
        f = self.frame
        if kwargs.get("start"):
            f = f[f.index >= pd.Timestamp(kwargs["start"])]
        if kwargs.get("end"):
            f = f[f.index < pd.Timestamp(kwargs["end"])]
        return yf_response(f, tickers, **self.shape)


def no_temp_files(directory: Path) -> bool:
    return not [p for p in directory.iterdir() if p.name.endswith(".tmp")]


# --------------------------------------------------------------------------------------------- normalize


def test_multiindex_columns_are_flattened():
    frame = market(end="2024-03-29")
    out = yahoo.normalize(yf_response(frame, "SPY"), "SPY")
    assert list(out.columns) == list(COLUMNS)
    assert out.index.name == "date"
    np.testing.assert_array_equal(out.to_numpy(), frame[list(COLUMNS)].to_numpy())
    assert out.index.equals(pd.DatetimeIndex(frame.index).as_unit("ns"))


def test_multiindex_with_several_tickers_picks_the_right_one():
    spy, qqq = market("SPY", "2024-02-29"), market("QQQ", "2024-02-29")
    both = pd.concat([yf_response(spy, "SPY"), yf_response(qqq, "QQQ")], axis=1).sort_index(level=0, axis=1)
    np.testing.assert_array_equal(yahoo.normalize(both, "QQQ").to_numpy(), qqq[list(COLUMNS)].to_numpy())
    np.testing.assert_array_equal(yahoo.normalize(both, "spy").to_numpy(), spy[list(COLUMNS)].to_numpy())
    with pytest.raises(DataError, match="other tickers"):
        yahoo.normalize(both, "IWM")


def test_flat_columns_and_tz_aware_index():
    frame = market(end="2024-03-29")
    out = yahoo.normalize(yf_response(frame, "SPY", multi=False, tz="America/New_York"), "SPY")
    assert out.index.tz is None
    assert list(out.index.date) == list(frame.index.date)
    np.testing.assert_array_equal(out.to_numpy(), frame[list(COLUMNS)].to_numpy())


def test_auto_adjusted_response_without_adj_close_uses_close():
    frame = market(end="2024-02-29")
    response = yf_response(frame, "SPY").drop(columns="Adj Close", level=0)
    out = yahoo.normalize(response, "SPY")
    np.testing.assert_array_equal(out["adj_close"].to_numpy(), frame["close"].to_numpy())


def test_fetch_passes_explicit_arguments_and_flattens():
    fake = FakeDownload(market())
    out = yahoo.fetch("SPY", dt.date(2024, 2, 1), dt.date(2024, 2, 29), deadline=time.monotonic() + 10,
                      download=fake)
    assert len(fake.calls) == 1
    call = fake.calls[0]
    assert call["tickers"] == "SPY"
    assert call["auto_adjust"] is False  # explicitly, since yfinance now defaults to True
    assert call["start"] == "2024-02-01"
    assert call["end"] == "2024-03-01"  # yfinance's end is exclusive; data.end is inclusive
    assert "period" not in call
    assert out.index[0] == pd.Timestamp("2024-02-01") and out.index[-1] == pd.Timestamp("2024-02-29")
    assert list(out.columns) == list(COLUMNS)
    expected = market().loc["2024-02-01":"2024-02-29", list(COLUMNS)]
    np.testing.assert_array_equal(out.to_numpy(), expected.to_numpy())


def test_fetch_without_start_asks_for_the_full_history():
    fake = FakeDownload(market())
    yahoo.fetch("SPY", None, None, deadline=time.monotonic() + 10, download=fake)
    assert fake.calls[0]["period"] == "max"
    assert fake.calls[0]["start"] is None and fake.calls[0]["end"] is None


def test_load_prices_with_multiindex_and_flat_responses_agree(tmp_path):
    a = load_prices(data_cfg(tmp_path / "a"), download=FakeDownload(market()), now=T0)
    b = load_prices(data_cfg(tmp_path / "b"), download=FakeDownload(market(), multi=False, tz="America/New_York"),
                    now=T0)
    pd.testing.assert_frame_equal(a.frames["SPY"], b.frames["SPY"])
    assert a.fingerprint == b.fingerprint


# --------------------------------------------------------------------------------------------- failures


def test_unreachable_without_cache_names_ticker_and_offline_sources(tmp_path):
    fake = FakeDownload(market())
    fake.fail = DNS_ERROR
    cfg = data_cfg(tmp_path)
    with pytest.raises(DataError) as err:
        load_prices(cfg, download=fake, now=T0)
    msg = str(err.value)
    assert "SPY" in msg
    assert "Could not resolve host" in msg  # what yfinance logged
    assert "data.source=csv" in msg and "data.source=synthetic" in msg
    assert not cache.path_for(cfg.cache_dir, "SPY", "1d").exists()


def test_unreachable_is_retried_then_fails(tmp_path):
    fake = FakeDownload(market())
    fake.fail = DNS_ERROR
    waits: list[float] = []
    with pytest.raises(yahoo.YahooError) as err:
        yahoo.fetch("SPY", dt.date(2024, 1, 1), None, deadline=time.monotonic() + 60, retries=3, download=fake,
                    sleep=waits.append)
    assert len(fake.calls) == 3 and len(waits) == 2
    assert err.value.transient and err.value.tickers == ["SPY"]
    assert "Could not resolve host" in err.value.reason


def test_empty_answer_without_error_log_is_no_bars_not_a_failure():
    fake = FakeDownload(market(end="2024-03-01"))  # nothing after Friday 2024-03-01
    out = yahoo.fetch("SPY", dt.date(2024, 3, 2), None, deadline=time.monotonic() + 10, retries=3, download=fake)
    assert out.empty and list(out.columns) == list(COLUMNS)
    assert len(fake.calls) == 1


def test_hang_is_cut_short_at_timeout(tmp_path):
    release = threading.Event()
    calls = []

    def hanging(tickers, **kwargs):
        DOWNLOAD_SIGNATURE.bind(tickers, **kwargs)
        calls.append(kwargs)
        release.wait(30)  # a half-open connection
        return yf_response(market(), tickers)

    t = time.monotonic()
    try:
        with pytest.raises(DataError) as err:
            load_prices(data_cfg(tmp_path, timeout_s=1, retries=3), download=hanging, now=T0)
    finally:
        release.set()
    elapsed = time.monotonic() - t
    assert elapsed < 5
    assert len(calls) == 1
    assert "SPY" in str(err.value) and "time limit" in str(err.value)


@pytest.mark.parametrize("error", [YFRateLimitError(), RuntimeError("Too Many Requests. Rate limited")])
def test_rate_limit_is_retried_with_backoff(error):
    frame = market()
    attempts = []

    def limited(tickers, **kwargs):
        DOWNLOAD_SIGNATURE.bind(tickers, **kwargs)
        attempts.append(kwargs)
        if len(attempts) < 3:
            raise error
        return yf_response(frame, tickers)

    waits: list[float] = []
    t = time.monotonic()
    out = yahoo.fetch("SPY", dt.date(2024, 1, 1), None, deadline=t + 60, retries=3, download=limited,
                      sleep=waits.append)
    assert time.monotonic() - t < 2  # the injected sleep was used
    assert len(attempts) == 3
    assert len(waits) == 2 and 0 < waits[0] < waits[1]  # growing backoff
    np.testing.assert_array_equal(out.to_numpy(), frame[list(COLUMNS)].to_numpy())


def test_rate_limit_logged_by_yfinance_is_retried():
    frame = market()
    attempts = []

    def limited(tickers, **kwargs):
        attempts.append(kwargs)
        if len(attempts) < 3:
            log_failure("['SPY']: YFRateLimitError('Too Many Requests. Rate limited. Try after a while.')")
            return empty_response(tickers)
        return yf_response(frame, tickers)

    waits: list[float] = []
    out = yahoo.fetch("SPY", dt.date(2024, 1, 1), None, deadline=time.monotonic() + 60, retries=3,
                      download=limited, sleep=waits.append)
    assert len(attempts) == 3 and len(waits) == 2
    assert len(out) == len(frame)


def test_rate_limit_past_retries_fails():
    def limited(tickers, **kwargs):
        raise YFRateLimitError()

    waits: list[float] = []
    with pytest.raises(yahoo.YahooError, match="Rate limited"):
        yahoo.fetch("SPY", None, None, deadline=time.monotonic() + 60, retries=2, download=limited,
                    sleep=waits.append)
    assert len(waits) == 1


def test_delisted_fails_at_once_without_retry(tmp_path):
    fake = FakeDownload(market(), ticker="XYZQ")
    fake.fail = "['XYZQ']: possibly delisted; no price data found  (1d 2024-01-01 -> 2024-06-29)"
    waits: list[float] = []
    with pytest.raises(yahoo.YahooError) as err:
        yahoo.fetch("XYZQ", dt.date(2024, 1, 1), None, deadline=time.monotonic() + 60, retries=3, download=fake,
                    sleep=waits.append)
    assert len(fake.calls) == 1 and waits == []
    assert not err.value.transient
    assert "possibly delisted" in err.value.reason

    fake.calls.clear()
    with pytest.raises(DataError, match="XYZQ"):
        load_prices(data_cfg(tmp_path, tickers=["XYZQ"], retries=3), download=fake, now=T0)
    assert len(fake.calls) == 1


def test_non_transient_exception_fails_at_once():
    calls = []

    def broken(tickers, **kwargs):
        calls.append(1)
        raise ValueError("unexpected payload")

    with pytest.raises(yahoo.YahooError, match="unexpected payload"):
        yahoo.fetch("SPY", None, None, deadline=time.monotonic() + 60, retries=3, download=broken,
                    sleep=lambda s: None)
    assert len(calls) == 1


# --------------------------------------------------------------------------------------------- cache


def test_first_load_writes_the_cache(tmp_path):
    cfg = data_cfg(tmp_path, end="2024-03-29")
    fake = FakeDownload(market())
    prices = load_prices(cfg, download=fake, now=T0)
    assert prices.network_calls == 1 and len(fake.calls) == 1
    path = tmp_path / "data" / "SPY_1d.parquet"
    assert path.is_file()
    assert no_temp_files(path.parent)
    entry = cache.read(path)
    assert entry.fetched_at == T0
    assert entry.requested_start == dt.date(2024, 1, 1)
    assert entry.last_date == dt.date(2024, 3, 29)
    np.testing.assert_array_equal(entry.frame.to_numpy(), prices.frames["SPY"].to_numpy())


def test_caret_ticker_cache_file_name(tmp_path):
    load_prices(data_cfg(tmp_path, tickers=["^GSPC"]), download=FakeDownload(market("^GSPC"), "^GSPC"), now=T0)
    assert (tmp_path / "data" / "_GSPC_1d.parquet").is_file()


def test_rerun_within_refresh_window_makes_no_download_call(tmp_path):
    cfg = data_cfg(tmp_path)
    fake = FakeDownload(market(end="2024-03-04"))
    first = load_prices(cfg, download=fake, now=T0)
    fake.calls.clear()
    again = load_prices(cfg, download=fake, now=T0 + dt.timedelta(hours=11))
    assert fake.calls == [] and again.network_calls == 0
    pd.testing.assert_frame_equal(again.frames["SPY"], first.frames["SPY"])
    assert again.fingerprint == first.fingerprint
    # refresh=True ignores the age
    load_prices(cfg, download=fake, now=T0 + dt.timedelta(hours=1), refresh=True)
    assert len(fake.calls) == 1


def test_old_cache_that_reaches_data_end_makes_no_download_call(tmp_path):
    cfg = data_cfg(tmp_path, end="2024-02-29")
    fake = FakeDownload(market())
    load_prices(cfg, download=fake, now=T0)
    fake.calls.clear()
    later = load_prices(cfg, download=fake, now=T0 + dt.timedelta(days=30))
    assert fake.calls == [] and later.network_calls == 0


def test_fresh_cache_fetched_with_an_earlier_end_is_not_served_for_the_latest(tmp_path):
    """A cache written for data.end=2024-03-29 must not pass for 'up to the latest bar' an hour later."""
    fake = FakeDownload(market(end="2024-06-28"))
    load_prices(data_cfg(tmp_path, end="2024-03-29"), download=fake, now=T0)
    fake.calls.clear()
    latest = load_prices(data_cfg(tmp_path), download=fake, now=T0 + dt.timedelta(hours=1))
    assert len(fake.calls) == 1 and fake.calls[0]["start"] == "2024-03-29"  # the tail only
    assert latest.frames["SPY"].index[-1] == pd.Timestamp("2024-06-28")
    # and a request within what was fetched is served from the cache
    fake.calls.clear()
    load_prices(data_cfg(tmp_path, end="2024-05-31"), download=fake, now=T0 + dt.timedelta(hours=2))
    assert fake.calls == []


def test_cache_with_later_requested_start_is_not_used(tmp_path):
    fake = FakeDownload(market())
    load_prices(data_cfg(tmp_path, start="2024-02-01"), download=fake, now=T0)
    fake.calls.clear()
    earlier = load_prices(data_cfg(tmp_path, start="2024-01-01"), download=fake, now=T0 + dt.timedelta(hours=1))
    assert len(fake.calls) == 1 and fake.calls[0]["start"] == "2024-01-01"
    assert earlier.frames["SPY"].index[0] == pd.Timestamp("2024-01-02")


def test_old_cache_fetches_only_the_tail_and_merges(tmp_path):
    cfg = data_cfg(tmp_path)
    fake = FakeDownload(market(end="2024-03-04"))
    load_prices(cfg, download=fake, now=T0)
    cached = cache.read(tmp_path / "data" / "SPY_1d.parquet")

    fake.frame = market(end="2024-03-15")  # two more weeks of bars at Yahoo
    fake.calls.clear()
    later = T0 + dt.timedelta(days=11)
    prices = load_prices(cfg, download=fake, now=later)
    assert len(fake.calls) == 1 and prices.network_calls == 1
    assert fake.calls[0]["start"] == cached.last_date.isoformat() == "2024-03-04"
    out = prices.frames["SPY"]
    full = market(end="2024-03-15")
    assert out.index.equals(pd.DatetimeIndex(full.index).as_unit(out.index.unit))
    np.testing.assert_allclose(out.to_numpy(), full[list(COLUMNS)].to_numpy(), rtol=1e-12)
    entry = cache.read(tmp_path / "data" / "SPY_1d.parquet")
    assert entry.last_date == dt.date(2024, 3, 15) and entry.fetched_at == later
    assert entry.requested_start == dt.date(2024, 1, 1)
    assert no_temp_files(tmp_path / "data")


def test_tail_with_no_new_bars_keeps_the_cache(tmp_path):
    cfg = data_cfg(tmp_path)
    fake = FakeDownload(market(end="2024-03-01"))  # Friday
    first = load_prices(cfg, download=fake, now=T0)
    fake.frame = market(end="2024-03-01").iloc[:-1]  # Yahoo has nothing from the overlap bar on (weekend)
    fake.calls.clear()
    again = load_prices(cfg, download=fake, now=T0 + dt.timedelta(days=1))
    assert len(fake.calls) == 1
    pd.testing.assert_frame_equal(again.frames["SPY"], first.frames["SPY"])


def test_unreachable_with_cache_uses_it_with_a_warning(tmp_path, caplog):
    cfg = data_cfg(tmp_path)
    fake = FakeDownload(market(end="2024-03-01"))
    first = load_prices(cfg, download=fake, now=T0)
    fake.fail = DNS_ERROR
    with caplog.at_level(logging.WARNING, logger="fincast.data"):
        prices = load_prices(cfg, download=fake, now=T0 + dt.timedelta(days=3))
    assert prices.network_calls >= 1
    pd.testing.assert_frame_equal(prices.frames["SPY"], first.frames["SPY"])
    warnings = [w for w in prices.warnings if "using the cache" in w]
    assert len(warnings) == 1
    assert "SPY" in warnings[0] and "2024-03-01" in warnings[0] and "Could not resolve host" in warnings[0]
    assert any("2024-03-01" in r.getMessage() for r in caplog.records)


def test_changed_adjustment_refetches_full_history(tmp_path):
    cfg = data_cfg(tmp_path)
    fake = FakeDownload(market(end="2024-03-04"))
    load_prices(cfg, download=fake, now=T0)

    # a dividend after the last fetch: Yahoo now reports every earlier Adj Close 1% lower
    after = market(end="2024-03-15")
    ex_date = pd.Timestamp("2024-03-08")
    after["adj_close"] = after["adj_close"] * np.where(after.index < ex_date, 0.99, 1.0)
    fake.frame = after
    fake.calls.clear()
    prices = load_prices(cfg, download=fake, now=T0 + dt.timedelta(days=11))
    assert [c["start"] for c in fake.calls] == ["2024-03-04", "2024-01-01"]
    assert prices.network_calls == 2
    out = prices.frames["SPY"]
    np.testing.assert_allclose(out["adj_close"].to_numpy(), after["adj_close"].to_numpy(), rtol=1e-12)
    assert any("dividend or split" in w and "2024-03-04" in w for w in prices.warnings)
    entry = cache.read(tmp_path / "data" / "SPY_1d.parquet")
    np.testing.assert_allclose(entry.frame["adj_close"].to_numpy(), after["adj_close"].to_numpy(), rtol=1e-12)


def test_unchanged_adjustment_does_not_refetch(tmp_path):
    cfg = data_cfg(tmp_path)
    fake = FakeDownload(market(end="2024-03-04"))
    load_prices(cfg, download=fake, now=T0)
    fake.frame = market(end="2024-03-15")
    fake.calls.clear()
    prices = load_prices(cfg, download=fake, now=T0 + dt.timedelta(days=11))
    assert len(fake.calls) == 1
    assert not any("dividend" in w for w in prices.warnings)


def _stale_load_must_fail(tmp_path, cfg, fake, exc_type):
    path = tmp_path / "data" / "SPY_1d.parquet"
    before = path.read_bytes()
    fake.frame = market(end="2024-03-15")
    with pytest.raises(exc_type):
        load_prices(cfg, download=fake, now=T0 + dt.timedelta(days=11))
    assert path.read_bytes() == before  # the previous cache is intact
    assert no_temp_files(path.parent)
    assert cache.read(path).last_date == dt.date(2024, 3, 4)


def test_infinite_refresh_age_pins_the_cache(tmp_path):
    """refresh_after_hours=inf (a resumed run, a study's workers) uses the cache as is, however old."""
    import dataclasses
    import math

    cfg = data_cfg(tmp_path)
    fake = FakeDownload(market(end="2024-03-04"))
    load_prices(cfg, download=fake, now=T0)
    calls = fake.calls if hasattr(fake, "calls") else None
    fake.frame = market(end="2024-03-15")
    pinned = dataclasses.replace(cfg, refresh_after_hours=math.inf)
    prices = load_prices(pinned, download=fake, now=T0 + dt.timedelta(days=400))
    assert prices.frames["SPY"].index[-1] == pd.Timestamp("2024-03-04") and prices.network_calls == 0
    assert calls is None or fake.calls == calls


def test_crash_in_rename_leaves_previous_cache_intact(tmp_path, monkeypatch):
    cfg = data_cfg(tmp_path)
    fake = FakeDownload(market(end="2024-03-04"))
    load_prices(cfg, download=fake, now=T0)

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr("fincast.config.files.os.replace", crash)
    _stale_load_must_fail(tmp_path, cfg, fake, OSError)
    monkeypatch.undo()
    # the next run recovers and writes the new data
    assert load_prices(cfg, download=fake, now=T0 + dt.timedelta(days=11)).frames["SPY"].index[-1] == \
        pd.Timestamp("2024-03-15")


def test_crash_mid_write_leaves_previous_cache_intact(tmp_path, monkeypatch):
    cfg = data_cfg(tmp_path)
    fake = FakeDownload(market(end="2024-03-04"))
    load_prices(cfg, download=fake, now=T0)

    def half_write(table, where, *args, **kwargs):
        where.write(b"PAR1 half a parquet file")
        raise KeyboardInterrupt  # e.g. Ctrl-C in the middle of the write

    monkeypatch.setattr(cache.pq, "write_table", half_write)
    _stale_load_must_fail(tmp_path, cfg, fake, KeyboardInterrupt)


def test_unreadable_cache_is_refetched(tmp_path):
    cfg = data_cfg(tmp_path)
    path = tmp_path / "data" / "SPY_1d.parquet"
    path.parent.mkdir()
    path.write_bytes(b"not parquet")
    fake = FakeDownload(market(end="2024-03-04"))
    prices = load_prices(cfg, download=fake, now=T0)
    assert len(fake.calls) == 1 and fake.calls[0]["start"] == "2024-01-01"
    assert cache.read(path).last_date == prices.frames["SPY"].index[-1].date()


def test_cache_write_is_atomic_helper(tmp_path):
    path = tmp_path / "c" / "X_1d.parquet"
    frame = market(end="2024-02-29")
    cache.write(path, frame, fetched_at=T0, requested_start=None)
    entry = cache.read(path)
    assert entry.requested_start is None and entry.covers_start(dt.date(1990, 1, 1))
    np.testing.assert_array_equal(entry.frame.to_numpy(), frame.to_numpy())
    assert sorted(os.listdir(path.parent)) == ["X_1d.parquet"]
