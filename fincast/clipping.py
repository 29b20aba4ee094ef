"""Gradient clipping (layer L1): a family of small clippers with one signature.

Each clipper takes the list of gradient tensors (``p.grad`` of every parameter that has one), clips
them in place, and returns a :class:`ClipStats` of 0-d tensors on the gradients' device: the global L2
norm before and after, whether clipping changed anything, and the threshold in force. Nothing here
calls ``.item()``, so a training step never waits for the GPU; the loop reads the statistics in
batches when it logs.

``clip_gradients(grads, cfg, state)`` dispatches on ``clip.method`` and threads an explicit per-run
state through (``None`` for the stateless methods here; stateful methods such as AutoClip keep their
history in it), so a study can hold one state per run.

Where it sits in a step: after ``backward()`` (and ``GradScaler.unscale_``), before ``optimizer.step()``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from fincast.config import ClipConfig

EPS = 1e-6  # as torch.nn.utils.clip_grad_norm_


@dataclass
class ClipStats:
    norm_pre: torch.Tensor  # global L2 norm before clipping
    norm_post: torch.Tensor  # global L2 norm of what the optimizer sees
    clipped: torch.Tensor  # 1.0 if clipping changed the gradients, else 0.0
    threshold: torch.Tensor  # the bound in force (nan for none)


def global_norm(grads: list[torch.Tensor], norm_type: float = 2.0) -> torch.Tensor:
    """Norm of all gradients together, as if concatenated into one vector (0-d tensor, float32)."""
    if not grads:
        return torch.zeros(())
    return torch.nn.utils.get_total_norm(grads, norm_type=norm_type, foreach=_foreach_ok(grads)).float()


def _foreach_ok(grads: list[torch.Tensor]) -> bool:
    return len({(g.device, g.dtype) for g in grads}) == 1 and grads[0].device.type in ("cuda", "cpu", "mps")


def _bound(value: float, dtype: torch.dtype) -> float:
    """A threshold as a scalar for tensors of ``dtype``: beyond the dtype's range it is +-inf, which bounds
    exactly the same values (torch refuses to convert an out-of-range Python float, e.g. 1e39 to float32)."""
    return value if abs(value) <= torch.finfo(dtype).max else math.copysign(math.inf, value)


def clip_none(grads: list[torch.Tensor]) -> ClipStats:
    pre = global_norm(grads)
    return ClipStats(pre, pre, torch.zeros_like(pre), torch.full_like(pre, math.nan))


def clip_value(grads: list[torch.Tensor], value: float) -> ClipStats:
    """Clamp every element to [-value, value]. Direction is not preserved."""
    pre = global_norm(grads)
    changed = (global_norm(grads, math.inf) > value).float()
    if _foreach_ok(grads):
        bound = _bound(value, grads[0].dtype)
        torch._foreach_clamp_min_(grads, -bound)
        torch._foreach_clamp_max_(grads, bound)
    else:
        for g in grads:
            g.clamp_(-_bound(value, g.dtype), _bound(value, g.dtype))
    return ClipStats(pre, global_norm(grads), changed, torch.full_like(pre, _bound(value, pre.dtype)))


def clip_norm(grads: list[torch.Tensor], max_norm: float, norm_type: float = 2.0) -> ClipStats:
    """Rescale all gradients together so their ``norm_type`` norm is at most ``max_norm`` (direction kept),
    as ``torch.nn.utils.clip_grad_norm_``."""
    pre = global_norm(grads)
    total = pre if norm_type == 2.0 else global_norm(grads, norm_type)
    coef = torch.clamp(max_norm / (total + EPS), max=1.0)
    if _foreach_ok(grads):
        torch._foreach_mul_(grads, coef.to(grads[0].dtype))
    else:
        for g in grads:
            g.mul_(coef.to(g.device, g.dtype))
    return ClipStats(pre, global_norm(grads), (coef < 1.0).float(), torch.full_like(pre, _bound(max_norm, pre.dtype)))


def init_state(cfg: ClipConfig) -> Any:
    """Per-run clipper state (None for the stateless methods)."""
    return None


def clip_gradients(grads: list[torch.Tensor], cfg: ClipConfig, state: Any = None) -> tuple[ClipStats, Any]:
    if cfg.method == "none":
        return clip_none(grads), state
    if cfg.method == "value":
        return clip_value(grads, cfg.value), state
    if cfg.method == "norm":
        return clip_norm(grads, cfg.max_norm, cfg.norm_type), state
    raise ValueError(f"unknown clip.method {cfg.method!r}")  # config validation makes this unreachable
