"""The training step as CUDA graphs: captured once per batch shape (an epoch's last batch may be smaller) after a
few eager warm-up steps, then replayed, so a step costs one graph launch instead of hundreds of kernel launches
from Python. Inputs that change from step to step (the batch's sample indices, the step's row of the plan:
learning rates, scheduled thresholds, optimizer coefficients) are copied into static tensors before each replay; everything else the step touches (parameters,
gradients, optimizer and clipper state, counters) already lives at fixed addresses.

Capture is refused by CUDA for work that needs the host (a sync, a host-to-device copy from pageable memory);
the engine's step has none, but if capture fails anyway, training goes on eagerly and the reason is logged once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

log = logging.getLogger("fincast.training")


class StepGraphs:
    def __init__(self, step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], warmup: int = 3):
        self.step, self.warmup = step, warmup
        self.graphs: dict[tuple, tuple] = {}
        self.seen: dict[tuple, int] = {}
        self.failed: str | None = None
        self.pool = None

    def __call__(self, idx: torch.Tensor, plan: torch.Tensor) -> torch.Tensor:
        if self.failed is not None:
            return self.step(idx, plan)
        key = (tuple(idx.shape), tuple(plan.shape), plan.dtype)
        entry = self.graphs.get(key)
        if entry is None:
            self.seen[key] = self.seen.get(key, 0) + 1
            if self.seen[key] <= self.warmup:  # eager, on a side stream (lazy initialisations happen here)
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    out = self.step(idx, plan)
                torch.cuda.current_stream().wait_stream(side)
                return out
            stream = torch.cuda.current_stream()
            try:
                entry = self.graphs[key] = self._capture(idx, plan)
            except Exception as exc:  # capture refused: eager steps from here on
                torch.cuda.set_stream(stream)  # (a failed capture leaves its side stream current)
                self.failed = f"{type(exc).__name__}: {exc}"
                log.warning("training without CUDA graphs: capturing the step failed (%s)", self.failed)
                return self.step(idx, plan)
        s_idx, s_plan, graph, out = entry
        s_idx.copy_(idx)
        s_plan.copy_(plan)
        graph.replay()
        return out

    def _capture(self, idx, plan) -> tuple:
        s_idx, s_plan = idx.clone(), plan.clone()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self.step(s_idx, s_plan)
        if self.pool is None:
            self.pool = graph.pool()
        log.info("training step captured as a CUDA graph (batch shape %s)", tuple(idx.shape))
        return s_idx, s_plan, graph, out
