"""The price-frame contract: every bad-data case is a DataError naming ticker, date and column; the
documented repairs (sort, short forward-fill) are warnings. All offline."""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fincast.config import from_dict
from fincast.data import COLUMNS, DataError, load_prices, synthetic
from fincast.data.validate import normalize_columns, validate

CSV_HEADER = "Date,Open,High,Low,Close,Adj Close,Volume"


def data_cfg(**data):
    return from_dict({"data": data}).data


def bars(n: int = 10, start: str = "2024-01-02", freq: str = "B") -> pd.DataFrame:
    """A valid contract frame whose values differ on every row (so a wrong fill is visible)."""
    idx = pd.date_range(start, periods=n, freq=freq, name="date")
    close = 100.0 + np.arange(n) * 1.5
    return pd.DataFrame({
        "open": close - 0.5, "high": close + 1.0, "low": close - 1.0, "close": close,
        "adj_close": close * 0.98, "volume": 1000.0 + np.arange(n) * 10,
    }, index=idx)


def csv_row(date: pd.Timestamp, row: pd.Series) -> str:
    return ",".join([f"{date:%Y-%m-%d}"] + [repr(float(row[c])) for c in COLUMNS])


def write_classic(path: Path, frame: pd.DataFrame) -> list[str]:
    lines = [CSV_HEADER] + [csv_row(d, r) for d, r in frame.iterrows()]
    path.write_text("\n".join(lines) + "\n")
    return lines


def load_csv(directory: Path, tickers, **data):
    return load_prices(data_cfg(source="csv", path=str(directory), tickers=list(tickers), start=None, **data))


# --------------------------------------------------------------------------------------------- columns


def test_missing_columns_named_with_expected_layout(tmp_path):
    (tmp_path / "SPY.csv").write_text("Date,Open,High,Close,Adj Close\n2024-01-02,1,2,1.5,1.5\n")
    with pytest.raises(DataError) as err:
        load_csv(tmp_path, ["SPY"])
    msg = str(err.value)
    assert "SPY" in msg
    assert "low" in msg and "volume" in msg
    assert "missing column" in msg
    assert CSV_HEADER in msg  # the expected layout is spelled out
    # the columns that are present are not reported missing
    missing_part = msg.split("missing column(s)")[1].split(";")[0]
    assert "open" not in missing_part and "close" not in missing_part


def test_normalize_columns_maps_vendor_spellings():
    raw = pd.DataFrame({"Volume": [1.0], "Adj Close": [2.0], "Close": [3.0], "Low": [4.0], "High": [5.0],
                        "Open": [6.0]})
    out = normalize_columns(raw, "x")
    assert list(out.columns) == list(COLUMNS)
    assert out.iloc[0].to_dict() == {"open": 6.0, "high": 5.0, "low": 4.0, "close": 3.0, "adj_close": 2.0,
                                     "volume": 1.0}


# --------------------------------------------------------------------------------------------- values


def test_non_numeric_value_names_column_date_and_csv_line(tmp_path):
    frame = bars(8)
    lines = write_classic(tmp_path / "SPY.csv", frame)
    bad_date = frame.index[4]
    fields = lines[5].split(",")  # line 6 of the file (header is line 1)
    fields[4] = "12.3abc"  # Close
    lines[5] = ",".join(fields)
    (tmp_path / "SPY.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as err:
        load_csv(tmp_path, ["SPY"])
    msg = str(err.value)
    assert "SPY" in msg
    assert "non-numeric" in msg and "'12.3abc'" in msg
    assert "column close" in msg
    assert f"{bad_date:%Y-%m-%d}" in msg
    assert "line 6" in msg


def test_non_numeric_line_number_in_multi_row_header_layout(tmp_path):
    # Price/Ticker/Date header = 3 lines, so data row k (0-based) is file line k + 4
    frame = bars(6)
    order = ["adj_close", "close", "high", "low", "open", "volume"]
    body = [",".join([f"{d:%Y-%m-%d}"] + [repr(float(r[c])) for c in order]) for d, r in frame.iterrows()]
    body[2] = body[2].rsplit(",", 1)[0] + ",n/a"  # Volume of the third bar
    text = "\n".join(["Price,Adj Close,Close,High,Low,Open,Volume", "Ticker,SPY,SPY,SPY,SPY,SPY,SPY",
                      "Date,,,,,,", *body])
    (tmp_path / "SPY.csv").write_text(text + "\n")
    with pytest.raises(DataError) as err:
        load_csv(tmp_path, ["SPY"])
    msg = str(err.value)
    assert "column volume" in msg and f"{frame.index[2]:%Y-%m-%d}" in msg and "line 6" in msg


def test_non_numeric_without_line_numbers_still_names_date_and_column():
    frame = bars(5).astype(object)
    frame.iloc[3, 1] = "oops"  # high
    with pytest.raises(DataError) as err:
        validate(frame, "QQQ", "unit test")
    msg = str(err.value)
    assert "QQQ" in msg and "column high" in msg and f"{frame.index[3]:%Y-%m-%d}" in msg
    assert "line" not in msg


@pytest.mark.parametrize("column", ["open", "close", "adj_close", "volume"])
def test_infinite_value_is_an_error(column):
    frame = bars(6)
    frame.loc[frame.index[2], column] = np.inf
    with pytest.raises(DataError) as err:
        validate(frame, "SPY", "unit test")
    msg = str(err.value)
    assert "infinite" in msg and f"column {column}" in msg and f"{frame.index[2]:%Y-%m-%d}" in msg
    assert "SPY" in msg


@pytest.mark.parametrize(("column", "value"), [("close", 0.0), ("low", -1.0), ("adj_close", -0.01)])
def test_non_positive_price_is_an_error(column, value):
    frame = bars(6)
    frame.loc[frame.index[3], column] = value
    with pytest.raises(DataError) as err:
        validate(frame, "SPY", "unit test")
    msg = str(err.value)
    assert "non-positive" in msg and column in msg and f"{frame.index[3]:%Y-%m-%d}" in msg and "SPY" in msg


def test_negative_volume_is_an_error():
    frame = bars(6)
    frame.loc[frame.index[1], "volume"] = -5.0
    with pytest.raises(DataError, match=f"SPY.*negative volume.*{frame.index[1]:%Y-%m-%d}"):
        validate(frame, "SPY", "")


def test_zero_volume_is_accepted():
    frame = bars(6)
    frame.loc[frame.index[1], "volume"] = 0.0
    assert validate(frame, "SPY", "").frame["volume"].iloc[1] == 0.0


def test_high_below_low_is_an_error(tmp_path):
    frame = bars(6)
    d = frame.index[2]
    frame.loc[d, "high"], frame.loc[d, "low"] = frame.loc[d, "low"], frame.loc[d, "high"]
    write_classic(tmp_path / "SPY.csv", frame)
    with pytest.raises(DataError) as err:
        load_csv(tmp_path, ["SPY"])
    msg = str(err.value)
    assert "high < low" in msg and f"{d:%Y-%m-%d}" in msg and "SPY" in msg
    assert "line 4" in msg  # row 2 -> line 4


# --------------------------------------------------------------------------------------------- missing values


def test_isolated_missing_day_is_forward_filled_with_a_warning(tmp_path, caplog):
    frame = bars(8)
    lines = write_classic(tmp_path / "SPY.csv", frame)
    hole = frame.index[4]
    lines[5] = f"{hole:%Y-%m-%d},,,,,,"  # Yahoo's all-empty row
    (tmp_path / "SPY.csv").write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING, logger="fincast.data"):
        prices = load_csv(tmp_path, ["SPY"], max_fill_gap=1)
    out = prices.frames["SPY"]
    assert list(out.index) == list(frame.index)  # the row is kept, not dropped
    prev = frame.index[3]
    for col in ("open", "high", "low", "close", "adj_close"):
        assert out.at[hole, col] == pytest.approx(frame.at[prev, col], rel=1e-12)
    assert out.at[hole, "volume"] == frame.at[prev, "volume"]  # carried forward too, not 0
    # the other rows are untouched
    others = out.drop(index=hole)
    np.testing.assert_allclose(others.to_numpy(), frame.drop(index=hole).to_numpy(), rtol=1e-12)
    assert not out.isna().any().any()
    warning = [w for w in prices.warnings if "forward-filled" in w]
    assert len(warning) == 1
    assert "1 bar" in warning[0] and f"{hole:%Y-%m-%d}" in warning[0] and "SPY" in warning[0]
    assert any("forward-filled" in r.getMessage() for r in caplog.records)


def test_partially_missing_row_fills_only_the_missing_cells():
    frame = bars(6)
    d = frame.index[2]
    frame.loc[d, "adj_close"] = np.nan
    checked = validate(frame, "SPY", "")
    assert checked.frame.at[d, "adj_close"] == frame.at[frame.index[1], "adj_close"]
    assert checked.frame.at[d, "close"] == frame.at[d, "close"]
    assert checked.frame.at[d, "volume"] == frame.at[d, "volume"]
    assert any("forward-filled 1 bar" in w for w in checked.warnings)


def test_warning_counts_every_filled_bar():
    frame = bars(12)
    holes = [frame.index[2], frame.index[3], frame.index[8]]
    frame.loc[holes, :] = np.nan
    checked = validate(frame, "SPY", "", max_fill_gap=2)
    assert any("forward-filled 3 bar(s)" in w for w in checked.warnings)
    expected = [frame.at[frame.index[1], "volume"]] * 2 + [frame.at[frame.index[7], "volume"]]
    assert checked.frame.loc[holes, "volume"].tolist() == expected
    assert checked.frame.at[holes[1], "close"] == frame.at[frame.index[1], "close"]


def test_missing_run_longer_than_max_fill_gap_is_an_error():
    frame = bars(12)
    run = frame.index[4:7]  # 3 consecutive bars
    frame.loc[run, "close"] = np.nan
    with pytest.raises(DataError) as err:
        validate(frame, "SPY", "unit test", max_fill_gap=2)
    msg = str(err.value)
    assert "SPY" in msg and "3 consecutive" in msg and f"{run[0]:%Y-%m-%d}" in msg
    assert "column close" in msg and "max_fill_gap = 2" in msg
    # the same run is repaired when the gap allows it
    assert len(validate(frame, "SPY", "unit test", max_fill_gap=3).frame) == 12


def test_max_fill_gap_from_config_is_used(tmp_path):
    frame = bars(10)
    lines = write_classic(tmp_path / "SPY.csv", frame)
    for k in (4, 5):
        lines[k] = f"{frame.index[k - 1]:%Y-%m-%d},,,,,,"
    (tmp_path / "SPY.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match="max_fill_gap = 1"):
        load_csv(tmp_path, ["SPY"], max_fill_gap=1)
    assert len(load_csv(tmp_path, ["SPY"], max_fill_gap=2).frames["SPY"]) == 10


def test_missing_first_row_cannot_be_filled():
    frame = bars(5)
    frame.iloc[0, 0] = np.nan
    with pytest.raises(DataError, match=f"SPY.*column open.*{frame.index[0]:%Y-%m-%d}.*first row"):
        validate(frame, "SPY", "")


# --------------------------------------------------------------------------------------------- dates


def test_duplicate_dates_are_an_error(tmp_path):
    frame = bars(6)
    lines = write_classic(tmp_path / "SPY.csv", frame)
    lines.insert(4, lines[3])  # repeat the third bar
    (tmp_path / "SPY.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as err:
        load_csv(tmp_path, ["SPY"])
    msg = str(err.value)
    assert "duplicate" in msg and f"{frame.index[2]:%Y-%m-%d}" in msg and "SPY" in msg


def test_unsorted_dates_are_sorted_with_a_warning():
    frame = bars(8)
    shuffled = frame.iloc[[0, 1, 5, 2, 3, 4, 7, 6]]
    checked = validate(shuffled, "SPY", "")
    assert checked.frame.index.is_monotonic_increasing
    pd.testing.assert_frame_equal(checked.frame, frame, check_freq=False)
    assert any("SPY" in w and "sorted" in w for w in checked.warnings)


def test_sorted_input_gives_no_warnings():
    assert validate(bars(8), "SPY", "").warnings == []


def test_tz_aware_and_intraday_timestamps_become_dates():
    frame = bars(4)
    frame.index = (frame.index + pd.Timedelta(hours=9, minutes=30)).tz_localize("America/New_York")
    out = validate(frame, "SPY", "").frame
    assert out.index.tz is None
    assert list(out.index) == list(bars(4).index)
    assert out.index.name == "date"
    assert all(out[c].dtype == np.float64 for c in COLUMNS)


def test_history_too_short(tmp_path):
    write_classic(tmp_path / "SPY.csv", bars(10))
    with pytest.raises(DataError) as err:
        load_prices(data_cfg(source="csv", path=str(tmp_path), tickers=["SPY"], start=None), min_rows=11)
    msg = str(err.value)
    assert "SPY" in msg and "too short" in msg and "10 bars" in msg and "11" in msg
    assert len(load_prices(data_cfg(source="csv", path=str(tmp_path), tickers=["SPY"], start=None),
                           min_rows=10).frames["SPY"]) == 10


def test_history_too_short_after_slicing(tmp_path):
    frame = bars(30)
    write_classic(tmp_path / "SPY.csv", frame)
    cfg = data_cfg(source="csv", path=str(tmp_path), tickers=["SPY"], start=str(frame.index[25].date()))
    with pytest.raises(DataError, match="5 bars"):
        load_prices(cfg, min_rows=6)


# --------------------------------------------------------------------------------------------- calendars


def _check_own_calendars(frames: dict[str, pd.DataFrame], expected: dict[str, pd.DatetimeIndex]) -> None:
    for ticker, idx in expected.items():
        got = frames[ticker].index
        assert len(got) == len(idx), ticker
        assert got.equals(pd.DatetimeIndex(idx)), ticker
        assert not frames[ticker].isna().any().any()
    equity = frames["SPY"].index
    assert not (equity.day_of_week >= 5).any()
    crypto = frames["BTC-USD"].index
    assert (crypto.day_of_week >= 5).any()
    assert (np.diff(crypto.to_numpy()) == np.timedelta64(1, "D")).all()


def test_mixing_crypto_and_equity_invents_no_rows_synthetic():
    start, end = dt.date(2023, 1, 1), dt.date(2023, 6, 30)
    prices = load_prices(data_cfg(source="synthetic", tickers=["BTC-USD", "SPY"], start=str(start), end=str(end)))
    expected = {t: synthetic.generate(t, start, end).index for t in ("BTC-USD", "SPY")}
    _check_own_calendars(prices.frames, expected)
    assert len(prices.frames["BTC-USD"]) == (end - start).days + 1
    assert prices.warnings == []


def test_mixing_crypto_and_equity_invents_no_rows_csv(tmp_path):
    crypto = bars(60, start="2024-01-01", freq="D")
    equity = bars(42, start="2024-01-02", freq="B")
    write_classic(tmp_path / "BTC-USD.csv", crypto)
    write_classic(tmp_path / "SPY.csv", equity)
    prices = load_csv(tmp_path, ["BTC-USD", "SPY"])
    _check_own_calendars(prices.frames, {"BTC-USD": crypto.index, "SPY": equity.index})
    assert prices.warnings == []
    np.testing.assert_allclose(prices.frames["SPY"].to_numpy(), equity.to_numpy(), rtol=1e-12)
