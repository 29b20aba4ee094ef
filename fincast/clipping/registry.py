"""The clip methods' registry: each method module registers one :class:`Method`, and everything that lists or
names methods (the config's labels, the sweep's threshold keys, the stacked clipper) asks here.

A method's ``step`` clips the gradients of a GROUP of runs that share its ``structure`` (what must be equal to
run as one vectorised computation: a norm's p and scope, AutoClip's window, ZClip's warmup); every other setting
is a per-run tensor. Signature::

    step(g [Kg, P] (clipped in place), w [Kg, P] (weights), layout, params, state, thr [Kg], step [Kg],
         active [Kg] bool) -> stats [Kg, 5]

``params``: the per-run settings as tensors (``init``); ``state``: the per-run state tensors (``init``; updated
in place, frozen where ``active`` is False); ``thr``: the scheduled base threshold (methods with a schedule);
``step``: each run's clip steps so far.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fincast.clipping.core import schedule_factor
from fincast.config import ClipConfig


@dataclass(frozen=True)
class Method:
    name: str
    section: type | None  # the config dataclass of clip.<name> (None for "none")
    threshold_key: str | None  # the section's key a sweep searches over (None: nothing to search)
    scheduled: bool  # threshold_key is a bound that follows the section's schedule (schedule, schedule_start, ...)
    label: Callable  # section -> short label for run names (norm1.0, zclip-z2.5, ...)
    structure: Callable  # section -> hashable; runs stack in one group only when equal
    init: Callable  # (sections, layout, device, steps_total) -> (params dict, state dict) of [Kg, ...] tensors
    step: Callable  # see the module doc
    bounds_global_l2: Callable = lambda section: False  # its threshold bounds the global L2 norm (plots)
    doc: str = ""


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in METHODS:
        raise ValueError(f"clip method {method.name!r} registered twice")
    METHODS[method.name] = method
    return method


def method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown clip.method {name!r}; one of {', '.join(METHODS)}") from None


def section(cfg: ClipConfig):
    return getattr(cfg, cfg.method) if METHODS[cfg.method].section is not None else None


def label(cfg: ClipConfig) -> str:
    """Short name of a clipping setup for run names: norm1.0, norm0.5-L1-per_layer, value0.1-linear,
    autoclip-p10, agc0.01, zclip-z2.5-mean, none."""
    return method(cfg.method).label(section(cfg))


def threshold_keys() -> dict[str, str]:
    """method -> the config key a threshold sweep searches (``clip.norm.max_norm``, ``clip.autoclip.percentile``),
    for methods that have one."""
    return {n: f"clip.{n}.{m.threshold_key}" for n, m in METHODS.items() if m.threshold_key}


def bounds_global_l2(cfg: ClipConfig) -> bool:
    """Whether the method's threshold bounds the global L2 gradient norm (so it can be drawn against
    grad/norm_pre): norm with p=2 and global scope, autoclip, zclip. Not value, agc, per-layer or other p."""
    return method(cfg.method).bounds_global_l2(section(cfg))


def bounds_global_l2_of(name: str, **values) -> bool:
    """``bounds_global_l2`` from a method name and section values as strings (a run's MLflow params)."""
    m = METHODS.get(name)
    if m is None:
        return False
    if m.section is None:
        return m.bounds_global_l2(None)
    import dataclasses

    fields = {f.name: f.type for f in dataclasses.fields(m.section)}
    given = {k: (float(v) if k == "norm_type" else v) for k, v in values.items() if k in fields and v is not None}
    return m.bounds_global_l2(dataclasses.replace(m.section(), **given))


def threshold_at(cfg: ClipConfig, step: int) -> float | None:
    """The scheduled base threshold of a scheduled method at step ``step`` (None for the other methods)."""
    m = method(cfg.method)
    if not m.scheduled:
        return None
    s = section(cfg)
    return getattr(s, m.threshold_key) * schedule_factor(step, s.schedule, s.schedule_start, s.schedule_steps)
