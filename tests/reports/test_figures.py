"""Stability-report figures: each writes a readable, non-blank PNG for normal and awkward input, and draws what
it should (panels, titles, one line or box per config, the annotated cells)."""

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest

from fincast.reports.figures import stability as plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Awkward input must be handled, not just survived: no numpy RuntimeWarnings, no matplotlib UserWarnings.
pytestmark = [pytest.mark.filterwarnings("error::RuntimeWarning"), pytest.mark.filterwarnings("error::UserWarning")]


def assert_png(path):
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 0 and img.shape[1] > 0
    assert float(img[..., :3].std()) > 0.01  # not a blank canvas
    assert not list(path.parent.glob(f".{path.name}.*"))  # no temp file left behind
    return path


@pytest.fixture
def drawn(monkeypatch):
    """The figures the stability module saves (still written and closed), to check what they hold."""
    figs, save = [], plots.save_figure
    monkeypatch.setattr(plots, "save_figure", lambda fig, path: (figs.append(fig), save(fig, path))[1])
    return figs


def _panels(fig):
    """The data panels (colour bars are axes too: left out)."""
    return [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]


def _runs(rng, seeds=3, steps=200, diverge_at=None):
    a = np.exp(-np.linspace(0, 3, steps)) * rng.uniform(0.8, 1.2, (seeds, steps))
    if diverge_at is not None:
        a[:, diverge_at] = np.inf
        a[:, diverge_at + 1:] = np.nan
    return a


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def test_colors_control_dark_and_stable_order():
    colors = plots._config_colors(["fixed_1", "none", "adaptive", "fixed_1"])
    assert list(colors) == ["fixed_1", "none", "adaptive"]
    assert colors["none"] == "0.15"
    assert colors["fixed_1"] != colors["adaptive"]


def test_band_curves_normal(tmp_path, rng, drawn):
    curves = {lr: {"none": _runs(rng), "fixed_1": _runs(rng)} for lr in ("lr=1e-2", "lr=1e-3")}
    thr = {lr: {"none": None, "fixed_1": np.linspace(0.5, 1.0, 200)} for lr in curves}
    out = plots.band_curves(tmp_path / "bands.png", curves, ylabel="loss", title="t", thresholds=thr)
    assert out == tmp_path / "bands.png"
    assert_png(out)
    (fig,) = drawn
    panels = _panels(fig)
    assert [ax.get_title() for ax in panels] == ["lr=1e-2", "lr=1e-3"]  # one panel per learning rate
    assert panels[0].get_ylabel() == "loss"
    for ax in panels:  # a median line per config (and the threshold of the clipped one), a band per config
        assert len(ax.get_lines()) >= 2 and len(ax.collections) >= 2
    labels = {t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()}
    labels |= {t.get_text() for legend in fig.legends for t in legend.get_texts()}
    assert {"none", "fixed_1"} <= {label.split(" ")[0] for label in labels}


def test_band_curves_awkward(tmp_path, rng):
    early = _runs(rng, diverge_at=50)
    mixed = _runs(rng, seeds=4)
    mixed[0, 10:] = np.nan  # stopped early
    mixed[1, 20] = np.inf
    mixed[2, 30] = -np.inf
    mixed[3, 40] = 0.0  # not drawable on a log axis
    curves = {
        "lr=1e-1": {"none": np.full((3, 100), np.nan), "fixed_1": early},  # all runs diverged at once
        "lr=1e-2": {"none": _runs(rng, seeds=1)[0], "fixed_1": mixed},  # single seed as a 1-D array
        "lr=1e-3": {},
    }
    thr = {"lr=1e-1": {"fixed_1": np.full(100, np.nan)}, "lr=1e-2": {"fixed_1": np.array([1.0, np.inf, -1.0])}}
    for log in (True, False):
        assert_png(plots.band_curves(tmp_path / f"awk_{log}.png", curves, ylabel="y", title="t", log=log,
                                     thresholds=thr))
    assert_png(plots.band_curves(tmp_path / "empty.png", {}, ylabel="y", title="t"))


def test_band_curves_panels_own_axes_empty_hidden_partial_medians_dotted(tmp_path, rng, drawn):
    small, large = _runs(rng), 1000 * _runs(rng)
    stopped = _runs(rng)
    stopped[0, 120:] = np.nan  # one of three seeds stopped early: its median from step 121 covers two runs
    curves = {"lr=1e-3": {"none": small, "a": stopped}, "lr=1": {"none": large, "a": large},
              "lr=3": {"none": np.full((3, 50), np.nan)}}
    plots.band_curves(tmp_path / "own.png", curves, ylabel="y", title="t")
    (fig,) = drawn
    panels = _panels(fig)
    assert [ax.get_title() for ax in panels] == ["lr=1e-3", "lr=1"]  # lr=3 has nothing to draw
    assert "lr=3" in fig._suptitle.get_text()  # ... and the title says so
    hi1, lo2 = panels[0].get_ylim()[1], panels[1].get_ylim()[0]
    assert hi1 < 10 < lo2  # each panel spans its own values, not a shared range
    dotted = [line for line in panels[0].get_lines() if line.get_linestyle() == ":"]
    assert len(dotted) == 1
    x = np.asarray(dotted[0].get_xdata())[np.isfinite(np.asarray(dotted[0].get_ydata(), dtype=float))]
    assert x.min() == 120 and x.max() == 200  # joined at the last step all three reached
    labels = {t.get_text() for legend in fig.legends for t in legend.get_texts()}
    assert any("fewer runs" in label for label in labels)


def test_band_curves_of_long_runs_draw_every_panel(tmp_path, rng, drawn):
    """10,000-step runs (drawn thinned; how fast is bench/report_speed.py's business)."""
    curves = {f"lr={lr}": {cfg: _runs(rng, seeds=5, steps=10_000) for cfg in ("none", "a", "b", "c")}
              for lr in ("1e-2", "1e-3", "1e-4")}
    thr = {lr: {"a": np.linspace(1, 2, 10_000)} for lr in curves}
    assert_png(plots.band_curves(tmp_path / "long.png", curves, ylabel="y", title="t", thresholds=thr))
    panels = _panels(drawn[0])
    assert len(panels) == 3 and all(len(ax.get_lines()) >= 4 for ax in panels)
    assert max(len(line.get_xdata()) for ax in panels for line in ax.get_lines()) <= 10_000


def test_distributions_normal(tmp_path, rng, drawn):
    values = {"none": rng.lognormal(size=300), "fixed_1": rng.lognormal(-1, size=300)}
    out = plots.distributions(tmp_path / "dist.png", values, {"none": 3.2, "fixed_1": 0.5}, xlabel="x", title="t")
    assert_png(out)
    ax = _panels(drawn[0])[0]
    assert ax.get_xlabel() == "x"
    assert {t.get_text().split(" ")[0] for t in ax.get_yticklabels()} >= {"none", "fixed_1"}  # a row per config


def test_distributions_awkward(tmp_path, rng):
    values = {
        "none": np.array([np.nan, np.inf, -1.0, 0.0, 2.0, 5.0]),
        "diverged": np.full(4, np.nan),
        "empty": np.array([]),
        "single": np.array([1.5]),
    }
    assert_png(plots.distributions(tmp_path / "a.png", values, {}, xlabel="x", title="t"))
    assert_png(plots.distributions(tmp_path / "b.png", values, {"none": np.nan, "extra": 1.0}, xlabel="x",
                                   title="t", counts_label="c"))
    assert_png(plots.distributions(tmp_path / "c.png", {"x": np.full(3, np.nan)}, None, xlabel="x", title="t"))
    assert_png(plots.distributions(tmp_path / "d.png", {}, None, xlabel="x", title="t"))


def _table(values):
    return pd.DataFrame(values, index=["lr=1e-2", "lr=1e-3"], columns=["none", "fixed_1", "adaptive"])


def test_heatmap_normal_and_nan(tmp_path, drawn):
    t = _table([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])
    assert_png(plots.heatmap(tmp_path / "h.png", t, title="t", cbar_label="loss"))
    ax = _panels(drawn[0])[0]
    cells = [x.get_text() for x in ax.texts]
    assert cells == ["0.10", "0.20", "0.30", "0.40", "0.50", "0.60"]  # every cell annotated with its value
    assert [x.get_text() for x in ax.get_xticklabels()] == ["none", "fixed_1", "adaptive"]
    with_nan = _table([[np.nan, 0.2, np.inf], [0.4, np.nan, 0.6]])
    assert_png(plots.heatmap(tmp_path / "n.png", with_nan, title="t", fmt="{:.0%}", cmap="Reds", vmin=0, vmax=1))
    assert_png(plots.heatmap(tmp_path / "all_nan.png", _table(np.full((2, 3), np.nan)), title="t"))
    assert_png(plots.heatmap(tmp_path / "empty.png", pd.DataFrame(), title="t"))


def test_heatmaps_side_by_side(tmp_path, drawn):
    div = _table([[1.0, 0.0, 0.5], [0.0, 0.0, np.nan]])
    loss = _table([[np.nan, 0.02, 0.03], [0.01, 0.015, 0.02]])
    out = plots.heatmaps(tmp_path / "hs.png", [
        ("divergence rate", div, {"cmap": "Reds", "fmt": "{:.0%}", "vmin": 0, "vmax": 1}),
        ("median final loss", loss, {"fmt": "{:.3f}", "cbar_label": "MSE"}),
    ])
    assert_png(out)
    panels = _panels(drawn[0])
    assert [ax.get_title() for ax in panels] == ["divergence rate", "median final loss"]
    assert "100%" in [x.get_text() for x in panels[0].texts]


def test_band_quantiles_equal_numpys_nanpercentile():
    """The bands' one-sort quantiles equal np.nanpercentile (linear), columns with NaNs and a single value too."""
    rng = np.random.default_rng(3)
    a = rng.standard_normal((37, 300))
    a[rng.random(a.shape) < 0.4] = np.nan
    a[:36, 1] = np.nan  # one value left
    a[:, 2] = 5.0  # ties
    np.testing.assert_allclose(plots.quantiles(a, (0.25, 0.5, 0.75)),
                               np.nanpercentile(a, [25, 50, 75], axis=0), rtol=0, atol=1e-12)
