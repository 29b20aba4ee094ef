"""The run driver trains any registered task end to end, and is the one place a run's record, end state,
checkpoint and stacking are decided. A toy task (the forecast task's data and model, its own description and
evaluation) shows the driver uses only the task protocol: what the toy says is what the run records."""

from __future__ import annotations

import inspect
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow.tracking import MlflowClient

from fincast import config as config_mod
from fincast import tracking
from fincast.config import FincastError
from fincast.runs import driver, forecast, registry
from fincast.runs.record import BATCH_TAG
from fincast.runs.task import Description, Finished, Task

ROOT = Path(__file__).resolve().parents[2]
TINY = ["data.source=synthetic", "data.tickers=[BTC-USD]", "data.start=2019-01-01", "data.end=2020-12-31",
        "features.lookback=8", "features.vol_windows=[5]", "model.hidden_size=4", "train.epochs=2",
        "train.batch_size=128", "train.warmup_steps=2", "monitor.every=null", "tracking.log_model=false",
        "tracking.metrics_writer=inline"]


def _cfg(tmp_path, *extra):
    return config_mod.load(ROOT / "pipelines" / "price_crypto.yaml", [
        *TINY, f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", f"tracking.artifact_dir={tmp_path / 'art'}",
        f"train.checkpoint_dir={tmp_path / 'ck'}", *extra])


def _toy(finish_error: BaseException | None = None, calls: list | None = None):
    """A task: forecast's data, samples and model; its own name, tags, params, metrics and artifact."""

    def describe(cfg, data, splits):
        return Description(f"toy-s{cfg.train.seed}", "TOY", {"fincast.kind": "toy"}, {"toy.samples": len(splits.train)})

    def finish(cfg, data, splits, model, device, result, name, artifact_dir, *, draw_figures=True, shared=None,
               precision="fp32", progress=False):
        if calls is not None:
            calls.append((name, result.steps))
        if finish_error is not None:
            raise finish_error
        f = artifact_dir / "toy.txt"
        f.write_text(f"{name} trained {result.steps} steps\n")
        return Finished([("test/toy_metric", 0.25)], {"toy": {"score": 1.5}}, [f], {"report": "toy-report"})

    return SimpleNamespace(load=forecast.load, fetch=forecast.fetch, prepare=forecast.prepare,
                           build_model=forecast.build_model, describe=describe, finish=finish,
                           summary=lambda out, seconds: "toy", missing_local_data=lambda cfg: [],
                           outputs=lambda cfg: [])


def test_every_registered_task_implements_the_protocol():
    wanted = {n: inspect.signature(f) for n, f in vars(Task).items() if inspect.isfunction(f) and not n.startswith("_")}
    assert set(wanted) == {"load", "fetch", "prepare", "build_model", "describe", "finish", "summary",
                           "missing_local_data", "baselines", "outputs"}
    for name, module in registry.TASKS.items():
        for fn, sig in wanted.items():
            own = inspect.signature(getattr(module, fn))
            assert list(own.parameters) == list(sig.parameters)[1:], (name, fn)  # (less the protocol's self)


def test_an_unknown_task_is_refused_with_the_tasks_there_are():
    with pytest.raises(FincastError, match="no such task; tasks: forecast, options"):
        registry.task("nowcast")


def test_the_driver_records_what_the_task_says(tmp_path, monkeypatch):
    monkeypatch.setitem(registry.TASKS, "forecast", _toy())
    cfg = _cfg(tmp_path)
    out = driver.train(cfg)
    run = tracking.get_run(out.run_id, cfg.tracking)
    assert run.info.status == "FINISHED" and run.info.run_name == "toy-s0" == out.run_name
    assert run.data.tags["fincast.kind"] == "toy" and run.data.tags["fincast.tickers"] == "TOY"
    assert int(run.data.params["toy.samples"]) == out.samples["train"] > 0
    assert int(run.data.params["model.parameters"]) > 0 and run.data.params["train.seed"] == "0"
    assert run.data.metrics["test/toy_metric"] == 0.25 and run.data.metrics["time/step_ms"] > 0
    assert tracking.list_artifacts(out.run_id, cfg.tracking) == ["series.parquet", "toy.txt"]
    assert out.metrics == {"toy": {"score": 1.5}} and out.report == "toy-report"
    assert out.checkpoint == str(tmp_path / "ck" / f"{out.run_id}.pt") and Path(out.checkpoint).is_file()


@pytest.mark.parametrize(("error", "status", "raised"), [(RuntimeError("evaluation broke"), "FAILED", RuntimeError),
                                                         (KeyboardInterrupt(), "KILLED", KeyboardInterrupt)])
def test_a_run_that_breaks_after_training_ends_in_a_true_state(tmp_path, monkeypatch, error, status, raised):
    monkeypatch.setitem(registry.TASKS, "forecast", _toy(finish_error=error))
    cfg = _cfg(tmp_path)
    with pytest.raises(raised):
        driver.train(cfg)
    client = MlflowClient(tracking.resolve_uri(cfg.tracking))
    runs = client.search_runs([client.get_experiment_by_name(cfg.name).experiment_id])
    assert [r.info.status for r in runs] == [status]


def test_a_stack_gives_each_run_its_own_record(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setitem(registry.TASKS, "forecast", _toy(calls=calls))
    cfgs = [_cfg(tmp_path, f"train.seed={s}") for s in (0, 1, 2)]
    outs = driver.train_batch(cfgs, tags=[{"toy.index": str(i)} for i in range(3)])
    assert [n for n, _ in calls] == ["toy-s0", "toy-s1", "toy-s2"]
    assert len({o.run_id for o in outs}) == 3
    for i, out in enumerate(outs):
        run = tracking.get_run(out.run_id, cfgs[i].tracking)
        assert run.data.tags[BATCH_TAG] == "3" and run.data.tags["toy.index"] == str(i)
        assert run.data.metrics["test/toy_metric"] == 0.25 and run.info.status == "FINISHED"
    assert outs[0].fit.history["loss"] != outs[1].fit.history["loss"]  # seeds differ: different runs


def test_runs_of_different_data_do_not_stack(tmp_path):
    a, b = _cfg(tmp_path), _cfg(tmp_path, "features.lookback=9")
    assert driver.batch_key(a) == driver.batch_key(_cfg(tmp_path, "train.seed=4", "train.lr=0.1"))
    assert driver.batch_key(a) != driver.batch_key(b)
    with pytest.raises(FincastError, match="cannot train stacked"):
        driver.train_batch([a, b])


def test_a_resume_on_changed_data_is_refused(tmp_path):
    cfg = _cfg(tmp_path)
    with pytest.raises(FincastError, match="the data changed since the checkpoint"):
        driver._load_for_run(cfg, 0, {"data_fingerprint": "not-these-data"}, progress=False)


def test_each_run_of_a_stack_ends_once_finished(tmp_path, monkeypatch):
    """A stack's runs end once each, FINISHED when closed: never first KILLED by the failure guard of the
    training phase (its generators, collected, used to end every run KILLED before it was closed)."""
    monkeypatch.setitem(registry.TASKS, "forecast", _toy())
    ends = []
    real_end = tracking.Run.end
    monkeypatch.setattr(tracking.Run, "end", lambda self, status="FINISHED": (ends.append((self.run_id, status)),
                                                                             real_end(self, status))[1])
    outs = driver.train_batch([_cfg(tmp_path, f"train.seed={s}") for s in (0, 1)])
    assert ends == [(o.run_id, "FINISHED") for o in outs]


def test_a_stack_that_fails_in_training_ends_every_run_failed(tmp_path, monkeypatch):
    monkeypatch.setitem(registry.TASKS, "forecast", _toy())

    def broken(*a, **kw):
        raise RuntimeError("simulated out of memory")

    monkeypatch.setattr(driver, "train_runs", broken)
    cfgs = [_cfg(tmp_path, f"train.seed={s}") for s in (0, 1)]
    with pytest.raises(RuntimeError, match="simulated"):
        driver.train_batch(cfgs)
    client = MlflowClient(tracking.resolve_uri(cfgs[0].tracking))
    runs = client.search_runs([client.get_experiment_by_name(cfgs[0].name).experiment_id])
    assert sorted(r.info.status for r in runs) == ["FAILED", "FAILED"]
