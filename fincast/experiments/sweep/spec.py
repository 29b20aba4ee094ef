"""A sweep's spec (layer L4, experiments): its keys, search axes and settings, and each trial's config."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fincast import config as config_mod
from fincast.clipping import label as clip_label
from fincast.config import (
    CLIP_METHODS,
    ConfigError,
    PipelineConfig,
    SweepSettings,
    short_float,
)
from fincast.experiments.spec import (  # noqa: F401 - THRESHOLD_KEYS, SWEEP_TAG, TRIAL_TAG, redact: the sweep's names
    SWEEP_TAG,
    THRESHOLD_KEYS,
    TRIAL_TAG,
    base_config,
    read_spec,
    redact,
    spec_common,
)

SPEC_KEYS = ("name", "base", "set", "search", "sweep")


SEARCH_KEYS = ("clip", "lr")


DEFAULT_TRIALS = 30


# keys of a sweep spec that may change between invocations of one sweep (not in its hash)
_MUTABLE = ("sweep.trials", "sweep.workers", "sweep.threads", "sweep.storage")


@dataclass(frozen=True)
class Axis:
    """One searched key: log-uniform on [low, high], or one of ``values``."""
    key: str
    low: float | None = None
    high: float | None = None
    values: tuple[float, ...] | None = None

    def grid(self, points: int) -> list[float]:
        if self.values is not None:
            return list(self.values)
        return [float(v) for v in np.geomspace(self.low, self.high, points)]

    def suggest(self, trial: Any) -> float:
        if self.values is not None:
            return float(trial.suggest_categorical(self.key, list(self.values)))
        return trial.suggest_float(self.key, self.low, self.high, log=True)

    def describe(self) -> str:
        if self.values is not None:
            return "{" + ", ".join(f"{v:g}" for v in self.values) + "}"
        return f"[{self.low:g}, {self.high:g}] log-uniform"


@dataclass(frozen=True)
class Sweep:
    name: str
    path: Path
    raw: dict                       # the spec as resolved (after --set), saved with the parent run
    settings: SweepSettings
    methods: dict[str, Axis | None]  # clip method -> its threshold's axis (None for none)
    lr: Axis | None
    base: dict                      # the base pipeline (raw) with `set` applied
    base_cfg: PipelineConfig

    @property
    def trials(self) -> int:
        if self.settings.sampler == "grid":
            return len(self.grid())
        return self.settings.trials or DEFAULT_TRIALS

    def grid(self) -> list[dict[str, Any]]:
        """Every point of the grid: methods x their thresholds x learning rates (the product of the axes)."""
        points = self.settings.grid_points
        lrs = self.lr.grid(points) if self.lr is not None else [None]
        out = []
        for method, axis in self.methods.items():
            for thr in axis.grid(points) if axis is not None else [None]:
                for lr in lrs:
                    p: dict[str, Any] = {"clip.method": method}
                    if axis is not None:
                        p[axis.key] = thr
                    if lr is not None:
                        p["train.lr"] = lr
                    out.append(p)
        return out

    @property
    def spec_hash(self) -> str:
        """What the trials compute and how they are chosen (not the budget, workers or storage)."""
        flat = {k: v for k, v in config_mod.flatten({"search": self.raw.get("search"),
                                                     "sweep": dataclasses.asdict(self.settings)}).items()
                if k not in _MUTABLE}
        flat["base"] = config_mod.flatten(config_mod.to_dict(self.base_cfg))
        return hashlib.sha256(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def with_range(self, method: str, low: float, high: float) -> Sweep:
        methods = dict(self.methods)
        methods[method] = Axis(THRESHOLD_KEYS[method], low, high)
        return dataclasses.replace(self, methods=methods)

    def thresholds(self) -> dict[str, str]:
        """method -> the key of its threshold ("" for none), for tables and plots."""
        return {m: (a.key if a is not None else "") for m, a in self.methods.items()}


def _axis(key: str, raw: Any, where: str, errors: list[str]) -> Axis | None:
    """{low, high} (log-uniform) or a list of values, all > 0."""
    if isinstance(raw, dict):
        unknown = [k for k in raw if k not in ("low", "high")]
        if unknown:
            errors.append(f"{where}: unknown key(s) {', '.join(map(str, unknown))}; a range is {{low: x, high: y}}")
            return None
        try:
            low, high = float(raw["low"]), float(raw["high"])
        except (KeyError, TypeError, ValueError):
            errors.append(f"{where} = {raw!r}: a range needs numbers low and high, e.g. {{low: 0.01, high: 10}}")
            return None
        if not (0 < low < high) or not math.isfinite(high):
            errors.append(f"{where} = {raw!r}: need 0 < low < high (the range is searched log-uniformly)")
            return None
        return Axis(key, low, high)
    if isinstance(raw, list) and raw:
        try:
            values = tuple(float(v) for v in raw)
        except (TypeError, ValueError):
            errors.append(f"{where} = {raw!r}: expected a list of numbers")
            return None
        if any(not (v > 0 and math.isfinite(v)) for v in values) or len(set(values)) != len(values):
            errors.append(f"{where} = {raw!r}: values must be distinct numbers > 0")
            return None
        return Axis(key, values=values)
    errors.append(f"{where} = {raw!r}: expected a range {{low: x, high: y}} or a list of values")
    return None


def load(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Sweep:
    """Read a sweep spec, apply ``--set`` overrides (``sweep.*``/``search.*``/``name``/``base`` change the spec;
    any other key is a pipeline key set for every trial), and check everything before any work: the spec's
    keys, each range, and the pipeline config at both ends of every range."""
    raw, name, base_path, errors = read_spec(path, overrides, SPEC_KEYS, "sweep")
    path = Path(path)
    common = spec_common(raw, errors)
    settings = config_mod.build_section(SweepSettings, raw.get("sweep"), "sweep.", errors)
    search = raw.get("search")
    if not isinstance(search, dict):
        errors.append("search: required, a mapping with clip (methods and their threshold ranges) and optionally lr")
        search = {}
    errors += [f"search.{k}: unknown key; search has: {', '.join(SEARCH_KEYS)}" for k in search
               if k not in SEARCH_KEYS]
    clips = search.get("clip")
    methods: dict[str, Axis | None] = {}
    if isinstance(clips, list) and all(isinstance(c, str) for c in clips):  # [none, norm]: no ranges given
        clips = {c: None for c in clips}
    if not isinstance(clips, dict) or not clips:
        errors.append("search.clip: required, a mapping of clip methods to threshold ranges, e.g. "
                      "{none: {}, norm: {low: 0.01, high: 10}}")
        clips = {}
    for method, rng in clips.items():
        where = f"search.clip.{method}"
        if method not in CLIP_METHODS:
            errors.append(f"{where}: unknown clip method; one of {', '.join(CLIP_METHODS)}")
        elif method == "none":
            if rng not in (None, {}):
                errors.append(f"{where} = {rng!r}: unclipped training has no threshold; write none: {{}}")
            methods[method] = None
        elif rng is None or rng == {}:
            errors.append(f"{where}: give the range of {THRESHOLD_KEYS[method]}, e.g. {{low: 0.01, high: 10}}, "
                          "or a list of values")
        else:
            axis = _axis(THRESHOLD_KEYS[method], rng, where, errors)
            if axis is not None:
                methods[method] = axis
    lr = _axis("train.lr", search["lr"], "search.lr", errors) if search.get("lr") is not None else None
    if settings is not None and settings.range == "advised" and "norm" not in clips:
        errors.append("sweep.range = advised: the advisor proposes clip.norm.max_norm; add norm to search.clip "
                      "(e.g. norm: {low: 0.01, high: 10}, replaced by the advised range)")
    if errors or base_path is None:
        raise ConfigError(f"invalid sweep spec {path}:\n  " + "\n  ".join(errors))

    base_raw = base_config(path, base_path, common)
    base_cfg = config_mod.from_dict(base_raw, f"{base_path} with {path}: set")
    sweep = Sweep(name.strip(), path, raw, settings, methods, lr, base_raw, base_cfg)
    # every range's ends must make a valid pipeline config (e.g. autoclip percentiles <= 100)
    for method, axis in methods.items():
        ends = [None] if axis is None else ([axis.low, axis.high] if axis.values is None else list(axis.values))
        for v in ends:
            p = {"clip.method": method, **({axis.key: v} if axis is not None else {})}
            try:
                trial_config(sweep, p, number=-1)
            except ConfigError as exc:
                at = "" if v is None else f" at {v:g}"
                errors += [f"search.clip.{method}{at}: {e}" for e in str(exc).split("\n  ")[1:]]
    if lr is not None:
        for v in (lr.values or (lr.low, lr.high)):
            try:
                trial_config(sweep, {"clip.method": next(iter(methods)), "train.lr": v}, number=-1)
            except ConfigError as exc:
                errors += [f"search.lr at {v:g}: {e}" for e in str(exc).split("\n  ")[1:]]
    if errors:
        raise ConfigError(f"invalid sweep spec {path}:\n  " + "\n  ".join(dict.fromkeys(errors)))
    return sweep


def trial_config(sweep: Sweep, params: dict[str, Any], *, number: int, threads: int | None = None) -> PipelineConfig:
    """The pipeline config of one trial: the base with the trial's clip method, threshold and lr."""
    raw = config_mod.apply_overrides(sweep.base, [])
    raw.setdefault("clip", {})
    if not isinstance(raw["clip"], dict):
        raw["clip"] = {}
    raw["clip"]["method"] = params["clip.method"]
    for key, value in params.items():
        if key != "clip.method":
            config_mod.set_key(raw, key.split("."), value, f"{sweep.path}: trial {number}")
    cfg = config_mod.from_dict(raw, f"{sweep.path} (trial {number}: "
                                    + ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                                                for k, v in params.items()) + ")")
    label = clip_label(cfg.clip)
    return dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, refresh_after_hours=math.inf),
        train=dataclasses.replace(cfg.train, threads=cfg.train.threads or threads),
        tracking=dataclasses.replace(cfg.tracking, experiment=sweep.name, metrics_writer="inline",
                                     run_name=f"t{number} {label} lr={short_float(cfg.train.lr)}"))


def storage_url(sweep: Sweep, override: str | None = None) -> str:
    url = override or sweep.settings.storage
    return url or f"sqlite:///{Path('optuna.db').resolve()}"
