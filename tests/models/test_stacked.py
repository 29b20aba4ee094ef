"""Stacked nets: K models of one architecture as one computation against torch's own modules (nn.LSTM, the solo
forecaster and option net), for the grouped LSTM's compiled CPU kernel and its torch-ops loop; how studies plan
their stacks, and a stacked study against an unbatched one. (Stacked training runs against runs alone:
tests/test_engine.py.)"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fincast.experiments import workers
from fincast.models import LSTMForecaster
from fincast.models.options import OptionLSTM
from fincast.models.stacked import StackedNet


def _model(seed, hidden=8, f=4, **kw):
    torch.manual_seed(seed)
    return LSTMForecaster(f, hidden, **kw)


@pytest.fixture(params=["cpp", "python"])
def kernel(request, monkeypatch):
    """The stacked LSTM's two implementations of the time loops: the compiled CPU kernel (grouped_lstm.cpp),
    and the torch-ops loop used on CUDA or where the kernel cannot be built."""
    from fincast.models import grouped_lstm as batched

    if request.param == "python":
        monkeypatch.setitem(batched._KERNEL, "module", None)
    elif batched.cpu_kernel() is None:
        pytest.skip("the C++ kernel could not be built here (no C++ compiler?)")
    return request.param


def _option_model(seed, hidden=6, **kw):
    torch.manual_seed(seed)
    return OptionLSTM(3, 7, 2, hidden_size=hidden, head_hidden=5, **kw)


@pytest.mark.parametrize("kind", ["forecast", "option"])
@pytest.mark.parametrize("layers,layer_norm", [(1, False), (2, True)])
@pytest.mark.parametrize("runs", [1, 3])
def test_stacked_net_matches_each_solo_model_in_float64(layers, layer_norm, kind, runs, kernel):
    """Forward and every parameter's gradient of each run equal its own module's (torch's nn.LSTM, Linear, SiLU,
    LayerNorm, softplus floor), for the forecaster and the option net, one run (ATen's LSTM where the compiled
    kernel is off) and three (the grouped LSTM)."""
    build = _model if kind == "forecast" else _option_model
    models = [build(s, hidden=6, num_layers=layers, layer_norm=layer_norm).double() for s in range(runs)]
    net = StackedNet(models)
    g = torch.Generator().manual_seed(0)
    shape = (runs, 5, 7, 4) if kind == "forecast" else (runs, 5, 3 + 1 + 7 * 2)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    y = torch.randn(runs, 5, generator=g, dtype=torch.float64)
    for _ in range(2):  # gradients accumulate into the stack's one gradient tensor, in place
        net.grad.zero_()
        pred = net(x)
        (pred - y).square().mean(1).sum().backward()
    assert all(v.grad.data_ptr() == net.grad[:, a:b].data_ptr() for v, (a, b) in zip(net.params.values(),
                                                                                    net.spans.values()))
    for k, m in enumerate(models):
        p = m(x[k])
        (p - y[k]).square().mean().backward()
        torch.testing.assert_close(pred[k], p)
        for name, w in net.params.items():
            torch.testing.assert_close(w.grad[k], dict(m.named_parameters())[name].grad, msg=name)
    preds = net.predict(x[0], chunk=4)  # every run on the same samples, in chunks, without grad
    for k, m in enumerate(models):
        torch.testing.assert_close(preds[k].double(), m(x[0]).float().double(), rtol=1e-6, atol=1e-7)


def test_stacked_net_refuses_models_of_different_architectures():
    with pytest.raises(ValueError, match="architecture"):
        StackedNet([_model(0, hidden=6), _model(1, hidden=8)])
    with pytest.raises(TypeError, match="no stacked form"):
        StackedNet([torch.nn.Linear(2, 1)])


def test_stacked_forecaster_saturates_and_propagates_nan_like_nn_lstm_in_float32(kernel):
    """Large pre-activations (exp clamped in the kernel) give nn.LSTM's values; a NaN weight makes that run's
    outputs and gradients NaN (divergence is detected from them) and leaves the other runs finite."""
    models = [_model(s, hidden=6) for s in range(3)]
    with torch.no_grad():
        models[0].lstm.weight_ih_l0.mul_(400.0)  # gates saturate: |pre-activation| in the hundreds
        models[0].lstm.bias_hh_l0.add_(200.0)
    net = StackedNet(models)
    x = torch.randn(3, 5, 7, 4, generator=torch.Generator().manual_seed(0))
    pred = net(x)
    pred.sum().backward()
    for k, m in enumerate(models):
        p = m(x[k])
        p.sum().backward()
        torch.testing.assert_close(pred[k], p, rtol=1e-4, atol=1e-5)
        for name, w in net.params.items():
            torch.testing.assert_close(w.grad[k], dict(m.named_parameters())[name].grad, rtol=1e-3, atol=1e-4,
                                       msg=name)
    with torch.no_grad():
        net.params["lstm.weight_hh_l0"][1, 0, 0] = float("nan")
    net.grad.zero_()
    pred = net(x)
    pred.sum().backward()
    w_grad = net.params["lstm.weight_hh_l0"].grad
    assert torch.isnan(pred[1]).all() and torch.isfinite(pred[[0, 2]]).all()
    assert torch.isnan(w_grad[1]).any() and torch.isfinite(w_grad[[0, 2]]).all()


def test_cpu_kernel_falls_back_to_torch_ops_when_it_cannot_be_built(monkeypatch, caplog):
    from torch.utils import cpp_extension

    from fincast.models import grouped_lstm as batched

    def no_compiler(**kw):
        raise RuntimeError("Error building extension\nc++: command not found")

    monkeypatch.setitem(batched._KERNEL, "module", "unset")
    batched._KERNEL.pop("module")
    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    with caplog.at_level("WARNING", logger="fincast.models"):
        assert batched.cpu_kernel() is None
    assert "c++: command not found" in caplog.text and "slower torch-ops LSTM" in caplog.text
    models = [_model(s) for s in range(2)]
    x = torch.randn(2, 3, 12, 4)
    out = StackedNet(models)(x)  # still runs, on the torch-ops loop
    for k, m in enumerate(models):
        torch.testing.assert_close(out[k], m(x[k]))
    monkeypatch.setenv("FINCAST_LSTM_KERNEL", "python")
    batched._KERNEL.pop("module")
    assert batched.cpu_kernel() is None  # switched off: no build attempted


def test_rows_give_each_runs_weights_back():
    models = [_model(s) for s in range(3)]
    net = StackedNet(models)
    for k, m in enumerate(models):
        state = net.row(k)
        assert state.keys() == m.state_dict().keys()
        for name, value in m.state_dict().items():
            assert torch.equal(state[name], value)
        assert torch.equal(net.vector(m.state_dict()), net.flat[k])
        other = _model(99)
        net.load_into(k, other)
        assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), m.state_dict().values()))


# ---------------------------------------------------------------------------------------------
# Studies: batches planned from the grid, and a batched study's report equals an unbatched one's
# ---------------------------------------------------------------------------------------------


def _tiny_study(tmp_path, name, *extra):
    from tiny_study import TINY, _spec

    from fincast.experiments import study as study_mod

    spec = _spec(tmp_path, lr=[1e-2, 3e-2])
    store = [f"tracking.uri=sqlite:///{tmp_path / name}.db", f"tracking.artifact_dir={tmp_path / name}"]
    return study_mod.load(spec, [*TINY, *store, *extra])


def test_plan_chunks_groups_stackable_runs_and_splits_them_evenly(tmp_path):
    import dataclasses


    study = _tiny_study(tmp_path, "plan", "train.device=cpu")  # (auto would pick a GPU where there is one)
    jobs = list(study.jobs)  # 2 clips x 2 lrs x 3 seeds = 12 runs of one architecture
    assert [len(c) for c in workers.plan_chunks(jobs, 5, 1)] == [4, 4, 4]
    assert [len(c) for c in workers.plan_chunks(jobs, 1, 1)] == [1] * 12
    six = workers.plan_chunks(jobs, 6, 2)
    assert [len(c) for c in six] == [6, 6] and [j for c in six for j in c] == jobs
    # auto on a CPU: stacked with the compiled kernel, ~4 batches per worker of at least 2 runs; one at a time
    # without the kernel (the torch-ops loop gains nothing over a run alone there: bench/run_axis.py)
    from fincast.models import grouped_lstm as batched

    if batched.cpu_kernel() is not None:
        assert [len(c) for c in workers.plan_chunks(jobs, "auto", 2)] == [2] * 6
        assert [len(c) for c in workers.plan_chunks(jobs, "auto", 1)] == [3] * 4
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(batched._KERNEL, "module", None)
        assert [len(c) for c in workers.plan_chunks(jobs, "auto", 1)] == [1] * 12
    # checkpoints and precision stack (each run writes its own checkpoint); another model config (dropout here)
    # is another architecture setting: a stack of its own
    drop = dataclasses.replace(jobs[0].cfg, model=dataclasses.replace(jobs[0].cfg.model, dropout=0.1))
    ckpt = dataclasses.replace(jobs[1].cfg, train=dataclasses.replace(jobs[1].cfg.train, checkpoint=True,
                                                                      checkpoint_every=7))
    mixed = [dataclasses.replace(jobs[0], cfg=drop), dataclasses.replace(jobs[1], cfg=ckpt), *jobs[2:]]
    chunks = workers.plan_chunks(mixed, 100, 1)
    assert sorted(len(c) for c in chunks) == [1, 11]


def test_auto_batch_is_bounded_by_the_memory_budget(tmp_path):

    cfg = _tiny_study(tmp_path, "auto").jobs[0].cfg
    per_run = workers.run_bytes(cfg)
    assert workers.budget_batch(4 * 10 * per_run, per_run, 100, 1) == 10  # a quarter of the memory holds 10
    assert workers.budget_batch(4 * 10 * per_run, per_run, 6, 1) == 6
    assert workers.budget_batch(4 * 10 * per_run, per_run, 100, 4) == 10
    assert workers.budget_batch(4 * 10 * per_run, per_run, 12, 4) == 3  # split across the workers
    assert workers.available_ram() > 0
    if not torch.cuda.is_available():
        from fincast.models import grouped_lstm as batched

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(workers, "available_ram", lambda: 4 * 10 * per_run * 3)  # 10 runs per worker's quarter
            mp.setitem(batched._KERNEL, "module", object())  # (as if built)
            assert workers.auto_batch(cfg, 100, 3) == 9  # about four batches per worker
            assert workers.auto_batch(cfg, 400, 3) == 10  # the memory budget binds
            assert workers.auto_batch(cfg, 12, 3) == 2  # at least two runs per batch


def test_batch_runs_setting_is_checked(tmp_path):
    from fincast.config import ConfigError

    with pytest.raises(ConfigError, match="study.batch_runs = 0: must be >= 1"):
        _tiny_study(tmp_path, "bad", "study.batch_runs=0")
    with pytest.raises(ConfigError, match="study.batch_runs = 'many'"):
        _tiny_study(tmp_path, "bad", "study.batch_runs=many")


@pytest.mark.slow  # two studies and two reports (~20 s); runs in make test-slow and .ci/run
def test_batched_study_report_equals_the_unbatched_one(tmp_path):
    """The same study trained stacked (one batch of 12 with one worker) and one run at a time: every run
    has the same params, metric keys and values (up to float noise), and the stability report's numbers agree."""
    import json

    from mlflow.tracking import MlflowClient

    from fincast.experiments import study as study_mod
    from fincast.reports import stability

    out = {}
    for name, batch in (("solo", "1"), ("stacked", "12")):
        study = _tiny_study(tmp_path, name, f"study.batch_runs={batch}", "study.workers=1")
        study_mod.run(study)
        uri = f"sqlite:///{tmp_path / name}.db"
        stability.build("tiny_study", tracking_uri=uri, out_dir=tmp_path / name / "reports")
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name("tiny_study")
        runs = client.search_runs([exp.experiment_id], "tags.`fincast.study_role` = 'child'")
        summary = json.loads((tmp_path / name / "reports" / "tiny_study" / "summary.json").read_text())
        out[name] = ({r.info.run_name: r for r in runs}, summary, client)
    solo, stacked = out["solo"][0], out["stacked"][0]
    assert solo.keys() == stacked.keys() and len(solo) == 12
    for name, a in stacked.items():
        b = solo[name]
        assert a.data.tags["fincast.batch_runs"] == "12" and "fincast.batch_runs" not in b.data.tags
        pa, pb = ({k: v for k, v in r.data.params.items() if not k.startswith("tracking.")} for r in (a, b))
        assert pa == pb
        assert a.data.metrics.keys() == b.data.metrics.keys()
        for key, value in b.data.metrics.items():
            if not key.startswith("time/"):
                assert a.data.metrics[key] == pytest.approx(value, rel=1e-3, abs=1e-6), (name, key)
        hist_a = [m.value for m in out["stacked"][2].get_metric_history(a.info.run_id, "grad/norm_pre")]
        hist_b = [m.value for m in out["solo"][2].get_metric_history(b.info.run_id, "grad/norm_pre")]
        np.testing.assert_allclose(hist_a, hist_b, rtol=1e-3)
        arts = [sorted(f.path for f in out[k][2].list_artifacts(r.info.run_id)) for k, r in (("stacked", a), ("solo", b))]
        assert arts[0] == arts[1] and "predictions.csv" in arts[0] and "training_curves.png" not in arts[0]
    cells = [{(c["group"], c["clip"]): c for c in out[k][1]["cells"]} for k in ("stacked", "solo")]
    assert cells[0].keys() == cells[1].keys()
    for key, c in cells[1].items():
        for field, value in c.items():
            if isinstance(value, float) and not field.startswith("time") and math.isfinite(value):
                assert cells[0][key][field] == pytest.approx(value, rel=1e-3, abs=1e-6), (key, field)


@pytest.mark.slow  # two studies (~10 s)
def test_a_failing_batch_fails_its_runs_and_a_rerun_redoes_them(tmp_path, monkeypatch):
    from fincast.experiments import study as study_mod
    from fincast.runs import driver

    study = _tiny_study(tmp_path, "fail", "study.batch_runs=6", "study.workers=1")
    real = driver.train_runs
    calls = []

    def second_batch_breaks(models, *args, **kw):
        calls.append(len(models))
        if len(calls) == 2:
            raise RuntimeError("simulated crash in a batch")
        return real(models, *args, **kw)

    monkeypatch.setattr(driver, "train_runs", second_batch_breaks)
    out = study_mod.run(study)
    assert calls == [6, 6] and out.finished == 6 and len(out.failed) == 6
    assert all("simulated crash in a batch" in e for _, e in out.failed)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'fail'}.db")
    exp = client.get_experiment_by_name("tiny_study")
    runs = client.search_runs([exp.experiment_id], "tags.`fincast.study_role` = 'child'")
    assert sorted(r.info.status for r in runs) == ["FAILED"] * 6 + ["FINISHED"] * 6
    monkeypatch.setattr(driver, "train_runs", real)
    out = study_mod.run(study)
    assert (out.skipped, out.finished, out.failed) == (6, 6, [])


@pytest.mark.slow  # one study (~5 s)
def test_a_run_that_fails_to_close_fails_alone_its_stack_mates_finish(tmp_path, monkeypatch):
    """After the stack trained, each run is closed (test metrics, artifacts, model) on its own: one failing
    there is FAILED with its error, the other runs of the stack finish with everything logged."""
    from mlflow.tracking import MlflowClient

    from fincast.experiments import study as study_mod
    from fincast.runs import driver

    study = _tiny_study(tmp_path, "close", "study.batch_runs=6", "study.workers=1")
    real = driver.close_one
    closed = []

    def third_close_breaks(run, name, *args, **kw):
        closed.append(name)
        if len(closed) == 3:
            raise OSError("simulated disk full while logging artifacts")
        return real(run, name, *args, **kw)

    monkeypatch.setattr(driver, "close_one", third_close_breaks)
    out = study_mod.run(study)
    assert len(closed) == 12  # every run of both stacks was closed, also after the failure
    assert out.finished == 11 and len(out.failed) == 1
    (name, error), = out.failed
    assert name == closed[2] and "simulated disk full" in error
    client = MlflowClient(f"sqlite:///{tmp_path / 'close'}.db")
    exp = client.get_experiment_by_name("tiny_study")
    runs = client.search_runs([exp.experiment_id], "tags.`fincast.study_role` = 'child'")
    status = {r.info.run_name: r.info.status for r in runs}
    assert status.pop(closed[2]) == "FAILED" and set(status.values()) == {"FINISHED"} and len(status) == 11
    finished = [r for r in runs if r.info.status == "FINISHED"]
    assert all("best_val_loss" in r.data.metrics for r in finished)


def test_study_driver_does_not_query_cuda_before_it_forks_workers(tmp_path, monkeypatch):
    """torch.cuda.is_available() sets up the CUDA driver, after which forked workers cannot use the GPU: the
    driver decides whether to load the CPU kernel without it."""
    import contextlib

    from fincast.experiments import study as study_mod
    from fincast.runs.driver import batch_key

    events = []
    real_available = torch.cuda.is_available
    monkeypatch.setattr(torch.cuda, "is_available", lambda: events.append("cuda query") or real_available())

    @contextlib.contextmanager
    def pool(*args, **kwargs):  # where the workers would fork: stop the study there
        events.append("workers start")
        raise RuntimeError("stop before forking")
        yield

    monkeypatch.setattr(study_mod, "worker_pool", pool)
    study = _tiny_study(tmp_path, "nocuda", "train.device=auto")
    assert any(batch_key(j.cfg) for j in study.jobs)  # a study that stacks: the kernel is loaded first
    with pytest.raises(RuntimeError, match="stop before forking"):
        study_mod.run(study)
    assert events == ["workers start"]


@pytest.mark.slow  # one study (~5 s)
def test_a_stack_computes_its_baselines_once(tmp_path, monkeypatch):
    """The runs of a stack share their samples: ridge is fitted once per stack (2 stacks of 6 here) and once by
    the study's driver for its parent run, and every run records the same baseline metrics as the parent."""
    from mlflow.tracking import MlflowClient

    from fincast.experiments import study as study_mod
    from fincast.runs import forecast

    real, fits = forecast.ridge_forecast, []
    monkeypatch.setattr(forecast, "ridge_forecast", lambda *a, **kw: fits.append(1) or real(*a, **kw))
    study = _tiny_study(tmp_path, "base", "study.batch_runs=6", "study.workers=1")
    out = study_mod.run(study)
    assert out.finished == 12 and len(fits) == 3
    client = MlflowClient(f"sqlite:///{tmp_path / 'base'}.db")
    exp = client.get_experiment_by_name("tiny_study")
    runs = client.search_runs([exp.experiment_id], "tags.`fincast.study_role` = 'child'")
    parent = client.get_run(out.parent_run_id).data.metrics
    assert {r.data.metrics["baseline_ridge/rmse"] for r in runs} == {parent["baseline_ridge/rmse"]}
    assert {r.data.metrics["baseline_naive/rmse"] for r in runs} == {parent["baseline_naive/rmse"]}
