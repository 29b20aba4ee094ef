"""``none``: nothing is changed; the statistics are still recorded (global L2 norm, threshold nan)."""

from __future__ import annotations

import math

from fincast.clipping.core import global_norm, record
from fincast.clipping.registry import Method, register


def _init(sections, layout, device, steps_total):
    return {}, {}


def _step(g, w, layout, params, state, thr, step, active):
    pre = global_norm(g, layout)
    return record(pre, pre, 0.0, 0.0, math.nan)


register(Method(name="none", section=None, threshold_key=None, scheduled=False, label=lambda s: "none",
                structure=lambda s: (), init=_init, step=_step))
