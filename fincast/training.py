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

import bisect
import copy
import logging
import math
import random
import time
import warnings
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from fincast.clipping import ClipState, ClipStats, Layout, clip_gradients, init_state, tensor_norms
from fincast.clipping import load_state_dict as load_clip_state
from fincast.clipping import state_dict as clip_state_dict
from fincast.config import ClipConfig, ConfigError, MonitorConfig, TrainConfig
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
    """Everything one run owns besides its model: optimizer, schedule, scaler, clipper and its state,
    early-stopping and monitoring bookkeeping. Checkpoints save exactly this (``checkpoint_state``)."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    clip: ClipConfig
    clip_state: ClipState
    scaler: torch.amp.GradScaler | None = None  # fp16 only
    autocast_dtype: torch.dtype | None = None  # bf16 / fp16 autocast, None = fp32
    monitor_every: int | None = None  # per-layer norms and update ratios every this many steps
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
    skipped: torch.Tensor | None = None  # fp16: 1.0 if the GradScaler skipped this step (inf/nan gradients)
    layers: torch.Tensor | None = None  # monitor steps: per-layer grad L2 norms (pre-clip), then update/weight ratios


def make_optimizer(model: torch.nn.Module | list[torch.Tensor], cfg: TrainConfig) -> torch.optim.Optimizer:
    """The run's optimizer, with torch's multi-tensor (``foreach``) update on every device: by default torch
    uses it on CUDA only and on a CPU loops over the parameters, one Python-level op per parameter and update
    term, 15% of a stacked run's step on the default model (the arithmetic is the same)."""
    params = model.parameters() if isinstance(model, torch.nn.Module) else model
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                                   foreach=True)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, foreach=True)


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


def make_state(model: torch.nn.Module | list[tuple[str, torch.Tensor]], train: TrainConfig, clip: ClipConfig, *,
               steps_per_epoch: int, device: torch.device, precision: str = "fp32",
               monitor_every: int | None = None) -> RunState:
    """A run's state over ``model``'s parameters, or over named tensors (a stacked run's views, see fit_batched)."""
    named = list(model.named_parameters()) if isinstance(model, torch.nn.Module) else list(model)
    opt = make_optimizer([p for _, p in named], train)
    total = train.epochs * steps_per_epoch if train.max_steps is None else min(train.max_steps,
                                                                                  train.epochs * steps_per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, train, steps_per_epoch, total))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    return RunState(opt, sched, clip, init_state(clip, named), scaler, dtype, monitor_every)


def _layer_norms(tensors: list[torch.Tensor], layout: Layout) -> torch.Tensor:
    norms = tensor_norms(tensors)
    return torch.stack([torch.linalg.vector_norm(norms[a:b]) for a, b in layout.spans])


def train_step(model: torch.nn.Module, batch: tuple, state: RunState) -> StepOut:
    """One optimizer step on ``batch = (x, y)`` (mean squared error) or ``(x, y, weight)`` (the sum of squared
    errors x ``weight``: DDP's shards of a global batch, so the all-reduced mean is the global batch's). Clipping sees unscaled,
    all-reduced gradients and runs before the optimizer."""
    x, y = batch[0], batch[1]
    opt = state.optimizer
    opt.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=state.autocast_dtype or torch.float32,
                        enabled=state.autocast_dtype is not None):
        pred = model(x).float()
    # a DDP shard (x, y, weight): squared errors summed, times world / global batch (0 for a dummy shard)
    loss = F.mse_loss(pred, y, reduction="sum") * batch[2] if len(batch) > 2 else F.mse_loss(pred, y)
    if state.scaler is not None:
        state.scaler.scale(loss).backward()
        state.scaler.unscale_(opt)  # clip the true gradients, not the scaled ones
    else:
        loss.backward()
    return apply_update(state, loss.detach())


def apply_update(state: RunState, loss: torch.Tensor) -> StepOut:
    """The rest of a step once the run's gradients are in its parameters' ``.grad``: monitoring, clipping,
    optimizer and schedule step. Shared by ``train_step`` and the stacked runs of ``fit_batched``, which give
    every run its own ``state`` over views of the stacked parameters."""
    opt = state.optimizer
    lr = opt.param_groups[0]["lr"]
    params = [p for group in opt.param_groups for p in group["params"]]
    monitor = state.monitor_every is not None and (state.step + 1) % state.monitor_every == 0
    if monitor:  # per-layer gradient norms before clipping, and the weights before the update
        layout = state.clip_state.layout
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        layer_grad = _layer_norms(grads, layout)
        before = [p.detach().clone() for p in params]
    stats, state.clip_state = clip_gradients(params, state.clip, state.clip_state)
    skipped = None
    if state.scaler is not None:
        found = state.scaler._per_optimizer_states[id(opt)]["found_inf_per_device"]  # what step() checks
        skipped = torch.stack([f.to(stats.norm_pre.device) for f in found.values()]).sum().clamp(max=1.0)
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
    layers = None
    if monitor:
        with torch.no_grad():
            delta = torch._foreach_sub([p.detach() for p in params], before)
            ratio = _layer_norms(delta, layout) / _layer_norms(before, layout).clamp_min(1e-12)
        layers = torch.cat([layer_grad, ratio])
    state.step += 1
    return StepOut(loss, stats, lr, skipped, layers)


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
    return score(predict(model, split.x, device), split)


def score(pred: np.ndarray, split: Split) -> tuple[float, dict[str, float], np.ndarray]:
    """``evaluate`` from predictions in training units (float64)."""
    loss = float(np.mean((pred - split.y) ** 2))
    pred_raw = pred * split.scale
    return loss, forecast_metrics(split.y_raw, pred_raw), pred_raw


@dataclass
class FitResult:
    steps: int
    epochs: int
    stop_reason: str  # "epochs" | "max_steps" | "early_stopping" | "diverged" | "pruned"
    best_val_loss: float
    best_epoch: int
    step_ms: float
    diverged_step: int | None = None
    diverged_reason: str | None = None
    history: dict[str, list[float]] = field(default_factory=dict)  # per step: loss, norm_pre, norm_post, threshold, clipped
    val_history: list[float] = field(default_factory=list)

    @property
    def diverged(self) -> bool:
        return self.diverged_step is not None


_STEP_KEYS = ("train/loss", "grad/norm_pre", "grad/norm_post", "grad/clipped", "grad/clip_fraction")
_THRESHOLD, _SKIPPED = 5, 6  # then the threshold and the fp16 skipped flag, per buffered row


def dist_info() -> tuple[int, int]:
    """(rank, world size): (0, 1) unless torch.distributed is initialised (torchrun)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


@dataclass
class SpikeCounter:
    """Host-side running count of gradient spikes: a step whose global norm exceeds ``factor`` x the median
    of the previous ``window`` finite norms (once at least min(window, 10) are known)."""

    factor: float = 5.0
    window: int = 100
    recent: deque = field(default_factory=deque)
    ordered: list[float] = field(default_factory=list)
    count: int = 0

    def see(self, norm: float) -> bool:
        if not math.isfinite(norm):
            return False
        spike = False
        if len(self.recent) >= min(self.window, 10):
            k = len(self.ordered)
            median = self.ordered[k // 2] if k % 2 else 0.5 * (self.ordered[k // 2 - 1] + self.ordered[k // 2])
            spike = norm > self.factor * median
        self.count += spike
        self.recent.append(norm)
        bisect.insort(self.ordered, norm)
        if len(self.recent) > self.window:
            self.ordered.pop(bisect.bisect_left(self.ordered, self.recent.popleft()))
        return spike

    def state(self) -> dict:
        return {"recent": list(self.recent), "count": self.count}

    def load(self, saved: dict) -> None:
        self.recent = deque(saved["recent"])
        self.ordered = sorted(self.recent)
        self.count = saved["count"]


class Recorder:
    """One run's bookkeeping in a training loop: per-step statistics stay on the device until a drain reads them
    back (one transfer), checks them for divergence and turns them into metric rows, which reach the sink once
    ``log_every`` steps are pending. ``fit`` has one; ``fit_batched`` one per stacked run, so both log the same
    rows."""

    def __init__(self, state: RunState, clip: ClipConfig, monitor: MonitorConfig, sink: MetricSink, log_every: int,
                 world: int = 1):
        self.state, self.sink, self.log_every, self.world = state, sink, log_every, world
        self.log_threshold = clip.method != "none"
        self.spikes = SpikeCounter(monitor.spike_factor, monitor.spike_window)
        self.counts = {"grad/spikes": 0, "grad/skipped_steps": 0}
        self.last_logged: dict[str, float] = {}  # step functions (threshold, counts): logged when they change
        self.history: dict[str, list[float]] = {"loss": [], "norm_pre": [], "norm_post": [], "threshold": [],
                                                "clipped": []}
        self.val_history: list[float] = []
        self.buffer: list[torch.Tensor] = []  # per-step statistics, still on the device
        self.layer_buffer: list[tuple[int, torch.Tensor]] = []
        self.lrs: list[float] = []
        self.pending: list[tuple[str, float, int]] = []  # rows read back, not yet sent
        self.pending_steps = 0
        self.diverged: tuple[int, str] | None = None
        self.progress_bar = None
        self.train_seconds = 0.0

    def record(self, out: StepOut, no_skip: torch.Tensor) -> None:
        c = out.clip
        skipped = out.skipped if out.skipped is not None else no_skip
        self.buffer.append(torch.stack([out.loss.float(), c.norm_pre, c.norm_post, c.clipped, c.clip_fraction,
                                        c.threshold, skipped]))
        if out.layers is not None:
            self.layer_buffer.append((self.state.step, out.layers))
        self.lrs.append(out.lr)

    def log_changed(self, key: str, value: float, step: int) -> None:
        last = self.last_logged
        if last.get(key) != value and not (math.isnan(value) and math.isnan(last.get(key, 0.0))):
            self.pending.append((key, value, step))
            last[key] = value

    def drain(self) -> None:
        """Read the buffered statistics back (one device sync) and check them for divergence. Rows go to
        the sink once ``log_every`` steps are pending: each sink call is a database transaction."""
        buffer, state, history, pending, counts = self.buffer, self.state, self.history, self.pending, self.counts
        if not buffer:
            return
        stacked = torch.stack(buffer)
        if self.world > 1:  # the loss is per shard; norms are already identical on every rank
            losses = stacked[:, 0].contiguous()
            torch.distributed.all_reduce(losses)
            stacked[:, 0] = losses / self.world
        values = stacked.double().cpu().tolist()  # Python floats (they go into checkpoints too)
        first = state.step - len(buffer)
        for i, row in enumerate(values):
            step = first + i + 1
            loss, pre = row[0], row[1]
            pending.extend((key, v, step) for key, v in zip(_STEP_KEYS, row))
            if self.log_threshold:  # constant thresholds: one point, not one per step
                self.log_changed("grad/threshold", row[_THRESHOLD], step)
            pending.append(("lr", self.lrs[i], step))
            counts["grad/spikes"] += self.spikes.see(pre)
            if state.scaler is not None:
                counts["grad/skipped_steps"] += int(row[_SKIPPED])
            for key, value in counts.items():
                if key != "grad/skipped_steps" or state.scaler is not None:
                    self.log_changed(key, value, step)
            self.pending_steps += 1
            history["loss"].append(loss)
            history["norm_pre"].append(pre)
            history["norm_post"].append(row[2])
            history["threshold"].append(row[_THRESHOLD])
            history["clipped"].append(row[3])
            if not math.isfinite(loss):
                self.diverged = (step, f"non-finite training loss ({loss})")
            elif not math.isfinite(pre) and state.scaler is None:
                self.diverged = (step, f"non-finite gradient norm ({pre})")
            if self.diverged:
                break
        layout = state.clip_state.layout
        for step, layers in self.layer_buffer:
            vals = layers.double().cpu().tolist()
            k = len(layout.layers)
            pending.extend((f"grad/layer/{name}", v, step) for name, v in zip(layout.layers, vals[:k]))
            pending.extend((f"update/ratio/{name}", v, step) for name, v in zip(layout.layers, vals[k:]))
        buffer.clear()
        self.layer_buffer.clear()
        self.lrs.clear()
        if self.pending_steps >= self.log_every:
            self.send()
        if self.progress_bar is not None and len(history["loss"]):
            self.progress_bar.set_postfix(loss=f"{history['loss'][-1]:.4g}", gnorm=f"{history['norm_pre'][-1]:.3g}",
                                          refresh=False)

    def send(self) -> None:
        if self.pending:
            self.sink(list(self.pending))
        self.pending.clear()
        self.pending_steps = 0

    def validated(self, val_loss: float, val_metrics: dict[str, float], epoch: int) -> None:
        """Epoch ``epoch`` (0-based) validated: its rows, and divergence on a non-finite loss."""
        self.val_history.append(val_loss)
        self.pending.extend([("val/loss", val_loss, self.state.step),
                             *((f"val/{k}", v, self.state.step) for k, v in val_metrics.items()),
                             ("epoch", epoch + 1, self.state.step)])
        if not math.isfinite(val_loss):
            self.diverged = (self.state.step, f"non-finite validation loss ({val_loss})")

    def improved(self, val_loss: float, epoch: int, min_delta: float) -> bool:
        """Early-stopping bookkeeping after a finite validation; True when this epoch is the best so far."""
        state = self.state
        if val_loss < state.best_val - min_delta:
            state.best_val, state.best_epoch, state.bad_epochs = val_loss, epoch + 1, 0
            return True
        state.bad_epochs += 1
        return False

    def result(self, stop_reason: str) -> FitResult:
        state, diverged = self.state, self.diverged
        return FitResult(
            steps=state.step, epochs=len(self.val_history), stop_reason=stop_reason, best_val_loss=state.best_val,
            best_epoch=state.best_epoch, step_ms=1000.0 * self.train_seconds / max(state.step, 1),
            diverged_step=diverged[0] if diverged else None, diverged_reason=diverged[1] if diverged else None,
            history=self.history, val_history=self.val_history,
        )


def fit(model: torch.nn.Module, train: Split, val: Split, cfg: TrainConfig, clip: ClipConfig, *,
        device: torch.device, precision: str = "fp32", log_every: int = 50, sink: MetricSink | None = None,
        progress: bool = False, monitor: MonitorConfig | None = None,
        checkpoint: Callable[[dict], None] | None = None, resume: dict | None = None,
        restore_best: bool = True, on_epoch: Callable[[int, float], bool] | None = None) -> FitResult:
    """Train ``model`` on ``train``, validate each epoch on ``val``, early-stop, restore the best weights.

    ``sink`` receives metric rows (key, value, step) in batches; it is how the pipeline reaches MLflow
    without this layer knowing about it. ``checkpoint`` receives the full training state (see
    ``checkpoint_state``) at each epoch end and every ``cfg.checkpoint_every`` steps; ``resume`` is such a
    state, from which training continues exactly as if it had never stopped. ``restore_best=False`` keeps the
    last epoch's weights (a refit for a fixed number of epochs, whose "validation" data are in ``train``).
    ``on_epoch(epoch, val_loss)`` is called after each finite validation (epochs counted from 1); returning True
    stops training there with stop_reason "pruned" (a sweep's pruner).

    Under torchrun (torch.distributed initialised) the model is wrapped in DDP and every global batch is
    split across ranks; gradients are all-reduced before clipping, so every rank clips identically.
    Only rank 0 calls ``sink`` and ``checkpoint``."""
    monitor = monitor or MonitorConfig()
    rank, world = dist_info()
    if rank != 0:
        sink, checkpoint = None, None
    sink = sink or (lambda rows: None)
    n = len(train)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    state = make_state(model, cfg, clip, steps_per_epoch=steps_per_epoch, device=device, precision=precision,
                       monitor_every=monitor.every)
    net = model
    if world > 1 and resume is None:  # each rank its own dropout masks (weights come from rank 0 via DDP)
        torch.manual_seed(cfg.seed + 1_000_003 * rank)
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                        else None)
    xt = torch.as_tensor(train.x, device=device)
    yt = torch.as_tensor(train.y, device=device)
    gen = torch.Generator().manual_seed(cfg.seed)
    rec = Recorder(state, clip, monitor, sink, log_every, world)
    stop_reason = "epochs"
    start_epoch, start_batch = 0, 0
    epoch_gen_state = gen.get_state()
    if resume is not None:
        resume = copy.deepcopy(resume)  # fit continues from it; the caller's copy stays as saved
        load_checkpoint_state(model, state, resume)
        r = resume["loop"]
        start_epoch, start_batch, epoch_gen_state = r["epoch"], r["batch"], r["gen_state"]
        rec.history, rec.val_history, rec.train_seconds = r["history"], r["val_history"], r["train_seconds"]
        rec.history.setdefault("clipped", [])
        rec.spikes.load(r["spikes"])
        rec.counts, rec.last_logged = r["counts"], r["last_logged"]

    def save(epoch: int, batch: int, gen_state: torch.Tensor) -> None:
        """Checkpoint after ``batch`` batches of ``epoch`` (everything drained and sent first, so a resumed
        run logs from the next step on). Under DDP every rank comes here (the same steps), so each rank's
        RNG state can be gathered; rank 0 writes."""
        rng = _rng_states(world)
        if checkpoint is None:
            return
        rec.send()
        checkpoint(checkpoint_state(model, state, rng, {
            "epoch": epoch, "batch": batch, "gen_state": gen_state, "history": rec.history,
            "val_history": rec.val_history, "train_seconds": rec.train_seconds, "spikes": rec.spikes.state(),
            "counts": dict(rec.counts), "last_logged": dict(rec.last_logged), "steps_per_epoch": steps_per_epoch,
        }))

    def shard(idx: torch.Tensor) -> tuple:
        if world == 1:
            return xt[idx], yt[idx]
        local = idx[rank::world]
        if len(local) == 0:  # fewer samples than ranks: a zero-weight sample keeps this rank in the all-reduce
            return xt[idx[:1]], yt[idx[:1]], 0.0
        return xt[local], yt[local], world / len(idx)

    progress_bar = rec.progress_bar = tqdm(total=cfg.epochs, initial=start_epoch, desc="train", unit="epoch",
                                           disable=not progress, leave=False)
    no_skip = torch.zeros((), device=device)  # the skipped flag of steps without a GradScaler
    model.train()
    # a resumed run that had already stopped stops again (unless --set raised the limit)
    done = ("max_steps" if cfg.max_steps is not None and state.step >= cfg.max_steps else
            "early_stopping" if cfg.patience is not None and state.bad_epochs >= cfg.patience else None)
    for epoch in range(start_epoch, cfg.epochs):
        if done:
            stop_reason = done
            break
        state.epoch = epoch
        t0 = time.perf_counter()
        stopped_at = steps_per_epoch  # batches done this epoch
        if epoch != start_epoch or resume is None:
            epoch_gen_state = gen.get_state()
        else:
            gen.set_state(epoch_gen_state)
        order = torch.randperm(n, generator=gen).to(device)
        for b in range(start_batch if epoch == start_epoch else 0, steps_per_epoch):
            idx = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
            rec.record(train_step(net, shard(idx), state), no_skip)
            if len(rec.buffer) >= log_every:
                rec.drain()
                if rec.diverged:
                    break
            if cfg.max_steps is not None and state.step >= cfg.max_steps:
                stopped_at = b + 1
                break
            if cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0 and b + 1 < steps_per_epoch:
                rec.drain()
                if rec.diverged:
                    break
                rec.train_seconds += time.perf_counter() - t0
                t0 = time.perf_counter()
                save(epoch, b + 1, epoch_gen_state)
        rec.drain()
        rec.train_seconds += time.perf_counter() - t0
        if rec.diverged:
            stop_reason = "diverged"
            break

        val_loss, val_metrics, _ = evaluate(model, val, device)
        if world > 1:  # decide on rank 0's number everywhere, so every rank stops at the same epoch
            v = torch.tensor([val_loss], dtype=torch.float64, device=device)
            torch.distributed.broadcast(v, 0)
            val_loss = float(v.item())
        rec.validated(val_loss, val_metrics, epoch)
        progress_bar.update(1)
        if rec.diverged:
            stop_reason = "diverged"
            break
        if rec.improved(val_loss, epoch, cfg.min_delta):
            state.best_weights = copy.deepcopy({k: v.detach() for k, v in model.state_dict().items()})
        prune = False
        if on_epoch is not None:  # rank 0 decides (it holds the sink); every rank stops at the same epoch
            flag = torch.tensor([float(on_epoch(epoch + 1, val_loss)) if rank == 0 else 0.0], device=device)
            if world > 1:
                torch.distributed.broadcast(flag, 0)
            prune = bool(flag.item())
        stop = None
        if cfg.max_steps is not None and state.step >= cfg.max_steps:
            stop = "max_steps"
        elif cfg.patience is not None and state.bad_epochs >= cfg.patience:
            stop = "early_stopping"
        elif prune and epoch + 1 < cfg.epochs:
            stop = "pruned"
        if cfg.checkpoint or (cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0):
            if stopped_at < steps_per_epoch:  # max_steps mid-epoch: a resume with more steps goes on from here
                save(epoch, stopped_at, epoch_gen_state)
            else:
                save(epoch + 1, 0, gen.get_state())
        if stop:
            stop_reason = stop
            break
    rec.send()
    progress_bar.close()
    if restore_best and state.best_weights is not None:  # else the model keeps its last weights
        model.load_state_dict(state.best_weights)
    return rec.result(stop_reason)


def fit_batched(models: list[torch.nn.Module], train: Split, val: Split, cfgs: list[TrainConfig],
                clips: list[ClipConfig], *, device: torch.device, log_every: int = 50,
                sinks: list[MetricSink | None] | None = None, monitor: MonitorConfig | None = None,
                progress: bool = False) -> list[FitResult]:
    """Train K forecasters of one architecture (``LSTMForecaster`` without dropout, fp32) on the same data as one
    stacked model, each exactly as ``fit`` would train it alone: its own seed (initial weights are the models'
    own; data order from ``cfgs[k].seed``), learning rate, optimizer and schedule, clipping with its own state,
    early stopping, divergence, metric rows (``sinks[k]``) and best weights (restored into ``models[k]``).

    One forward and one backward per step for all runs still stepping (``models.batched.StackedForecaster``);
    then each run's gradients (views of the stacked ones) go through ``apply_update`` with its own ``RunState``
    over views of the stacked parameters. A run that diverged, stopped early or reached its step or epoch limit
    is frozen: left out of the forward from then on (and so out of the others' arithmetic). ``time/step_ms`` of
    each run is the wall time of the stacked steps it took part in."""
    from fincast.models.batched import StackedForecaster

    monitor = monitor or MonitorConfig()
    k_runs = len(models)
    sinks = list(sinks) if sinks is not None else [None] * k_runs
    if not (len(cfgs) == len(clips) == len(sinks) == k_runs) or k_runs == 0:
        raise ValueError("fit_batched: one train config, clip config and sink per model")
    if len({c.batch_size for c in cfgs}) != 1:
        raise ValueError("fit_batched: every run needs the same train.batch_size")
    n = len(train)
    batch_size = cfgs[0].batch_size
    steps_per_epoch = math.ceil(n / batch_size)
    stacked = StackedForecaster(list(models)).to(device)
    named = stacked.stacked()
    views = [[(name, p.detach()[k]) for name, p in named] for k in range(k_runs)]
    states = [make_state(views[k], cfgs[k], clips[k], steps_per_epoch=steps_per_epoch, device=device,
                         monitor_every=monitor.every) for k in range(k_runs)]
    recs = [Recorder(states[k], clips[k], monitor, sinks[k] or (lambda rows: None), log_every) for k in range(k_runs)]
    gens = [torch.Generator().manual_seed(c.seed) for c in cfgs]
    xt = torch.as_tensor(train.x, device=device)
    yt = torch.as_tensor(train.y, device=device)
    xv = torch.as_tensor(val.x, device=device)
    stop: list[str | None] = [None] * k_runs  # None while the run trains
    no_skip = torch.zeros((), device=device)
    bar = tqdm(total=max(c.epochs for c in cfgs), desc=f"train x{k_runs}", unit="epoch", disable=not progress,
               leave=False)
    for epoch in range(max(c.epochs for c in cfgs)):
        for k, c in enumerate(cfgs):
            if stop[k] is None and epoch >= c.epochs:
                stop[k] = "epochs"
        active = [k for k in range(k_runs) if stop[k] is None]
        if not active:
            break
        t0 = time.perf_counter()
        orders = {}
        for k in active:
            states[k].epoch = epoch
            orders[k] = torch.randperm(n, generator=gens[k]).to(device)
        stepping = list(active)
        for b in range(steps_per_epoch):
            if not stepping:
                break
            idx = torch.stack([orders[k][b * batch_size:(b + 1) * batch_size] for k in stepping])
            which = None if len(stepping) == k_runs else torch.tensor(stepping, device=device)
            stacked.zero_grad(set_to_none=True)
            losses = (stacked(xt[idx], which).float() - yt[idx]).square().mean(1)
            losses.sum().backward()
            losses = losses.detach()
            done = []
            for j, k in enumerate(stepping):
                for (_, view), (_, p) in zip(views[k], named):
                    view.grad = p.grad[k]
                rec, state = recs[k], states[k]
                rec.record(apply_update(state, losses[j]), no_skip)
                if len(rec.buffer) >= log_every:
                    rec.drain()
                    if rec.diverged:
                        done.append(k)
                        continue
                if cfgs[k].max_steps is not None and state.step >= cfgs[k].max_steps:
                    done.append(k)
            stepping = [k for k in stepping if k not in done]
        seconds = time.perf_counter() - t0
        evaluating = []
        for k in active:
            recs[k].drain()
            recs[k].train_seconds += seconds
            if recs[k].diverged:
                stop[k] = "diverged"
            else:
                evaluating.append(k)
        if evaluating:
            preds = _predict_stacked(stacked, xv, evaluating, device)
        for j, k in enumerate(evaluating):
            rec, state, cfg = recs[k], states[k], cfgs[k]
            val_loss, val_metrics, _ = score(preds[j], val)
            rec.validated(val_loss, val_metrics, epoch)
            if rec.diverged:
                stop[k] = "diverged"
                continue
            if rec.improved(val_loss, epoch, cfg.min_delta):
                state.best_weights = stacked.unstack(k)
            if cfg.max_steps is not None and state.step >= cfg.max_steps:
                stop[k] = "max_steps"
            elif cfg.patience is not None and state.bad_epochs >= cfg.patience:
                stop[k] = "early_stopping"
        bar.update(1)
        bar.set_postfix(training=sum(s is None for s in stop), refresh=False)
    bar.close()
    results = []
    for k, model in enumerate(models):
        recs[k].send()
        weights = states[k].best_weights if states[k].best_weights is not None else stacked.unstack(k)
        model.load_state_dict(weights)
        results.append(recs[k].result(stop[k] or "epochs"))
    return results


@torch.no_grad()
def _predict_stacked(stacked: torch.nn.Module, x: torch.Tensor, runs: list[int], device: torch.device,
                     chunk: int = 8192) -> list[np.ndarray]:
    """Predictions (float64, training units) of the stacked runs ``runs`` for every sample of ``x``."""
    which = torch.tensor(runs, device=device)
    size = max(1, chunk // len(runs))
    out = [stacked(x[i:i + size].unsqueeze(0).expand(len(runs), -1, -1, -1), which).float().cpu()
           for i in range(0, len(x), size)]
    pred = torch.cat(out, 1).numpy().astype(np.float64) if out else np.zeros((len(runs), 0))
    return list(pred)


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def _rng_states(world: int) -> list[dict]:
    """Every rank's RNG state (dropout), in rank order: a collective when distributed."""
    if world == 1:
        return [_rng_state()]
    states: list = [None] * world
    torch.distributed.all_gather_object(states, _rng_state())
    return states


def checkpoint_state(model: torch.nn.Module, state: RunState, rng: list[dict], loop: dict) -> dict:
    """Everything needed to continue a run exactly: weights, optimizer, schedule, scaler, clipper state,
    early stopping, RNG and where the loop stood (plain tensors and Python values, for torch.save)."""
    return {
        "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "optimizer": copy.deepcopy(state.optimizer.state_dict()),
        "scheduler": state.scheduler.state_dict(),
        "scaler": state.scaler.state_dict() if state.scaler is not None else None,
        "clip_state": clip_state_dict(state.clip_state),
        "run": {"step": state.step, "best_val": state.best_val, "best_epoch": state.best_epoch,
                "bad_epochs": state.bad_epochs, "best_weights": state.best_weights},
        "rng": rng,  # one per rank
        "loop": copy.deepcopy(loop),
    }


def load_checkpoint_state(model: torch.nn.Module, state: RunState, saved: dict) -> None:
    model.load_state_dict(saved["model"])
    state.optimizer.load_state_dict(saved["optimizer"])
    state.scheduler.load_state_dict(saved["scheduler"])
    sched = state.scheduler  # the lr of the next step from this run's schedule (resume may change epochs)
    for group, base, factor in zip(state.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
        group["lr"] = base * factor(sched.last_epoch)
    if state.scaler is not None and saved["scaler"] is not None:
        state.scaler.load_state_dict(saved["scaler"])
    device = next(model.parameters()).device
    load_clip_state(state.clip_state, {k: v.to(device) if isinstance(v, torch.Tensor) else v
                                       for k, v in saved["clip_state"].items()})
    run = saved["run"]
    state.step, state.best_val, state.best_epoch = run["step"], run["best_val"], run["best_epoch"]
    state.bad_epochs, state.best_weights = run["bad_epochs"], run["best_weights"]
    rank, world = dist_info()
    rngs = saved["rng"]
    rng = rngs[rank] if len(rngs) == world else rngs[0]  # another world size: rank 0's state everywhere
    torch.set_rng_state(rng["torch"].cpu())
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"].cpu())
