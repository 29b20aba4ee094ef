"""The stability report's numbers, from runs written straight into a temporary MLflow store (no training), so
every expected value is known by construction."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from scipy import stats as scipy_stats

from fincast.config import FincastError
from fincast.experiments import study as study_mod
from fincast.reports import stability

STUDY = "fab_study"
NAIVE_VAL = 1.0


def _fabricate(tmp_path, table: dict[tuple[str, float], list[float | None]], *, parent: bool = True,
               test_rmse: dict[str, float] | None = None) -> str:
    """table: (clip, lr) -> final val loss per seed (None = non-finite divergence). Returns the store URI."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment(STUDY, artifact_location=(tmp_path / "art").as_uri())
    if parent:
        p = client.create_run(exp, run_name="study", tags={"fincast.study": STUDY, "fincast.study_role": "parent"})
        client.log_param(p.info.run_id, "study.divergence_factor", 3.0)
        client.set_terminated(p.info.run_id)
    for (clip, lr), finals in table.items():
        for seed, final in enumerate(finals):
            group = f"lr={lr:g}"
            tags = {"fincast.study": STUDY, "fincast.study_role": "child", "fincast.config_hash": f"{clip}{lr}{seed}",
                    "fincast.cell": f"{clip} {group}", "fincast.group": group, "fincast.study_clip": clip,
                    "fincast.study_lr": repr(lr), "fincast.seed": str(seed), "fincast.diverged": str(final is None).lower()}
            r = client.create_run(exp, run_name=f"{clip} {group} s{seed}", tags=tags)
            steps = 20 if final is not None else 7
            val = [2.0, 1.5, 0.9 if final is None or final < 0.9 else final + 0.1, final if final is not None else math.nan]
            metrics = [Metric("train/loss", 1.0 / (s + 1), 0, s) for s in range(1, steps + 1)]
            metrics += [Metric("grad/norm_pre", 0.5 + s / 100, 0, s) for s in range(1, steps + 1)]
            metrics += [Metric("val/loss", v, 0, 5 * (i + 1)) for i, v in enumerate(val)]
            metrics += [Metric("baseline_naive/val_loss", NAIVE_VAL, 0, steps), Metric("time/step_ms", 2.0, 0, steps),
                        Metric("grad/clip_rate", 0.0 if clip == "none" else 0.25, 0, steps),
                        Metric("grad/spikes", seed, 0, steps), Metric("best_val_loss", min(v for v in val if v == v), 0, steps),
                        Metric("test/rmse", (test_rmse or {}).get(clip, 0.02), 0, steps), Metric("baseline_naive/rmse", 0.021, 0, steps)]
            client.log_batch(r.info.run_id, metrics=metrics)
            client.set_terminated(r.info.run_id)
    return uri


def test_report_numbers_follow_from_the_runs(tmp_path):
    none_hi = [None, None, None, None, 50.0]  # 4 non-finite; the 5th exploded (> 3 x the zero forecast's loss)
    clipped_hi = [0.80, 0.82, 0.79, 0.81, 0.80]
    none_lo = [0.80, 0.90, 0.85, 0.82, 0.88]
    clipped_lo = [0.80 * 1.01, 0.90 * 1.02, 0.85 * 0.99, 0.82 * 1.00, 0.88 * 1.01]
    uri = _fabricate(tmp_path, {("none", 3.0): none_hi, ("norm1.0", 3.0): clipped_hi,
                                ("none", 0.1): none_lo, ("norm1.0", 0.1): clipped_lo})
    rep = stability.build(STUDY, tracking_uri=uri, out_dir=tmp_path / "out")
    summary = json.loads((tmp_path / "out" / STUDY / "summary.json").read_text())
    cells = {(c["group"], c["clip"]): c for c in summary["cells"]}
    assert cells[("lr=3", "none")]["diverged"] == 5 and cells[("lr=3", "norm1.0")]["diverged"] == 0
    assert cells[("lr=0.1", "none")]["final_val_loss_median"] == pytest.approx(np.median(none_lo))
    assert cells[("lr=0.1", "none")]["final_val_loss_q25"] == pytest.approx(np.percentile(none_lo, 25))
    assert cells[("lr=0.1", "norm1.0")]["clip_rate_median"] == 0.25
    assert cells[("lr=0.1", "norm1.0")]["time_per_step_vs_none"] == 1.0
    # the zero forecast's loss (1.0) is the default target: reached at step 15 when the third validation is < 1
    assert cells[("lr=0.1", "none")]["steps_to_target_median"] == 15

    comp = {(g, c["config"]): c for g, cs in summary["comparisons"].items() for c in cs}
    hi = comp[("lr=3", "norm1.0")]
    assert (hi["diverged_control"], hi["diverged_treated"], hi["outcome"]) == (5, 0, "helped")
    assert hi["fisher_p"] == pytest.approx(2 / 252)  # hypergeometric: C(5,5)C(5,0)/C(10,5), twice (two-sided)
    lo = comp[("lr=0.1", "norm1.0")]
    diffs = [100 * (t / c - 1) for t, c in zip(clipped_lo, none_lo)]
    assert lo["n_pairs"] == 5 and lo["diff_pct"] == pytest.approx(np.mean(diffs))
    assert lo["ci_low"] < np.mean(diffs) < lo["ci_high"]
    # two tests in the family (lr=3's divergence counts, lr=0.1's losses): intervals at 1 - 0.05/2, and the loss
    # interval (t: mean 0.6, sd 1.14 -> about [-1.3, 2.5]) is neither clear of zero nor inside the +-2% margin
    assert lo["family"] == 2 and lo["level"] == pytest.approx(0.975)
    half = scipy_stats.t.ppf(1 - 0.025 / 2, 4) * np.std(diffs, ddof=1) / math.sqrt(5)
    assert lo["loss_low"] <= np.mean(diffs) - half + 1e-9 and lo["loss_high"] >= np.mean(diffs) + half - 1e-9
    # Boschloo, 0 of 5 vs 5 of 5: the supremum over the common rate is at 1/2, where the observed table (the only
    # one as extreme on its side) has probability 2^-10; two-sided: twice that. Holm over 2 tests: twice again.
    assert hi["boschloo_p"] == pytest.approx(2 / 1024) and hi["div_p_adj"] == pytest.approx(4 / 1024)
    assert lo["outcome"] == "inconclusive"
    assert "At lr=3: unclipped training diverged in 5 of 5 seeds" in rep.verdict_text
    assert "norm1.0 helped" in rep.verdict_text and "norm1.0: inconclusive" in rep.verdict_text
    verdicts = pd.read_csv(tmp_path / "out" / STUDY / "verdicts.csv")
    assert len(verdicts) == 4 and set(verdicts["metric"]) == {"divergence_rate_pp", "final_val_loss_pct"}
    row = verdicts[(verdicts["lr"] == 3.0) & (verdicts["metric"] == "divergence_rate_pp")].iloc[0]
    assert (row["outcome"], row["effect"]) == ("helped", -100.0) and row["ci_high"] < 0
    assert {"lr", "clip", "metric", "outcome", "effect", "ci_low", "ci_high", "p_adjusted"} <= set(verdicts.columns)
    html = (tmp_path / "out" / STUDY / "index.html").read_text()
    assert "val loss &gt; 3 x zero forecast" in html  # the exploded run, named for why it counts as diverged
    # ... and recognisable in the MLflow UI by its name, like the runs whose training went non-finite
    names = {r.info.run_name for r in MlflowClient(uri).search_runs(
        [MlflowClient(uri).get_experiment_by_name(STUDY).experiment_id])}
    assert "none lr=3 s4 [diverged]" in names and "none lr=0.1 s4" in names
    stability.build(STUDY, tracking_uri=uri, out_dir=tmp_path / "out")  # again: not suffixed twice
    assert not any(n.endswith("[diverged] [diverged]") for n in
                   (r.info.run_name for r in MlflowClient(uri).search_runs(
                       [MlflowClient(uri).get_experiment_by_name(STUDY).experiment_id])))


def test_verdict_says_when_the_models_compared_do_not_beat_the_zero_forecast(tmp_path):
    finals = [0.80, 0.90, 0.85, 0.82, 0.88]
    uri = _fabricate(tmp_path, {("none", 0.1): finals, ("norm1.0", 0.1): finals},
                     test_rmse={"none": 0.0221, "norm1.0": 0.0200})  # the zero forecast's: 0.021
    rep = stability.build(STUDY, tracking_uri=uri, out_dir=tmp_path / "out", log_to_mlflow=False)
    assert "Note: none did not beat the zero forecast on the test set" in rep.verdict_text
    assert "none +5.2%" in rep.verdict_text and "norm1.0 -" not in rep.verdict_text
    uri = _fabricate(tmp_path / "b", {("none", 0.1): finals, ("norm1.0", 0.1): finals},
                     test_rmse={"none": 0.0221, "norm1.0": 0.0210})  # a tie does not beat it
    rep = stability.build(STUDY, tracking_uri=uri, out_dir=tmp_path / "out", log_to_mlflow=False)
    assert "Note: every model compared here did not beat the zero forecast" in rep.verdict_text
    assert "norm1.0 +0.0%" in rep.verdict_text
    # identical losses on both sides: inside the +-2% margin, so equivalent (not 'no difference')
    assert "norm1.0 was equivalent" in rep.verdict_text


def test_report_says_when_runs_are_missing_and_when_there_is_nothing(tmp_path):
    with pytest.raises(FincastError, match="no study 'fab_study'"):
        stability.build(STUDY, tracking_uri=f"sqlite:///{tmp_path / 'empty.db'}", out_dir=tmp_path / "out")
    uri = _fabricate(tmp_path, {("none", 1.0): [0.8, 0.9, 0.85], ("norm1.0", 1.0): [0.8, 0.9, 0.85]}, parent=False)
    with pytest.raises(FincastError, match="no parent run"):
        stability.build(STUDY, tracking_uri=uri, out_dir=tmp_path / "out")


def test_histories_come_from_the_series_files_and_for_older_runs_from_mlflow(tmp_path):
    """A study's per-step series are read from the stacks' files on the parent run (every step); a run without
    one (a study of an earlier version) falls back to its MLflow metric history."""
    from fincast import tracking
    from fincast.config import TrackingConfig
    from fincast.tracking import series

    uri = _fabricate(tmp_path, {("none", 3.0): [None, 0.8], ("norm1.0", 3.0): [0.8, 0.85]})
    client = MlflowClient(uri)
    children = [r for r in client.search_runs(["1"]) if r.data.tags.get("fincast.study_role") == "child"]
    ids = [r.info.run_id for r in children]
    (diverged,) = [r.info.run_id for r in children if r.data.tags["fincast.diverged"] == "true"]
    in_file = [diverged, *[r for r in ids if r != diverged][:1]]
    frames = []
    for r in in_file:  # distinct values from MLflow's, to tell where each came from
        hist = {k: [100.0 + s for s in range(1, 8)] for k in series.HISTORY}
        frames.append(series.frame(r, hist, [5, 7], [0.5, math.nan]))
    series.write(frames, tmp_path / f"{in_file[0]}.parquet")
    store = tracking.StudyStore(TrackingConfig(uri=uri), STUDY, create=False)
    (parent,) = store.runs("parent")
    client.log_artifact(parent.info.run_id, str(tmp_path / f"{in_file[0]}.parquet"), series.FOLDER)
    hist = store.histories(parent.info.run_id, ids, ["train/loss", "val/loss", "grad/norm_pre"])
    assert set(hist["train/loss"]) == set(ids)
    for r in in_file:
        np.testing.assert_array_equal(hist["train/loss"][r][1], [100.0 + s for s in range(1, 8)])
        assert list(hist["val/loss"][r][0]) == [5, 7] and math.isnan(hist["val/loss"][r][1][-1])
    for r in set(ids) - set(in_file):  # from MLflow: 20 steps of 1 / (s + 1)
        np.testing.assert_array_equal(hist["train/loss"][r][0], np.arange(1, 21))
        np.testing.assert_allclose(hist["train/loss"][r][1], [1.0 / (s + 1) for s in range(1, 21)])


def test_steps_to_target():
    steps, vals = np.array([5, 10, 15]), np.array([2.0, np.nan, 0.5])
    assert stability.steps_to_target(steps, vals, 1.0) == 15
    assert math.isnan(stability.steps_to_target(steps, vals, 0.1))


def test_study_jobs_write_the_tags_the_report_reads():
    from pathlib import Path

    job = study_mod.load(Path(__file__).resolve().parents[2] / "pipelines" / "stability_crypto.yaml").jobs[7]
    tags = job.tags("s")
    assert {"fincast.study", "fincast.study_role", "fincast.config_hash", "fincast.cell", "fincast.group",
            "fincast.study_clip", "fincast.study_lr", "fincast.seed"} <= set(tags)
    assert float(tags["fincast.study_lr"]) == job.cfg.train.lr and int(tags["fincast.seed"]) == job.cfg.train.seed
