"""Input that used to pass silently: day-first dates, adjusted-close spellings, case-duplicate tickers, chains
quoted after the underlying's prices, implausible bars and quotes (warnings, errors with data.strict), names
that are paths. Each case failed (or passed silently) before these checks."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd
import pytest

from fincast.config import ConfigError, FincastError, from_dict
from fincast.data import DataError, csvsource, load_prices, synthetic
from fincast.features.options import FeatureError, prepare

NAMES = {"open": "Open", "high": "High", "low": "Low", "close": "Close", "adj_close": "Adj Close", "volume": "Volume"}


def bars(start=dt.date(2020, 1, 1), end=dt.date(2020, 6, 30), ticker="SPY") -> pd.DataFrame:
    frame = synthetic.generate(ticker, start, end, seed=3)
    return frame.assign(adj_close=frame["close"] * 0.9)  # adjusted != close, so a swap would show


def write(path, frame: pd.DataFrame, *, date_fmt: str | None = None, names: dict | None = None) -> None:
    out = frame.rename(columns={**NAMES, **(names or {})})
    out.index = out.index.strftime(date_fmt) if date_fmt else out.index.strftime("%Y-%m-%d")
    out.rename_axis("Date").to_csv(path)


def load(tmp_path, tickers=("SPY",), **data):
    cfg = from_dict({"data": {"source": "csv", "path": str(tmp_path), "tickers": list(tickers), "start": None,
                              **data}}).data
    return load_prices(cfg, now=dt.datetime(2026, 12, 5, tzinfo=dt.UTC))


# ------------------------------------------------------------------------------------------------- dates


def test_day_first_dates_are_read_day_first(tmp_path):
    frame = bars()
    write(tmp_path / "SPY.csv", frame, date_fmt="%d/%m/%Y")
    got = load(tmp_path).frames["SPY"]
    assert list(got.index) == list(frame.index)  # 03/02/2020 is 3 February, as 31/01/2020 shows
    np.testing.assert_allclose(got["close"], frame["close"])


def test_month_first_dates_are_read_month_first(tmp_path):
    frame = bars()
    write(tmp_path / "SPY.csv", frame, date_fmt="%m/%d/%Y")
    assert list(load(tmp_path).frames["SPY"].index) == list(frame.index)


def test_dates_that_read_both_ways_are_refused_unless_the_format_is_declared(tmp_path):
    frame = bars(dt.date(2020, 1, 1), dt.date(2020, 1, 12)).iloc[:6]  # days 1..12 only: 02/01/2020 is ambiguous
    write(tmp_path / "SPY.csv", frame, date_fmt="%d/%m/%Y")
    with pytest.raises(DataError, match=r"SPY.csv: dates such as '0[0-9]/01/2020' \(line 2\) read day-first and "
                                        r"month-first alike.*data.date_format=%d/%m/%Y"):
        load(tmp_path)
    assert list(load(tmp_path, date_format="%d/%m/%Y").frames["SPY"].index) == list(frame.index)
    with pytest.raises(DataError, match=r"line 2: unparseable date '02/01/2020'.*expected data.date_format = "
                                        "'%Y-%m-%d'"):
        load(tmp_path, date_format="%Y-%m-%d")


def test_a_file_with_dates_in_both_orders_is_refused(tmp_path):
    (tmp_path / "SPY.csv").write_text("Date,Open,High,Low,Close,Adj Close,Volume\n"
                                      "31/01/2020,1,1,1,1,1,1\n01/02/2020,1,1,1,1,1,1\n02/13/2020,1,1,1,1,1,1\n")
    with pytest.raises(DataError, match=r"dates in both orders: '31/01/2020' \(line 2\) is day-first, "
                                        r"'02/13/2020' \(line 4\) month-first"):
        load(tmp_path)


# ----------------------------------------------------------------------------------------- adjusted close


@pytest.mark.parametrize("header", ["Adjusted Close", "Adj_Close", "adjclose", "Adj. Close", "ADJ-CLOSE"])
def test_adjusted_close_spellings_are_read_as_adj_close(tmp_path, header):
    frame = bars()
    write(tmp_path / "SPY.csv", frame, names={"adj_close": header})
    got = load(tmp_path).frames["SPY"]
    np.testing.assert_allclose(got["adj_close"], frame["adj_close"])  # not the unadjusted close
    assert not np.allclose(got["adj_close"], got["close"])


def test_an_unknown_adjusted_column_is_an_error_naming_the_columns(tmp_path):
    write(tmp_path / "SPY.csv", bars(), names={"adj_close": "Adj Close (div only)"})
    with pytest.raises(DataError, match=r"column 'Adj Close \(div only\)' looks like an adjusted close.*found "
                                        "columns: Open, High, Low, Close, Adj Close \\(div only\\), Volume"):
        load(tmp_path)


def test_other_adjusted_columns_are_ignored_as_in_tiingo_files(tmp_path):
    frame = bars()
    tiingo = frame.rename(columns={"adj_close": "adjClose"}).assign(
        adjOpen=frame["open"] * 0.9, adjHigh=frame["high"] * 0.9, adjLow=frame["low"] * 0.9, adjVolume=frame["volume"])
    write(tmp_path / "SPY.csv", tiingo, names={"adjClose": "adjClose"})
    np.testing.assert_allclose(load(tmp_path).frames["SPY"]["adj_close"], frame["adj_close"])


def test_the_format_hint_follows_the_files_spelling_and_a_declared_format_ignores_a_time_after_it(tmp_path):
    frame = bars(dt.date(2020, 1, 1), dt.date(2020, 1, 12)).iloc[:6]
    write(tmp_path / "SPY.csv", frame, date_fmt="%d.%m.%y 00:00")
    with pytest.raises(DataError, match=r"data.date_format=%d\.%m\.%y \(day first\) or %m\.%d\.%y"):
        load(tmp_path)
    assert list(load(tmp_path, date_format="%d.%m.%y").frames["SPY"].index) == list(frame.index)


def test_two_columns_read_as_one_are_an_error(tmp_path):
    frame = bars().assign(extra=1.0)
    write(tmp_path / "SPY.csv", frame, names={"extra": "Adjusted Close"})
    with pytest.raises(DataError, match="columns 'Adj Close' and 'Adjusted Close' are both read as adj_close"):
        load(tmp_path)


# ------------------------------------------------------------------------------------------------ tickers


@pytest.mark.parametrize("tickers", [["BTC-USD", "btc-usd"], ["SPY", "QQQ", "Spy"]])
def test_tickers_differing_only_in_case_are_refused(tickers):
    with pytest.raises(ConfigError, match="duplicate tickers"):
        from_dict({"data": {"tickers": tickers}})


@pytest.mark.parametrize("ticker", ["../../x", "/tmp/x", "a/b", "..", "x\\y", ".hidden", ""])
def test_tickers_that_are_paths_are_refused(ticker, tmp_path):
    with pytest.raises(ConfigError, match="is not a ticker"):
        from_dict({"data": {"tickers": [ticker]}})
    with pytest.raises(DataError, match="not a ticker name; refusing to read a path"):
        csvsource.find_file(tmp_path, ticker)


@pytest.mark.parametrize("ticker", ["^GSPC", "BTC-USD", "BRK.B", "EURUSD=X", "ES=F", "spy", "M&M.NS", "0700.HK"])
def test_real_ticker_spellings_pass(ticker):
    assert from_dict({"data": {"tickers": [ticker]}}).data.tickers == (ticker,)


@pytest.mark.parametrize("name", ["../../somewhere", "/tmp/x", "a/b", "..", ".x", "a..b", ""])
def test_pipeline_names_that_are_paths_are_refused(name):
    with pytest.raises(ConfigError, match=r"name = .*a name must be"):
        from_dict({"name": name})


# ------------------------------------------------------------------------------------------ plausibility


def _warnings(tmp_path, frame, **data):
    write(tmp_path / "SPY.csv", frame)
    return [w for w in load(tmp_path, **data).warnings if "SPY" in w]


def test_clean_bars_give_no_warning(tmp_path):
    assert _warnings(tmp_path, bars()) == []


def test_a_long_hole_is_a_warning_and_with_strict_an_error(tmp_path):
    frame = pd.concat([bars(dt.date(2014, 1, 1), dt.date(2014, 6, 30)), bars(dt.date(2019, 7, 1), dt.date(2019, 12, 31))])
    (w,) = _warnings(tmp_path, frame)
    assert "1 gap(s) longer than data.max_gap_days = 14 days" in w and "2014-06-30 to 2019-07-01" in w
    with pytest.raises(DataError, match="data.strict = true and the data look wrong:\n  SPY .*gap"):
        _warnings(tmp_path, frame, strict=True)
    assert _warnings(tmp_path, frame, max_gap_days=3000) == []


def test_a_x1000_price_is_a_warning(tmp_path):
    frame = bars()
    d = frame.index[50]
    frame.loc[d, ["open", "high", "low", "close", "adj_close"]] *= 1000
    found = _warnings(tmp_path, frame)
    (w,) = [x for x in found if "of close beyond" in x]
    assert f"{d:%Y-%m-%d} x1.0" in w and "2 one-bar move(s) of close" in w  # up x1000 (and a move), back down


def test_close_above_high_and_open_below_low_are_warnings(tmp_path):
    frame = bars()
    frame.iloc[10, frame.columns.get_loc("close")] = frame["high"].iloc[10] * 1.01
    frame.iloc[20, frame.columns.get_loc("open")] = frame["low"].iloc[20] * 0.99
    found = _warnings(tmp_path, frame)
    assert any(f"close outside [low, high] on 1 bar(s): {frame.index[10]:%Y-%m-%d}" in w for w in found)
    assert any(f"open outside [low, high] on 1 bar(s): {frame.index[20]:%Y-%m-%d}" in w for w in found)


def test_weekend_dates_and_future_dates_are_warnings(tmp_path):
    frame = bars()
    weekend = frame.set_axis(frame.index + pd.offsets.Week(weekday=5), axis=0)  # every bar moved to a Saturday
    weekend = weekend[~weekend.index.duplicated()]
    assert any("100% of the bars fall on a Saturday or Sunday" in w for w in _warnings(tmp_path, weekend))
    future = bars(dt.date(2026, 9, 1), dt.date(2027, 1, 29))  # "today" is 2026-12-05 in load()
    (w,) = _warnings(tmp_path, future)
    assert "bar(s) dated after today (2026-12-05): 2026-12-07" in w


# ----------------------------------------------------------------------------------------------- options


def test_a_chain_quoted_after_the_underlyings_last_price_is_refused():
    close = pd.Series(np.linspace(100, 110, 60), index=pd.bdate_range("2024-01-01", periods=60))
    dates = pd.bdate_range("2024-02-20", periods=30)  # to 2024-04-01, past the last close (2024-03-22)
    chain = pd.DataFrame({"quote_date": dates, "expiry": dates + pd.Timedelta(days=30), "strike": 105.0,
                          "call": True, "price": 3.0})
    cfg = from_dict({"task": "options"}).options
    with pytest.raises(FeatureError, match=r"6 option contracts on 6 quote date\(s\) \(2024-03-25 .. 2024-04-01\) "
                                           r"lie after the underlying's last price \(their return windows would be "
                                           r"stale\): chain quote dates 2024-02-20 .. 2024-04-01, underlying prices "
                                           r"2024-01-01 .. 2024-03-22"):
        prepare(chain, close, cfg, lookback=5)
    early = chain.assign(quote_date=chain["quote_date"] - pd.Timedelta(days=60))  # Feb 20..29 (8 dates) move to Dec 22..31
    with pytest.raises(FeatureError, match=r"8 option contracts on 8 quote date\(s\) \(2023-12-22 .. 2023-12-31\) "
                                           r"lie before the underlying's first price: chain quote dates 2023-12-22"):
        prepare(early, close, cfg, lookback=5)


def test_quotes_outside_no_arbitrage_bounds_are_a_warning_and_with_strict_an_error():
    from fincast.runs import options as task

    c = pd.DataFrame({"quote_date": pd.to_datetime(["2024-01-02"] * 3), "S": 100.0, "strike": [90.0, 110.0, 100.0],
                      "tau": 0.1, "r": 0.0, "q": 0.0, "call": [True, False, True], "price": [120.0, 5.0, 4.0]})
    market = task.Market(c, pd.Series(dtype=float), None, None, "test", "fp", "X")
    task._check_quotes(from_dict({"task": "options"}), market, c)  # a call at 120 > S; a put at 5 < K - S = 10
    (w,) = market.warnings
    assert "1 quote(s) above the no-arbitrage upper bound" in w and "1 below the lower bound" in w
    assert "the first: 2024-01-02 call K=90 at 120 with S=100" in w
    with pytest.raises(FincastError, match="data.strict = true"):
        task._check_quotes(from_dict({"task": "options", "data": {"strict": True}}), market, c)


# ------------------------------------------------------------------------- names through each path site


PIPELINES = __import__("pathlib").Path(__file__).resolve().parents[2] / "pipelines"


@pytest.mark.parametrize("command, spec", [("train", "price_crypto.yaml"), ("backtest", "backtest_crypto.yaml"),
                                           ("study", "stability_crypto.yaml"), ("sweep", "sweep_crypto.yaml"),
                                           ("train", "options_synthetic.yaml")])
def test_a_name_that_is_a_path_stops_every_command_before_it_writes(tmp_path, monkeypatch, capsys, command, spec):
    from fincast import cli

    monkeypatch.chdir(tmp_path)
    code = cli.main([command, str(PIPELINES / spec), "--set", "name=../../escaped", "--set", "data.source=synthetic",
                     "--set", f"tracking.uri=sqlite:///{tmp_path / 'm.db'}"])
    assert code != 0
    assert "name = '../../escaped': a name must be" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no store, no reports, nothing above either
    assert not (tmp_path.parent.parent / "escaped").exists()


def test_a_study_report_name_that_is_a_path_is_refused(tmp_path):
    from fincast.reports import stability

    with pytest.raises(FincastError, match="study name = '../x': a name must be"):
        stability.build("../x", tracking_uri=f"sqlite:///{tmp_path / 'm.db'}", out_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []
