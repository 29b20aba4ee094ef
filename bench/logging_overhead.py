"""Benchmark: MLflow logging overhead as a share of training step time, default model.

Trains the default price model (pipelines/price_equities.yaml, synthetic SPY so it runs offline) for a
fixed number of steps in several ways, interleaved and repeated, and reports median ms/step of wall
clock, including the wait at the end until every metric is stored:

  plain        no metrics at all, torch on every core
  plain-1      no metrics, torch on every core but one
  process      fincast's default: batches of tracking.log_every steps stored by a writer process,
               torch on every core but one (tracking.metrics_writer=process)
  inline       the same batches stored by the training process itself (metrics_writer=inline)
  per-call     one MlflowClient.log_metric call per value (what a naive loop does), fewer steps

Overhead is measured against the faster of the two plain variants. Target (issue 2): < 5%.
Run: make bench
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fincast import config as config_mod  # noqa: E402
from fincast import features, tracking  # noqa: E402
from fincast.data import load_prices  # noqa: E402
from fincast.models import build_model  # noqa: E402
from fincast.training import fit  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--log-every", type=int, default=50)
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    cfg = config_mod.load(ROOT / "pipelines/price_equities.yaml",
                          ["data.source=synthetic", f"train.max_steps={args.steps}", "train.epochs=1000",
                           f"tracking.log_every={args.log_every}",
                           "train.patience=null"])
    prices = load_prices(cfg.data, min_rows=features.required_rows(cfg.features))
    fs = features.build(prices.frames, cfg.features)
    device = torch.device("cpu")

    tmp = tempfile.mkdtemp(prefix="fincast-bench-")
    tcfg = config_mod.TrackingConfig(uri=f"sqlite:///{tmp}/mlflow.db", artifact_dir=f"{tmp}/art")

    cores = torch.get_num_threads()
    writer = tracking.MetricWriter(tracking.resolve_uri(tcfg))

    def run(mode: str, steps: int) -> float:
        torch.set_num_threads(max(1, cores - 1) if mode in ("plain-1", "process") else cores)  # noqa: E501
        torch.manual_seed(0)
        model = build_model(cfg.model, len(fs.names))
        train_cfg = config_mod.from_dict({"train": {**config_mod.to_dict(cfg.train), "max_steps": steps}}).train
        t0 = time.perf_counter()
        r, sink = None, None
        if mode in ("process", "inline", "per-call"):
            r = tracking.start_run(tcfg, "bench", mode, writer=writer if mode == "process" else None)
            sink = r.log_metrics
        if mode == "per-call":
            def sink(rows, r=r):
                for k, v, s in rows:
                    r.client.log_metric(r.run_id, k, v, step=s)
        result = fit(model, fs.train, fs.val, train_cfg, cfg.clip, device=device,
                     log_every=cfg.tracking.log_every, sink=sink)
        if r is not None:
            r.end()  # waits until every metric is stored
        elapsed = time.perf_counter() - t0
        assert result.steps == steps, result.steps
        return 1000 * elapsed / steps

    try:
        run("process", 50)  # warm up: the writer opens (creates) the store, first-touch allocations
        run("inline", 50)
        times: dict[str, list[float]] = {"plain": [], "plain-1": [], "process": [], "inline": []}
        for _ in range(args.repeats):
            for mode in times:
                times[mode].append(run(mode, args.steps))
        per_call = run("per-call", max(20, args.steps // 10))
    finally:
        writer.close()
    med = {m: statistics.median(t) for m, t in times.items()}
    base = min(med["plain"], med["plain-1"])
    print(f"default model: {sum(p.numel() for p in build_model(cfg.model, len(fs.names)).parameters())} parameters, "
          f"batch {cfg.train.batch_size}, lookback {cfg.features.lookback}, {cores} cores, "
          f"{args.steps} steps x {args.repeats} repeats, log_every={cfg.tracking.log_every}")
    for m, t in times.items():
        print(f"{m:<9}{med[m]:7.3f} ms/step  (runs: {', '.join(f'{x:.3f}' for x in t)})")
    print(f"per-call {per_call:7.3f} ms/step  (one log_metric per value, {max(20, args.steps // 10)} steps)")
    print(f"logging overhead, process (default) {100 * (med['process'] / base - 1):+7.1f}% of step time (target < 5%)")
    print(f"logging overhead, inline            {100 * (med['inline'] / base - 1):+7.1f}% of step time")
    print(f"logging overhead, per-call          {100 * (per_call / base - 1):+7.1f}% of step time")


if __name__ == "__main__":
    main()
