"""Stability-report figures: each writes a readable PNG for normal and awkward input (no pixel checks)."""

import time

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest

from fincast.reports import plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Awkward input must be handled, not just survived: no numpy RuntimeWarnings, no matplotlib UserWarnings.
pytestmark = [pytest.mark.filterwarnings("error::RuntimeWarning"), pytest.mark.filterwarnings("error::UserWarning")]


def assert_png(path):
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 0 and img.shape[1] > 0
    assert not list(path.parent.glob(f".{path.name}.*"))  # no temp file left behind


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


def test_band_curves_normal(tmp_path, rng):
    curves = {lr: {"none": _runs(rng), "fixed_1": _runs(rng)} for lr in ("lr=1e-2", "lr=1e-3")}
    thr = {lr: {"none": None, "fixed_1": np.linspace(0.5, 1.0, 200)} for lr in curves}
    out = plots.band_curves(tmp_path / "bands.png", curves, ylabel="loss", title="t", thresholds=thr)
    assert out == tmp_path / "bands.png"
    assert_png(out)


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


def test_band_curves_long_is_fast(tmp_path, rng):
    curves = {f"lr={lr}": {cfg: _runs(rng, seeds=5, steps=10_000) for cfg in ("none", "a", "b", "c")}
              for lr in ("1e-2", "1e-3", "1e-4")}
    thr = {lr: {"a": np.linspace(1, 2, 10_000)} for lr in curves}
    start = time.perf_counter()
    assert_png(plots.band_curves(tmp_path / "long.png", curves, ylabel="y", title="t", thresholds=thr))
    assert time.perf_counter() - start < 15


def test_distributions_normal(tmp_path, rng):
    values = {"none": rng.lognormal(size=300), "fixed_1": rng.lognormal(-1, size=300)}
    out = plots.distributions(tmp_path / "dist.png", values, {"none": 3.2, "fixed_1": 0.5}, xlabel="x", title="t")
    assert_png(out)


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


def test_heatmap_normal_and_nan(tmp_path):
    t = _table([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])
    assert_png(plots.heatmap(tmp_path / "h.png", t, title="t", cbar_label="loss"))
    with_nan = _table([[np.nan, 0.2, np.inf], [0.4, np.nan, 0.6]])
    assert_png(plots.heatmap(tmp_path / "n.png", with_nan, title="t", fmt="{:.0%}", cmap="Reds", vmin=0, vmax=1))
    assert_png(plots.heatmap(tmp_path / "all_nan.png", _table(np.full((2, 3), np.nan)), title="t"))
    assert_png(plots.heatmap(tmp_path / "empty.png", pd.DataFrame(), title="t"))


def test_heatmaps_side_by_side(tmp_path):
    div = _table([[1.0, 0.0, 0.5], [0.0, 0.0, np.nan]])
    loss = _table([[np.nan, 0.02, 0.03], [0.01, 0.015, 0.02]])
    out = plots.heatmaps(tmp_path / "hs.png", [
        ("divergence rate", div, {"cmap": "Reds", "fmt": "{:.0%}", "vmin": 0, "vmax": 1}),
        ("median final loss", loss, {"fmt": "{:.3f}", "cbar_label": "MSE"}),
    ])
    assert_png(out)
