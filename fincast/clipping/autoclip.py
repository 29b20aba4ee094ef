"""``autoclip`` (Seetharaman et al. 2020): global L2 clipping at the ``percentile``-th percentile of the history of
global L2 norms, the current step's norm included (so step 1 is never clipped).

State: the history ring [K, L] (nan = empty or non-finite; L = ``window``, or the run's total steps when fewer).
The percentile interpolates linearly between order statistics, as ``numpy.percentile``, over each run's non-nan
entries; order statistics come from one ``topk`` over all runs of the group (k = the largest rank any run can
need), so the step is sync-free and its ops do not depend on K."""

from __future__ import annotations

import math

import torch

from fincast.clipping.core import clip_to, finite, global_norm
from fincast.clipping.registry import Method, register
from fincast.config import AutoClipConfig


def _init(sections, layout, device, steps_total):
    window = sections[0].window
    length = max(1, min(window, steps_total)) if steps_total else window
    q = torch.tensor([s.percentile / 100.0 for s in sections], dtype=torch.float32, device=device)
    k = min(length, math.floor(max(s.percentile for s in sections) / 100.0 * (length - 1)) + 2)
    history = torch.full((len(sections), length), math.nan, device=device)
    return {"q": q, "k": k, "window": window}, {"history": history}


def _step(g, w, layout, params, state, thr, step, active):
    pre = global_norm(g, layout)
    history = state["history"]
    length = history.shape[1]
    slot = (step % length).unsqueeze(1)
    norm = torch.where(finite(pre), pre.to(history.dtype), math.nan)  # a non-finite norm is an empty slot
    value = torch.where(active, norm, history.gather(1, slot).squeeze(1))
    history.scatter_(1, slot, value.unsqueeze(1))
    smallest = torch.topk(history, params["k"], dim=1, largest=False, sorted=True).values  # nan sorts last
    valid = (history == history).sum(1)  # non-nan entries (nan != nan)
    last = (valid - 1).clamp_min(0)
    pos = params["q"] * last
    lo = pos.floor()
    idx = torch.minimum(torch.stack([lo, lo + 1], 1).long().clamp_(max=params["k"] - 1), last.unsqueeze(1))
    two = smallest.gather(1, idx)
    threshold = torch.where(valid > 0, torch.lerp(two[:, 0], two[:, 1], pos - lo), math.nan)
    return clip_to(g, pre, threshold.to(pre.dtype))


register(Method(name="autoclip", section=AutoClipConfig, threshold_key="percentile", scheduled=False,
                label=lambda s: f"autoclip-p{s.percentile:g}", structure=lambda s: (s.window,), init=_init,
                step=_step, bounds_global_l2=lambda s: True))
