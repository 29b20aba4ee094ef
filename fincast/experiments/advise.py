"""Clipping-threshold advisor (layer L4, experiments): ``fincast advise-clip PIPELINE.yaml``.

A short unclipped probe run of the pipeline (an ordinary tracked run, tagged ``fincast.kind=advise-clip``)
records the global L2 gradient norm of every step; :func:`fincast.clipping.advise_thresholds` turns that
distribution into three proposals (an AutoClip-style percentile, a multiple of the median, and the norm where
spikes begin). They are printed, logged to the probe run (metrics ``advice/*``, the histogram and the norms),
and written to ``reports/advise/<pipeline name>/``. A sweep with ``sweep.range: advised`` starts from them."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fincast import tracking
from fincast.clipping import ClipAdvice, advise_thresholds
from fincast.config import FincastError, PipelineConfig, atomic_write
from fincast.reports import figures
from fincast.runs import driver

DEFAULT_STEPS = 300


@dataclass
class AdviceOutcome:
    advice: ClipAdvice
    run_id: str
    experiment: str
    tracking_uri: str
    plot: Path
    folder: Path
    steps: int                 # optimizer steps of the probe
    diverged_step: int | None  # the probe went non-finite here (proposals from the steps before)
    lr: float
    seconds: float


def probe_config(cfg: PipelineConfig, steps: int) -> PipelineConfig:
    """The pipeline unclipped, for ``steps`` optimizer steps (no early stopping, checkpoints or model)."""
    return dataclasses.replace(
        cfg, clip=dataclasses.replace(cfg.clip, method="none"),
        train=dataclasses.replace(cfg.train, max_steps=steps, epochs=max(cfg.train.epochs, 100_000), patience=None,
                                  checkpoint=False, checkpoint_every=None),
        tracking=dataclasses.replace(cfg.tracking, log_model=False,
                                     run_name=cfg.tracking.run_name or f"advise-clip {cfg.name} lr={cfg.train.lr:g}"))


def advise(cfg: PipelineConfig, *, steps: int = DEFAULT_STEPS, percentile: float | None = None,
           multiple: float = 2.0, out_dir: str | Path = "reports", progress: bool = False,
           parent_run_id: str | None = None, tags: dict[str, str] | None = None) -> AdviceOutcome:
    """Run the probe and propose thresholds. ``percentile`` defaults to the spec's clip.autoclip.percentile."""
    t0 = time.perf_counter()
    q = cfg.clip.autoclip.percentile if percentile is None else percentile
    folder = Path(out_dir) / "advise" / cfg.name
    driver.check_outputs([probe_config(cfg, steps)], reports=[("the advisor's report folder", folder)])
    out = driver.train(probe_config(cfg, steps), progress=progress, parent_run_id=parent_run_id,
                         tags={"fincast.kind": "advise-clip", **(tags or {})})
    if out is None:  # a non-zero rank under torchrun
        raise FincastError("advise-clip runs in one process; launch it without torchrun")
    norms = np.asarray(out.fit.history["norm_pre"], float)
    try:
        advice = advise_thresholds(norms, percentile=q, multiple=multiple)
    except ValueError as exc:
        raise FincastError(f"advise-clip: the probe run {out.run_id} gave too few usable gradient norms: {exc}"
                           + (f"; it went non-finite at step {out.fit.diverged_step}: lower train.lr"
                              if out.fit.diverged else "")) from None
    folder.mkdir(parents=True, exist_ok=True)
    marks = {
        f"AutoClip p{q:g}": advice.percentile,
        f"{multiple:g} x median": advice.median_multiple,
        "spike onset": advice.spike_onset,
    }
    plot = figures.grad_norm_histogram(folder / "grad_norms.png", norms, marks,
                                     title=f"{cfg.name}: gradient norms of {len(norms)} unclipped steps "
                                           f"(lr {cfg.train.lr:g}, {cfg.train.optimizer})")
    low, high = advice.sweep_range()
    record = {"run_id": out.run_id, "steps": len(norms), "finite_steps": advice.steps,
              "diverged_step": out.fit.diverged_step, "lr": cfg.train.lr, "optimizer": cfg.train.optimizer,
              "proposals": advice.proposals(), "median": advice.median, "max": advice.max,
              "spikes": advice.spikes, "percentile": q, "multiple": multiple, "fence": advice.fence,
              "sweep_range": [low, high]}
    files = [plot, atomic_write(folder / "advice.json", json.dumps(record, indent=1) + "\n"),
             atomic_write(folder / "grad_norms.csv",
                          "step,grad_norm\n" + "".join(f"{i + 1},{v!r}\n" for i, v in enumerate(norms.tolist())))]
    run = tracking.attach(out.tracking_uri, out.run_id)
    run.log_metrics([(f"advice/{k}", v, 0) for k, v in advice.proposals().items() if math.isfinite(v)]
                    + [("advice/median", advice.median, 0), ("advice/spikes", advice.spikes, 0),
                       ("advice/range_low", low, 0), ("advice/range_high", high, 0)])
    run.set_tags({"fincast.advice": json.dumps(advice.proposals())})
    for f in files:
        run.log_artifact(f, "advice")
    return AdviceOutcome(advice, out.run_id, out.experiment, out.tracking_uri, plot, folder, len(norms),
                         out.fit.diverged_step, cfg.train.lr, time.perf_counter() - t0)


def format_advice(a: AdviceOutcome) -> str:
    adv = a.advice
    lines = [f"advise-clip run {a.run_id}  (experiment {a.experiment!r} in {a.tracking_uri})",
             f"  unclipped probe: {a.steps} steps at lr {a.lr:g}"
             + (f", went non-finite at step {a.diverged_step} (proposals from the finite steps before it)"
                if a.diverged_step else "")
             + f"; gradient norm median {adv.median:.4g}, max {adv.max:.4g}", "",
             "  proposed clip thresholds on the global L2 gradient norm:"]
    text = {f"autoclip_p{adv.percentile_q:g}": f"AutoClip-style: the {adv.percentile_q:g}th percentile of the norms",
            f"median_x{adv.multiple:g}": f"{adv.multiple:g} x the median norm",
            "spike_onset": f"spike onset: Tukey's fence on log norms (exp(Q3 + {adv.fence:g} IQR)); "
                           f"{adv.spikes} steps above it"}
    for key, value in adv.proposals().items():
        lines.append(f"    {value:<10.4g} {text[key]}")
    low, high = adv.sweep_range()
    lines += ["", f"  use one: fincast train SPEC --set clip.method=norm --set clip.norm.max_norm={adv.median_multiple:.3g}",
              f"  or sweep clip.norm.max_norm over [{low:.3g}, {high:.3g}]: sweep.range: advised in a sweep spec",
              f"  histogram {a.plot}"]
    return "\n".join(lines)
