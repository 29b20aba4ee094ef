"""Gradient clipping (layer L1): a family of small clippers with one record of statistics.

Methods (``clip.method``; settings in ``clip.<method>``):

* ``none``: nothing is changed; the statistics are still recorded.
* ``value``: clamp every element to [-value, value] (direction not kept).
* ``norm``: rescale so the p-norm is at most ``max_norm`` (direction kept), over all gradients together
  (``scope: global``, as ``torch.nn.utils.clip_grad_norm_``), per layer, or per tensor (Keras ``clipnorm``).
* ``autoclip`` (Seetharaman et al. 2020): global L2 clipping at the ``percentile``-th percentile of the
  history of global L2 norms, the current step's norm included (so step 1 is never clipped).
* ``agc`` (Brock et al. 2021): unit-wise, clip unit i when ||G_i|| > clip_factor * max(||W_i||, eps).
* ``zclip`` (Kumar et al. 2025): z-score of the global L2 norm against EMAs of its mean and variance.

Every clipper returns a :class:`ClipStats` of 0-d tensors on the gradients' device, whatever the method:
global L2 norm before and after, whether anything changed, the fraction of units (elements, tensors,
layers) clipped, and the threshold in force. Nothing here calls ``.item()`` or branches on a device
value, so a training step never waits for the GPU; the loop reads the statistics in batches.

Stateful methods keep an explicit :class:`ClipState` (``init_state``), threaded through
``clip_gradients(params, cfg, state)`` and saved with checkpoints (``state_dict``/``load_state_dict``),
so a study can hold one state per run and a resumed run continues exactly.

Where it sits in a step: after ``backward()`` (and ``GradScaler.unscale_``; under DDP after the
all-reduce, so every rank clips identically), before ``optimizer.step()``.
"""

from __future__ import annotations

import bisect
import math
import re
from dataclasses import dataclass, field, fields

import numpy as np
import torch

from fincast.config import ClipConfig

EPS = 1e-6  # as torch.nn.utils.clip_grad_norm_: coef = max_norm / (norm + EPS)


@dataclass
class ClipStats:
    norm_pre: torch.Tensor  # global L2 norm before clipping
    norm_post: torch.Tensor  # global L2 norm of what the optimizer sees
    clipped: torch.Tensor  # 1.0 if clipping changed the gradients, else 0.0
    clip_fraction: torch.Tensor  # share of units clipped: elements (value), layers/tensors (norm), units (agc)
    threshold: torch.Tensor  # the bound in force (nan where there is none)


# ---------------------------------------------------------------------------------------------
# Layers: how parameters group into layers (per-layer norms, AGC's output layer, monitoring)
# ---------------------------------------------------------------------------------------------

_RNN_PARAM = re.compile(r"^(?:weight|bias)_(?:ih|hh|hr)_l(\d+)(_reverse)?$")


def layer_name(param_name: str) -> str:
    """'lstm.weight_ih_l1' -> 'lstm.l1'; 'head.weight' -> 'head'; 'w' -> 'w' (a parameter of the root)."""
    module, _, leaf = param_name.rpartition(".")
    m = _RNN_PARAM.match(leaf)
    if m:  # one nn.LSTM/GRU module holds every stacked layer: split them
        return f"{module}.l{m.group(1)}{m.group(2) or ''}".lstrip(".")
    return module or leaf


@dataclass(frozen=True)
class Layout:
    """Per gradient tensor: its parameter name and layer; layers are contiguous runs in parameter order."""

    names: tuple[str, ...]
    layers: tuple[str, ...]  # layer names, in order
    spans: tuple[tuple[int, int], ...]  # tensors [a, b) of each layer
    output: str  # the output layer: the last one registered (the model's head)

    @classmethod
    def of(cls, named: list[tuple[str, torch.Tensor]]) -> Layout:
        names = tuple(n for n, _ in named)
        layers: list[str] = []
        spans: list[list[int]] = []
        for i, n in enumerate(names):
            lay = layer_name(n)
            if layers and layers[-1] == lay:
                spans[-1][1] = i + 1
            else:
                layers.append(lay)
                spans.append([i, i + 1])
        return cls(names, tuple(layers), tuple((a, b) for a, b in spans), layers[-1] if layers else "")


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def _foreach_ok(grads: list[torch.Tensor]) -> bool:
    return len({(g.device, g.dtype) for g in grads}) == 1 and grads[0].device.type in ("cuda", "cpu", "mps")


def _norm_dtype(grads: list[torch.Tensor]) -> torch.dtype:
    """Norms accumulate in float32 (fp16/bf16 gradients cannot overflow it), float64 for float64 gradients."""
    return torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32


def _vector_pnorm(v: torch.Tensor, p: float) -> torch.Tensor:
    """p-norm of a vector; for p other than 1, 2, inf computed as max|v| * ||v / max|v|||_p, so sum(|v|^p)
    cannot overflow (|v| = 1e4 with p = 10 would in float32)."""
    if p in (1.0, 2.0, math.inf):
        return torch.linalg.vector_norm(v, p)
    m = v.abs().amax().clamp_min(torch.finfo(v.dtype).tiny)
    return m * torch.linalg.vector_norm(v / m, p)


def tensor_norms(grads: list[torch.Tensor], norm_type: float = 2.0) -> torch.Tensor:
    """p-norm of each tensor, stacked (float32; float64 for float64 gradients)."""
    dtype = _norm_dtype(grads)
    device = grads[0].device
    if norm_type not in (1.0, 2.0, math.inf):  # scaled, as _vector_pnorm
        peaks = tensor_norms(grads, math.inf).clamp_min(torch.finfo(dtype).tiny)
        scaled = [g.detach().to(dtype) / m for g, m in zip(grads, peaks.unbind())]
        return torch.stack([torch.linalg.vector_norm(x, norm_type) for x in scaled]) * peaks
    if _foreach_ok(grads):
        if grads[0].dtype == dtype:  # the common case: no dtype argument, no casts (each op costs us of overhead)
            return torch.stack(torch._foreach_norm(grads, norm_type))
        norms = torch._foreach_norm(grads, norm_type, dtype=dtype)
    else:
        norms = [torch.linalg.vector_norm(g, norm_type, dtype=dtype) for g in grads]
    return torch.stack([n.to(device, dtype) for n in norms])


def global_norm(grads: list[torch.Tensor], norm_type: float = 2.0) -> torch.Tensor:
    """Norm of all gradients together, as if concatenated into one vector (0-d tensor, float32 or float64)."""
    if not grads:
        return torch.zeros(())
    return _vector_pnorm(tensor_norms(grads, norm_type), norm_type)


def _finite(x: torch.Tensor) -> torch.Tensor:
    return x.abs() < math.inf  # torch.isfinite is four ops for floating tensors; this is two


_CONSTANTS: dict[tuple[str, torch.device], torch.Tensor] = {}


def _const(value: float, device: torch.device) -> torch.Tensor:
    """A cached 0-d float32 tensor for a constant statistic (a fixed threshold, 0, nan): no op per step.
    Read-only by contract: the loop only stacks it (a copy)."""
    key = (repr(value), device)
    t = _CONSTANTS.get(key)
    if t is None:
        if len(_CONSTANTS) > 4096:  # a schedule makes a new threshold each step: keep the cache bounded
            _CONSTANTS.clear()
        v = value if math.isnan(value) else _bound(value, torch.float32)
        t = _CONSTANTS[key] = torch.full((), v, dtype=torch.float32, device=device)
    return t


def _bound(value: float, dtype: torch.dtype) -> float:
    """A threshold as a scalar for tensors of ``dtype``: beyond the dtype's range it is +-inf, which bounds
    exactly the same values (torch refuses to convert an out-of-range Python float, e.g. 1e39 to float32)."""
    return value if abs(value) <= torch.finfo(dtype).max else math.copysign(math.inf, value)


def _scalar(value: float, like: torch.Tensor) -> torch.Tensor:
    return _const(value, like.device)


def _scale(grads: list[torch.Tensor], coefs: torch.Tensor | float | list) -> None:
    """grads[i] *= coef, in place, in each grad's dtype: one coefficient for all (a 0-d tensor or a float) or
    one per tensor (tensors that broadcast against it, or floats); a single foreach op where it can."""
    if _foreach_ok(grads):
        dtype = grads[0].dtype
        if isinstance(coefs, torch.Tensor):
            coefs = coefs.to(dtype)
        elif isinstance(coefs, list):
            coefs = [c.to(dtype) if isinstance(c, torch.Tensor) else c for c in coefs]
        torch._foreach_mul_(grads, coefs)
        return
    for g, c in zip(grads, coefs if isinstance(coefs, list) else [coefs] * len(grads)):
        g.mul_(c.to(g.device, g.dtype) if isinstance(c, torch.Tensor) else c)


def _stats(pre: torch.Tensor, post: torch.Tensor, clipped: torch.Tensor, fraction: torch.Tensor,
           threshold: torch.Tensor) -> ClipStats:
    return ClipStats(pre.float(), post.float(), clipped.float(), fraction.float(), threshold.float())


def schedule_factor(step: int, kind: str, start: float, steps: int) -> float:
    """Threshold multiplier at step ``step`` (0-based): from ``start`` to 1 over ``steps``, then 1."""
    if kind == "constant":
        return 1.0
    t = min(step / steps, 1.0)
    if kind == "linear":
        return start + (1.0 - start) * t
    return 1.0 + (start - 1.0) * 0.5 * (1.0 + math.cos(math.pi * t))  # cosine


# ---------------------------------------------------------------------------------------------
# Stateless clippers (one list of gradients in, clipped in place, statistics out)
# ---------------------------------------------------------------------------------------------


def clip_none(grads: list[torch.Tensor]) -> ClipStats:
    pre = global_norm(grads)
    zero = _const(0.0, pre.device)
    return _stats(pre, pre, zero, zero, _const(math.nan, pre.device))


def clip_value(grads: list[torch.Tensor], value: float) -> ClipStats:
    """Clamp every element to [-value, value]. Direction is not kept."""
    pre = global_norm(grads)
    n = sum(g.numel() for g in grads)
    if len({g.dtype for g in grads}) == 1:  # one comparison over all elements
        over = (torch.cat([g.detach().reshape(-1) for g in grads]).abs() > _bound(value, grads[0].dtype)).sum()
    else:  # compare each tensor in its own dtype, as it is clamped
        over = sum((g.detach().abs() > _bound(value, g.dtype)).sum() for g in grads)
    if _foreach_ok(grads):
        bound = _bound(value, grads[0].dtype)
        torch._foreach_clamp_min_(grads, -bound)
        torch._foreach_clamp_max_(grads, bound)
    else:
        for g in grads:
            g.clamp_(-_bound(value, g.dtype), _bound(value, g.dtype))
    return _stats(pre, global_norm(grads), over > 0, over / max(n, 1), _scalar(value, pre))


def clip_to_norm(grads: list[torch.Tensor], threshold: torch.Tensor, pre: torch.Tensor | None = None) -> ClipStats:
    """Rescale all gradients together so their global L2 norm is at most ``threshold`` (a 0-d tensor, so
    data-dependent thresholds need no host sync). A nan threshold clips nothing."""
    pre = global_norm(grads) if pre is None else pre
    clip = pre > threshold
    coef = torch.where(clip, threshold / (pre + EPS), 1.0)
    _scale(grads, coef)
    clipped = clip.float()
    return _stats(pre, pre * coef, clipped, clipped, threshold)


def clip_norm(grads: list[torch.Tensor], max_norm: float, norm_type: float = 2.0,
              groups: list[tuple[int, int]] | None = None, host: bool | None = None) -> ClipStats:
    """Rescale gradients so the ``norm_type`` norm is at most ``max_norm``, direction kept.

    ``groups=None``: one norm over all gradients (exactly ``torch.nn.utils.clip_grad_norm_``:
    coef = min(1, max_norm / (norm + EPS))). Otherwise one norm and one coefficient per group of tensors
    ``[a, b)``: one group per layer (``per_layer``) or per tensor (``per_param``). ``host`` (default: on the
    CPU) computes the global coefficient on the host, bit for bit as on the device."""
    norms = tensor_norms(grads, norm_type)
    if groups is None:
        total = _vector_pnorm(norms, norm_type)
        pre = total if norm_type == 2.0 else global_norm(grads)
        if host if host is not None else total.device.type == "cpu":  # no sync to read on the CPU; fewer ops
            return _clip_norm_host(grads, pre, total, max_norm)
        coef = torch.clamp(max_norm / (total + EPS), max=1.0)  # as clip_grad_norm_, bit for bit
        _scale(grads, coef)
        post = pre * coef
        clipped = (post < pre).float()  # coef < 1 and a non-zero norm (zero gradients stay unchanged)
        return _stats(pre, post, clipped, clipped, _scalar(max_norm, pre))
    if host if host is not None else norms.device.type == "cpu":
        return _clip_groups_host(grads, norms, norm_type, max_norm, groups)
    pre = torch.linalg.vector_norm(norms if norm_type == 2.0 else tensor_norms(grads), 2.0)
    if all(b - a == 1 for a, b in groups) and len(groups) == len(grads):
        group_norms = norms
    else:
        group_norms = torch.stack([_vector_pnorm(norms[a:b], norm_type) for a, b in groups])
    coefs = torch.clamp(max_norm / (group_norms + EPS), max=1.0)
    per_tensor = [coefs[j] for j, (a, b) in enumerate(groups) for _ in range(a, b)]
    _scale(grads, per_tensor)
    clipped = (coefs < 1.0) & (group_norms > 0)
    return _stats(pre, global_norm(grads), clipped.any(), clipped.float().mean(), _scalar(max_norm, pre))


def _pnorm(values: list[float], p: float) -> float:
    """p-norm of a few Python floats (per-tensor norms), scaled by the largest so large p cannot overflow."""
    m = max(values, default=0.0)
    if p == math.inf or not 0 < m < math.inf:
        return m if p == math.inf else sum(v ** p for v in values) ** (1 / p)
    return m * sum((v / m) ** p for v in values) ** (1 / p)


def _clip_groups_host(grads: list[torch.Tensor], norms: torch.Tensor, norm_type: float, max_norm: float,
                      groups: list[tuple[int, int]]) -> ClipStats:
    """Per-layer / per-tensor clipping with the group norms and coefficients in Python floats (CPU): one
    torch multiply for all tensors, instead of a dozen small ops."""
    per = norms.tolist()
    l2 = per if norm_type == 2.0 else tensor_norms(grads).tolist()
    bound = _bound(max_norm, torch.float32)
    coefs = []
    for a, b in groups:
        group = _pnorm(per[a:b], norm_type)
        coefs.append(min(1.0, bound / (group + EPS)) if group > 0 else 1.0)
    per_tensor = [coefs[j] for j, (a, b) in enumerate(groups) for _ in range(a, b)]
    clipped = sum(c < 1.0 for c in coefs)
    if clipped:
        _scale(grads, per_tensor)
    pre = math.sqrt(sum(v * v for v in l2))
    post = math.sqrt(sum((v * c) ** 2 for v, c in zip(l2, per_tensor)))
    values = torch.tensor([pre, post, float(clipped > 0), clipped / max(len(groups), 1)], dtype=torch.float32)
    return ClipStats(*values.unbind(), _scalar(max_norm, values))


def _clip_norm_host(grads: list[torch.Tensor], pre: torch.Tensor, total: torch.Tensor, max_norm: float) -> ClipStats:
    """Global norm clipping with the coefficient computed on the host, in the norm's precision exactly as
    clip_grad_norm_ computes it on the device (reciprocal(total + EPS) * max_norm, clamped at 1), so the
    clipped gradients are bitwise torch's; the multiply is skipped when nothing is clipped."""
    real = np.float64 if total.dtype == torch.float64 else np.float32
    one = real(1.0)
    coef = np.minimum(one, one / (real(total.item()) + real(EPS)) * real(_bound(max_norm, torch.float32)))
    threshold = _scalar(max_norm, pre)
    if not coef >= one:  # also a nan coefficient (nan norm), which torch multiplies in too
        _scale(grads, float(coef))
        post = pre * float(coef)
        clipped = (post < pre).float()  # as the device path: 0 for zero, inf or nan norms
        return _stats(pre, post, clipped, clipped, threshold)
    zero = _const(0.0, pre.device)
    return _stats(pre, pre, zero, zero, threshold)


def unit_norms(t: torch.Tensor) -> torch.Tensor:
    """L2 norm of each unit of a tensor: per output row (dim 0) for weights, the whole tensor for biases and
    scalars; shaped to broadcast against ``t``."""
    if t.dim() <= 1:
        return torch.linalg.vector_norm(t).reshape([1] * t.dim())
    return torch.linalg.vector_norm(t, dim=tuple(range(1, t.dim())), keepdim=True)


def clip_agc(grads: list[torch.Tensor], weights: list[torch.Tensor], clip_factor: float, eps: float = 1e-3,
             skip: list[bool] | None = None) -> ClipStats:
    """Adaptive gradient clipping, unit-wise (Brock et al. 2021): for each unit i, if
    ||G_i|| > clip_factor * max(||W_i||, eps), rescale G_i to that bound. ``skip[k]`` leaves tensor k alone."""
    pre = global_norm(grads)
    skip = skip or [False] * len(grads)
    pairs = [(g, w) for g, w, s in zip(grads, weights, skip) if not s]
    threshold = _scalar(clip_factor, pre)
    if not pairs:
        zero = _const(0.0, pre.device)
        return _stats(pre, pre, zero, zero, threshold)
    # every unit's norms in one vector, so the bound and coefficient are a few ops for all units together
    g_units = [unit_norms(g.detach()) for g, _ in pairs]
    w_units = [unit_norms(w.detach()) for _, w in pairs]
    gn = torch.cat([u.reshape(-1) for u in g_units]).float()
    bound = torch.cat([u.reshape(-1) for u in w_units]).float().clamp_min_(eps).mul_(clip_factor)
    # bound / max(||G_i||, 1e-6) where ||G_i|| > bound, else 1 (as the NFNets reference code: where(trigger,
    # clipped, grad)). The 1e-6 floor on the gradient norm is theirs too: a unit over a bound below 1e-6 is scaled
    # by bound / 1e-6, not lifted onto the bound; a unit within its bound is never touched, however tiny
    over = gn > bound
    coef = torch.where(over, bound / gn.clamp_min(1e-6), torch.ones_like(gn))
    coefs = [c.view(u.shape) for c, u in zip(coef.split([u.numel() for u in g_units]), g_units)]
    _scale([g for g, _ in pairs], coefs)
    n_clipped = over.sum()
    return _stats(pre, global_norm(grads), n_clipped > 0, n_clipped / gn.numel(), threshold)


# ---------------------------------------------------------------------------------------------
# Stateful clippers
# ---------------------------------------------------------------------------------------------


@dataclass
class ClipState:
    """Everything a run's clipper carries between steps. ``step`` counts calls (a host int: schedules and
    warmups need no device sync); the tensors live on the gradients' device."""

    step: int = 0
    layout: Layout | None = field(default=None, compare=False)  # derived from the model, not saved
    history: torch.Tensor | None = None  # autoclip: ring buffer of global L2 norms, nan = empty/non-finite
    warm: torch.Tensor | None = None  # zclip: norms of the warmup steps
    mean: torch.Tensor | None = None  # zclip: EMA of the (clipped) norm
    var: torch.Tensor | None = None  # zclip: EMA of its variance
    host: HostScalars | None = field(default=None, compare=False)  # CPU: the same state as Python floats
    host_scalars: bool | None = field(default=None, compare=False)  # None: on the CPU (the device path: False)


@dataclass
class HostScalars:
    """On the CPU, AutoClip's and ZClip's per-step arithmetic on a handful of scalars costs far more as torch
    ops (microseconds of dispatch each) than as Python floats, and reading a CPU tensor costs no device
    sync; so there the state is kept here and written back to the tensors above for checkpoints."""

    ring: list[float] | None = None  # autoclip: the history ring, nan = empty/non-finite
    ordered: list[float] | None = None  # autoclip: its finite values, sorted
    warm: list[float] | None = None  # zclip: warmup norms so far
    warm_size: int = 0
    mean: float | None = None
    var: float | None = None


def init_state(cfg: ClipConfig, named_params: list[tuple[str, torch.Tensor]] | None = None, *,
               host_scalars: bool | None = None) -> ClipState:
    """A fresh per-run state. ``named_params`` (``model.named_parameters()``) gives per-layer scopes and
    AGC their layers; the stateless methods need nothing else. ``host_scalars``: keep AutoClip's and ZClip's
    scalars in Python (default: when the gradients are on the CPU; False forces the sync-free device path)."""
    return ClipState(layout=Layout.of(list(named_params)) if named_params is not None else None,
                     host_scalars=host_scalars)


def _on_host(state: ClipState, pre: torch.Tensor) -> bool:
    return state.host_scalars if state.host_scalars is not None else pre.device.type == "cpu"


def _to_device_state(state: ClipState, device: torch.device) -> None:
    """Leaving the host path (a CPU checkpoint resumed on a GPU): the tensors become the state again."""
    if state.host is not None:
        state_dict(state)
        state.host = None
    for name in ("history", "warm", "mean", "var"):
        value = getattr(state, name)
        if value is not None and value.device != device:
            setattr(state, name, value.to(device))


def _copy(value):
    return value.detach().clone() if isinstance(value, torch.Tensor) else value


def state_dict(state: ClipState) -> dict:
    """A copy of the state (without the layout, which comes from the model), for checkpoints."""
    h = state.host
    if h is not None:  # write the host scalars back (float64 EMAs: a resumed run continues bit for bit)
        if h.ring is not None:
            state.history = torch.tensor(h.ring, dtype=torch.float32)
        if h.warm is not None:
            state.warm = torch.tensor(h.warm + [math.nan] * (h.warm_size - len(h.warm)), dtype=torch.float32)
        if h.mean is not None:
            state.mean = torch.tensor(h.mean, dtype=torch.float64)
            state.var = torch.tensor(h.var, dtype=torch.float64)
    return {f.name: _copy(getattr(state, f.name)) for f in fields(state) if f.name not in ("layout", "host", "host_scalars")}


def load_state_dict(state: ClipState, saved: dict) -> ClipState:
    for key, value in saved.items():
        setattr(state, key, _copy(value))
    state.host = None  # rebuilt from the tensors on the next step
    return state


def _clip_host(grads: list[torch.Tensor], pre: torch.Tensor, norm: float, threshold: float,
               shown: float | None = None) -> ClipStats:
    """Global L2 clipping with a host-side threshold (CPU): coef = threshold / (norm + EPS) when norm >
    threshold. ``shown`` is the threshold statistic, if not ``threshold``."""
    shown_t = torch.tensor(threshold if shown is None else shown, dtype=torch.float32)
    if norm > threshold:  # False for nan
        coef = threshold / (norm + EPS)
        _scale(grads, coef)
        one = _const(1.0, pre.device)
        return _stats(pre, pre * coef, one, one, shown_t)
    zero = _const(0.0, pre.device)
    return _stats(pre, pre, zero, zero, shown_t)


def _percentile(ordered: list[float], q: float) -> float:
    """numpy.percentile's default (linear) on a sorted list; nan when empty."""
    if not ordered:
        return math.nan
    pos = q * (len(ordered) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _autoclip_host(grads: list[torch.Tensor], pre: torch.Tensor, q: float, window: int,
                   state: ClipState) -> ClipStats:
    h = state.host = state.host or HostScalars()
    if h.ring is None:
        h.ring = state.history.tolist() if state.history is not None else [math.nan] * window
        h.ordered = sorted(v for v in h.ring if v == v)
    norm = pre.item()
    slot = state.step % window
    old = h.ring[slot]
    if old == old:
        h.ordered.pop(bisect.bisect_left(h.ordered, old))
    h.ring[slot] = norm if math.isfinite(norm) else math.nan
    if math.isfinite(norm):
        bisect.insort(h.ordered, norm)
    return _clip_host(grads, pre, norm, _percentile(h.ordered, q))


def _zclip_host(grads: list[torch.Tensor], pre: torch.Tensor, cfg, state: ClipState) -> ClipStats:
    h = state.host = state.host or HostScalars()
    if h.warm is None:
        h.warm_size = cfg.warmup
        h.warm = state.warm[:min(state.step, cfg.warmup)].tolist() if state.warm is not None else []
        if state.mean is not None:
            h.mean, h.var = float(state.mean), float(state.var)
    norm = pre.item()
    finite = math.isfinite(norm)
    cap = cfg.max_norm if cfg.max_norm is not None else math.inf
    if state.step < cfg.warmup:
        h.warm.append(norm if finite else math.nan)
        if state.step + 1 == cfg.warmup:
            seen = [v for v in h.warm if v == v]
            h.mean = sum(seen) / len(seen) if seen else math.nan
            h.var = sum((v - h.mean) ** 2 for v in seen) / len(seen) if seen else math.nan
        return _clip_host(grads, pre, norm, cap, math.nan if math.isinf(cap) else cap)
    mean, var = h.mean, h.var
    std = math.sqrt(var) if var == var and var >= 0 else math.nan
    z = (norm - mean) / (std + cfg.eps) if norm == norm else math.nan  # inf norm: a spike, as on the device
    spike = z > cfg.z_thresh
    adaptive = (mean + cfg.z_thresh ** 2 * std / z if cfg.rule == "reciprocal" else mean) if spike else norm
    boundary = min(mean + cfg.z_thresh * (std + cfg.eps), cap)
    stats = _clip_host(grads, pre, norm, min(adaptive, cap), boundary)
    if finite and math.isfinite(adaptive):  # EMA update with the clipped norm; re-seeded if it broke
        new_mean = cfg.alpha * mean + (1 - cfg.alpha) * adaptive if math.isfinite(mean) else adaptive
        h.var = cfg.alpha * var + (1 - cfg.alpha) * (adaptive - new_mean) ** 2 if math.isfinite(var) else 0.0
        h.mean = new_mean
    return stats


def autoclip_step(grads: list[torch.Tensor], percentile: float, window: int, state: ClipState) -> ClipStats:
    """Append this step's global L2 norm to the history (the last ``window`` steps), clip at its
    ``percentile``-th percentile (linear interpolation, as numpy.percentile). Non-finite norms are not
    history (stored as nan and left out of the percentile).

    On an accelerator: sync-free and without a full sort per step: the k smallest entries by ``topk`` (k =
    the most the rank can need), the rank itself from the count of non-nan entries, all on the device. On
    the CPU (unless ``state.host_scalars`` is False): a sorted list in Python (see :class:`HostScalars`)."""
    pre = global_norm(grads)
    if _on_host(state, pre):
        return _autoclip_host(grads, pre, percentile / 100.0, window, state)
    _to_device_state(state, pre.device)
    if state.history is None:
        state.history = torch.full((window,), math.nan, device=pre.device)
    state.history[state.step % window] = torch.where(_finite(pre), pre, math.nan)
    n = min(state.step + 1, window)
    filled = state.history[:n]
    q = percentile / 100.0
    k = min(n, math.floor(q * (n - 1)) + 2)
    smallest = torch.topk(filled, k, largest=False, sorted=True).values  # nan sorts last
    valid = (filled == filled).sum()  # non-nan entries (nan != nan)
    last = (valid - 1).clamp_min(0)
    pos = q * last
    lo = pos.floor()
    idx = torch.minimum(torch.stack([lo, lo + 1]).long().clamp_(max=k - 1), last)
    two = smallest.gather(0, idx)
    threshold = torch.where(valid > 0, torch.lerp(two[0], two[1], pos - lo), math.nan)
    return clip_to_norm(grads, threshold, pre)


def zclip_step(grads: list[torch.Tensor], cfg, state: ClipState) -> ClipStats:
    """ZClip, following the reference implementation: the first ``warmup`` norms initialise the mean and
    (population) variance, with only the optional ``max_norm`` cap meanwhile. Then z = (g - mean) / (std + eps);
    when z > z_thresh the norm is clipped to mean + z_thresh^2 * std / z (``reciprocal``) or to the mean
    (``mean``); ``max_norm`` caps it in any case. The EMAs are then updated with the clipped norm
    (spike) or the norm itself: mean <- a*mean + (1-a)*x, then var <- a*var + (1-a)*(x - mean)^2.
    On the CPU (unless ``state.host_scalars`` is False) the same arithmetic runs on Python floats
    (:class:`HostScalars`)."""
    pre = global_norm(grads)
    if _on_host(state, pre):
        return _zclip_host(grads, pre, cfg, state)
    _to_device_state(state, pre.device)
    if state.step < cfg.warmup:
        if state.warm is None:
            state.warm = torch.full((cfg.warmup,), math.nan, device=pre.device)
        state.warm[state.step] = torch.where(_finite(pre), pre, math.nan)
        if state.step + 1 == cfg.warmup:
            state.mean = torch.nanmean(state.warm)
            state.var = torch.nanmean((state.warm - state.mean) ** 2)
        if cfg.max_norm is None:
            zero = _const(0.0, pre.device)
            return _stats(pre, pre, zero, zero, _const(math.nan, pre.device))
        return clip_to_norm(grads, _scalar(cfg.max_norm, pre), pre)
    mean, var = state.mean, state.var
    std = var.sqrt()
    z = (pre - mean) / (std + cfg.eps)
    spike = z > cfg.z_thresh
    # reciprocal: mean + z_thresh * std / (z / z_thresh), a harder cut the larger the outlier
    spike_threshold = mean + cfg.z_thresh ** 2 * std / z if cfg.rule == "reciprocal" else mean
    adaptive = torch.where(spike, spike_threshold, pre)  # what the EMA sees
    boundary = mean + cfg.z_thresh * (std + cfg.eps)  # the norm above which a step is clipped
    effective = adaptive
    if cfg.max_norm is not None:
        cap = _scalar(cfg.max_norm, pre)
        effective, boundary = torch.minimum(adaptive, cap), torch.minimum(boundary, cap)
    stats = clip_to_norm(grads, effective, pre)
    # EMA update, skipped for non-finite norms (e.g. steps an fp16 GradScaler drops), re-seeded if it broke
    finite = _finite(torch.stack([adaptive, mean, var, pre]))
    new_mean = torch.where(finite[1], cfg.alpha * mean + (1 - cfg.alpha) * adaptive, adaptive)
    new_var = torch.where(finite[2], cfg.alpha * var + (1 - cfg.alpha) * (adaptive - new_mean) ** 2, 0.0)
    ok = finite[0] & finite[3]
    state.mean = torch.where(ok, new_mean, mean)
    state.var = torch.where(ok, new_var, var)
    return _stats(stats.norm_pre, stats.norm_post, stats.clipped, stats.clip_fraction, boundary)


# ---------------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------------


def threshold_at(cfg: ClipConfig, step: int) -> float | None:
    """The scheduled base threshold of value/norm/agc at step ``step`` (None for the other methods)."""
    section = getattr(cfg, cfg.method, None)
    base = {"value": "value", "norm": "max_norm", "agc": "clip_factor"}.get(cfg.method)
    if base is None:
        return None
    factor = schedule_factor(step, section.schedule, section.schedule_start, section.schedule_steps)
    return getattr(section, base) * factor


def clip_gradients(params: list[torch.Tensor], cfg: ClipConfig, state: ClipState) -> tuple[ClipStats, ClipState]:
    """Clip the ``.grad`` of ``params`` (a model's parameters, in ``named_parameters`` order) in place."""
    used = [p for p in params if p.grad is not None]
    grads = [p.grad for p in used]
    method = cfg.method
    if not grads:
        zero = torch.zeros(())
        stats = _stats(zero, zero, zero, zero, torch.full((), math.nan))
    elif method == "none":
        stats = clip_none(grads)
    elif method == "value":
        stats = clip_value(grads, threshold_at(cfg, state.step))
    elif method == "norm":
        c = cfg.norm
        stats = clip_norm(grads, threshold_at(cfg, state.step), c.norm_type, _groups(c.scope, params, state),
                          state.host_scalars)
    elif method == "agc":
        layout = _layout(state, params)
        skip = [cfg.agc.skip_output and layer_name(n) == layout.output
                for n, p in zip(layout.names, params) if p.grad is not None]
        stats = clip_agc(grads, used, threshold_at(cfg, state.step), cfg.agc.eps, skip)
    elif method == "autoclip":
        stats = autoclip_step(grads, cfg.autoclip.percentile, cfg.autoclip.window, state)
    elif method == "zclip":
        stats = zclip_step(grads, cfg.zclip, state)
    else:  # config validation makes this unreachable
        raise ValueError(f"unknown clip.method {method!r}")
    state.step += 1
    return stats, state


def _layout(state: ClipState, params: list[torch.Tensor]) -> Layout:
    if state.layout is None or len(state.layout.names) != len(params):
        raise ValueError("this clip method needs the model's layers: init_state(cfg, model.named_parameters())")
    return state.layout


def _groups(scope: str, params: list[torch.Tensor], state: ClipState) -> list[tuple[int, int]] | None:
    if scope == "global":
        return None
    n_with_grad = [p.grad is not None for p in params]
    if scope == "per_param":
        return [(i, i + 1) for i in range(sum(n_with_grad))]
    layout = _layout(state, params)
    # re-index layer spans onto the tensors that have gradients
    index = [sum(n_with_grad[:i]) for i in range(len(params) + 1)]
    spans = [(index[a], index[b]) for a, b in layout.spans]
    return [(a, b) for a, b in spans if b > a]


# ---------------------------------------------------------------------------------------------
# Threshold advice from a probe run's gradient norms (``fincast advise-clip``)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClipAdvice:
    """Thresholds on the global L2 gradient norm proposed from an unclipped run's norms (finite, > 0):

    * ``percentile``: the ``percentile_q``-th percentile of the norms, as AutoClip uses (clips ~(100-q)% of steps);
    * ``median_multiple``: ``multiple`` x the median norm (clips steps well above the typical one);
    * ``spike_onset``: where spikes begin, Tukey's upper fence on the log norms, exp(Q3 + fence x IQR): norms
      are roughly log-normal, and above this they are outliers of that bulk (clips only the spikes).

    ``spikes`` counts the norms above the spike onset. Percentiles use numpy's linear interpolation."""

    percentile: float
    median_multiple: float
    spike_onset: float
    percentile_q: float
    multiple: float
    fence: float
    steps: int
    median: float
    max: float
    spikes: int

    def proposals(self) -> dict[str, float]:
        return {f"autoclip_p{self.percentile_q:g}": self.percentile, f"median_x{self.multiple:g}": self.median_multiple,
                "spike_onset": self.spike_onset}

    def sweep_range(self) -> tuple[float, float]:
        """A search range for clip.norm.max_norm around the proposals: half the lowest to twice the highest."""
        values = self.proposals().values()
        return 0.5 * min(values), 2.0 * max(values)


MIN_ADVICE_STEPS = 20


def advise_thresholds(norms, *, percentile: float = 10.0, multiple: float = 2.0, fence: float = 1.5) -> ClipAdvice:
    """Proposals for a global-norm clip threshold from a run's per-step gradient norms (see :class:`ClipAdvice`)."""
    x = np.asarray(norms, dtype=np.float64).ravel()
    x = x[np.isfinite(x) & (x > 0)]
    if len(x) < MIN_ADVICE_STEPS:
        raise ValueError(f"{len(x)} finite gradient norms; at least {MIN_ADVICE_STEPS} are needed for advice "
                         "(run the probe for more steps)")
    if not 0 <= percentile <= 100 or multiple <= 0 or fence <= 0:
        raise ValueError(f"percentile must be in [0, 100], multiple and fence > 0 (got {percentile}, {multiple}, "
                         f"{fence})")
    logs = np.log(x)
    q1, q3 = np.percentile(logs, [25, 75])
    onset = float(np.exp(q3 + fence * (q3 - q1)))
    median = float(np.median(x))
    return ClipAdvice(percentile=float(np.percentile(x, percentile)), median_multiple=multiple * median,
                      spike_onset=onset, percentile_q=float(percentile), multiple=float(multiple), fence=float(fence),
                      steps=int(len(x)), median=median, max=float(x.max()), spikes=int(np.sum(x > onset)))
