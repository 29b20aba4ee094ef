"""The options report's verdict: the previous-day IV baseline is causal, the headline names the strongest baseline
on shared contracts, collapsed buckets and contracts seen in training are flagged. Expected values by hand."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fincast.features.options import previous_day_iv
from fincast.reports import options as rep

D = pd.to_datetime(["2024-01-02", "2024-01-03", "2024-01-04", "2024-01-08"])


def _contracts():
    # A on every date; B skips 01-04; C first quoted on 01-04; the chain has no quote on 01-05 (a gap)
    rows = [("A", D[0], 0.20), ("B", D[0], 0.30), ("A", D[1], 0.21), ("B", D[1], 0.31), ("A", D[2], 0.22),
            ("C", D[2], 0.40), ("A", D[3], 0.23), ("B", D[3], 0.33), ("C", D[3], np.nan)]
    return pd.DataFrame(rows, columns=["contract", "quote_date", "iv"])


def test_previous_day_iv_is_the_same_contracts_iv_on_the_chains_previous_quote_date():
    c = _contracts()
    got = previous_day_iv(c)
    expected = [np.nan, np.nan, 0.20, 0.30, 0.21, np.nan, 0.22, np.nan, 0.40]
    np.testing.assert_allclose(got, expected, equal_nan=True)
    # causality: whatever happens on or after a date does not change what contracts up to it see
    for cut in D:
        later = c.assign(iv=np.where(c["quote_date"] >= cut, 9.9, c["iv"]))
        upto = (c["quote_date"] <= cut).to_numpy()
        np.testing.assert_array_equal(previous_day_iv(later)[upto], got[upto])


def _table():
    market = np.array([10.0, 12.0, 8.0, 5.0])
    return pd.DataFrame({"market_price": market, "lstm_price": market + [1, -1, 1, -1],
                         "bs_hv20_price": market + [3, -3, 3, -3], "bs_prev_iv_price": [10.5, np.nan, 8.5, 4.5],
                         "true_model_price": market})


def test_the_headline_names_the_strongest_baseline_on_shared_contracts():
    versus = rep.versus_baselines(_table(), ["lstm", "bs_hv20", "bs_prev_iv", "true_model"])
    assert list(versus["baseline"]) == ["bs_hv20", "bs_prev_iv"]  # the true model is no baseline
    prev = versus.set_index("baseline").loc["bs_prev_iv"]
    assert prev["contracts"] == 3 and prev["lstm_rmse"] == pytest.approx(1.0) and prev["baseline_rmse"] == 0.5
    text = rep.headline(versus)
    assert text.startswith("LSTM price RMSE 1 vs 0.5 for the best baseline, BS previous-day IV, on the same 3 ")
    assert "+100.0% (worse than it)" in text and "BS hist vol 20d -66.7%" in text


def test_collapsed_buckets_are_flagged():
    n = 12
    table = pd.DataFrame({"market_price": np.linspace(1, 12, n), "lstm_price": np.full(n, 6.0) + 0.01 * np.arange(n)})
    flagged = rep.collapsed_buckets(table, np.array(["<0.9"] * n), np.array(["<7d"] * n))
    assert len(flagged) == 1 and flagged[0].startswith("<0.9 x <7d")
    table["lstm_price"] = table["market_price"] * 1.1
    assert rep.collapsed_buckets(table, np.array(["<0.9"] * n), np.array(["<7d"] * n)) == []


def test_notes_count_contracts_without_a_previous_iv_and_seen_in_training():
    test = pd.DataFrame({"contract": ["A", "B", "C", "D"], "prev_iv": [0.2, np.nan, 0.3, np.nan]})
    train = pd.DataFrame({"contract": ["A", "C", "X"]})
    text = " ".join(rep.notes(test, train, ["lstm", "bs_prev_iv"]))
    assert "2 of 4 test contracts (50.0%) have no previous-day implied vol" in text
    assert "2 of 4 test contracts (50%) were quoted in the training period" in text


def test_seed_spread_scores_each_seed_against_its_best_baseline_and_the_line_says_how_often_it_wins(tmp_path):
    table, models = _table(), ["lstm", "bs_hv20", "bs_prev_iv", "true_model"]
    market = table["market_price"].to_numpy()
    prices = {0: table["lstm_price"].to_numpy(), 1: market + [0.1, -0.1, 0.1, -0.1],
              2: np.array([np.nan, np.nan, np.nan, np.nan])}
    seeds = rep.seed_spread(table, models, prices)
    assert list(seeds["seed"]) == [0, 1, 2] and list(seeds["contracts"]) == [4, 4, 0]
    # seed 0: RMSE 1 on all four; best baseline on shared contracts bs_prev_iv (0.5 vs 1 on 3): +100%
    assert seeds.loc[0, "lstm_rmse"] == pytest.approx(1.0) and seeds.loc[0, "best_baseline"] == "bs_prev_iv"
    assert seeds.loc[0, "lstm_vs_best_pct"] == pytest.approx(100.0)
    # seed 1: 0.1 on the 3 shared with bs_prev_iv (0.5): -80%; vs bs_hv20 (3): -96.7%; the best is bs_prev_iv
    assert seeds.loc[1, "lstm_rmse"] == pytest.approx(0.1) and seeds.loc[1, "lstm_vs_best_pct"] == pytest.approx(-80)
    assert np.isnan(seeds.loc[2, "lstm_rmse"]) and pd.isna(seeds.loc[2, "best_baseline"])
    line = rep.seed_line(seeds)
    assert line.startswith("Across 3 training seeds (0, 1, 2): LSTM price RMSE median 0.55 (0.1 to 1)")
    assert "median +10.0% (-80.0% to +100.0%), better in 1 of 3 seeds, 1 priced nothing." in line
    assert rep.seed_line(seeds.iloc[:1]).startswith("One training seed (options.seeds = 1)")
    page = rep.page(tmp_path, "run", pd.DataFrame(), pd.DataFrame(), pd.DataFrame(), [line], [], seeds=seeds)
    text = page.read_text()
    assert "<h3>Across training seeds</h3>" in text and "<td>BS previous-day IV</td>" not in text
    assert text.count("<td class='l'>BS previous-day IV</td>") == 2 and "<td class='l'>-</td>" in text
