"""fincast's training semantics written plainly, as the oracle for the engine's single runs (tests/test_engine.py):
torch's own modules (nn.LSTM), torch.optim optimizers (foreach), LambdaLR with the documented warmup and
schedules, the seeded data order, each clip method from its paper's definition (norms in float64), validation
each epoch, early stopping and max_steps with the best weights restored. Nothing here comes from fincast except
the config objects and the Split container."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

EPS = 1e-6  # torch.nn.utils.clip_grad_norm_'s


def lr_factor(step, t, spe, total):
    if step < t.warmup_steps:
        return (step + 1) / t.warmup_steps
    if t.schedule == "cosine":
        progress = min(1.0, (step - t.warmup_steps) / max(1, total - t.warmup_steps))
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if t.schedule == "step":
        return t.gamma ** ((step // spe) // t.step_size)
    return 1.0


def threshold_factor(step, kind, start, steps):
    t = min(step / steps, 1.0)
    return {"constant": 1.0, "linear": start + (1 - start) * t,
            "cosine": 1 + (start - 1) * 0.5 * (1 + math.cos(math.pi * t))}[kind]


def _flat(ts) -> np.ndarray:
    return np.concatenate([t.detach().double().reshape(-1).numpy() for t in ts])


def _pnorm(ts, p) -> float:
    return float(np.linalg.norm(_flat(ts), ord=p))


class RefClip:
    """One run's clipper, from the definitions (README, Gradient clipping)."""

    def __init__(self, clip, named):
        self.cfg, self.named = clip, named
        self.history: list[float] = []
        self.warm: list[float] = []
        self.mean = self.var = math.nan

    def __call__(self, step: int) -> tuple[float, float]:
        c, named = self.cfg, self.named
        params = [p for _, p in named]
        grads = [p.grad for p in params]
        pre = _pnorm(grads, 2)
        m = c.method
        if m in ("value", "norm", "agc"):
            s = getattr(c, m)
            base = getattr(s, {"value": "value", "norm": "max_norm", "agc": "clip_factor"}[m])
            bound = base * threshold_factor(step, s.schedule, s.schedule_start, s.schedule_steps)
        if m == "value":
            for g in grads:
                g.clamp_(-bound, bound)
        elif m == "norm":
            p, scope = float(c.norm.norm_type), c.norm.scope
            if scope == "global":
                groups = [list(range(len(params)))]
            elif scope == "per_param":
                groups = [[i] for i in range(len(params))]
            else:  # per layer: lstm layer l = its four tensors; the head
                layers: dict[str, list[int]] = {}
                for i, (name, _) in enumerate(named):
                    key = name.split("_l")[-1] if name.startswith("lstm.") else name.split(".")[0]
                    layers.setdefault(key, []).append(i)
                groups = list(layers.values())
            for idx in groups:
                gn = _pnorm([grads[i] for i in idx], p)
                coef = min(1.0, bound / (gn + EPS)) if gn > 0 else 1.0
                for i in idx:
                    grads[i].mul_(coef)
        elif m == "agc":
            for (name, w), g in zip(named, grads):
                if c.agc.skip_output and name.startswith("head."):
                    continue
                rows_g = g.detach().double().reshape(g.shape[0] if g.dim() >= 2 else 1, -1)
                rows_w = w.detach().double().reshape(rows_g.shape)
                for r in range(rows_g.shape[0]):
                    gn = float(rows_g[r].norm())
                    limit = bound * max(float(rows_w[r].norm()), c.agc.eps)
                    if gn > limit:
                        g.view(rows_g.shape)[r].mul_(limit / max(gn, 1e-6))
        elif m == "autoclip":
            self.history.append(pre)
            thr = float(np.percentile(self.history[-c.autoclip.window:], c.autoclip.percentile))
            self._scale(grads, pre, thr)
        elif m == "zclip":
            self._zclip(grads, pre, step)
        return pre, _pnorm(grads, 2)

    @staticmethod
    def _scale(grads, pre, thr):
        if pre > thr:
            for g in grads:
                g.mul_(thr / (pre + EPS))

    def _zclip(self, grads, pre, step):
        z = self.cfg.zclip
        cap = z.max_norm if z.max_norm is not None else math.inf
        if step < z.warmup:
            self.warm.append(pre)
            if step + 1 == z.warmup:
                self.mean = float(np.mean(self.warm))
                self.var = float(np.mean((np.array(self.warm) - self.mean) ** 2))
            self._scale(grads, pre, cap)
            return
        std = math.sqrt(self.var)
        score = (pre - self.mean) / (std + z.eps)
        adaptive = pre
        if score > z.z_thresh:
            adaptive = self.mean + z.z_thresh ** 2 * std / score if z.rule == "reciprocal" else self.mean
        self._scale(grads, pre, min(adaptive, cap))
        self.mean = z.alpha * self.mean + (1 - z.alpha) * adaptive
        self.var = z.alpha * self.var + (1 - z.alpha) * (adaptive - self.mean) ** 2


def optimizer(model, t):
    p = model.parameters()
    if t.optimizer == "adamw":
        return torch.optim.AdamW(p, lr=t.lr, weight_decay=t.weight_decay, foreach=True)
    if t.optimizer == "adam":
        return torch.optim.Adam(p, lr=t.lr, weight_decay=t.weight_decay, foreach=True)
    if t.optimizer == "rmsprop":
        return torch.optim.RMSprop(p, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay, foreach=True)
    return torch.optim.SGD(p, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay, foreach=True)


def reference_fit(model, train, val, t, clip) -> dict:
    """Train ``model`` (an nn.Module) as fincast's documentation says; -> history, val losses, stop, weights."""
    x, y = torch.as_tensor(train.x), torch.as_tensor(train.y)
    xv, yv = torch.as_tensor(val.x), val.y.astype(np.float64)
    n, batch = len(y), t.batch_size
    spe = math.ceil(n / batch)
    total = t.epochs * spe if t.max_steps is None else min(t.max_steps, t.epochs * spe)
    opt = optimizer(model, t)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, t, spe, total))
    gen = torch.Generator().manual_seed(t.seed)
    clipper = RefClip(clip, list(model.named_parameters()))
    out = {"loss": [], "norm_pre": [], "norm_post": [], "val": [], "stop": "epochs"}
    best, best_epoch, bad, best_state, steps = math.inf, -1, 0, None, 0
    for epoch in range(t.epochs):
        order = torch.randperm(n, generator=gen)
        for b in range(spe):
            if t.max_steps is not None and steps >= t.max_steps:
                break
            idx = order[b * batch:(b + 1) * batch]
            opt.zero_grad(set_to_none=True)
            loss = F.mse_loss(model(x[idx]), y[idx])
            loss.backward()
            pre, post = clipper(steps)
            opt.step()
            sched.step()
            steps += 1
            out["loss"].append(float(loss.detach()))
            out["norm_pre"].append(pre)
            out["norm_post"].append(post)
        with torch.no_grad():
            v = float(np.mean((model(xv).double().numpy() - yv) ** 2))
        out["val"].append(v)
        if v < best - t.min_delta:
            best, best_epoch, bad = v, epoch + 1, 0
            best_state = {k: w.detach().clone() for k, w in model.state_dict().items()}
        else:
            bad += 1
        if t.max_steps is not None and steps >= t.max_steps:
            out["stop"] = "max_steps"
            break
        if t.patience is not None and bad >= t.patience:
            out["stop"] = "early_stopping"
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    out.update(steps=steps, best_epoch=best_epoch)
    return out
