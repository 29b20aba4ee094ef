"""Worker processes and resource budgeting for studies and sweeps (layer L4, experiments): how many
workers and torch threads, how many runs per stacked batch for the memory at hand, warm worker processes that
die with their driver."""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import math
import multiprocessing as mp
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from fincast import tracking
from fincast.config import (
    PipelineConfig,
)
from fincast.models import LSTMForecaster
from fincast.reports import figures
from fincast.runs import driver, stopping
from fincast.runs.setup import cores, start_worker, take_gpu, worker_context


@contextlib.contextmanager
def worker_pool(workers: int, threads: int, uri: str, *, fork_ok: bool = True, gpus: int = 0):
    """(worker pool, store_ready): the worker processes (None: run in this process) and the function that tells
    them the MLflow store exists. Workers start at once and warm up while this process loads the data and sets
    up the parent run.

    On Linux, with one torch thread per worker, no other Python threads here and CUDA not initialised here,
    the workers are forked from this process before it opens the store or reads data: they start in
    milliseconds with everything imported. (With more torch threads a fork is unsafe if this process ever ran
    a parallel torch op: the child's OpenMP pool would deadlock.) Otherwise they come from a forkserver that
    imports fincast once. With ``gpus`` (GPUs visible), worker i takes GPU i mod gpus as its default CUDA
    device (``torch.cuda.set_device``), so a study's stacks spread over every GPU."""
    if workers <= 1:
        if gpus:
            take_gpu(0, gpus)
        yield None, lambda: None
        return

    ctx = worker_context(threads, gpus, "fincast.runs.driver", fork_ok)  # (the driver imports fincast.tracking)
    ready, opened, started = ctx.Event(), ctx.Value("b", 0), ctx.Value("i", 0)

    def store_ready() -> None:
        opened.value = 1
        ready.set()

    pool = cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init,
                                  initargs=(threads, uri, ready, opened, started, gpus))
    try:
        pool.submit(int)  # start the workers now (a fork pool starts all of them at once)
        yield pool, store_ready
    except BaseException as exc:
        if not isinstance(exc, Exception):  # interrupted (Ctrl-C, SIGTERM, SIGHUP): the workers end their runs KILLED
            stopping.stop_workers(pool)
        raise
    finally:
        ready.set()  # workers still waiting go on (without opening the store) and exit
        pool.shutdown(wait=True, cancel_futures=True)


def plan_chunks(jobs: list[Any], batch_runs: int | str, workers: int) -> list[list[Any]]:
    """The jobs in the batches they train in: jobs that can train stacked (equal ``driver.batch_key``) in
    chunks of at most ``batch_runs`` (``auto``: the group split evenly across the workers, within the memory
    budget), every other job alone. Job order is kept within each chunk."""
    groups: dict[str, list[Any]] = {}
    chunks: list[list[Any]] = []
    for job in jobs:
        key = driver.batch_key(job.cfg) if batch_runs != 1 else None
        if key is None:
            chunks.append([job])
        else:
            groups.setdefault(key, []).append(job)
    for group in groups.values():
        k = batch_runs if isinstance(batch_runs, int) else auto_batch(group[0].cfg, len(group), workers)
        n = math.ceil(len(group) / max(1, k))
        size, extra = divmod(len(group), n)  # as even as possible: 24 in chunks of 10 -> 8 + 8 + 8
        start = 0
        for i in range(n):
            end = start + size + (i < extra)
            chunks.append(group[start:end])
            start = end
    return chunks


def auto_batch(cfg: PipelineConfig, runs: int, workers: int) -> int:
    """``batch_runs: auto``, within a quarter of each worker's share of the free memory (GPU memory on CUDA, RAM
    on a CPU). On CUDA the group split evenly across the workers: there a small run is bound by kernel
    launches, which K stacked runs share. On a CPU about four batches per worker (at least 2 runs each when
    there are more runs than workers): the
    compiled kernel (``models.grouped_lstm.cpu_kernel``) costs about the same per run-step at K = 2 as at 24, so
    smaller batches lose nothing and let a worker whose batch ended early (early stopping, divergence) take the
    next one instead of idling. Where the kernel cannot be built (no C++ compiler), 1: the torch-ops fallback
    gains nothing over a run alone. The measurements: docs/performance.md (batched studies)."""
    import torch

    from fincast.training import resolve_device

    device = resolve_device(cfg.train.device)
    if device.type == "cuda":
        free = torch.cuda.mem_get_info()[0] // max(1, min(workers, torch.cuda.device_count() or 1))
        return budget_batch(free, run_bytes(cfg), runs, workers)
    if device.type != "cpu":
        return 1
    from fincast.models.grouped_lstm import cpu_kernel

    if cpu_kernel() is None:
        return 1
    k = max(2, math.ceil(runs / (4 * max(1, workers))))
    return min(k, budget_batch(available_ram() // max(1, workers), run_bytes(cfg), runs, workers))


def available_ram() -> int:
    """Bytes of RAM available to new allocations (Linux MemAvailable; elsewhere the free pages, else 4 GiB)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    with contextlib.suppress(OSError, ValueError, AttributeError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return 4 << 30


def budget_batch(free_bytes: int, per_run: int, runs: int, workers: int) -> int:
    """Runs per batch: the group split evenly across the workers, at most what a quarter of ``free_bytes``
    (one worker's share of the memory) holds."""
    fit_in = max(1, int(free_bytes * 0.25 // max(1, per_run)))
    return max(1, min(math.ceil(runs / max(1, workers)), fit_in))


def run_bytes(cfg: PipelineConfig, features: int = 32) -> int:
    """Memory one stacked run needs during a step (float32): per layer and time step the saved gates, cell and
    hidden states and inputs (~10 H + F values per sample), twice for the backward's buffers, plus parameters,
    optimizer state and best weights (x 4). ``features`` is a generous guess at the feature count."""
    m, t = cfg.model, cfg.features.lookback
    per_step = 4 * m.num_layers * (t + 1) * cfg.train.batch_size * (10 * m.hidden_size + features) * 2
    params = 4 * m.num_layers * 4 * m.hidden_size * (m.hidden_size + features + 2) * 4
    return per_step + params


def _worker_init(threads: int, uri: str, ready: Any, opened: Any, started: Any = None, gpus: int = 0) -> None:
    """A worker process: its share of the cores, its GPU (the i-th worker started: GPU i mod ``gpus``), quiet
    logs (the driver reports), death with the driver, and the first run's one-off costs paid while the driver
    sets up."""
    start_worker(threads, gpus, started)
    warm_up()
    if ready.wait(timeout=600) and opened.value:
        tracking.open_store(uri)


def worker_count(settings: Any, device: str, runs: int, gpus: int) -> tuple[int, int]:
    """(workers, torch threads each) of a study or sweep: ``settings.workers``, else one per GPU when it trains
    on CUDA (``gpus`` visible), else one per core; at most one per run. Threads: ``settings.threads``, else the
    cores shared out."""
    use_gpus = gpus if device in ("auto", "cuda") else 0
    workers = max(1, min(settings.workers or use_gpus or cores(), runs))
    return workers, settings.threads or max(1, cores() // workers)


def plan_workers(sweep: Any, gpus: int) -> tuple[int, int | None, list[int | None]]:
    """(workers, threads per worker, GPU of each worker): one worker per GPU (round robin when there are
    more workers than GPUs), else one per core; threads = cores / workers."""
    device = sweep.base_cfg.train.device
    use_gpus = gpus if device in ("auto", "cuda") else 0
    workers, threads = worker_count(sweep.settings, device, sweep.trials, gpus)
    return workers, threads, [i % use_gpus if use_gpus else None for i in range(workers)]


def warm_up() -> None:
    """Pay a process's one-off first-use costs (torch's lazy modules and kernels, matplotlib's fonts) on a
    tiny model, so that a study worker's first run is as fast as its others."""
    model = torch.nn.LSTM(4, 4, batch_first=True)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 3, 4))[0].square().mean().backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    from fincast.models.grouped_lstm import loaded_kernel
    from fincast.models.stacked import StackedNet

    if loaded_kernel() is not None:  # a study driver loaded it before forking: the engine's first step too
        net = StackedNet([LSTMForecaster(4, 4), LSTMForecaster(4, 4)])
        net.backward(net(torch.randn(2, 2, 3, 4)).sum())
    with tempfile.TemporaryDirectory() as tmp:
        figures.training_curves(Path(tmp) / "warm.png", loss=[1.0, 0.5], norm_pre=[1.0, 2.0], norm_post=[1.0, 1.0],
                              val_loss=[0.7], val_steps=[2], threshold=1.0, title="warm-up")


class Progress:
    """The study's bar, moved once per run as each finishes (a stack's runs one by one as they close), from the
    result loop or from the thread that reads the workers' messages; a run is counted once."""

    def __init__(self, bar: tqdm):
        self.bar, self.seen, self.lock = bar, set(), threading.Lock()

    def advance(self, name: str) -> None:
        with self.lock:
            if name not in self.seen:
                self.seen.add(name)
                self.bar.update(1)


@contextlib.contextmanager
def progress_feed(pool: cf.ProcessPoolExecutor | None, progress: Progress | None):
    """A queue the worker processes put each closed run's name on (None: no workers, or no bar), and a thread
    here that moves the bar by it."""
    if pool is None or progress is None:
        yield None
        return
    manager = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn").Manager()
    feed = manager.Queue()

    def drain() -> None:
        with contextlib.suppress(OSError, EOFError):  # the manager was stopped with the process group
            while (name := feed.get()) is not None:
                progress.advance(name)

    reader = threading.Thread(target=drain, name="study-progress", daemon=True)
    reader.start()
    try:
        yield feed
    finally:
        with contextlib.suppress(OSError, EOFError):  # (the stop of a process group ends the manager too)
            feed.put(None)
        reader.join(timeout=5)
        manager.shutdown()
