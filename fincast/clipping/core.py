"""What every clip method shares: the layout of a run's gradient row, norms over it, the statistics record.

Gradients arrive stacked: ``g`` [K, P], one row per run, each row the run's parameters' gradients in
``named_parameters`` order (``torch.nn.utils.parameters_to_vector``'s layout). A :class:`Layout` says where each
tensor, layer and AGC unit lies in a row. Norms are taken per tensor first (one reduction over a [K, n] slice per
tensor) and then combined, as ``torch.nn.utils.clip_grad_norm_`` does per model, so a run's global L2 norm is
bitwise torch's whatever the number of runs. The number of ops a clip step dispatches depends on the method and
the architecture (tensors, layers), never on K.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch

EPS = 1e-6  # as torch.nn.utils.clip_grad_norm_: coef = max_norm / (norm + EPS)
STATS = ("norm_pre", "norm_post", "clipped", "clip_fraction", "threshold")  # the columns of a stats record
PRE, POST, CLIPPED, FRACTION, THRESHOLD = range(5)

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
    """Per gradient tensor: its parameter name, shape, layer and place [a, b) in a run's row; layers are
    contiguous runs of tensors in parameter order (``spans``: tensors [i, j) of each layer)."""

    names: tuple[str, ...]
    layers: tuple[str, ...]
    spans: tuple[tuple[int, int], ...]
    output: str  # the output layer: the last one registered (the model's head)
    shapes: tuple[tuple[int, ...], ...] = ()
    offsets: tuple[tuple[int, int], ...] = ()
    _maps: dict = field(default_factory=dict, compare=False, repr=False)  # device index maps, built once

    @classmethod
    def of(cls, named: list[tuple[str, torch.Tensor]] | list[tuple[str, tuple[int, ...]]]) -> Layout:
        """From ``model.named_parameters()`` (or (name, shape) pairs)."""
        names = tuple(n for n, _ in named)
        shapes = tuple(tuple(t.shape) if isinstance(t, torch.Tensor) else tuple(t) for _, t in named)
        layers: list[str] = []
        spans: list[list[int]] = []
        for i, n in enumerate(names):
            lay = layer_name(n)
            if layers and layers[-1] == lay:
                spans[-1][1] = i + 1
            else:
                layers.append(lay)
                spans.append([i, i + 1])
        offsets, at = [], 0
        for s in shapes:
            offsets.append((at, at + math.prod(s)))
            at += math.prod(s)
        return cls(names, tuple(layers), tuple((a, b) for a, b in spans), layers[-1] if layers else "", shapes,
                   tuple(offsets))

    @property
    def size(self) -> int:
        return self.offsets[-1][1] if self.offsets else 0

    def layer_of_tensor(self) -> list[int]:
        return [j for j, (a, b) in enumerate(self.spans) for _ in range(a, b)]

    def expand(self, per_tensor: torch.Tensor) -> torch.Tensor:
        """[K, T] per-tensor values -> [K, P] per-element values (an index_select with a cached map)."""
        key = ("tensor", per_tensor.device)
        idx = self._maps.get(key)
        if idx is None:
            idx = torch.repeat_interleave(torch.arange(len(self.names)),
                                          torch.tensor([b - a for a, b in self.offsets])).to(per_tensor.device)
            self._maps[key] = idx
        return per_tensor.index_select(1, idx)

    def cached(self, key, build):
        """A device index map built once per layout (``build()`` on first use)."""
        value = self._maps.get(key)
        if value is None:
            value = self._maps[key] = build()
        return value


def norm_dtype(g: torch.Tensor) -> torch.dtype:
    """Norms accumulate in float32 (fp16/bf16 gradients cannot overflow it), float64 for float64 gradients."""
    return torch.float64 if g.dtype == torch.float64 else torch.float32


def tensor_norms(g: torch.Tensor, layout: Layout, p: float = 2.0) -> torch.Tensor:
    """[K, T]: the p-norm of each run's each tensor (one reduction per tensor, bitwise ``torch._foreach_norm``
    for p in 1, 2, inf). Other p are scaled by the tensor's largest element, so sum(|g|^p) cannot overflow."""
    dtype = norm_dtype(g)
    kw = {} if g.dtype == dtype else {"dtype": dtype}
    if p in (1.0, 2.0, math.inf):
        if g.shape[0] == 1 and g.dtype == dtype and g.device.type in ("cpu", "cuda"):  # one run: one foreach op
            return torch.stack(torch._foreach_norm(_row_views(g, layout), p)).unsqueeze(0)
        return torch.stack([torch.linalg.vector_norm(g[:, a:b], p, dim=1, **kw) for a, b in layout.offsets], 1)
    peaks = tensor_norms(g, layout, math.inf).clamp_min(torch.finfo(dtype).tiny)
    return torch.stack([torch.linalg.vector_norm(g[:, a:b].to(dtype) / peaks[:, j:j + 1], p, dim=1)
                        for j, (a, b) in enumerate(layout.offsets)], 1) * peaks


def _row_views(g: torch.Tensor, layout: Layout) -> list[torch.Tensor]:
    """Each tensor's slice of a one-run gradient row [1, P], cached per gradient tensor (the engine's gradient is
    the same tensor every step; a view keeps its tensor alive, so a cached address is never reused)."""
    key = ("views", g.data_ptr(), g.shape, g.stride(), g.device)
    views = layout._maps.get(key)
    if views is None:
        stale = [k for k in layout._maps if k[0] == "views"]
        for k in stale[:-1]:  # keep one older entry: the solo API's fresh gradient rows would pile up
            del layout._maps[k]
        views = layout._maps[key] = [g[0, a:b] for a, b in layout.offsets]
    return views


def pnorm(v: torch.Tensor, p: float) -> torch.Tensor:
    """p-norm along the last dim (scaled by the largest value for p other than 1, 2, inf)."""
    if p in (1.0, 2.0, math.inf):
        return torch.linalg.vector_norm(v, p, dim=-1)
    m = v.abs().amax(-1, keepdim=True).clamp_min(torch.finfo(v.dtype).tiny)
    return m.squeeze(-1) * torch.linalg.vector_norm(v / m, p, dim=-1)


def global_norm(g: torch.Tensor, layout: Layout) -> torch.Tensor:
    """[K]: each run's L2 norm over all its gradients (as clip_grad_norm_: the norm of the per-tensor norms)."""
    return torch.linalg.vector_norm(tensor_norms(g, layout), 2.0, dim=1)


def finite(x: torch.Tensor) -> torch.Tensor:
    return x.abs() < math.inf  # torch.isfinite is four ops for floating tensors; this is two


def record(pre, post, clipped, fraction, threshold) -> torch.Tensor:
    """The statistics record [K, 5] (float32): see STATS."""
    return torch.stack([t.float() if isinstance(t, torch.Tensor) else torch.full_like(pre, t, dtype=torch.float32)
                        for t in (pre, post, clipped, fraction, threshold)], 1)


def clip_to(g: torch.Tensor, pre: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Rescale each run's gradients to global L2 norm ``threshold`` [K] where ``pre`` [K] exceeds it (a nan
    threshold clips nothing); the record with ``threshold`` as the bound."""
    over = pre > threshold
    coef = torch.where(over, threshold / (pre + EPS), 1.0)
    g.mul_(coef.to(g.dtype).unsqueeze(1))
    return record(pre, pre * coef, over, over, threshold)


def schedule_factor(step: int, kind: str, start: float, steps: int) -> float:
    """Threshold multiplier at step ``step`` (0-based): from ``start`` to 1 over ``steps``, then 1."""
    if kind == "constant":
        return 1.0
    t = min(step / steps, 1.0)
    if kind == "linear":
        return start + (1.0 - start) * t
    return 1.0 + (start - 1.0) * 0.5 * (1.0 + math.cos(math.pi * t))  # cosine


def as_column(values, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Per-run numbers as a [K] tensor on ``like``'s device."""
    return torch.as_tensor(values, dtype=dtype or torch.float32, device=like.device)
