"""The training loop through the engine with one run: clipping placement, fp16 loss-scaling order, divergence,
schedules, early stopping, monitoring, checkpoints and resume."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fincast.config import from_dict
from fincast.features import Split
from fincast.models import LSTMForecaster
from fincast.training import fit, lr_factor
from fincast.training.optim import StackedOptimizer


def _cfg(**sections):
    return from_dict(sections)


def _batch(n=32, L=10, f=4, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, L, f, generator=g)
    y = torch.randn(n, generator=g) * scale
    return x, y


def _model(seed=0, f=4, hidden=16):
    torch.manual_seed(seed)
    return LSTMForecaster(f, hidden)


def _reference_grads(model, x, y):
    """Unclipped gradients of the MSE loss (torch's nn.LSTM), computed independently of the engine."""
    model.zero_grad(set_to_none=True)
    torch.nn.functional.mse_loss(model(x), y).backward()
    grads = [p.grad.detach().clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return grads


def _l2(tensors):
    return math.sqrt(sum(float((t.double() ** 2).sum()) for t in tensors))


def _one_step(model, x, y, cfg, monkeypatch, sink=None, **kw):
    """One engine step on the whole batch (x, y); returns the gradients the optimizer saw (per parameter)."""
    seen = []
    real = StackedOptimizer.step

    def spy(self, flat, grad, *args, **kwargs):
        seen.append(grad.detach().clone())
        return real(self, flat, grad, *args, **kwargs)

    monkeypatch.setattr(StackedOptimizer, "step", spy)
    train = dict(epochs=1, batch_size=len(y), max_steps=1, patience=None)
    cfg = from_dict({"train": train, "clip": _clip_raw(cfg), "monitor": {"every": None}})
    result = fit(model, _split(x, y), _split(x, y), cfg.train, cfg.clip, device=torch.device("cpu"), sink=sink,
                 monitor=cfg.monitor, **kw)
    assert len(seen) == 1
    flat = seen[0][0]
    out, at = [], 0
    for p in model.parameters():
        out.append(flat[at:at + p.numel()].view(p.shape))
        at += p.numel()
    return out, result


def _clip_raw(cfg):
    from fincast.config import to_dict

    return to_dict(cfg)["clip"]


@pytest.mark.parametrize("max_norm", [0.01, 0.1])
def test_optimizer_sees_clipped_gradients(max_norm, monkeypatch):
    cfg = _cfg(clip={"method": "norm", "norm": {"max_norm": max_norm}})
    model = _model()
    x, y = _batch(scale=5.0)
    ref = _reference_grads(model, x, y)
    assert _l2(ref) > max_norm  # otherwise the test proves nothing
    seen, result = _one_step(model, x, y, cfg, monkeypatch)
    assert _l2(seen) <= max_norm * (1 + 1e-5)
    # direction preserved: seen = coef * reference
    coef = _l2(seen) / _l2(ref)
    for s, r in zip(seen, ref):
        torch.testing.assert_close(s, r * coef, rtol=1e-4, atol=1e-7)
    assert result.history["norm_pre"][0] == pytest.approx(_l2(ref), rel=1e-5)
    assert result.history["norm_post"][0] == pytest.approx(_l2(seen), rel=1e-5)
    assert result.history["clipped"][0] == 1.0


def test_method_none_leaves_gradients_untouched(monkeypatch):
    cfg = _cfg(clip={"method": "none"})
    model = _model()
    x, y = _batch(scale=5.0)
    ref = _reference_grads(model, x, y)
    seen, result = _one_step(model, x, y, cfg, monkeypatch)
    for s, r in zip(seen, ref):
        torch.testing.assert_close(s, r, rtol=1e-5, atol=1e-7)
    assert result.history["norm_post"][0] == result.history["norm_pre"][0]
    assert result.history["clipped"][0] == 0.0


def test_value_clipping_bounds_every_element_the_optimizer_sees(monkeypatch):
    cfg = _cfg(clip={"method": "value", "value": {"value": 1e-3}})
    x, y = _batch(scale=5.0)
    seen, _ = _one_step(_model(), x, y, cfg, monkeypatch)
    assert max(float(g.abs().max()) for g in seen) <= float(np.float32(1e-3))


def test_amp_loss_scale_is_undone_before_clipping(monkeypatch):
    """With fp16 loss scaling, clipping must see the true (unscaled) gradients: the recorded pre-clip norm is the
    unscaled norm, and what the optimizer gets is bounded by max_norm, not max_norm * scale. (fp16 on a CPU:
    the loss scaling runs, autocast does not.)"""
    cfg = _cfg(clip={"method": "norm", "norm": {"max_norm": 0.05}})
    model = _model()
    x, y = _batch(scale=5.0)
    ref = _reference_grads(model, x, y)
    seen, result = _one_step(model, x, y, cfg, monkeypatch, precision="fp16", loss_scale=2.0 ** 12)
    assert result.history["norm_pre"][0] == pytest.approx(_l2(ref), rel=1e-4)  # not 4096 x larger
    assert _l2(seen) <= 0.05 * (1 + 1e-5)


def test_amp_scaler_skipped_step_is_not_divergence():
    """An fp16 overflow makes the loss scaler skip the step; the loop must not call that divergence."""
    cfg = _cfg(clip={"method": "norm"}, train={"epochs": 1, "batch_size": 8})
    model = _model()
    x, y = _batch(n=16, scale=100.0)  # loss ~1e4: times the scale below it overflows float32
    split = _split(x, y)
    result = fit(model, split, split, cfg.train, cfg.clip, device=torch.device("cpu"), precision="fp16",
                 loss_scale=1e38)
    assert not result.diverged
    assert not math.isfinite(result.history["norm_pre"][0])  # the overflow really happened


def _split(x, y):
    n = len(y)
    dates = np.arange(n).astype("datetime64[D]")
    return Split(x.numpy(), y.numpy(), y.numpy().astype(float), np.ones(n), dates, dates + 1,
                 np.full(n, "T", dtype=object))


def test_non_finite_loss_marks_divergence_at_the_exact_step():
    cfg = _cfg(clip={"method": "none"}, train={"epochs": 3, "batch_size": 8, "seed": 1},
               tracking={"log_every": 50})
    model = _model()
    x, y = _batch(n=64)
    y[:] = y.clamp(-1, 1)
    rows = []
    split = _split(x, y)

    def sink(batch):
        rows.extend(batch)

    # clean data trains without divergence; then one NaN target diverges the step whose batch holds it
    result = fit(model, split, split, cfg.train, cfg.clip, device=torch.device("cpu"), sink=sink)
    assert not result.diverged and result.steps == 24
    bad = _split(x, y)
    bad.y[5] = np.nan  # sample 5 lands in some batch of epoch 1
    rows.clear()
    result = fit(_model(), bad, split, cfg.train, cfg.clip, device=torch.device("cpu"), sink=sink)
    assert result.diverged
    assert result.stop_reason == "diverged"
    assert "non-finite training loss" in result.diverged_reason
    # the diverged step is the one whose batch held sample 5 (shuffle order from the seeded generator)
    order = torch.randperm(64, generator=torch.Generator().manual_seed(1))
    expected_step = int((order == 5).nonzero()) // 8 + 1
    assert result.diverged_step == expected_step
    losses = [(s, v) for k, v, s in rows if k == "train/loss"]
    assert max(s for s, _ in losses) == expected_step  # nothing logged after the divergence
    assert all(math.isfinite(v) for s, v in losses if s < expected_step)


def test_lr_schedule_warmup_then_cosine():
    cfg = _cfg(train={"schedule": "cosine", "warmup_steps": 10, "min_lr_ratio": 0.1}).train
    total = 110
    assert lr_factor(0, cfg, 10, total) == pytest.approx(0.1)
    assert lr_factor(9, cfg, 10, total) == pytest.approx(1.0)
    assert lr_factor(10, cfg, 10, total) == pytest.approx(1.0)
    assert lr_factor(60, cfg, 10, total) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(110, cfg, 10, total) == pytest.approx(0.1)
    step = _cfg(train={"schedule": "step", "step_size": 2, "gamma": 0.5}).train
    assert [lr_factor(s, step, 10, 100) for s in (0, 19, 20, 40)] == [1.0, 1.0, 0.5, 0.25]


def test_early_stopping_restores_best_weights():
    cfg = _cfg(train={"epochs": 40, "batch_size": 16, "patience": 3, "lr": 3e-2}, clip={"method": "none"})
    x, y = _batch(n=64)
    xv, yv = _batch(n=32, seed=1)  # validation targets unrelated to inputs: overfitting shows quickly
    model = _model()
    result = fit(model, _split(x, y), _split(xv, yv), cfg.train, cfg.clip, device=torch.device("cpu"))
    assert result.stop_reason == "early_stopping"
    assert result.epochs == result.best_epoch + 3
    with torch.no_grad():
        final_val = float(torch.nn.functional.mse_loss(model(xv), yv))
    assert final_val == pytest.approx(result.best_val_loss, rel=1e-5)
    assert result.best_val_loss == pytest.approx(min(result.val_history), rel=1e-9)


def test_step_metrics_are_logged_for_every_step_in_batches():
    cfg = _cfg(train={"epochs": 2, "batch_size": 16}, tracking={"log_every": 3})
    x, y = _batch(n=64)
    calls = []
    fit(_model(), _split(x, y), _split(x, y), cfg.train, cfg.clip, device=torch.device("cpu"),
        sink=lambda rows: calls.append(list(rows)), log_every=3)
    steps = sorted(s for rows in calls for k, _, s in rows if k == "grad/norm_pre")
    assert steps == list(range(1, 9))
    assert len(calls) < 8  # batched: fewer sink calls than steps
    keys = {k for rows in calls for k, _, _ in rows}
    assert {"train/loss", "grad/norm_pre", "grad/norm_post", "lr", "val/loss", "val/rmse",
            "val/mae", "val/directional_accuracy"} <= keys


def test_max_steps_stops_training():
    cfg = _cfg(train={"epochs": 10, "batch_size": 16, "max_steps": 5})
    x, y = _batch(n=64)
    result = fit(_model(), _split(x, y), _split(x, y), cfg.train, cfg.clip, device=torch.device("cpu"))
    assert result.steps == 5 and result.stop_reason == "max_steps"


# ---------------------------------------------------------------------------------------------
# Every method through the loop; monitoring
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["none", "value", "norm", "autoclip", "agc", "zclip"])
def test_every_method_trains_and_logs_the_same_statistics(method):
    cfg = _cfg(train={"epochs": 2, "batch_size": 8}, clip={"method": method, "zclip": {"warmup": 3}},
               monitor={"every": 4})
    x, y = _batch(n=64)
    rows = []
    result = fit(_model(), _split(x, y), _split(x, y), cfg.train, cfg.clip, device=torch.device("cpu"),
                 sink=rows.extend, log_every=5, monitor=cfg.monitor)
    assert result.steps == 16 and not result.diverged
    per_step = {k: [s for kk, _, s in rows if kk == k] for k in ("train/loss", "grad/norm_pre", "grad/norm_post")}
    for key, steps in per_step.items():
        assert steps == list(range(1, 17)), key
    assert not [k for k, _, _ in rows if k in ("grad/clipped", "grad/clip_fraction")]  # the history has them
    assert all(0.0 <= v <= 1.0 for v in result.history["clip_fraction"])
    lrs = [(s, v) for k, v, s in rows if k == "lr"]  # a step function: logged from step 1, then where it changes
    assert lrs[0][0] == 1 and all(a[1] != b[1] for a, b in zip(lrs, lrs[1:]))
    assert [v for s, v in lrs] == [result.history["lr"][s - 1] for s, _ in lrs]
    thresholds = [(s, v) for k, v, s in rows if k == "grad/threshold"]
    assert (method == "none") == (not thresholds)
    if thresholds:
        assert thresholds[0][0] == 1  # the threshold in force from the first step
    layer_steps = sorted({s for k, _, s in rows if k.startswith("grad/layer/")})
    assert layer_steps == [4, 8, 12, 16]
    assert {k for k, _, _ in rows if k.startswith(("grad/layer/", "update/ratio/"))} == {
        "grad/layer/lstm.l0", "grad/layer/head", "update/ratio/lstm.l0", "update/ratio/head"}


def test_metric_rows_at_a_cadence_with_every_epoch_end_and_the_history_whole():
    """metric_every=5 over 2 epochs of 8 steps: MLflow gets steps 5, 10, 15 (the cadence), 8 and 16 (each
    validation's step); the run's history (its series file) keeps all 16."""
    cfg = _cfg(train={"epochs": 2, "batch_size": 8, "patience": None}, clip={"method": "norm"})
    x, y = _batch(n=64)
    rows = []
    result = fit(_model(), _split(x, y), _split(x, y), cfg.train, cfg.clip, device=torch.device("cpu"),
                 sink=rows.extend, log_every=3, metric_every=5)
    assert result.steps == 16
    assert [s for k, _, s in rows if k == "train/loss"] == [5, 8, 10, 15, 16]
    assert [s for k, _, s in rows if k == "val/loss"] == [8, 16] == result.val_steps
    sent = {s: v for k, v, s in rows if k == "train/loss"}
    assert all(sent[s] == result.history["loss"][s - 1] for s in sent)
    assert all(len(result.history[k]) == 16 for k in ("loss", "norm_pre", "norm_post", "threshold", "clipped",
                                                       "clip_fraction", "lr"))


def test_a_diverged_step_reaches_mlflow_whatever_the_cadence():
    cfg = _cfg(train={"epochs": 1, "batch_size": 8, "patience": None}, clip={"method": "none"})
    x, y = _batch(n=64)
    bad = _split(x, y)
    bad.y[5] = np.nan  # one batch of the epoch holds it: that step diverges
    rows = []
    result = fit(_model(), bad, _split(x, y), cfg.train, cfg.clip, device=torch.device("cpu"), sink=rows.extend,
                 metric_every=1000)
    assert result.diverged
    assert [(s, math.isnan(v)) for k, v, s in rows if k == "train/loss"] == [(result.diverged_step, True)]


def test_layer_norms_and_update_ratios_match_an_independent_computation():
    cfg = _cfg(clip={"method": "norm", "norm": {"max_norm": 0.01}}, monitor={"every": 1},
               train={"epochs": 1, "batch_size": 32, "max_steps": 1, "patience": None})
    model = _model()
    x, y = _batch()
    ref = _reference_grads(model, x, y)
    names = [n for n, _ in model.named_parameters()]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rows = []
    result = fit(model, _split(x, y), _split(x, y), cfg.train, cfg.clip, device=torch.device("cpu"), sink=rows.extend,
                 monitor=cfg.monitor, restore_best=False)
    groups = {"lstm.l0": [i for i, n in enumerate(names) if n.startswith("lstm.")],
              "head": [i for i, n in enumerate(names) if n.startswith("head.")]}
    after = dict(model.named_parameters())
    expected_grad = [_l2([ref[i] for i in idx]) for idx in groups.values()]
    expected_ratio = [_l2([after[names[i]].detach() - before[names[i]] for i in idx])
                      / _l2([before[names[i]] for i in idx]) for idx in groups.values()]
    got = {k: v for k, v, s in rows if s == 1}
    np.testing.assert_allclose([got[f"grad/layer/{n}"] for n in groups], expected_grad, rtol=1e-5)  # pre-clip
    np.testing.assert_allclose([got[f"update/ratio/{n}"] for n in groups], expected_ratio, rtol=1e-4)
    assert result.history["clipped"][0] == 1.0  # so the ratios reflect the clipped update


def test_gradient_spikes_are_counted_against_the_running_median():
    from fincast.training import SpikeCounter

    counter = SpikeCounter(factor=5.0, window=20)
    norms = [1.0 + 0.01 * i for i in range(30)]
    norms[15], norms[25] = 50.0, 4.0  # one spike; 4 x the median is not one
    flags = [counter.see(v) for v in norms]
    assert [i for i, f in enumerate(flags) if f] == [15]
    assert counter.count == 1
    assert not counter.see(math.inf)  # non-finite norms are skipped steps, not spikes
    # in the loop: a batch of huge targets makes one step's norm jump
    cfg = _cfg(train={"epochs": 1, "batch_size": 4, "lr": 1e-4}, clip={"method": "none"},
               monitor={"spike_factor": 5.0, "spike_window": 50})
    x, y = _batch(n=96)
    y = y.clamp(-1, 1)
    rows = []
    order = torch.randperm(96, generator=torch.Generator().manual_seed(0))
    y[order[4 * 17:4 * 18]] = 1e4  # step 18's batch
    fit(_model(), _split(x, y), _split(x, y), cfg.train, cfg.clip, device=torch.device("cpu"), sink=rows.extend,
        monitor=cfg.monitor)
    spikes = [(s, v) for k, v, s in rows if k == "grad/spikes"]
    assert spikes[0] == (1, 0) and (18, 1) in spikes and spikes[-1][1] >= 1


def test_amp_skipped_steps_are_counted():
    cfg = _cfg(clip={"method": "norm"}, train={"epochs": 1, "batch_size": 8})
    x, y = _batch(n=16, scale=100.0)
    rows = []
    fit(_model(), _split(x, y), _split(x, y), cfg.train, cfg.clip, device=torch.device("cpu"), sink=rows.extend,
        precision="fp16", loss_scale=1e38)  # the first step overflows
    skipped = [(s, v) for k, v, s in rows if k == "grad/skipped_steps"]
    assert skipped[0] == (1, 1)  # the overflowed first step
    assert skipped[-1][1] == sum(1 for k, v, _ in rows if k == "grad/norm_pre" and not math.isfinite(v))


# ---------------------------------------------------------------------------------------------
# Checkpoints: a resumed run continues exactly
# ---------------------------------------------------------------------------------------------


def _roundtrip(payload):
    import io

    buf = io.BytesIO()
    torch.save(payload, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)  # what runs.checkpoints.load_checkpoint does


@pytest.mark.parametrize("method", ["autoclip", "zclip", "norm"])
def test_resume_from_any_checkpoint_continues_bit_exactly(method):
    cfg = _cfg(train={"epochs": 3, "batch_size": 8, "checkpoint_every": 5, "patience": None},
               clip={"method": method, "zclip": {"warmup": 4, "z_thresh": 0.5}, "autoclip": {"percentile": 30}},
               model={"dropout": 0.2}, monitor={"every": 3})
    x, y = _batch(n=60)
    split = _split(x, y)
    saved, rows = [], []

    def run(model, resume=None, sink=None, checkpoint=None):
        return fit(model, split, split, cfg.train, cfg.clip, device=torch.device("cpu"), log_every=4, sink=sink,
                   monitor=cfg.monitor, checkpoint=checkpoint, resume=resume)

    def model_with_dropout():
        torch.manual_seed(0)
        return LSTMForecaster(4, 16, num_layers=2, dropout=0.2)

    full_model = model_with_dropout()
    full = run(full_model, sink=rows.extend, checkpoint=lambda p: saved.append(_roundtrip(p)))
    assert full.steps == 24
    # mid-epoch (every 5 steps) and epoch-end (every 8 steps) checkpoints
    points = [(c["run"]["step"], c["loop"]["batch"]) for c in saved]
    assert (5, 5) in points and (8, 0) in points and (10, 2) in points
    for ckpt in (saved[0], saved[1], saved[3]):
        k = ckpt["run"]["step"]
        resumed_rows = []
        model = model_with_dropout()
        torch.manual_seed(123)  # the global RNG (dropout) must come from the checkpoint, not from here
        result = run(model, resume=ckpt, sink=resumed_rows.extend)
        for (name, a), b in zip(full_model.state_dict().items(), model.state_dict().values()):
            assert torch.equal(a, b), (k, name)
        assert result.history["loss"] == full.history["loss"]  # the whole history, as one run
        assert result.val_history == full.val_history
        assert result.best_epoch == full.best_epoch
        # the resumed run logs exactly the rows the full run logged after step k
        assert sorted(r for r in resumed_rows) == sorted(r for r in rows if r[2] > k)


@pytest.mark.slow  # a few seconds of process start-up; runs in make test-slow and .ci/run
def test_distributed_data_parallel_matches_one_process_with_the_same_global_batch(tmp_path):
    """torchrun, 2 gloo processes on CPU: each rank trains its shard of every global batch (shards of 3 and 2,
    and 1 and none for each epoch's last batch of one sample),
    gradients are all-reduced before clipping (stateful AutoClip), and after several clipped steps the
    parameters equal a one-process run's."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    here = Path(__file__).resolve().parents[1] / "support"
    sys.path.insert(0, str(here))
    try:
        import ddp_fit
    finally:
        sys.path.remove(str(here))
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    out = tmp_path / "ddp.pt"
    proc = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", str(here / "ddp_fit.py"), "autoclip",
                           str(out)], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = torch.load(out, weights_only=False)
    single = ddp_fit.run("autoclip")
    assert ddp["steps"] == single["steps"] == 9  # 5 batches per epoch: step 5 is the one-sample batch
    assert ddp["resume_exact"]  # and under DDP, with dropout, a resumed run ends where the whole run did
    assert sum(single["history"]["clipped"]) >= 3  # several steps really were clipped
    for name, p in single["params"].items():
        torch.testing.assert_close(ddp["params"][name], p, rtol=1e-5, atol=1e-6)
    # rank 0 logs the global loss (the mean over both shards), not its own shard's
    np.testing.assert_allclose(ddp["history"]["loss"], single["history"]["loss"], rtol=1e-5)
    np.testing.assert_allclose(ddp["history"]["norm_post"], single["history"]["norm_post"], rtol=1e-4)


def _ckpt_run(cfg, split, resume=None, saved=None, model_seed=0):
    model = _model(model_seed)
    result = fit(model, split, split, cfg.train, cfg.clip, device=torch.device("cpu"), monitor=cfg.monitor,
                 checkpoint=(lambda p: saved.append(_roundtrip(p))) if saved is not None else None, resume=resume)
    return model, result


def test_max_steps_mid_epoch_resumes_where_it_stopped():
    x, y = _batch(n=40)
    split = _split(x, y)
    base = {"epochs": 3, "batch_size": 8, "patience": None}  # 5 steps per epoch, no lr schedule
    saved = []
    _, short = _ckpt_run(_cfg(train={**base, "max_steps": 7}), split, saved=saved)
    assert short.steps == 7 and (saved[-1]["loop"]["epoch"], saved[-1]["loop"]["batch"]) == (1, 2)
    assert len(short.val_history) == 2  # the stopped run is validated where it stopped
    longer = _cfg(train={**base, "max_steps": 10})
    resumed_model, resumed = _ckpt_run(longer, split, resume=saved[-1])
    straight_model, straight = _ckpt_run(longer, split)
    assert resumed.steps == 10
    assert resumed.history["loss"] == straight.history["loss"]  # the epoch's rest, not a skipped epoch
    # the validation at step 7 belongs to the stopped run only: the continued run validates epoch 2 once, at its
    # end, with the early-stopping bookkeeping and best weights of a run that never stopped
    assert resumed.val_history == straight.val_history and len(straight.val_history) == 2
    assert (resumed.best_epoch, resumed.best_val_loss) == (straight.best_epoch, straight.best_val_loss)
    for a, b in zip(resumed_model.state_dict().values(), straight_model.state_dict().values()):
        assert torch.equal(a, b)
    # resumed with the same limit, it stays the run that stopped
    _, again = _ckpt_run(_cfg(train={**base, "max_steps": 7}), split, resume=saved[-1])
    assert again.stop_reason == "max_steps" and again.val_history == short.val_history


def test_a_validation_at_a_mid_epoch_stop_is_undone_when_a_resume_raises_the_limit():
    """The partial validation at a max_steps stop improves the best loss: a resume with a higher limit must not
    keep that epoch as the best (a run that never stopped never saw it)."""
    x, y = _batch(n=40)
    split = _split(x, y)
    base = {"epochs": 4, "batch_size": 8, "patience": 1, "lr": 1e-2}
    saved = []
    _, short = _ckpt_run(_cfg(train={**base, "max_steps": 12}), split, saved=saved)
    rewind = saved[-1]["loop"]["rewind"]
    assert rewind["validations"] == 2 and len(short.val_history) == 3
    _, resumed = _ckpt_run(_cfg(train={**base, "max_steps": None}), split, resume=saved[-1])
    _, straight = _ckpt_run(_cfg(train={**base, "max_steps": None}), split)
    assert resumed.val_history == straight.val_history
    assert (resumed.best_epoch, resumed.stop_reason) == (straight.best_epoch, straight.stop_reason)


def test_checkpoint_every_alone_also_saves_at_epoch_ends_and_resume_after_early_stop_stops():
    x, y = _batch(n=40)
    split = _split(x, y)
    saved = []
    cfg = _cfg(train={"epochs": 2, "batch_size": 8, "checkpoint": False, "checkpoint_every": 5})
    _ckpt_run(cfg, split, saved=saved)
    assert [c["run"]["step"] for c in saved] == [5, 10]
    xv, yv = _batch(n=32, seed=1)
    stop_cfg = _cfg(train={"epochs": 40, "batch_size": 16, "patience": 2, "lr": 3e-2}, clip={"method": "none"})
    saved = []
    model = _model()
    first = fit(model, _split(x, y), _split(xv, yv), stop_cfg.train, stop_cfg.clip, device=torch.device("cpu"),
                checkpoint=lambda p: saved.append(_roundtrip(p)))
    assert first.stop_reason == "early_stopping"
    again = fit(_model(), _split(x, y), _split(xv, yv), stop_cfg.train, stop_cfg.clip, device=torch.device("cpu"),
                resume=saved[-1])
    assert again.stop_reason == "early_stopping" and again.steps == first.steps  # no extra epoch


def test_resume_leaves_the_checkpoint_as_saved_and_follows_a_changed_schedule():
    x, y = _batch(n=40)
    split = _split(x, y)
    cfg = _cfg(train={"epochs": 2, "batch_size": 8, "schedule": "cosine", "patience": None})
    saved = []
    _ckpt_run(cfg, split, saved=saved)
    ckpt = saved[-1]
    before = _roundtrip(ckpt)
    longer = _cfg(train={"epochs": 4, "batch_size": 8, "schedule": "cosine", "patience": None})
    rows = []
    fit(_model(), split, split, longer.train, longer.clip, device=torch.device("cpu"), resume=ckpt, sink=rows.extend)
    lrs = dict((s, v) for k, v, s in rows if k == "lr")
    # the new schedule from step 11: cosine over 4 x 5 = 20 steps, step 11 halfway: 1e-3 x (1 + cos(pi / 2)) / 2
    # (the old 10-step schedule would have ended at 0 there)
    assert lrs[11] == pytest.approx(5e-4)
    assert ckpt["loop"]["history"] == before["loop"]["history"]
    for k, v in before["optimizer"].items():  # Adam moments untouched
        assert torch.equal(ckpt["optimizer"][k], v) if isinstance(v, torch.Tensor) else ckpt["optimizer"][k] == v
