"""The models of a walk-forward backtest: one LSTM per clip config and training seed, then the baselines."""

from __future__ import annotations

import dataclasses

from fincast.clipping import label as clip_label
from fincast.config import ClipConfig, PipelineConfig

NAIVE, MEAN, RIDGE, BUY_AND_HOLD = "naive", "hist_mean", "ridge", "buy_and_hold"

__all__ = ["BUY_AND_HOLD", "MEAN", "NAIVE", "RIDGE", "SEED_SEP", "clip_configs", "family", "lstm_families", "lstm_name", "lstm_names", "lstm_runs",
           "model_names"]


def lstm_name(clip: ClipConfig) -> str:
    return f"lstm-{clip_label(clip)}"


def clip_configs(cfg: PipelineConfig) -> tuple[ClipConfig, ...]:
    """The LSTMs' clip configs: backtest.clips, else unclipped and the spec's clip (global-norm clipping with
    the spec's clip.norm settings when the spec's clip is none)."""
    if cfg.backtest.clips:
        return cfg.backtest.clips
    none = dataclasses.replace(cfg.clip, method="none")
    clipped = cfg.clip if cfg.clip.method != "none" else dataclasses.replace(cfg.clip, method="norm")
    return (none, clipped)


def lstm_families(cfg: PipelineConfig) -> list[str]:
    """lstm-<clip label> per clip config; distinct configs that share a label (settings the label leaves out,
    e.g. zclip's alpha) are told apart by a suffix: lstm-zclip-z2.5, lstm-zclip-z2.5-2."""
    names: list[str] = []
    for c in clip_configs(cfg):
        name, k = lstm_name(c), 2
        while name in names:
            name, k = f"{lstm_name(c)}-{k}", k + 1
        names.append(name)
    return names


SEED_SEP = "/seed"


def lstm_runs(cfg: PipelineConfig) -> list[tuple[str, ClipConfig, int]]:
    """(model name, clip config, training seed) of every LSTM a fold trains: each clip config once per seed of
    backtest.seeds (train.seed, train.seed + 1, ...), named <family>/seed<s> when there are several seeds, else
    <family>."""
    seeds = [cfg.train.seed + i for i in range(cfg.backtest.seeds)]
    return [(f"{fam}{SEED_SEP}{s}" if len(seeds) > 1 else fam, clip, s)
            for fam, clip in zip(lstm_families(cfg), clip_configs(cfg)) for s in seeds]


def lstm_names(cfg: PipelineConfig) -> list[str]:
    return [name for name, _, _ in lstm_runs(cfg)]


def family(model: str) -> str:
    """The model a seed's LSTM belongs to: lstm-none/seed2 -> lstm-none (other names unchanged)."""
    return model.split(SEED_SEP)[0]


def model_names(cfg: PipelineConfig) -> list[str]:
    return lstm_names(cfg) + [RIDGE, MEAN, NAIVE]
