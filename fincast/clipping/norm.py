"""``norm``: rescale so the p-norm is at most ``max_norm``, direction kept (Pascanu et al. 2013), over all of a
run's gradients together (``scope: global``: bitwise ``torch.nn.utils.clip_grad_norm_``), per layer, or per
tensor (Keras ``clipnorm``). ``clip_fraction``: the share of groups (1 for global) clipped."""

from __future__ import annotations

import math

import torch

from fincast.clipping.core import EPS, pnorm, record, tensor_norms
from fincast.clipping.registry import Method, register
from fincast.config import NormClip


def _label(s: NormClip) -> str:
    p = s.norm_type
    label = f"norm{float(s.max_norm)}" + ("" if p == 2 else f"-L{'inf' if math.isinf(p) else f'{p:g}'}")
    label += "" if s.scope == "global" else f"-{s.scope}"
    return label + ("" if s.schedule == "constant" else f"-{s.schedule}")


def _structure(s: NormClip):
    return float(s.norm_type), s.scope


def _init(sections, layout, device, steps_total):
    p, scope = _structure(sections[0])
    if scope != "global":  # the index maps the step uses, built here: creating them in a step would sync a GPU
        layout.expand(torch.zeros(1, len(layout.names), device=device))
        _layer_index(layout, torch.device(device))
    return {"p": p, "scope": scope}, {}


def _layer_index(layout, device):
    return layout.cached(("layer", device), lambda: torch.tensor(layout.layer_of_tensor(), device=device))


def _step(g, w, layout, params, state, thr, step, active):
    p, scope = params["p"], params["scope"]
    norms = tensor_norms(g, layout, p)  # [K, T]
    l2 = norms if p == 2.0 else tensor_norms(g, layout)
    pre = torch.linalg.vector_norm(l2, 2.0, dim=1)
    m = thr.to(norms.dtype)
    if scope == "global":
        total = pre if p == 2.0 else pnorm(norms, p)
        coef = torch.clamp(torch.reciprocal(total + EPS) * m, max=1.0)  # as clip_grad_norm_, bit for bit
        g.mul_(coef.to(g.dtype).unsqueeze(1))
        post = pre * coef
        clipped = post < pre  # coef < 1 and a non-zero norm (zero gradients stay unchanged)
        return record(pre, post, clipped, clipped, thr)
    if scope == "per_param":
        groups, per_tensor = norms, None
    else:  # per layer: the p-norm of the layer's tensor norms
        groups = torch.stack([pnorm(norms[:, a:b], p) for a, b in layout.spans], 1)
        per_tensor = _layer_index(layout, g.device)
    coefs = torch.clamp(torch.reciprocal(groups + EPS) * m.unsqueeze(1), max=1.0)  # [K, groups]
    tensor_coefs = coefs if per_tensor is None else coefs.index_select(1, per_tensor)  # [K, T]
    g.mul_(layout.expand(tensor_coefs.to(g.dtype)))
    clipped = (coefs < 1.0) & (groups > 0)
    post = torch.linalg.vector_norm(l2 * tensor_coefs, 2.0, dim=1)
    return record(pre, post, clipped.any(1), clipped.float().mean(1), thr)


register(Method(name="norm", section=NormClip, threshold_key="max_norm", scheduled=True, label=_label,
                structure=_structure, init=_init, step=_step,
                bounds_global_l2=lambda s: float(s.norm_type) == 2.0 and s.scope == "global"))
