"""Walk-forward backtest: no look-ahead, the table's structure, what each fold trains on, warm starts, errors,
and `fincast backtest` end to end into a temporary MLflow store."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from fincast import cli
from fincast import config as config_mod
from fincast.backtest import BacktestError, model_names, walk_forward
from fincast.backtest import walkforward as wfm
from fincast.config import TrackingConfig
from fincast.data import load_prices
from fincast.data.validate import validate
from fincast.features import feature_names
from fincast.models import build_model
from fincast.runs import backtest as backtest_run
from fincast.training import seed_everything

ROOT = Path(__file__).resolve().parents[2]
SPEC = ROOT / "pipelines" / "backtest_crypto.yaml"
CPU = torch.device("cpu")
PRICES = ["open", "high", "low", "close", "adj_close"]

# Two crypto tickers (a bar every day), 2020-01-01 .. 2021-05-31; cutoffs every 40 bars from 2021-01-01:
# 2021-01-01, 02-10, 03-22, 05-01 (the last sample origin is 2021-05-30).
TINY = ("data.source=synthetic", "data.tickers=[BTC-USD, ETH-USD]", "data.start=2020-01-01", "data.end=2021-05-31",
        "features.lookback=5", "features.vol_windows=[7, 30]", "features.volume=true",
        "model.hidden_size=4", "train.epochs=2", "train.batch_size=64", "train.warmup_steps=5",
        "train.device=cpu", "backtest.window=expanding", "backtest.start=2021-01-01", "backtest.refit_every=40",
        "backtest.refit_full=false", "backtest.seeds=1")  # one fit per fold and LSTM; the refit and seeds: own tests
LOOKBACK = 5
# vol_windows [7, 30] and volume (log volume less its 21-bar mean): bar 30 is the first complete feature row
FIRST_FEATURE_BAR = 30


def _cfg(*overrides: str):
    return config_mod.load(SPEC, [*TINY, *overrides])


@dataclasses.dataclass
class FitCall:
    train_date: np.ndarray
    val_date: np.ndarray
    train_origin: np.ndarray
    val_origin: np.ndarray
    epochs: int
    clip: str
    initial: dict[str, torch.Tensor]
    final: dict[str, torch.Tensor]


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _run(cfg, frames, monkeypatch, stack: int = 1) -> tuple[wfm.WalkForward, list[FitCall]]:
    """walk_forward on CPU with the pipeline's LSTM fitter, recording every LSTM fit (its splits' dates, start and
    end weights), in the order fold by fold, one per clip, each followed by its refit when there is one (the fitter
    trains a stack's first fits together, then their refits together)."""
    stacks: list[tuple[bool, list[FitCall]]] = []
    real = backtest_run.train_runs

    def recording(models, trains, vals, cfgs, clips, **kw):
        initial = [_state(m) for m in models]
        res = real(models, trains, vals, cfgs, clips, **kw)
        trains = trains if isinstance(trains, list) else [trains] * len(models)
        vals = vals if isinstance(vals, list) else [vals] * len(models)
        stacks.append((kw.get("restore_best") is False, [
            FitCall(t.date.copy(), v.date.copy(), t.origin.copy(), v.origin.copy(), c.epochs, clip.method, i,
                    _state(m)) for t, v, c, clip, i, m in zip(trains, vals, cfgs, clips, initial, models)]))
        return res

    monkeypatch.setattr(backtest_run, "train_runs", recording)
    wf = walk_forward(frames, cfg, fit_lstm=backtest_run.lstm_fitter(cfg, CPU), stack=stack)
    calls: list[FitCall] = []
    for i, (refit, batch) in enumerate(stacks):
        if refit:
            continue
        if i + 1 < len(stacks) and stacks[i + 1][0]:  # (every fit is usable in these tests: each has its refit)
            assert len(stacks[i + 1][1]) == len(batch)
            calls += [c for pair in zip(batch, stacks[i + 1][1]) for c in pair]
        else:
            calls += batch
    return wf, calls


def _lstm_fold_rows(wf: wfm.WalkForward) -> pd.DataFrame:
    """The folds table's LSTM rows, in the order the fits ran (fold by fold, one per clip)."""
    return wf.folds[wf.folds["model"].isin(wf.lstms)].reset_index(drop=True)


@pytest.fixture(scope="module")
def base():
    """The tiny expanding-window backtest, run once for several tests."""
    cfg = _cfg()
    frames = load_prices(cfg.data).frames
    with pytest.MonkeyPatch.context() as mp:
        wf, calls = _run(cfg, frames, mp)
    cuts, calendar = wfm.cutoffs(wfm.panels(frames, cfg), cfg)
    return cfg, frames, wf, calls, cuts, calendar


# ---------------------------------------------------------------------------------------------
# 1. No look-ahead
# ---------------------------------------------------------------------------------------------


def _perturb_after(frames: dict[str, pd.DataFrame], when: pd.Timestamp, seed: int = 1) -> dict[str, pd.DataFrame]:
    """Every bar from ``when`` on: prices times one random factor per day (OHLC stays consistent), volume times
    another; checked by the data validator."""
    rng = np.random.default_rng(seed)
    out = {}
    for ticker, df in frames.items():
        df = df.copy()
        later = df.index >= when
        n = int(later.sum())
        factor = np.exp(rng.normal(0.0, 0.05, n))
        for col in PRICES:
            df.loc[later, col] = df.loc[later, col].to_numpy() * factor
        df.loc[later, "volume"] = np.round(df.loc[later, "volume"].to_numpy() * np.exp(rng.normal(0.0, 0.3, n)))
        checked = validate(df, ticker, "perturbed")
        assert checked.warnings == []
        out[ticker] = checked.frame
        pd.testing.assert_frame_equal(out[ticker][~later], frames[ticker][~later])
        assert not np.allclose(out[ticker].loc[later, "adj_close"], frames[ticker].loc[later, "adj_close"])
    return out


def test_forecasts_before_a_date_do_not_depend_on_prices_after_it(base, monkeypatch):
    """Perturb every price from D on: every forecast from an origin before D (all models: both LSTMs, ridge
    with its per-fold penalty, the historical mean, naive; their scalers and target scales) is bit-identical,
    and forecasts from D on do change."""
    cfg, frames, wf, _, cuts, _ = base
    when = pd.Timestamp(cuts[1]) + pd.Timedelta(days=15)  # in the middle of fold 2
    wf2, _ = _run(cfg, _perturb_after(frames, when), monkeypatch)
    a, b = wf.forecasts, wf2.forecasts
    key = ["date", "ticker", "model", "origin", "cutoff", "fold"]
    pd.testing.assert_frame_equal(a[key], b[key])
    before = (a["origin"] < when).to_numpy()
    assert before.sum() > 0 and (~before).sum() > 0
    assert set(a.loc[before, "model"]) == set(model_names(cfg))
    for col in ("y_pred", "pred_rms_train"):
        assert np.array_equal(a.loc[before, col].to_numpy(), b.loc[before, col].to_numpy(), equal_nan=True), col
    known = (a["date"] < when).to_numpy()
    assert np.array_equal(a.loc[known, "y_true"].to_numpy(), b.loc[known, "y_true"].to_numpy())
    assert not np.array_equal(a.loc[~known, "y_true"].to_numpy(), b.loc[~known, "y_true"].to_numpy())
    after = ~before
    for model in [*wf.lstms, "ridge", "hist_mean"]:
        m = after & (a["model"] == model).to_numpy()
        assert not np.array_equal(a.loc[m, "y_pred"].to_numpy(), b.loc[m, "y_pred"].to_numpy()), model
    naive = (a["model"] == "naive").to_numpy()
    assert (b.loc[naive, "y_pred"] == 0).all()
    # what each fold before D trained is identical too (training outcome, ridge's penalty)
    fa, fb = wf.folds, wf2.folds
    early = (fa["cutoff"] < when).to_numpy()
    for col in ("best_val_loss", "steps", "ridge_alpha", "samples_train"):
        assert np.array_equal(fa.loc[early, col].to_numpy(), fb.loc[early, col].to_numpy(), equal_nan=True), col


# ---------------------------------------------------------------------------------------------
# 2. The table
# ---------------------------------------------------------------------------------------------


def test_table_structure_targets_and_baselines(base):
    cfg, frames, wf, _, cuts, calendar = base
    t = wf.forecasts
    assert {"date", "ticker", "cutoff", "model", "y_true", "y_pred", "origin", "fold"} <= set(t.columns)
    assert wf.models == model_names(cfg) == ["lstm-none", "lstm-norm1.0", "ridge", "hist_mean", "naive"]
    assert wf.lstms == ["lstm-none", "lstm-norm1.0"]
    assert list(dict.fromkeys(t["model"])) == wf.models
    assert set(t["ticker"]) == {"BTC-USD", "ETH-USD"}
    assert 3 <= t["fold"].nunique() <= len(cuts) == 4
    assert pd.Timestamp(cuts[0]) == pd.Timestamp("2021-01-01")

    origin, date, cutoff = (pd.to_datetime(t[c]) for c in ("origin", "date", "cutoff"))
    assert ((cutoff <= origin) & (origin < date)).all()
    # fold k's cutoff is the k-th cutoff, and its origins lie in [cutoff, next cutoff)
    bounds = [*cuts, np.datetime64("2262-01-01", "ns")]
    for k, rows in t.groupby("fold"):
        assert (pd.to_datetime(rows["cutoff"]) == pd.Timestamp(cuts[k - 1])).all()
        o = pd.to_datetime(rows["origin"])
        assert (o >= pd.Timestamp(bounds[k - 1])).all() and (o < pd.Timestamp(bounds[k])).all()
    # one row per (date, ticker, model); every model has the same (date, ticker, origin) rows
    assert not t.duplicated(["date", "ticker", "model"]).any()
    keys = {m: set(map(tuple, g[["date", "ticker", "origin", "fold"]].to_numpy().tolist()))
            for m, g in t.groupby("model")}
    assert len({frozenset(v) for v in keys.values()}) == 1
    # every valid origin from the first cutoff on is forecast once per model, up to the last fold in the table
    last = max(keys["naive"], key=lambda r: r[2])[2]
    for ticker, df in frames.items():
        idx = df.index
        expect = idx[(idx >= pd.Timestamp(cuts[0])) & (idx <= last) & (idx < idx[-1])]
        got = pd.DatetimeIndex(sorted(o for _, tk, o, _ in keys["naive"] if tk == ticker))
        assert got.equals(pd.DatetimeIndex(expect, name=None).rename(None)), ticker

    # y_true: the log return of adj_close from origin to date (horizon 1: the next bar)
    for ticker, rows in t.groupby("ticker"):
        px = frames[ticker]["adj_close"]
        nxt = pd.Series(px.index[1:], index=px.index[:-1])
        o, d = pd.DatetimeIndex(rows["origin"]), pd.DatetimeIndex(rows["date"])
        assert (nxt.reindex(o).to_numpy() == d.to_numpy()).all()
        expect = np.log(px.reindex(d).to_numpy() / px.reindex(o).to_numpy())
        np.testing.assert_allclose(rows["y_true"].to_numpy(), expect, rtol=1e-12, atol=1e-15)

    assert (t.loc[t["model"] == "naive", "y_pred"] == 0).all()
    assert t.loc[t["model"] != "naive", "y_pred"].notna().all()

    # hist_mean: constant per (fold, ticker); equal to the mean of every target known at the cutoff, recomputed
    # here from the prices (expanding window: origins from the first complete input window, dates <= cutoff)
    hm = t[t["model"] == "hist_mean"]
    assert (hm.groupby(["fold", "ticker"])["y_pred"].nunique() == 1).all()
    first_origin = FIRST_FEATURE_BAR + LOOKBACK - 1
    folds = wf.folds.set_index(["fold", "model"])
    for (k, ticker), rows in hm.groupby(["fold", "ticker"]):
        df = frames[ticker]
        logp = np.log(df["adj_close"].to_numpy())
        c = pd.Timestamp(cuts[k - 1])
        origins = [i for i in range(first_origin, len(df) - 1) if df.index[i + 1] <= c]
        assert df.index[origins[0]] == pd.Timestamp(calendar[0]) == pd.Timestamp("2020-02-04")
        y = np.array([logp[i + 1] - logp[i] for i in origins])
        assert rows["y_pred"].iloc[0] == pytest.approx(y.mean(), rel=1e-12, abs=1e-16), (k, ticker)
        # the folds table: training samples of both tickers, first origin
        n = sum(sum(1 for i in range(first_origin, len(f) - 1) if f.index[i + 1] <= c) for f in frames.values())
        assert folds.loc[(k, "hist_mean"), "samples_train"] == n
        assert folds.loc[(k, "hist_mean"), "train_start"] == pd.Timestamp("2020-02-04")


def test_folds_table(base):
    _, _, wf, _, cuts, _ = base
    f = wf.folds
    assert set(f["model"]) == set(wf.models)
    assert (f.groupby("fold")["model"].apply(list) == pd.Series({k: wf.models for k in f["fold"].unique()})).all()
    lstm = f[f["model"].isin(wf.lstms)]
    assert (lstm["epochs"] == 2).all() and lstm["usable"].all() and not lstm["diverged"].any()
    ridge = f[f["model"] == "ridge"]
    assert set(ridge["ridge_alpha"]) <= set(wfm.RIDGE_ALPHAS)
    assert np.isfinite(f["test_rmse"]).all()
    naive = f[f["model"] == "naive"]
    assert (naive["test_rmse_vs_naive_pct"] == 0).all()
    # the per-fold test RMSE agrees with the table
    t = wf.forecasts
    for r in f.itertuples():
        rows = t[(t["fold"] == r.fold) & (t["model"] == r.model)]
        rmse = np.sqrt(np.mean((rows["y_pred"].fillna(0) - rows["y_true"]) ** 2))
        assert r.test_rmse == pytest.approx(rmse, rel=1e-9)
        assert r.samples_test == len(rows)


def test_the_last_cutoff_forecasts_to_the_end_of_the_data(base):
    _, frames, wf, _, cuts, _ = base
    t = wf.forecasts
    assert t["fold"].nunique() == len(cuts)
    last = t[t["fold"] == len(cuts)]
    assert pd.to_datetime(last["cutoff"]).eq(pd.Timestamp(cuts[-1])).all()
    for ticker, df in frames.items():
        assert pd.Timestamp(t.loc[t["ticker"] == ticker, "date"].max()) == df.index[-1]


# ---------------------------------------------------------------------------------------------
# 3. What each fold's LSTMs train on
# ---------------------------------------------------------------------------------------------


def test_lstm_training_data_end_at_the_cutoff(base):
    _, _, wf, calls, _, calendar = base
    rows = _lstm_fold_rows(wf)
    assert len(calls) == len(rows) >= 2 * 3
    assert [c.clip for c in calls[:2]] == ["none", "norm"]
    for call, row in zip(calls, rows.itertuples()):
        cutoff = np.datetime64(row.cutoff, "ns")
        assert call.train_date.max() < call.val_date.min()  # early stopping on later targets
        assert max(call.train_date.max(), call.val_date.max()) <= cutoff
        assert call.val_date.max() == cutoff  # the last target known at the cutoff is used
        assert call.train_origin.max() < cutoff and call.val_origin.max() < cutoff
        # expanding: every fold trains from the first sample on
        assert call.train_origin.min() == calendar[0]
        assert len(call.train_date) + len(call.val_date) == row.samples_train


def test_rolling_window_trains_on_the_last_bars_only(monkeypatch):
    cfg = _cfg("backtest.window=60")
    frames = load_prices(cfg.data).frames
    wf, calls = _run(cfg, frames, monkeypatch)
    _, calendar = wfm.cutoffs(wfm.panels(frames, cfg), cfg)
    rows = _lstm_fold_rows(wf)
    assert len(calls) == len(rows) >= 2 * 3
    for call, row in zip(calls, rows.itertuples()):
        cutoff = np.datetime64(row.cutoff, "ns")
        origins = np.concatenate([call.train_origin, call.val_origin])
        dates = np.concatenate([call.train_date, call.val_date])
        assert dates.max() <= cutoff and call.train_date.max() < call.val_date.min()
        span = calendar[(calendar >= origins.min()) & (calendar <= cutoff)]
        assert len(span) <= 60, (row.fold, len(span))
        assert len(span) >= 55  # the window is used, not something much shorter
        assert origins.min() > calendar[0]
        assert pd.Timestamp(origins.min()) == row.train_start
    # ridge and the historical mean use the same window: hist_mean is the mean of the window's targets
    t = wf.forecasts
    hm = t[t["model"] == "hist_mean"]
    for (k, ticker), g in hm.groupby(["fold", "ticker"]):
        c = pd.Timestamp(g["cutoff"].iloc[0])
        start = rows.loc[rows["fold"] == k, "train_start"].iloc[0]
        px = np.log(frames[ticker]["adj_close"])
        y = (px.shift(-1) - px)[(px.index >= start) & (px.index < c)]
        assert g["y_pred"].iloc[0] == pytest.approx(y.mean(), rel=1e-12, abs=1e-16)


def test_refit_full_retrains_on_everything_up_to_the_cutoff(monkeypatch):
    """With backtest.refit_full each LSTM is fit twice per fold: early-stopped on the inner validation, then
    retrained on training + validation (all targets known at the cutoff) for the best epoch count. The refit
    adds no look-ahead: forecasts before a date still ignore every price after it."""
    cfg = _cfg("backtest.refit_full=true")
    frames = load_prices(cfg.data).frames
    wf, calls = _run(cfg, frames, monkeypatch)
    rows = _lstm_fold_rows(wf)
    assert len(calls) == 2 * len(rows) >= 2 * 2 * 3
    for first, second, row in zip(calls[::2], calls[1::2], rows.itertuples()):
        cutoff = np.datetime64(row.cutoff, "ns")
        both = np.sort(np.concatenate([first.train_date, first.val_date]))
        np.testing.assert_array_equal(np.sort(second.train_date), both)
        assert second.train_date.max() == cutoff
        assert 1 <= second.epochs <= first.epochs
        assert row.refit == f"{second.epochs} epochs"
    cuts, _ = wfm.cutoffs(wfm.panels(frames, cfg), cfg)
    when = pd.Timestamp(cuts[1]) + pd.Timedelta(days=15)
    wf2, _ = _run(cfg, _perturb_after(frames, when), monkeypatch)
    before = (wf.forecasts["origin"] < when).to_numpy()
    np.testing.assert_array_equal(wf.forecasts.loc[before, "y_pred"].to_numpy(),
                                  wf2.forecasts.loc[before, "y_pred"].to_numpy())
    after = ~before & wf.forecasts["model"].str.startswith("lstm-").to_numpy()
    assert not np.allclose(wf.forecasts.loc[after, "y_pred"], wf2.forecasts.loc[after, "y_pred"])


def test_folds_stacked_forecast_as_folds_one_at_a_time(base, monkeypatch):
    """Every fold's LSTMs and refits in one stack (expanding window: each fold its own number of samples, so the
    runs' epochs differ in steps) give each fold's forecasts and training outcome of the folds fit one at a time,
    to float tolerance; each fit still trains on its own fold's dates."""
    cfg, frames, wf, calls, _, _ = base
    cfg = dataclasses.replace(cfg, backtest=dataclasses.replace(cfg.backtest, refit_full=True))
    one, one_calls = _run(cfg, frames, monkeypatch, stack=1)
    stacked, stacked_calls = _run(cfg, frames, monkeypatch, stack=100)
    assert len({len(c.train_date) for c in stacked_calls}) > 2  # folds of different lengths in one stack
    for a, b in zip(one_calls, stacked_calls):
        np.testing.assert_array_equal(a.train_date, b.train_date)
        np.testing.assert_array_equal(a.val_date, b.val_date)
    pd.testing.assert_frame_equal(one.forecasts, stacked.forecasts, check_exact=False, rtol=1e-4, atol=1e-7)
    cols = ["fold", "model", "steps", "epochs", "stop_reason", "refit", "diverged", "usable"]
    pd.testing.assert_frame_equal(one.folds[cols], stacked.folds[cols])


def test_a_ticker_joins_the_folds_once_it_has_enough_training_data():
    """A ticker whose history starts later sits out the folds in which it has fewer than MIN_TRAIN training
    samples, instead of entering the pooled model with a handful (and a scale and mean from three returns)."""
    cfg = _cfg()
    frames = dict(load_prices(cfg.data).frames)
    late = frames["ETH-USD"]
    frames["ETH-USD"] = late[late.index >= pd.Timestamp("2020-11-20")]  # ~40 complete samples by 2021-02-10
    panel = wfm.panels(frames, cfg)
    cuts, _ = wfm.cutoffs(panel, cfg)
    first = wfm._fold_split(panel["ETH-USD"], cuts[0], cuts[1], None, cfg, None)
    assert first is None  # 2021-01-01: too few samples
    wf = walk_forward(frames, cfg, fit_lstm=backtest_run.lstm_fitter(cfg, CPU))
    eth = wf.forecasts[wf.forecasts["ticker"] == "ETH-USD"]
    assert eth["fold"].min() > 1 and len(eth) > 0
    for k in eth["fold"].unique():
        d = wfm._fold_split(panel["ETH-USD"], cuts[k - 1], cuts[k] if k < len(cuts) else None, None, cfg, None)
        assert d is not None and len(d.train) >= wfm.MIN_TRAIN


# ---------------------------------------------------------------------------------------------
# 4. Warm starts
# ---------------------------------------------------------------------------------------------


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _fresh(cfg, n_features: int) -> dict[str, torch.Tensor]:
    seed_everything(cfg.train.seed)
    return _state(build_model(cfg.model, n_features))


def test_warm_start_continues_from_the_previous_folds_weights(monkeypatch):
    cfg = _cfg("backtest.warm_start=true", "backtest.warm_epochs=1")
    frames = load_prices(cfg.data).frames
    wf, calls = _run(cfg, frames, monkeypatch)
    rows = _lstm_fold_rows(wf)
    fresh = _fresh(cfg, len(feature_names(cfg.features)))
    by = {}
    for call, row in zip(calls, rows.itertuples()):
        by[(row.fold, row.model)] = call
    folds = sorted(rows["fold"].unique())
    assert len(folds) >= 3
    for name in wf.lstms:
        first = by[(folds[0], name)]
        assert _equal(first.initial, fresh) and first.epochs == 2
        for prev, k in zip(folds, folds[1:]):
            call = by[(k, name)]
            assert _equal(call.initial, by[(prev, name)].final), (name, k)
            assert not _equal(call.initial, fresh)
            assert call.epochs == 1  # backtest.warm_epochs after the first fold
    assert (wf.folds.loc[wf.folds["model"].isin(wf.lstms) & (wf.folds["fold"] > folds[0]), "epochs"] == 1).all()


def test_without_warm_start_every_fold_starts_from_a_fresh_seeded_init(base):
    cfg, frames, wf, calls, _, _ = base
    fresh = _fresh(cfg, len(feature_names(cfg.features)))
    for call in calls:
        assert _equal(call.initial, fresh)
        assert call.epochs == 2
    # and the fits moved the weights
    assert not _equal(calls[0].final, fresh)


# ---------------------------------------------------------------------------------------------
# 5. Errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("start", ["2020-02-15", "2020-02-20"])
def test_a_start_with_too_little_training_data_is_refused(start):
    cfg = _cfg(f"backtest.start={start}", "data.end=2020-06-30")
    frames = load_prices(cfg.data).frames
    with pytest.raises(BacktestError, match=r"backtest\.start") as exc:
        walk_forward(frames, cfg, fit_lstm=backtest_run.lstm_fitter(cfg, CPU))
    assert "training" in str(exc.value) and start in str(exc.value)


@pytest.mark.parametrize("start", ["2022-01-01", "2021-05-31"])
def test_a_start_after_the_data_is_refused(start):
    """2021-05-31 is the last bar: no target after it, so nothing to forecast either."""
    cfg = _cfg(f"backtest.start={start}")
    frames = load_prices(cfg.data).frames
    with pytest.raises(BacktestError, match=rf"backtest\.start = {start}.*nothing to forecast"):
        walk_forward(frames, cfg, fit_lstm=backtest_run.lstm_fitter(cfg, CPU))


def test_a_start_before_any_training_data_is_refused():
    cfg = _cfg("backtest.start=2020-01-01", "data.end=2020-06-30")
    frames = load_prices(cfg.data).frames
    with pytest.raises(BacktestError, match=r"backtest\.start"):
        walk_forward(frames, cfg, fit_lstm=backtest_run.lstm_fitter(cfg, CPU))


def test_a_bad_window_is_refused_by_the_config():
    with pytest.raises(config_mod.ConfigError, match=r"backtest\.window"):
        _cfg("backtest.window=rolling")


# ---------------------------------------------------------------------------------------------
# 6. `fincast backtest` end to end
# ---------------------------------------------------------------------------------------------

CLI = ("data.source=synthetic", "data.start=2018-01-01", "data.end=2020-12-31", "features.lookback=5",
       "model.hidden_size=4", "train.epochs=2", "train.batch_size=64", "train.warmup_steps=5", "train.device=cpu",
       "backtest.start=2020-06-01", "backtest.refit_every=60")


@pytest.mark.slow  # three backtests (~8 s)
def test_a_killed_backtest_resumes_from_its_finished_folds(tmp_path, monkeypatch):
    """Killed while fitting fold 3 (one fold a stack), the same backtest run again (its folds stacked as they
    like: stack_folds and workers do not change what a fold computes) refits folds 3 and 4 only (1 and 2 are
    taken from their files), in one stack, and ends with the forecasts of an uninterrupted backtest trained in
    two worker processes; the files are gone afterwards."""
    store = (f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", f"tracking.artifact_dir={tmp_path / 'art'}",
             f"train.checkpoint_dir={tmp_path / 'ck'}", "tracking.log_model=false")
    cfg = _cfg(*store)
    real, stacks = backtest_run.train_runs, []

    def killed_at(n):
        def counting(models, *a, **kw):
            stacks.append(len(models))
            if len(stacks) == n:
                raise KeyboardInterrupt
            return real(models, *a, **kw)
        return counting

    monkeypatch.setattr(backtest_run, "train_runs", killed_at(3))  # one stack a fold: the 3rd is fold 3's
    with pytest.raises(KeyboardInterrupt):
        backtest_run.backtest(_cfg(*store, "backtest.stack_folds=1"), out_dir=tmp_path / "r1")
    assert len(list((tmp_path / "ck" / "backtest").glob("*/fold-*.pt"))) == 2
    stacks.clear()
    monkeypatch.setattr(backtest_run, "train_runs", killed_at(0))
    resumed = backtest_run.backtest(_cfg(*store, "backtest.workers=1"), out_dir=tmp_path / "r2")
    assert stacks == [4] and resumed.folds == 4  # folds 3 and 4, two LSTMs each, in one stack
    assert not list((tmp_path / "ck" / "backtest").glob("*/fold-*.pt"))
    from fincast import tracking

    tags = tracking.get_run(resumed.run_id, cfg.tracking).data.tags
    assert tags["fincast.resumed_folds"] == "2" and tags["fincast.workers"] == "1"
    # uninterrupted, its stacks in two worker processes (one thread each): 4 folds in 2 stacks
    straight = backtest_run.backtest(_cfg(*store, "backtest.resume=false", "backtest.workers=2", "train.threads=1"),
                                     out_dir=tmp_path / "r3")
    tags = tracking.get_run(straight.run_id, cfg.tracking).data.tags
    assert straight.folds == 4 and tags["fincast.workers"] == "2" and tags["fincast.threads"] == "1"
    a, b = (pd.read_csv(tmp_path / r / "backtest" / cfg.name / "forecasts.csv") for r in ("r2", "r3"))
    # (folds 1 and 2 one at a time in r2, stacked together in r3's first worker)
    pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-4, atol=1e-7)


def test_backtest_cli_end_to_end(tmp_path, capsys):
    from fincast import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    store = [f"tracking.uri={uri}", f"tracking.artifact_dir={tmp_path / 'art'}"]
    reports = tmp_path / "reports"
    code = cli.main(["backtest", str(SPEC), "--quiet", "--out", str(reports),
                     *[f"--set={o}" for o in (*CLI, *store, "backtest.seeds=2")]])
    out = capsys.readouterr()
    assert code == 0, out.err
    first = out.out.strip().splitlines()[0]
    assert first.startswith("backtest run "), out.out
    run_id = first.split()[2]

    folder = reports / "backtest" / "backtest_crypto"
    for f in ("index.html", "stats.csv", "forecasts.csv", "folds.csv", "daily.csv", "training.csv",
              "equity_BTC-USD.png", "sharpe_BTC-USD.png", "scatter_BTC-USD.png", "folds_BTC-USD.png"):
        assert (folder / f).is_file() and (folder / f).stat().st_size > 0, f
    for png in folder.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    models = ["lstm-none", "lstm-norm1.0", "ridge", "hist_mean", "naive"]  # the LSTMs: medians of 2 seeds
    seeded = ["lstm-none/seed0", "lstm-none/seed1", "lstm-norm1.0/seed0", "lstm-norm1.0/seed1"]
    stats = pd.read_csv(folder / "stats.csv")
    assert sorted(stats["model"]) == sorted([*models, *seeded, "buy_and_hold"])
    assert (stats["ticker"] == "BTC-USD").all()
    by_model = stats.set_index("model")
    for fam in ("lstm-none", "lstm-norm1.0"):  # median across seeds, range beside it
        two = by_model.loc[[f"{fam}/seed0", f"{fam}/seed1"], "Sharpe Ratio"]
        assert by_model.loc[fam, "Sharpe Ratio"] == pytest.approx(two.mean())
        assert (by_model.loc[fam, "Sharpe Ratio min"], by_model.loc[fam, "Sharpe Ratio max"]) == \
            pytest.approx((two.min(), two.max()))
        assert by_model.loc[fam, "Seeds"] == 2
    assert {"Sharpe CI low", "Sharpe CI high", "CAGR [%] CI low", "Max. Drawdown [%] CI high",
            "Edge p (reality check)", "Best 10 Days Share [%]", "Always-Long Accuracy [%]"} <= set(stats.columns)
    assert (stats["Sharpe CI low"] <= stats["Sharpe Ratio"]).all() or stats["Sharpe CI low"].isna().any()
    forecasts = pd.read_csv(folder / "forecasts.csv")
    assert list(dict.fromkeys(forecasts["model"])) == [*seeded, "ridge", "hist_mean", "naive"]
    # the seeds train differently (initial weights and shuffling)
    f0, f1 = (forecasts[forecasts["model"] == f"lstm-none/seed{k}"]["y_pred"].to_numpy() for k in (0, 1))
    assert not np.allclose(f0, f1)
    assert "no evidence of an edge over buy-and-hold" in out.out or "evidence of an edge" in out.out
    folds = pd.read_csv(folder / "folds.csv")
    n_folds = folds["fold"].nunique()
    assert n_folds >= 3 and sorted(folds["fold"].unique()) == list(range(1, n_folds + 1))
    assert f"{n_folds} folds, {len(forecasts)} forecasts" in out.out

    # the printed summary holds the stats table: a header, then one row per model and buy and hold; the model
    # names left-aligned, every other column right-aligned under its header (empty where undefined)
    lines = out.out.splitlines()
    head = next(i for i, line in enumerate(lines) if line.split()[:1] == ["BTC-USD"])
    ends = [m.end() for m in re.finditer(r"\S+(?: \S+)*", lines[head])]  # header labels may hold one space

    def cells(line: str) -> list[str]:
        tokens = {m.end(): m.group() for m in re.finditer(r"\S+", line)}
        return [line.split()[0]] + [tokens.get(e, "") for e in ends[1:]]

    header = [lines[head].split()[0]] + [lines[head][:e].rsplit("  ", 1)[-1].strip() for e in ends[1:]]
    assert header[1:] == ["vs naive", "dir.acc", "R2 OOS", "DM p", "return", "CAGR", "Sharpe", "max DD", "turnover"]
    body = [cells(line) for line in lines[head + 1:head + 2 + len(models)]]
    assert [r[0] for r in body] == [*models, "buy_and_hold"]
    for r in body:
        sharpe = by_model.loc[r[0], "Sharpe Ratio"]
        assert r[header.index("Sharpe")] == ("" if np.isnan(sharpe) else f"{sharpe:.2f}"), r
        assert r[header.index("max DD")] == f"{by_model.loc[r[0], 'Max. Drawdown [%]']:.1f}%", r
    assert str(folder / "index.html") in out.out

    cfg_t = TrackingConfig(uri=uri)
    run = tracking.get_run(run_id, cfg_t)
    assert run.info.status == "FINISHED"
    assert run.data.tags["fincast.kind"] == "backtest"
    assert run.data.tags["fincast.models"] == ",".join([*seeded, "ridge", "hist_mean", "naive"])
    assert run.data.tags["fincast.data_source"] == "synthetic"
    assert run.data.params["backtest.refit_every"] == "60"
    arts = set(tracking.list_artifacts(run_id, cfg_t, "backtest"))
    for f in ("index.html", "stats.csv", "forecasts.csv", "folds.csv", "equity_BTC-USD.png"):
        assert f"backtest/{f}" in arts, (f, arts)
    assert "config.yaml" in set(tracking.list_artifacts(run_id, cfg_t))
    for m in [*seeded, "ridge", "hist_mean", "naive"]:
        for key in ("test_rmse", "test_rmse_vs_naive_pct"):
            hist = tracking.metric_history(run_id, f"fold/{m}/{key}", cfg_t)
            assert [s for s, _ in hist] == list(range(1, n_folds + 1)), (m, key, hist)
    rmse = tracking.metric_history(run_id, "fold/lstm-none/seed1/test_rmse", cfg_t)
    expect = folds[folds["model"] == "lstm-none/seed1"].sort_values("fold")["test_rmse"].to_numpy()
    np.testing.assert_allclose([v for _, v in rmse], expect, rtol=1e-6)
    steps = tracking.metric_history(run_id, "fold/lstm-none/seed0/steps", cfg_t)
    assert [s for s, _ in steps] == list(range(1, n_folds + 1))
    metrics = run.data.metrics
    for m in models:
        assert f"{m}/rmse_vs_naive_pct" in metrics and f"{m}/total_return_pct" in metrics
        # naive never takes a position (sign of zero): its Sharpe ratio is undefined, so not logged
        assert (f"{m}/sharpe_ratio" in metrics) == (m != "naive"), m
    assert "buy_and_hold/sharpe_ratio" in metrics and "buy_and_hold/max_drawdown_pct" in metrics
    row = stats.set_index("model").loc["lstm-none"]
    assert metrics["lstm-none/sharpe_ratio"] == pytest.approx(row["Sharpe Ratio"], rel=1e-9)
    assert metrics["naive/rmse_vs_naive_pct"] == 0

    html = (folder / "index.html").read_text()
    assert run_id in html and html.count("data:image/png;base64,") == 4
    assert html.index("id='verdict'") < html.index("<h3>Forecasts</h3>")
    assert "Cost sensitivity" in html and "Each training seed" in html

    from browser import check_page, find_chromium

    if find_chromium() is None:
        pytest.skip("Chromium not installed: the report was not opened in a browser")
    page = check_page(folder / "index.html")
    assert page.images == 4 and page.images_loaded == page.images, page.broken_images
    assert page.broken_images == [] and page.console_errors == []
    assert page.verdict_first, (page.headings, page.verdict_top)


# ---------------------------------------------------------------------------------------------
# 7. Help
# ---------------------------------------------------------------------------------------------


def test_backtest_help_names_the_keys_and_gives_examples(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["backtest", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "backtest.window" in text and "refit_every" in text
    assert "examples:" in text and re.search(r"fincast backtest pipelines/\S+\.yaml", text)
