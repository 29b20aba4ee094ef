"""Fail before the work, not after (issue 22): an output location the command cannot write, or a target that
cannot be learned, ends in one clear error (exit 2) before any data are loaded, any step is trained or any
MLflow run is created. The blocked paths lie under a regular file, which no one (root included) can make a
folder of; the permission-based variants are in tests/runs/test_preflight.py."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml
from tiny_study import TINY
from tiny_study import _spec as study_spec

from fincast import cli
from fincast.runs import forecast, options

ROOT = Path(__file__).resolve().parents[2]
FAST = ("data.source=synthetic", "data.tickers=[BTC-USD]", "data.start=2019-01-01", "data.end=2020-12-31",
        "features.lookback=8", "features.vol_windows=[5]", "model.hidden_size=4", "train.epochs=1",
        "train.batch_size=128", "train.warmup_steps=2", "monitor.every=null", "tracking.log_model=false")


@pytest.fixture
def no_work(monkeypatch):
    """Loading a task's data fails the test: every output check must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("data were loaded before the outputs were checked")

    monkeypatch.setattr(forecast, "load", refuse)
    monkeypatch.setattr(options, "load", refuse)


@pytest.fixture
def afile(tmp_path) -> Path:
    """A regular file: nothing can be created under it."""
    f = tmp_path / "afile"
    f.write_text("not a folder\n")
    return f


def _run(capsys, *args) -> tuple[int, str]:
    code = cli.main(list(args))
    out = capsys.readouterr()
    return code, out.err


def _sets(*overrides) -> list[str]:
    return [f"--set={o}" for o in overrides]


def _assert_refused(code: int, err: str, what: str, path: Path) -> None:
    """One error (exit 2, no traceback) with a line naming the setting (or folder) ``what`` and ``path``."""
    assert code == 2, err
    assert err.startswith("error: ") and "Traceback" not in err
    lines = [line.removeprefix("error: ").strip() for line in err.splitlines()]
    assert any(line.startswith(what) and f" {path} is not writable: " in line for line in lines), err


# the train command: each output location it writes
TRAIN_CASES = {
    "store": (lambda t: f"tracking.uri=sqlite:///{t / 'afile' / 'mlflow.db'}", "tracking.uri (the MLflow store's folder)",
              lambda t: t / "afile"),
    "artifacts": (lambda t: f"tracking.artifact_dir={t / 'afile' / 'art'}", "tracking.artifact_dir",
                  lambda t: t / "afile" / "art" / "price_crypto"),
    "checkpoints": (lambda t: f"train.checkpoint_dir={t / 'afile' / 'ck'}", "train.checkpoint_dir",
                    lambda t: t / "afile" / "ck"),
}


@pytest.mark.parametrize("case", sorted(TRAIN_CASES))
def test_train_refuses_an_output_it_cannot_write_before_any_work(tmp_path, capsys, afile, no_work, case):
    override, what, path = TRAIN_CASES[case]
    store = {"tracking.uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "tracking.artifact_dir": tmp_path / "art",
             "train.checkpoint_dir": tmp_path / "ck"}
    code, err = _run(capsys, "train", str(ROOT / "pipelines" / "price_crypto.yaml"), "--quiet",
                     *_sets(*FAST, *(f"{k}={v}" for k, v in store.items()), override(tmp_path)))
    _assert_refused(code, err, what, path(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]  # no store, no artifacts, no checkpoints


def test_train_refuses_a_store_path_that_is_a_folder(tmp_path, capsys, no_work):
    (tmp_path / "db").mkdir()
    code, err = _run(capsys, "train", str(ROOT / "pipelines" / "price_crypto.yaml"), "--quiet",
                     *_sets(*FAST, f"tracking.uri=sqlite:///{tmp_path / 'db'}",
                            f"tracking.artifact_dir={tmp_path / 'art'}", f"train.checkpoint_dir={tmp_path / 'ck'}"))
    _assert_refused(code, err, "tracking.uri (the MLflow store's database)", tmp_path / "db")
    assert "is a folder" in err and sorted(p.name for p in tmp_path.iterdir()) == ["db"]


def test_options_train_refuses_a_report_folder_it_cannot_create(tmp_path, capsys, monkeypatch, no_work):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "reports").write_text("a file where the reports folder would be\n")
    code, err = _run(capsys, "train", str(ROOT / "pipelines" / "options_synthetic.yaml"), "--quiet",
                     *_sets(f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
                            f"tracking.artifact_dir={tmp_path / 'art'}", f"train.checkpoint_dir={tmp_path / 'ck'}"))
    _assert_refused(code, err, "the options report folder", tmp_path / "reports" / "options" / "options_synthetic")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reports"]


def test_study_refuses_an_artifact_folder_it_cannot_create(tmp_path, capsys, afile, no_work):
    spec = study_spec(tmp_path)
    code, err = _run(capsys, "study", str(spec), "--quiet",
                     *_sets(*TINY, f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
                            f"tracking.artifact_dir={afile / 'art'}"))
    _assert_refused(code, err, "tracking.artifact_dir", afile / "art" / "tiny_study")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "tiny_study.yaml"]  # no MLflow store


def test_sweep_refuses_a_report_folder_it_cannot_create(tmp_path, capsys, afile, no_work):
    spec = tmp_path / "tiny_sweep.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "tiny_sweep", "base": str(ROOT / "pipelines" / "price_crypto.yaml"),
        "set": {"data.tickers": ["BTC-USD"], "train.checkpoint": False, "tracking.log_model": False},
        "search": {"clip": {"none": {}, "norm": {"low": 0.1, "high": 1}}}, "sweep": {"workers": 1, "trials": 2}}))
    code, err = _run(capsys, "sweep", str(spec), "--quiet", "--out", str(afile / "reports"),
                     "--storage", f"sqlite:///{tmp_path / 'optuna.db'}",
                     *_sets(*TINY, f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
                            f"tracking.artifact_dir={tmp_path / 'art'}"))
    _assert_refused(code, err, "the sweep report folder", afile / "reports" / "sweep" / "tiny_sweep")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "tiny_sweep.yaml"]  # no MLflow store, no Optuna


BACKTEST = ("data.source=synthetic", "data.start=2018-01-01", "data.end=2020-12-31", "features.lookback=5",
            "model.hidden_size=4", "train.epochs=1", "train.device=cpu", "backtest.start=2020-06-01",
            "backtest.refit_every=60")


@pytest.mark.parametrize("case", ["reports", "artifacts"])
def test_backtest_refuses_an_output_it_cannot_write_before_any_work(tmp_path, capsys, afile, no_work, case):
    art = afile / "art" if case == "artifacts" else tmp_path / "art"
    out = afile / "reports" if case == "reports" else tmp_path / "reports"
    code, err = _run(capsys, "backtest", str(ROOT / "pipelines" / "backtest_crypto.yaml"), "--quiet",
                     "--out", str(out), *_sets(*BACKTEST, f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
                                               f"tracking.artifact_dir={art}"))
    if case == "reports":
        _assert_refused(code, err, "the backtest report folder", out / "backtest" / "backtest_crypto")
    else:
        _assert_refused(code, err, "tracking.artifact_dir", art / "backtest_crypto")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def _constant_csv(folder: Path, ticker: str, days: int = 400) -> None:
    dates = pd.bdate_range("2019-01-01", periods=days)
    pd.DataFrame({"Date": dates.strftime("%Y-%m-%d"), "Open": 100.0, "High": 100.0, "Low": 100.0, "Close": 100.0,
                  "Adj Close": 100.0, "Volume": 1000}).to_csv(folder / f"{ticker}.csv", index=False)


def test_constant_prices_end_in_a_clear_error_before_training(tmp_path, capsys):
    """A price series that never moves has a constant target (every log return 0): nothing to learn, and the
    summary's RMSE ratio against the zero forecast divided by zero after the run was stored."""
    data = tmp_path / "data"
    data.mkdir()
    _constant_csv(data, "FLAT")
    code, err = _run(capsys, "train", str(ROOT / "pipelines" / "price_equities.yaml"), "--quiet",
                     *_sets("data.source=csv", f"data.path={data}", "data.tickers=[FLAT]", "features.lookback=8",
                            "model.hidden_size=4", "train.epochs=1", "tracking.metrics_writer=inline",
                            f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
                            f"tracking.artifact_dir={tmp_path / 'art'}", f"train.checkpoint_dir={tmp_path / 'ck'}"))
    assert code == 2, err
    assert err.startswith("error: FLAT: the target (log return over 1 bar(s)) is constant in the training split")
    assert "zero variance" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no store, no run, nothing trained


def test_constant_prices_end_a_backtest_before_its_run_starts(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    _constant_csv(data, "FLAT")
    code, err = _run(capsys, "backtest", str(ROOT / "pipelines" / "backtest_equities.yaml"), "--quiet",
                     "--out", str(tmp_path / "reports"),
                     *_sets("data.source=csv", f"data.path={data}", "data.tickers=[FLAT]", *BACKTEST[3:],
                            f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
                            f"tracking.artifact_dir={tmp_path / 'art'}", f"train.checkpoint_dir={tmp_path / 'ck'}"))
    assert code == 2, err
    assert err.startswith("error: FLAT: the target (log return over 1 bar(s)) is constant in its whole history")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no store, no run, no report
