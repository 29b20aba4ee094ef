"""Optimizers, learning-rate schedules and fp16 loss scaling for K runs whose parameters are the rows of one
[K, P] tensor: every run its own learning rate, weight decay, momentum, schedule and state, a few tensor ops per
step for all of them.

The update rules are torch's (``torch.optim`` SGD, Adam, AdamW, RMSprop with ``foreach=True``), op for op, with
the per-run numbers as [K, 1] columns where torch has Python scalars: on a CPU each run's weights come out
bitwise equal to its own ``torch.optim`` optimizer's (tests/test_engine.py checks against torch on each run
alone). Scalars that torch computes in double (the learning rate, bias corrections, ``1 - lr * wd``) are computed
in float64 here too, then rounded once.

A run whose ``update`` flag is False in a step (stopped, diverged, or an fp16 step with inf/nan gradients) is
left exactly as it was: its gradient is replaced by zeros and its coefficients by the identity (learning rate 0,
decay factors 1), so the same ops serve every run, no gather, no branch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from fincast.config import TrainConfig

ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8  # torch.optim's defaults (not configurable in fincast)
RMSPROP_ALPHA, RMSPROP_EPS = 0.99, 1e-8


def total_steps(cfg: TrainConfig, steps_per_epoch: int) -> int:
    full = cfg.epochs * steps_per_epoch
    return full if cfg.max_steps is None else min(cfg.max_steps, full)


def lr_factor(step: int, cfg: TrainConfig, steps_per_epoch: int, total_steps: int) -> float:
    """Multiplier of cfg.lr at optimizer step ``step`` (0-based): linear warmup, then the schedule."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "cosine":
        span = max(1, total_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.schedule == "step":
        return cfg.gamma ** ((step // steps_per_epoch) // cfg.step_size)
    return 1.0


def lr_table(cfgs: list[TrainConfig], steps: np.ndarray, steps_per_epoch: int) -> np.ndarray:
    """[S, K] float64: each run's learning rate at each of ``steps`` (0-based), ``lr_factor`` vectorised."""
    s = np.asarray(steps, dtype=np.float64)[:, None]
    col = lambda values: np.asarray(values, dtype=np.float64)[None, :]  # noqa: E731
    lr = col([c.lr for c in cfgs])
    warm = col([c.warmup_steps for c in cfgs])
    total = col([total_steps(c, steps_per_epoch) for c in cfgs])
    floor = col([c.min_lr_ratio for c in cfgs])
    span = np.maximum(1.0, total - warm)
    progress = np.minimum(1.0, (s - warm) / span)
    cosine = floor + (1 - floor) * 0.5 * (1 + np.cos(np.pi * progress))
    epochs_done = np.floor(s / steps_per_epoch)
    step_decay = col([c.gamma for c in cfgs]) ** np.floor(epochs_done / col([c.step_size for c in cfgs]))
    kind = np.array([c.schedule for c in cfgs])[None, :]
    factor = np.where(kind == "cosine", cosine, np.where(kind == "step", step_decay, 1.0))
    factor = np.where(s < warm, (s + 1) / np.maximum(warm, 1.0), factor)
    return lr * factor


def _wide(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64


@dataclass
class _Group:
    kind: str  # sgd | adam | adamw | rmsprop
    runs: list[int]
    index: torch.Tensor | None  # rows of the stack (None: all K)
    wd: torch.Tensor  # [Kg, 1] float32
    wd64: torch.Tensor  # [Kg] float64 (AdamW's 1 - lr * wd)
    momentum: torch.Tensor | None  # [Kg, 1]
    state: dict[str, torch.Tensor]  # [Kg, P] tensors and "step" [Kg] (float64: updates applied)
    decays: bool  # any run with weight decay


class StackedOptimizer:
    """The optimizers of K runs over ``flat`` [K, P]: runs of one kind (and, for SGD and RMSprop, with or without
    momentum) step as one group."""

    def __init__(self, cfgs: list[TrainConfig], flat: torch.Tensor):
        self.cfgs = list(cfgs)
        device, size, k_runs = flat.device, flat.shape[1], flat.shape[0]
        keys: dict[tuple, list[int]] = {}
        for k, c in enumerate(self.cfgs):
            heavy = c.momentum > 0 if c.optimizer in ("sgd", "rmsprop") else False
            keys.setdefault((c.optimizer, heavy), []).append(k)
        self.groups: list[_Group] = []
        wide = _wide(device)
        for (kind, heavy), runs in keys.items():
            n = len(runs)
            col = lambda vals, dt=torch.float32: torch.tensor(vals, dtype=dt, device=device)  # noqa: E731
            zeros = lambda n=n: torch.zeros(n, size, dtype=flat.dtype, device=device)  # noqa: E731
            state: dict[str, torch.Tensor] = {"step": torch.zeros(n, dtype=wide, device=device)}
            if kind in ("adam", "adamw"):
                state.update(exp_avg=zeros(), exp_avg_sq=zeros())
            elif kind == "rmsprop":
                state["square_avg"] = zeros()
            if heavy:
                state["momentum_buffer"] = zeros()
            wds = [self.cfgs[k].weight_decay for k in runs]
            self.groups.append(_Group(
                kind, runs, None if len(keys) == 1 else torch.tensor(runs, device=device),
                col(wds).unsqueeze(1), col(wds, wide),
                col([self.cfgs[k].momentum for k in runs]).unsqueeze(1) if heavy else None, state, any(wds)))
        self._where = {k: (gi, j) for gi, g in enumerate(self.groups) for j, k in enumerate(g.runs)}
        self.runs = k_runs

    def step(self, flat: torch.Tensor, grad: torch.Tensor, lr: torch.Tensor, update: torch.Tensor) -> None:
        """One update of every run whose ``update`` [K] is True; ``lr`` [K] (float64) the learning rates."""
        for grp in self.groups:
            if grp.index is None:
                _STEP[grp.kind](grp, flat, grad, lr, update)
                continue
            idx = grp.index
            p = flat.index_select(0, idx)
            _STEP[grp.kind](grp, p, grad.index_select(0, idx), lr.index_select(0, idx), update.index_select(0, idx))
            flat.index_copy_(0, idx, p)

    def state_of(self, k: int) -> dict:
        """Run ``k``'s optimizer state (copies on the CPU): its kind, updates applied, and [P] tensors."""
        gi, j = self._where[k]
        grp = self.groups[gi]
        out = {"type": grp.kind, "step": float(grp.state["step"][j])}
        out.update({name: t[j].detach().cpu().clone() for name, t in grp.state.items() if name != "step"})
        return out

    def load(self, k: int, saved: dict) -> None:
        gi, j = self._where[k]
        grp = self.groups[gi]
        if saved.get("type", grp.kind) != grp.kind:
            raise ValueError(f"the checkpoint's optimizer is {saved['type']}, the run's config says {grp.kind}")
        grp.state["step"][j] = float(saved.get("step", 0.0))
        for name, t in grp.state.items():
            if name != "step" and saved.get(name) is not None:
                t[j] = torch.as_tensor(saved[name]).to(t.device, t.dtype)


def _masked(grp: _Group, p, g, update):
    """(gradient with weight decay where torch adds it, zero for runs not updating; the update mask [Kg, 1])."""
    u = update.unsqueeze(1)
    if grp.decays and grp.kind != "adamw":  # coupled L2: g + wd * p (torch: _foreach_add(grads, params, alpha=wd))
        g = torch.addcmul(g, p, grp.wd)
    return torch.where(u, g, 0.0), u


def _sgd(grp: _Group, p, g, lr, update):
    g, u = _masked(grp, p, g, update)
    grp.state["step"].add_(update.to(grp.state["step"].dtype))
    if grp.momentum is not None:  # buf = momentum * buf + g (the first step: g, as torch's clone)
        buf = grp.state["momentum_buffer"]
        buf.mul_(torch.where(u, grp.momentum, 1.0)).add_(g)
        g = buf
    p.add_(g * torch.where(update, -lr, 0.0).to(p.dtype).unsqueeze(1))


def _adam(grp: _Group, p, g, lr, update):
    st = grp.state
    u = update.unsqueeze(1)
    if grp.kind == "adamw" and grp.decays:  # decoupled: p *= 1 - lr * wd (torch: a Python double)
        p.mul_(torch.where(update, 1 - lr * grp.wd64, 1.0).to(p.dtype).unsqueeze(1))
    g, _ = _masked(grp, p, g, update)
    steps = st["step"]
    steps.add_(update.to(steps.dtype))
    beta1, beta2 = ADAM_BETAS
    st["exp_avg"].lerp_(g, torch.where(u, 1 - beta1, 0.0).to(p.dtype))
    st["exp_avg_sq"].mul_(torch.where(u, beta2, 1.0).to(p.dtype)).addcmul_(g, g, value=1 - beta2)
    live = steps.clamp_min(1.0)  # (a run that never updated: bias corrections of step 1, unused)
    step_size = torch.where(update, -(lr / (1 - beta1 ** live)), 0.0)
    bias2_sqrt = (1 - beta2 ** live).sqrt()
    denom = st["exp_avg_sq"].sqrt().div_(bias2_sqrt.to(p.dtype).unsqueeze(1)).add_(ADAM_EPS)
    p.addcdiv_(st["exp_avg"] * step_size.to(p.dtype).unsqueeze(1), denom)


def _rmsprop(grp: _Group, p, g, lr, update):
    st = grp.state
    g, u = _masked(grp, p, g, update)
    st["step"].add_(update.to(st["step"].dtype))
    st["square_avg"].mul_(torch.where(u, RMSPROP_ALPHA, 1.0).to(p.dtype)).addcmul_(g, g, value=1 - RMSPROP_ALPHA)
    avg = st["square_avg"].sqrt().add_(RMSPROP_EPS)
    neg_lr = torch.where(update, -lr, 0.0).to(p.dtype).unsqueeze(1)
    if grp.momentum is not None:
        buf = st["momentum_buffer"]
        buf.mul_(torch.where(u, grp.momentum, 1.0)).addcdiv_(g, avg)
        p.add_(buf * neg_lr)
    else:
        p.addcdiv_(g * neg_lr, avg)


_STEP = {"sgd": _sgd, "adam": _adam, "adamw": _adam, "rmsprop": _rmsprop}


class LossScale:
    """Per-run dynamic loss scaling for fp16, ``torch.amp.GradScaler``'s algorithm on [K] tensors: the loss of
    run k is multiplied by its scale before backward; its gradients are unscaled before clipping; a step with
    inf/nan gradients is skipped (the schedule still advances) and halves the scale; 2000 finite steps in a row
    double it. A run's overflow never skips another run's step."""

    def __init__(self, runs: int, device: torch.device, init_scale: float = 2.0 ** 16, growth: float = 2.0,
                 backoff: float = 0.5, interval: int = 2000):
        self.scale = torch.full((runs,), init_scale, dtype=torch.float32, device=device)
        self.tracker = torch.zeros(runs, dtype=torch.int32, device=device)
        self.growth, self.backoff, self.interval = growth, backoff, interval

    def unscale(self, grad: torch.Tensor) -> torch.Tensor:
        """Divide each run's gradients by its scale in place; -> found_inf [K] bool."""
        inv = self.scale.double().reciprocal().float()  # as GradScaler.unscale_
        grad.mul_(inv.to(grad.dtype).unsqueeze(1))
        return ~(grad.abs().amax(1) < math.inf)  # nan propagates through amax

    def update(self, found: torch.Tensor, active: torch.Tensor) -> None:
        """GradScaler.update per run (torch._amp_update_scale_), for the runs that stepped."""
        grown = self.tracker + 1
        grow = grown >= self.interval
        bigger = self.scale * self.growth
        new_scale = torch.where(found, self.scale * self.backoff,
                                torch.where(grow & (bigger.abs() < math.inf), bigger, self.scale))
        new_tracker = torch.where(found | grow, 0, grown).to(self.tracker.dtype)
        self.scale.copy_(torch.where(active, new_scale, self.scale))
        self.tracker.copy_(torch.where(active, new_tracker, self.tracker))

    def state_of(self, k: int) -> dict:
        return {"scale": float(self.scale[k]), "growth_tracker": int(self.tracker[k])}

    def load(self, k: int, saved: dict) -> None:
        self.scale[k] = float(saved["scale"])
        self.tracker[k] = int(saved.get("growth_tracker", saved.get("_growth_tracker", 0)))
