"""Option chains: csv layouts (long, wide), column maps, every cleaning rule, the snapshot store and the yfinance
snapshot against fabricated responses (never the network); the shared real chain files when present."""

from __future__ import annotations

import datetime as dt
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from fincast.config import from_dict
from fincast.data import options, yahoo
from fincast.data.options import CHAIN_COLUMNS, DROP_REASONS
from fincast.data.validate import DataError

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "options"
SPXW_HEADER = ("underlying,underlying_last,exchange,optionroot,optionext,type,expiration,quotedate,strike,last,bid,ask,"
               "volume,openinterest,impliedvol,delta,gamma,theta,vega,optionalias")
RND_HEADER = ("quote_date,underlying_close,days_to_expiration,bidsize.c,bid.c,ask.c,asksize.c,chg.c,impvol.c,vol.c,"
              "openint.c,delta.c,strike,bidsize.p,bid.p,ask.p,asksize.p,chg.p,impvol.p,vol.p,openint.p,delta.p")
DTYPES = {"quote_date": "datetime64[ns]", "expiry": "datetime64[ns]", "tau": "float64", "strike": "float64",
          "call": "bool", "bid": "float64", "ask": "float64", "last": "float64", "volume": "float64",
          "open_interest": "float64", "implied_vol": "float64", "underlying_price": "float64", "price": "float64",
          "line": "int64"}


def opts(**kw) -> options.OptionsConfig:
    return from_dict({"options": {"source": "csv", **kw}}).options


def spxw_row(strike: float = 2700, *, type: str = "call", expiration: str = "2018-01-31",
             quotedate: str = "2018-01-02", bid="9.5", ask="10.5", last="10.0", volume="5", underlying="SPXW",
             root: str | None = None) -> dict:
    exp = pd.Timestamp(expiration) if expiration and expiration[:4].isdigit() else pd.Timestamp("2018-01-31")
    k = float(strike) if str(strike).replace(".", "").isdigit() else 1.0
    symbol = root if root is not None else f"SPXW{exp:%y%m%d}{type[:1].upper()}{int(k * 1000):08d}"
    return {"underlying": underlying, "underlying_last": "2695.79", "exchange": "W", "optionroot": symbol,
            "optionext": "", "type": type, "expiration": expiration, "quotedate": quotedate, "strike": str(strike),
            "last": last, "bid": bid, "ask": ask, "volume": volume, "openinterest": "100", "impliedvol": "0.1234",
            "delta": "0.5", "gamma": "0.001", "theta": "-1.0", "vega": "2.0", "optionalias": symbol}


def write_rows(path: Path, rows: list[dict], header: str = SPXW_HEADER) -> Path:
    names = header.split(",")
    path.write_text("\n".join([header] + [",".join(str(r.get(n, "")) for n in names) for r in rows]) + "\n")
    return path


GOOD = [spxw_row(2600), spxw_row(2650, type="put"), spxw_row(2700, quotedate="2018-01-03")]


# --------------------------------------------------------------------------------------------- long layout


def test_long_layout_gives_the_canonical_frame(tmp_path):
    rows = [spxw_row(2700, quotedate="2018-01-03", bid="20", ask="22"),
            spxw_row(2650, type="put", expiration="2018-02-28", bid="30", ask="31"),
            spxw_row(2650, type="put", bid="3", ask="4"),
            spxw_row(2600, type="P", bid="1.5", ask="2.5"),
            spxw_row(2600, bid="100", ask="101")]
    path = write_rows(tmp_path / "chain.csv", rows)
    chain = options.load_chain(opts(path=str(path)))
    f = chain.frame
    assert list(f.columns) == list(CHAIN_COLUMNS)
    assert {c: str(f[c].dtype) for c in DTYPES} == DTYPES
    assert pd.api.types.is_string_dtype(f["contract"]) and pd.api.types.is_string_dtype(f["file"])
    assert isinstance(f.index, pd.RangeIndex)
    # sorted by quote_date, expiry, call, strike; lines point back into the file (header = line 1)
    assert list(f["line"]) == [5, 4, 6, 3, 2]
    assert list(f["strike"]) == [2600, 2650, 2600, 2650, 2700]
    assert list(f["call"]) == [False, False, True, False, True]
    np.testing.assert_allclose(f["price"], [2.0, 3.5, 100.5, 30.5, 21.0])
    days = np.array([29, 29, 29, 57, 28])
    np.testing.assert_allclose(f["tau"], days / 365)
    assert (f["expiry"] - f["quote_date"]).dt.days.tolist() == days.tolist()
    assert f["quote_date"].iloc[-1] == pd.Timestamp("2018-01-03")
    assert f["contract"].iloc[0] == "SPXW180131P02600000"  # the file's optionroot column
    np.testing.assert_allclose(f["implied_vol"], 0.1234)
    np.testing.assert_allclose(f["underlying_price"], 2695.79)
    assert (f["file"] == str(path)).all()
    assert chain.rows_read == 5 and sum(chain.dropped.values()) == 0 and chain.warnings == []
    assert chain.source == "csv" and len(chain.fingerprint) == 16


def test_fingerprint_follows_the_values_not_the_path(tmp_path):
    a = options.load_chain(opts(path=str(write_rows(tmp_path / "a.csv", GOOD))))
    b = options.load_chain(opts(path=str(write_rows(tmp_path / "b.csv", GOOD))))
    changed = [*GOOD[:2], spxw_row(2700, quotedate="2018-01-03", bid="9.6")]
    c = options.load_chain(opts(path=str(write_rows(tmp_path / "c.csv", changed))))
    assert a.fingerprint == b.fingerprint != c.fingerprint


def test_price_last_uses_the_last_trade(tmp_path):
    path = write_rows(tmp_path / "chain.csv", [spxw_row(2600, last="7.25", bid="", ask="")])
    f = options.load_chain(opts(path=str(path), price="last")).frame
    assert f["price"].tolist() == [7.25] and np.isnan(f["bid"].iloc[0])


def test_contract_id_is_generated_without_a_symbol_column(tmp_path):
    header = "underlying,type,expiration,quotedate,strike,bid,ask"
    path = write_rows(tmp_path / "c.csv", [spxw_row(2612.5, type="put")], header)
    assert options.load_chain(opts(path=str(path))).frame["contract"].tolist() == ["SPXW180131P02612500"]
    path = write_rows(tmp_path / "c.csv", [spxw_row(2612.5, type="call")], header.replace("underlying,", ""))
    assert options.load_chain(opts(path=str(path))).frame["contract"].tolist() == ["OPT180131C02612500"]


# --------------------------------------------------------------------------------------------- cleaning rules

BAD_ROWS = [
    ("missing field", spxw_row(2800, bid=""), {}),
    ("missing field", spxw_row(2800, ask="n/a"), {}),
    ("missing field", spxw_row(2800, quotedate=""), {}),
    ("missing field", spxw_row(2800, expiration="", root="X"), {}),
    ("missing field", spxw_row("", root="X"), {}),
    ("missing field", spxw_row(2800, type=""), {}),
    ("missing field", spxw_row(2800, last=""), {"price": "last"}),
    ("unknown call/put", spxw_row(2800, type="straddle"), {}),
    ("non-positive strike", spxw_row(0), {}),
    ("non-positive strike", spxw_row(-5, root="X"), {}),
    ("expiry before quote date", spxw_row(2800, expiration="2017-12-29"), {}),
    ("crossed quote (bid > ask)", spxw_row(2800, bid="12", ask="11"), {}),
    ("zero quote", spxw_row(2800, bid="0", ask="0.05"), {}),
    ("zero quote", spxw_row(2800, bid="-0.05", ask="0.1"), {}),
    ("zero quote", spxw_row(2800, last="0"), {"price": "last"}),
    ("stale quote", spxw_row(2800, volume="0"), {"price": "last"}),
    ("outside min_days..max_days", spxw_row(2800, quotedate="2018-01-31"), {}),
    ("outside min_days..max_days", spxw_row(2800, expiration="2018-02-28"), {"max_days": 40}),
    ("outside min_days..max_days", spxw_row(2800, expiration="2018-01-10"), {"min_days": 10}),
    ("symbol filter", spxw_row(2800, underlying="SPX"), {"symbol": "SPXW"}),
]


@pytest.mark.parametrize(("reason", "bad", "settings"), BAD_ROWS,
                         ids=[f"{r}-{i}" for i, (r, _, _) in enumerate(BAD_ROWS)])
def test_each_bad_row_is_dropped_and_counted(tmp_path, reason, bad, settings):
    path = write_rows(tmp_path / "chain.csv", [GOOD[0], bad, *GOOD[1:]])
    chain = options.load_chain(opts(path=str(path), **settings))
    assert chain.dropped == {r: int(r == reason) for r in DROP_REASONS}
    assert chain.rows_read == 4
    assert sorted(chain.frame["line"]) == [2, 4, 5]  # the bad row (line 3) is gone, the good ones kept
    assert any(reason in w and "dropped 1 of 4" in w for w in chain.warnings)


def test_same_day_expiry_counts_as_zero_days(tmp_path):
    path = write_rows(tmp_path / "chain.csv", [*GOOD, spxw_row(2800, quotedate="2018-01-31")])
    assert len(options.load_chain(opts(path=str(path), min_days=0)).frame) == 4
    assert options.load_chain(opts(path=str(path), min_days=1)).dropped["outside min_days..max_days"] == 1


def test_stale_last_trade_date(tmp_path):
    header = SPXW_HEADER + ",lasttradedate"
    rows = [{**r, "lasttradedate": "2018-01-02"} for r in GOOD]
    rows[0]["lasttradedate"] = "2017-12-27"  # 6 days before the quote
    rows[1]["lasttradedate"] = "2017-12-28"  # 5 days: still fresh
    path = write_rows(tmp_path / "chain.csv", rows, header)
    chain = options.load_chain(opts(path=str(path), stale_days=5))
    assert chain.dropped["stale quote"] == 1 and sorted(chain.frame["line"]) == [3, 4]


def test_duplicate_contract_keeps_the_last(tmp_path):
    rows = [GOOD[0], spxw_row(2700, quotedate="2018-01-03", bid="1", ask="2"), *GOOD[1:]]
    chain = options.load_chain(opts(path=str(write_rows(tmp_path / "chain.csv", rows))))
    assert chain.dropped["duplicate contract"] == 1 and len(chain.frame) == 3
    kept = chain.frame[chain.frame["strike"] == 2700]
    assert kept["line"].tolist() == [5] and kept["price"].tolist() == [10.0]


def test_first_failing_reason_wins(tmp_path):
    rows = [*GOOD, spxw_row(-1, bid="3", ask="0", root="A"), spxw_row(2800, bid="3", ask="0", expiration="2017-01-01"),
            spxw_row(2900, type="x", bid="")]
    chain = options.load_chain(opts(path=str(write_rows(tmp_path / "chain.csv", rows))))
    assert {k: v for k, v in chain.dropped.items() if v} == {"non-positive strike": 1, "expiry before quote date": 1,
                                                             "missing field": 1}
    assert len(chain.frame) + sum(chain.dropped.values()) == chain.rows_read == 6


def test_nothing_usable_lists_every_count_and_the_file(tmp_path):
    rows = [spxw_row(2600, bid="0", ask="0"), spxw_row(2650, bid="5", ask="4"), spxw_row(2700, bid="0", ask="0")]
    path = write_rows(tmp_path / "chain.csv", rows)
    with pytest.raises(DataError) as err:
        options.load_chain(opts(path=str(path)))
    msg = str(err.value)
    assert str(path) in msg and "all 3" in msg
    assert "zero quote: 2" in msg and "crossed quote (bid > ask): 1" in msg and "missing field: 0" in msg


def test_read_chain_file_returns_frame_and_counts(tmp_path):
    path = write_rows(tmp_path / "chain.csv", [*GOOD, spxw_row(2800, bid="0")])
    frame, dropped = options.read_chain_file(path, opts())
    assert len(frame) == 3 and dropped["zero quote"] == 1


# --------------------------------------------------------------------------------------------- wide layout


def test_wide_layout_splits_each_strike_into_call_and_put(tmp_path):
    lines = [RND_HEADER,
             "2013-04-19,1555.25,62,103,60.0,61.0,206,0,20.5,7,1500,0.7,1500,10,4.0,4.4,270,0,25.0,9,7072,-0.3",
             "2013-04-19,1555.25,62,103,20.0,20.6,206,0,18.0,0,2000,0.4,1550,10,14.0,14.5,270,0,22.0,3,267,-0.6"]
    path = tmp_path / "rnd.csv"
    path.write_text("\n".join(lines) + "\n")
    chain = options.load_chain(opts(path=str(path)))
    f = chain.frame
    assert chain.rows_read == 4 and len(f) == 4 and list(f.columns) == list(CHAIN_COLUMNS)
    assert list(zip(f["call"], f["strike"], f["line"])) == [(False, 1500, 2), (False, 1550, 3), (True, 1500, 2),
                                                              (True, 1550, 3)]
    np.testing.assert_allclose(f["price"], [4.2, 14.25, 60.5, 20.3])
    np.testing.assert_allclose(f["implied_vol"], [0.25, 0.22, 0.205, 0.18])  # percent -> decimal
    assert f["volume"].tolist() == [9, 3, 7, 0] and f["open_interest"].tolist() == [7072, 267, 1500, 2000]
    assert (f["expiry"] == pd.Timestamp("2013-06-20")).all()  # quote date + 62 calendar days
    np.testing.assert_allclose(f["tau"], 62 / 365)
    np.testing.assert_allclose(f["underlying_price"], 1555.25)
    assert f["contract"].tolist() == ["OPT130620P01500000", "OPT130620P01550000", "OPT130620C01500000",
                                      "OPT130620C01550000"]
    assert any("percent" in w for w in chain.warnings)


@pytest.mark.parametrize("style", ["{}_c|{}_p", "call_{}|put_{}", "c_{}|p_{}", "{}.C|{}.P"])
def test_wide_pair_styles(tmp_path, style):
    call, put = style.split("|")
    header = ",".join(["date", "expiry", "strike", call.format("bid"), call.format("ask"), put.format("bid"),
                       put.format("ask")])
    path = tmp_path / "w.csv"
    path.write_text(f"{header}\n2024-01-02,2024-02-16,100,5,6,1,1.5\n")
    f = options.load_chain(opts(path=str(path))).frame
    assert list(zip(f["call"], f["price"])) == [(False, 1.25), (True, 5.5)]


def test_wide_layout_forced_without_pairs_is_an_error(tmp_path):
    path = write_rows(tmp_path / "chain.csv", GOOD)
    with pytest.raises(DataError, match="layout = wide.*bid.c/bid.p"):
        options.load_chain(opts(path=str(path), layout="wide"))


# --------------------------------------------------------------------------------------------- column maps


def test_explicit_column_map_overrides_the_aliases(tmp_path):
    path = tmp_path / "odd.csv"
    path.write_text("QuoteDate,Exp,K,CP,B,A,bid\n"
                    "01/02/2024,02/16/2024,100,C,2,3,99\n01/02/2024,02/16/2024,100,p,1,2,99\n")
    columns = {"quote_date": "QuoteDate", "expiry": "Exp", "strike": "K", "type": "CP", "bid": "B", "ask": "A"}
    f = options.load_chain(opts(path=str(path), columns=columns)).frame
    assert f["bid"].tolist() == [1, 2]  # B, not the file's "bid" column
    assert f["price"].tolist() == [1.5, 2.5]
    assert (f["quote_date"] == pd.Timestamp("2024-01-02")).all() and (f["expiry"] == pd.Timestamp("2024-02-16")).all()


def test_wrong_column_map_names_the_key(tmp_path):
    path = write_rows(tmp_path / "chain.csv", GOOD)
    with pytest.raises(DataError) as err:
        options.load_chain(opts(path=str(path), columns={"bid": "BidPrice"}))
    msg = str(err.value)
    assert "options.columns.bid" in msg and "BidPrice" in msg and str(path) in msg and "optionroot" in msg


def test_missing_required_columns_are_listed(tmp_path):
    path = tmp_path / "chain.csv"
    path.write_text("quotedate,type,bid,ask,volume\n2018-01-02,call,1,2,3\n")
    with pytest.raises(DataError) as err:
        options.load_chain(opts(path=str(path)))
    msg = str(err.value)
    assert "strike (looked for strike, strike_price" in msg
    assert "expiry (looked for expiration" in msg and "days_to_expiration" in msg
    assert "found: quotedate, type, bid, ask, volume" in msg and str(path) in msg
    assert "bid" not in msg.split("found:")[0].split("\n", 1)[1]  # present columns are not reported missing


def test_price_last_needs_a_last_column(tmp_path):
    path = tmp_path / "chain.csv"
    path.write_text("quotedate,expiration,type,strike,bid,ask\n2018-01-02,2018-01-31,call,2700,1,2\n")
    with pytest.raises(DataError, match=r"options.price = last[\s\S]*last \(looked for last, lastprice"):
        options.load_chain(opts(path=str(path), price="last"))


def test_several_underlyings_need_options_symbol(tmp_path):
    path = write_rows(tmp_path / "chain.csv", [*GOOD, spxw_row(2800, underlying="SPX")])
    with pytest.raises(DataError) as err:
        options.load_chain(opts(path=str(path)))
    assert "SPX, SPXW" in str(err.value) and "options.symbol" in str(err.value)
    assert len(options.load_chain(opts(path=str(path), symbol="spx")).frame) == 1


def test_mostly_unparseable_dates_mean_a_wrong_column_map(tmp_path):
    rows = [spxw_row(2600 + i, quotedate=q) for i, q in enumerate(["2018-01-02", "yesterday", "x", "soon"])]
    path = write_rows(tmp_path / "chain.csv", rows)
    with pytest.raises(DataError) as err:
        options.load_chain(opts(path=str(path)))
    msg = str(err.value)
    assert "line 3" in msg and "'yesterday'" in msg and "'quotedate'" in msg and "3 of 4" in msg
    with pytest.raises(DataError, match="missing required column.*\n  strike"):  # a column serves one field
        options.load_chain(opts(path=str(write_rows(tmp_path / "c.csv", GOOD)), columns={"quote_date": "strike"}))
    with pytest.raises(DataError, match="'openinterest'"):  # a numeric column mapped as a date
        options.load_chain(opts(path=str(tmp_path / "c.csv"), columns={"quote_date": "openinterest"}))


def test_directory_reads_every_csv_in_order(tmp_path):
    write_rows(tmp_path / "b_2018-01-03.csv", [spxw_row(2700, quotedate="2018-01-03", bid="1", ask="2")])
    write_rows(tmp_path / "a_2018-01-02.csv", [GOOD[0], GOOD[1], spxw_row(2700, quotedate="2018-01-03")])
    (tmp_path / "notes.txt").write_text("not a chain")
    chain = options.load_chain(opts(path=str(tmp_path)))
    f = chain.frame
    assert chain.rows_read == 4 and chain.dropped["duplicate contract"] == 1
    assert f["file"].map(lambda p: Path(p).name).tolist() == ["a_2018-01-02.csv", "a_2018-01-02.csv",
                                                              "b_2018-01-03.csv"]
    assert f["price"].iloc[-1] == 1.5  # the later file's quote of the same contract wins


def test_csv_path_errors(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        options.load_chain(opts(path=str(tmp_path / "nowhere.csv")))
    with pytest.raises(DataError, match=r"no \*.csv"):
        options.load_chain(opts(path=str(tmp_path)))
    with pytest.raises(ValueError):
        options.load_chain(opts(source="synthetic"))


# --------------------------------------------------------------------------------------------- store


def snapshot_frame(quote_date: str = "2024-03-04", bid: float = 1.0, strikes=(100.0, 105.0),
                   last_trade: str | None = None) -> pd.DataFrame:
    qd = pd.Timestamp(quote_date)
    exp = pd.Timestamp("2024-03-15")
    n = len(strikes)
    frame = pd.DataFrame({
        "quote_date": [qd] * n, "expiry": [exp] * n, "tau": [(exp - qd).days / 365] * n,
        "strike": list(strikes), "call": [True] * n, "bid": [bid] * n, "ask": [bid + 0.5] * n, "last": [bid] * n,
        "volume": [3.0] * n, "open_interest": [10.0] * n, "implied_vol": [0.2] * n, "underlying_price": [101.0] * n,
        "price": [bid + 0.25] * n, "contract": [f"SPY240315C{int(k * 1000):08d}" for k in strikes],
        "line": [-1] * n, "file": ["yfinance"] * n, "last_trade_date": [pd.Timestamp(last_trade or quote_date)] * n})
    return frame.astype({"quote_date": "datetime64[ns]", "expiry": "datetime64[ns]",
                         "last_trade_date": "datetime64[ns]"})


def test_store_appends_keep_the_newest_quote_per_contract(tmp_path):
    store = tmp_path / "store"
    first = options.append_snapshot(store, "^SPX", snapshot_frame(bid=1.0))
    second = options.append_snapshot(store, "^SPX", pd.concat([snapshot_frame(bid=2.0, strikes=(105.0, 110.0)),
                                                              snapshot_frame("2024-03-05", bid=3.0)]))
    day = store / "^SPX" / "2024-03-04.parquet"
    assert first == [day] and second == [day, store / "^SPX" / "2024-03-05.parquet"]
    assert options.store_path(store, "^SPX", dt.date(2024, 3, 4)) == day
    assert sorted(p.name for p in (store / "^SPX").iterdir()) == ["2024-03-04.parquet", "2024-03-05.parquet"]  # no tmp
    stored = options.read_store(store, "^SPX")
    assert list(stored.columns) == [*CHAIN_COLUMNS, "last_trade_date"]
    d1 = stored[stored["quote_date"] == "2024-03-04"]
    assert d1["strike"].tolist() == [100, 105, 110] and d1["bid"].tolist() == [1.0, 2.0, 2.0]
    assert (stored["line"] == -1).all() and stored["file"].str.endswith(".parquet").all()
    assert set(stored["file"]) == {str(day), str(store / "^SPX" / "2024-03-05.parquet")}
    back = stored.drop(columns=["file"])
    want = pd.concat([snapshot_frame(bid=1.0, strikes=(100.0,)), snapshot_frame(bid=2.0, strikes=(105.0, 110.0)),
                      snapshot_frame("2024-03-05", bid=3.0)], ignore_index=True).drop(columns=["file"])
    pd.testing.assert_frame_equal(back, want, check_dtype=False)
    assert back.dtypes.drop("contract").to_dict() == want.dtypes.drop("contract").to_dict()


def test_store_is_validated_like_csv(tmp_path):
    frame = pd.concat([snapshot_frame(strikes=(100.0,)), snapshot_frame(strikes=(105.0,), last_trade="2024-02-01"),
                       snapshot_frame(strikes=(110.0,)).assign(bid=9.0, ask=8.0)])
    options.append_snapshot(tmp_path, "SPY", frame)
    chain = options.load_chain(opts(source="store", store_dir=str(tmp_path)), "SPY")
    assert chain.frame["strike"].tolist() == [100] and chain.rows_read == 3
    assert chain.dropped["stale quote"] == 1 and chain.dropped["crossed quote (bid > ask)"] == 1
    assert list(chain.frame.columns) == list(CHAIN_COLUMNS) and chain.source == "store"
    last = options.load_chain(opts(source="store", store_dir=str(tmp_path), price="last"), "SPY").frame
    assert last["price"].tolist() == [1.0]  # the price follows options.price, not the stored mid


def test_missing_store_says_how_to_fill_it(tmp_path):
    with pytest.raises(DataError) as err:
        options.load_chain(opts(source="store", store_dir=str(tmp_path)), "^SPX")
    msg = str(err.value)
    assert "^SPX" in msg and "fincast data" in msg and "options.source=csv" in msg and "options.source=synthetic" in msg


def test_atomic_write_leaves_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    options.append_snapshot(tmp_path, "SPY", snapshot_frame(bid=1.0))

    def broken(self, *a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(pd.DataFrame, "to_parquet", broken)
    with pytest.raises(OSError):
        options.append_snapshot(tmp_path, "SPY", snapshot_frame(bid=2.0))
    monkeypatch.undo()
    assert [p.name for p in (tmp_path / "SPY").iterdir()] == ["2024-03-04.parquet"]
    assert options.read_store(tmp_path, "SPY")["bid"].tolist() == [1.0, 1.0]


# --------------------------------------------------------------------------------------------- yfinance snapshot

NOW = dt.datetime(2024, 3, 5, 2, 0, tzinfo=dt.UTC)  # 21:00 on Monday 2024-03-04 in New York


def yf_side(expiry: str, strikes, kind: str, *, traded: str = "2024-03-04 20:59:00+00:00") -> pd.DataFrame:
    n = len(strikes)
    return pd.DataFrame({
        "contractSymbol": [f"SPY{pd.Timestamp(expiry):%y%m%d}{kind}{int(k * 1000):08d}" for k in strikes],
        "lastTradeDate": pd.to_datetime([traded] * n), "strike": list(strikes), "lastPrice": [2.0] * n,
        "bid": [1.9] * n, "ask": [2.1] * n, "change": [0.0] * n, "percentChange": [0.0] * n,
        "volume": [12.0] + [np.nan] * (n - 1), "openInterest": [100] * n, "impliedVolatility": [0.21] * n,
        "inTheMoney": [False] * n, "contractSize": ["REGULAR"] * n, "currency": ["USD"] * n})


class FakeTicker:
    def __init__(self, symbol: str, expiries=("2024-03-15", "2024-04-19"), hang: threading.Event | None = None):
        self.symbol = symbol
        self.options = tuple(expiries)
        self.hang = hang
        self.asked: list[str] = []

    def option_chain(self, expiry: str) -> SimpleNamespace:
        self.asked.append(expiry)
        if self.hang is not None:
            self.hang.wait(30)  # a half-open connection
        calls = yf_side(expiry, [500.0, 505.0], "C", traded="2024-03-05 01:00:00+00:00")  # 20:00 NY, still the 4th
        puts = yf_side(expiry, [495.0], "P", traded="2024-02-20 15:00:00+00:00")
        return SimpleNamespace(calls=calls, puts=puts,
                               underlying={"regularMarketPrice": 502.5})


def test_fetch_option_chain_gives_the_canonical_snapshot():
    made = []

    def factory(symbol):
        made.append(FakeTicker(symbol))
        return made[-1]

    f = yahoo.fetch_option_chain("SPY", deadline=time.monotonic() + 10, now=NOW, ticker_factory=factory)
    assert list(f.columns) == [*CHAIN_COLUMNS, "last_trade_date"]
    assert {c: str(f[c].dtype) for c in DTYPES} == DTYPES and str(f["last_trade_date"].dtype) == "datetime64[ns]"
    assert made[0].symbol == "SPY" and made[0].asked == ["2024-03-15", "2024-04-19"]
    assert len(f) == 6 and (f["quote_date"] == pd.Timestamp("2024-03-04")).all()
    assert f["expiry"].dt.strftime("%Y-%m-%d").tolist() == ["2024-03-15"] * 3 + ["2024-04-19"] * 3
    assert f["call"].tolist() == [False, True, True] * 2 and f["strike"].tolist() == [495, 500, 505] * 2
    np.testing.assert_allclose(f["tau"].iloc[0], 11 / 365)
    np.testing.assert_allclose(f["price"], 2.0)
    np.testing.assert_allclose(f["underlying_price"], 502.5)
    assert f["volume"].tolist() == [12, 12, 0] * 2  # Yahoo omits the volume of untraded contracts
    assert f["last_trade_date"].dt.strftime("%Y-%m-%d").tolist() == ["2024-02-20", "2024-03-04", "2024-03-04"] * 2
    assert f["contract"].iloc[0] == "SPY240315P00495000" and (f["line"] == -1).all() and (f["file"] == "yfinance").all()
    few = yahoo.fetch_option_chain("SPY", deadline=time.monotonic() + 10, now=NOW, ticker_factory=FakeTicker,
                                   max_expiries=1)
    assert len(few) == 3


def test_fetch_option_chain_without_expiries_is_a_yahoo_error():
    with pytest.raises(yahoo.YahooError, match="no option expiries"):
        yahoo.fetch_option_chain("SPY", deadline=time.monotonic() + 10, now=NOW,
                                 ticker_factory=lambda s: FakeTicker(s, expiries=()))


def test_fetch_option_chain_failure_is_a_yahoo_error():
    class Failing(FakeTicker):
        def option_chain(self, expiry):
            raise ConnectionError("Connection reset by peer")

    with pytest.raises(yahoo.YahooError, match="2024-03-15.*reset by peer") as err:
        yahoo.fetch_option_chain("SPY", deadline=time.monotonic() + 10, now=NOW, ticker_factory=Failing)
    assert err.value.transient


def test_hanging_option_chain_is_abandoned_at_the_deadline():
    release = threading.Event()
    t = time.monotonic()
    try:
        with pytest.raises(yahoo.YahooError, match="hung") as err:
            yahoo.fetch_option_chain("SPY", deadline=t + 0.5, now=NOW,
                                     ticker_factory=lambda s: FakeTicker(s, hang=release))
    finally:
        release.set()
    assert time.monotonic() - t < 2
    assert "SPY" in str(err.value)


def test_snapshot_end_to_end_into_the_store(tmp_path):
    seen = {}

    def fetch(ticker, *, deadline, now):
        seen.update(ticker=ticker, left=deadline - time.monotonic(), now=now)
        return yahoo.fetch_option_chain(ticker, deadline=deadline, now=now, ticker_factory=FakeTicker)

    cfg = opts(source="store", store_dir=str(tmp_path / "store"))
    paths, rows = options.snapshot(cfg, "SPY", timeout_s=30, now=NOW, fetch=fetch)
    assert paths == [tmp_path / "store" / "SPY" / "2024-03-04.parquet"] and rows == 6
    assert seen["ticker"] == "SPY" and seen["now"] == NOW and 25 < seen["left"] <= 30
    chain = options.load_chain(cfg, "SPY")
    assert chain.rows_read == 6 and chain.dropped["stale quote"] == 2  # the puts last traded 2024-02-20
    assert chain.frame["call"].all() and len(chain.frame) == 4
    again, _ = options.snapshot(cfg, "SPY", timeout_s=30, now=NOW, fetch=fetch)
    assert again == paths and len(options.read_store(cfg.store_dir, "SPY")) == 6  # same day: merged, not doubled


def test_snapshot_offline_gives_the_offline_advice(tmp_path):
    def offline(ticker, *, deadline, now):
        raise yahoo.YahooError([ticker], "Yahoo listed no option expiries")

    with pytest.raises(DataError) as err:
        options.snapshot(opts(store_dir=str(tmp_path)), "SPY", timeout_s=5, now=NOW, fetch=offline)
    msg = str(err.value)
    assert not isinstance(err.value, yahoo.YahooError)
    assert "SPY" in msg and "no option expiries" in msg
    assert "options.source=csv" in msg and "options.path" in msg and "options.source=synthetic" in msg
    assert not (tmp_path / "SPY").exists()


# --------------------------------------------------------------------------------------------- the shared real files


@pytest.mark.skipif(not (SHARED / "SPXW_eod_chain_2018-01-02_2018-02-28.csv").is_file(),
                    reason="shared data not present")
def test_real_spxw_chain():
    path = SHARED / "SPXW_eod_chain_2018-01-02_2018-02-28.csv"
    chain = options.load_chain(opts(path=str(path)))
    f = chain.frame
    assert chain.rows_read == 14438 and len(f) > 5000 and len(f) + sum(chain.dropped.values()) == chain.rows_read
    assert (f["price"] > 0).all() and (f["bid"] <= f["ask"]).all()
    # 40 quote dates; on 2018-01-31 and 2018-02-28 only the same-day expiry is listed (0 days < min_days = 1)
    assert f["quote_date"].nunique() == 38
    assert options.load_chain(opts(path=str(path), min_days=0)).frame["quote_date"].nunique() == 40
    assert chain.dropped["zero quote"] > 0 and chain.dropped["crossed quote (bid > ask)"] == 0
    assert any("dropped" in w for w in chain.warnings)
    assert f["contract"].str.startswith("SPXW18").all() and f["implied_vol"].between(0.01, 4).all()


@pytest.mark.parametrize("name", ["SPX_chain_2013-04-19_RND.csv", "SPX_chain_2013-06-24_RND.csv"])
def test_real_rnd_wide_chains(name):
    path = SHARED / name
    if not path.is_file():
        pytest.skip("shared data not present")
    strikes = len(pd.read_csv(path))
    chain = options.load_chain(opts(path=str(path)))
    assert chain.rows_read == 2 * strikes
    assert len(chain.frame) == 2 * strikes - sum(chain.dropped.values()) > strikes
    assert chain.frame["call"].any() and (~chain.frame["call"]).any() and (chain.frame["price"] > 0).all()
    iv = chain.frame["implied_vol"].dropna()
    assert iv.empty or iv.between(0.01, 1).all()


def test_slashed_dates_read_day_first_when_the_files_own_dates_say_so(tmp_path):
    # 31/01/2018 can only be day-first, so 02/01/2018 is 2 January; month-first files read as before
    rows = [spxw_row(2600, quotedate="02/01/2018", expiration="31/01/2018"),
            spxw_row(2650, quotedate="03/01/2018", expiration="28/02/2018")]
    f = options.load_chain(opts(path=str(write_rows(tmp_path / "dmy.csv", rows)))).frame
    assert sorted(f["quote_date"].dt.strftime("%Y-%m-%d")) == ["2018-01-02", "2018-01-03"]
    assert sorted(f["expiry"].dt.strftime("%Y-%m-%d")) == ["2018-01-31", "2018-02-28"]
    us = [spxw_row(2600, quotedate="01/02/2018", expiration="01/31/2018")]
    f = options.load_chain(opts(path=str(write_rows(tmp_path / "mdy.csv", us)))).frame
    assert f["quote_date"].iloc[0] == pd.Timestamp("2018-01-02") and f["expiry"].iloc[0] == pd.Timestamp("2018-01-31")
    both = [spxw_row(2600, quotedate="13/01/2018"), spxw_row(2650, quotedate="01/13/2018")]
    with pytest.raises(DataError, match=r"both.csv: dates in both orders: '13/01/2018' is "
                                        r"day-first, '01/13/2018' month-first"):
        options.load_chain(opts(path=str(write_rows(tmp_path / "both.csv", both))))
