"""Launched by tests/test_training.py under torchrun: train a tiny model with DDP (gloo, CPU) and save
rank 0's final parameters and clipping statistics. Also importable, to run the same fit in one process."""

from __future__ import annotations

import sys

import numpy as np
import torch

from fincast.config import from_dict
from fincast.features import Split
from fincast.models import LSTMForecaster
from fincast.training import fit


def data(n: int = 21, seed: int = 0) -> Split:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, 3, generator=g)
    y = torch.randn(n, generator=g) * 3
    dates = np.arange(n).astype("datetime64[D]")
    return Split(x.numpy(), y.numpy(), y.numpy().astype(float), np.ones(n), dates, dates + 1,
                 np.full(n, "T", dtype=object))


def run(method: str) -> dict:
    """Several clipped steps over two epochs, a global batch of 5 (shards of 3 and 2 on two ranks; each epoch's
    last batch has one sample, so one rank's shard is empty)."""
    clip = {"norm": {"max_norm": 0.05}, "autoclip": {"percentile": 50}}
    cfg = from_dict({"train": {"epochs": 2, "batch_size": 5, "lr": 1e-2, "patience": None, "max_steps": 9,
                               "seed": 3},
                     "clip": {"method": method, **clip}, "monitor": {"every": None}})
    torch.manual_seed(0)
    model = LSTMForecaster(3, 4)
    rows = []
    split = data()
    result = fit(model, split, split, cfg.train, cfg.clip, device=torch.device("cpu"), log_every=4,
                 sink=rows.extend)
    return {"params": {k: v.clone() for k, v in model.state_dict().items()}, "history": result.history,
            "rows": rows, "steps": result.steps}


def resume_is_exact() -> bool:
    """With dropout (each rank its own masks), a run resumed from rank 0's epoch-1 checkpoint, as
    `fincast resume` reads it, ends with the uninterrupted run's weights."""
    cfg = from_dict({"train": {"epochs": 2, "batch_size": 5, "lr": 1e-2, "patience": None, "seed": 3},
                     "clip": {"method": "zclip", "zclip": {"warmup": 2}}, "monitor": {"every": None}})

    def model():
        torch.manual_seed(0)
        return LSTMForecaster(3, 4, dropout=0.5)

    saved: list = []
    full = model()
    fit(full, data(), data(), cfg.train, cfg.clip, device=torch.device("cpu"), checkpoint=saved.append)
    ckpt = [saved[0] if saved else None]
    torch.distributed.broadcast_object_list(ckpt, 0)
    resumed = model()
    fit(resumed, data(), data(), cfg.train, cfg.clip, device=torch.device("cpu"), resume=ckpt[0])
    return all(torch.equal(a, b) for a, b in zip(full.state_dict().values(), resumed.state_dict().values()))


if __name__ == "__main__":
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo")
    out = run(sys.argv[1])
    out["resume_exact"] = resume_is_exact()
    if torch.distributed.get_rank() == 0:
        torch.save(out, sys.argv[2])
    torch.distributed.destroy_process_group()
