"""End to end through the CLI, into a temporary MLflow store: what a user gets from `make train`."""

from __future__ import annotations

import logging
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from fincast import cli
from fincast import config as config_mod
from fincast.config import TrackingConfig

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared" / "data"


def _store(tmp_path: Path) -> list[str]:
    return [f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", f"tracking.artifact_dir={tmp_path / 'art'}",
            f"train.checkpoint_dir={tmp_path / 'ckpt'}"]


def _run_id(stdout: str) -> str:
    first = stdout.strip().splitlines()[0]
    assert first.startswith("run "), stdout
    return first.split()[1]


def _train(tmp_path, capsys, *overrides, pipeline="pipelines/price_crypto.yaml", extra=()):
    args = ["train", str(ROOT / pipeline), "--quiet", *[f"--set={o}" for o in (*_store(tmp_path), *overrides)],
            *extra]
    code = cli.main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def _series(run_id: str, cfg_t, dst: Path) -> pd.DataFrame:
    """The run's series.parquet (every step)."""
    from fincast import tracking

    return pd.read_parquet(tracking.download_artifact(cfg_t.uri, run_id, "series.parquet", dst))


def _tracking(tmp_path):
    return TrackingConfig(uri=f"sqlite:///{tmp_path / 'mlflow.db'}")


FAST = ("data.source=synthetic", "data.start=2016-01-01", "data.end=2021-12-31", "features.lookback=10",
        "train.epochs=3", "train.batch_size=128", "train.warmup_steps=5", "model.hidden_size=8",
        "tracking.log_every=7")


def test_train_end_to_end_on_synthetic_data(tmp_path, capsys):
    import mlflow

    from fincast import tracking

    code, out, err = _train(tmp_path, capsys, *FAST, "clip.norm.max_norm=0.5", "train.lr=3e-3")
    assert code == 0, err
    run_id = _run_id(out)
    assert "naive (zero)" in out and "ridge" in out and "make ui" in out
    cfg_t = _tracking(tmp_path)
    run = tracking.get_run(run_id, cfg_t)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "lstm-BTC-USD+ETH-USD-norm0.5-lr3e-3-s0"

    # every resolved config key is a param
    resolved = config_mod.load(ROOT / "pipelines/price_crypto.yaml",
                               [*_store(tmp_path), *FAST, "clip.norm.max_norm=0.5", "train.lr=3e-3"])
    flat = config_mod.flatten(config_mod.to_dict(resolved))
    params = run.data.params
    for key in flat:
        assert key in params, key
    assert params["tracking.log_every"] == "7"
    assert float(params["train.lr"]) == 3e-3 and params["data.source"] == "synthetic"

    tags = run.data.tags
    assert tags["fincast.data_source"] == "synthetic"
    assert len(tags["fincast.data_fingerprint"]) == 16
    assert tags["fincast.version"] and tags["fincast.git_commit"] and tags["fincast.device"] == "cpu"
    assert tags["fincast.diverged"] == "false"

    # the series file: every step, clipped norms within the threshold at every step
    local = Path(mlflow.artifacts.download_artifacts(run_id=run_id, dst_path=str(tmp_path / "dl"),
                                                     tracking_uri=cfg_t.uri))
    series = pd.read_parquet(local / "series.parquet")
    steps = list(series["step"])
    assert steps == list(range(1, len(steps) + 1)) and len(steps) > 20 and set(series["run_id"]) == {run_id}
    assert (series["norm_post"] <= 0.5 * (1 + 1e-5)).all()
    assert ((series["norm_pre"] > 0.5) == (series["clipped"] == 1.0)).all()
    calm = series["norm_pre"] <= 0.5
    np.testing.assert_allclose(series.loc[calm, "norm_post"], series.loc[calm, "norm_pre"], rtol=1e-6)
    assert np.isfinite(series["loss"]).all() and (series["loss"] > 0).all()
    assert series["lr"].max() == pytest.approx(3e-3, rel=1e-6)
    # MLflow's step metrics: every 10th step (tracking.metric_every) and each epoch's last, as in the file
    val_steps = [s for s, _ in tracking.metric_history(run_id, "val/loss", cfg_t)]
    assert len(val_steps) == 3 and list(series.loc[series["validated"], "step"]) == val_steps
    expected = sorted({s for s in steps if s % 10 == 0} | set(val_steps))
    by_step = series.set_index("step")
    for key, column in (("train/loss", "loss"), ("grad/norm_pre", "norm_pre"), ("grad/norm_post", "norm_post")):
        logged = tracking.metric_history(run_id, key, cfg_t)
        assert [s for s, _ in logged] == expected, key
        assert [v for _, v in logged] == list(by_step.loc[expected, column]), key

    m = run.data.metrics
    for prefix in ("val", "test", "baseline_naive", "baseline_ridge"):
        for k in ("rmse", "mae", "directional_accuracy"):
            assert f"{prefix}/{k}" in m, f"{prefix}/{k}"
    # plausible values for daily crypto log returns (synthetic vol ~3.5%/day)
    for prefix in ("test", "baseline_naive", "baseline_ridge"):
        assert 0.005 < m[f"{prefix}/rmse"] < 0.2
        assert m[f"{prefix}/mae"] < m[f"{prefix}/rmse"]
        assert 0.3 < m[f"{prefix}/directional_accuracy"] < 0.7
    assert m["baseline_naive/directional_accuracy"] == 0.5
    assert m["test/rmse"] < 2 * m["baseline_naive/rmse"]
    assert m["time/step_ms"] > 0
    assert len(tracking.metric_history(run_id, "val/loss", cfg_t)) == 3

    # artifacts
    arts = set(tracking.list_artifacts(run_id, cfg_t))
    assert {"config.yaml", "predictions.csv", "training_curves.png", "series.parquet"} <= arts
    saved = config_mod.from_dict(yaml.safe_load((local / "config.yaml").read_text()))
    assert saved == resolved
    assert (local / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pred = pd.read_csv(local / "predictions.csv")
    assert list(pred.columns) == ["date", "ticker", "y_true", "y_pred"]
    assert set(pred["ticker"]) == {"BTC-USD", "ETH-USD"}
    assert int(run.data.params["samples.test"]) == len(pred)
    assert pred["y_pred"].notna().all()
    # y_true is the realised next-day log return, recomputed here from the synthetic prices
    from fincast.data import synthetic

    px = synthetic.generate("ETH-USD", pd.Timestamp("2016-01-01").date(), pd.Timestamp("2021-12-31").date())
    logret = np.log(px["adj_close"]).diff()
    eth = pred[pred.ticker == "ETH-USD"].head(5)
    for _, row in eth.iterrows():
        assert row.y_true == pytest.approx(logret.loc[pd.Timestamp(row.date)], rel=1e-9)

    # the model, with signature, loads and predicts
    models = mlflow.MlflowClient(cfg_t.uri).search_logged_models(experiment_ids=[run.info.experiment_id])
    assert len(models) == 1 and models[0].source_run_id == run_id
    mlflow.set_tracking_uri(cfg_t.uri)
    info = mlflow.models.get_model_info(models[0].model_uri)
    assert info.signature is not None and info.saved_input_example_info is not None
    model = mlflow.pyfunc.load_model(models[0].model_uri)
    assert model.predict(np.zeros((3, 10, 6), np.float32)).shape == (3,)


def test_clip_none_logs_post_equal_to_pre(tmp_path, capsys):
    from fincast import tracking

    code, out, err = _train(tmp_path, capsys, *FAST, "clip.method=none", "tracking.log_model=false",
                            "train.epochs=1", "tracking.metrics_writer=inline", "tracking.metric_every=1")
    assert code == 0, err
    run_id = _run_id(out)
    cfg_t = _tracking(tmp_path)
    pre = tracking.metric_history(run_id, "grad/norm_pre", cfg_t)
    post = tracking.metric_history(run_id, "grad/norm_post", cfg_t)
    assert pre == post and len(pre) > 5
    assert tracking.get_run(run_id, cfg_t).data.metrics["grad/clip_rate"] == 0
    assert tracking.get_run(run_id, cfg_t).info.run_name.endswith("-none-lr1e-3-s0")


def test_diverged_run_is_recorded_not_a_traceback(tmp_path, capsys):
    from fincast import tracking

    code, out, err = _train(tmp_path, capsys, *FAST, "clip.method=none", "train.optimizer=sgd", "train.lr=10",
                            "train.momentum=0.99", "features.scale_target=false", "tracking.log_model=false",
                            "train.warmup_steps=0", "train.schedule=none")
    assert code == 0, err
    assert "DIVERGED at step" in out
    assert "Traceback" not in err
    run = tracking.get_run(_run_id(out), _tracking(tmp_path))
    assert run.info.status == "FINISHED"
    assert run.data.tags["fincast.diverged"] == "true"
    assert run.info.run_name.endswith(" [diverged]")  # visible in the UI's run list at a glance
    step = int(run.data.tags["fincast.diverged_step"])
    reason = run.data.tags["fincast.diverged_reason"]
    assert reason.startswith(("non-finite training loss", "non-finite gradient norm"))
    loss = tracking.metric_history(run.info.run_id, "train/loss", _tracking(tmp_path))
    norm = tracking.metric_history(run.info.run_id, "grad/norm_pre", _tracking(tmp_path))
    # the rows stop at the diverged step, whose loss or gradient norm (as the reason says; which one overflows
    # first depends on the CPU's arithmetic) is non-finite: MLflow stores inf as the largest float, keeps NaN
    assert loss[-1][0] == norm[-1][0] == step
    bad = loss[-1][1] if "loss" in reason else norm[-1][1]
    assert not math.isfinite(bad) or bad > 1e300
    assert all(math.isfinite(v) for s, v in loss[:-1]) and all(math.isfinite(v) for s, v in norm[:-1])


def test_stateful_clipper_run_carries_the_monitoring_metrics(tmp_path, capsys):
    """ZClip through the CLI: per-step statistics, its adaptive threshold, per-layer norms and update ratios
    every monitor.every steps, the spike count, and a checkpoint on disk."""
    from fincast import tracking

    code, out, err = _train(tmp_path, capsys, *FAST, "clip.method=zclip", "clip.zclip.warmup=10",
                            "monitor.every=5", "tracking.log_model=false", "train.epochs=2", "tracking.metric_every=1")
    assert code == 0, err
    run_id = _run_id(out)
    cfg_t = _tracking(tmp_path)
    run = tracking.get_run(run_id, cfg_t)
    assert run.info.run_name == "lstm-BTC-USD+ETH-USD-zclip-z2.5-lr1e-3-s0"
    steps = [s for s, _ in tracking.metric_history(run_id, "train/loss", cfg_t)]
    for key in ("grad/norm_pre", "grad/norm_post"):
        assert [s for s, _ in tracking.metric_history(run_id, key, cfg_t)] == steps, key
    threshold = tracking.metric_history(run_id, "grad/threshold", cfg_t)
    post = dict(tracking.metric_history(run_id, "grad/norm_post", cfg_t))
    after_warmup = [(s, v) for s, v in threshold if s > 10]
    assert len(after_warmup) > 5  # adaptive: it moves
    assert all(post[s] <= v * (1 + 1e-5) for s, v in after_warmup)
    for layer in ("lstm.l0", "head"):
        grad = tracking.metric_history(run_id, f"grad/layer/{layer}", cfg_t)
        ratio = tracking.metric_history(run_id, f"update/ratio/{layer}", cfg_t)
        assert [s for s, _ in grad] == [s for s, _ in ratio] == [s for s in steps if s % 5 == 0]
        assert all(v > 0 for _, v in ratio)
    assert tracking.metric_history(run_id, "grad/spikes", cfg_t)[0][0] == 1
    assert (tmp_path / "ckpt" / f"{run_id}.pt").is_file()


def test_resume_continues_the_same_run_as_if_never_stopped(tmp_path, capsys):
    """Train 2 epochs, resume to 3 (`fincast resume RUN --set train.epochs=3`): the same MLflow run gets
    steps from where it stopped, and the result equals a 3-epoch run's."""
    from fincast import tracking

    common = (*FAST, "train.schedule=none", "train.patience=null", "tracking.log_model=false",
              "clip.method=autoclip")
    code, out, err = _train(tmp_path, capsys, *common, "train.epochs=2")
    assert code == 0, err
    run_id = _run_id(out)
    cfg_t = _tracking(tmp_path)
    steps_before = len(_series(run_id, cfg_t, tmp_path / "before"))
    code = cli.main(["resume", run_id, "--quiet", "--checkpoint-dir", str(tmp_path / "ckpt"),
                     "--set", "train.epochs=3"])
    out2, err2 = capsys.readouterr()
    assert code == 0, err2
    assert _run_id(out2) == run_id
    run = tracking.get_run(run_id, cfg_t)
    assert run.info.status == "FINISHED"
    assert run.data.tags["fincast.resumed_from_step"] == str(steps_before)
    series = _series(run_id, cfg_t, tmp_path / "after")  # the whole run's, the steps before the resume included
    assert list(series["step"]) == list(range(1, steps_before * 3 // 2 + 1))
    assert series["validated"].sum() == 3
    loss = tracking.metric_history(run_id, "train/loss", cfg_t)  # every 10th step and each epoch's last, once
    assert [s for s, _ in loss] == sorted({s for s in series["step"] if s % 10 == 0}
                                          | set(series.loc[series["validated"], "step"]))
    assert len(tracking.metric_history(run_id, "val/loss", cfg_t)) == 3

    straight_dir = tmp_path / "straight"
    straight_dir.mkdir()
    code, out3, err3 = _train(straight_dir, capsys, *common, "train.epochs=3")
    assert code == 0, err3
    straight = tracking.get_run(_run_id(out3), _tracking(straight_dir))
    assert straight.data.metrics["test/rmse"] == run.data.metrics["test/rmse"]
    assert tracking.metric_history(straight.info.run_id, "train/loss", _tracking(straight_dir)) == loss
    pd.testing.assert_frame_equal(_series(straight.info.run_id, _tracking(straight_dir), tmp_path / "straight_dl")
                                  .drop(columns="run_id"), series.drop(columns="run_id"))


def test_resume_refuses_what_it_cannot_do(tmp_path, capsys):
    code = cli.main(["resume", "0123abcd", "--checkpoint-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "no checkpoint" in err and "0123abcd" in err
    code, out, err = _train(tmp_path, capsys, *FAST, "train.epochs=1", "tracking.log_model=false")
    assert code == 0, err
    code = cli.main(["resume", _run_id(out), "--checkpoint-dir", str(tmp_path / "ckpt"), "--set", "train.lr=1"])
    err = capsys.readouterr().err
    assert code == 2 and "train.lr=1" in err and "train.epochs" in err


def test_train_resume_after_a_kill_reaches_the_uninterrupted_result(tmp_path, capsys, monkeypatch):
    """A run killed right after a mid-run checkpoint, continued with `fincast train SPEC --resume RUN`, ends
    with exactly the metrics of an uninterrupted run with the same seed (cosine schedule, zclip state, data
    order and RNG all restored). A spec that resolves to another config is refused."""
    from fincast import tracking
    from fincast.runs import checkpoints

    class Killed(BaseException):
        pass

    saves = []
    real_save = checkpoints.save_checkpoint

    def save_then_die(path, payload):
        real_save(path, payload)
        saves.append(payload["run"]["step"])
        if len(saves) == 3:
            raise Killed

    common = (*FAST, "train.epochs=4", "train.patience=null", "tracking.log_model=false", "clip.method=zclip",
              "train.seed=3", "train.checkpoint_every=10")
    monkeypatch.setattr(checkpoints, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        _train(tmp_path, capsys, *common)
    monkeypatch.setattr(checkpoints, "save_checkpoint", real_save)
    cfg_t = _tracking(tmp_path)
    from mlflow.tracking import MlflowClient

    (killed,) = MlflowClient(cfg_t.uri).search_runs(["1"])
    assert killed.info.status == "KILLED" and saves[-1] > 0, saves
    run_id = killed.info.run_id

    code, _, err = _train(tmp_path, capsys, *common, "train.lr=0.5", extra=["--resume", run_id])
    assert code == 2 and "train.lr" in err and "--resume" in err
    code, out, err = _train(tmp_path, capsys, *common, extra=["--resume", run_id])
    assert code == 0, err
    assert _run_id(out) == run_id
    resumed = tracking.get_run(run_id, cfg_t)
    assert resumed.info.status == "FINISHED"
    assert resumed.data.tags["fincast.resumed_from_step"] == str(saves[-1])

    straight_dir = tmp_path / "straight"
    straight_dir.mkdir()
    code, out3, err3 = _train(straight_dir, capsys, *common)
    assert code == 0, err3
    straight = tracking.get_run(_run_id(out3), _tracking(straight_dir))
    for key in ("test/rmse", "best_val_loss", "val/loss", "train/loss", "grad/norm_pre"):
        assert resumed.data.metrics[key] == straight.data.metrics[key], key
    assert (tracking.metric_history(run_id, "train/loss", cfg_t)
            == tracking.metric_history(straight.info.run_id, "train/loss", _tracking(straight_dir)))


def test_unreachable_yahoo_without_cache_fails_fast_and_says_what_to_do(tmp_path, capsys, monkeypatch):
    """`make train` offline with an empty cache: non-zero exit, well within 30 s, naming csv and synthetic."""
    from fincast.data import yahoo

    def unreachable(tickers, **kwargs):
        logging.getLogger("yfinance").error(
            f"['{tickers}']: DNSError('Failed to perform, curl: (6) Could not resolve host: query2.finance.yahoo.com')")
        return pd.DataFrame()

    monkeypatch.setattr(yahoo.yf, "download", unreachable)
    t0 = time.monotonic()
    code, out, err = _train(tmp_path, capsys, f"data.cache_dir={tmp_path / 'cache'}", "data.timeout_s=5",
                            pipeline="pipelines/price_equities.yaml")
    assert code == 2
    assert time.monotonic() - t0 < 30
    assert "SPY" in err and "data.source=csv" in err and "data.source=synthetic" in err
    assert "Could not resolve host" in err
    assert not (tmp_path / "mlflow.db").exists()  # failed before any tracking


def test_config_error_fails_before_any_work(tmp_path, capsys):
    code, out, err = _train(tmp_path, capsys, "train.lrr=1")
    assert code == 2
    assert "train.lrr" in err and "did you mean 'train.lr'" in err
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize("args", [["--help"], ["train", "--help"], ["resume", "--help"], ["data", "--help"]])
def test_help_explains_without_importing_torch_or_mlflow(args):
    """--help answers at once: the heavy libraries are imported by the commands, not to print help."""
    r = subprocess.run([sys.executable, "-m", "fincast.cli", *args], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0
    assert "--set" in r.stdout or "COMMAND" in r.stdout
    probe = (f"import sys\nfrom fincast.cli import main\ntry:\n    main({args!r})\nexcept SystemExit:\n    pass\n"
             "print(sorted(m for m in ('torch', 'mlflow', 'optuna', 'matplotlib') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT)
    assert r.stdout.strip().splitlines()[-1] == "[]", r.stdout + r.stderr


def test_keys_lists_every_config_key(capsys):
    assert cli.main(["keys"]) == 0
    out = capsys.readouterr().out
    for key, _, _ in config_mod.describe_keys():
        assert key in out


def test_data_command_on_csv(tmp_path, capsys):
    from fincast.data import synthetic

    for t in ("AAA", "BBB"):
        synthetic.generate(t).rename(columns={"adj_close": "Adj Close"}).rename(columns=str.title).rename_axis(
            "Date").to_csv(tmp_path / f"{t}.csv")
    code = cli.main(["data", str(ROOT / "pipelines/price_equities.yaml"), "--quiet", "--set", "data.source=csv",
                     "--set", f"data.path={tmp_path}", "--set", "data.tickers=AAA,BBB"])
    out = capsys.readouterr().out
    assert code == 0
    assert "AAA" in out and "BBB" in out and "source csv" in out


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED / "crypto" / "BTC-USD.csv").exists(), reason="../shared/data not available")
def test_train_crypto_on_real_csv(tmp_path, capsys):
    """The issue's acceptance run: price_crypto on real BTC-USD/ETH-USD CSVs (shortened to 4 epochs)."""
    from fincast import tracking

    code, out, err = _train(tmp_path, capsys, "data.source=csv", f"data.path={SHARED / 'crypto'}", "train.epochs=4")
    assert code == 0, err
    run_id = _run_id(out)
    cfg_t = _tracking(tmp_path)
    run = tracking.get_run(run_id, cfg_t)
    assert run.info.status == "FINISHED" and run.data.tags["fincast.data_source"] == "csv"
    post = tracking.metric_history(run_id, "grad/norm_post", cfg_t)
    assert post and all(v <= 1.0 * (1 + 1e-5) for _, v in post)
    assert "data_warnings.txt" in tracking.list_artifacts(run_id, cfg_t)  # ETH-USD's four Yahoo holes


@pytest.mark.slow
@pytest.mark.parametrize("method", ["value", "norm", "autoclip", "agc", "zclip"])
def test_every_clip_method_trains_the_price_pipeline(tmp_path, capsys, method):
    """`make train ARGS="--set clip.method=..."` for each method (synthetic SPY, 2 epochs)."""
    from fincast import tracking

    extra = {"norm": ["clip.norm.scope=per_layer", "clip.norm.schedule=cosine"],
             "value": ["clip.value.value=0.05", "clip.value.schedule=linear"]}.get(method, [])
    code, out, err = _train(tmp_path, capsys, "data.source=synthetic", "train.epochs=2", f"clip.method={method}",
                            *extra, "tracking.log_model=false", pipeline="pipelines/price_equities.yaml")
    assert code == 0, err
    run_id = _run_id(out)
    cfg_t = _tracking(tmp_path)
    run = tracking.get_run(run_id, cfg_t)
    assert run.info.status == "FINISHED" and run.data.tags["fincast.diverged"] == "false"
    assert method in run.info.run_name
    keys = set(run.data.metrics)
    assert {"grad/norm_pre", "grad/norm_post", "grad/clip_rate", "grad/threshold",
            "grad/spikes", "grad/layer/lstm.l0", "update/ratio/head", "test/rmse"} <= keys
    series = _series(run_id, cfg_t, tmp_path / "dl")
    assert ((series["clip_fraction"] >= 0) & (series["clip_fraction"] <= 1)).all()
    assert run.data.metrics["grad/clip_rate"] == pytest.approx(series["clipped"].mean())
    if method in ("norm", "value"):  # scheduled thresholds move
        assert len(tracking.metric_history(run_id, "grad/threshold", cfg_t)) > 10


@pytest.mark.slow
def test_torchrun_trains_one_tracked_run_equal_to_one_process(tmp_path):
    """`torchrun --nproc_per_node=2 -m fincast train ...` on CPU (gloo): one MLflow run (rank 0), and its
    final weights equal a one-process run's with the same global batch."""
    import shutil

    import torch

    from fincast import tracking

    sets = [*_store(tmp_path), *FAST, "train.max_steps=12", "train.epochs=1", "tracking.log_model=false",
            "clip.method=autoclip", "clip.autoclip.percentile=50", "train.threads=1"]
    args = [str(ROOT / "pipelines/price_crypto.yaml"), "--quiet", *[f"--set={o}" for o in sets]]
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    r = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", "-m", "fincast", "train", *args],
                       capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("\nrun ") + r.stdout.startswith("run ") == 1  # only rank 0 reports
    run_id = _run_id(r.stdout)
    cfg_t = _tracking(tmp_path)
    run = tracking.get_run(run_id, cfg_t)
    assert run.data.tags["fincast.world_size"] == "2" and run.info.status == "FINISHED"
    import mlflow

    assert len(mlflow.MlflowClient(cfg_t.uri).search_runs([run.info.experiment_id])) == 1

    single = subprocess.run([sys.executable, "-m", "fincast", "train", *args], capture_output=True, text=True,
                            cwd=tmp_path, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    a = torch.load(tmp_path / "ckpt" / f"{run_id}.pt", weights_only=True)
    b = torch.load(tmp_path / "ckpt" / f"{_run_id(single.stdout)}.pt", weights_only=True)
    assert a["run"]["step"] == b["run"]["step"] == 12
    for name, p in b["model"].items():
        torch.testing.assert_close(a["model"][name], p, rtol=1e-4, atol=1e-6)


def test_log_lines_go_above_progress_bars_while_a_command_runs(monkeypatch, capsys):
    """While a command runs, fincast's log handler writes through tqdm (a line printed above a bar, not into
    it); afterwards the CLI's own handler is back."""
    import logging

    from tqdm.contrib.logging import _TqdmLoggingHandler

    from fincast.cli import commands

    seen = []

    def fake(args):
        seen.append([type(h) for h in logging.getLogger("fincast").handlers])
        logging.getLogger("fincast.test").warning("a message during the bar")
        return 0

    monkeypatch.setitem(commands.COMMANDS, "keys", fake)
    assert cli.main(["keys"]) == 0
    assert seen == [[_TqdmLoggingHandler]]
    assert "warning: a message during the bar" in capsys.readouterr().err
    assert [type(h) for h in logging.getLogger("fincast").handlers] == [logging.StreamHandler]
