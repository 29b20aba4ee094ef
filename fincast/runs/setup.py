"""A run's machine (layer L4, runs): the torchrun process group, the device, torch's CPU threads."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import sys
import threading
import time

import torch

from fincast.config import PipelineConfig
from fincast.runs import stopping
from fincast.training import dist_info, resolve_device


def cores() -> int:
    """CPU cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def threads(cfg: PipelineConfig, *, writer: bool, device: torch.device, default: int | None = None) -> int:
    """torch CPU threads: train.threads, else ``default`` (a backtest's: 1), else this process's share of the
    cores, less one for a metric writer process (the default model is as fast on one thread as on two, and idle
    OpenMP threads spin and starve the writer)."""
    if cfg.train.threads is not None:
        return cfg.train.threads
    if default is not None:
        return default
    share = cores() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, share - (1 if writer and device.type == "cpu" else 0))


def init_distributed(cfg: PipelineConfig) -> bool:
    """Join the torchrun process group when launched by torchrun (WORLD_SIZE > 1): NCCL on CUDA, gloo on
    CPU. Returns whether this call initialised it (and so must tear it down)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or torch.distributed.is_initialized():
        return False
    cuda = cfg.train.device in ("auto", "cuda") and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group("nccl" if cuda else "gloo")
    return True


def device(cfg: PipelineConfig) -> torch.device:
    """train.device resolved; under torchrun on GPUs, this rank's GPU."""
    dev = resolve_device(cfg.train.device)
    if dist_info()[1] > 1 and dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return dev


def prepare(cfg: PipelineConfig, *, writer: bool = False, default_threads: int | None = None) -> tuple[torch.device, str]:
    """(device, precision) of a run, with torch's threads set for it (``default_threads`` when train.threads is
    null)."""
    from fincast.training import resolve_precision

    dev = device(cfg)
    torch.set_num_threads(threads(cfg, writer=writer, device=dev, default=default_threads))
    return dev, resolve_precision(cfg.train.precision, dev)


def die_with_parent() -> None:
    """A worker process: die with the process that started it (Linux: even on SIGKILL; elsewhere within a
    second)."""
    parent = os.getppid()
    with contextlib.suppress(OSError, AttributeError):  # Linux: die with the driver, even on SIGKILL
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG

    def watch() -> None:  # elsewhere: notice the driver is gone within a second
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def take_gpu(index: int, gpus: int) -> int:
    """Make GPU ``index mod gpus`` this process's default CUDA device ("cuda" means it); -> that GPU."""
    gpu = index % gpus
    torch.cuda.set_device(gpu)
    return gpu


def visible_gpus(device: str) -> int:
    """GPUs a run on ``train.device`` would use: none for cpu/mps or a torch built without CUDA (asked without
    touching CUDA), else torch.cuda.device_count()."""
    if device not in ("auto", "cuda") or not torch.backends.cuda.is_built():
        return 0
    return torch.cuda.device_count()


def fork_safe(threads: int, gpus: int) -> bool:
    """Whether worker processes may be forked from this one (started in milliseconds with everything imported):
    on Linux, with one torch thread, no other Python threads, no GPUs and CUDA not initialised here (a fork is
    unsafe when this process's OpenMP pool has several threads, or CUDA is set up)."""
    others = [t for t in threading.enumerate() if t is not threading.main_thread() and t.name != "tqdm_monitor"]
    return (not gpus and sys.platform.startswith("linux") and "fork" in mp.get_all_start_methods() and not others
            and threads == 1 and not torch.cuda.is_initialized())


def worker_context(threads: int, gpus: int, preload: str, fork_ok: bool = True):
    """The multiprocessing context of worker processes: fork where that is safe (``fork_safe``), else a
    forkserver that has imported ``preload`` once (spawn where there is none)."""
    if fork_ok and fork_safe(threads, gpus):
        return mp.get_context("fork")
    ctx = mp.get_context("forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn")
    if ctx.get_start_method() == "forkserver":
        ctx.set_forkserver_preload([preload])
    return ctx


def start_worker(threads: int, gpus: int, started) -> None:
    """A worker process's start: its torch threads, its GPU (the i-th worker started, counted by the shared
    ``started`` value: GPU i mod ``gpus``), quiet fincast logs (the driver reports), death with its driver, and
    SIGINT, SIGTERM or SIGHUP ending its runs KILLED (``stopping.in_worker``)."""
    import logging

    torch.set_num_threads(threads)
    if gpus and started is not None:
        with started.get_lock():
            index = started.value
            started.value += 1
        take_gpu(index, gpus)
    logging.getLogger("fincast").setLevel(logging.ERROR)
    die_with_parent()
    stopping.in_worker()
