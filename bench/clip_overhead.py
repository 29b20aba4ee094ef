"""Benchmark: cost of each gradient-clipping method as a share of the default model's training step.

Model and batch: the default LSTM (build_model(ModelConfig(), n_features=7): hidden 32, one layer), batches
of 64 windows of lookback 30, float32, on the CPU, torch on one thread unless --threads says otherwise.
Each row gets its own copy of the model (same seed) and its own RunState from fincast.training.make_state
(AdamW, no schedule, monitor_every=None), so only the clipper differs; every step is
fincast.training.train_step, i.e. zero_grad, forward, backward, clip_gradients, optimizer and
scheduler step. Inputs cycle through a small pool of fixed random batches.

Method: after a warm-up, the rows take turns in blocks of --block steps, every row once per round, in
an order shuffled anew each round (so no row always follows the same one), for --rounds rounds.
Every step is timed on its own (perf_counter, or with --clock cpu the CPU time of this thread, which
leaves out the time other processes hold the core: use it on a busy machine; torch then needs one
thread); a row's step time is the median of all its steps, and its ratio is that median over the
median of `none` (which still computes the global norm for its statistics). Drift in machine speed, e.g. another process taking a core, lands on all rows alike.
The spread column is the interquartile range of the same ratio computed on each tenth of the run
(consecutive rounds). `none (A/A)` is a second, identical `none` runner: how far its ratio is from 1
shows what this machine resolves in this run.

Rows: none, value, norm (global L2, = torch's clip_grad_norm_), norm per_layer and per_param, norm L1 and
inf, autoclip with its history growing during the run (default window 10000, so it is never full
here), autoclip with a full history of --window norms (the history is pre-filled through
clipping.load_state_dict with the norms seen in warm-up, repeated: the percentile then sorts
--window values every step, as in a long run), agc, zclip. Targets (issue): norm (any scope or p)
<= 1.02, autoclip and zclip <= 1.05, agc <= 1.10; value has none.

Three more columns explain the ratios. `clip us (step)`: the clip_gradients call inside those same
steps (fincast.training.clip_gradients is wrapped by a timer here, two clock reads per step for every
row alike; median).
`clip us (alone)`: the call alone on fixed gradients (the `none` model's, restored before each call
outside the timed region), median over --calls calls per row, rows interleaved call by call; it is
typically 2-3x cheaper than in a step, where each op starts cold after the LSTM kernels. `ops`: the aten
operations one call dispatches (counted with a TorchDispatchMode; no-op .to() calls do not reach
it): at these sizes each costs microseconds of dispatch, so the op count, not FLOPs, sets the price.

Last, fincast.clipping.clip_norm(grads, 1.0, 2.0) against torch.nn.utils.clip_grad_norm_(params, 1.0,
foreach=True) on the same gradients, the call alone, interleaved call by call; target ratio <= 1.05.
fincast's clipper does more: it also returns ClipStats (norm before and after, clipped flag, clip
fraction, threshold tensor); torch returns the total norm only.

Run: .venv/bin/python bench/clip_overhead.py   (about a minute; --quick: about 15 s; --profile ROW adds
torch.profiler's table of that row's clip call)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import math
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fincast import clipping  # noqa: E402
from fincast import training as training_mod  # noqa: E402
from fincast.config import ModelConfig, ZClipConfig, from_dict  # noqa: E402
from fincast.models import build_model  # noqa: E402
from fincast.training import RunState, make_state, train_step  # noqa: E402

N_FEATURES, LOOKBACK, BATCH = 7, 30, 64
clock = time.perf_counter  # --clock cpu: time.thread_time
STEPS_PER_EPOCH = 100  # only sizes the (unused: schedule none) lr schedule
NORM, ADAPTIVE, AGC = 1.02, 1.05, 1.10

# label, clip section (from_dict({"clip": ...})), target ratio vs none (None: no target)
ROWS: list[tuple[str, dict, float | None]] = [
    ("none", {"method": "none"}, None),
    ("none (A/A)", {"method": "none"}, None),
    ("value", {"method": "value"}, None),
    ("norm (global L2)", {"method": "norm"}, NORM),
    ("norm per_layer", {"method": "norm", "norm": {"scope": "per_layer"}}, NORM),
    ("norm per_param", {"method": "norm", "norm": {"scope": "per_param"}}, NORM),
    ("norm L1", {"method": "norm", "norm": {"norm_type": 1.0}}, NORM),
    ("norm inf", {"method": "norm", "norm": {"norm_type": math.inf}}, NORM),
    ("autoclip (growing)", {"method": "autoclip"}, ADAPTIVE),
    ("autoclip (full)", {"method": "autoclip"}, ADAPTIVE),  # window set from --window
    ("agc", {"method": "agc"}, AGC),
    ("zclip", {"method": "zclip"}, ADAPTIVE),
]


@dataclass
class Runner:
    label: str
    target: float | None
    model: torch.nn.Module
    state: RunState
    times: list[float] = field(default_factory=list)  # seconds per step
    clip_times: list[float] = field(default_factory=list)  # seconds in clip_gradients, same steps
    history: tuple[int, int] = (0, 0)  # autoclip: history length at the first and last timed step


class OpCount(TorchDispatchMode):
    """Counts the aten operations dispatched inside the context."""

    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


class ClipTimer:
    """Stands in for fincast.training.clip_gradients: calls it and keeps how long the call took."""

    def __init__(self) -> None:
        self.inner = training_mod.clip_gradients
        self.last = 0.0

    def __call__(self, *args):
        t0 = clock()
        out = self.inner(*args)
        self.last = clock() - t0
        return out


@contextlib.contextmanager
def no_gc():
    """No garbage collection while timing (a step frees its tensors by reference counting anyway)."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def make_batches(n: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(BATCH, LOOKBACK, N_FEATURES, generator=gen),
             0.1 * torch.randn(BATCH, generator=gen)) for _ in range(n)]


def make_runner(label: str, clip_raw: dict, target: float | None, seed: int) -> Runner:
    torch.manual_seed(seed)
    model = build_model(ModelConfig(), N_FEATURES)
    clip_cfg = from_dict({"clip": clip_raw}).clip
    train_cfg = from_dict({"train": {"device": "cpu", "seed": seed}}).train
    state = make_state(model, train_cfg, clip_cfg, steps_per_epoch=STEPS_PER_EPOCH, device=torch.device("cpu"),
                       monitor_every=None)
    return Runner(label, target, model, state)


def history_len(r: Runner) -> int:
    cs, cfg = r.state.clip_state, r.state.clip
    return min(cs.step, cfg.autoclip.window) if cfg.method == "autoclip" else 0


def prefill(r: Runner) -> None:
    """Fill an autoclip history to its window with the norms seen so far, repeated (as after a long run)."""
    cs, window = r.state.clip_state, r.state.clip.autoclip.window
    seen = clipping.state_dict(cs)["history"][:min(cs.step, window)]
    full = seen.repeat(math.ceil(window / seen.numel()))[:window].clone()
    clipping.load_state_dict(cs, {"history": full, "step": window})


def time_steps(runners: list[Runner], batches, rounds: int, block: int, seed: int) -> float:
    """Returns the share of wall time this thread was on a CPU (one torch thread: below ~0.95, other
    processes competed for the cores)."""
    rng = random.Random(seed)
    timer = ClipTimer()
    wall0, cpu0 = time.perf_counter(), time.thread_time()
    training_mod.clip_gradients = timer
    k = 0
    try:
        for r in runners:
            r.history = (history_len(r), 0)
        with no_gc():
            for _ in range(rounds):
                order = runners[:]
                rng.shuffle(order)
                for r in order:
                    for _ in range(block):
                        batch = batches[k % len(batches)]
                        k += 1
                        t0 = clock()
                        train_step(r.model, batch, r.state)
                        r.times.append(clock() - t0)
                        r.clip_times.append(timer.last)
    finally:
        training_mod.clip_gradients = timer.inner
    for r in runners:
        r.history = (r.history[0], history_len(r))
    return (time.thread_time() - cpu0) / (time.perf_counter() - wall0)


def time_calls(fns: dict[str, object], restore, calls: int) -> dict[str, float]:
    """Median seconds per call of each fn, interleaved call by call (order shuffled every round); restore()
    runs untimed before every call."""
    rng = random.Random(calls)
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    with no_gc():
        for _ in range(calls):
            rng.shuffle(names)
            for n in names:
                restore()
                t0 = clock()
                fns[n]()
                times[n].append(clock() - t0)
    return {n: statistics.median(t) for n, t in times.items()}


def quartiles(xs: list[float]) -> tuple[float, float]:
    if len(xs) < 4:
        return min(xs), max(xs)
    q = statistics.quantiles(xs, n=4)
    return q[0], q[2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=300, help="rounds, every row once per round (default 300)")
    ap.add_argument("--block", type=int, default=5, help="consecutive steps of a row per round (default 5)")
    ap.add_argument("--warmup", type=int, default=60,
                    help="untimed steps per row first (default 60; at least zclip's warmup + 1)")
    ap.add_argument("--calls", type=int, default=1500, help="isolated clip calls per row (default 1500)")
    ap.add_argument("--window", type=int, default=10000, help="autoclip (full): history window (default 10000)")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall: perf_counter (default); cpu: this thread's CPU time (needs --threads 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="about 15 s: 80 rounds, 400 isolated calls")
    ap.add_argument("--profile", metavar="ROW", help="also print torch.profiler's table of ROW's clip call")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.calls, args.warmup = 80, 400, 40
    args.warmup = max(args.warmup, ZClipConfig().warmup + 1)  # zclip timed past its warmup
    if args.clock == "cpu" and args.threads != 1:
        ap.error("--clock cpu times this thread only: use it with --threads 1")
    torch.set_num_threads(args.threads)
    global clock
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    labels = [label for label, _, _ in ROWS]
    if args.profile is not None and args.profile not in labels:
        ap.error(f"--profile: one of {', '.join(labels)}")
    t_start = time.perf_counter()

    batches = make_batches(8, args.seed + 1)
    runners = []
    for label, raw, target in ROWS:
        if label == "autoclip (full)":
            raw = {**raw, "autoclip": {"window": args.window}}
        runners.append(make_runner(label, raw, target, args.seed))
    for r in runners:  # warm up: allocator, first-touch, zclip's warmup (25 steps) and the optimizer state
        for i in range(args.warmup):
            train_step(r.model, batches[i % len(batches)], r.state)
    prefill(next(r for r in runners if r.label == "autoclip (full)"))
    cpu_share = time_steps(runners, batches, args.rounds, args.block, args.seed)

    # the clip call alone, on the `none` model's current gradients (one more step makes them)
    base = runners[0]
    train_step(base.model, batches[0], base.state)
    params = list(base.model.parameters())
    grads = [p.grad for p in params]
    saved = [g.clone() for g in grads]

    def restore() -> None:
        torch._foreach_copy_(grads, saved)

    clip_fns, states = {}, {}
    for r in runners:
        states[r.label] = copy.deepcopy(r.state.clip_state)  # steady state, kept apart from the step runner

        def call(r=r) -> None:
            clipping.clip_gradients(params, r.state.clip, states[r.label])
        clip_fns[r.label] = call
    ops = {}
    for label, fn in clip_fns.items():
        restore()
        with OpCount() as counter:
            fn()
        ops[label] = counter.n
    clip_s = time_calls(clip_fns, restore, args.calls)

    # fincast's global L2 clipper against torch's, the call alone on the same gradients: as trained, and
    # scaled to norm 5 so that both really clip
    restore()
    grad_norm = float(clipping.global_norm(grads))
    big = [g * (5.0 / grad_norm) for g in saved]

    def restore_big() -> None:
        torch._foreach_copy_(grads, big)

    pair = {"fincast": lambda: clipping.clip_norm(grads, 1.0, 2.0),
            "torch": lambda: torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)}
    pair_ops, results = {}, {}
    for name, fn in pair.items():
        restore_big()
        with OpCount() as counter:
            fn()
        pair_ops[name] = counter.n
        results[name] = [g.clone() for g in grads]
    same = all(torch.equal(a, b) for a, b in zip(results["fincast"], results["torch"]))
    pair_s = time_calls(pair, restore, 4 * args.calls)
    pair_big_s = time_calls(pair, restore_big, 4 * args.calls)
    elapsed = time.perf_counter() - t_start

    # report
    med = {r.label: statistics.median(r.times) for r in runners}
    ref = med["none"]
    n_params = sum(p.numel() for p in base.model.parameters())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s) of {torch.get_num_interop_threads()} "
          f"interop; default LSTM ({n_params} parameters, hidden 32, 1 layer), batch {BATCH} x lookback "
          f"{LOOKBACK} x {N_FEATURES} features, float32, CPU")
    print(f"{args.rounds} rounds x {args.block} steps per row, shuffled order, after {args.warmup} warm-up steps; "
          f"isolated clip calls: {args.calls} per row; {elapsed:.0f} s in all; clock: {args.clock}")
    if args.threads == 1:  # with more, this thread also waits for torch's workers: no measure of contention
        print(f"this thread was on a CPU {100 * cpu_share:.0f}% of the timed steps' wall time" + (
            "" if cpu_share >= 0.95 else ": other processes competed for the cores, so wall-clock ratios are "
            "noisier (see the A/A row); --clock cpu leaves their time out"))
    print()
    print("| method | step ms | ratio vs none | spread (IQR) | target | ok? | clip us (step) | clip us (alone) | ops |")
    print("|---|---:|---:|---:|---:|:---:|---:|---:|---:|")
    n = len(runners[0].times)
    chunks = [slice(i * n // 10, (i + 1) * n // 10) for i in range(10)]
    for r in runners:
        ratio = med[r.label] / ref
        lo, hi = quartiles([statistics.median(r.times[c]) / statistics.median(runners[0].times[c]) for c in chunks])
        label = r.label
        if r.state.clip.method == "autoclip":
            label += f", history {r.history[0]}->{r.history[1]} of {r.state.clip.autoclip.window}"
        target = f"<= {r.target:.2f}" if r.target is not None else "-"
        ok = "-" if r.target is None else ("yes" if ratio <= r.target else "**no**")
        print(f"| {label} | {1000 * med[r.label]:.3f} | {ratio:.3f} | {lo:.3f}-{hi:.3f} | {target} | {ok} | "
              f"{1e6 * statistics.median(r.clip_times):.1f} | {1e6 * clip_s[r.label]:.1f} | {ops[r.label]} |")
    print()
    for name, times in (("gradients as trained", pair_s), ("gradients scaled to norm 5", pair_big_s)):
        ratio = times["fincast"] / times["torch"]
        print(f"global L2 clip, call alone ({name}): fincast clip_norm {1e6 * times['fincast']:.1f} us "
              f"({pair_ops['fincast']} ops) vs torch clip_grad_norm_(foreach=True) {1e6 * times['torch']:.1f} us "
              f"({pair_ops['torch']} ops): ratio {ratio:.3f} (target <= 1.05: {'yes' if ratio <= 1.05 else 'no'})")
    print(f"  gradient norm as trained {grad_norm:.3g}; from norm 5, fincast and torch clip to bitwise the same "
          f"gradients: {'yes' if same else 'NO'}")
    print("  fincast's clip_norm also computes statistics torch does not: global L2 norm before and after, "
          "clipped flag, clip fraction, threshold tensor (ClipStats); torch returns the total norm only")

    if args.profile is not None:
        fn = clip_fns[args.profile]
        for _ in range(20):
            restore()
            fn()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(200):
                restore()
                fn()
        print()
        print(f"torch.profiler, 200 clip calls of {args.profile} (each after a restore of the gradients: "
              "the aten::copy_ rows from _foreach_copy_ are the restore):")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


if __name__ == "__main__":
    main()
