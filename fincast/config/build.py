"""Loading and checking a pipeline configuration (layer L0, config).

A pipeline spec is a YAML file in ``pipelines/``. It is loaded into frozen dataclasses, and every key
is checked before any work starts: unknown keys (with the closest valid key for a typo), wrong types
and out-of-range values each produce one line naming the key, the value and what is allowed.
``--set key=value`` overrides are applied to the raw mapping first, so they go through the same
checks. ``to_dict`` gives the resolved config back as plain YAML-able data; it is saved with each run
and can be loaded again as a pipeline spec."""

from __future__ import annotations

import dataclasses
import datetime as dt
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from fincast.config import names
from fincast.config.files import ConfigError, read_yaml
from fincast.config.keys import describe_keys
from fincast.config.schema import PipelineConfig, _describe, _fmt, clip_section, fields, to_dict

_TRUE = {"true", "yes", "on", "1"}


_FALSE = {"false", "no", "off", "0"}


class _InvalidValue(Exception):
    """One key's problem; collected into a ConfigError."""


def _coerce(value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.strip().lower() in {"null", "none", "~"}):
            if type(None) in args:
                return None
            raise _InvalidValue(f"expected {_describe(tp)}")
        options = [a for a in args if a is not type(None)]
        for i, arg in enumerate(options):  # the first type the value fits (backtest.window: 756 or expanding)
            try:
                return _coerce(value, arg)
            except _InvalidValue:
                if i == len(options) - 1:
                    raise _InvalidValue(f"expected {_describe(tp)}") from None
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value in allowed:
            return value
        if isinstance(value, str) and value.strip().lower() in allowed:
            return value.strip().lower()
        raise _InvalidValue(f"expected {_describe(tp)}")
    if origin is tuple:
        item = typing.get_args(tp)[0]
        if isinstance(value, str):
            value = [v.strip() for v in value.strip().strip("[]").split(",") if v.strip()]
        elif isinstance(value, int | float) and not isinstance(value, bool):
            value = [value]  # --set features.vol_windows=10 means [10]
        if not isinstance(value, list | tuple):
            raise _InvalidValue(f"expected {_describe(tp)}")
        return tuple(_coerce(v, item) for v in value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str | int) and str(value).strip().lower() in _TRUE | _FALSE:
            return str(value).strip().lower() in _TRUE
        raise _InvalidValue("expected true or false")
    if tp is int:
        if isinstance(value, bool):
            raise _InvalidValue("expected an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip().replace("_", ""))
            except ValueError:
                pass
        raise _InvalidValue("expected an integer")
    if tp is float:
        if isinstance(value, bool):
            raise _InvalidValue("expected a number")
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str):
            try:  # PyYAML reads 3e-3 (no dot) as a string: accept it here
                return float(value.strip().lower().replace("_", ""))
            except ValueError:
                pass
        raise _InvalidValue("expected a number")
    if tp is str:
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            return str(value)
        raise _InvalidValue("expected a string")
    if tp is dt.date:
        if isinstance(value, dt.datetime):
            return value.date()
        if isinstance(value, dt.date):
            return value
        if isinstance(value, str):
            try:
                return dt.date.fromisoformat(value.strip())
            except ValueError:
                pass
        raise _InvalidValue("expected a date YYYY-MM-DD")
    raise TypeError(f"unsupported config type {tp!r}")  # a bug in this module, not user input


def _check_range(value: Any, meta: dict) -> None:
    if value is None:
        return
    values = value if isinstance(value, tuple) else None
    if values is not None:
        if len(values) < meta.get("min_len", 0):
            raise _InvalidValue(f"needs at least {meta['min_len']} item(s)")
        if "item_ge" in meta:
            for v in values:
                if v < meta["item_ge"]:
                    raise _InvalidValue(f"every item must be >= {meta['item_ge']} (got {v})")
        return
    if isinstance(value, str):  # a word of an int-or-word key (backtest.window: expanding)
        return
    if "allowed" in meta and value not in meta["allowed"]:
        raise _InvalidValue("allowed: " + ", ".join(_fmt(a) for a in meta["allowed"]))
    for key, op, text in (("ge", float.__ge__, ">="), ("gt", float.__gt__, ">"),
                          ("le", float.__le__, "<="), ("lt", float.__lt__, "<")):
        if key in meta and not op(float(value), float(meta[key])):
            raise _InvalidValue(f"must be {text} {_fmt(meta[key])}")


def _all_keys() -> list[str]:
    return [k for k, _, _ in describe_keys()]


def _unknown_key_hint(prefix: str, key: str, names: list[str]) -> str:
    same_leaf = [k for k in _all_keys() if k.rsplit(".", 1)[-1] == str(key)]
    nearby = [k for k in same_leaf if k.startswith(prefix)] or same_leaf
    if nearby:
        return f" ('{key}' is a key of {' and '.join(k.rsplit('.', 1)[0] for k in nearby)}: {', '.join(nearby)})"
    close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
    return f" (did you mean '{prefix}{close[0]}'?)" if close else ""


def _build(cls: type, raw: Any, prefix: str, errors: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        where = prefix.rstrip(".") or "<top level>"
        first = fields(cls)[0].name
        hint = f" (a section: set its keys, e.g. {prefix}{first}={raw!r})" if prefix and not isinstance(raw, list) else ""
        errors.append(f"{where}: expected a mapping of keys, got {raw!r}{hint}; keys here: "
                      f"{', '.join(f.name for f in fields(cls))}")
        return cls()
    names = [f.name for f in fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in names:
            hint = _unknown_key_hint(prefix, key, names)
            errors.append(f"{prefix}{key}: unknown key{hint}; valid keys here: {', '.join(names)}")
            continue
        f = next(f for f in dataclasses.fields(cls) if f.name == key)
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, f"{prefix}{key}.", errors)
            continue
        if "entries" in f.metadata:  # a list of sections (backtest.clips)
            kwargs[key] = _build_entries(f.metadata["entries"], value, f"{prefix}{key}", errors)
            continue
        try:
            coerced = _coerce(value, tp)
            _check_range(coerced, dict(f.metadata))
            kwargs[key] = coerced
        except _InvalidValue as exc:
            errors.append(f"{prefix}{key} = {value!r}: {exc}")
    return cls(**kwargs)


def _build_entries(cls: type, value: Any, key: str, errors: list[str]) -> tuple | None:
    """A list of sections of type ``cls``: each item a mapping (or a bare ``method`` name)."""
    if value is None or (isinstance(value, str) and value.strip().lower() in {"null", "none", "~", ""}):
        return None
    if isinstance(value, str | dict):
        value = [value]
    if not isinstance(value, list | tuple) or not value:
        errors.append(f"{key} = {value!r}: expected a non-empty list of method names or mappings, or null")
        return None
    out = []
    for i, item in enumerate(value):
        if isinstance(item, str):
            item = {"method": item.strip()}
        if not isinstance(item, dict):
            errors.append(f"{key}[{i}] = {item!r}: expected a method name or a mapping")
            continue
        out.append(_build(cls, item, f"{key}[{i}].", errors))
    return tuple(out)


def _merge_sections(base: Any, over: Any) -> Any:
    if isinstance(base, dict) and isinstance(over, dict):
        return {**base, **{k: _merge_sections(base.get(k), v) for k, v in over.items()}}
    return _deepcopy(over)


def _entries_over_clip(raw: Any) -> Any:
    """backtest.clips entries are read over the spec's clip section: [none, norm] is the spec's clip settings
    with method none, and with method norm."""
    if not isinstance(raw, dict) or not isinstance(raw.get("backtest"), dict):
        return raw
    clips = raw["backtest"].get("clips")
    if isinstance(clips, str | dict):
        clips = [clips]
    if not isinstance(clips, list):
        return raw
    base = raw.get("clip") if isinstance(raw.get("clip"), dict) else {}
    merged = [_merge_sections(base, {"method": c} if isinstance(c, str) else c) if isinstance(c, str | dict) else c
              for c in clips]
    return {**raw, "backtest": {**raw["backtest"], "clips": merged}}


def _cross_checks(cfg: PipelineConfig, errors: list[str]) -> None:
    f = cfg.features
    if f.val_start is None and f.test_start is None and f.val_frac + f.test_frac >= 0.9:
        errors.append(f"features.val_frac + features.test_frac = {f.val_frac + f.test_frac:g}: must be < 0.9 "
                      "to leave data for training")
    if f.val_start and f.test_start and not f.val_start < f.test_start:
        errors.append(f"features.val_start = {f.val_start}: must be before features.test_start = {f.test_start}")
    d = cfg.data
    if d.start and d.end and not d.start < d.end:
        errors.append(f"data.end = {d.end}: must be after data.start = {d.start}")
    if d.source == "csv" and not d.path:
        errors.append("data.path: required when data.source = 'csv' (a directory with one <TICKER>.csv per ticker)")
    if dup := names.duplicate_tickers(d.tickers):
        errors.append(f"data.tickers = {list(d.tickers)}: duplicate tickers (compared ignoring case): "
                      + "; ".join(dup))
    errors.extend(p for t in d.tickers if (p := names.ticker_problem(t, "data.tickers")))
    errors.extend(p for p in [names.name_problem(cfg.name, "name")] if p)
    o = cfg.options
    if cfg.task == "options":
        if o.source == "csv" and not o.path:
            errors.append("options.path: required when options.source = 'csv' (a chain file or a directory of them)")
        if o.source != "synthetic" and len(d.tickers) != 1:
            errors.append(f"data.tickers = {list(d.tickers)}: the options task prices one underlying; name exactly "
                          "its price history (e.g. [^GSPC] for SPX options)")
        errors.extend(p for key in ("rate_ticker", "vol_index")
                      if getattr(o, key) and (p := names.ticker_problem(getattr(o, key), f"options.{key}")))
        if o.min_days >= o.max_days:
            errors.append(f"options.max_days = {o.max_days}: must be above options.min_days = {o.min_days}")
        for key, edges in (("moneyness_buckets", o.moneyness_buckets), ("maturity_buckets", o.maturity_buckets)):
            if list(edges) != sorted(set(edges)):
                errors.append(f"options.{key} = {list(edges)}: edges must be strictly increasing")
    b = cfg.backtest
    if b.start and b.end and not b.start < b.end:
        errors.append(f"backtest.end = {b.end}: must be after backtest.start = {b.start}")
    if b.clips:
        sections = [repr(clip_section(c)) for c in b.clips]
        seen: dict[str, int] = {}
        for i, x in enumerate(sections, 1):
            if x in seen:
                errors.append(f"backtest.clips: entries {seen[x]} and {i} are the same clip config "
                              f"({b.clips[i - 1].method}), listed twice")
            seen.setdefault(x, i)


def build_section(cls: type, raw: Any, prefix: str, errors: list[str]) -> Any:
    """Check one mapping against a config dataclass (e.g. a study spec's ``study:`` section), appending one
    line per problem to ``errors``; returns the built (or default) instance."""
    return _build(cls, raw, prefix, errors)


def from_dict(raw: Any, source: str = "<config>") -> PipelineConfig:
    """Build and check a PipelineConfig; raise ConfigError listing every problem found."""
    errors: list[str] = []
    cfg = _build(PipelineConfig, _entries_over_clip(raw), "", errors)
    if not errors:
        _cross_checks(cfg, errors)
    if errors:
        raise ConfigError(f"invalid config {source}:\n  " + "\n  ".join(errors))
    return cfg


def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.lr=3e-3' -> (['train', 'lr'], '3e-3' parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. --set train.lr=3e-3")
    key, _, value = text.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {text!r}: expected a dotted key such as train.lr")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    return key.split("."), parsed


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Return a copy of raw with each 'a.b.c=value' set; the result is checked by from_dict."""
    out = _deepcopy(raw)
    for text in overrides:
        path, value = parse_override(text)
        set_key(out, path, value, f"--set {text!r}")
    return out


def set_key(raw: dict, path: list[str], value: Any, where: str) -> None:
    """Set raw[a][b][c] = value for path [a, b, c] in a raw (YAML) mapping, creating sections on the way;
    ``where`` names the source in the error when a section on the path is a value."""
    node = raw
    for i, part in enumerate(path[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{where}: '{'.'.join(path[: i + 1])}' is a value, not a section")
        node = child
    node[path[-1]] = value


def _deepcopy(raw: Any) -> Any:
    if isinstance(raw, dict):
        return {k: _deepcopy(v) for k, v in raw.items()}
    if isinstance(raw, list):
        return [_deepcopy(v) for v in raw]
    return raw


def load(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """Load a pipeline spec, apply --set overrides, check everything."""
    raw = apply_overrides(read_yaml(path), list(overrides))
    src = str(path) + (" with --set " + " ".join(overrides) if overrides else "")
    return from_dict(raw, src)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{'train': {'lr': 1e-3}} -> {'train.lr': 1e-3}."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def dump_yaml(cfg: PipelineConfig) -> str:
    """The config as YAML (every run's config.yaml): libyaml's emitter where PyYAML has it, the same text ~4x as
    fast as the pure-Python one (a study writes one per run)."""
    return yaml.dump(to_dict(cfg), Dumper=getattr(yaml, "CSafeDumper", yaml.SafeDumper), sort_keys=False)
