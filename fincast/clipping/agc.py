"""``agc``, adaptive gradient clipping (Brock et al. 2021, NFNets), unit-wise: for each unit i (an output row of
a weight, the whole tensor for a bias) rescale G_i to clip_factor * max(||W_i||, eps) when its norm exceeds that.
``skip_output`` leaves the output layer (the model's head) alone, as the paper recommends. ``clip_fraction``:
the share of units clipped."""

from __future__ import annotations

import torch

from fincast.clipping.core import global_norm, layer_name, norm_dtype, record
from fincast.clipping.registry import Method, register
from fincast.config import AGCConfig


def _label(s: AGCConfig) -> str:
    from fincast.config import short_float

    return f"agc{short_float(s.clip_factor)}" + ("" if s.schedule == "constant" else f"-{s.schedule}")


def _init(sections, layout, device, steps_total):
    skip = sections[0].skip_output
    clipped = [i for i, n in enumerate(layout.names) if not (skip and layer_name(n) == layout.output)]
    units = [layout.shapes[i][0] if len(layout.shapes[i]) >= 2 else 1 for i in clipped]
    # element -> its unit (units of the clipped tensors in order; one extra "unit" of coefficient 1 for the rest)
    of_element = torch.full((layout.size,), sum(units), dtype=torch.long)
    at = 0
    for i, n_units in zip(clipped, units):
        a, b = layout.offsets[i]
        of_element[a:b] = torch.arange(at, at + n_units).repeat_interleave((b - a) // n_units)
        at += n_units
    eps = torch.tensor([s.eps for s in sections], dtype=torch.float32, device=device)
    return {"tensors": clipped, "of_element": of_element.to(device), "eps": eps, "units": at}, {}


def _unit_norms(x: torch.Tensor, layout, tensors: list[int]) -> torch.Tensor:
    """[K, U]: the L2 norm of every unit of the given tensors (rows of >= 2-D tensors, whole 1-D tensors)."""
    dtype = norm_dtype(x)
    kw = {} if x.dtype == dtype else {"dtype": dtype}
    out = []
    for i in tensors:
        a, b = layout.offsets[i]
        shape = layout.shapes[i]
        rows = shape[0] if len(shape) >= 2 else 1
        out.append(torch.linalg.vector_norm(x[:, a:b].view(x.shape[0], rows, -1), 2.0, dim=2, **kw))
    return torch.cat(out, 1).float()


def _step(g, w, layout, params, state, thr, step, active):
    pre = global_norm(g, layout)
    if not params["tensors"]:
        return record(pre, pre, 0.0, 0.0, thr)
    gn = _unit_norms(g.detach(), layout, params["tensors"])
    bound = _unit_norms(w.detach(), layout, params["tensors"]).clamp_min_(params["eps"].unsqueeze(1))
    bound.mul_(thr.float().unsqueeze(1))
    # bound / max(||G_i||, 1e-6) where ||G_i|| > bound, else 1 (as the NFNets reference code: where(trigger,
    # clipped, grad)); a unit within its bound is never touched, however tiny
    over = gn > bound
    coef = torch.where(over, bound / gn.clamp_min(1e-6), 1.0)
    coef = torch.cat([coef, coef.new_ones(coef.shape[0], 1)], 1)  # the last column: unclipped tensors
    g.mul_(coef.index_select(1, params["of_element"]).to(g.dtype))
    n_clipped = over.sum(1)
    return record(pre, global_norm(g, layout), n_clipped > 0, n_clipped / max(params["units"], 1), thr)


register(Method(name="agc", section=AGCConfig, threshold_key="clip_factor", scheduled=True, label=_label,
                structure=lambda s: (s.skip_output,), init=_init, step=_step))
