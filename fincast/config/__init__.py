"""Typed, immutable pipeline configuration (layer L0: imports nothing else from fincast).

A pipeline spec is a YAML file in ``pipelines/``. It is loaded into frozen dataclasses (``schema``), and every
key is checked before any work starts (``build``): unknown keys (with the closest valid key for a typo), wrong
types and out-of-range values each produce one line naming the key, the value and what is allowed.
``--set key=value`` overrides are applied to the raw mapping first, so they go through the same checks.
``to_dict`` gives the resolved config back as plain YAML-able data; it is saved with each run and can be loaded
again as a pipeline spec. ``keys`` lists every key (``fincast keys``) and renders the reference docs/config.md.
"""

from fincast.config.build import (
    apply_overrides,
    build_section,
    dump_yaml,
    flatten,
    from_dict,
    load,
    parse_override,
    set_key,
)
from fincast.config.files import ConfigError, FincastError, atomic_file, atomic_write, read_yaml
from fincast.config.keys import describe_keys, reference_markdown
from fincast.config.names import name_problem, ticker_problem
from fincast.config.schema import (
    CLIP_METHODS,
    AGCConfig,
    AutoClipConfig,
    BacktestConfig,
    ChainColumns,
    ClipConfig,
    DataConfig,
    FeaturesConfig,
    HestonConfig,
    ModelConfig,
    MonitorConfig,
    NormClip,
    OptionsConfig,
    PipelineConfig,
    TrackingConfig,
    TrainConfig,
    ValueClip,
    ZClipConfig,
    clip_section,
    fields,
    short_float,
    to_dict,
)
from fincast.config.settings import StudySettings, SweepSettings

__all__ = ["AGCConfig", "AutoClipConfig", "BacktestConfig", "CLIP_METHODS", "ChainColumns", "ClipConfig", "ConfigError",
           "DataConfig", "FeaturesConfig", "FincastError", "HestonConfig", "ModelConfig", "MonitorConfig", "NormClip",
           "OptionsConfig", "PipelineConfig", "StudySettings", "SweepSettings", "TrackingConfig", "TrainConfig",
           "ValueClip", "ZClipConfig", "apply_overrides", "atomic_file", "atomic_write", "build_section",
           "clip_section", "describe_keys", "dump_yaml", "fields", "flatten", "from_dict", "load", "name_problem", "parse_override",
           "read_yaml", "reference_markdown", "set_key", "short_float", "ticker_problem", "to_dict"]
