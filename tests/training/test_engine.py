"""The training engine's run axis: K runs stacked train exactly as each alone; one run (K = 1) trains as fincast's
documented semantics say (tests/reference_fit.py: torch's nn.LSTM and torch.optim, clippers from their papers);
the ops a step dispatches do not grow with K and never read a device value; the stacked optimizers and loss
scaling equal torch's per run; dropout, option nets, checkpoints and frozen runs stack."""

from __future__ import annotations

import copy
import io
import math

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fincast.config import from_dict
from fincast.features import Split
from fincast.models import LSTMForecaster
from fincast.models.options import OptionLSTM
from fincast.training import fit, train_runs
from fincast.training.engine import Engine
from fincast.training.optim import LossScale, StackedOptimizer

CPU = torch.device("cpu")


def _split(n, seed, lookback=12, f=4, width=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, lookback, f, generator=g) if width is None else torch.randn(n, width, generator=g)
    signal = x[:, -3:, 0].sum(1) if width is None else x[:, :3].sum(1)
    y = (signal * 0.5 + 0.3 * torch.randn(n, generator=g)).float()
    dates = np.arange(n).astype("datetime64[D]")
    return Split(x.numpy(), y.numpy(), y.numpy().astype(float) * 0.02, np.full(n, 0.02), dates, dates + 1,
                 np.full(n, "T", dtype=object))


TRAIN, VAL = _split(96, 0), _split(40, 1)

# every clip method and variant, every optimizer (with and without momentum / weight decay), every lr schedule
# and threshold schedule, early stopping and max_steps: each run differs in seed, lr and thresholds
MATRIX = [
    ({"seed": 0, "lr": 0.05, "optimizer": "sgd", "momentum": 0.9}, {"method": "none"}),
    ({"seed": 1, "lr": 0.01, "optimizer": "adamw", "weight_decay": 0.01, "schedule": "cosine", "warmup_steps": 5},
     {"method": "norm", "norm": {"max_norm": 0.5}}),
    ({"seed": 2, "lr": 0.1, "optimizer": "sgd", "momentum": 0.5}, {"method": "autoclip", "autoclip": {"percentile": 25}}),
    ({"seed": 3, "lr": 0.005, "optimizer": "rmsprop", "momentum": 0.0},
     {"method": "zclip", "zclip": {"warmup": 5, "z_thresh": 1.5}}),
    ({"seed": 4, "lr": 0.01, "optimizer": "adam", "weight_decay": 0.001},
     {"method": "value", "value": {"value": 0.05, "schedule": "linear", "schedule_start": 5, "schedule_steps": 10}}),
    ({"seed": 5, "lr": 0.05, "optimizer": "sgd", "momentum": 0.0, "schedule": "step", "step_size": 1, "gamma": 0.5,
      "weight_decay": 0.01}, {"method": "agc", "agc": {"clip_factor": 0.02}}),
    ({"seed": 6, "lr": 0.003, "optimizer": "rmsprop", "momentum": 0.9, "weight_decay": 0.01},
     {"method": "norm", "norm": {"max_norm": 0.3, "scope": "per_layer", "norm_type": 1}}),
    ({"seed": 7, "lr": 0.01, "optimizer": "adamw", "patience": 1, "min_delta": 10.0},
     {"method": "norm", "norm": {"max_norm": 0.2, "scope": "per_param", "norm_type": "inf", "schedule": "cosine",
                                 "schedule_start": 0.3, "schedule_steps": 12}}),
    ({"seed": 8, "lr": 0.02, "optimizer": "adam", "max_steps": 9},
     {"method": "zclip", "zclip": {"warmup": 4, "z_thresh": 1.0, "rule": "mean", "max_norm": 0.4}}),
    ({"seed": 9, "lr": 0.03, "optimizer": "sgd", "momentum": 0.9, "warmup_steps": 3},
     {"method": "norm", "norm": {"max_norm": 0.1, "norm_type": 1}}),
    ({"seed": 10, "lr": 0.01, "optimizer": "adam"}, {"method": "norm", "norm": {"max_norm": 0.1, "norm_type": "inf"}}),
    ({"seed": 11, "lr": 0.02, "optimizer": "rmsprop", "momentum": 0.0, "epochs": 2},
     {"method": "norm", "norm": {"max_norm": 0.05, "scope": "per_layer"}}),
    ({"seed": 12, "lr": 0.05, "optimizer": "sgd", "momentum": 0.5},
     {"method": "norm", "norm": {"max_norm": 0.05, "scope": "per_param", "norm_type": 1}}),
    ({"seed": 13, "lr": 0.01, "optimizer": "adamw", "weight_decay": 0.1},
     {"method": "agc", "agc": {"clip_factor": 0.005, "skip_output": False, "schedule": "cosine",
                               "schedule_start": 4, "schedule_steps": 8}}),
    ({"seed": 14, "lr": 0.05, "optimizer": "sgd", "momentum": 0.9},
     {"method": "autoclip", "autoclip": {"percentile": 90}}),
    ({"seed": 15, "lr": 0.02, "optimizer": "adam"}, {"method": "value", "value": {"value": 0.01}}),
]


def _cfg(train, clip, **extra):
    return from_dict({"train": {"epochs": 3, "batch_size": 16, "patience": None, **train}, "clip": clip,
                      "monitor": {"every": 4}, "tracking": {"log_every": 7}, **extra})


def _model(seed, hidden=8, f=4, **kw):
    torch.manual_seed(seed)
    return LSTMForecaster(f, hidden, **kw)


def _run(models, cfgs, train=TRAIN, val=VAL, **kw):
    rows = [[] for _ in cfgs]
    results = train_runs(models, train, val, [c.train for c in cfgs], [c.clip for c in cfgs], device=CPU,
                         log_every=cfgs[0].tracking.log_every, sinks=[r.extend for r in rows],
                         monitor=cfgs[0].monitor, **kw)
    return results, rows


def _assert_same_run(a, b, model_a, model_b, rows_a, rows_b, what, rtol=1e-5, atol=1e-7):
    assert (a.steps, a.epochs, a.stop_reason, a.best_epoch, a.diverged_step) == \
        (b.steps, b.epochs, b.stop_reason, b.best_epoch, b.diverged_step), what
    for key in ("loss", "norm_pre", "norm_post", "threshold", "clipped"):
        np.testing.assert_allclose(a.history[key], b.history[key], rtol=rtol, atol=atol, err_msg=f"{what}: {key}")
    np.testing.assert_allclose(a.val_history, b.val_history, rtol=rtol, err_msg=what)
    for (name, pa), pb in zip(model_a.named_parameters(), model_b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=rtol, atol=atol, msg=f"{what}: {name}")
    assert [(k, s) for k, _, s in rows_a] == [(k, s) for k, _, s in rows_b], what  # the same metric rows
    np.testing.assert_allclose([v for _, v, _ in rows_a], [v for _, v, _ in rows_b], rtol=rtol, atol=atol,
                               err_msg=what)


# ---------------------------------------------------------------------------------------------
# K runs stacked == each run alone; one run == the documented semantics
# ---------------------------------------------------------------------------------------------


def test_every_run_of_a_mixed_stack_trains_as_it_would_alone():
    """16 runs, every clip method and variant, optimizer and schedule, in one stack: each run's losses, gradient
    statistics, thresholds, stop epoch, final weights and metric rows are those of the same run alone (K = 1)."""
    cfgs = [_cfg(t, c) for t, c in MATRIX]
    models = [_model(c.train.seed) for c in cfgs]
    stacked, rows = _run(models, cfgs)
    for k, cfg in enumerate(cfgs):
        alone = _model(cfg.train.seed)
        (solo,), (solo_rows,) = _run([alone], [cfg])
        _assert_same_run(stacked[k], solo, models[k], alone, rows[k], solo_rows, f"run {k} ({cfg.clip.method})")
    # the comparison is not between identical runs: they differ, clipping happened, the stop rules fired
    assert len({round(r.history["loss"][-1], 6) for r in stacked}) == len(cfgs)
    assert all(max(stacked[k].history["clipped"]) == 1.0 for k in range(1, len(cfgs)))
    assert {r.stop_reason for r in stacked} == {"epochs", "early_stopping", "max_steps"}
    assert stacked[11].epochs == 2 and stacked[8].steps == 9
    assert any(k.startswith("grad/layer/") for k, _, _ in rows[0])


@pytest.mark.parametrize("index", range(len(MATRIX)))
def test_one_run_trains_as_the_documented_semantics(index):
    """The engine with K = 1 against tests/reference_fit.py: torch's nn.LSTM, torch.optim with LambdaLR, the
    seeded data order, each clipper from its definition in float64, early stopping and max_steps."""
    from reference_fit import reference_fit

    t, c = MATRIX[index]
    cfg = _cfg(t, c)
    model = _model(cfg.train.seed)
    result = fit(model, TRAIN, VAL, cfg.train, cfg.clip, device=CPU, monitor=cfg.monitor)
    ref_model = _model(cfg.train.seed)
    ref = reference_fit(ref_model, TRAIN, VAL, cfg.train, cfg.clip)
    assert (result.steps, result.stop_reason, result.best_epoch) == (ref["steps"], ref["stop"], ref["best_epoch"])
    np.testing.assert_allclose(result.history["loss"], ref["loss"], rtol=2e-4, atol=1e-6)
    np.testing.assert_allclose(result.history["norm_pre"], ref["norm_pre"], rtol=2e-4, atol=1e-6)
    np.testing.assert_allclose(result.history["norm_post"], ref["norm_post"], rtol=2e-4, atol=1e-6)
    np.testing.assert_allclose(result.val_history, ref["val"], rtol=2e-4)
    for (name, a), b in zip(model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5, msg=name)


def test_runs_on_samples_of_their_own_train_as_each_alone():
    """A backtest's stack: every run its own training and validation split, of different lengths (steps per
    epoch 3 to 9, last batches of 1 to 16 samples), every clip method, optimizer, schedule and stop rule: each
    run equals the same run alone on its split (to float tolerance: its loss is a weighted sum over a padded
    batch), and runs sharing a split share its samples."""
    cfgs = [_cfg(t, c) for t, c in MATRIX]
    sizes = [96, 75, 50, 130, 33, 140, 81, 64, 97, 120, 45, 66, 100, 37, 88, 58]
    trains = [_split(n, 100 + k) for k, n in enumerate(sizes)]
    trains[-1] = trains[0]  # shared by two runs: laid out once
    vals = [_split(20 + 3 * k, 200 + k) for k in range(len(sizes))]
    models = [_model(c.train.seed) for c in cfgs]
    stacked, rows = _run(models, cfgs, train=trains, val=vals)
    for k, cfg in enumerate(cfgs):
        alone = _model(cfg.train.seed)
        (solo,), (solo_rows,) = _run([alone], [cfg], train=trains[k], val=vals[k])
        _assert_same_run(stacked[k], solo, models[k], alone, rows[k], solo_rows, f"run {k} on its own samples",
                         rtol=1e-4, atol=1e-6)
    assert len({r.steps for r in stacked}) > 5  # the runs took different numbers of steps per epoch
    assert {r.stop_reason for r in stacked} == {"epochs", "early_stopping", "max_steps"}


def test_runs_on_samples_of_their_own_refuse_what_they_do_not_support():
    cfg = _cfg(*MATRIX[0])
    with pytest.raises(ValueError, match="one shared split, or one per run"):
        _run([_model(0), _model(1)], [cfg, cfg], train=[TRAIN], val=[VAL, VAL])
    with pytest.raises(ValueError, match="no checkpoints"):
        _run([_model(0), _model(1)], [cfg, cfg], train=[TRAIN, VAL], val=[VAL, VAL],
             checkpoints=[lambda state: None, None])


def test_option_nets_stack_like_forecasters():
    """Three option nets (LSTM + MLP head with the no-arbitrage floor) stacked equal each alone."""
    width = 3 + 1 + 7 * 2
    train, val = _split(80, 2, width=width), _split(30, 3, width=width)
    cfgs = [_cfg(*MATRIX[i]) for i in (1, 2, 5)]

    def net(seed):
        torch.manual_seed(seed)
        return OptionLSTM(3, 7, 2, hidden_size=6, head_hidden=5, num_layers=2, layer_norm=True)

    models = [net(c.train.seed) for c in cfgs]
    stacked, rows = _run(models, cfgs, train=train, val=val)
    for k, cfg in enumerate(cfgs):
        alone = net(cfg.train.seed)
        (solo,), (solo_rows,) = _run([alone], [cfg], train=train, val=val)
        _assert_same_run(stacked[k], solo, models[k], alone, rows[k], solo_rows, f"option run {k}")


def test_frozen_runs_keep_the_state_they_stopped_with_beside_a_diverging_one():
    """In one stack: a run that diverges from step 1, one stopped by max_steps mid-epoch, one by early stopping;
    each ends exactly as alone, and the others are untouched by them."""
    cfgs = [_cfg(*MATRIX[i]) for i in (0, 7, 8, 2)]
    models = [_model(c.train.seed) for c in cfgs]
    with torch.no_grad():  # run 3 starts with weights that overflow: its loss is inf/nan from step 1
        models[3].head.weight.mul_(1e38)
        models[3].lstm.weight_ih_l0.mul_(1e30)
    blown = copy.deepcopy(models[3])
    stacked, rows = _run(models, cfgs)
    assert stacked[3].diverged and stacked[3].stop_reason == "diverged" and stacked[3].diverged_step == 1
    assert [r.stop_reason for r in stacked[:3]] == ["epochs", "early_stopping", "max_steps"]
    (alone,), (alone_rows,) = _run([blown], [cfgs[3]])
    assert alone.diverged_step == 1 and [r[::2] for r in rows[3]] == [r[::2] for r in alone_rows]
    np.testing.assert_array_equal([r[1] for r in rows[3]], [r[1] for r in alone_rows])  # (nan == nan here)
    assert all(torch.equal(a, b) for a, b in zip(models[3].state_dict().values(), blown.state_dict().values()))
    for k in range(3):
        ref = _model(cfgs[k].train.seed)
        (solo,), (solo_rows,) = _run([ref], [cfgs[k]])
        _assert_same_run(stacked[k], solo, models[k], ref, rows[k], solo_rows, f"run {k} beside a diverged run")


def test_dropout_draws_its_own_masks_per_run():
    """Two identical runs with dropout in one stack draw different masks (so their losses part from step 1);
    the stack is reproducible from the same seed; without dropout the two would be identical."""
    cfg = _cfg({"seed": 4, "lr": 0.01, "epochs": 1}, {"method": "norm"})

    def stack(p):
        torch.manual_seed(123)  # the masks come from torch's generator
        models = [_model(4, num_layers=2, dropout=p) for _ in range(2)]
        return _run(models, [cfg, cfg])[0]

    a, b = stack(0.3), stack(0.3)
    assert a[0].history["loss"][0] != a[1].history["loss"][0]
    assert [r.history["loss"] for r in a] == [r.history["loss"] for r in b]
    assert all(math.isfinite(v) for r in a for v in r.history["loss"])
    plain = stack(0.0)
    assert plain[0].history == plain[1].history


def test_runs_must_share_a_batch_size_and_have_one_config_each():
    cfgs = [_cfg(*MATRIX[0]), _cfg({**MATRIX[1][0], "batch_size": 8}, MATRIX[1][1])]
    with pytest.raises(ValueError, match="batch_size"):
        _run([_model(0), _model(1)], cfgs)
    with pytest.raises(ValueError, match="one train config"):
        train_runs([_model(0)], TRAIN, VAL, [c.train for c in cfgs], [c.clip for c in cfgs], device=CPU)


# ---------------------------------------------------------------------------------------------
# A step: ops that do not grow with K, nothing read on the host, the same ops every step
# ---------------------------------------------------------------------------------------------


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def _step_ops(k_runs, methods, optimizers, steps=2):
    """The ops of ``steps`` consecutive training steps of an engine of ``k_runs`` runs cycling through the
    given clip methods and optimizers."""
    cfgs = [_cfg({"seed": i, "lr": 0.01 * (1 + i % 3), "optimizer": optimizers[i % len(optimizers)]},
                 {"method": methods[i % len(methods)], "zclip": {"warmup": 1},
                  "norm": {"scope": ("global", "per_layer")[i // len(methods) % 2]}}) for i in range(k_runs)]
    engine = Engine([_model(i) for i in range(k_runs)], TRAIN, VAL, [c.train for c in cfgs], [c.clip for c in cfgs],
                    device=CPU)
    idx = torch.stack([torch.randperm(len(TRAIN), generator=torch.Generator().manual_seed(i))[:16]
                       for i in range(k_runs)])
    lrs = np.full((1, k_runs), 0.01)
    plan = np.concatenate([lrs[..., None], np.full((1, k_runs, 1), 0.5), engine.opt.coefficients(lrs, [0])], 2)
    plan = torch.as_tensor(plan[0])
    out = []
    for _ in range(steps):
        with _Ops() as ops:
            engine.step(idx, plan)
        out.append(ops.ops)
    return out


ALL_METHODS = ["none", "value", "norm", "autoclip", "agc", "zclip"]
ALL_OPTIMIZERS = ["sgd", "adam", "adamw", "rmsprop"]


def test_ops_per_step_do_not_grow_with_the_number_of_runs():
    """What makes one GPU train many runs at once: a step's kernel launches (torch ops dispatched, counted here
    on the CPU) depend on the clip methods and optimizer kinds in the stack, never on how many runs it holds."""
    from fincast.models.grouped_lstm import cpu_kernel

    # (24 and 96: every method, norm scope and optimizer kind has several runs; a group of one run takes fewer)
    mixed = {k: len(_step_ops(k, ALL_METHODS, ALL_OPTIMIZERS)[1]) for k in (24, 96)}  # (a warm step)
    assert mixed[24] == mixed[96], mixed
    one_kind = {k: len(_step_ops(k, ["norm"], ["adamw"])[1]) for k in (1, 8, 64)}
    assert one_kind[8] == one_kind[64], one_kind
    if cpu_kernel() is not None:  # (without the kernel a run alone takes ATen's LSTM)
        assert one_kind[1] <= one_kind[8], one_kind
    assert one_kind[64] < mixed[96]  # more methods and optimizer kinds: more ops, a fixed number each


@pytest.mark.parametrize("k_runs", [1, 6])
def test_a_step_never_reads_a_device_value_and_repeats_the_same_ops(k_runs):
    """No op that waits for the device (.item(), bool(), nonzero, masked_select: a host sync on a GPU), and two
    steps dispatch the same op sequence: the step is sync-free and static, so a CUDA graph can capture it."""
    steps = _step_ops(k_runs, ALL_METHODS, ALL_OPTIMIZERS, steps=3)
    first, second = steps[1:]  # (the first allocates buffers)
    syncing = {"aten._local_scalar_dense", "aten.item", "aten.nonzero", "aten.masked_select", "aten.unique",
               "aten._unique2", "aten.is_nonzero", "aten.equal",
               "aten.lift_fresh", "aten.lift_fresh_copy"}  # (a tensor from host data: a blocking copy on a GPU)
    for ops in steps:
        assert not syncing & set(ops), syncing & set(ops)
    assert first == second


# ---------------------------------------------------------------------------------------------
# Stacked optimizers and loss scaling against torch, per run
# ---------------------------------------------------------------------------------------------


OPTIMIZER_RUNS = [("sgd", 0.05, 0.0, 0.0), ("sgd", 0.02, 0.9, 0.01), ("adam", 0.01, 0.9, 0.0),
                  ("adam", 0.003, 0.9, 0.05), ("adamw", 0.01, 0.9, 0.1), ("adamw", 0.02, 0.9, 0.0),
                  ("rmsprop", 0.01, 0.0, 0.0), ("rmsprop", 0.005, 0.5, 0.01)]


def _torch_optimizer(kind, params, lr, momentum, wd):
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=wd, foreach=True)
    if kind == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, momentum=momentum, weight_decay=wd, foreach=True)
    return {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[kind](params, lr=lr, weight_decay=wd, foreach=True)


@pytest.mark.parametrize("mixed", [True, False], ids=["one-stack-of-all-kinds", "one-kind-per-stack"])
def test_stacked_optimizers_equal_torch_optim_on_each_run(mixed):
    """Runs with their own optimizer, learning rate (a changing schedule), momentum and weight decay, stepped
    together on random gradients, end where torch.optim takes each alone; a run not updating stays bitwise.
    (Adam and AdamW run torch's own op sequence and agree bit for bit on the CPUs measured; SGD and RMSprop
    multiply the per-run learning rate in, then add, as torch's tensor-lr path does, where its scalar path fuses
    the two: a last-bit difference per step, hence the tolerance.)"""
    g = torch.Generator().manual_seed(0)
    size, steps = 37, 25
    cases = OPTIMIZER_RUNS if mixed else [OPTIMIZER_RUNS[3]] * 3
    start = torch.randn(len(cases), size, generator=g)
    cfgs = [from_dict({"train": {"optimizer": kind, "lr": lr, "momentum": mom, "weight_decay": wd}}).train
            for kind, lr, mom, wd in cases]
    flat = start.clone()
    stacked = StackedOptimizer(cfgs, flat)
    refs = [torch.nn.Parameter(start[k].clone()) for k in range(len(cases))]
    opts = [_torch_optimizer(kind, [refs[k]], lr, mom, wd) for k, (kind, lr, mom, wd) in enumerate(cases)]
    frozen_at = {1: 10}  # run 1 stops updating after 10 steps
    for step in range(steps):
        grad = torch.randn(len(cases), size, generator=g) * (10.0 ** (step % 3 - 1))
        factor = 0.5 + 0.5 * math.cos(step / 7)
        lrs = np.array([[c.lr * factor for c in cfgs]])
        update = torch.tensor([step < frozen_at.get(k, steps) for k in range(len(cases))])
        before = flat.clone()
        stacked.step(flat, grad.clone(), torch.as_tensor(stacked.coefficients(lrs, [step])[0]), update)
        for k, opt in enumerate(opts):
            if not update[k]:
                assert torch.equal(flat[k], before[k])
                continue
            for group in opt.param_groups:
                group["lr"] = cfgs[k].lr * factor
            refs[k].grad = grad[k].clone()
            opt.step()
    for k in range(len(cases)):
        torch.testing.assert_close(flat[k], refs[k].detach(), rtol=1e-5, atol=1e-6, msg=str(cases[k]))


def test_loss_scale_follows_grad_scaler_per_run():
    """Per run, the scale, the skipped steps and the unscaled gradients follow torch.amp.GradScaler (growth after
    3 clean steps here); one run's overflow does not skip the others' steps."""
    g = torch.Generator().manual_seed(0)
    runs, size = 3, 11
    scaler = LossScale(runs, CPU, init_scale=2.0 ** 10, interval=3)
    refs = [torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=3) for _ in range(runs)]
    params = [torch.nn.Parameter(torch.zeros(size)) for _ in range(runs)]
    opts = [torch.optim.SGD([p], lr=0.0) for p in params]
    for ref in refs:
        ref.scale(torch.ones(()))  # (GradScaler creates its scale on first use)
    overflow = {(0, 2), (0, 3), (1, 5), (2, 9)}
    for step in range(12):
        grad = torch.randn(runs, size, generator=g)
        for k in range(runs):
            if (k, step) in overflow:
                grad[k, step % size] = math.inf
        scaled = grad * scaler.scale.unsqueeze(1)
        got = scaled.clone()
        found = scaler.unscale(got)
        for k in range(runs):
            params[k].grad = (grad[k] * refs[k].get_scale()).clone()
            refs[k].unscale_(opts[k])
            ref_found = sum(v.item() for v in refs[k]._per_optimizer_states[id(opts[k])]["found_inf_per_device"]
                            .values())
            assert bool(found[k]) == bool(ref_found) == ((k, step) in overflow)
            if not found[k]:
                torch.testing.assert_close(got[k], params[k].grad, rtol=0, atol=0)
            refs[k].step(opts[k])
            refs[k].update()
        scaler.update(found, torch.ones(runs, dtype=torch.bool))
        assert scaler.scale.tolist() == [r.get_scale() for r in refs], step


# ---------------------------------------------------------------------------------------------
# Checkpoints: a stacked run's checkpoint resumes alone; checkpoints of earlier versions load
# ---------------------------------------------------------------------------------------------


def _roundtrip(payload):
    buf = io.BytesIO()
    torch.save(payload, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_a_stacked_runs_checkpoint_resumes_it_alone():
    cfgs = [_cfg(*MATRIX[i], **{}) for i in (1, 2, 3)]
    cfgs = [from_dict({**_raw(c), "train": {**_raw(c)["train"], "checkpoint_every": 5}}) for c in cfgs]
    saved = [[] for _ in cfgs]
    models = [_model(c.train.seed) for c in cfgs]
    stacked, _ = _run(models, cfgs, checkpoints=[lambda p, s=s: s.append(_roundtrip(p)) for s in saved])
    for k in (0, 2):
        ckpt = next(c for c in saved[k] if c["run"]["step"] == 10)  # mid-epoch (6 steps per epoch)
        alone = _model(99)
        (resumed,), _ = _run([alone], [cfgs[k]], resumes=[ckpt])
        _assert_same_run(resumed, stacked[k], alone, models[k], [], [], f"run {k} resumed alone")


def _raw(cfg):
    from fincast.config import to_dict

    return to_dict(cfg)


def test_checkpoints_with_torch_optim_state_resume():
    """fincast before the run axis saved torch.optim's state dict and a clipper ring of the whole window: such a
    checkpoint continues as the same run's current checkpoint does, bit for bit."""
    cfg = _cfg({"seed": 2, "lr": 0.01, "optimizer": "adamw", "weight_decay": 0.01, "epochs": 3},
               {"method": "autoclip", "autoclip": {"percentile": 30, "window": 50}})
    saved = []
    fit(_model(2), TRAIN, VAL, cfg.train, cfg.clip, device=CPU, checkpoint=lambda p: saved.append(_roundtrip(p)))
    current = saved[0]  # epoch 1's end: step 6
    legacy = copy.deepcopy(current)
    model = _model(2)
    names = [n for n, _ in model.named_parameters()]
    flat = {k: v for k, v in current["optimizer"].items() if isinstance(v, torch.Tensor)}
    state, at = {}, 0
    for i, p in enumerate(model.parameters()):
        state[i] = {"step": torch.tensor(current["optimizer"]["step"]),
                    **{k: v[at:at + p.numel()].view(p.shape).clone() for k, v in flat.items()}}
        at += p.numel()
    legacy["optimizer"] = {"state": state, "param_groups": [{"params": list(range(len(names))), "lr": 0.01}]}
    legacy["scheduler"] = {"last_epoch": 6}
    ring = torch.full((50,), math.nan)  # the window-long ring of earlier versions
    ring[:6] = current["clip_state"]["history"][:6]
    legacy["clip_state"] = {"step": 6, "history": ring, "warm": None, "mean": None, "var": None}
    a, b = _model(0), _model(0)
    ra = fit(a, TRAIN, VAL, cfg.train, cfg.clip, device=CPU, resume=current)
    rb = fit(b, TRAIN, VAL, cfg.train, cfg.clip, device=CPU, resume=legacy)
    assert ra.history == rb.history and ra.val_history == rb.val_history
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


# ---------------------------------------------------------------------------------------------
# CUDA (skipped without it): sync-free epochs, CUDA graphs equal eager steps, AMP stacks
# ---------------------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _allowed_to_sync(engine_cls, monkeypatch):
    """Run the engine's once-per-epoch reads (drains, validation, checkpoints) and the graph capture (which
    synchronises once) with sync checks off; everything else runs under torch.cuda.set_sync_debug_mode("error")."""
    from fincast.training import graphs

    def relaxed(fn):
        def wrapper(*args, **kwargs):
            mode = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode(0)
            try:
                return fn(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode(mode)
        return wrapper

    for name in ("_drain", "_validate", "_save", "_finish"):
        monkeypatch.setattr(engine_cls, name, relaxed(getattr(engine_cls, name)))
    monkeypatch.setattr(graphs.StepGraphs, "_capture", relaxed(graphs.StepGraphs._capture))


@cuda
@pytest.mark.parametrize("k_runs", [1, 8])
@pytest.mark.parametrize("graphs", [True, False])
def test_an_epoch_on_cuda_never_syncs_inside(k_runs, graphs, monkeypatch):
    _allowed_to_sync(Engine, monkeypatch)
    cfgs = [_cfg(*MATRIX[i % len(MATRIX)]) for i in range(k_runs)]
    models = [_model(c.train.seed).cuda() for c in cfgs]
    engine = Engine(models, TRAIN, VAL, [c.train for c in cfgs], [c.clip for c in cfgs], device=torch.device("cuda"),
                    cuda_graphs=graphs)  # (setting up copies the data to the GPU: outside the check)
    torch.cuda.set_sync_debug_mode("error")
    try:
        results = engine.run()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert all(r.steps > 0 for r in results)


@cuda
def test_cuda_graph_steps_equal_eager_steps():
    cfgs = [_cfg(*MATRIX[i]) for i in range(6)]
    out = {}
    for graphs in (False, True):
        models = [_model(c.train.seed).cuda() for c in cfgs]
        results = train_runs(models, TRAIN, VAL, [c.train for c in cfgs], [c.clip for c in cfgs],
                             device=torch.device("cuda"), cuda_graphs=graphs)
        out[graphs] = (results, models)
    for k in range(len(cfgs)):
        a, b = out[False][0][k], out[True][0][k]
        np.testing.assert_allclose(a.history["loss"], b.history["loss"], rtol=1e-5, atol=1e-7)
        for pa, pb in zip(out[False][1][k].parameters(), out[True][1][k].parameters()):
            torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


@cuda
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_amp_stacks_on_cuda(precision):
    cfgs = [_cfg(*MATRIX[i]) for i in (1, 2, 3)]
    models = [_model(c.train.seed).cuda() for c in cfgs]
    results = train_runs(models, TRAIN, VAL, [c.train for c in cfgs], [c.clip for c in cfgs],
                         device=torch.device("cuda"), precision=precision)
    assert all(r.steps > 0 and not r.diverged for r in results)
    alone = _model(cfgs[0].train.seed).cuda()
    (solo,) = train_runs([alone], TRAIN, VAL, [cfgs[0].train], [cfgs[0].clip], device=torch.device("cuda"),
                         precision=precision)
    np.testing.assert_allclose(results[0].history["loss"], solo.history["loss"], rtol=5e-2, atol=1e-3)


def test_step_time_charges_each_run_only_the_steps_it_took(monkeypatch):
    """``step_ms`` is the stack's wall time per step for every run: a run stopped early in an epoch is charged its
    share of that epoch, not the whole epoch (a clock that advances one second per reading: each epoch takes 1 s)."""
    from types import SimpleNamespace

    from fincast.training import engine as engine_mod

    ticks = iter(range(10_000))
    monkeypatch.setattr(engine_mod, "time", SimpleNamespace(perf_counter=lambda: float(next(ticks))))
    cfgs = [_cfg({"seed": 0, "max_steps": 2}, {"method": "none"}), _cfg({"seed": 1}, {"method": "none"})]
    (short, full), _ = _run([_model(0), _model(1)], cfgs)
    assert (short.steps, full.steps) == (2, 18)  # 6 steps per epoch, 3 epochs
    assert full.step_ms == pytest.approx(1000.0 / 6)
    assert short.step_ms == pytest.approx(1000.0 / 6)  # 2/6 of the first epoch's second for its 2 steps


def test_a_run_stopped_by_max_steps_mid_epoch_writes_one_validated_checkpoint_there():
    """The mid-epoch checkpoint due at the step where max_steps stops the run is left to the epoch's end, which
    writes it after validation (with what a resume needs to undo that validation)."""
    saved = []
    cfg = _cfg({"seed": 0, "max_steps": 4, "checkpoint": False, "checkpoint_every": 2}, {"method": "norm"})
    (result,), _ = _run([_model(0)], [cfg], checkpoints=[saved.append])
    assert result.steps == 4 and result.stop_reason == "max_steps"
    assert [s["run"]["step"] for s in saved] == [2, 4]
    assert "rewind" not in saved[0]["loop"] and saved[1]["loop"]["rewind"]["validations"] == 0
    assert len(saved[1]["loop"]["val_history"]) == 1


def test_a_pruned_run_resumed_from_its_last_checkpoint_stays_pruned():
    saved = []
    cfg = _cfg({"seed": 0, "epochs": 4}, {"method": "norm"})
    (pruned,), _ = _run([_model(0)], [cfg], checkpoints=[saved.append], on_epochs=[lambda epoch, loss: epoch == 2])
    assert pruned.stop_reason == "pruned" and pruned.epochs == 2 and saved[-1]["loop"]["pruned"]
    model = _model(0)
    (again,), _ = _run([model], [cfg], resumes=[saved[-1]])
    assert again.stop_reason == "pruned" and again.steps == pruned.steps  # no further epoch
