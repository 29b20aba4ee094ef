"""``zclip`` (Kumar et al. 2025), following the reference implementation: the first ``warmup`` global L2 norms
initialise the mean and (population) variance, with only the optional ``max_norm`` cap meanwhile. Then
z = (g - mean) / (std + eps); when z > z_thresh the norm is clipped to mean + z_thresh^2 * std / z
(``reciprocal``) or to the mean (``mean``); ``max_norm`` caps it in any case. The EMAs are then updated with the
clipped norm (spike) or the norm itself: mean <- a*mean + (1-a)*x, then var <- a*var + (1-a)*(x - mean)^2;
skipped for non-finite norms (e.g. steps an fp16 GradScaler drops), re-seeded if they broke.
The threshold statistic is the spike boundary min(mean + z_thresh (std + eps), max_norm)."""

from __future__ import annotations

import math

import torch

from fincast.clipping.core import clip_to, finite, global_norm
from fincast.clipping.registry import Method, register
from fincast.config import ZClipConfig


def _label(s: ZClipConfig) -> str:
    label = f"zclip-z{s.z_thresh:g}" + ("-mean" if s.rule == "mean" else "")
    return label + (f"-cap{s.max_norm:g}" if s.max_norm is not None else "")


def _init(sections, layout, device, steps_total):
    def col(values):
        return torch.tensor(values, dtype=torch.float32, device=device)

    k = len(sections)
    # constants rounded once from double (1 - alpha, z^2), as Python scalars are when they meet float32 tensors
    params = {"alpha": col([s.alpha for s in sections]), "one_minus_alpha": col([1 - s.alpha for s in sections]),
              "z": col([s.z_thresh for s in sections]), "z2": col([s.z_thresh ** 2 for s in sections]),
              "eps": col([s.eps for s in sections]),
              "reciprocal": torch.tensor([s.rule == "reciprocal" for s in sections], device=device),
              "cap": col([math.inf if s.max_norm is None else s.max_norm for s in sections]),
              "shown_cap": col([math.nan if s.max_norm is None else s.max_norm for s in sections]),
              "warmup": sections[0].warmup}
    state = {"warm": torch.full((k, sections[0].warmup), math.nan, device=device),
             "mean": torch.full((k,), math.nan, device=device), "var": torch.full((k,), math.nan, device=device)}
    return params, state


def _step(g, w, layout, params, state, thr, step, active):
    pre = global_norm(g, layout)
    warmup = params["warmup"]
    warm, mean, var = state["warm"], state["mean"], state["var"]
    warming = step < warmup
    # warmup: record the norm (nan if non-finite); at its last step the EMAs start from the warmup's norms
    slot = step.clamp(max=warmup - 1).unsqueeze(1)
    write = warming & active
    norm = torch.where(finite(pre), pre.to(warm.dtype), math.nan)  # float32 state, also for float64 gradients
    warm.scatter_(1, slot, torch.where(write, norm, warm.gather(1, slot).squeeze(1)).unsqueeze(1))
    seeded = write & (step + 1 == warmup)
    w_mean = torch.nanmean(warm, 1)
    w_var = torch.nanmean((warm - w_mean.unsqueeze(1)) ** 2, 1)
    # after warmup: the z-score against the EMAs
    std = var.sqrt()
    z = (pre - mean) / (std + params["eps"])
    zt = params["z"]
    spike = z > zt
    spike_threshold = torch.where(params["reciprocal"], mean + params["z2"] * std / z, mean)
    adaptive = torch.where(spike, spike_threshold, pre)  # what the EMA sees
    cap = params["cap"]
    boundary = torch.minimum(mean + zt * (std + params["eps"]), cap)  # the norm above which a step is clipped
    effective = torch.where(warming, cap, torch.minimum(adaptive, cap))
    stats = clip_to(g, pre, effective)
    stats[:, 4] = torch.where(warming, params["shown_cap"], boundary)
    # EMA update, skipped for non-finite norms, re-seeded if it broke
    alpha, rest = params["alpha"], params["one_minus_alpha"]
    new_mean = torch.where(finite(mean), alpha * mean + rest * adaptive, adaptive)
    new_var = torch.where(finite(var), alpha * var + rest * (adaptive - new_mean) ** 2, 0.0)
    ok = finite(adaptive) & finite(pre) & active & ~warming
    mean.copy_(torch.where(seeded, w_mean, torch.where(ok, new_mean, mean)))
    var.copy_(torch.where(seeded, w_var, torch.where(ok, new_var, var)))
    return stats


register(Method(name="zclip", section=ZClipConfig, threshold_key="z_thresh", scheduled=False, label=_label,
                structure=lambda s: (s.warmup,), init=_init, step=_step, bounds_global_l2=lambda s: True))
