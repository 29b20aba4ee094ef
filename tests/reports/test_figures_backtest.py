"""Backtest-report figures: each writes a readable PNG for normal and awkward input and closes its figure."""

import matplotlib.image as mpimg
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from fincast.reports.figures import backtest as plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Awkward input must be handled, not just survived: no numpy RuntimeWarnings, no matplotlib UserWarnings.
pytestmark = [pytest.mark.filterwarnings("error::RuntimeWarning"), pytest.mark.filterwarnings("error::UserWarning")]
DATES = pd.bdate_range("2020-01-01", periods=300)


def assert_png(path):
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert not list(path.parent.glob(f".{path.name}.*"))  # no temp file left behind
    return img


@pytest.fixture(autouse=True)
def figures_closed():
    before = set(plt.get_fignums())
    yield
    assert set(plt.get_fignums()) == before


@pytest.fixture
def captured(monkeypatch):
    """The figures passed to save_figure (still written, and closed), for checks on their content."""
    figs, save = [], plots.save_figure
    monkeypatch.setattr(plots, "save_figure", lambda fig, path: (figs.append(fig), save(fig, path))[1])
    return figs


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def test_model_colors_distinct_and_stable():
    names = ["buy_and_hold", "naive", "hist_mean", "ridge", "lstm-none", "lstm-norm1.0", "lstm-none", "other"]
    styles = plots._model_colors(names)
    assert list(styles) == names[:6] + ["other"]
    assert styles["buy_and_hold"]["ls"] == "--" and styles["buy_and_hold"]["color"] == "k"
    assert (styles["lstm-none"]["color"], styles["lstm-norm1.0"]["color"]) == ("C0", "C1")
    assert styles["other"]["color"] == "C9" and styles["ridge"]["color"] == "tab:purple"
    lstm = plots._model_colors([f"lstm-{i}" for i in range(5)])
    assert [s["color"] for s in lstm.values()] == ["C0", "C1", "C2", "C3", "C5"]  # C4 would clash with ridge


def test_rolling_sharpe_values():
    r = pd.Series([0.01, -0.02, 0.03, 0.0, 0.01], index=DATES[:5])
    got = plots._rolling_sharpe(r, window=3, periods=252)
    w = r.to_numpy()[2:5]
    assert got.iloc[:2].isna().all()
    assert got.iloc[-1] == pytest.approx(w.mean() / w.std(ddof=1) * np.sqrt(252))
    assert plots._rolling_sharpe(pd.Series(np.zeros(10)), window=3, periods=252).isna().all()  # nan, not inf


def test_equity_drawdown(tmp_path, rng, captured):
    r = pd.Series(rng.normal(3e-4, 0.01, DATES.size), index=DATES)
    broke = pd.Series(np.linspace(1.0, -0.5, DATES.size), index=DATES)  # through 0 into negative
    broke.iloc[10], broke.iloc[20] = np.nan, np.inf
    equity = {"buy_and_hold": (1 + r).cumprod(), "lstm-none": (1 + r / 2).cumprod(), "lstm-broke": broke}
    out = plots.equity_drawdown(tmp_path / "eq.png", equity, title="t")
    assert out == tmp_path / "eq.png"
    assert_png(out)
    assert captured[0].axes[0].get_yscale() == "log"
    assert_png(plots.equity_drawdown(tmp_path / "empty.png", {}, title="t"))


def test_rolling_sharpe_flat_series(tmp_path, rng):
    returns = {"buy_and_hold": pd.Series(rng.normal(3e-4, 0.01, DATES.size), index=DATES),
               "naive": pd.Series(0.0, index=DATES)}  # flat: never in the market
    assert_png(plots.rolling_sharpe(tmp_path / "rs.png", returns, window=63, periods=252, title="t"))


def test_forecast_scatter_awkward(tmp_path, rng, captured):
    y = rng.normal(0, 0.01, 1050)
    big_x = rng.normal(0, 0.001, 10_000)
    pairs = {
        "lstm-none": (0.1 * y + rng.normal(0, 0.01, y.size), y),
        "lstm-norm1.0": (np.full(y.size, np.nan), y),  # all nan
        "naive": (np.zeros(y.size), y),  # zero variance
        "ridge": (big_x, big_x + rng.normal(0, 0.01, big_x.size)),  # thinned
        "hist_mean": (np.r_[y[:-1], 5.0], np.r_[y[:-1], np.nan]),  # outlier forecast paired with nan
    }
    assert_png(plots.forecast_scatter(tmp_path / "fs.png", pairs, title="t", max_points=4000))
    axes = {ax.get_title().split()[0]: ax for ax in captured[0].axes if ax.get_title()}
    assert "corr" in axes["lstm-none"].get_title() and "n=1050" in axes["lstm-none"].get_title()
    assert "n=1049" in axes["hist_mean"].get_title()
    assert "n=0" in axes["lstm-norm1.0"].get_title() and "corr" not in axes["naive"].get_title()
    assert any("no variance" in t.get_text() for t in axes["naive"].texts)
    assert len(axes["ridge"].collections[0].get_offsets()) <= 4000
    assert_png(plots.forecast_scatter(tmp_path / "one.png", {"naive": (np.zeros(5), np.ones(5))}, title="t"))


def test_fold_errors_skips_naive_and_all_nan(tmp_path, captured):
    cutoffs = pd.DatetimeIndex(["2021-01-01", "2021-07-01", "2022-01-01", "2022-07-01"])
    table = pd.DataFrame({"naive": 0.0, "ridge": [-1.0, 0.5, np.nan, 2.0], "lstm-none": np.nan,
                          "lstm-norm1.0": [3.0, -2.0, 1.0, 0.0]}, index=cutoffs)
    assert_png(plots.fold_errors(tmp_path / "fe.png", table, title="t"))
    assert [t.get_text() for t in captured[0].legends[0].get_texts()] == ["ridge", "lstm-norm1.0"]
    assert_png(plots.fold_errors(tmp_path / "nan.png", table[["naive", "lstm-none"]], title="t", ylabel="y"))


def test_fold_errors_turn_symlog_when_a_fold_explodes(tmp_path, monkeypatch):
    seen = {}
    real = plots.save_figure

    def capture(fig, path):
        seen["scales"] = [ax.get_yscale() for ax in fig.axes]
        return real(fig, path)

    monkeypatch.setattr(plots, "save_figure", capture)
    idx = pd.date_range("2020-01-01", periods=4, freq="MS")
    plots.fold_errors(tmp_path / "a.png", pd.DataFrame({"lstm-none": [1.0, -2.0, 3.0, 0.5]}, index=idx), title="t")
    assert seen["scales"][0] == "linear"
    plots.fold_errors(tmp_path / "b.png", pd.DataFrame({"lstm-none": [1.0, 25000.0, 3.0, 0.5]}, index=idx), title="t")
    assert seen["scales"][0] == "symlog"
    assert plt.get_fignums() == []


@pytest.mark.parametrize("high", [1.3, 2.5, 12.0, 300.0])
def test_equity_log_axis_labels_are_plain_numbers_at_several_ticks(tmp_path, captured, high):
    """matplotlib's default log axis labels a 0.9-1.3 range at one tick (as 10^0); a reader needs several."""
    equity = {"buy_and_hold": pd.Series(np.geomspace(0.9, high, DATES.size), index=DATES)}
    plots.equity_drawdown(tmp_path / "eq.png", equity, title="t")
    ax = captured[0].axes[0]
    captured[0].canvas.draw()
    lo, hi = ax.get_ylim()
    shown = [(t.get_position()[1], t.get_text()) for t in ax.get_yticklabels() + ax.yaxis.get_minorticklabels()
             if t.get_text() and lo <= t.get_position()[1] <= hi]
    assert 4 <= len(shown) <= 9
    for value, text in shown:
        assert float(text) == pytest.approx(value)  # "1.1", "20": no math text, no exponent
