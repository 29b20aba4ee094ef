"""The per-step series file: every step of every run of a stack, read back as the report reads it."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fincast.tracking import series


def _history(n, base):
    return {k: [base + i + j / 10 for i in range(n)] for j, k in enumerate(series.HISTORY)}


def test_series_round_trip_per_run_with_validation_steps(tmp_path):
    a = series.frame("a", _history(5, 0.0), [2, 5], [0.5, math.nan])  # the second validation was not finite
    b = series.frame("b", _history(3, 100.0), [3], [0.25])
    path = series.write([a, b], tmp_path / "s.parquet")
    assert not list(tmp_path.glob("*.part"))
    table = series.read([path])
    assert list(table["run_id"]) == ["a"] * 5 + ["b"] * 3
    hist = series.histories(table, ["train/loss", "grad/norm_pre", "lr", "val/loss"])
    np.testing.assert_array_equal(hist["train/loss"]["a"][0], [1, 2, 3, 4, 5])
    np.testing.assert_array_equal(hist["train/loss"]["b"][1], [100.0, 101.0, 102.0])
    np.testing.assert_array_equal(hist["grad/norm_pre"]["a"][1], [0.1, 1.1, 2.1, 3.1, 4.1])
    np.testing.assert_array_equal(hist["lr"]["b"][1], [100.6, 101.6, 102.6])
    steps, values = hist["val/loss"]["a"]
    assert list(steps) == [2, 5] and values[0] == 0.5 and math.isnan(values[1])
    assert list(hist["val/loss"]["b"][0]) == [3]


def test_read_keeps_the_asked_runs_and_a_redone_runs_later_file(tmp_path):
    old = series.write([series.frame("a", _history(2, 0.0), [], [])], tmp_path / "1.parquet")
    new = series.write([series.frame("a", _history(2, 7.0), [], []),
                        series.frame("c", _history(1, 0.0), [], [])], tmp_path / "2.parquet")
    table = series.read([old, new], run_ids=["a"])
    assert list(table["loss"]) == [7.0, 8.0]
    assert series.read([], ["a"]).empty


def test_a_history_of_unequal_lengths_is_refused():
    h = _history(3, 0.0)
    h["lr"] = h["lr"][:2]
    with pytest.raises(ValueError, match="lr has 2 steps, loss has 3"):
        series.frame("x", h, [], [])
