"""Threshold advice from a probe run's gradient norms (``fincast advise-clip``)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


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
