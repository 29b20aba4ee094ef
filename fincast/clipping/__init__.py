"""Gradient clipping (layer L1): a family of small clippers with one signature, over the gradients of K runs.

Methods (``clip.method``; settings in ``clip.<method>``), one module each, registered in :mod:`.registry`:

* ``none``: nothing is changed; the statistics are still recorded.
* ``value``: clamp every element to [-value, value] (direction not kept).
* ``norm``: rescale so the p-norm is at most ``max_norm`` (direction kept), over all gradients together
  (``scope: global``, bitwise ``torch.nn.utils.clip_grad_norm_``), per layer, or per tensor (Keras ``clipnorm``).
* ``autoclip`` (Seetharaman et al. 2020): global L2 clipping at the ``percentile``-th percentile of the
  history of global L2 norms, the current step's norm included (so step 1 is never clipped).
* ``agc`` (Brock et al. 2021): unit-wise, clip unit i when ||G_i|| > clip_factor * max(||W_i||, eps).
* ``zclip`` (Kumar et al. 2025): z-score of the global L2 norm against EMAs of its mean and variance.

Every method works on stacked gradients ``g`` [K, P] (a row per run) with per-run thresholds and state, and
returns one record per run (:data:`core.STATS`: global L2 norm before and after, whether anything changed,
the fraction of units clipped, the threshold in force), all on the device: nothing calls ``.item()`` or
branches on a device value, so a step never waits for the GPU and can be captured in a CUDA graph.
:class:`StackClipper` clips a stack of runs with different methods; :func:`clip_gradients` is one run on a
model's parameters.

Where it sits in a step: after ``backward()`` (and the fp16 unscale; under DDP after the all-reduce, so every
rank clips identically), before the optimizer.
"""

from fincast.clipping import agc, autoclip, none, norm, value, zclip  # noqa: F401  (each registers its method)
from fincast.clipping.advice import MIN_ADVICE_STEPS, ClipAdvice, advise_thresholds
from fincast.clipping.core import EPS, STATS, Layout, layer_name, schedule_factor, tensor_norms
from fincast.clipping.registry import (
    METHODS,
    Method,
    bounds_global_l2,
    bounds_global_l2_of,
    label,
    threshold_at,
    threshold_keys,
)
from fincast.clipping.solo import (
    ClipState,
    ClipStats,
    clip_gradients,
    global_norm,
    init_state,
    load_state_dict,
    state_dict,
)
from fincast.clipping.stack import StackClipper

__all__ = ["EPS", "METHODS", "MIN_ADVICE_STEPS", "STATS", "ClipAdvice", "ClipState", "ClipStats", "Layout", "Method",
           "StackClipper", "advise_thresholds", "bounds_global_l2", "bounds_global_l2_of", "clip_gradients", "global_norm", "init_state",
           "label", "layer_name", "load_state_dict", "schedule_factor", "state_dict", "tensor_norms", "threshold_at",
           "threshold_keys"]
