"""fincast.backtest.evaluate (forecast and trading metrics, the no-look-ahead alignment of evaluate) and the
backtest section of fincast.config. Every expected value is written out by hand from the definitions in the
module and function docstrings, never taken from the code under test."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from fincast.backtest.evaluate import (
    BUY_AND_HOLD,
    diebold_mariano,
    evaluate,
    fold_errors,
    forecast_stats,
    periods_per_year,
    positions,
    strategy_returns,
    trading_stats,
)
from fincast.clipping import label as clip_label
from fincast.config import (
    ClipConfig,
    ConfigError,
    NormClip,
    ZClipConfig,
    from_dict,
    load,
    to_dict,
)

approx = pytest.approx


def no_negative_zero(a) -> bool:
    a = np.asarray(a, float)
    return not np.any((a == 0) & np.signbit(a))


# ---------------------------------------------------------------------------------------------
# trading_stats
# ---------------------------------------------------------------------------------------------


def test_max_drawdown_from_a_peak_above_the_start():
    s = trading_stats([0.1, -0.1, 0.1, -0.5], [1, 1, 1, 1], 252)
    # equity 1.1, 0.99, 1.089, 0.5445; the peak is 1.1 and the trough after it 0.5445
    assert s["Max. Drawdown [%]"] == approx(100 * (0.5445 / 1.1 - 1))
    assert s["Max. Drawdown [%]"] == approx(-50.5)
    assert s["Total Return [%]"] == approx(100 * (0.5445 - 1))
    cagr = 0.5445 ** (252 / 4) - 1
    assert s["CAGR [%]"] == approx(100 * cagr)
    assert s["Calmar Ratio"] == approx(cagr / 0.505)


def test_drawdown_below_the_initial_capital_counts_the_start_as_a_peak():
    # equity 0.8, 0.88: never above the starting capital 1, which is the peak
    s = trading_stats([-0.2, 0.1], [1, 1], 252)
    assert s["Max. Drawdown [%]"] == approx(-20.0)
    assert s["Total Return [%]"] == approx(100 * (0.8 * 1.1 - 1))


R5 = [0.01, -0.02, 0.03, 0.005, -0.01]


@pytest.mark.parametrize("periods", [252, 365])
def test_sharpe_sortino_total_cagr_volatility(periods):
    s = trading_stats(R5, [1] * 5, periods)
    mean = (0.01 - 0.02 + 0.03 + 0.005 - 0.01) / 5  # 0.003
    assert mean == approx(0.003)
    # deviations 0.007, -0.023, 0.027, 0.002, -0.013
    ss = 0.007**2 + 0.023**2 + 0.027**2 + 0.002**2 + 0.013**2  # 0.00148
    sd = math.sqrt(ss / (5 - 1))  # sqrt(0.00037)
    assert sd == approx(math.sqrt(0.00037))
    assert s["Sharpe Ratio"] == approx(0.003 / math.sqrt(0.00037) * math.sqrt(periods))
    assert s["Volatility (ann.) [%]"] == approx(100 * math.sqrt(0.00037) * math.sqrt(periods))
    # downside: min(r, 0) = 0, -0.02, 0, 0, -0.01 -> mean of squares (4e-4 + 1e-4) / 5 = 1e-4 -> 0.01
    downside = math.sqrt((0.02**2 + 0.01**2) / 5)
    assert downside == approx(0.01)
    assert s["Sortino Ratio"] == approx(0.003 * periods / (0.01 * math.sqrt(periods)))
    equity = 1.01 * 0.98 * 1.03 * 1.005 * 0.99
    assert s["Total Return [%]"] == approx(100 * (equity - 1))
    assert s["CAGR [%]"] == approx(100 * (equity ** (periods / 5) - 1))
    assert s["Days"] == 5


def test_calmar_is_cagr_over_the_absolute_drawdown():
    # equity 1.02, 1.0098, 1.040094, 1.01929212, 1.0294850412: the deepest fall is the -2% after 1.040094
    s = trading_stats([0.02, -0.01, 0.03, -0.02, 0.01], [1] * 5, 252)
    equity = 1.02 * 0.99 * 1.03 * 0.98 * 1.01
    cagr = equity ** (252 / 5) - 1
    assert s["Max. Drawdown [%]"] == approx(-2.0)
    assert s["Calmar Ratio"] == approx(cagr / 0.02)


def test_hit_rate_turnover_exposure_only_count_positions():
    pos = [1, 0, -1, 0.5, 1]
    net = [0.01, 0.0, 0.03, 0.005, -0.01]
    s = trading_stats(net, pos, 252)
    # active days 0, 2, 3, 4: net 0.01, 0.03, 0.005 > 0 and -0.01 -> 3 of 4
    assert s["Hit Rate [%]"] == approx(75.0)
    # |1-0| + |0-1| + |-1-0| + |0.5+1| + |1-0.5| = 5, over 5/252 years
    assert s["Turnover (ann.) [x]"] == approx(5 / (5 / 252))
    assert s["Exposure [%]"] == approx(100 * 4 / 5)
    assert s["Avg. |Position|"] == approx((1 + 0 + 1 + 0.5 + 1) / 5)


def test_hit_rate_is_nan_without_positions():
    s = trading_stats([0.0, 0.0, 0.0], [0, 0, 0], 252)
    assert math.isnan(s["Hit Rate [%]"])
    assert s["Exposure [%]"] == 0
    assert s["Turnover (ann.) [x]"] == 0


def test_no_drawdown_gives_nan_calmar():
    s = trading_stats([0.01, 0.02, 0.0], [1, 1, 1], 252)
    assert s["Max. Drawdown [%]"] == 0
    assert math.isnan(s["Calmar Ratio"])
    assert math.isnan(s["Sortino Ratio"])  # no negative day


def test_all_zero_returns_give_nan_ratios_not_inf():
    s = trading_stats([0.0] * 6, [1] * 6, 365)
    assert math.isnan(s["Sharpe Ratio"])
    assert math.isnan(s["Sortino Ratio"])
    assert math.isnan(s["Calmar Ratio"])
    assert s["Total Return [%]"] == 0
    assert s["CAGR [%]"] == 0
    assert s["Max. Drawdown [%]"] == 0
    assert s["Volatility (ann.) [%]"] == 0


def test_empty_series_gives_empty_stats():
    assert trading_stats([], [], 252).empty


# ---------------------------------------------------------------------------------------------
# strategy_returns
# ---------------------------------------------------------------------------------------------


def test_costs_are_cost_bps_times_turnover_day_by_day():
    r = [0.01, -0.02, 0.03, 0.01]
    held = [1, 1, -1, 0.5]
    sr = strategy_returns(r, held, 10.0)
    turnover = [1, 0, 2, 1.5]  # entering from flat on day 0 counts
    cost = [10 / 1e4 * t for t in turnover]  # 0.001, 0, 0.002, 0.0015
    gross = [0.01, -0.02, -0.03, 0.005]
    assert sr["turnover"].tolist() == approx(turnover)
    assert sr["cost"].tolist() == approx(cost)
    assert sr["gross"].tolist() == approx(gross)
    assert sr["net"].tolist() == approx([g - c for g, c in zip(gross, cost, strict=True)])
    assert (sr["gross"] - sr["net"]).tolist() == approx([0.001, 0.0, 0.002, 0.0015])
    assert sr["position"].tolist() == held
    assert sr["asset"].tolist() == r


def test_constant_position_pays_only_the_entry_cost():
    r = [0.01, -0.02, 0.03, 0.01]
    sr = strategy_returns(r, [0.5] * 4, 20.0)
    assert sr["cost"].tolist() == approx([0.5 * 20 / 1e4, 0, 0, 0])
    assert sr["net"].tolist() == approx([0.5 * 0.01 - 0.001, 0.5 * -0.02, 0.5 * 0.03, 0.5 * 0.01])


def test_zero_cost_means_net_equals_gross():
    sr = strategy_returns([0.01, -0.02], [1, -1], 0.0)
    assert sr["net"].tolist() == approx([0.01, 0.02])
    assert sr["cost"].tolist() == [0.0, 0.0]


# ---------------------------------------------------------------------------------------------
# positions
# ---------------------------------------------------------------------------------------------

F = [0.02, -0.01, 0.0, math.nan, -0.0]


def test_sign_rule():
    pos = positions(F, rule="sign")
    assert pos.tolist() == [1.0, -1.0, 0.0, 0.0, 0.0]
    assert no_negative_zero(pos)


def test_sign_rule_with_a_cap_below_one_scales_the_unit():
    pos = positions(F, rule="sign", max_position=0.5)
    assert pos.tolist() == [0.5, -0.5, 0.0, 0.0, 0.0]
    assert no_negative_zero(pos)
    # a cap above one does not lever up the sign rule
    assert positions(F, rule="sign", max_position=2.0).tolist() == [1.0, -1.0, 0.0, 0.0, 0.0]


def test_long_flat_rule():
    assert positions(F, rule="long_flat").tolist() == [1.0, 0.0, 0.0, 0.0, 0.0]
    pos = positions(F, rule="long_flat", max_position=0.25)
    assert pos.tolist() == [0.25, 0.0, 0.0, 0.0, 0.0]
    assert no_negative_zero(pos)


def test_vol_target_rule_by_hand():
    f = [0.01, -0.03, 0.005, 0.02, 0.01, math.nan, -0.01, 0.01]
    scale = [0.02, 0.02, 0.02, 0.02, 0.02, 0.02, 0.02, 0.0]
    vol = [0.01, 0.01, 0.02, 0.0, math.nan, 0.01, 0.0, 0.01]
    pos = positions(f, rule="vol_target", max_position=0.6, scale=scale, vol=vol, vol_target=0.15, periods=252)
    lev1 = 0.15 / (0.01 * math.sqrt(252))  # about 0.945
    lev2 = 0.15 / (0.02 * math.sqrt(252))
    expected = [
        0.5 * lev1,  # 0.01 / 0.02 = 0.5
        -0.6,  # -0.03 / 0.02 = -1.5 -> -1, x lev1 = -0.945 -> capped at -0.6
        0.25 * lev2,  # 0.005 / 0.02
        0.0,  # zero volatility: flat
        0.0,  # unknown volatility: flat
        0.0,  # missing forecast: flat
        0.0,  # negative forecast, zero volatility: flat, not -0
        0.0,  # zero scale: flat
    ]
    assert 0.5 * lev1 < 0.6 and lev1 > 0.6
    assert pos.tolist() == approx(expected)
    assert no_negative_zero(pos)


def test_vol_target_uses_the_periods():
    pos = positions([0.02], rule="vol_target", max_position=10, scale=[0.01], vol=[0.01], vol_target=0.2,
                    periods=365)
    assert pos.tolist() == approx([1 * 0.2 / (0.01 * math.sqrt(365))])


def test_unknown_rule_is_rejected():
    with pytest.raises(ValueError, match="unknown position rule"):
        positions([0.1], rule="kelly")


# ---------------------------------------------------------------------------------------------
# periods_per_year
# ---------------------------------------------------------------------------------------------


def test_periods_per_year_from_the_calendar():
    assert periods_per_year(pd.date_range("2024-01-01", periods=14, freq="D")) == 365
    assert periods_per_year(pd.bdate_range("2024-01-01", periods=14)) == 252


# ---------------------------------------------------------------------------------------------
# diebold_mariano
# ---------------------------------------------------------------------------------------------

E1 = [0.5, -1.0, 0.3, 0.8, -0.2, 1.1]
E2 = [0.7, 0.4, -0.9, 0.6, 0.5, -0.3]


def test_dm_horizon_one_is_the_hln_corrected_t_statistic():
    d = [a * a - b * b for a, b in zip(E1, E2, strict=True)]
    # -0.24, 0.84, -0.72, 0.28, -0.21, 1.12
    assert d == approx([-0.24, 0.84, -0.72, 0.28, -0.21, 1.12])
    n, h = 6, 1
    mean = sum(d) / n
    var_pop = sum((x - mean) ** 2 for x in d) / n
    stat = mean / math.sqrt(var_pop / n) * math.sqrt((n + 1 - 2 * h + h * (h - 1) / n) / n)
    p = 2 * sps.t.sf(abs(stat), n - 1)
    got = diebold_mariano(E1, E2, 1)
    assert got[0] == approx(stat)
    assert got[1] == approx(p)


def test_dm_is_antisymmetric():
    s12, p12 = diebold_mariano(E1, E2, 1)
    s21, p21 = diebold_mariano(E2, E1, 1)
    assert s21 == approx(-s12)
    assert p21 == approx(p12)
    assert s12 != 0


def test_dm_of_identical_errors_is_nan():
    s, p = diebold_mariano(E1, E1, 1)
    assert math.isnan(s) and math.isnan(p)


def _gammas(e1, e2, lags):
    n = len(e1)
    d = [a * a - b * b for a, b in zip(e1, e2, strict=True)]
    mean = sum(d) / n
    u = [x - mean for x in d]
    return mean, [sum(u[i] * u[i - k] for i in range(k, n)) / n for k in range(lags + 1)]


def test_dm_horizon_three_uses_the_rectangular_long_run_variance():
    e1 = [0.5, -1.0, 0.3, 0.8, -0.2, 1.1, 0.9, -0.4]
    e2 = [0.7, 0.4, -0.9, 0.6, 0.5, -0.3, 0.2, 0.6]
    n, h = 8, 3
    mean, (gamma0, gamma1, gamma2) = _gammas(e1, e2, 2)
    lrv = gamma0 + 2 * gamma1 + 2 * gamma2  # h-step errors are MA(h-1): weight 1 on lags 1..h-1
    assert lrv > 0
    stat = mean / math.sqrt(lrv / n) * math.sqrt((n + 1 - 2 * h + h * (h - 1) / n) / n)
    p = 2 * sps.t.sf(abs(stat), n - 1)
    got = diebold_mariano(e1, e2, 3)
    assert got[0] == approx(stat)
    assert got[1] == approx(p)
    # the long-run variance differs from the horizon-1 variance here, so horizon matters
    assert got[0] != approx(diebold_mariano(e1, e2, 1)[0])


def test_dm_falls_back_to_bartlett_weights_when_the_rectangular_variance_is_not_positive():
    # loss differentials alternating around their mean: strongly negative lag-1 autocovariance
    e1 = [1.0, 0.1, 1.2, 0.2, 1.1, 0.1, 1.3, 0.2, 1.0, 0.3]
    e2 = [0.1] * 10
    n, h = 10, 2
    mean, (gamma0, gamma1) = _gammas(e1, e2, 1)
    assert gamma0 + 2 * gamma1 <= 0
    lrv = gamma0 + 2 * (1 - 1 / 2) * gamma1
    assert lrv > 0
    stat = mean / math.sqrt(lrv / n) * math.sqrt((n + 1 - 2 * h + h * (h - 1) / n) / n)
    assert diebold_mariano(e1, e2, h)[0] == approx(stat)


# ---------------------------------------------------------------------------------------------
# forecast_stats
# ---------------------------------------------------------------------------------------------

Y = [0.01, -0.02, 0.015, -0.005]
YM = [0.002] * 4


def test_r2_oos_is_zero_for_the_historical_mean_itself():
    s = forecast_stats(Y, YM, YM)
    assert s["R2 OOS [%]"] == approx(0.0, abs=1e-9)


def test_forecast_stats_by_hand_with_a_missing_forecast():
    s = forecast_stats(Y, [0.005, -0.01, math.nan, 0.0], YM)
    # the missing forecast counts as 0: f = 0.005, -0.01, 0, 0; errors f - y = -0.005, 0.01, -0.015, 0.005
    sse = 0.005**2 + 0.01**2 + 0.015**2 + 0.005**2  # 3.75e-4
    sse_mean = 0.008**2 + 0.022**2 + 0.013**2 + 0.007**2  # 7.66e-4
    sse_naive = 0.01**2 + 0.02**2 + 0.015**2 + 0.005**2  # 7.5e-4
    assert s["Forecasts"] == 4
    assert s["Missing [%]"] == approx(25.0)
    assert s["RMSE"] == approx(math.sqrt(sse / 4))
    assert s["MAE"] == approx((0.005 + 0.01 + 0.015 + 0.005) / 4)
    assert s["R2 OOS [%]"] == approx(100 * (1 - 3.75e-4 / 7.66e-4))
    assert s["R2 OOS [%]"] == approx(100 * (1 - sse / sse_mean))
    assert s["RMSE vs Naive [%]"] == approx(100 * (math.sqrt(0.5) - 1))
    assert s["RMSE vs Naive [%]"] == approx(100 * (math.sqrt(sse / 4) / math.sqrt(sse_naive / 4) - 1))
    # signs: +/+ hit, -/- hit, 0 and 0 half a hit each -> (1 + 1 + 0.5 + 0.5) / 4
    assert s["Directional Accuracy [%]"] == approx(75.0)


def test_directional_accuracy_counts_misses():
    s = forecast_stats([0.01, -0.02, 0.03, -0.01], [-0.01, -0.01, 0.0, 0.02], [0.0] * 4)
    # miss, hit, half, miss -> 1.5 / 4
    assert s["Directional Accuracy [%]"] == approx(100 * 1.5 / 4)


def test_all_zero_forecast_has_no_dm_and_equals_naive():
    s = forecast_stats(Y, [0.0] * 4, YM)
    assert math.isnan(s["DM Stat"]) and math.isnan(s["DM p-value"])
    assert s["RMSE vs Naive [%]"] == approx(0.0, abs=1e-12)
    assert s["Directional Accuracy [%]"] == approx(50.0)


# ---------------------------------------------------------------------------------------------
# evaluate: alignment of forecasts and positions (no look-ahead)
# ---------------------------------------------------------------------------------------------

PRICES = [100.0, 101.0, 99.5, 100.2, 102.0, 101.1, 100.3, 101.7, 103.0, 102.4, 103.1, 104.0]
DAYS = pd.bdate_range("2024-01-01", periods=len(PRICES))


def price_frame() -> pd.DataFrame:
    p = np.array(PRICES)
    return pd.DataFrame({"open": p, "high": p * 1.01, "low": p * 0.99, "close": p, "adj_close": p,
                         "volume": np.full(len(p), 1e6)}, index=DAYS)


def simple(j: int) -> float:
    """Day j's simple return."""
    return PRICES[j] / PRICES[j - 1] - 1


def wf_table(ticker: str = "X") -> pd.DataFrame:
    """Forecasts from origins 0..10 (the last bar has no target): the target of origin t is log(p[t+1]/p[t]),
    dated t+1. Fold 1 has origins 0..5 (cutoff day 0), fold 2 origins 6..10 (cutoff day 6)."""
    rows = []
    for t in range(len(PRICES) - 1):
        y = math.log(PRICES[t + 1] / PRICES[t])
        fold, cutoff = (1, DAYS[0]) if t <= 5 else (2, DAYS[6])
        for model, pred in (("oracle", y), ("contrarian", -y), ("hist_mean", 0.0005), ("naive", 0.0)):
            rows.append({"date": DAYS[t + 1], "ticker": ticker, "cutoff": cutoff, "model": model, "y_true": y,
                         "y_pred": pred, "origin": DAYS[t], "fold": fold, "pred_rms_train": 0.01})
    return pd.DataFrame(rows)


MODELS = ["oracle", "contrarian", "hist_mean", "naive"]


def run_eval(**kw):
    args = {"models": MODELS, "horizon": 1, "rule": "sign", "max_position": 1.0, "cost_bps": 0.0,
            "vol_target": 0.15, "vol_window": 2}
    args.update(kw)
    return evaluate(wf_table(), {"X": price_frame()}, **args)


def daily_of(ev, model: str) -> pd.DataFrame:
    return ev.daily[ev.daily["model"] == model].set_index("date")


def test_no_returns_are_zero_in_the_fixture():
    assert all(simple(j) != 0 for j in range(1, len(PRICES)))


def test_oracle_earns_the_absolute_return_of_the_day_it_holds():
    ev = run_eval()
    d = daily_of(ev, "oracle")
    assert list(d.index) == list(DAYS[1:])  # origins 0..10 hold days 1..11
    for j in range(1, len(PRICES)):
        day = DAYS[j]
        # the forecast made at the close of day j-1 is the move of day j: its sign is the position of day j
        assert d.loc[day, "position"] == (1.0 if PRICES[j] > PRICES[j - 1] else -1.0)
        assert d.loc[day, "asset"] == approx(simple(j))
        assert d.loc[day, "net"] == approx(abs(simple(j)))
    s = ev.stats.set_index("model").loc["oracle"]
    assert s["Hit Rate [%]"] == approx(100.0)
    assert s["Days"] == len(PRICES) - 1
    assert s["RMSE"] == approx(0.0, abs=1e-15)
    assert s["R2 OOS [%]"] == approx(100.0)
    assert s["Directional Accuracy [%]"] == approx(100.0)
    assert ev.periods == {"X": 252}


def test_wrong_sign_model_loses_the_absolute_return_every_day():
    ev = run_eval()
    d = daily_of(ev, "contrarian")
    for j in range(1, len(PRICES)):
        assert d.loc[DAYS[j], "position"] == (-1.0 if PRICES[j] > PRICES[j - 1] else 1.0)
        assert d.loc[DAYS[j], "net"] == approx(-abs(simple(j)))
    assert ev.stats.set_index("model").loc["contrarian", "Hit Rate [%]"] == approx(0.0)


def test_naive_and_hist_mean_positions():
    ev = run_eval()
    naive = daily_of(ev, "naive")
    assert (naive["position"] == 0).all() and (naive["net"] == 0).all()
    hm = daily_of(ev, "hist_mean")  # a positive forecast every day: long every day
    for j in range(1, len(PRICES)):
        assert hm.loc[DAYS[j], "position"] == 1.0
        assert hm.loc[DAYS[j], "net"] == approx(simple(j))


def test_costs_in_evaluate_follow_the_oracle_turnover():
    ev = run_eval(cost_bps=7.0)
    d = daily_of(ev, "oracle")
    prev = 0.0  # flat before the first day
    for j in range(1, len(PRICES)):
        pos = 1.0 if PRICES[j] > PRICES[j - 1] else -1.0
        cost = 7 / 1e4 * abs(pos - prev)
        assert d.loc[DAYS[j], "cost"] == approx(cost)
        assert d.loc[DAYS[j], "net"] == approx(abs(simple(j)) - cost)
        prev = pos


def test_buy_and_hold_pays_only_the_entry_cost():
    ev = run_eval(cost_bps=7.0)
    bh = daily_of(ev, BUY_AND_HOLD)
    assert list(bh.index) == list(DAYS[1:])
    for j in range(1, len(PRICES)):
        entry = 7 / 1e4 if j == 1 else 0.0
        assert bh.loc[DAYS[j], "position"] == 1.0
        assert bh.loc[DAYS[j], "net"] == approx(simple(j) - entry)
    s = ev.stats.set_index("model").loc[BUY_AND_HOLD]
    # the simple returns compound to the price ratio; the entry cost comes off the first day
    total = (1 + simple(1) - 7 / 1e4) * (PRICES[-1] / PRICES[1]) - 1
    assert s["Total Return [%]"] == approx(100 * total)
    assert bh["equity"].iloc[-1] == approx(1 + total)


def test_buy_and_hold_without_cost_is_the_price_ratio():
    ev = run_eval()
    s = ev.stats.set_index("model").loc[BUY_AND_HOLD]
    assert s["Total Return [%]"] == approx(100 * (104.0 / 100.0 - 1))


def test_vol_target_uses_the_volatility_known_at_the_origin():
    ev = run_eval(rule="vol_target", vol_window=3, max_position=5.0, vol_target=0.15)
    d = daily_of(ev, "oracle")
    logret = {j: math.log(PRICES[j] / PRICES[j - 1]) for j in range(1, len(PRICES))}
    for t in range(len(PRICES) - 1):  # origin t, held on day t+1
        if t < 3:  # fewer than 3 log returns known at the close of t: flat
            expected = 0.0
        else:
            vol = statistics.stdev([logret[t - 2], logret[t - 1], logret[t]])  # up to and including day t
            strength = max(-1.0, min(1.0, logret[t + 1] / 0.01))
            expected = max(-5.0, min(5.0, strength * 0.15 / (vol * math.sqrt(252))))
        assert d.loc[DAYS[t + 1], "position"] == approx(expected), t


def test_evaluate_keeps_tickers_apart():
    table = pd.concat([wf_table("A"), wf_table("B")], ignore_index=True)
    ev = evaluate(table, {"A": price_frame(), "B": price_frame()}, models=MODELS, horizon=1, rule="sign",
                  max_position=1.0, cost_bps=0.0, vol_target=0.15, vol_window=2)
    assert sorted(set(ev.stats["ticker"])) == ["A", "B"]
    assert len(ev.stats) == 2 * (len(MODELS) + 1)
    for tk in ("A", "B"):
        d = ev.daily[(ev.daily["ticker"] == tk) & (ev.daily["model"] == "oracle")]
        assert len(d) == len(PRICES) - 1


# ---------------------------------------------------------------------------------------------
# fold_errors
# ---------------------------------------------------------------------------------------------


def test_fold_errors_by_hand():
    c1, c2 = pd.Timestamp("2024-01-01"), pd.Timestamp("2024-02-01")
    rows = [
        # fold 1: y 0.01, -0.02
        (1, c1, "m", 0.01, 0.01), (1, c1, "m", -0.02, math.nan),
        (1, c1, "naive", 0.01, 0.0), (1, c1, "naive", -0.02, 0.0),
        # fold 2: y 0.03, 0.0, -0.01
        (2, c2, "m", 0.03, 0.02), (2, c2, "m", 0.0, 0.01), (2, c2, "m", -0.01, -0.01),
        (2, c2, "naive", 0.03, 0.0), (2, c2, "naive", 0.0, 0.0), (2, c2, "naive", -0.01, 0.0),
    ]
    table = pd.DataFrame([{"fold": f, "cutoff": c, "ticker": "X", "model": m, "y_true": y, "y_pred": p}
                          for f, c, m, y, p in rows])
    out = fold_errors(table).set_index(["fold", "model"])
    # fold 1: m errors 0, 0.02 (the missing forecast is 0) -> mse 2e-4; naive mse (1e-4 + 4e-4) / 2 = 2.5e-4
    assert out.loc[(1, "m"), "n"] == 2
    assert out.loc[(1, "m"), "rmse"] == approx(math.sqrt(2e-4))
    assert out.loc[(1, "naive"), "rmse"] == approx(math.sqrt(2.5e-4))
    assert out.loc[(1, "m"), "rmse_vs_naive_pct"] == approx(100 * (math.sqrt(0.8) - 1))
    # fold 2: m errors -0.01, 0.01, 0 -> mse 2e-4 / 3; naive (9e-4 + 0 + 1e-4) / 3 = 1e-3 / 3
    assert out.loc[(2, "m"), "n"] == 3
    assert out.loc[(2, "m"), "rmse"] == approx(math.sqrt(2e-4 / 3))
    assert out.loc[(2, "naive"), "rmse"] == approx(math.sqrt(1e-3 / 3))
    assert out.loc[(2, "m"), "rmse_vs_naive_pct"] == approx(100 * (math.sqrt(0.2) - 1))
    assert out.loc[(1, "naive"), "rmse_vs_naive_pct"] == approx(0.0)
    assert out.loc[(2, "naive"), "rmse_vs_naive_pct"] == approx(0.0)
    assert out.loc[(2, "m"), "cutoff"] == c2


# ---------------------------------------------------------------------------------------------
# Config: the backtest section
# ---------------------------------------------------------------------------------------------

RAW = {"clip": {"norm": {"max_norm": 0.5}},
       "backtest": {"clips": ["none", "norm", {"method": "zclip", "zclip": {"z_thresh": 3}}]}}


def config_error(raw) -> str:
    with pytest.raises(ConfigError) as info:
        from_dict(raw)
    return str(info.value)


def test_clips_are_read_over_the_spec_clip_section():
    cfg = from_dict(RAW)
    clips = cfg.backtest.clips
    assert [c.method for c in clips] == ["none", "norm", "zclip"]
    assert clips[1].norm.max_norm == 0.5  # inherited from clip.norm.max_norm
    assert clips[2].zclip.z_thresh == 3.0
    assert clips[2].zclip.alpha == ZClipConfig().alpha
    assert cfg.clip.norm.max_norm == 0.5
    labels = [clip_label(c) for c in clips]
    assert labels == [clip_label(ClipConfig(method="none")),
                      clip_label(ClipConfig(method="norm", norm=NormClip(max_norm=0.5))),
                      clip_label(ClipConfig(method="zclip", zclip=ZClipConfig(z_thresh=3.0)))]
    assert labels == ["none", "norm0.5", "zclip-z3"]


def test_clips_default_to_null_and_a_bare_name_is_one_entry():
    assert from_dict({}).backtest.clips is None
    cfg = from_dict({"backtest": {"clips": "norm"}})
    assert [c.method for c in cfg.backtest.clips] == ["norm"]


def test_load_a_spec_file(tmp_path):
    import yaml

    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(RAW))
    cfg = load(path)
    assert cfg == from_dict(RAW)
    cfg2 = load(path, ["backtest.cost_bps=2.5", "backtest.position=vol_target"])
    assert cfg2.backtest.cost_bps == 2.5
    assert cfg2.backtest.position == "vol_target"
    assert cfg2.backtest.clips == cfg.backtest.clips


def test_backtest_config_round_trips():
    raw = {**RAW, "backtest": {**RAW["backtest"], "start": "2020-01-01", "end": "2021-06-30", "window": 756,
                               "position": "long_flat", "cost_bps": 3}}
    cfg = from_dict(raw)
    again = from_dict(to_dict(cfg))
    assert again == cfg
    assert to_dict(again) == to_dict(cfg)
    assert again.backtest.window == 756


@pytest.mark.parametrize("clips, key", [
    (["none", {"method": "bogus"}], "backtest.clips[1].method"),
    (["none", 5], "backtest.clips[1]"),
    ([{"method": "norm", "norm": {"max_norm": -1}}], "backtest.clips[0].norm.max_norm"),
    (["norm", {"method": "norm", "norm": {"max_nrom": 1}}], "backtest.clips[1].norm.max_nrom"),
    ([], "backtest.clips"),
])
def test_bad_clip_entries_name_the_key(clips, key):
    assert key in config_error({"backtest": {"clips": clips}})


def test_duplicate_clip_labels_are_rejected():
    msg = config_error({"clip": {"norm": {"max_norm": 0.5}}, "backtest": {"clips": ["norm", {"method": "norm"}]}})
    assert "backtest.clips: entries 1 and 2" in msg and "(norm)" in msg and "twice" in msg
    assert "twice" in config_error({"backtest": {"clips": ["none", "none"]}})


@pytest.mark.parametrize("window, stored", [("expanding", "expanding"), ("756", 756), (756, 756), (2, 2)])
def test_window_accepts_expanding_or_a_length(window, stored):
    assert from_dict({"backtest": {"window": window}}).backtest.window == stored


@pytest.mark.parametrize("window", ["abc", "1", 1, "0", "-5", "756.5"])
def test_window_rejects_other_values(window):
    assert "backtest.window" in config_error({"backtest": {"window": window}})


def test_window_with_a_non_decimal_digit_is_a_config_error():
    assert "backtest.window" in config_error({"backtest": {"window": "²"}})


def test_backtest_end_must_be_after_start():
    msg = config_error({"backtest": {"start": "2021-01-01", "end": "2020-06-30"}})
    assert "backtest.end" in msg
    assert "backtest.end" in config_error({"backtest": {"start": "2021-01-01", "end": "2021-01-01"}})
    cfg = from_dict({"backtest": {"start": "2020-01-01", "end": "2021-01-01"}})
    assert cfg.backtest.end > cfg.backtest.start


@pytest.mark.parametrize("key, value", [("cost_bps", -1), ("max_position", 0), ("vol_window", 1),
                                        ("position", "martingale"), ("refit_every", 0)])
def test_backtest_ranges(key, value):
    assert f"backtest.{key}" in config_error({"backtest": {key: value}})


def test_distinct_clip_configs_with_one_label_are_kept_apart():
    cfg = from_dict({"backtest": {"clips": [{"method": "zclip", "zclip": {"alpha": 0.9}},
                                            {"method": "zclip", "zclip": {"alpha": 0.99}}]}})
    from fincast.backtest import family, model_names

    lstms = [m for m in model_names(cfg) if m.startswith("lstm-")]
    assert len(lstms) == len(set(lstms)) == 2 * cfg.backtest.seeds
    assert list(dict.fromkeys(map(family, lstms))) == ["lstm-zclip-z2.5", "lstm-zclip-z2.5-2"]
    assert lstms[:3] == ["lstm-zclip-z2.5/seed0", "lstm-zclip-z2.5/seed1", "lstm-zclip-z2.5/seed2"]


def test_a_stray_weekend_bar_does_not_make_an_equity_calendar_365():
    days = pd.bdate_range("2024-01-01", periods=250).append(pd.DatetimeIndex([pd.Timestamp("2024-06-08")]))
    assert pd.Timestamp("2024-06-08").day_of_week == 5
    assert periods_per_year(days.sort_values()) == 252


def test_drawdown_from_the_running_peak():
    from fincast.backtest.evaluate import drawdown


    np.testing.assert_allclose(100 * drawdown(np.array([1.1, 0.99, 1.21, 0.605])), [0, -10, 0, -50], atol=1e-12)
    np.testing.assert_allclose(100 * drawdown(np.array([0.9, 0.45])), [-10, -55])  # initial capital is a peak
    np.testing.assert_allclose(100 * drawdown(np.array([2.0, np.nan, 1.0, 0.0, -1.0])),
                               [0, np.nan, -50, -100, -150])
