"""Per-step series as one columnar file (layer L1, tracking): every step of every run of a stack in one parquet
table, which the stability report reads instead of MLflow's metric history.

MLflow stores a metric value as a database row (about 0.1 ms each through its public API); a 1,000-run study of
~700 steps and ~8 series would be millions of rows. So MLflow gets each series at a cadence
(``tracking.metric_every``, for the UI's charts) and the whole series goes into this file: a single run's as
``series.parquet`` in its artifacts, a study's stacks as ``series/<first run id>.parquet`` on the parent run.

Columns: ``run_id``, ``step`` (1-based), the training history (``loss``, ``norm_pre``, ``norm_post``,
``threshold``, ``clipped``, ``clip_fraction``, ``lr``), ``validated`` (whether a validation followed the step)
and ``val_loss`` (its loss; NaN elsewhere, or when the validation was not finite).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

HISTORY = ("loss", "norm_pre", "norm_post", "threshold", "clipped", "clip_fraction", "lr")
FILE = "series.parquet"  # a run's own series, in its artifacts
FOLDER = "series"  # a study's: one file per stack on the parent run
KEYS = {"train/loss": "loss", "grad/norm_pre": "norm_pre", "grad/norm_post": "norm_post",
        "grad/threshold": "threshold", "grad/clipped": "clipped", "grad/clip_fraction": "clip_fraction",
        "lr": "lr", "val/loss": "val_loss"}  # MLflow metric name -> column


def frame(run_id: str, history: dict[str, Sequence[float]], val_steps: Sequence[int],
          val_losses: Sequence[float]) -> pd.DataFrame:
    """One run's series: a row per step of ``history`` (HISTORY's keys, equal lengths), ``val_losses[i]`` at
    step ``val_steps[i]``."""
    steps = len(history["loss"])
    out = pd.DataFrame({"run_id": pd.Series([run_id] * steps, dtype="string"),
                        "step": np.arange(1, steps + 1, dtype=np.int64)})
    for key in HISTORY:
        values = np.asarray(history.get(key, ()), dtype=np.float64)
        if len(values) != steps:
            raise ValueError(f"series of run {run_id}: {key} has {len(values)} steps, loss has {steps}")
        out[key] = values
    val, validated = np.full(steps, np.nan), np.zeros(steps, dtype=bool)
    for step, loss in zip(val_steps, val_losses):
        if 1 <= step <= steps:
            val[step - 1], validated[step - 1] = loss, True
    out["validated"] = validated
    out["val_loss"] = val
    return out


def write(frames: Iterable[pd.DataFrame], path: str | Path) -> Path:
    """The runs' series as one parquet file (written beside and renamed: never half a file)."""
    path = Path(path)
    table = pd.concat(list(frames), ignore_index=True)
    tmp = path.with_name(path.name + ".part")
    table.to_parquet(tmp, index=False)
    tmp.replace(path)
    return path


def read(paths: Iterable[str | Path], run_ids: Iterable[str] | None = None) -> pd.DataFrame:
    """The series in these files (of ``run_ids`` only, when given), each run's rows together with its steps
    ascending (as :func:`write` stores them). A run is in one file (a redone run is a new MLflow run); should
    one be in two, the last file given wins."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    wanted = None if run_ids is None else pa.array(sorted(set(run_ids)), pa.string())
    seen: set[str] = set()
    kept = []
    for p in reversed(list(paths)):  # the later file first: its runs win
        t = pq.read_table(p)
        if wanted is not None:
            t = t.filter(pc.is_in(t["run_id"].cast(pa.string()), value_set=wanted))
        runs = set(pc.unique(t["run_id"]).to_pylist())
        if runs & seen:
            t = t.filter(pc.invert(pc.is_in(t["run_id"].cast(pa.string()), value_set=pa.array(sorted(seen)))))
        seen |= runs
        kept.append(t)
    if not kept:
        return pd.DataFrame(columns=["run_id", "step", *HISTORY, "validated", "val_loss"])
    return pa.concat_tables(kept[::-1]).to_pandas()


def histories(table: pd.DataFrame, keys: Iterable[str]) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """{MLflow metric name: {run_id: (steps, values)}} from a table as :func:`read` returns it (each run's rows
    together, steps ascending); ``val/loss`` has the validation steps only."""
    out: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {k: {} for k in keys}
    if table.empty:
        return out
    ids = table["run_id"].to_numpy(dtype=object)
    starts = np.r_[0, np.flatnonzero(ids[1:] != ids[:-1]) + 1]
    bounds = list(zip(starts, np.r_[starts[1:], len(ids)]))
    steps = table["step"].to_numpy(np.int64)
    validated = table["validated"].to_numpy(bool)
    for key in out:
        values = table[KEYS[key]].to_numpy(np.float64)
        for a, b in bounds:
            if key == "val/loss":
                keep = validated[a:b]
                out[key][str(ids[a])] = (steps[a:b][keep], values[a:b][keep])
            else:
                out[key][str(ids[a])] = (steps[a:b], values[a:b])
    return out
