"""Stability studies: spec expansion, resumability, and the study -> report path into a temporary MLflow store."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from tiny_study import TINY, _spec  # noqa: F401 (TINY: also used by the sweep tests)

from fincast.config import ConfigError, TrackingConfig
from fincast.experiments import study as study_mod
from fincast.experiments.spec import config_hash
from fincast.runs.setup import cores

ROOT = Path(__file__).resolve().parents[2]

def _store(tmp_path: Path) -> list[str]:
    return [f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", f"tracking.artifact_dir={tmp_path / 'art'}"]


def _client(tmp_path: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")


def _children(tmp_path: Path, status: str | None = None) -> list:
    from fincast import tracking

    runs = tracking.StudyStore(TrackingConfig(uri=f"sqlite:///{tmp_path / 'mlflow.db'}"), "tiny_study").runs("child")
    return [r for r in runs if status is None or r.info.status == status]


# ---------------------------------------------------------------------------------------------
# Expansion
# ---------------------------------------------------------------------------------------------


def test_shipped_specs_expand_to_the_full_grid_of_unique_runs():
    for name, base in (("stability_crypto", "price_crypto"), ("stability_equities", "price_equities")):
        spec = yaml.safe_load((ROOT / "pipelines" / f"{name}.yaml").read_text())
        s = study_mod.load(ROOT / "pipelines" / f"{name}.yaml")
        m = spec["matrix"]
        assert len(s.jobs) == len(m["clip"]) * len(m["lr"]) * m["seeds"]
        assert len({j.hash for j in s.jobs}) == len(s.jobs)
        assert len(s.cells) == len(m["clip"]) * len(m["lr"])
        assert {j.clip for j in s.jobs} >= {"none"} and m["seeds"] >= 3
        assert all(j.cfg.tracking.experiment == name and j.cfg.name == base for j in s.jobs)
        assert {j.cfg.train.lr for j in s.jobs} == {float(x) for x in m["lr"]}


def test_expansion_with_axes_and_overrides(tmp_path):
    path = _spec(tmp_path, axes={"features.lookback": [5, 9]})
    s = study_mod.load(path, ["data.source=synthetic", "matrix.seeds=[1,4,7,9]", "study.workers=3"])
    assert len(s.jobs) == 2 * 2 * 2 * 4 and len(s.cells) == 8 and s.settings.workers == 3
    assert {j.seed for j in s.jobs} == {1, 4, 7, 9}
    assert all(j.cfg.data.source == "synthetic" for j in s.jobs)
    by_key = {(j.clip, j.lr, dict(j.axes)["features.lookback"], j.seed): j for j in s.jobs}
    assert len(by_key) == len(s.jobs)
    j = by_key[("norm0.5", 3.0, 9, 7)]
    assert (j.cfg.clip.method, j.cfg.clip.norm.max_norm, j.cfg.train.lr, j.cfg.features.lookback,
            j.cfg.train.seed) == ("norm", 0.5, 3.0, 9, 7)
    assert j.group == "lr=3 lookback=9" and j.cell == "norm0.5 lr=3 lookback=9"
    # seed-major order: the first cells-many jobs cover every cell once
    assert {x.cell for x in s.jobs[:8]} == set(s.cells)


def test_config_hash_ignores_tracking_threads_and_checkpoints_only(tmp_path):
    import dataclasses

    job = study_mod.load(_spec(tmp_path)).jobs[0]
    cfg = job.cfg
    same = dataclasses.replace(cfg, tracking=dataclasses.replace(cfg.tracking, run_name="x", uri="sqlite:///y.db"),
                               train=dataclasses.replace(cfg.train, threads=7, checkpoint=True))
    assert config_hash(same) == job.hash
    other = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=cfg.train.batch_size + 1))
    assert config_hash(other) != job.hash


@pytest.mark.parametrize(("overrides", "expected"), [
    (["matrix.clip=[norm]"], "must include none"),
    (["matrix.seeds=2"], "at least 3 seeds"),
    (["matrix.seeds=[1,1,2]"], "distinct seeds"),
    (["matrix.lrr=[1]"], "matrix.lrr: unknown key"),
    (["study.worker=2"], "did you mean 'study.workers'"),
    (["base=nope.yaml"], "no such pipeline spec"),
    (["matrix.axes={train.lr: [1, 2]}"], "use matrix.lr"),
    (["train.batchsize=3"], "train.batchsize: unknown key"),
    (["matrix.clip=[none, {method: norm, norm: {percentile: 5}}]"], "clip.norm.percentile: unknown key"),
    (["matrix.clip=[none, none]"], "the same clip config as matrix.clip[0]"),
    (["matrix.lr=[1, 1.0]"], "duplicate learning rates"),
    (["matrix.axes={train.threads: [1, 2]}"], "cannot be an axis"),
    (["matrix.axes={tracking.log_every: [1, 2]}"], "cannot be an axis"),
])
def test_bad_specs_name_the_key(tmp_path, overrides, expected):
    with pytest.raises(ConfigError) as err:
        study_mod.load(_spec(tmp_path), overrides)
    assert expected in str(err.value) and "tiny_study.yaml" in str(err.value)


def test_nested_set_sets_keys_and_distinct_configs_get_distinct_labels(tmp_path):
    spec = yaml.safe_load(_spec(tmp_path).read_text())
    spec["set"] = {"data": {"source": "synthetic"}, "train": {"optimizer": "sgd"}}
    spec["matrix"]["clip"] = ["none", {"method": "zclip", "zclip": {"alpha": 0.9}},
                              {"method": "zclip", "zclip": {"alpha": 0.99}}]
    spec["matrix"]["axes"] = {"data.start": ["2019-01-01", "2019-06-01"]}
    path = tmp_path / "nested.yaml"
    path.write_text(yaml.safe_dump(spec))
    s = study_mod.load(path)
    cfg = s.jobs[0].cfg
    assert cfg.data.source == "synthetic" and cfg.train.optimizer == "sgd"
    assert cfg.data.tickers == ("BTC-USD", "ETH-USD")  # the rest of the base's data section is kept
    labels = {j.clip for j in s.jobs}
    assert len(labels) == 3 and {j.cfg.clip.zclip.alpha for j in s.jobs if j.clip != "none"} == {0.9, 0.99}
    json.dumps([j.tags("x") for j in s.jobs])  # date-valued axes serialise


# ---------------------------------------------------------------------------------------------
# Running and resuming
# ---------------------------------------------------------------------------------------------


def test_rerun_after_a_kill_redoes_only_unfinished_runs_and_keeps_each_once(tmp_path, monkeypatch):
    """Simulated kill: the 4th run is interrupted (its MLflow run ends KILLED), and a run left RUNNING by a
    SIGKILLed worker is in the store too. The rerun keeps the 3 finished runs, deletes the leftovers and
    trains the rest: every run of the plan present exactly once."""
    from fincast import tracking
    from fincast.runs import driver

    # one run at a time (the kill hits the 4th run); a killed batch: tests/test_batched.py
    s = study_mod.load(_spec(tmp_path, lr=[3.0]), [*TINY, *_store(tmp_path), "study.batch_runs=1"])
    real_train, calls = driver.train, []

    def train_then_die(cfg, **kw):
        calls.append(cfg)
        if len(calls) == 4:
            kw["tags"] = {**kw["tags"]}
            run = tracking.start_run(cfg.tracking, cfg.tracking.experiment, "half", kw["tags"] | {
                "mlflow.parentRunId": kw["parent_run_id"]})
            run.client.set_terminated(run.run_id, "KILLED")
            raise KeyboardInterrupt
        return real_train(cfg, **kw)

    monkeypatch.setattr(driver, "train", train_then_die)
    with pytest.raises(KeyboardInterrupt):
        study_mod.run(s)
    monkeypatch.setattr(driver, "train", real_train)
    finished = _children(tmp_path, "FINISHED")
    assert len(finished) == 3
    kept = {r.info.run_id for r in finished}
    # a worker killed with SIGKILL leaves its run RUNNING
    stale = s.jobs[4]
    client = _client(tmp_path)
    exp = client.get_experiment_by_name("tiny_study").experiment_id
    client.create_run(exp, run_name="stale", tags=stale.tags("tiny_study"))
    (parent,) = tracking.StudyStore(s.tracking, "tiny_study").runs("parent")
    assert parent.info.status == "KILLED"

    out = study_mod.run(s)
    assert (out.skipped, out.finished, out.failed) == (3, len(s.jobs) - 3, [])
    runs = _children(tmp_path)
    assert all(r.info.status == "FINISHED" for r in runs)
    assert sorted(r.data.tags["fincast.config_hash"] for r in runs) == sorted(j.hash for j in s.jobs)
    assert kept <= {r.info.run_id for r in runs}
    assert all(r.data.tags["mlflow.parentRunId"] == out.parent_run_id for r in runs)
    assert tracking.StudyStore(s.tracking, "tiny_study").runs("parent")[0].info.status == "FINISHED"
    again = study_mod.run(s)  # nothing left to do
    assert (again.skipped, again.finished) == (len(s.jobs), 0)


def test_an_amp_axis_without_cuda_is_refused_before_any_work(tmp_path):
    import torch

    from fincast.config import FincastError

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    s = study_mod.load(_spec(tmp_path, axes={"train.precision": ["fp32", "fp16"]}), [*TINY, *_store(tmp_path)])
    with pytest.raises(FincastError, match="needs CUDA"):
        study_mod.run(s)
    assert not (tmp_path / "mlflow.db").exists()


def test_a_failing_run_does_not_stop_the_study(tmp_path, monkeypatch):
    from fincast.runs import driver

    s = study_mod.load(_spec(tmp_path, lr=[3.0]), [*TINY, *_store(tmp_path), "study.batch_runs=1"])
    real_train = driver.train

    def sometimes_broken(cfg, **kw):
        if cfg.train.seed == 1 and cfg.train.lr == 3.0:
            raise RuntimeError("simulated crash")
        return real_train(cfg, **kw)

    monkeypatch.setattr(driver, "train", sometimes_broken)
    out = study_mod.run(s)
    assert out.finished == len(s.jobs) - 2 and len(out.failed) == 2
    assert all("simulated crash" in e for _, e in out.failed)
    monkeypatch.setattr(driver, "train", real_train)
    out = study_mod.run(s)
    assert (out.skipped, out.finished, out.failed) == (len(s.jobs) - 2, 2, [])


@pytest.mark.slow  # a few seconds of process start-up; runs in make test-slow and .ci/run
def test_runs_on_other_data_are_redone_not_counted_as_done(tmp_path):
    """A CSV file that changed between two invocations (same config, other data): the rerun redoes every run
    on the current data, removes the old ones, and the report judges only the current ones."""
    import pandas as pd

    from fincast.data import synthetic
    from fincast.reports import stability

    frame = synthetic.generate("BTC-USD", None, None, seed=3)
    names = {"open": "Open", "high": "High", "low": "Low", "close": "Close", "adj_close": "Adj Close",
             "volume": "Volume"}
    csv_dir = tmp_path / "csv"
    csv_dir.mkdir()
    frame.rename(columns=names).rename_axis("Date").to_csv(csv_dir / "BTC-USD.csv")
    over = [*[o for o in TINY if not o.startswith("data.source")], "data.source=csv", f"data.path={csv_dir}",
            *_store(tmp_path)]
    s = study_mod.load(_spec(tmp_path, lr=[3.0]), over)
    first = study_mod.run(s)
    assert first.finished == len(s.jobs)
    changed = frame.copy()
    day = changed.index[changed.index.searchsorted(pd.Timestamp("2020-06-01"))]
    changed.loc[day, ["open", "high", "low", "close", "adj_close"]] *= 1.01  # a corrected bar in the window
    changed.rename(columns=names).rename_axis("Date").to_csv(csv_dir / "BTC-USD.csv")
    again = study_mod.run(s)
    assert (again.skipped, again.finished) == (0, len(s.jobs))
    runs = _children(tmp_path)
    assert len(runs) == len(s.jobs) and len({r.data.tags["fincast.data_fingerprint"] for r in runs}) == 1
    rep = stability.build("tiny_study", tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", out_dir=tmp_path / "r")
    assert rep.runs == len(s.jobs)


def test_study_then_report_end_to_end(tmp_path, capsys):
    """`fincast study` with 2 worker processes, then `fincast report stability`: every run is a child of the
    parent, the report's files exist, its numbers come from the runs, and it is logged to the parent run."""
    from fincast import cli, tracking

    spec = _spec(tmp_path)
    code = cli.main(["study", str(spec), "--quiet", *[f"--set={o}" for o in (*TINY, *_store(tmp_path))],
                     "--set=study.workers=2"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "12 runs trained now" in out.out
    runs = _children(tmp_path, "FINISHED")
    assert len(runs) == 12 and {r.data.tags["fincast.study_clip"] for r in runs} == {"none", "norm0.5"}
    assert {r.data.tags["fincast.threads"] for r in runs} == {str(max(1, cores() // 2))}
    store_cfg = TrackingConfig(uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    # a child keeps its config and predictions; its curves are in the stack's series file, drawn by the report
    assert set(tracking.list_artifacts(runs[0].info.run_id, store_cfg)) == {"config.yaml", "predictions.csv"}
    parent_id = runs[0].data.tags["mlflow.parentRunId"]
    assert [a for a in tracking.list_artifacts(parent_id, store_cfg) if a.startswith("series")] == ["series"]
    # the baselines, once on the parent: what every run on these data measured
    on_parent = tracking.get_run(parent_id, store_cfg).data.metrics
    for key in ("baseline_naive/rmse", "baseline_ridge/rmse", "baseline_ridge/directional_accuracy"):
        assert {r.data.metrics[key] for r in runs} == {on_parent[key]}, key

    code = cli.main(["report", "stability", "--study", "tiny_study", "--tracking-uri",
                     f"sqlite:///{tmp_path / 'mlflow.db'}", "--out", str(tmp_path / "reports")])
    out = capsys.readouterr()
    assert code == 0, out.err
    folder = tmp_path / "reports" / "stability" / "tiny_study"
    assert "At lr=0.01: unclipped training diverged in" in out.out and "At lr=3:" in out.out
    summary = json.loads((folder / "summary.json").read_text())
    assert len(summary["runs"]) == 12 and summary["missing_runs"] == 0
    by_id = {r.info.run_id: r for r in runs}
    for row in summary["runs"]:
        run = by_id[row["run_id"]]
        assert row["final_val_loss"] == pytest.approx(run.data.metrics["val/loss"])
        # every step from the stacks' series files; MLflow has the last one (each epoch's end, the diverged step)
        logged = tracking.metric_history(row["run_id"], "train/loss", TrackingConfig(
            uri=f"sqlite:///{tmp_path / 'mlflow.db'}"))
        assert row["steps"] == logged[-1][0] and len(logged) < row["steps"]
    cells = {(c["group"], c["clip"]): c for c in summary["cells"]}
    assert set(cells) == {(g, c) for g in ("lr=0.01", "lr=3") for c in ("none", "norm0.5")}
    assert all(c["runs"] == 3 for c in cells.values())
    html = (folder / "index.html").read_text()
    for run_id in by_id:
        assert run_id in html
    assert html.count("data:image/png;base64,") >= 6 and 'src="' + "loss_curves.png" not in html
    for f in ("summary.csv", "loss_curves.png", "grad_norms.png", "stability_map.png", "val_curves.png"):
        assert (folder / f).stat().st_size > 0
    parent = summary["parent_run_id"]
    logged = tracking.list_artifacts(parent, TrackingConfig(uri=f"sqlite:///{tmp_path / 'mlflow.db'}"), "report")
    assert {"report/index.html", "report/summary.json", "report/stability_map.png"} <= set(logged)

    from browser import check_page, find_chromium

    if find_chromium() is None:
        pytest.skip("Chromium not installed: the report was not opened in a browser")
    page = check_page(folder / "index.html")
    assert page.images >= 6 and page.images_loaded == page.images, page.broken_images
    assert page.console_errors == []
    assert page.verdict_first, (page.headings, page.verdict_top)


def _finished_rows(db: Path) -> int:
    """Finished runs, read with sqlite3 (opening the store through MLflow while the driver creates it would
    race its schema migrations)."""
    import sqlite3

    if not db.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as con:
            return con.execute("select count(*) from runs where status = 'FINISHED'").fetchone()[0]
    except sqlite3.Error:
        return 0


@pytest.mark.slow
def test_a_study_killed_with_sigkill_and_restarted_has_every_run_exactly_once(tmp_path):
    """The driver is SIGKILLed mid-study (its workers die with it, batches of 4 runs half trained); the restarted
    study finishes, and every run of the plan is present exactly once, all FINISHED."""
    spec = _spec(tmp_path, seeds=4)
    args = [sys.executable, "-m", "fincast", "study", str(spec), "--quiet",
            *[f"--set={o}" for o in (*TINY, *_store(tmp_path), "train.epochs=6", "study.workers=2",
                                          "study.batch_runs=4")]]
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            if _finished_rows(tmp_path / "mlflow.db") >= 3:
                break
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.3)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    time.sleep(2)  # the workers notice (PR_SET_PDEATHSIG) and die
    n_before = len(_children(tmp_path))
    finished_before = len(_children(tmp_path, "FINISHED"))
    assert finished_before < 16, "the study finished before it could be killed"
    assert n_before > finished_before or finished_before >= 3
    done = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    runs = _children(tmp_path)
    s = study_mod.load(spec, [*TINY, *_store(tmp_path), "train.epochs=6"])
    assert sorted(r.data.tags["fincast.config_hash"] for r in runs) == sorted(j.hash for j in s.jobs)
    assert all(r.info.status == "FINISHED" for r in runs)
    # no worker of the killed driver survived to add a duplicate later
    time.sleep(1)
    assert len(_children(tmp_path)) == len(s.jobs)


def test_the_bar_shows_at_start_and_moves_once_per_run_as_each_closes(tmp_path, monkeypatch):
    """A stack's runs move the study's bar one by one as each is closed, not all together when the stack's
    results come back; the bar is there (described as starting) before any data is loaded."""
    from fincast.runs import driver

    events = []

    class Bar:
        def __init__(self, total, desc, **kw):
            events.append(("bar", desc))
            self.n = 0

        def update(self, k=1):
            if k:
                self.n += k
                events.append(("update", k))

        def set_description(self, desc):
            events.append(("desc", desc))

        def set_postfix(self, **kw):
            pass

        def close(self):
            pass

    real_load, real_close = driver.load_data, driver.close_one
    monkeypatch.setattr(driver, "load_data", lambda *a, **kw: (events.append(("load",)), real_load(*a, **kw))[1])
    monkeypatch.setattr(driver, "close_one", lambda run, name, *a, **kw: (events.append(("closed", name)),
                                                                            real_close(run, name, *a, **kw))[1])
    monkeypatch.setattr(study_mod, "tqdm", Bar)
    s = study_mod.load(_spec(tmp_path, lr=[3.0]), [*TINY, *_store(tmp_path), "study.batch_runs=3",
                                                   "study.workers=1"])
    out = study_mod.run(s, progress=True)
    assert out.finished == 6
    assert events[0] == ("bar", "study tiny_study (starting)") and events[1] == ("load",)
    runs = [e for e in events if e[0] in ("closed", "update")]
    assert runs == [ev for name in [e[1] for e in events if e[0] == "closed"] for ev in (("closed", name),
                                                                                      ("update", 1))]
    assert len(runs) == 12  # each of the 6 runs: closed, then the bar moves


def test_a_study_run_keeps_what_varies_and_the_key_settings_as_params(tmp_path):
    s = study_mod.load(_spec(tmp_path), [*TINY, *_store(tmp_path)])
    keep = study_mod.keeping(s)
    assert keep.models == "weights"
    # the spec varies the clip config (none vs norm 0.5), the learning rate and the seed
    assert {"clip.method", "clip.norm.max_norm", "train.lr", "train.seed"} <= keep.params
    assert {"data.tickers", "model.hidden_size", "train.optimizer"} <= keep.params  # key settings
    assert not {"tracking.log_every", "tracking.run_name", "monitor.spike_window", "data.cache_dir"} & keep.params


@pytest.mark.parametrize(("workers", "threads", "device", "gpus", "cores_", "runs", "expected"), [
    (None, None, "auto", 4, 16, 100, (4, 4)),   # one worker per GPU, the cores shared out
    (None, None, "cuda", 2, 16, 100, (2, 8)),
    (None, None, "auto", 0, 16, 100, (16, 1)),  # no GPU: one per core
    (None, None, "cpu", 4, 8, 100, (8, 1)),     # a CPU study ignores the GPUs
    (None, None, "auto", 4, 16, 3, (3, 5)),     # never more workers than runs
    (6, 2, "auto", 4, 16, 100, (6, 2)),         # study.workers and study.threads win
])
def test_a_study_takes_a_worker_per_gpu(monkeypatch, workers, threads, device, gpus, cores_, runs, expected):
    from types import SimpleNamespace

    from fincast.experiments import workers as workers_mod

    monkeypatch.setattr(workers_mod, "cores", lambda: cores_)
    settings = SimpleNamespace(workers=workers, threads=threads)
    assert workers_mod.worker_count(settings, device, runs, gpus) == expected


def test_each_worker_takes_the_next_gpu_round_robin(monkeypatch):
    """Worker i (in the order they start) makes GPU i mod gpus its default CUDA device."""
    import torch

    from fincast.runs import setup

    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    assert [setup.take_gpu(i, 3) for i in range(5)] == [0, 1, 2, 0, 1] == chosen
    assert setup.visible_gpus("cpu") == 0  # asked without touching CUDA
