"""The training engine (layer L2): K runs step together, one run is K = 1. One loop, read top to bottom in
:meth:`Engine.run` (epochs) and :meth:`Engine.step` (one optimizer step of every run).

Every piece of per-run state is a tensor with a leading run dimension: parameters and gradients (rows of one
[K, P] tensor, ``models.stacked.StackedNet``), optimizer state and learning rates (``optim``), clip thresholds
and clipper state (``clipping.StackClipper``), loss scales, step counters, the masks of runs that stopped or
diverged. A step is one forward, one backward, one clip and one optimizer update for all K runs; the number of
ops it dispatches grows with the number of distinct clip methods and optimizer kinds in the stack, never with K.
Runs that stop (epochs, max_steps, early stopping, pruning, divergence) are frozen by a mask, not removed, so
shapes never change; a frozen run's results are exactly those at the moment it stopped.

Nothing in a step reads a device value on the host: per-step statistics go into a device buffer [steps, K,
columns] read once per epoch on CUDA (every ``log_every`` steps on a CPU, where reading costs nothing), then
turned into each run's metric rows by its :class:`~fincast.training.recorder.Recorder`. Divergence is detected on
the device (the run is frozen at that step) and seen by the host at the next read. On CUDA the step is captured
once per batch shape as a CUDA graph and replayed (``graphs.StepGraphs``), falling back to eager steps with a
logged reason.

Under torchrun every rank trains its shard of each global batch; gradients are all-reduced before clipping, so
every rank clips identically and stateful clippers stay in step; only rank 0 logs and writes checkpoints.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from fincast.clipping import Layout, StackClipper
from fincast.clipping.core import finite
from fincast.config import ClipConfig, MonitorConfig, TrainConfig
from fincast.features import Split
from fincast.models.stacked import StackedNet
from fincast.training import checkpoint as ckpt
from fincast.training.device import dist_info, rng_states, set_rng_state
from fincast.training.evaluate import score
from fincast.training.graphs import StepGraphs
from fincast.training.optim import LossScale, StackedOptimizer, lr_table, total_steps
from fincast.training.recorder import COLUMNS, PRE, STEPPED, FitResult, MetricSink, Recorder
from fincast.training.samples import Samples

log = logging.getLogger("fincast.training")
_NO_LIMIT = 2 ** 62


class _DeviceState:
    """The run axis's counters and masks on the device ([K] tensors)."""

    def __init__(self, cfgs: list[TrainConfig], device: torch.device):
        k = len(cfgs)
        self.step = torch.zeros(k, dtype=torch.long, device=device)  # steps taken (schedules, clip state)
        self.live = torch.ones(k, dtype=torch.bool, device=device)  # not stopped (the host) nor diverged (here)
        self.max_steps = torch.tensor([_NO_LIMIT if c.max_steps is None else c.max_steps for c in cfgs],
                                      dtype=torch.long, device=device)


class Engine:
    """K runs of one architecture on the same data, or each on its own (see the module doc and :func:`train_runs`)."""

    def __init__(self, models: list[torch.nn.Module], train: Split | list[Split], val: Split | list[Split],
                 cfgs: list[TrainConfig],
                 clips: list[ClipConfig], *, device: torch.device, precision: str = "fp32", log_every: int = 50,
                 sinks: list[MetricSink | None] | None = None, monitor: MonitorConfig | None = None,
                 checkpoints: list[Callable[[dict], None] | None] | None = None,
                 on_epochs: list[Callable[[int, float], bool] | None] | None = None, progress: bool = False,
                 loss_scale: float = 2.0 ** 16, cuda_graphs: bool = True, restore_best: bool = True,
                 metric_every: int = 1):
        k_runs = len(models)
        sinks = list(sinks) if sinks is not None else [None] * k_runs
        checkpoints = list(checkpoints) if checkpoints is not None else [None] * k_runs
        on_epochs = list(on_epochs) if on_epochs is not None else [None] * k_runs
        if k_runs == 0 or not (len(cfgs) == len(clips) == len(sinks) == len(checkpoints) == len(on_epochs) == k_runs):
            raise ValueError("train_runs: one train config, clip config, sink, checkpoint and on_epoch per model")
        if len({c.batch_size for c in cfgs}) != 1:
            raise ValueError("train_runs: every run of a stack needs the same train.batch_size")
        self.rank, self.world = dist_info()
        if self.rank != 0:
            sinks, checkpoints = [None] * k_runs, [None] * k_runs
        self.models, self.cfgs, self.clips = list(models), list(cfgs), list(clips)
        self.device, self.log_every, self.progress, self.restore_best = device, log_every, progress, restore_best
        self.monitor = monitor or MonitorConfig()
        self.checkpoints, self.on_epochs = checkpoints, on_epochs
        self.runs = k_runs
        self.batch = cfgs[0].batch_size
        self.data = Samples(train, val, k_runs, self.batch, device)
        if not self.data.shared and (self.world > 1 or any(c is not None for c in checkpoints)):
            raise ValueError("train_runs: runs on samples of their own take no checkpoints and do not run under "
                             "torchrun")
        self.spe = self.data.spe  # the loop's batches per epoch (the longest run's steps per epoch)
        self.net = StackedNet(self.models, device)
        self.layout = Layout.of([(n, self.net.shapes[n]) for n in self.net.names])
        self.clipper = StackClipper(self.clips, self.layout, device,
                                    max(total_steps(c, int(n)) for c, n in zip(self.cfgs, self.data.spes)))
        self.scaler = LossScale(k_runs, device, loss_scale) if precision == "fp16" else None
        self.opt = StackedOptimizer(self.cfgs, self.net.flat, scaled=self.scaler is not None)
        self.autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision) if device.type == "cuda" \
            else None
        self.dev = _DeviceState(self.cfgs, device)
        self.recs = [Recorder(c.method, self.monitor, sinks[k], log_every, self.scaler is not None,
                              self.layout.layers, metric_every) for k, c in enumerate(self.clips)]
        self.gens = [torch.Generator().manual_seed(c.seed) for c in self.cfgs]
        self.gen_states: list[torch.Tensor] = [g.get_state() for g in self.gens]  # at this epoch's start
        self.best = torch.empty_like(self.net.flat)  # best-validating weights of each run
        self.buf = torch.zeros(self.spe, k_runs, len(COLUMNS), device=device)
        self.layer_rows: list[tuple[int, torch.Tensor]] = []  # (batch, [K, 2 x layers]) of monitor steps
        self.host_step = 0  # steps of the runs still training (they step together)
        self.start = (0, 0)  # (epoch, batch) to start from
        self.rewinds: list[dict | None] = [None] * self.runs  # resumed runs' undo of a mid-epoch validation
        self.resumed_pruned = [False] * self.runs  # resumed from the checkpoint of the epoch it was pruned at
        self._pinned: list[torch.Tensor] = []
        self._no_skip = torch.zeros(k_runs, dtype=torch.bool, device=device)
        self.graphs = self._graphs(cuda_graphs)

    def _graphs(self, wanted: bool) -> StepGraphs | None:
        if self.device.type != "cuda" or not wanted:
            return None
        if self.world > 1:
            log.info("CUDA graphs off under torchrun: the step's all-reduce runs eagerly")
            return None
        return StepGraphs(lambda idx, plan: self.step(idx, plan, monitor=False)[0])

    # -----------------------------------------------------------------------------------------
    # one step of every run (no host sync; captured as a CUDA graph on CUDA)
    # -----------------------------------------------------------------------------------------

    def step(self, idx: torch.Tensor, plan: torch.Tensor, monitor: bool = False):
        """One optimizer step of every run on its batch ``idx`` [K, B] (sample indices) with this step's row of
        the epoch's plan [K, 2 + 6] (float64: learning rate, scheduled clip threshold, optimizer coefficients).
        -> (record [K, len(COLUMNS)], per-layer monitoring [K, 2 x layers] or None)."""
        net, dev, scaler = self.net, self.dev, self.scaler
        lr, thr, coef = plan[:, 0], plan[:, 1], plan[:, 2:]
        x, y, weight = self._shard(idx)
        going = dev.live & (dev.step < dev.max_steps)  # not stopped, not diverged, within max_steps
        if isinstance(weight, torch.Tensor):  # runs on samples of their own: padding weighs 0
            count = weight.sum(1)
            going = going & (count > 0)  # a batch of padding only: this run's epoch has ended
        net.grad.zero_()
        with torch.autocast(self.device.type, dtype=self.autocast or torch.float32, enabled=self.autocast is not None):
            pred = net(x, True, going).float()
        sq = (pred - y).square()
        if weight is None:
            loss = sq.mean(1)
        elif isinstance(weight, torch.Tensor):
            loss = (sq * weight).sum(1) / count.clamp_min(1.0)
        else:  # a DDP shard: its share of the global mean
            loss = sq.sum(1) * weight
        net.backward((loss if scaler is None else loss * scaler.scale).sum())
        loss = loss.detach()
        grad = net.grad
        if self.world > 1:  # every rank clips the global batch's gradients, and judges its global loss
            torch.distributed.all_reduce(grad)
            torch.distributed.all_reduce(loss)
        found = scaler.unscale(grad) if scaler is not None else None
        if monitor:
            layer_grads = self._layer_norms(grad)
            before = net.flat.clone()
        stats = self.clipper.step(grad, net.flat, thr, dev.step, going)
        # divergence: a non-finite loss, or gradient norm outside fp16 scaling (where the scaler skips the step);
        # that step is recorded, and the run frozen from it on (no update)
        update = going & finite(loss if scaler is not None else loss + stats[:, PRE] * 0)
        dev.live &= update | ~going
        if found is not None:
            update &= ~found
        self.opt.step(net.flat, grad, coef, update, lr)
        if scaler is not None:
            scaler.update(found, going)
        dev.step += going
        skipped = found if found is not None else self._no_skip
        row = torch.cat([loss.unsqueeze(1), stats, torch.stack([skipped, going], 1).float()], 1)
        if not monitor:
            return row, None
        ratio = self._layer_norms(net.flat - before) / self._layer_norms(before).clamp_min(1e-12)
        return row, torch.cat([layer_grads, ratio], 1)

    def _shard(self, idx: torch.Tensor):
        """(x [K, b, ...], y [K, b], weight): the batch (with its samples' weights [K, b] when the runs have samples
        of their own), or under torchrun this rank's shard of it with the weight that makes the all-reduced sum the
        global batch's mean (a rank with no sample gets one of weight 0)."""
        if self.world == 1:
            return self.data.batch_of(idx)
        x, y = self.data.x, self.data.y
        local = idx[:, self.rank::self.world]
        if local.shape[1] == 0:
            return x[idx[:, :1]], y[idx[:, :1]], 0.0
        return x[local], y[local], 1.0 / idx.shape[1]

    def _layer_norms(self, flat: torch.Tensor) -> torch.Tensor:
        """[K, layers]: each layer's L2 norm (of the per-tensor norms) of ``flat`` [K, P]."""
        from fincast.clipping import tensor_norms

        norms = tensor_norms(flat, self.layout)
        return torch.stack([torch.linalg.vector_norm(norms[:, a:b], 2.0, dim=1) for a, b in self.layout.spans], 1)

    # -----------------------------------------------------------------------------------------
    # the loop
    # -----------------------------------------------------------------------------------------

    def run(self) -> list[FitResult]:
        """Train until every run has stopped; the runs' models get their best (or last) weights."""
        return self._run()

    def _run(self) -> list[FitResult]:
        ckpt.stop_resumed(self)
        epochs = max(c.epochs for c in self.cfgs)
        start_epoch, start_batch = self.start
        bar = tqdm(total=epochs, initial=start_epoch, desc="train" if self.runs == 1 else f"train x{self.runs}",
                   unit="epoch", disable=not self.progress, leave=False)
        for epoch in range(start_epoch, epochs):
            for rec, cfg in zip(self.recs, self.cfgs):
                if rec.stop is None and epoch >= cfg.epochs:
                    rec.stop = "epochs"
            running = [k for k, rec in enumerate(self.recs) if rec.stop is None]
            if not running:
                break
            stopped_at = self._train_epoch(epoch, start_batch if epoch == start_epoch else 0, running)
            self._end_epoch(epoch, running, stopped_at)
            bar.update(1)
            bar.set_postfix(self._postfix(), refresh=False)
        bar.close()
        return self._finish()

    def _train_epoch(self, epoch: int, first: int, running: list[int]) -> dict[int, int]:
        """The epoch's steps from batch ``first`` on; -> per run the batches done when it stopped mid-epoch."""
        self._set_active(running)
        orders = self._orders(first, running)
        spes = self.data.spes
        # each run's steps before this epoch's first batch (runs on samples of their own: no resume, so full epochs)
        base = np.full(self.runs, self.host_step - first) if self.data.shared else epoch * spes
        steps = base[None, :] + np.arange(self.spe)[:, None]  # [batches, K] the step each batch of this epoch is
        lrs = lr_table(self.cfgs, steps, spes)
        plan = np.concatenate([lrs[..., None], self.clipper.thresholds(steps)[..., None],
                               self.opt.coefficients(lrs, steps)], 2)
        plan = self._to_device(plan, torch.float64 if self.device.type != "mps" else torch.float32)
        limits = {k: self.cfgs[k].max_steps or _NO_LIMIT for k in running}
        left = {k: int(limits[k] - base[k] - first) for k in running}  # steps each may still take
        stopped_at = {k: first + n for k, n in left.items() if n < int(spes[k]) - first}
        drained = done = first
        t0, every = time.perf_counter(), self.monitor.every
        clock = self._clock(running)
        for b in range(first, self.spe):
            if not any(base[k] + b < limits[k] and b < spes[k] and self.recs[k].diverged is None for k in running):
                break
            # per-layer monitoring at every `every`-th step of a run (runs on samples of their own: of any run)
            monitor = every is not None and any((base[k] + b + 1) % every == 0 for k in running if b < spes[k])
            idx = orders[:, b * self.batch:(b + 1) * self.batch]
            if monitor or self.graphs is None:
                row, layers = self.step(idx, plan[b], monitor)
                if layers is not None:
                    self.layer_rows.append((b, layers))
            else:
                row = self.graphs(idx, plan[b])
            self.buf[b].copy_(row)
            self.host_step += 1
            done = b + 1
            if self.device.type == "cpu" and done - drained >= self.log_every:  # reading costs nothing here
                drained = self._drain(drained, done, lrs)
            due = [k for k in running if self.cfgs[k].checkpoint_every and done < self.spe
                   and self.host_step % self.cfgs[k].checkpoint_every == 0 and self.host_step < limits[k]
                   and (self.checkpoints[k] is not None or self.world > 1)]
            if due:
                drained = self._drain(drained, done, lrs)
                self._add_time(clock, t0)
                for k in due:
                    if self.recs[k].diverged is None:
                        self._save(k, epoch, done)
                t0, clock = time.perf_counter(), self._clock(running)
        self._drain(drained, done, lrs)
        self._add_time(clock, t0)
        return stopped_at

    def _end_epoch(self, epoch: int, running: list[int], stopped_at: dict[int, int]) -> None:
        """Validation, early stopping, pruning, stop rules and epoch-end checkpoints of the runs that trained."""
        for k in running:
            if self.recs[k].diverged is not None:
                self.recs[k].stop = "diverged"
        judged = [k for k in running if self.recs[k].stop is None]
        partial = {k: ckpt.rewind_point(self, k) for k in judged
                   if stopped_at.get(k, self.data.spes[k]) < self.data.spes[k]}
        if judged:
            self._validate(epoch, judged)
        for k in judged:
            rec, cfg = self.recs[k], self.cfgs[k]
            if rec.diverged is not None:
                rec.stop = "diverged"
                continue
            prune = self._pruned(k, epoch)
            stop = None
            if rec.step >= (cfg.max_steps or _NO_LIMIT):
                stop = "max_steps"
            elif cfg.patience is not None and rec.bad_epochs >= cfg.patience:
                stop = "early_stopping"
            elif prune and epoch + 1 < cfg.epochs:
                stop = "pruned"
            if cfg.checkpoint or (cfg.checkpoint_every and rec.step % cfg.checkpoint_every == 0):
                if k in partial:  # max_steps mid-epoch: a resume with a higher limit goes on from here
                    self._save(k, epoch, stopped_at[k], rewind=partial[k])
                else:
                    self._save(k, epoch + 1, 0, next_epoch=True, pruned=stop == "pruned")
            rec.stop = stop
        for rec in self.recs:
            rec.flush()

    def _validate(self, epoch: int, judged: list[int]) -> None:
        """Every judged run's validation loss and metrics (one stacked forward), early-stopping bookkeeping and
        best weights."""
        live = torch.zeros(self.runs, dtype=torch.bool)
        live[judged] = True
        preds = self.data.predict(self.net, live.to(self.device))
        scores = {k: score(preds[k], self.data.vals[k])[:2] for k in judged}
        losses = [scores[k][0] for k in judged]
        if self.world > 1:  # decide on rank 0's numbers everywhere, so every rank stops at the same epoch
            shared = torch.tensor(losses, dtype=torch.float64, device=self.device)
            torch.distributed.broadcast(shared, 0)
            losses = shared.cpu().tolist()
        improved = []
        for k, loss in zip(judged, losses):
            rec, cfg = self.recs[k], self.cfgs[k]
            rec.validated(loss, scores[k][1], epoch)
            if rec.diverged is None and rec.improved(loss, epoch, cfg.min_delta):
                improved.append(k)
        if improved:
            index = torch.tensor(improved, device=self.device)
            self.best.index_copy_(0, index, self.net.flat.index_select(0, index))

    def _pruned(self, k: int, epoch: int) -> bool:
        """The run's ``on_epoch(epoch, val_loss)`` (a sweep's pruner); rank 0 decides, every rank follows."""
        hook = self.on_epochs[k]
        if hook is None and self.world == 1:
            return False
        flag = torch.tensor([float(hook(epoch + 1, self.recs[k].val_history[-1])) if hook and self.rank == 0
                             else 0.0])
        if self.world > 1:
            flag = flag.to(self.device)
            torch.distributed.broadcast(flag, 0)
        return bool(flag.item())

    def _drain(self, lo: int, hi: int, lrs: np.ndarray) -> int:
        """Read batches [lo, hi) of the buffer back (one transfer) into every run's record; -> hi."""
        if hi <= lo:
            return hi
        rows = self.buf[lo:hi].double().cpu().numpy()  # [n, K, columns]
        layers = [(b, t.double().cpu().numpy()) for b, t in self.layer_rows if lo <= b < hi]
        self.layer_rows = [(b, t) for b, t in self.layer_rows if b >= hi]
        for k, rec in enumerate(self.recs):
            if rec.stop is not None or rec.diverged is not None:
                continue
            took = np.flatnonzero(rows[:, k, STEPPED] > 0)
            if not len(took):
                continue
            first = rec.step + 1
            rec.take(rows[took, k], lrs[lo + took, k])
            kept = rec.step - first + 1  # (fewer than took when it diverged)
            for b, values in layers:
                pos = np.searchsorted(took, b - lo)
                if pos < kept and took[pos] == b - lo and (first + int(pos)) % self.monitor.every == 0:
                    rec.take_layers(first + int(pos), values[k])
            rec.flush()
        return hi

    # -----------------------------------------------------------------------------------------
    # helpers: masks, data order, time, progress, results
    # -----------------------------------------------------------------------------------------

    def _set_active(self, running: list[int]) -> None:
        """The runs that train this epoch (a run that diverged is out already: the host only learns it at reads)."""
        mask = np.zeros(self.runs, dtype=bool)
        mask[running] = True
        self.dev.live &= self._to_device(mask, torch.bool)

    def _orders(self, first: int, running: list[int]) -> torch.Tensor:
        """[K, n] each run's data order for this epoch (its generator; a resumed run's from the checkpoint; runs
        on samples of their own: see ``samples``). Stopped runs get 0..n-1 (their steps are masked)."""
        perms = {}
        for k in running:
            if first == 0 or self.gen_states[k] is None:
                self.gen_states[k] = self.gens[k].get_state()
            else:
                self.gens[k].set_state(self.gen_states[k])
            perms[k] = torch.randperm(int(self.data.counts[k]), generator=self.gens[k]).numpy()
        return self._to_device(self.data.order(perms), torch.long)

    def _to_device(self, array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        """A host array on the device without a sync (pinned memory, kept until the next epoch, on CUDA)."""
        t = torch.as_tensor(np.ascontiguousarray(array)).to(dtype)
        if self.device.type != "cuda":
            return t.to(self.device)
        if len(self._pinned) > 16:
            self._pinned = self._pinned[-8:]
        t = t.pin_memory()
        self._pinned.append(t)
        return t.to(self.device, non_blocking=True)

    def _clock(self, running: list[int]) -> tuple[int, dict[int, int]]:
        """Where an interval of training starts: the loop's step and each running run's."""
        return self.host_step, {k: self.recs[k].step for k in running}

    def _add_time(self, clock: tuple[int, dict[int, int]], t0: float) -> None:
        """Charge the interval's wall time since ``t0`` (drained up to now) to its runs, each by its share of the
        interval's steps: a run that stopped or diverged early in the interval pays only for the steps it took, so
        ``step_ms`` is the stack's time per step for every run."""
        host0, steps0 = clock
        seconds, steps = time.perf_counter() - t0, self.host_step - host0
        if steps <= 0:
            return
        for k, s0 in steps0.items():
            self.recs[k].train_seconds += seconds * (self.recs[k].step - s0) / steps

    def _postfix(self) -> dict:
        if self.runs == 1:
            h = self.recs[0].history
            return {"loss": f"{h['loss'][-1]:.4g}", "gnorm": f"{h['norm_pre'][-1]:.3g}"} if h["loss"] else {}
        return {"training": sum(r.stop is None for r in self.recs)}

    def _finish(self) -> list[FitResult]:
        out = []
        for k, rec in enumerate(self.recs):
            rec.flush(force=True)
            best = rec.best_epoch > 0 and self.restore_best
            self.net.load_into(k, self.models[k], self.best if best else None)
            out.append(rec.result())
        return out

    # -----------------------------------------------------------------------------------------
    # checkpoints and resume (a run's state, sliced out of the stack: resumable alone)
    # -----------------------------------------------------------------------------------------

    def _save(self, k: int, epoch: int, batch: int, next_epoch: bool = False, rewind: dict | None = None,
              pruned: bool = False) -> None:
        """Checkpoint run ``k`` after ``batch`` batches of ``epoch`` (everything drained and sent first, so a
        resumed run logs from the next step on). Under torchrun every rank comes here (the RNG states are
        gathered); rank 0 writes. ``rewind``: the early-stopping bookkeeping before a mid-epoch validation (see
        ``checkpoint.rewind_point``). ``pruned``: the run was pruned here (a resume keeps it stopped)."""
        rng = rng_states(self.world)
        write = self.checkpoints[k]
        if write is None:
            return
        rec = self.recs[k]
        rec.flush(force=True)
        gen = self.gens[k].get_state() if next_epoch else self.gen_states[k]
        write(ckpt.run_state(self, k, rng, {"epoch": epoch, "batch": batch, "gen_state": gen,
                                            "steps_per_epoch": self.spe, **rec.state(),
                                            **({"rewind": rewind} if rewind is not None else {}),
                                            **({"pruned": True} if pruned else {})}))

    def resume(self, saved: list[dict | None]) -> None:
        """Continue from per-run checkpoints (``_save``'s dicts; all runs, at one loop position)."""
        positions = set()
        for k, state in enumerate(saved):
            if state is None:
                raise ValueError("resume: every run of a stack needs its checkpoint")
            positions.add(ckpt.load_run(self, k, state))
        if len(positions) != 1:
            raise ValueError(f"resume: the runs' checkpoints are at different points {sorted(positions)}")
        (epoch, batch, step), = positions
        self.start, self.host_step = (epoch, batch), step
        set_rng_state(saved[0]["rng"])
        if self.world > 1:
            torch.distributed.broadcast(self.net.flat, 0)


def train_runs(models: list[torch.nn.Module], train: Split | list[Split], val: Split | list[Split],
               cfgs: list[TrainConfig],
               clips: list[ClipConfig], *, device: torch.device, precision: str = "fp32", log_every: int = 50,
               sinks: list[MetricSink | None] | None = None, monitor: MonitorConfig | None = None,
               progress: bool = False, checkpoints: list[Callable[[dict], None] | None] | None = None,
               resumes: list[dict] | None = None, restore_best: bool = True,
               on_epochs: list[Callable[[int, float], bool] | None] | None = None, loss_scale: float = 2.0 ** 16,
               cuda_graphs: bool = True, metric_every: int = 1) -> list[FitResult]:
    """Train K models of one architecture (``LSTMForecaster`` or ``OptionLSTM``) on the same data (``train`` and
    ``val`` one split each), or each on its own (one split per run: a backtest's folds; no checkpoints, no
    torchrun), each as it would train alone: its own seed (initial weights are the models' own; data order from ``cfgs[k].seed``),
    learning rate, optimizer and schedule, clipping with its own state, early stopping, divergence, metric rows
    (``sinks[k]``), checkpoints (``checkpoints[k]`` receives the run's full state at each epoch end and every
    ``checkpoint_every`` steps; ``resumes`` continues from such states exactly) and pruning hook (``on_epochs[k]
    (epoch, val_loss) -> stop?``). Each model gets its best weights (``restore_best=False``: its last).
    ``precision``: fp32, or bf16/fp16 autocast on CUDA (fp16 with per-run loss scaling, initial scale
    ``loss_scale``). Metric rows reach a sink every ``metric_every`` steps, at each validation and at a divergence
    (the FitResult's history keeps every step)."""
    engine = Engine(models, train, val, cfgs, clips, device=device, precision=precision, log_every=log_every,
                    sinks=sinks, monitor=monitor, checkpoints=checkpoints, on_epochs=on_epochs, progress=progress,
                    loss_scale=loss_scale, cuda_graphs=cuda_graphs, restore_best=restore_best,
                    metric_every=metric_every)
    rank, world = engine.rank, engine.world
    if world > 1 and resumes is None:  # each rank its own dropout masks; the weights come from rank 0
        torch.manual_seed(cfgs[0].seed + 1_000_003 * rank)
        torch.distributed.broadcast(engine.net.flat, 0)
    if resumes is not None:
        engine.resume(resumes)
    return engine.run()
