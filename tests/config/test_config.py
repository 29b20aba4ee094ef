"""fincast.config: loading the shipped specs, key checking, --set overrides, immutability, round trips."""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from fincast import config as config_mod
from fincast.config import (
    ClipConfig,
    ConfigError,
    PipelineConfig,
    apply_overrides,
    describe_keys,
    dump_yaml,
    flatten,
    from_dict,
    load,
    parse_override,
    to_dict,
)

ROOT = Path(__file__).resolve().parents[2]
SPECS = sorted(p for p in (ROOT / "pipelines").glob("*.yaml")  # study and sweep specs: test_study/test_sweep.py
               if not {"matrix", "search"} & set(yaml.safe_load(p.read_text()) or {}))
SPEC_IDS = [p.name for p in SPECS]


def config_error(raw) -> str:
    with pytest.raises(ConfigError) as info:
        from_dict(raw)
    return str(info.value)


def override(*sets: str) -> PipelineConfig:
    return from_dict(apply_overrides({}, list(sets)))


def _plain(v):
    """Raw YAML value -> what to_dict gives for it (dates as ISO text, lists as lists, numbers as given)."""
    if isinstance(v, dt.date):
        return v.isoformat()
    if isinstance(v, list | tuple):
        return [_plain(x) for x in v]
    return v


# ---------------------------------------------------------------------------------------------
# Shipped specs
# ---------------------------------------------------------------------------------------------


def test_there_are_shipped_specs():
    assert len(SPECS) >= 2, SPECS


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_every_shipped_spec_loads_with_the_values_it_states(spec):
    cfg = load(spec)
    assert isinstance(cfg, PipelineConfig)
    stated = flatten(yaml.safe_load(spec.read_text()))
    loaded = flatten(to_dict(cfg))
    assert stated, spec
    for key, value in stated.items():
        assert key in loaded, key
        assert loaded[key] == _plain(value), (key, loaded[key], value)


# ---------------------------------------------------------------------------------------------
# Unknown keys
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "full_key", "suggestion"), [
    ({"train": {"lrr": 1e-3}}, "train.lrr", "train.lr"),
    ({"train": {"epoch": 3}}, "train.epoch", "train.epochs"),
    ({"clip": {"norm": {"max_nrom": 1.0}}}, "clip.norm.max_nrom", "clip.norm.max_norm"),
    ({"features": {"lookbak": 10}}, "features.lookbak", "features.lookback"),
    ({"data": {"ticker": ["SPY"]}}, "data.ticker", "data.tickers"),
    ({"trian": {"lr": 1e-3}}, "trian", "train"),
    ({"clipp": {"method": "none"}}, "clipp", "clip"),
    ({"modle": {}}, "modle", "model"),
])
def test_unknown_key_names_the_full_key_and_the_closest_valid_one(raw, full_key, suggestion):
    msg = config_error(raw)
    assert f"{full_key}: unknown key" in msg
    assert f"did you mean '{suggestion}'" in msg


def test_unknown_key_far_from_any_valid_key_lists_the_valid_keys_without_a_guess():
    msg = config_error({"train": {"zzzzzzzz": 1}})
    assert "train.zzzzzzzz: unknown key" in msg
    assert "did you mean" not in msg
    for name in ("lr", "epochs", "batch_size", "optimizer"):
        assert name in msg


def test_unknown_key_from_a_set_override_is_caught_with_a_suggestion():
    with pytest.raises(ConfigError) as info:
        load(SPECS[0], ["train.lrr=3e-3"])
    msg = str(info.value)
    assert "train.lrr" in msg and "did you mean 'train.lr'" in msg
    assert "--set train.lrr=3e-3" in msg  # the source names the override


def test_a_section_that_is_not_a_mapping_is_an_error():
    msg = config_error({"train": 5})
    assert "train" in msg and "mapping" in msg


# ---------------------------------------------------------------------------------------------
# Wrong types and out-of-range values
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("section", "key", "value", "fragments"), [
    # wrong type
    ("train", "epochs", "many", ["train.epochs = 'many'", "integer"]),
    ("train", "epochs", 2.5, ["train.epochs = 2.5", "integer"]),
    ("train", "epochs", True, ["train.epochs = True", "integer"]),
    ("train", "lr", "fast", ["train.lr = 'fast'", "number"]),
    ("model", "layer_norm", "maybe", ["model.layer_norm = 'maybe'", "true or false"]),
    ("data", "start", "yesterday", ["data.start = 'yesterday'", "date YYYY-MM-DD"]),
    ("data", "tickers", {"a": 1}, ["data.tickers", "list"]),
    ("clip", "method", "clamp", ["clip.method = 'clamp'", "'none'", "'value'", "'norm'", "'autoclip'", "'agc'",
                                  "'zclip'"]),
    ("train", "optimizer", "lion", ["train.optimizer = 'lion'", "'adamw'", "'sgd'"]),
    ("name", None, ["a"], ["name = ['a']", "string"]),
    # out of range
    ("train", "lr", -1, ["train.lr = -1", "must be > 0"]),
    ("train", "lr", 0, ["train.lr = 0", "must be > 0"]),
    ("train", "lr", 11, ["train.lr = 11", "must be <= 10"]),
    ("clip.norm", "norm_type", 0.5, ["clip.norm.norm_type = 0.5", "must be >= 1"]),
    ("clip.norm", "norm_type", "-inf", ["clip.norm.norm_type = '-inf'", "must be >= 1"]),
    ("features", "val_frac", 1.5, ["features.val_frac = 1.5", "must be < 1"]),
    ("features", "test_frac", 0, ["features.test_frac = 0", "must be > 0"]),
    ("train", "epochs", 0, ["train.epochs = 0", "must be >= 1"]),
    ("model", "dropout", 1.0, ["model.dropout = 1.0", "must be < 1"]),
    ("train", "lr", "nan", ["train.lr = 'nan'", "must be > 0"]),
    ("features", "vol_windows", [1, 5], ["features.vol_windows = [1, 5]", ">= 2"]),
    ("data", "tickers", [], ["data.tickers = []", "at least 1"]),
])
def test_bad_value_names_key_value_and_what_is_allowed(section, key, value, fragments):
    raw: dict = {key: value} if key is not None else value
    for part in reversed(section.split(".")):
        raw = {part: raw}
    msg = config_error(raw)
    for fragment in fragments:
        assert fragment in msg, (fragment, msg)


def test_every_problem_is_reported_in_one_error():
    raw = {
        "trian": {},
        "train": {"lrr": 1, "epochs": "many", "lr": -1},
        "clip": {"norm": {"norm_type": 0.5}},
        "features": {"val_frac": 1.5},
        "model": {"layer_norm": "maybe"},
    }
    msg = config_error(raw)
    expected = ["trian:", "train.lrr:", "train.epochs = 'many'", "train.lr = -1", "clip.norm.norm_type = 0.5",
                "features.val_frac = 1.5", "model.layer_norm = 'maybe'"]
    for fragment in expected:
        assert fragment in msg, (fragment, msg)
    problem_lines = [line for line in msg.splitlines()[1:] if line.strip()]
    assert len(problem_lines) == len(expected), msg


@pytest.mark.parametrize(("raw", "fragments"), [
    ({"features": {"val_frac": 0.5, "test_frac": 0.4}}, ["features.val_frac + features.test_frac", "0.9"]),
    ({"features": {"val_start": "2020-01-01", "test_start": "2019-01-01"}}, ["features.val_start = 2020-01-01",
                                                                           "before features.test_start"]),
    ({"data": {"start": "2020-01-01", "end": "2020-01-01"}}, ["data.end = 2020-01-01", "after data.start"]),
    ({"data": {"source": "csv"}}, ["data.path", "required"]),
    ({"data": {"tickers": ["SPY", "QQQ", "SPY"]}}, ["data.tickers", "duplicate"]),
])
def test_cross_checks(raw, fragments):
    msg = config_error(raw)
    for fragment in fragments:
        assert fragment in msg, (fragment, msg)


# ---------------------------------------------------------------------------------------------
# --set overrides
# ---------------------------------------------------------------------------------------------


def test_pyyaml_reads_3e_minus_3_as_text():
    # the premise of the override test below: without the config's help, 3e-3 would be a string
    assert yaml.safe_load("3e-3") == "3e-3"


@pytest.mark.parametrize("text", ["train.lr=3e-3", "train.lr=0.003", "train.lr=3.0e-3", "train.lr = 3E-3"])
def test_set_float_from_text(text):
    lr = override(text).train.lr
    assert type(lr) is float and lr == 0.003


def test_set_int_and_bool_and_literal():
    cfg = override("train.epochs=5", "model.layer_norm=true", "features.volume=no", "clip.method=Value",
                   "train.max_steps=1_000")
    assert type(cfg.train.epochs) is int and cfg.train.epochs == 5
    assert cfg.model.layer_norm is True
    assert cfg.features.volume is False
    assert cfg.clip.method == "value"
    assert cfg.train.max_steps == 1000


@pytest.mark.parametrize(("value", "expected"), [
    (True, True), ("true", True), ("Yes", True), ("on", True), ("1", True), (1, True),
    (False, False), ("false", False), ("NO", False), (" off ", False), ("0", False), (0, False),
])
def test_bool_spellings(value, expected):
    assert from_dict({"model": {"layer_norm": value}}).model.layer_norm is expected


@pytest.mark.parametrize("text", ["truthy", 2, 0.0, "y"])
def test_bool_rejects_other_values(text):
    assert "model.layer_norm" in config_error({"model": {"layer_norm": text}})


@pytest.mark.parametrize(("text", "tickers"), [
    ("data.tickers=[BTC-USD,ETH-USD]", ("BTC-USD", "ETH-USD")),
    ("data.tickers=[BTC-USD, ETH-USD]", ("BTC-USD", "ETH-USD")),
    ("data.tickers=SPY,QQQ", ("SPY", "QQQ")),
    ("data.tickers=SPY, QQQ, IWM", ("SPY", "QQQ", "IWM")),
    ("data.tickers=SPY", ("SPY",)),
])
def test_set_list(text, tickers):
    assert override(text).data.tickers == tickers


def test_yaml_boolean_words_as_tickers():
    # a bare ON (ON Semiconductor) is a YAML 1.1 boolean: loudly rejected, never silently turned into 'True'
    msg = config_error(yaml.safe_load("data: {tickers: [SPY, ON]}"))
    assert "data.tickers" in msg and "expected a string" in msg
    assert from_dict(yaml.safe_load("data: {tickers: [SPY, 'ON']}")).data.tickers == ("SPY", "ON")
    assert override("data.tickers=SPY,ON").data.tickers == ("SPY", "ON")


def test_set_int_list():
    assert override("features.vol_windows=[3,10,63]").features.vol_windows == (3, 10, 63)
    assert override("features.vol_windows=[]").features.vol_windows == ()


def test_set_null_and_dates():
    cfg = override("data.start=null", "data.end=2021-06-30", "features.val_start=2019-01-01",
                   "features.test_start=2020-01-02", "train.patience=null", "tracking.uri=~")
    assert cfg.data.start is None
    assert cfg.data.end == dt.date(2021, 6, 30)
    assert cfg.features.val_start == dt.date(2019, 1, 1)
    assert cfg.features.test_start == dt.date(2020, 1, 2)
    assert cfg.train.patience is None
    assert cfg.tracking.uri is None
    assert override("data.end=2021-06-30", "data.end=null").data.end is None  # the last --set wins
    # null spelled as text (quoted in YAML) in an optional field
    assert from_dict({"data": {"end": "null"}, "train": {"patience": " None "}}).data.end is None
    assert from_dict({"train": {"patience": "~"}}).train.patience is None
    # ... but not in a required one
    assert "data.cache_dir = None: expected a string" in config_error({"data": {"cache_dir": None}})
    assert "features.lookback = 'null': expected an integer" in config_error({"features": {"lookback": "null"}})


@pytest.mark.parametrize(("text", "value"), [
    ("clip.norm.norm_type=inf", math.inf), ("clip.norm.norm_type=.inf", math.inf),
    ("clip.norm.norm_type=Infinity", math.inf), ("clip.norm.norm_type=1", 1.0), ("clip.norm.norm_type=2", 2.0),
    ("clip.norm.norm_type=3", 3.0),
])
def test_set_norm_type(text, value):
    norm_type = override(text).clip.norm.norm_type
    assert type(norm_type) is float and norm_type == value


def test_set_overrides_the_spec_file_and_keeps_the_rest():
    base = load(SPECS[0])
    cfg = load(SPECS[0], ["train.lr=3e-3", "data.tickers=[BTC-USD,ETH-USD]", "clip.norm.norm_type=inf"])
    assert cfg.train.lr == 0.003
    assert cfg.data.tickers == ("BTC-USD", "ETH-USD")
    assert cfg.clip.norm.norm_type == math.inf
    assert cfg.model == base.model and cfg.features == base.features
    assert dataclasses.replace(cfg.train, lr=base.train.lr) == base.train


def test_apply_overrides_copies_and_creates_sections():
    raw = {"train": {"lr": 0.1}, "data": {"tickers": ["SPY"]}}
    out = apply_overrides(raw, ["train.lr=0.5", "clip.method=none", "data.tickers=[QQQ]"])
    assert raw == {"train": {"lr": 0.1}, "data": {"tickers": ["SPY"]}}  # input untouched
    assert out == {"train": {"lr": 0.5}, "clip": {"method": "none"}, "data": {"tickers": ["QQQ"]}}
    raw = {"features": {"vol_windows": [5, 21]}}
    apply_overrides(raw, [])["features"]["vol_windows"].append(63)  # a deep copy: lists too
    assert raw == {"features": {"vol_windows": [5, 21]}}


def test_set_into_a_value_is_an_error():
    with pytest.raises(ConfigError, match="'name' is a value, not a section"):
        apply_overrides({"name": "x"}, ["name.sub=1"])


def test_overrides_go_through_the_same_checks():
    with pytest.raises(ConfigError) as info:
        from_dict(apply_overrides({}, ["train.lr=-1", "clip.norm.norm_type=0"]))
    assert "train.lr = -1" in str(info.value) and "clip.norm.norm_type = 0" in str(info.value)


@pytest.mark.parametrize("text", ["train.lr", "train.lr 3e-3", "", "=3", "train..lr=1", ".lr=1", "train.=1"])
def test_malformed_set_is_a_clear_error(text):
    with pytest.raises(ConfigError) as info:
        parse_override(text)
    msg = str(info.value)
    assert "--set" in msg and repr(text) in msg
    assert "key=value" in msg or "dotted key" in msg


def test_malformed_set_through_load():
    with pytest.raises(ConfigError, match="expected key=value"):
        load(SPECS[0], ["train.lr"])


def test_parse_override_splits_the_key_and_reads_the_value_as_yaml():
    assert parse_override("a.b.c=[1, 2]") == (["a", "b", "c"], [1, 2])
    assert parse_override("x=a=b") == (["x"], "a=b")  # only the first '=' separates
    assert parse_override("x=") == (["x"], "")


# ---------------------------------------------------------------------------------------------
# Immutability
# ---------------------------------------------------------------------------------------------


def test_configs_are_immutable():
    cfg = load(SPECS[0])
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.lr = 1.0  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.clip = ClipConfig()  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.name = "x"  # type: ignore[misc]
    assert isinstance(cfg.data.tickers, tuple)
    assert isinstance(cfg.features.vol_windows, tuple)
    hash(cfg)  # frozen all the way down: usable as a dict key


# ---------------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------------


def roundtrip(cfg: PipelineConfig) -> PipelineConfig:
    return from_dict(yaml.safe_load(dump_yaml(cfg)))


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_round_trip_of_every_shipped_spec(spec, tmp_path):
    cfg = load(spec)
    assert roundtrip(cfg) == cfg
    saved = tmp_path / "resolved.yaml"  # the resolved config saved with a run loads again as a spec
    saved.write_text(dump_yaml(cfg))
    assert load(saved) == cfg


def test_round_trip_with_overrides():
    cfg = load(SPECS[0], ["train.lr=3e-3", "data.tickers=SPY,QQQ", "data.end=2020-12-31", "clip.norm.norm_type=inf",
                          "features.val_start=2018-01-01", "features.test_start=2019-01-01", "train.max_steps=null",
                          "model.layer_norm=yes", "tracking.uri=sqlite:///x.db"])
    assert cfg.clip.norm.norm_type == math.inf and cfg.data.end == dt.date(2020, 12, 31)
    assert roundtrip(cfg) == cfg


def test_to_dict_is_plain_yaml_data():
    d = to_dict(load(SPECS[0], ["data.end=2020-12-31"]))
    assert d["data"]["end"] == "2020-12-31"
    assert isinstance(d["data"]["tickers"], list)
    yaml.safe_dump(d)  # no Python-specific types


# random valid configs ------------------------------------------------------------------------

_dates = st.dates(min_value=dt.date(1970, 1, 1), max_value=dt.date(2100, 12, 31))
_ticker = st.from_regex(r"\^?[A-Z0-9][A-Z0-9.=_-]{0,8}", fullmatch=True).filter(lambda t: ".." not in t)
_name = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,20}", fullmatch=True).filter(lambda t: ".." not in t)
_text = st.text(max_size=20)
# plain tickers; YAML 1.1 reads a bare ON / NO / YES / OFF as a boolean (see test_yaml_boolean_words_as_tickers)
_plain_ticker = st.from_regex(r"[A-Z]{1,5}(-[A-Z]{2,4})?", fullmatch=True).filter(
    lambda t: t.lower() not in {"yes", "no", "on", "off", "true", "false", "null", "y", "n"})
_pos = st.floats(min_value=0, exclude_min=True, allow_nan=False)  # may be inf
_nonneg = st.floats(min_value=0, allow_nan=False, allow_infinity=False)
_unit_open = st.floats(min_value=0, max_value=1, exclude_max=True)


def _opt(**kw):
    return st.fixed_dictionaries({}, optional=kw)


@st.composite
def valid_raw_configs(draw):
    raw = {}
    data = draw(_opt(
        source=st.sampled_from(["yfinance", "synthetic", "csv"]),
        tickers=st.lists(_ticker, min_size=1, max_size=4, unique=True),
        cache_dir=_text, price=st.sampled_from(["adj_close", "close"]),
        timeout_s=st.floats(min_value=0, max_value=600, exclude_min=True), retries=st.integers(1, 10),
        refresh_after_hours=_nonneg, max_fill_gap=st.integers(0, 30), seed=st.integers(0, 2**63),
        calendar=st.sampled_from(["auto", "equity", "crypto"]),
    ))
    if data.get("source") == "csv":
        data["path"] = draw(_text.filter(bool))
    start, end = draw(st.one_of(st.none(), _dates)), draw(st.one_of(st.none(), _dates))
    if start and end and not start < end:
        start, end = (min(start, end), max(start, end) + dt.timedelta(days=1))
    data.update(start=start, end=end)
    raw["data"] = data

    features = draw(_opt(
        lookback=st.integers(1, 2000), horizon=st.integers(1, 250),
        vol_windows=st.lists(st.integers(2, 500), max_size=4), volume=st.booleans(),
        val_frac=st.floats(0.001, 0.44), test_frac=st.floats(0.001, 0.44), scale_target=st.booleans(),
    ))
    if draw(st.booleans()):
        a, b = sorted(draw(st.lists(_dates, min_size=2, max_size=2, unique=True)))
        features.update(val_start=a, test_start=b)
    raw["features"] = features

    raw["model"] = draw(_opt(
        hidden_size=st.integers(1, 4096), num_layers=st.integers(1, 16), dropout=_unit_open,
        layer_norm=st.booleans(), ridge_alpha=_nonneg,
    ))
    raw["train"] = draw(_opt(
        device=st.sampled_from(["auto", "cpu", "cuda", "mps"]), seed=st.integers(0, 2**32),
        epochs=st.integers(1, 100000), max_steps=st.one_of(st.none(), st.integers(1, 10**9)),
        batch_size=st.integers(1, 1_000_000), lr=st.floats(min_value=0, max_value=10, exclude_min=True),
        optimizer=st.sampled_from(["adamw", "adam", "rmsprop", "sgd"]), weight_decay=_nonneg,
        momentum=_unit_open, schedule=st.sampled_from(["none", "cosine", "step"]),
        warmup_steps=st.integers(0, 10**6), step_size=st.integers(1, 1000),
        gamma=st.floats(min_value=0, max_value=1, exclude_min=True), min_lr_ratio=st.floats(0, 1),
        patience=st.one_of(st.none(), st.integers(1, 1000)), min_delta=_nonneg,
        precision=st.sampled_from(["fp32", "bf16", "fp16"]), checkpoint=st.booleans(),
        checkpoint_every=st.one_of(st.none(), st.integers(1, 10**6)), checkpoint_dir=_text,
    ))
    schedule = {"schedule": st.sampled_from(["constant", "linear", "cosine"]),
                "schedule_start": st.floats(min_value=0, max_value=1e6, exclude_min=True),
                "schedule_steps": st.integers(1, 10**6)}
    raw["clip"] = draw(_opt(
        method=st.sampled_from(["none", "value", "norm", "autoclip", "agc", "zclip"]),
        value=_opt(value=_pos, **schedule),
        norm=_opt(max_norm=_pos, norm_type=st.one_of(st.sampled_from([1.0, 2.0, math.inf]), st.floats(1, 100)),
                  scope=st.sampled_from(["global", "per_layer", "per_param"]), **schedule),
        autoclip=_opt(percentile=st.floats(0, 100), window=st.integers(1, 10**6)),
        agc=_opt(clip_factor=_pos, eps=_pos, skip_output=st.booleans(), **schedule),
        zclip=_opt(alpha=_unit_open.filter(lambda a: a > 0), z_thresh=_pos, warmup=st.integers(1, 10**4),
                   rule=st.sampled_from(["reciprocal", "mean"]), max_norm=st.one_of(st.none(), _pos), eps=_pos),
    ))
    raw["monitor"] = draw(_opt(every=st.one_of(st.none(), st.integers(1, 10**6)),
                               spike_factor=st.floats(min_value=1, max_value=1e6, exclude_min=True),
                               spike_window=st.integers(2, 100000)))
    raw["tracking"] = draw(_opt(
        uri=st.one_of(st.none(), _text), experiment=st.one_of(st.none(), _text), artifact_dir=_text,
        run_name=st.one_of(st.none(), _text), log_every=st.integers(1, 10000), log_model=st.booleans(),
        metric_every=st.integers(1, 100000),
    ))
    if draw(st.booleans()):
        raw["name"] = draw(_name)
    return raw


_NULL_TEXT = {"null", "none", "~"}


def _expected(value):
    """What a raw value should become in to_dict (text that spells null in an optional field aside)."""
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, list):
        return list(value)
    return value


@settings(max_examples=150, deadline=None)
@given(valid_raw_configs())
def test_round_trip_of_random_valid_configs(raw):
    cfg = from_dict(raw)
    # every value given is the value in force
    given_flat, got = flatten(raw), flatten(to_dict(cfg))
    for key, value in given_flat.items():
        if isinstance(value, str) and value.strip().lower() in _NULL_TEXT and got[key] is None:
            continue  # optional text fields read 'null' / '~' / 'none' as null
        assert got[key] == _expected(value), (key, got[key], value)
    assert roundtrip(cfg) == cfg


@settings(max_examples=100, deadline=None)
@given(lr=st.floats(min_value=0, max_value=10, exclude_min=True),
       max_norm=st.floats(min_value=0, exclude_min=True, allow_nan=False),
       epochs=st.integers(1, 100000), day=_dates, layer_norm=st.booleans(),
       tickers=st.lists(_plain_ticker, min_size=1, max_size=4, unique=True))
def test_set_text_of_random_values_gives_exactly_those_values(lr, max_norm, epochs, day, layer_norm, tickers):
    cfg = override(f"train.lr={lr!r}", f"clip.norm.max_norm={max_norm!r}", f"train.epochs={epochs}",
                   f"data.end={day.isoformat()}", "data.start=null", f"model.layer_norm={str(layer_norm).lower()}",
                   "data.tickers=" + ",".join(tickers))
    assert cfg.train.lr == lr and cfg.clip.norm.max_norm == max_norm
    assert cfg.train.epochs == epochs and cfg.data.end == day
    assert cfg.model.layer_norm is layer_norm
    assert cfg.data.tickers == tuple(tickers)
    assert roundtrip(cfg) == cfg


# ---------------------------------------------------------------------------------------------
# describe_keys
# ---------------------------------------------------------------------------------------------


def test_describe_keys_covers_every_leaf_key_once_with_help():
    rows = describe_keys()
    keys = [k for k, _, _ in rows]
    assert len(keys) == len(set(keys))
    assert set(keys) == set(flatten(to_dict(PipelineConfig())))
    for key, _default, help_text in rows:
        assert help_text.strip(), key


def test_describe_keys_defaults_are_the_real_defaults():
    default = PipelineConfig()
    for key, shown, _ in describe_keys():
        assert override(f"{key}={shown}") == default, (key, shown)


@pytest.mark.parametrize("raw, fragments", [
    ({"clip": {"value": 0.5}}, ["clip.value: expected a mapping", "clip.value.value=0.5"]),
    ({"clip": {"norm": 2}}, ["clip.norm: expected a mapping", "clip.norm.max_norm=2", "norm_type"]),
    ({"clip": {"norm": {"percentile": 5}}}, ["clip.norm.percentile: unknown key", "clip.autoclip.percentile"]),
    ({"clip": {"max_norm": 1.0}}, ["clip.max_norm: unknown key", "clip.norm.max_norm", "clip.zclip.max_norm"]),
    ({"clip": {"autoclip": {"percentile": 101}}}, ["clip.autoclip.percentile = 101", "<= 100"]),
    ({"clip": {"norm": {"scope": "layer"}}}, ["clip.norm.scope = 'layer'", "'global'", "'per_layer'", "'per_param'"]),
])
def test_clip_sections_point_to_the_right_key(raw, fragments):
    msg = config_error(raw)
    for fragment in fragments:
        assert fragment in msg, (fragment, msg)


def test_the_reference_lists_every_key_with_type_default_and_rule():
    """docs/config.md's source: one row per key of the schema, in its section, with what the schema says."""
    import re

    text = config_mod.reference_markdown()
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| `([a-z0-9_.]+)` \|.*$", text, re.M)}
    assert set(rows) == {k for k, _, _ in config_mod.describe_keys()}
    # values known from the schema's definition of train.epochs: an integer, default 30, between 1 and 100000
    assert rows["train.epochs"] == "| `train.epochs` | an integer | `30` | >= 1, <= 100000 | maximum epochs |"
    assert "| `train.optimizer` | one of 'adamw', 'adam', 'rmsprop', 'sgd' | `'adamw'` |" in rows["train.optimizer"]
    assert "`null`" in rows["train.max_steps"] and ">= 1" in rows["train.max_steps"]
    sections = re.findall(r"^## (.+)$", text, re.M)
    assert sections[:3] == ["top level", "data", "features"] and len(sections) == len(set(sections))
    assert text.index("`train.epochs`") > text.index("## train") > text.index("## model")
