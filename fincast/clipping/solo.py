"""One run's clipping on a model's parameters (``clip_gradients(params, cfg, state)``): the stacked methods with
K = 1, for code that trains one ``nn.Module`` its own way. The training engine calls the stacked clipper
directly."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

from fincast.clipping.core import Layout, layer_name
from fincast.clipping.registry import threshold_at
from fincast.clipping.stack import StackClipper
from fincast.config import ClipConfig


@dataclass
class ClipStats:
    """One step's record (0-d float32 tensors on the gradients' device)."""

    norm_pre: torch.Tensor  # global L2 norm before clipping
    norm_post: torch.Tensor  # global L2 norm of what the optimizer sees
    clipped: torch.Tensor  # 1.0 if clipping changed the gradients, else 0.0
    clip_fraction: torch.Tensor  # share of units clipped: elements (value), layers/tensors (norm), units (agc)
    threshold: torch.Tensor  # the bound in force (nan where there is none)


@dataclass
class ClipState:
    """A run's clipper between steps: its step count, the model's layout (per-layer scopes, AGC), and the stacked
    clipper (built on the first step, for the parameters that have gradients)."""

    step: int = 0
    layout: Layout | None = field(default=None, compare=False)
    clipper: StackClipper | None = field(default=None, compare=False, repr=False)
    key: tuple | None = field(default=None, compare=False, repr=False)
    pending: dict | None = field(default=None, compare=False, repr=False)  # loaded, applied on the next build


def init_state(cfg: ClipConfig, named_params=None) -> ClipState:
    """A fresh state; ``named_params`` (``model.named_parameters()``) gives per-layer scopes and AGC their layers."""
    return ClipState(layout=Layout.of(list(named_params)) if named_params is not None else None)


def clip_gradients(params: list[torch.Tensor], cfg: ClipConfig, state: ClipState) -> tuple[ClipStats, ClipState]:
    """Clip the ``.grad`` of ``params`` (a model's parameters, in ``named_parameters`` order) in place."""
    used = [i for i, p in enumerate(params) if p.grad is not None]
    if not used:
        zero = torch.zeros(())
        state.step += 1
        return ClipStats(zero, zero, zero, zero, torch.full((), math.nan)), state
    grads = [params[i].grad for i in used]
    layout = _layout(cfg, state, params, used)
    key = (layout.names, layout.shapes, cfg, grads[0].device, grads[0].dtype)
    if state.clipper is None or state.key != key:
        state.clipper, state.key = StackClipper([cfg], layout, grads[0].device), key
        if state.pending is not None:
            state.clipper.load(0, state.pending, state.step)
            state.pending = None
    g = torch.cat([x.detach().reshape(1, -1) for x in grads], 1)
    w = torch.cat([params[i].detach().reshape(1, -1).to(g.dtype) for i in used], 1)
    base = threshold_at(cfg, state.step)
    # (fill kernels, not tensors from host data: those would be a blocking copy, a sync, on a GPU)
    thr = torch.full((1,), math.nan if base is None else base, dtype=torch.float64, device=g.device)
    stats = state.clipper.step(g, w, thr, torch.full((1,), state.step, dtype=torch.long, device=g.device),
                               torch.ones(1, dtype=torch.bool, device=g.device))
    torch._foreach_copy_(grads, [g[0, a:b].view(x.shape) for x, (a, b) in zip(grads, layout.offsets)])
    state.step += 1
    return ClipStats(*stats[0].unbind()), state


def _layout(cfg: ClipConfig, state: ClipState, params, used: list[int]) -> Layout:
    full = state.layout
    needs = cfg.method == "agc" or (cfg.method == "norm" and cfg.norm.scope == "per_layer")
    if full is None or len(full.names) != len(params):
        if needs:
            raise ValueError("this clip method needs the model's layers: init_state(cfg, model.named_parameters())")
        return Layout.of([(f"p{i}", tuple(params[i].grad.shape)) for i in used])
    sub = Layout.of([(full.names[i], tuple(params[i].grad.shape)) for i in used])
    return dataclasses.replace(sub, output=full.output) if sub.output != full.output else sub


def state_dict(state: ClipState) -> dict:
    """A copy of the state, for checkpoints: the step and the method's tensors (AutoClip's history, ZClip's
    warmup norms and EMAs)."""
    out = {"step": state.step}
    if state.clipper is not None:
        out.update(state.clipper.state_of(0))
    elif state.pending is not None:
        out.update({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state.pending.items()})
    return out


def load_state_dict(state: ClipState, saved: dict) -> ClipState:
    state.step = int(saved.get("step", 0))
    tensors = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in saved.items() if k != "step"}
    if state.clipper is not None:
        state.clipper.load(0, tensors, state.step)
    else:
        state.pending = tensors
    return state


def global_norm(grads: list[torch.Tensor], norm_type: float = 2.0) -> torch.Tensor:
    """Norm of all gradients together, as if concatenated into one vector (0-d tensor, float32 or float64)."""
    from fincast.clipping.core import pnorm, tensor_norms

    if not grads:
        return torch.zeros(())
    lay = Layout.of([(f"p{i}", tuple(g.shape)) for i, g in enumerate(grads)])
    g = torch.cat([x.detach().reshape(1, -1) for x in grads], 1)
    return pnorm(tensor_norms(g, lay, norm_type), norm_type)[0]


__all__ = ["ClipState", "ClipStats", "clip_gradients", "global_norm", "init_state", "layer_name", "load_state_dict",
           "state_dict"]
