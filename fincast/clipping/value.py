"""``value``: clamp every gradient element to [-value, value] (direction not kept; Keras ``clipvalue``,
``torch.nn.utils.clip_grad_value_``). ``clip_fraction``: the share of elements clamped."""

from __future__ import annotations

from fincast.clipping.core import global_norm, record
from fincast.clipping.registry import Method, register
from fincast.config import ValueClip


def _label(s: ValueClip) -> str:
    return f"value{float(s.value)}" + ("" if s.schedule == "constant" else f"-{s.schedule}")


def _init(sections, layout, device, steps_total):
    return {}, {}


def _step(g, w, layout, params, state, thr, step, active):
    pre = global_norm(g, layout)
    bound = thr.to(g.dtype).unsqueeze(1)  # beyond the dtype's range: inf, which bounds exactly the same values
    over = (g.abs() > bound).sum(1)
    g.clamp_(min=-bound, max=bound)
    return record(pre, global_norm(g, layout), over > 0, over / max(g.shape[1], 1), thr)


register(Method(name="value", section=ValueClip, threshold_key="value", scheduled=True, label=_label,
                structure=lambda s: (), init=_init, step=_step))
