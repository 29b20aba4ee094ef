"""The clipping of a stack of K runs, each with its own clip config: one vectorised step per GROUP of runs that
share a method and its structure (``registry.Method.structure``), whatever K.

With one group (a stack of one method, the usual case, and every run alone) the group's step works on the
gradients in place; with several, each group gathers its rows, clips them and scatters them back, so the ops per
step grow with the number of distinct methods, never with the number of runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from fincast.clipping.core import Layout
from fincast.clipping.registry import METHODS, Method, method, section
from fincast.config import ClipConfig


@dataclass
class Group:
    method: Method
    runs: list[int]
    index: torch.Tensor | None  # the runs' rows (None: all K, in order)
    params: dict
    state: dict  # tensors [len(runs), ...]


class StackClipper:
    """Clip configs of K runs over gradients laid out by ``layout``. ``steps_total``: the most steps any run can
    take (sizes AutoClip's history; 0 = the configured window)."""

    def __init__(self, cfgs: list[ClipConfig], layout: Layout, device: torch.device | str, steps_total: int = 0):
        self.cfgs, self.layout, self.runs = list(cfgs), layout, len(cfgs)
        device = torch.device(device)
        keys: dict[tuple, list[int]] = {}
        for k, c in enumerate(self.cfgs):
            m = method(c.method)
            keys.setdefault((c.method, m.structure(section(c))), []).append(k)
        self.groups: list[Group] = []
        for (name, _), runs in keys.items():
            m = METHODS[name]
            params, state = m.init([section(self.cfgs[k]) for k in runs], layout, device, steps_total)
            index = None if len(keys) == 1 else torch.tensor(runs, device=device)
            self.groups.append(Group(m, runs, index, params, state))
        self._where = {k: (gi, j) for gi, g in enumerate(self.groups) for j, k in enumerate(g.runs)}
        self._schedule = _schedule_arrays(self.cfgs)

    def thresholds(self, steps: np.ndarray) -> np.ndarray:
        """[S, K] float64: each run's scheduled base threshold at each of ``steps`` (0-based, [S] or [S, K]; nan for
        methods without one). Computed on the host, in float64, as ``registry.threshold_at``."""
        base, kind, start, span = self._schedule
        s = np.asarray(steps, dtype=np.float64)
        s = s[:, None] if s.ndim == 1 else s
        t = np.minimum(s / span, 1.0)
        factor = np.where(kind == 1, start + (1.0 - start) * t,
                          np.where(kind == 2, 1.0 + (start - 1.0) * 0.5 * (1.0 + np.cos(np.pi * t)), 1.0))
        return base * factor

    def step(self, g: torch.Tensor, w: torch.Tensor, thr: torch.Tensor, step: torch.Tensor,
             active: torch.Tensor) -> torch.Tensor:
        """Clip ``g`` [K, P] in place (``w`` [K, P]: the weights, for AGC); ``thr`` [K] the scheduled thresholds,
        ``step`` [K] each run's clip steps so far, ``active`` [K] runs whose state may change. -> stats [K, 5]."""
        lay = self.layout
        if len(self.groups) == 1:
            grp = self.groups[0]
            return grp.method.step(g, w, lay, grp.params, grp.state, thr, step, active)
        stats = torch.empty(self.runs, 5, dtype=torch.float32, device=g.device)
        for grp in self.groups:
            idx = grp.index
            part = g.index_select(0, idx)
            weights = w.index_select(0, idx) if grp.method.name == "agc" else w
            out = grp.method.step(part, weights, lay, grp.params, grp.state, thr.index_select(0, idx),
                                  step.index_select(0, idx), active.index_select(0, idx))
            g.index_copy_(0, idx, part)
            stats.index_copy_(0, idx, out)
        return stats

    def state_of(self, k: int) -> dict:
        """Run ``k``'s clipper state (copies, on the CPU), for its checkpoint."""
        grp, j = self._group(k)
        return {name: t[j].detach().cpu().clone() for name, t in grp.state.items()}

    def load(self, k: int, saved: dict, step: int) -> None:
        """Restore run ``k``'s state from ``state_of`` (or an older checkpoint's ``clip_state``), ``step`` the
        run's clip steps so far. AutoClip's history may change length (a resumed run with more steps)."""
        grp, j = self._group(k)
        for name, t in grp.state.items():
            value = saved.get(name)
            if value is None:
                continue
            value = torch.as_tensor(value).to(t.device, t.dtype)
            if value.shape == t[j].shape:
                t[j] = value
            elif name == "history":
                t[j] = _ring(value.reshape(-1), t.shape[1], step).to(t.device)
            else:  # zclip's warmup buffer of another length: the config changed, which resume refuses
                raise ValueError(f"clip state {name!r} of shape {tuple(value.shape)} does not fit {tuple(t[j].shape)}")

    def _group(self, k: int) -> tuple[Group, int]:
        gi, j = self._where[k]
        return self.groups[gi], j


def _ring(ring: torch.Tensor, length: int, step: int) -> torch.Tensor:
    """A history ring written for ``step`` steps, re-laid in a ring of ``length``: the last min(step, length)
    norms at slot (s % length)."""
    row = torch.full((length,), math.nan, dtype=ring.dtype)
    for s in range(max(0, step - min(length, len(ring))), step):
        row[s % length] = ring[s % len(ring)]
    return row


def _schedule_arrays(cfgs: list[ClipConfig]):
    base, kind, start, span = [], [], [], []
    for c in cfgs:
        m = METHODS[c.method]
        if not m.scheduled:
            base.append(math.nan), kind.append(0), start.append(1.0), span.append(1.0)
            continue
        s = section(c)
        base.append(getattr(s, m.threshold_key))
        kind.append({"constant": 0, "linear": 1, "cosine": 2}[s.schedule])
        start.append(s.schedule_start)
        span.append(float(s.schedule_steps))
    return tuple(np.asarray(v, dtype=np.float64) for v in (base, kind, start, span))
