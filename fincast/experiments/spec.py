"""Study and sweep specs (layer L4, experiments): reading a spec with its --set overrides, merging
sections, and the hash that tells a run's computation apart."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from fincast import config as config_mod
from fincast.clipping import threshold_keys
from fincast.config import ConfigError, PipelineConfig

# the threshold a sweep searches for each clip method
THRESHOLD_KEYS = threshold_keys()  # clip.norm.max_norm, clip.autoclip.percentile, ... (from the methods' registry)


SWEEP_TAG, TRIAL_TAG = "fincast.sweep", "fincast.sweep_trial"

# keys that do not change what a run computes (so they are left out of its hash)
_UNHASHED = ("tracking.", "train.threads", "train.checkpoint", "train.checkpoint_every", "train.checkpoint_dir",
             "backtest.")


def _merge(base: Any, extra: Any) -> Any:
    if isinstance(base, dict) and isinstance(extra, dict):
        out = dict(base)
        for k, v in extra.items():
            out[k] = _merge(base.get(k), v)
        return out
    return extra


def read_spec(path: str | Path, overrides: list[str] | tuple[str, ...], keys: tuple[str, ...],
              kind: str) -> tuple[dict, Any, Path | None, list[str]]:
    """(raw spec, name, base pipeline path, errors) of a study or sweep spec: ``--set`` overrides applied (keys of
    the spec change it; any other key is a pipeline key put into its ``set``), then the keys, ``name`` and
    ``base`` checked."""
    path = Path(path)
    raw = config_mod.read_yaml(path)
    for text in overrides:
        key, value = config_mod.parse_override(text)
        if key[0] in keys and key[0] != "set":
            config_mod.set_key(raw, key, value, f"--set {text!r}")
        else:
            raw.setdefault("set", {})
            if not isinstance(raw["set"], dict):
                raise ConfigError(f"{kind} spec {path}: 'set' must be a mapping of pipeline keys to values")
            raw["set"][".".join(key[1:] if key[0] == "set" else key)] = value
    errors = [f"{k}: unknown key; a {kind} spec has: {', '.join(keys)}" for k in raw if k not in keys]
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip():
        errors.append(f"name: required, the {kind}'s name (also its MLflow experiment)")
    elif problem := config_mod.name_problem(name, "name"):
        errors.append(problem)
    base = raw.get("base")
    base_path = None
    if not isinstance(base, str):
        errors.append(f"base: required, the pipeline spec the {kind} trains (e.g. price_crypto.yaml)")
    else:
        base_path = Path(base) if Path(base).is_absolute() else path.parent / base
        if not base_path.is_file():
            errors.append(f"base = {base!r}: no such pipeline spec ({base_path})")
    return raw, name, base_path, errors


def config_hash(cfg: PipelineConfig) -> str:
    """Hash of what a run computes: the resolved config without tracking, threads and checkpoint keys."""
    flat = {k: v for k, v in config_mod.flatten(config_mod.to_dict(cfg)).items() if not k.startswith(_UNHASHED)}
    return hashlib.sha256(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()[:16]


def spec_common(raw: dict, errors: list[str]) -> dict:
    """The spec's ``set``: pipeline keys set for every run (problems into ``errors``)."""
    common = raw.get("set") or {}
    if not isinstance(common, dict):
        errors.append("set: expected a mapping of pipeline keys to values, e.g. {train.optimizer: sgd}")
        return {}
    return common


def base_config(path: Path, base_path: Path, common: dict) -> dict:
    """The base pipeline (raw) with the spec's ``set`` applied key by key (a nested mapping sets its keys, not
    a whole section)."""
    base_raw = config_mod.read_yaml(base_path)
    for key, value in config_mod.flatten({str(k): v for k, v in common.items()}).items():
        config_mod.set_key(base_raw, key.split("."), value, f"{path}: set.{key}")
    return base_raw


def redact(url: str) -> str:
    """The URL without its password (for logs and run params)."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not parseable: say nothing about it
        return url.split("@")[-1]
