"""Benchmark: the training engine's run axis, ms per run-step for one run and for K runs stacked, against a plain
torch loop measured in the same invocation.

Model and data as the stability study (pipelines/stability_crypto.yaml): LSTM 32 units, lookback 30, batch 64,
BTC-USD daily from ../shared/data/crypto when it is there, else synthetic prices (the output says which). The runs
of a stack differ as a study's do: seeds, learning rates (1e-3 x 1/2/3) and clip methods (norm, none, autoclip,
zclip in turn), AdamW.

  plain       a hand-written loop: LSTMForecaster (torch's nn.LSTM), AdamW(foreach), clip_grad_norm_, the seeded
              data order; no statistics, no logging. What the engine must beat for one run.
  K = 1, 24, 96, 384, 1024
              the training engine with K runs and no metric sinks; the time is the engine's own per-step wall time
              (FitResult.step_ms: steps, statistics buffer and its reads, not validation) divided by K.

Each configuration trains ``--steps`` steps (fewer for large K on a CPU, at least 5; one epoch, no early stop), after
one warm-up run of the same K (kernel build, buffers, CUDA graph capture). Configurations are interleaved over
``--repeats`` rounds; the median is shown with every reading. Everything is measured in this one invocation.

Targets (issue 18): on 2 CPU cores, K = 24 at least 1.6x faster per run-step than K = 1, and K = 1 at least 1.25x
faster than the plain loop; on one GPU, K = 1024 at least 100x faster per run-step than K = 1, and K = 1 at most
1.0 ms per step (CUDA graphs).

Run: .venv/bin/python bench/run_axis.py [--device auto|cpu|cuda] [--runs 1,24,96,384,1024] [--steps N]
[--repeats N] [--threads N] [--no-graphs] [--compile]   (~4 min on 2 CPU cores with the defaults)

--compile adds rows for the other way to remove launch overhead the issue names, torch.compile's reduce-overhead
mode (inductor kernels replayed as CUDA graphs) over the engine's eager step, beside the engine's own
torch.cuda.CUDAGraph capture.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = (ROOT.parent / "shared" / "data" / "crypto").resolve()
for candidate in (ROOT / ".gpu-data" / "crypto",):  # the GPU machine gets the data inside the checkout
    if (candidate / "BTC-USD.csv").is_file():
        DATA = candidate


def features():
    from fincast import config
    from fincast import features as feats
    from fincast.runs import driver

    source = ["data.source=csv", f"data.path={DATA}"] if (DATA / "BTC-USD.csv").is_file() else \
        ["data.source=synthetic"]
    cfg = config.load(ROOT / "pipelines" / "price_crypto.yaml",
                      ["data.tickers=[BTC-USD]", "features.lookback=30", "train.batch_size=64", *source])
    prices = driver.load_data(cfg)
    return cfg, feats.build(prices.frames, cfg.features, price=cfg.data.price), source[0].split("=")[1]


def plain(fs, device, steps: int) -> float:
    """ms per step of the hand-written loop (after 5 warm-up steps)."""
    import torch

    from fincast.models import LSTMForecaster

    torch.manual_seed(0)
    model = LSTMForecaster(fs.train.x.shape[2], 32).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    x = torch.as_tensor(fs.train.x, device=device)
    y = torch.as_tensor(fs.train.y, device=device)
    gen = torch.Generator().manual_seed(0)
    n = len(y)
    order = torch.cat([torch.randperm(n, generator=gen) for _ in range(math.ceil((steps + 5) * 64 / n) + 1)])
    order = order.to(device)
    t0 = 0.0
    for s in range(steps + 5):
        if s == 5:
            _sync(device)
            t0 = time.perf_counter()
        idx = order[s * 64:(s + 1) * 64]
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(model(x[idx]), y[idx])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    _sync(device)
    return 1000 * (time.perf_counter() - t0) / steps


def _engine(fs, device, k: int, max_steps: int | None, graphs: bool):
    """An Engine of K runs as a study's: seeds, learning rates and clip methods differ, AdamW, one epoch."""
    import torch

    from fincast.config import from_dict
    from fincast.models import LSTMForecaster
    from fincast.training.engine import Engine

    methods = ["norm", "none", "autoclip", "zclip"]
    cfgs = [from_dict({"train": {"epochs": 1, "batch_size": 64, "lr": 1e-3 * (1 + i % 3), "seed": i,
                                 "optimizer": "adamw", "patience": None, "max_steps": max_steps},
                       "clip": {"method": methods[i % len(methods)]}, "monitor": {"every": None}})
            for i in range(k)]
    models = []
    for i in range(k):
        torch.manual_seed(i)
        models.append(LSTMForecaster(fs.train.x.shape[2], 32).to(device))
    val = fs.val if len(fs.val) <= 256 else _head(fs.val, 256)  # (validation is not timed)
    return Engine(models, fs.train, val, [c.train for c in cfgs], [c.clip for c in cfgs], device=device,
                  monitor=cfgs[0].monitor, cuda_graphs=graphs, log_every=10 ** 6)


def engine(cfg, fs, device, k: int, steps: int, graphs: bool) -> float:
    """ms per run-step of K runs stacked: the engine's own per-step wall time over ``steps`` steps."""
    return _engine(fs, device, k, steps, graphs).run()[0].step_ms / k


class Compiled:
    """The engine's step under ``torch.compile(mode="reduce-overhead")`` (inductor kernels, replayed as CUDA graphs
    on CUDA) instead of the engine's own graph capture: one engine per K, compiled and warmed up once, then timed
    over ``steps`` steps per reading (the epoch's batches in turn; the step and its buffers as the engine's loop
    drives them)."""

    def __init__(self, fs, device, k: int):
        import numpy as np
        import torch

        from fincast.training.optim import lr_table

        # Each K's compiled step shares the model's forward code with the others, and dynamo keeps 8 guarded
        # versions of a code object by default: past that it falls back to eager silently (seen as a x30 slower
        # second reading). Room for every K's two batch shapes:
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        torch._dynamo.config.accumulated_cache_size_limit = max(torch._dynamo.config.accumulated_cache_size_limit, 512)
        self.device, self.k = device, k
        eng = self.eng = _engine(fs, device, k, None, graphs=False)
        self.step = torch.compile(eng.step, mode="reduce-overhead", dynamic=False)
        running = list(range(k))
        eng._set_active(running)
        self.orders = eng._orders(0, running)
        steps = np.arange(eng.spe)
        lrs = lr_table(eng.cfgs, steps, eng.spe)
        plan = np.concatenate([lrs[..., None], eng.clipper.thresholds(steps)[..., None],
                               eng.opt.coefficients(lrs, steps)], 2)
        self.plan = eng._to_device(plan, torch.float64)
        self.b = 0
        self.time(eng.spe + 3)  # warm-up: an epoch, so both batch shapes (the last batch is smaller) are compiled

    def time(self, steps: int) -> float:
        """ms per run-step over the next ``steps`` steps."""
        eng = self.eng
        _sync(self.device)
        t0 = time.perf_counter()
        for _ in range(steps):
            b = self.b % eng.spe
            row, _ = self.step(self.orders[:, b * eng.batch:(b + 1) * eng.batch], self.plan[b], False)
            eng.buf[b].copy_(row)
            self.b += 1
        _sync(self.device)
        return 1000 * (time.perf_counter() - t0) / steps / self.k


def _head(split, n):
    import dataclasses

    return dataclasses.replace(split, **{f.name: getattr(split, f.name)[:n] for f in dataclasses.fields(split)})


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--runs", default="1,24,96,384,1024")
    ap.add_argument("--steps", type=int, default=60, help="steps per measurement (large K on a CPU: fewer)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    ap.add_argument("--no-graphs", action="store_true", help="eager steps on CUDA")
    ap.add_argument("--compile", action="store_true",
                    help="also measure the engine's step under torch.compile(mode='reduce-overhead') (rows "
                         "'compiled K=...'; the alternative to the engine's own CUDA graphs; minutes of compiling)")
    ap.add_argument("--cpu-budget", type=float, default=6.0, help="CPU: seconds of training per measurement")
    args = ap.parse_args()
    import torch

    from fincast.training import resolve_device

    device = resolve_device(args.device)
    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    cfg, fs, source = features()
    ks = [int(k) for k in args.runs.split(",")]
    graphs = not args.no_graphs

    def steps_for(k: int) -> int:
        if device.type != "cpu":
            return args.steps
        return max(5, min(args.steps, int(args.cpu_budget / (0.0012 * k))))

    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {threads} threads"
    print(f"device: {device} ({name}); torch {torch.__version__}; data: BTC-USD ({source}), {len(fs.train)} train "
          f"samples, {fs.train.x.shape[2]} features; CUDA graphs: {'on' if graphs and device.type == 'cuda' else 'off'}")
    compiled = {}
    for k in ks:  # warm-up: kernel build and load, buffers, graph capture paths (and compilation)
        engine(cfg, fs, device, k, 5, graphs)
        if args.compile:
            compiled[k] = Compiled(fs, device, k)
    for c in compiled.values():  # once more after all are built: building one K re-guards the others' frames
        c.time(c.eng.spe)
    plain(fs, device, 10)
    readings: dict[str, list[float]] = {"plain": [], **{f"K={k}": [] for k in ks}}
    if args.compile:
        readings.update({f"compiled K={k}": [] for k in ks})
    for r in range(args.repeats):
        readings["plain"].append(plain(fs, device, args.steps))
        for k in ks:
            readings[f"K={k}"].append(engine(cfg, fs, device, k, steps_for(k), graphs))
            if args.compile:
                readings[f"compiled K={k}"].append(compiled[k].time(steps_for(k)))
        print(f"  round {r + 1}/{args.repeats}: " + ", ".join(f"{m} {v[-1]:.3f}" for m, v in readings.items()),
              flush=True)
    med = {m: statistics.median(v) for m, v in readings.items()}
    one = med.get("K=1")
    print("\n| mode | steps | ms per run-step (median) | readings | vs plain | vs K = 1 |")
    print("|---|---:|---:|---|---:|---:|")
    for m, v in readings.items():
        k = None if m == "plain" else int(m.split("K=")[1])
        steps = args.steps if k is None else steps_for(k)
        vs_one = f"x{one / med[m]:.2f}" if one and k else ""  # (compiled rows: vs the engine's own K = 1)
        print(f"| {m} | {steps} | {med[m]:.3f} | {', '.join(f'{x:.3f}' for x in v)} | x{med['plain'] / med[m]:.2f} "
              f"| {vs_one} |")
    if one:
        print(f"\nK = 1 vs plain: x{med['plain'] / one:.2f} faster (target on a CPU: >= 1.25); "
              f"K = 1: {one:.3f} ms per step (target on a GPU: <= 1.0)")
        for k in ks[1:]:
            print(f"K = {k} vs K = 1: x{one / med[f'K={k}']:.1f} per run-step (targets: CPU K = 24 >= 1.6, "
                  f"GPU K = 1024 >= 100)")


if __name__ == "__main__":
    main()
