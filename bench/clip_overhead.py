"""Benchmark: cost of each gradient-clipping method as a share of the default model's training step.

Model and batch: the default LSTM (hidden 32, one layer), batches of 64 windows of lookback 30 x 7 features,
float32, on the CPU, torch on one thread unless --threads says otherwise. Each row is the training engine with one
run (fincast.training.engine.Engine, AdamW, no schedule, no monitoring) whose clip config is the row's; every step
is Engine.step: gather, forward, backward, clip, optimizer, the step's statistics record. Inputs cycle through a
small pool of fixed batches.

Method: after a warm-up, the rows take turns in blocks of --block steps, every row once per round, in an order
shuffled anew each round, for --rounds rounds; a row's step time is the median of its steps, its ratio that median
over `none`'s (which still computes the global norm for its statistics). `none (A/A)` is a second, identical
`none` row: how far its ratio is from 1 shows what this machine resolves in this run. The spread column is the
interquartile range of the ratio computed on each tenth of the run.

Rows: none, value, norm (global L2, bitwise torch's clip_grad_norm_), norm per_layer and per_param, norm L1 and inf,
autoclip (its history sized to the run, here --rounds x --block steps), autoclip with a full --window history (the
order statistics then come from a topk over --window values every step, as in a long run), agc, zclip. Targets (as
before the run axis): norm (any scope or p) <= 1.02, autoclip and zclip <= 1.05, agc <= 1.10; value has none.

`clip us`: the clip call alone (StackClipper.step on fixed gradients, restored before each call outside the timed
region), median over --calls calls per row, rows interleaved call by call. `ops`: the torch ops one call dispatches
(a TorchDispatchMode counts them): at these sizes each costs microseconds, so the op count sets the price.

Last, the global L2 clip of one run against torch.nn.utils.clip_grad_norm_(foreach=True) on the same gradients,
the call alone, interleaved; and whether both clip to bitwise the same gradients.

Run: .venv/bin/python bench/clip_overhead.py   (about a minute; --quick: about 15 s)
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fincast.clipping import StackClipper  # noqa: E402
from fincast.config import from_dict  # noqa: E402
from fincast.features import Split  # noqa: E402
from fincast.models import LSTMForecaster  # noqa: E402
from fincast.training.engine import Engine  # noqa: E402

BATCH, LOOKBACK, FEATURES = 64, 30, 7
ROWS = [  # label, clip section, target ratio
    ("none", {"method": "none"}, None),
    ("none (A/A)", {"method": "none"}, None),
    ("value", {"method": "value", "value": {"value": 0.01}}, None),
    ("norm (global L2)", {"method": "norm", "norm": {"max_norm": 0.1}}, 1.02),
    ("norm per_layer", {"method": "norm", "norm": {"max_norm": 0.1, "scope": "per_layer"}}, 1.02),
    ("norm per_param", {"method": "norm", "norm": {"max_norm": 0.1, "scope": "per_param"}}, 1.02),
    ("norm L1", {"method": "norm", "norm": {"max_norm": 0.1, "norm_type": 1}}, 1.02),
    ("norm inf", {"method": "norm", "norm": {"max_norm": 0.1, "norm_type": "inf"}}, 1.02),
    ("autoclip", {"method": "autoclip"}, 1.05),
    ("autoclip (full)", {"method": "autoclip"}, 1.05),
    ("agc", {"method": "agc"}, 1.10),
    ("zclip", {"method": "zclip"}, 1.05),
]


class OpCount(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def split(n: int, seed: int) -> Split:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, LOOKBACK, FEATURES, generator=g)
    y = torch.randn(n, generator=g) * 0.1
    d = np.arange(n).astype("datetime64[D]")
    return Split(x.numpy(), y.numpy(), y.numpy().astype(float), np.ones(n), d, d + 1, np.full(n, "T", dtype=object))


def engine(clip: dict, steps: int, window: int | None) -> tuple[Engine, torch.Tensor]:
    """One run's engine (the `full` AutoClip row: its history sized to ``window`` steps, as in a long run)."""
    if window is not None:
        clip = {**clip, "autoclip": {"window": window}}
    cfg = from_dict({"train": {"epochs": 1, "batch_size": BATCH, "optimizer": "adamw", "patience": None,
                               "max_steps": steps}, "clip": clip, "monitor": {"every": None}})
    torch.manual_seed(0)
    eng = Engine([LSTMForecaster(FEATURES, 32)], split(BATCH * 8, 0), split(BATCH, 1), [cfg.train], [cfg.clip],
                 device=torch.device("cpu"))
    if window is not None:
        eng.clipper = StackClipper([cfg.clip], eng.layout, "cpu", window)
    lrs = np.full((1, 1), cfg.train.lr)
    plan = np.concatenate([lrs[..., None], eng.clipper.thresholds([0])[..., None], eng.opt.coefficients(lrs, [0])], 2)
    return eng, torch.as_tensor(plan[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--block", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=40, help="untimed steps per row (at least zclip's warmup)")
    ap.add_argument("--calls", type=int, default=1500)
    ap.add_argument("--window", type=int, default=10000, help="autoclip (full): history length")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="about 15 s: 80 rounds, 400 isolated calls")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.calls = 80, 400
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    steps = args.warmup + args.rounds * args.block + 10
    rows = []
    for label, clip, target in ROWS:
        eng, plan = engine(clip, steps, args.window if label == "autoclip (full)" else None)
        rows.append({"label": label, "eng": eng, "plan": plan, "target": target, "times": []})
    batches = [torch.randint(0, BATCH * 8, (1, BATCH), generator=torch.Generator().manual_seed(i)) for i in range(8)]
    for r in rows:
        if r["label"] == "autoclip (full)":  # fill the history: as after `window` steps
            hist = r["eng"].clipper.groups[0].state["history"]
            hist.copy_(torch.rand(hist.shape) + 0.5)
            r["eng"].dev.step.fill_(args.window)
        for i in range(args.warmup):
            r["eng"].step(batches[i % 8], r["plan"])
    rng = random.Random(0)
    for _ in range(args.rounds):
        order = list(rows)
        rng.shuffle(order)
        for r in order:
            for i in range(args.block):
                t0 = time.perf_counter()
                r["eng"].step(batches[i % 8], r["plan"])
                r["times"].append(time.perf_counter() - t0)

    # the clip call alone, on fixed gradients (the `none` row's)
    base = rows[0]["eng"]
    base.step(batches[0], rows[0]["plan"])
    saved = base.net.grad.clone()
    flat, thr = base.net.flat, torch.full((1,), 0.1, dtype=torch.float64)
    alive = torch.ones(1, dtype=torch.bool)
    calls, ops = {}, {}
    for r in rows:
        clipper, step = r["eng"].clipper, r["eng"].dev.step
        g = saved.clone()
        with OpCount() as counter:
            clipper.step(g, flat, thr, step, alive)
        ops[r["label"]] = counter.n
        calls[r["label"]] = (clipper, step, [])
    work = saved.clone()
    for _ in range(args.calls):
        for clipper, step, times in calls.values():
            work.copy_(saved)
            t0 = time.perf_counter()
            clipper.step(work, flat, thr, step, alive)
            times.append(time.perf_counter() - t0)

    # one run's global L2 clip against torch's clip_grad_norm_ on the same gradients (scaled to norm 5: both clip)
    model = LSTMForecaster(FEATURES, 32)
    params = list(model.parameters())
    big = saved * (5.0 / float(saved.norm()))
    clipper = rows[3]["eng"].clipper
    pair = {"fincast": [], "torch": []}
    for _ in range(4 * args.calls):
        work.copy_(big)
        t0 = time.perf_counter()
        clipper.step(work, flat, thr, rows[3]["eng"].dev.step, alive)
        pair["fincast"].append(time.perf_counter() - t0)
        torch.nn.utils.vector_to_parameters(big[0], params)  # (the gradients as parameter-shaped tensors)
        for p in params:
            p.grad = p.detach().clone()
        t0 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, 0.1, foreach=True)
        pair["torch"].append(time.perf_counter() - t0)
    same = torch.equal(work[0], torch.cat([p.grad.reshape(-1) for p in params]))

    med = {r["label"]: statistics.median(r["times"]) for r in rows}
    ref = med["none"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); default LSTM "
          f"({sum(p.numel() for p in params)} parameters), batch {BATCH} x lookback {LOOKBACK} x {FEATURES} features, "
          f"CPU; {args.rounds} rounds x {args.block} steps per row; {time.perf_counter() - t_start:.0f} s in all\n")
    print("| method | step ms | ratio vs none | spread (IQR) | target | ok? | clip us (alone) | ops |")
    print("|---|---:|---:|---:|---:|:---:|---:|---:|")
    n = len(rows[0]["times"])
    tenths = [slice(i * n // 10, (i + 1) * n // 10) for i in range(10)]
    for r in rows:
        ratio = med[r["label"]] / ref
        parts = sorted(statistics.median(r["times"][c]) / statistics.median(rows[0]["times"][c]) for c in tenths)
        target = f"<= {r['target']:.2f}" if r["target"] else "-"
        ok = "-" if r["target"] is None else ("yes" if ratio <= r["target"] else "**no**")
        print(f"| {r['label']} | {1000 * med[r['label']]:.3f} | {ratio:.3f} | {parts[2]:.3f}-{parts[7]:.3f} | {target} "
              f"| {ok} | {1e6 * statistics.median(calls[r['label']][2]):.1f} | {ops[r['label']]} |")
    f, t = statistics.median(pair["fincast"]), statistics.median(pair["torch"])
    print(f"\nglobal L2 clip, call alone: fincast {1e6 * f:.1f} us vs torch clip_grad_norm_(foreach=True) "
          f"{1e6 * t:.1f} us: ratio {f / t:.3f}; bitwise the same clipped gradients: {'yes' if same else 'NO'} "
          "(fincast's call also returns the step's statistics record: norms before and after, clipped flag, "
          "fraction, threshold)")


if __name__ == "__main__":
    main()
