"""Training (layer L2): one loop you can read top to bottom.

``train_step(model, batch, state)`` is a plain function: forward (under autocast when AMP is on),
backward (scaled for fp16), unscale, clip, optimizer step, schedule step. Everything a run owns,
optimizer, GradScaler, clipper config and state, early-stopping bookkeeping, lives in an explicit
:class:`RunState`, so many runs can later be stacked along a run dimension.

The step never synchronises with the device: loss and clipping statistics stay tensors and are read
in one transfer per drain (every ``tracking.log_every`` steps and at each epoch end). A non-finite
loss, or a non-finite gradient norm outside fp16 loss scaling, marks the run diverged at the exact step
it happened; the loop stops at that drain and reports it, never with a traceback. Rows reach the
metric sink (MLflow) once ``log_every`` steps are pending, validation rows included: one database
transaction per ``log_every`` steps, not one per epoch end.
"""

from __future__ import annotations

import copy
import logging
import math
import random
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from fincast.clipping import ClipStats, clip_gradients, init_state
from fincast.config import ClipConfig, ConfigError, TrainConfig
from fincast.features import Split
from fincast.models.metrics import forecast_metrics

log = logging.getLogger("fincast.training")

MetricSink = Callable[[list[tuple[str, float, int]]], None]


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device = 'cuda' but CUDA is not available on this machine; use train.device=auto")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("train.device = 'mps' but MPS is not available on this machine; use train.device=auto")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_precision(precision: str, device: torch.device) -> str:
    """AMP runs on CUDA only; elsewhere fp32 is used (with a warning)."""
    if precision != "fp32" and device.type != "cuda":
        log.warning("train.precision=%s needs CUDA; training in fp32 on %s", precision, device.type)
        return "fp32"
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        log.warning("this GPU does not support bf16; training in fp32")
        return "fp32"
    return precision


@dataclass
class RunState:
    """Everything one run owns besides its model."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    clip: ClipConfig
    clip_state: Any = None
    scaler: torch.amp.GradScaler | None = None  # fp16 only
    autocast_dtype: torch.dtype | None = None  # bf16 / fp16 autocast, None = fp32
    step: int = 0
    epoch: int = 0
    best_val: float = math.inf
    best_epoch: int = -1
    bad_epochs: int = 0
    best_weights: dict[str, torch.Tensor] | None = None


@dataclass
class StepOut:
    loss: torch.Tensor  # 0-d, detached, on device
    clip: ClipStats
    lr: float


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = model.parameters()
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


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


def make_state(model: torch.nn.Module, train: TrainConfig, clip: ClipConfig, *, steps_per_epoch: int,
               device: torch.device, precision: str = "fp32") -> RunState:
    opt = make_optimizer(model, train)
    total = train.epochs * steps_per_epoch if train.max_steps is None else min(train.max_steps,
                                                                                  train.epochs * steps_per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, train, steps_per_epoch, total))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    return RunState(opt, sched, clip, init_state(clip), scaler, dtype)


def train_step(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor], state: RunState) -> StepOut:
    """One optimizer step. Clipping sees unscaled gradients and runs before the optimizer."""
    x, y = batch
    opt = state.optimizer
    lr = opt.param_groups[0]["lr"]
    opt.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=state.autocast_dtype or torch.float32,
                        enabled=state.autocast_dtype is not None):
        loss = F.mse_loss(model(x).float(), y)
    if state.scaler is not None:
        state.scaler.scale(loss).backward()
        state.scaler.unscale_(opt)  # clip the true gradients, not the scaled ones
    else:
        loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    stats, state.clip_state = clip_gradients(grads, state.clip, state.clip_state)
    if state.scaler is not None:
        state.scaler.step(opt)  # skipped by the scaler if the gradients hold inf/nan
        state.scaler.update()
        with warnings.catch_warnings():
            # the schedule advances once per attempted step, by design, also when the scaler skipped one;
            # torch's "lr_scheduler.step() before optimizer.step()" warning is not actionable here
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)`")
            state.scheduler.step()
    else:
        opt.step()
        state.scheduler.step()
    state.step += 1
    return StepOut(loss.detach(), stats, lr)


@torch.no_grad()
def predict(model: torch.nn.Module, x: np.ndarray | torch.Tensor, device: torch.device,
            batch_size: int = 8192) -> np.ndarray:
    """Model outputs (in training-target units) for every sample."""
    model.eval()
    out = []
    xt = torch.as_tensor(x)
    for i in range(0, len(xt), batch_size):
        out.append(model(xt[i:i + batch_size].to(device, non_blocking=True)).float().cpu())
    model.train()
    return torch.cat(out).numpy().astype(np.float64) if out else np.zeros(0)


def evaluate(model: torch.nn.Module, split: Split, device: torch.device) -> tuple[float, dict[str, float], np.ndarray]:
    """(loss in training units, metrics in log-return units, predictions in log-return units)."""
    pred = predict(model, split.x, device)
    loss = float(np.mean((pred - split.y) ** 2))
    pred_raw = pred * split.scale
    return loss, forecast_metrics(split.y_raw, pred_raw), pred_raw


@dataclass
class FitResult:
    steps: int
    epochs: int
    stop_reason: str  # "epochs" | "max_steps" | "early_stopping" | "diverged"
    best_val_loss: float
    best_epoch: int
    step_ms: float
    diverged_step: int | None = None
    diverged_reason: str | None = None
    history: dict[str, list[float]] = field(default_factory=dict)  # per step: loss, norm_pre, norm_post
    val_history: list[float] = field(default_factory=list)

    @property
    def diverged(self) -> bool:
        return self.diverged_step is not None


_STEP_KEYS = ("train/loss", "grad/norm_pre", "grad/norm_post", "grad/clipped")  # then the threshold


def fit(model: torch.nn.Module, train: Split, val: Split, cfg: TrainConfig, clip: ClipConfig, *,
        device: torch.device, precision: str = "fp32", log_every: int = 50, sink: MetricSink | None = None,
        progress: bool = False) -> FitResult:
    """Train ``model`` on ``train``, validate each epoch on ``val``, early-stop, restore the best weights.

    ``sink`` receives metric rows (key, value, step) in batches; it is how the pipeline reaches MLflow
    without this layer knowing about it."""
    sink = sink or (lambda rows: None)
    n = len(train)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    state = make_state(model, cfg, clip, steps_per_epoch=steps_per_epoch, device=device, precision=precision)
    xt = torch.as_tensor(train.x, device=device)
    yt = torch.as_tensor(train.y, device=device)
    gen = torch.Generator().manual_seed(cfg.seed)
    log_threshold = clip.method != "none"
    last_threshold = math.nan
    history: dict[str, list[float]] = {"loss": [], "norm_pre": [], "norm_post": []}
    val_history: list[float] = []
    buffer: list[torch.Tensor] = []  # per-step statistics, still on the device
    lrs: list[float] = []
    pending: list[tuple[str, float, int]] = []  # rows read back, not yet sent
    pending_steps = 0
    diverged: tuple[int, str] | None = None
    stop_reason = "epochs"
    train_seconds = 0.0

    def drain() -> None:
        """Read the buffered statistics back (one device sync) and check them for divergence. Rows go to
        the sink once ``log_every`` steps are pending: each sink call is a database transaction."""
        nonlocal diverged, pending_steps, last_threshold
        if not buffer:
            return
        values = torch.stack(buffer).cpu().numpy().astype(np.float64)
        first = state.step - len(buffer)
        for i, row in enumerate(values):
            step = first + i + 1
            loss, pre = row[0], row[1]
            pending.extend((key, v, step) for key, v in zip(_STEP_KEYS, row))
            if log_threshold and row[4] != last_threshold:  # constant thresholds: one point, not one per step
                pending.append(("grad/threshold", row[4], step))
                last_threshold = row[4]
            pending.append(("lr", lrs[i], step))
            pending_steps += 1
            history["loss"].append(loss)
            history["norm_pre"].append(pre)
            history["norm_post"].append(row[2])
            if not math.isfinite(loss):
                diverged = (step, f"non-finite training loss ({loss})")
            elif not math.isfinite(pre) and state.scaler is None:
                diverged = (step, f"non-finite gradient norm ({pre})")
            if diverged:
                break
        buffer.clear()
        lrs.clear()
        if pending_steps >= log_every:
            send()
        if progress_bar is not None and len(history["loss"]):
            progress_bar.set_postfix(loss=f"{history['loss'][-1]:.4g}", gnorm=f"{history['norm_pre'][-1]:.3g}",
                                     refresh=False)

    def send() -> None:
        nonlocal pending_steps
        if pending:
            sink(list(pending))
        pending.clear()
        pending_steps = 0

    progress_bar = tqdm(total=cfg.epochs, desc="train", unit="epoch", disable=not progress, leave=False)
    model.train()
    for epoch in range(cfg.epochs):
        state.epoch = epoch
        t0 = time.perf_counter()
        order = torch.randperm(n, generator=gen).to(device)
        for b in range(steps_per_epoch):
            idx = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
            out = train_step(model, (xt[idx], yt[idx]), state)
            buffer.append(torch.stack([out.loss.float(), out.clip.norm_pre, out.clip.norm_post, out.clip.clipped,
                                       out.clip.threshold.float()]))
            lrs.append(out.lr)
            if len(buffer) >= log_every:
                drain()
                if diverged:
                    break
            if cfg.max_steps is not None and state.step >= cfg.max_steps:
                break
        drain()
        train_seconds += time.perf_counter() - t0
        if diverged:
            stop_reason = "diverged"
            break

        val_loss, val_metrics, _ = evaluate(model, val, device)
        val_history.append(val_loss)
        pending.extend([("val/loss", val_loss, state.step),
                        *((f"val/{k}", v, state.step) for k, v in val_metrics.items()), ("epoch", epoch + 1, state.step)])
        progress_bar.update(1)
        if not math.isfinite(val_loss):
            diverged = (state.step, f"non-finite validation loss ({val_loss})")
            stop_reason = "diverged"
            break
        if val_loss < state.best_val - cfg.min_delta:
            state.best_val, state.best_epoch, state.bad_epochs = val_loss, epoch + 1, 0
            state.best_weights = copy.deepcopy({k: v.detach() for k, v in model.state_dict().items()})
        else:
            state.bad_epochs += 1
        if cfg.max_steps is not None and state.step >= cfg.max_steps:
            stop_reason = "max_steps"
            break
        if cfg.patience is not None and state.bad_epochs >= cfg.patience:
            stop_reason = "early_stopping"
            break
    send()
    progress_bar.close()
    if state.best_weights is not None:
        model.load_state_dict(state.best_weights)
    return FitResult(
        steps=state.step, epochs=len(val_history), stop_reason=stop_reason, best_val_loss=state.best_val,
        best_epoch=state.best_epoch, step_ms=1000.0 * train_seconds / max(state.step, 1),
        diverged_step=diverged[0] if diverged else None, diverged_reason=diverged[1] if diverged else None,
        history=history, val_history=val_history,
    )
