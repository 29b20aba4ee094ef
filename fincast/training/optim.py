"""Optimizers, learning-rate schedules and fp16 loss scaling for K runs whose parameters are the rows of one
[K, P] tensor: every run its own learning rate, weight decay, momentum, schedule and state, a few tensor ops per
step for all of them.

The update rules are torch's (``torch.optim`` SGD, Adam, AdamW, RMSprop with ``foreach=True``), op for op, with
the per-run numbers as [K, 1] columns where torch has Python scalars: on a CPU each run's weights come out
bitwise equal to its own ``torch.optim`` optimizer's (tests/training/test_engine.py checks against torch on each run
alone). Scalars that torch computes in double (the learning rate, bias corrections, ``1 - lr * wd``) are computed
in float64 here too, then rounded once.

The scalars of each step (learning rate, bias corrections, ``1 - lr * wd``, momentum) come per epoch as a
[steps, K, 6] table computed on the host in float64, as torch computes its Python scalars (``coefficients``), so a
step spends one op on them. A run whose ``update`` flag is False in a step (stopped, diverged, or an fp16 step with
inf/nan gradients) is left exactly as it was: its gradient is replaced by zeros and its coefficients by the
identity (learning rate 0, decay factors 1), so the same ops serve every run, no gather, no branch.
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


def lr_table(cfgs: list[TrainConfig], steps: np.ndarray, steps_per_epoch: int | np.ndarray) -> np.ndarray:
    """[S, K] float64: each run's learning rate at each of ``steps`` (0-based; [S], or [S, K] when the runs stand at
    different steps), ``lr_factor`` vectorised. ``steps_per_epoch``: one for all runs, or [K] one each."""
    s = _steps(steps)
    col = lambda values: np.asarray(values, dtype=np.float64)[None, :]  # noqa: E731
    spe = np.broadcast_to(np.asarray(steps_per_epoch), (len(cfgs),))
    lr = col([c.lr for c in cfgs])
    warm = col([c.warmup_steps for c in cfgs])
    total = col([total_steps(c, int(n)) for c, n in zip(cfgs, spe)])
    floor = col([c.min_lr_ratio for c in cfgs])
    span = np.maximum(1.0, total - warm)
    progress = np.minimum(1.0, (s - warm) / span)
    cosine = floor + (1 - floor) * 0.5 * (1 + np.cos(np.pi * progress))
    epochs_done = np.floor(s / col(spe))
    step_decay = col([c.gamma for c in cfgs]) ** np.floor(epochs_done / col([c.step_size for c in cfgs]))
    kind = np.array([c.schedule for c in cfgs])[None, :]
    factor = np.where(kind == "cosine", cosine, np.where(kind == "step", step_decay, 1.0))
    factor = np.where(s < warm, (s + 1) / np.maximum(warm, 1.0), factor)
    return lr * factor


def _steps(steps: np.ndarray) -> np.ndarray:
    """Steps [S] or [S, K] as float64 [S, 1] or [S, K]."""
    s = np.asarray(steps, dtype=np.float64)
    return s[:, None] if s.ndim == 1 else s


def _wide(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64


# per-step coefficients of a run, one column each, computed on the host per epoch (``coefficients``); a run not
# updating gets IDENTITY: learning rate 0, decay factors 1
NEG_LR, DECAY, W1, BETA2, BIAS2, MOMENTUM = range(6)
IDENTITY = (0.0, 1.0, 0.0, 1.0, 1.0, 1.0)


@dataclass
class _Group:
    kind: str  # sgd | adam | adamw | rmsprop
    runs: list[int]
    index: torch.Tensor | None  # rows of the stack (None: all K)
    wd: torch.Tensor  # [Kg, 1] float32 (coupled L2 of sgd, adam, rmsprop)
    state: dict[str, torch.Tensor]  # [Kg, P] tensors and "step" [Kg] (float64: updates applied)
    decays: bool  # any run with weight decay
    heavy: bool  # sgd / rmsprop with momentum


class StackedOptimizer:
    """The optimizers of K runs over ``flat`` [K, P]: runs of one kind (and, for SGD and RMSprop, with or without
    momentum) step as one group. ``scaled``: fp16 loss scaling may skip a run's steps, so Adam's bias
    corrections follow each run's own count of applied updates on the device (otherwise it equals the
    schedule's step, and they come with the per-epoch coefficients)."""

    def __init__(self, cfgs: list[TrainConfig], flat: torch.Tensor, scaled: bool = False):
        self.cfgs, self.scaled = list(cfgs), scaled
        device, size, k_runs = flat.device, flat.shape[1], flat.shape[0]
        keys: dict[tuple, list[int]] = {}
        for k, c in enumerate(self.cfgs):
            heavy = c.momentum > 0 if c.optimizer in ("sgd", "rmsprop") else False
            keys.setdefault((c.optimizer, heavy), []).append(k)
        self.groups: list[_Group] = []
        for (kind, heavy), runs in keys.items():
            n = len(runs)
            state: dict[str, torch.Tensor] = {"step": torch.zeros(n, dtype=_wide(device), device=device)}
            for name in {"adam": ("exp_avg", "exp_avg_sq"), "adamw": ("exp_avg", "exp_avg_sq"),
                         "rmsprop": ("square_avg",), "sgd": ()}[kind] + (("momentum_buffer",) if heavy else ()):
                state[name] = torch.zeros(n, size, dtype=flat.dtype, device=device)
            wds = [self.cfgs[k].weight_decay for k in runs]
            self.groups.append(_Group(kind, runs, None if len(keys) == 1 else torch.tensor(runs, device=device),
                                      torch.tensor(wds, dtype=torch.float32, device=device).unsqueeze(1), state,
                                      any(wds), heavy))
        self._where = {k: (gi, j) for gi, g in enumerate(self.groups) for j, k in enumerate(g.runs)}
        self.identity = torch.tensor(IDENTITY, dtype=torch.float32, device=device)
        self.runs = k_runs

    def coefficients(self, lrs: np.ndarray, steps: np.ndarray) -> np.ndarray:
        """[S, K, 6] float64: every run's update coefficients at each step (``lrs`` [S, K] its learning rates,
        ``steps`` [S] or [S, K] the 0-based step), in double precision as torch computes its Python-float scalars."""
        s = _steps(steps) + 1.0  # updates applied, this one included
        s = np.broadcast_to(s, lrs.shape)
        out = np.empty((*lrs.shape, len(IDENTITY)))
        out[:] = IDENTITY
        out[..., NEG_LR] = -lrs
        beta1, beta2 = ADAM_BETAS
        for k, c in enumerate(self.cfgs):
            if c.optimizer in ("adam", "adamw"):
                out[:, k, NEG_LR] = (lrs[:, k] / (1 - beta1 ** s[:, k])) * -1
                out[:, k, BIAS2] = (1 - beta2 ** s[:, k]) ** 0.5
                out[:, k, W1], out[:, k, BETA2] = 1 - beta1, beta2
                if c.optimizer == "adamw":
                    out[:, k, DECAY] = 1 - lrs[:, k] * c.weight_decay
            elif c.optimizer == "rmsprop":
                out[:, k, BETA2] = RMSPROP_ALPHA
            out[:, k, MOMENTUM] = c.momentum if c.optimizer in ("sgd", "rmsprop") else 1.0
        return out

    def step(self, flat: torch.Tensor, grad: torch.Tensor, coef: torch.Tensor, update: torch.Tensor,
             lr: torch.Tensor | None = None) -> None:
        """One update of every run whose ``update`` [K] is True, with this step's ``coefficients`` row ``coef``
        [K, 6]; ``lr`` [K] (float64) the learning rates, needed only when ``scaled``."""
        for grp in self.groups:
            idx = grp.index
            if idx is None:
                p, g, c, u, lr_g = flat, grad, coef, update, lr
            else:
                p, g, u = flat.index_select(0, idx), grad.index_select(0, idx), update.index_select(0, idx)
                c, lr_g = coef.index_select(0, idx), None if lr is None else lr.index_select(0, idx)
            c = torch.where(u.unsqueeze(1), c.to(torch.float32), self.identity)  # one op: the masked coefficients
            if grp.kind in ("adam", "adamw") and self.scaled:
                c = self._bias_corrected(grp, c, u, lr_g)
            _STEP[grp.kind](grp, p, g, c, u)
            if idx is not None:
                flat.index_copy_(0, idx, p)

    def _bias_corrected(self, grp: _Group, c: torch.Tensor, update: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
        """Adam's step size and second-moment correction from each run's own count of applied updates."""
        beta1, beta2 = ADAM_BETAS
        live = (grp.state["step"] + update).clamp_min(1.0)
        c = c.clone()
        c[:, NEG_LR] = torch.where(update, -(lr / (1 - beta1 ** live)), 0.0).to(c.dtype)
        c[:, BIAS2] = torch.where(update, (1 - beta2 ** live).sqrt(), 1.0).to(c.dtype)
        return c

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
    """The gradient with weight decay where torch adds it (coupled L2), zero for runs not updating."""
    if grp.decays and grp.kind != "adamw":  # g + wd * p (torch: _foreach_add(grads, params, alpha=wd))
        g = torch.addcmul(g, p, grp.wd)
    return torch.where(update.unsqueeze(1), g, 0.0)


def _col(c: torch.Tensor, j: int) -> torch.Tensor:
    return c[:, j:j + 1]


def _sgd(grp: _Group, p, g, c, update):
    g = _masked(grp, p, g, update)
    grp.state["step"].add_(update)
    if grp.heavy:  # buf = momentum * buf + g (the first step: g, as torch's clone)
        g = grp.state["momentum_buffer"].mul_(_col(c, MOMENTUM)).add_(g)
    p.add_(g * _col(c, NEG_LR))


def _adam(grp: _Group, p, g, c, update):
    st = grp.state
    if grp.kind == "adamw" and grp.decays:  # decoupled: p *= 1 - lr * wd
        p.mul_(_col(c, DECAY))
    g = _masked(grp, p, g, update)
    st["step"].add_(update)
    st["exp_avg"].lerp_(g, _col(c, W1))
    st["exp_avg_sq"].mul_(_col(c, BETA2)).addcmul_(g, g, value=1 - ADAM_BETAS[1])
    denom = st["exp_avg_sq"].sqrt().div_(_col(c, BIAS2)).add_(ADAM_EPS)
    p.addcdiv_(st["exp_avg"] * _col(c, NEG_LR), denom)


def _rmsprop(grp: _Group, p, g, c, update):
    st = grp.state
    g = _masked(grp, p, g, update)
    st["step"].add_(update)
    st["square_avg"].mul_(_col(c, BETA2)).addcmul_(g, g, value=1 - RMSPROP_ALPHA)
    avg = st["square_avg"].sqrt().add_(RMSPROP_EPS)
    if grp.heavy:
        buf = st["momentum_buffer"].mul_(_col(c, MOMENTUM)).addcdiv_(g, avg)
        p.add_(buf * _col(c, NEG_LR))
    else:
        p.addcdiv_(g * _col(c, NEG_LR), avg)


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
