"""A run's machine (layer L4, runs): the torchrun process group, the device, torch's CPU threads."""

from __future__ import annotations

import os

import torch

from fincast.config import PipelineConfig
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
