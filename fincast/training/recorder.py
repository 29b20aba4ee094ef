"""A run's bookkeeping on the host: its per-step statistics (read from the engine's device buffer in one
transfer per drain), divergence, metric rows for its sink, early stopping, and the :class:`FitResult`.

The history keeps every step (the run's series file is written from it); the sink (MLflow) gets a step's rows
every ``metric_every`` steps, at each validation's step and at the diverged step, which keeps the UI's charts
readable and a study's tracking cheap. Rows reach the sink once ``log_every`` steps are pending. A run's divergence is the first step whose training loss (or, outside
fp16 loss scaling, gradient norm) is not finite: the rows stop at that step.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from fincast.config import MonitorConfig

MetricSink = Callable[[list[tuple[str, float, int]]], None]

# columns of a step's record in the engine's buffer [steps, K, len(COLUMNS)]
COLUMNS = ("loss", "norm_pre", "norm_post", "clipped", "clip_fraction", "threshold", "skipped", "stepped")
LOSS, PRE, POST, CLIPPED, FRACTION, THRESHOLD, SKIPPED, STEPPED = range(len(COLUMNS))
STEP_KEYS = ("train/loss", "grad/norm_pre", "grad/norm_post")  # MLflow's per-step series (the buffer's first columns)
# (whether a step was clipped and the share clipped are in the series file for every step, and grad/clip_rate
# sums them up; at a cadence they would be noise in the UI)
# the history of every step: name -> column of the buffer (None: the step's learning rate)
HISTORY = {"loss": LOSS, "norm_pre": PRE, "norm_post": POST, "threshold": THRESHOLD, "clipped": CLIPPED,
           "clip_fraction": FRACTION, "lr": None}


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
    history: dict[str, list[float]] = field(default_factory=dict)  # per step: HISTORY's keys
    val_history: list[float] = field(default_factory=list)
    val_steps: list[int] = field(default_factory=list)  # the step each validation followed

    @property
    def diverged(self) -> bool:
        return self.diverged_step is not None


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
    """One run's host-side record. ``take(rows, lrs, first_step)`` consumes the run's buffered step records
    (numpy [n, len(COLUMNS)], only the steps it took) and returns False once it diverged."""

    def __init__(self, method: str, monitor: MonitorConfig, sink: MetricSink | None, log_every: int,
                 scaled: bool, layers: tuple[str, ...], metric_every: int = 1):
        self.sink, self.log_every, self.scaled, self.layers = sink, log_every, scaled, layers
        self.metric_every = max(1, int(metric_every))
        self.last: tuple[int, list[float], float] | None = None  # the latest step's (step, row, lr), not yet sent
        self.log_threshold = method != "none"
        self.spikes = SpikeCounter(monitor.spike_factor, monitor.spike_window)
        self.counts = {"grad/spikes": 0, "grad/skipped_steps": 0}
        self.last_logged: dict[str, float] = {}  # step functions (threshold, counts): logged when they change
        self.history: dict[str, list[float]] = {k: [] for k in HISTORY}
        self.val_history: list[float] = []
        self.val_steps: list[int] = []
        self.pending: list[tuple[str, float, int]] = []  # rows not yet sent
        self.pending_steps = 0
        self.diverged: tuple[int, str] | None = None
        self.train_seconds = 0.0
        self.step = 0  # steps taken (the last row's step)
        self.best_val, self.best_epoch, self.bad_epochs = math.inf, -1, 0
        self.stop: str | None = None  # why it stopped (None: still training)

    def take(self, rows: np.ndarray, lrs: np.ndarray) -> bool:
        """The run's next steps: ``rows`` [n, len(COLUMNS)] (float64), ``lrs`` [n] the learning rate of each.
        Stops at (and keeps) the first diverged step; returns whether the run is still sound."""
        if not len(rows):
            return self.diverged is None
        loss, pre = rows[:, LOSS], rows[:, PRE]
        bad = ~np.isfinite(loss) | (~np.isfinite(pre) & (not self.scaled))
        end = int(np.argmax(bad)) + 1 if bad.any() else len(rows)
        rows, lrs = rows[:end], lrs[:end]
        first = self.step + 1
        for key, column in HISTORY.items():
            self.history[key] += (lrs if column is None else rows[:, column]).tolist()
        if self.sink is not None:
            self._rows(rows, lrs, first)
        self.step += end
        if bad.any():
            self.send_last()  # the diverged step itself
            step = first + end - 1
            value = rows[-1, LOSS]
            self.diverged = (step, f"non-finite training loss ({value})" if not math.isfinite(value)
                             else f"non-finite gradient norm ({rows[-1, PRE]})")
            return False
        return True

    def _rows(self, rows: np.ndarray, lrs: np.ndarray, first: int) -> None:
        counts, every = self.counts, self.metric_every
        values = rows.tolist()
        for i, row in enumerate(values):
            step = first + i
            counts["grad/spikes"] += self.spikes.see(row[PRE])
            if self.scaled:
                counts["grad/skipped_steps"] += int(row[SKIPPED])
            self.last = (step, row, float(lrs[i]))
            if step % every == 0:
                self.send_last()
        self.pending_steps += len(values)

    def send_last(self) -> None:
        """The latest step's rows to the sink (once): its series, and the step functions (threshold, lr, counts)
        where they changed since they were last sent."""
        if self.last is None or self.sink is None:
            return
        step, row, lr = self.last
        self.last = None
        self.pending.extend((key, v, step) for key, v in zip(STEP_KEYS, row))
        if self.log_threshold:  # constant thresholds: one point, not one per step
            self.log_changed("grad/threshold", row[THRESHOLD], step)
        self.log_changed("lr", lr, step)
        for key, value in self.counts.items():
            if key != "grad/skipped_steps" or self.scaled:
                self.log_changed(key, value, step)

    def take_layers(self, step: int, values: np.ndarray) -> None:
        """Monitoring at ``step``: per-layer gradient norms before clipping, then update/weight ratios."""
        if self.sink is None:
            return
        n = len(self.layers)
        self.pending.extend((f"grad/layer/{name}", float(v), step) for name, v in zip(self.layers, values[:n]))
        self.pending.extend((f"update/ratio/{name}", float(v), step) for name, v in zip(self.layers, values[n:]))

    def log_changed(self, key: str, value: float, step: int) -> None:
        last = self.last_logged
        if last.get(key) != value and not (math.isnan(value) and math.isnan(last.get(key, 0.0))):
            self.pending.append((key, value, step))
            last[key] = value

    def flush(self, force: bool = False) -> None:
        if force:
            self.send_last()  # (a run's end, a checkpoint: its latest step is in MLflow)
        if self.pending and (force or self.pending_steps >= self.log_every) and self.sink is not None:
            self.sink(list(self.pending))
            self.pending.clear()
            self.pending_steps = 0

    def validated(self, val_loss: float, val_metrics: dict[str, float], epoch: int) -> None:
        """Epoch ``epoch`` (0-based) validated: its rows, and divergence on a non-finite loss."""
        self.val_history.append(val_loss)
        self.val_steps.append(self.step)
        if self.sink is not None:
            self.send_last()  # the epoch's last step, whatever the cadence
            self.pending.extend([("val/loss", val_loss, self.step),
                                 *((f"val/{k}", v, self.step) for k, v in val_metrics.items()),
                                 ("epoch", epoch + 1, self.step)])
        if not math.isfinite(val_loss):
            self.diverged = (self.step, f"non-finite validation loss ({val_loss})")

    def improved(self, val_loss: float, epoch: int, min_delta: float) -> bool:
        """Early-stopping bookkeeping after a finite validation; True when this epoch is the best so far."""
        if val_loss < self.best_val - min_delta:
            self.best_val, self.best_epoch, self.bad_epochs = val_loss, epoch + 1, 0
            return True
        self.bad_epochs += 1
        return False

    def state(self) -> dict:
        """What a checkpoint keeps of this record (plain Python values)."""
        return {"history": {k: list(v) for k, v in self.history.items()}, "val_history": list(self.val_history),
                "val_steps": list(self.val_steps),
                "train_seconds": self.train_seconds, "spikes": self.spikes.state(), "counts": dict(self.counts),
                "last_logged": dict(self.last_logged)}

    def load(self, loop: dict, run: dict) -> None:
        self.history = {k: list(v) for k, v in loop["history"].items()}
        steps = len(self.history["loss"])
        for key in HISTORY:  # a checkpoint of an earlier version: its missing series are unknown (NaN)
            self.history.setdefault(key, [math.nan] * steps)
        self.val_history = list(loop["val_history"])
        self.val_steps = list(loop.get("val_steps", [-1] * len(self.val_history)))
        self.train_seconds = loop["train_seconds"]
        self.spikes.load(loop["spikes"])
        self.counts, self.last_logged = dict(loop["counts"]), dict(loop["last_logged"])
        self.step = int(run["step"])
        self.best_val, self.best_epoch, self.bad_epochs = run["best_val"], run["best_epoch"], run["bad_epochs"]

    def result(self) -> FitResult:
        diverged = self.diverged
        return FitResult(
            steps=self.step, epochs=len(self.val_history), stop_reason=self.stop or "epochs",
            best_val_loss=self.best_val, best_epoch=self.best_epoch,
            step_ms=1000.0 * self.train_seconds / max(self.step, 1),
            diverged_step=diverged[0] if diverged else None, diverged_reason=diverged[1] if diverged else None,
            history=self.history, val_history=self.val_history, val_steps=self.val_steps)
