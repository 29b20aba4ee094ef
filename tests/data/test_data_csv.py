"""CSV source: both yfinance layouts, file lookup, slicing, fingerprint; the shared real data when present."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fincast.config import from_dict
from fincast.data import COLUMNS, DataError, csvsource, load_prices, synthetic

YAHOO_NAMES = {"open": "Open", "high": "High", "low": "Low", "close": "Close", "adj_close": "Adj Close",
               "volume": "Volume"}
SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def data_cfg(**data):
    return from_dict({"data": data}).data


def source_bars(ticker: str = "SPY", start=dt.date(2024, 1, 1), end=dt.date(2024, 4, 30)) -> pd.DataFrame:
    """Contract frame with Adj Close != Close (a dividend factor), so swapped columns would show."""
    frame = synthetic.generate(ticker, start, end, seed=7)
    factor = np.where(frame.index < pd.Timestamp("2024-03-01"), 0.97, 1.0)
    return frame.assign(adj_close=frame["close"] * factor)


def yahoo_frame(frame: pd.DataFrame, *, adj_close: bool = True) -> pd.DataFrame:
    out = frame.rename(columns=YAHOO_NAMES).rename_axis("Date")
    return out if adj_close else out.drop(columns=["Adj Close"])


def multiindex_frame(frame: pd.DataFrame, ticker: str, *, adj_close: bool = True) -> pd.DataFrame:
    """What ``yf.download(ticker)`` returns: columns MultiIndex (Price, Ticker), sorted by Price."""
    flat = yahoo_frame(frame, adj_close=adj_close)
    out = pd.concat([flat], axis=1, keys=[ticker], names=["Ticker", "Price"])
    out.columns = out.columns.swaplevel(0, 1)
    return out.sort_index(level=0, axis=1)


def write_classic(path: Path, frame: pd.DataFrame, *, adj_close: bool = True) -> None:
    yahoo_frame(frame, adj_close=adj_close).to_csv(path)


def write_multi(path: Path, frame: pd.DataFrame, ticker: str, *, adj_close: bool = True) -> None:
    multiindex_frame(frame, ticker, adj_close=adj_close).to_csv(path)


def load_dir(directory: Path, tickers=("SPY",), **data):
    return load_prices(data_cfg(source="csv", path=str(directory), tickers=list(tickers), start=None, **data))


# --------------------------------------------------------------------------------------------- layouts


def test_multi_row_header_file_looks_like_yfinance(tmp_path):
    write_multi(tmp_path / "SPY.csv", source_bars(), "SPY")
    head = (tmp_path / "SPY.csv").read_text().splitlines()[:3]
    assert head[0] == "Price,Adj Close,Close,High,Low,Open,Volume"
    assert head[1] == "Ticker,SPY,SPY,SPY,SPY,SPY,SPY"
    assert head[2] == "Date,,,,,,"


def test_classic_and_multi_row_header_load_to_identical_frames(tmp_path):
    frame = source_bars()
    (tmp_path / "classic").mkdir()
    (tmp_path / "multi").mkdir()
    write_classic(tmp_path / "classic" / "SPY.csv", frame)
    write_multi(tmp_path / "multi" / "SPY.csv", frame, "SPY")
    assert (tmp_path / "classic" / "SPY.csv").read_text().startswith("Date,Open,High,Low,Close,Adj Close,Volume\n")

    classic = load_dir(tmp_path / "classic")
    multi = load_dir(tmp_path / "multi")
    pd.testing.assert_frame_equal(classic.frames["SPY"], multi.frames["SPY"])
    assert classic.fingerprint == multi.fingerprint
    # and both equal the bars that were written, column by column
    out = classic.frames["SPY"]
    assert list(out.columns) == list(COLUMNS)
    assert out.index.equals(pd.DatetimeIndex(frame.index))
    np.testing.assert_allclose(out.to_numpy(), frame[list(COLUMNS)].to_numpy(), rtol=1e-12)
    assert not np.allclose(out["adj_close"], out["close"])  # the test data tells them apart


@pytest.mark.parametrize("layout", ["classic", "multi"])
def test_layout_without_adj_close_uses_close(tmp_path, layout):
    frame = source_bars()
    if layout == "classic":
        write_classic(tmp_path / "SPY.csv", frame, adj_close=False)
        assert "Adj Close" not in (tmp_path / "SPY.csv").read_text().splitlines()[0]
    else:
        write_multi(tmp_path / "SPY.csv", frame, "SPY", adj_close=False)
    out = load_dir(tmp_path).frames["SPY"]
    np.testing.assert_array_equal(out["adj_close"].to_numpy(), out["close"].to_numpy())
    np.testing.assert_allclose(out["close"].to_numpy(), frame["close"].to_numpy(), rtol=1e-12)
    np.testing.assert_allclose(out["open"].to_numpy(), frame["open"].to_numpy(), rtol=1e-12)


def test_multi_row_header_for_another_ticker_is_an_error(tmp_path):
    write_multi(tmp_path / "SPY.csv", source_bars(), "QQQ")
    with pytest.raises(DataError, match="QQQ.*expected SPY"):
        load_dir(tmp_path)


def test_unparseable_date_names_the_line(tmp_path):
    write_classic(tmp_path / "SPY.csv", source_bars())
    lines = (tmp_path / "SPY.csv").read_text().splitlines()
    lines[3] = "2024-13-45" + lines[3][len("2024-01-04"):]
    (tmp_path / "SPY.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"line 4: unparseable date '2024-13-45'"):
        load_dir(tmp_path)


def test_empty_file_is_an_error(tmp_path):
    (tmp_path / "SPY.csv").write_text("")
    with pytest.raises(DataError, match="empty file"):
        load_dir(tmp_path)


# --------------------------------------------------------------------------------------------- files


def test_caret_ticker_found_without_the_caret(tmp_path):
    frame = source_bars("^GSPC")
    write_classic(tmp_path / "GSPC.csv", frame)
    prices = load_dir(tmp_path, ["^GSPC"])
    assert list(prices.frames) == ["^GSPC"]
    np.testing.assert_allclose(prices.frames["^GSPC"]["close"].to_numpy(), frame["close"].to_numpy(), rtol=1e-12)


def test_caret_ticker_in_multi_row_header(tmp_path):
    write_multi(tmp_path / "GSPC.csv", source_bars("^GSPC"), "^GSPC")
    assert len(load_dir(tmp_path, ["^GSPC"]).frames["^GSPC"]) == len(source_bars("^GSPC"))


def test_close_only_file_becomes_flat_bars_without_volume(tmp_path):
    """Rate and index files (IRX.csv) hold just Date,Close: open = high = low = close, volume 0."""
    (tmp_path / "IRX.csv").write_text("Date,Close\n2024-01-02,5.21\n2024-01-03,5.19\n2024-01-04,5.24\n")
    out = load_prices(data_cfg(source="csv", path=str(tmp_path), tickers=["^IRX"], start=None)).frames["^IRX"]
    assert list(out.index.strftime("%Y-%m-%d")) == ["2024-01-02", "2024-01-03", "2024-01-04"]
    for col in ("open", "high", "low", "close", "adj_close"):
        np.testing.assert_array_equal(out[col].to_numpy(), [5.21, 5.19, 5.24])
    assert (out["volume"] == 0).all() and out["volume"].dtype == np.float64


def test_file_with_some_but_not_all_bar_columns_still_errors(tmp_path):
    (tmp_path / "IRX.csv").write_text("Date,Open,Close\n2024-01-02,5.2,5.21\n")
    with pytest.raises(DataError, match="missing column.*high, low, volume"):
        load_dir(tmp_path, ["^IRX"])


def test_missing_file_error_names_directory_and_ticker(tmp_path):
    write_classic(tmp_path / "SPY.csv", source_bars())
    with pytest.raises(DataError) as err:
        load_dir(tmp_path, ["SPY", "QQQ"])
    msg = str(err.value)
    assert "QQQ" in msg and str(tmp_path) in msg and "QQQ.csv" in msg


def test_path_that_is_not_a_directory(tmp_path):
    with pytest.raises(DataError, match="not a directory"):
        load_dir(tmp_path / "nowhere")


def test_start_and_end_slice_inclusively(tmp_path):
    frame = source_bars()
    write_classic(tmp_path / "SPY.csv", frame)
    start, end = frame.index[10], frame.index[40]
    prices = load_prices(data_cfg(source="csv", path=str(tmp_path), tickers=["SPY"], start=str(start.date()),
                                  end=str(end.date())))
    out = prices.frames["SPY"]
    assert out.index[0] == start and out.index[-1] == end
    assert len(out) == 31
    np.testing.assert_allclose(out.to_numpy(), frame.loc[start:end, list(COLUMNS)].to_numpy(), rtol=1e-12)

    # dates between bars: the slice holds exactly the bars inside
    sat = pd.Timestamp("2024-02-03")
    assert sat.day_of_week == 5
    prices = load_prices(data_cfg(source="csv", path=str(tmp_path), tickers=["SPY"], start="2024-02-03"))
    assert prices.frames["SPY"].index[0] == pd.Timestamp("2024-02-05")
    assert len(prices.frames["SPY"]) == int((frame.index >= sat).sum())


def test_fingerprint_changes_with_one_value_and_is_stable_otherwise(tmp_path):
    frame = source_bars()
    write_classic(tmp_path / "SPY.csv", frame)
    first = load_dir(tmp_path)
    assert load_dir(tmp_path).fingerprint == first.fingerprint
    # rewriting the same numbers in the other layout does not change it
    write_multi(tmp_path / "SPY.csv", frame, "SPY")
    assert load_dir(tmp_path).fingerprint == first.fingerprint

    changed = frame.copy()
    changed.loc[changed.index[30], "volume"] += 1.0
    write_classic(tmp_path / "SPY.csv", changed)
    assert load_dir(tmp_path).fingerprint != first.fingerprint

    # a different slice of the same file is a different data set
    write_classic(tmp_path / "SPY.csv", frame)
    sliced = load_prices(data_cfg(source="csv", path=str(tmp_path), tickers=["SPY"], start="2024-01-10"))
    assert sliced.fingerprint != first.fingerprint


def test_fingerprint_depends_on_ticker_names(tmp_path):
    frame = source_bars()
    write_classic(tmp_path / "SPY.csv", frame)
    write_classic(tmp_path / "QQQ.csv", frame)
    assert load_dir(tmp_path, ["SPY"]).fingerprint != load_dir(tmp_path, ["QQQ"]).fingerprint


# --------------------------------------------------------------------------------------------- shared real data


def test_shared_crypto_files_load():
    crypto = SHARED / "crypto"
    if not (crypto / "BTC-USD.csv").is_file() or not (crypto / "ETH-USD.csv").is_file():
        pytest.skip(f"shared market data not present at {crypto}")
    prices = load_prices(data_cfg(source="csv", path=str(crypto), tickers=["BTC-USD", "ETH-USD"], start=None))
    raw_eth = pd.read_csv(crypto / "ETH-USD.csv", parse_dates=["Date"])
    raw_btc = pd.read_csv(crypto / "BTC-USD.csv", parse_dates=["Date"])
    holes = raw_eth.loc[raw_eth["Close"].isna(), "Date"]
    assert len(holes) == 4

    eth = prices.frames["ETH-USD"]
    btc = prices.frames["BTC-USD"]
    assert len(eth) == len(raw_eth) and len(btc) == len(raw_btc)  # nothing dropped, nothing invented
    assert not eth.isna().any().any() and not btc.isna().any().any()
    for d in holes:
        prev = eth.index[eth.index.get_loc(d) - 1]
        assert eth.at[d, "volume"] == eth.at[prev, "volume"]  # the whole last good bar, volume included
        assert eth.at[d, "close"] == eth.at[prev, "close"]
    warnings = [w for w in prices.warnings if "ETH-USD" in w]
    # the repair, and the plausibility check's one finding: ETH's first trading day (x0.27 on 2015-08-08)
    assert len(warnings) == 2 and "forward-filled 4 bar(s)" in warnings[0]
    assert "one-bar move(s) of close" in warnings[1] and "2015-08-08 x0.272" in warnings[1]
    for d in holes:
        assert f"{d:%Y-%m-%d}" in warnings[0]
    assert not any("BTC-USD" in w for w in prices.warnings)
    assert (btc.index.day_of_week >= 5).any()  # crypto trades on weekends


def test_timestamps_with_utc_offsets_keep_their_local_calendar_day(tmp_path):
    """Ticker.history().to_csv() writes exchange-local timestamps; a European Monday at 00:00+01:00 is
    Monday, not Sunday in UTC."""
    rows = ["Date,Open,High,Low,Close,Adj Close,Volume"]
    days = pd.bdate_range("2020-01-06", periods=30)
    for i, d in enumerate(days):
        rows.append(f"{d:%Y-%m-%d} 00:00:00+01:00,{10 + i},{11 + i},{9 + i},{10.5 + i},{10.5 + i},100")
    (tmp_path / "SAP.DE.csv").write_text("\n".join(rows) + "\n")
    frame, _ = csvsource.read_csv(tmp_path / "SAP.DE.csv", "SAP.DE")
    assert list(frame.index) == list(days)
    assert (frame.index.day_of_week < 5).all()
