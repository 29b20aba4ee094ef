"""Benchmark: MLflow logging overhead as a share of training step time, default model.

Trains the default price model (pipelines/price_equities.yaml, synthetic SPY so it runs offline) for a
fixed number of steps three ways, interleaved and repeated, and reports median ms/step:

  plain     no metrics sink at all
  batched   fincast's sink: per-step metrics buffered and sent with one log_batch per flush
  per-call  one MlflowClient.log_metric call per value (what a naive loop does), fewer steps

Target (issue 2): batched overhead < 5% of the plain step time. Run: make bench
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
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    cfg = config_mod.load(ROOT / "pipelines/price_equities.yaml",
                          ["data.source=synthetic", f"train.max_steps={args.steps}", "train.epochs=1000",
                           "train.patience=null"])
    prices = load_prices(cfg.data, min_rows=features.required_rows(cfg.features))
    fs = features.build(prices.frames, cfg.features)
    device = torch.device("cpu")

    tmp = tempfile.mkdtemp(prefix="fincast-bench-")
    tcfg = config_mod.TrackingConfig(uri=f"sqlite:///{tmp}/mlflow.db", artifact_dir=f"{tmp}/art")

    def run(mode: str, steps: int) -> float:
        torch.manual_seed(0)
        model = build_model(cfg.model, len(fs.names))
        train_cfg = config_mod.from_dict({"train": {**config_mod.to_dict(cfg.train), "max_steps": steps}}).train
        sink = None
        if mode != "plain":
            r = tracking.start_run(tcfg, "bench", mode)
            if mode == "batched":
                sink = r.log_metrics
            else:
                def sink(rows, r=r):
                    for k, v, s in rows:
                        r.client.log_metric(r.run_id, k, v, step=s)
        t0 = time.perf_counter()
        result = fit(model, fs.train, fs.val, train_cfg, cfg.clip, device=device,
                     log_every=cfg.tracking.log_every, sink=sink)
        elapsed = time.perf_counter() - t0
        assert result.steps == steps, result.steps
        return result.step_ms if mode != "per-call" else 1000 * elapsed / steps

    run("batched", 50)  # warm up: database creation, first-touch allocations
    times: dict[str, list[float]] = {"plain": [], "batched": []}
    for _ in range(args.repeats):
        for mode in times:
            times[mode].append(run(mode, args.steps))
    per_call = run("per-call", max(20, args.steps // 10))
    plain = statistics.median(times["plain"])
    batched = statistics.median(times["batched"])
    print(f"default model: {sum(p.numel() for p in build_model(cfg.model, len(fs.names)).parameters())} parameters, "
          f"batch {cfg.train.batch_size}, lookback {cfg.features.lookback}, {torch.get_num_threads()} threads")
    print(f"plain     {plain:7.3f} ms/step  (runs: {', '.join(f'{t:.3f}' for t in times['plain'])})")
    print(f"batched   {batched:7.3f} ms/step  (runs: {', '.join(f'{t:.3f}' for t in times['batched'])}); "
          f"log_every={cfg.tracking.log_every}")
    print(f"per-call  {per_call:7.3f} ms/step  (one log_metric per value, for comparison)")
    print(f"logging overhead, batched:  {100 * (batched / plain - 1):+.1f}% of step time (target < 5%)")
    print(f"logging overhead, per-call: {100 * (per_call / plain - 1):+.1f}% of step time")


if __name__ == "__main__":
    main()
