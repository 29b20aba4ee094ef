"""Threshold sweeps (fincast sweep) and the clipping advisor (fincast advise-clip): spec loading, grid expansion,
sampled trials within their bounds, the divergence penalty, resuming, the fit on_epoch hook, the advisor's
proposals, and the CLI. Every sweep trains tiny synthetic pipelines into temporary MLflow and Optuna stores."""

from __future__ import annotations

import itertools
import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from tiny_study import TINY  # the tiny synthetic pipeline of the study tests

from fincast.clipping import MIN_ADVICE_STEPS, advise_thresholds
from fincast.config import ConfigError, FincastError, TrackingConfig
from fincast.experiments import sweep as sw

ROOT = Path(__file__).resolve().parents[2]
# fincast.sweep silences these at import; pytest restores the warning filters for every test
pytestmark = [pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning"),
              pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used")]

PIPELINE = ROOT / "pipelines" / "price_crypto.yaml"
COMMON_SET = {"data.tickers": ["BTC-USD"], "train.checkpoint": False, "tracking.log_model": False,
              "train.optimizer": "sgd"}


def write_spec(tmp_path: Path, search: dict, sweep: dict | None = None, name: str = "tiny_sweep",
               extra: dict | None = None) -> Path:
    spec = {"name": name, "base": str(PIPELINE), "set": dict(COMMON_SET), "search": search,
            "sweep": {"workers": 1, **(sweep or {})}, **(extra or {})}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture(scope="session")
def empty_stores(tmp_path_factory) -> Path:
    """An empty, migrated MLflow store and Optuna storage, made once: creating an MLflow SQLite store runs its
    schema migrations (seconds), so each test copies these files instead."""
    import optuna
    from mlflow.tracking import MlflowClient

    folder = tmp_path_factory.mktemp("empty_stores")
    MlflowClient(f"sqlite:///{folder / 'mlflow.db'}").search_experiments()
    optuna.storages.RDBStorage(f"sqlite:///{folder / 'optuna.db'}").engine.dispose()
    return folder


@pytest.fixture
def stores(tmp_path, empty_stores) -> SimpleNamespace:
    """Fresh stores in tmp_path: the MLflow tracking URI, the Optuna storage URL and the --set overrides that
    point a pipeline at them."""
    for f in ("mlflow.db", "optuna.db"):
        shutil.copy(empty_stores / f, tmp_path / f)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return SimpleNamespace(uri=uri, storage=f"sqlite:///{tmp_path / 'optuna.db'}",
                           tracking=TrackingConfig(uri=uri),
                           overrides=[*TINY, f"tracking.uri={uri}", f"tracking.artifact_dir={tmp_path / 'art'}"])


def load_study(storage: str, name: str):
    import optuna

    return optuna.load_study(study_name=name, storage=storage)


def finished(study) -> list:
    return [t for t in study.get_trials(deepcopy=False) if t.state in sw.FINISHED]


def children(uri: str, parent_run_id: str) -> list:
    from fincast import tracking

    return tracking.child_runs(uri, parent_run_id)


def check_runs_match_trials(stores: SimpleNamespace, study, parent_run_id: str) -> None:
    """Every finished trial has exactly one FINISHED MLflow child run of the parent (its fincast.run_id), whose
    logged config has the trial's parameters; there are no other child runs."""
    assert study.user_attrs["fincast.parent_run_id"] == parent_run_id
    runs = children(stores.uri, parent_run_id)
    done = finished(study)
    assert len(runs) == len(done)
    assert all(r.info.status == "FINISHED" for r in runs)
    by_number = {int(r.data.tags[sw.TRIAL_TAG]): r for r in runs}
    assert len(by_number) == len(runs)  # distinct trial tags
    assert set(by_number) == {t.number for t in done}
    for t in done:
        run = by_number[t.number]
        assert t.user_attrs["fincast.run_id"] == run.info.run_id
        for key, value in t.params.items():
            logged = run.data.params[key]
            assert (logged == value) if isinstance(value, str) else float(logged) == pytest.approx(value, rel=1e-12)


def canon(params: dict) -> tuple:
    """A hashable form of a trial's parameters (floats to 10 significant digits)."""
    return tuple(sorted((k, v if isinstance(v, str) else float(f"{v:.10g}")) for k, v in params.items()))


# ---------------------------------------------------------------------------------------------
# Loading a spec
# ---------------------------------------------------------------------------------------------

SEARCH = {"clip": {"none": {}, "norm": {"low": 0.05, "high": 2.0}}}


@pytest.mark.parametrize(("overrides", "expected"), [
    (["search.clip.nrom={low: 1, high: 2}"], "search.clip.nrom: unknown clip method"),
    (["search.clip.norm={low: 2, high: 1}"], "search.clip.norm = {'low': 2, 'high': 1}: need 0 < low < high"),
    (["search.clip.norm={low: 1, high: 1}"], "search.clip.norm = {'low': 1, 'high': 1}: need 0 < low < high"),
    (["search.clip.norm={low: 0, high: 1}"], "search.clip.norm = {'low': 0, 'high': 1}: need 0 < low < high"),
    (["search.clip.norm={low: -1, high: 1}"], "search.clip.norm = {'low': -1, 'high': 1}: need 0 < low < high"),
    (["search.clip.norm={lo: 1, high: 2}"], "search.clip.norm: unknown key(s) lo"),
    (["search.clip.norm={}"], "search.clip.norm: give the range of clip.norm.max_norm"),
    (["search.clip.none={low: 1, high: 2}"], "search.clip.none = {'low': 1, 'high': 2}: unclipped training"),
    (["search.clip.zclip=[2, 2]"], "search.clip.zclip = [2, 2]: values must be distinct"),
    (["search.clip.zclip=[0, 2]"], "search.clip.zclip = [0, 2]: values must be distinct numbers > 0"),
    (["search.clip.autoclip={low: 50, high: 120}"], "search.clip.autoclip at 120: clip.autoclip.percentile"),
    (["search.clip.autoclip=[5, 101]"], "search.clip.autoclip at 101: clip.autoclip.percentile"),
    (["search.lr={low: 0.1, high: 20}"], "search.lr at 20: train.lr"),
    (["search.lr=[0.1, 11]"], "search.lr at 11: train.lr"),
    (["search.foo=1"], "search.foo: unknown key"),
    (["sweep.range=advised", "search.clip={none: {}, zclip: [1, 2]}"], "sweep.range = advised"),
    (["sweep.sampler=grd"], "sweep.sampler"),
    (["sweep.worker=2"], "sweep.worker"),
    (["sweep.trials=0"], "sweep.trials"),
    (["swep.trials=3"], "swep: unknown key"),  # not a spec key: a pipeline key for every trial, and unknown there
])
def test_bad_specs_name_the_key(tmp_path, overrides, expected):
    path = write_spec(tmp_path, SEARCH)
    with pytest.raises(ConfigError) as err:
        sw.load(path, overrides)
    assert expected in str(err.value) and str(path) in str(err.value)


def test_unknown_spec_key_in_the_file_is_named(tmp_path):
    path = write_spec(tmp_path, SEARCH, extra={"serach": {"lr": {"low": 0.1, "high": 1}}})
    with pytest.raises(ConfigError, match=r"serach: unknown key; a sweep spec has: name, base"):
        sw.load(path)


def test_advised_range_needs_norm_and_a_missing_search_is_named(tmp_path):
    path = write_spec(tmp_path, {"clip": {"none": {}, "agc": [0.01, 0.1]}}, {"range": "advised"})
    with pytest.raises(ConfigError, match="add norm to search.clip"):
        sw.load(path)
    path = write_spec(tmp_path, {"lr": {"low": 0.1, "high": 1}})
    with pytest.raises(ConfigError, match="search.clip: required"):
        sw.load(path)


def test_a_good_spec_sets_pipeline_keys_and_spec_keys(tmp_path, stores):
    path = write_spec(tmp_path, SEARCH)
    s = sw.load(path, [*stores.overrides, "sweep.trials=7", "train.momentum=0.5", "name=renamed"])
    assert (s.name, s.trials, s.settings.workers) == ("renamed", 7, 1)
    assert s.base_cfg.train.momentum == 0.5 and s.base_cfg.train.optimizer == "sgd"
    assert s.base_cfg.data.source == "synthetic"
    cfg = sw.trial_config(s, {"clip.method": "norm", "clip.norm.max_norm": 0.3, "train.lr": 0.02}, number=3)
    assert (cfg.clip.method, cfg.clip.norm.max_norm, cfg.train.lr) == ("norm", 0.3, 0.02)
    assert cfg.tracking.experiment == "renamed" and cfg.train.momentum == 0.5


def _expected_grid(methods: dict, lr, points: int) -> list[tuple]:
    """The grid computed independently: for each method, the product of its threshold's points and the lrs."""
    def axis(raw):
        if isinstance(raw, dict):
            return [float(v) for v in np.geomspace(raw["low"], raw["high"], points)]
        return [float(v) for v in raw]

    lrs = axis(lr) if lr is not None else [None]
    out = []
    for method, raw in methods.items():
        thresholds = [None] if method == "none" else axis(raw)
        for thr, rate in itertools.product(thresholds, lrs):
            p = {"clip.method": method}
            if thr is not None:
                p[sw.THRESHOLD_KEYS[method]] = thr
            if rate is not None:
                p["train.lr"] = rate
            out.append(canon(p))
    return out


@pytest.mark.parametrize("points", [2, 3, 5])
def test_grid_is_exactly_the_product_of_its_axes(tmp_path, points):
    methods = {"none": {}, "norm": {"low": 0.01, "high": 10}, "zclip": [1.5, 2.5, 4],
               "agc": {"low": 0.003, "high": 0.3}}
    lr = {"low": 0.05, "high": 3}
    path = write_spec(tmp_path, {"clip": methods, "lr": lr}, {"sampler": "grid", "grid_points": points, "trials": 2})
    s = sw.load(path)
    grid = [canon(p) for p in s.grid()]
    expected = _expected_grid(methods, lr, points)
    n_lr = points
    assert len(grid) == len(expected) == n_lr * (1 + points + 3 + points)
    assert len(set(grid)) == len(grid)  # no point twice
    assert set(grid) == set(expected)
    assert s.trials == len(grid)  # the grid sampler runs its whole grid, whatever sweep.trials says
    # both ends of every range are grid points
    norms = [dict(p)["clip.norm.max_norm"] for p in grid if dict(p)["clip.method"] == "norm"]
    lrs = {dict(p)["train.lr"] for p in grid}
    assert min(norms) == pytest.approx(0.01) and max(norms) == pytest.approx(10)
    assert min(lrs) == pytest.approx(0.05) and max(lrs) == pytest.approx(3)


def test_grid_without_lr_axis_keeps_the_base_lr(tmp_path):
    methods = {"none": {}, "value": [0.1, 1.0]}
    s = sw.load(write_spec(tmp_path, {"clip": methods}, {"sampler": "grid"}))
    assert {canon(p) for p in s.grid()} == set(_expected_grid(methods, None, 4))
    assert len(s.grid()) == 3
    assert all("train.lr" not in p for p in s.grid())


# ---------------------------------------------------------------------------------------------
# Pure parts: the objective, worker planning
# ---------------------------------------------------------------------------------------------


def _outcome(best: float, diverged: bool, zero: float):
    return SimpleNamespace(fit=SimpleNamespace(best_val_loss=best, diverged=diverged), zero_val_loss=zero)


@pytest.mark.parametrize(("best", "diverged", "expect_penalty"), [
    (0.42, False, False),
    (0.42, True, True),         # non-finite after a good epoch: still penalised
    (math.inf, False, True),    # never validated finitely
    (math.nan, False, True),
    (math.inf, True, True),
])
def test_objective_is_best_val_loss_or_the_penalty(best, diverged, expect_penalty):
    zero, penalty = 0.8, 7.5
    value, flagged = sw.objective(_outcome(best, diverged, zero), penalty)
    assert flagged is expect_penalty
    assert value == (penalty * zero if expect_penalty else best)


@pytest.mark.parametrize(("overrides", "gpus", "cores", "expected"), [
    (["sweep.workers=3"], 2, 8, (3, 2, [0, 1, 0])),             # round robin over the GPUs
    (["sweep.workers=5"], 2, 8, (5, 1, [0, 1, 0, 1, 0])),
    ([], 2, 8, (2, 4, [0, 1])),                                # null: one worker per GPU
    ([], 0, 8, (8, 1, [None] * 8)),                            # no GPU: one per core
    (["sweep.trials=3"], 0, 8, (3, 2, [None] * 3)),            # never more workers than trials
    ([], 3, 8, (3, 2, [0, 1, 2])),
    (["train.device=cpu"], 2, 4, (4, 1, [None] * 4)),          # a CPU pipeline ignores the GPUs
    (["sweep.workers=2", "sweep.threads=3"], 1, 8, (2, 3, [0, 0])),
])
def test_plan_workers(tmp_path, monkeypatch, overrides, gpus, cores, expected):
    from fincast.experiments import workers

    monkeypatch.setattr(workers, "cores", lambda: cores)
    path = write_spec(tmp_path, SEARCH, {"trials": 30, "workers": None})
    s = sw.load(path, overrides)
    workers, threads, assigned = sw.plan_workers(s, gpus)
    assert (workers, threads, assigned) == expected
    # the rule itself, independently: worker i on GPU i mod gpus
    if assigned[0] is not None:
        assert assigned == [i % gpus for i in range(workers)]


# ---------------------------------------------------------------------------------------------
# Sweeps end to end (in this process, one worker)
# ---------------------------------------------------------------------------------------------


def test_grid_sweep_runs_every_point_exactly_once(tmp_path, stores):
    methods = {"none": {}, "norm": {"low": 0.1, "high": 1.0}}
    lr = [0.02, 0.05]
    path = write_spec(tmp_path, {"clip": methods, "lr": lr}, {"sampler": "grid", "grid_points": 2, "pruner": "none"})
    s = sw.load(path, stores.overrides)
    out = sw.run(s, storage=stores.storage, out_dir=tmp_path / "reports")
    expected = _expected_grid(methods, lr, 2)
    assert out.target == len(expected) and out.complete + out.pruned == len(expected) and out.failed == []
    study = load_study(stores.storage, "tiny_sweep")
    done = finished(study)
    assert len(study.trials) == len(done) == len(expected)  # nothing failed, nothing extra
    params = [canon(t.params) for t in done]
    assert sorted(params) == sorted(expected)  # each grid point once
    check_runs_match_trials(stores, study, out.parent_run_id)
    assert len(out.trials) == len(expected) and set(out.trials["run_id"]) == {
        t.user_attrs["fincast.run_id"] for t in done}
    assert out.best is not None and out.best["value"] == min(t.value for t in done)
    assert (out.folder / "trials.csv").is_file() and (out.folder / "objective_vs_threshold.png").stat().st_size > 0

    again = sw.run(s, storage=stores.storage, out_dir=tmp_path / "reports")  # nothing left to do
    assert (again.finished_before, again.trained_now) == (len(expected), 0)
    assert len(load_study(stores.storage, "tiny_sweep").trials) == len(expected)
    assert len(children(stores.uri, out.parent_run_id)) == len(expected)


@pytest.mark.parametrize("sampler", ["random", "tpe"])
def test_sampled_trials_stay_within_the_search_space(tmp_path, stores, sampler):
    norm, zclip, lr = {"low": 0.05, "high": 2.0}, [1.5, 3.0], {"low": 0.005, "high": 0.05}
    n = 4
    path = write_spec(tmp_path, {"clip": {"none": {}, "norm": norm, "zclip": zclip}, "lr": lr},
                      {"sampler": sampler, "trials": n, "seed": 3})
    s = sw.load(path, stores.overrides)
    out = sw.run(s, storage=stores.storage, out_dir=tmp_path / "reports")
    assert out.complete + out.pruned == n and out.trained_now == n and out.failed == []
    study = load_study(stores.storage, "tiny_sweep")
    done = finished(study)
    assert len(study.trials) == len(done) == n
    for t in done:
        p = t.params
        method = p["clip.method"]
        assert method in ("none", "norm", "zclip")
        assert lr["low"] <= p["train.lr"] <= lr["high"]
        if method == "none":
            assert set(p) == {"clip.method", "train.lr"}
        elif method == "norm":
            assert set(p) == {"clip.method", "clip.norm.max_norm", "train.lr"}
            assert norm["low"] <= p["clip.norm.max_norm"] <= norm["high"]
        else:
            assert set(p) == {"clip.method", "clip.zclip.z_thresh", "train.lr"}
            assert p["clip.zclip.z_thresh"] in zclip
    assert len({t.params["train.lr"] for t in done}) == n  # lr is searched, not the base's
    # ranges are searched log-uniformly on exactly their bounds; value lists are categorical
    for t in done:
        for key, dist in t.distributions.items():
            if key in ("train.lr", "clip.norm.max_norm"):
                bounds = lr if key == "train.lr" else norm
                assert (dist.low, dist.high, dist.log) == (bounds["low"], bounds["high"], True)
            elif key == "clip.zclip.z_thresh":
                assert list(dist.choices) == zclip
    check_runs_match_trials(stores, study, out.parent_run_id)


def test_a_diverged_trial_is_penalised_and_a_resume_extends_the_budget(tmp_path, stores):
    """Unclipped SGD at lr 10 goes non-finite: the trial completes with penalty x its zero-forecast loss
    and the sweep ends normally. A changed search is refused naming the fix; a larger sweep.trials resumes."""
    path = write_spec(tmp_path, {"clip": {"none": {}}},
                      {"sampler": "random", "trials": 1, "divergence_penalty": 7.0, "pruner": "none"})
    over = [*stores.overrides, "train.lr=10", "train.batch_size=16"]
    s = sw.load(path, over)
    out = sw.run(s, storage=stores.storage, out_dir=tmp_path / "reports")
    assert (out.complete, out.pruned, out.diverged, out.failed) == (1, 0, 1, [])
    study = load_study(stores.storage, "tiny_sweep")
    (t,) = study.trials
    assert t.state.name == "COMPLETE" and t.user_attrs["fincast.diverged"] is True
    zero = t.user_attrs["fincast.zero_val_loss"]
    assert math.isfinite(zero) and zero > 0
    assert t.value == pytest.approx(7.0 * zero, rel=1e-12)
    assert t.user_attrs["fincast.stop_reason"] == "diverged"
    check_runs_match_trials(stores, study, out.parent_run_id)

    # the search, the sweep settings or the base pipeline changed: refused before any work, naming the fix
    for changed in (["search.clip.norm={low: 0.1, high: 1}"], ["sweep.divergence_penalty=3"],
                    ["train.batch_size=32"]):
        with pytest.raises(FincastError) as err:
            sw.run(sw.load(path, [*over, *changed]), storage=stores.storage, out_dir=tmp_path / "reports")
        msg = str(err.value)
        assert "--set name=tiny_sweep_2" in msg and "optuna delete-study --study-name tiny_sweep" in msg
    assert len(load_study(stores.storage, "tiny_sweep").trials) == 1

    # a larger budget (and other workers/threads) is the same sweep: it goes on
    more = sw.run(sw.load(path, [*over, "sweep.trials=2", "sweep.threads=1"]), storage=stores.storage,
                  out_dir=tmp_path / "reports")
    assert (more.finished_before, more.trained_now, more.complete, more.diverged) == (1, 1, 2, 2)
    assert more.parent_run_id == out.parent_run_id
    study = load_study(stores.storage, "tiny_sweep")
    assert len(finished(study)) == 2
    check_runs_match_trials(stores, study, out.parent_run_id)


# ---------------------------------------------------------------------------------------------
# fit(on_epoch=...)
# ---------------------------------------------------------------------------------------------


def _fit(train_overrides: dict, on_epoch):
    import torch

    from fincast.config import from_dict
    from fincast.features import Split
    from fincast.models import LSTMForecaster
    from fincast.training import fit

    cfg = from_dict({"train": {"epochs": 5, "batch_size": 16, "patience": None, "lr": 1e-2, **train_overrides},
                     "clip": {"method": "none"}})
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 6, 3, generator=g), torch.randn(64, generator=g)
    n = len(y)
    dates = np.arange(n).astype("datetime64[D]")
    split = Split(x.numpy(), y.numpy(), y.numpy().astype(float), np.ones(n), dates, dates + 1,
                  np.full(n, "T", dtype=object))
    torch.manual_seed(0)
    model = LSTMForecaster(3, 4)
    return fit(model, split, split, cfg.train, cfg.clip, device=torch.device("cpu"), on_epoch=on_epoch)


def test_on_epoch_sees_every_validation_and_can_prune():
    seen = []
    full = _fit({}, lambda epoch, val: seen.append((epoch, val)) or False)
    assert full.stop_reason == "epochs" and full.epochs == 5
    assert [e for e, _ in seen] == [1, 2, 3, 4, 5]
    assert [v for _, v in seen] == full.val_history

    calls = []

    def prune_at_2(epoch, val):
        calls.append(epoch)
        return epoch == 2

    pruned = _fit({}, prune_at_2)
    assert pruned.stop_reason == "pruned" and pruned.epochs == 2 and calls == [1, 2]
    assert pruned.steps == 2 * math.ceil(64 / 16)
    assert pruned.val_history == pytest.approx(full.val_history[:2], rel=1e-6)


@pytest.mark.parametrize(("train", "reason", "epochs"), [
    ({"epochs": 2}, "epochs", 2),          # True at the last epoch: training simply ended
    ({"max_steps": 8}, "max_steps", 2),    # max_steps stops at the same epoch: its reason wins
])
def test_pruning_never_replaces_another_stop(train, reason, epochs):
    seen = []

    def at_the_end(epoch, val):
        seen.append(epoch)
        return epoch == epochs

    out = _fit(train, at_the_end)
    assert (out.stop_reason, out.epochs) == (reason, epochs)
    assert seen == list(range(1, epochs + 1))


def test_early_stopping_at_the_pruned_epoch_is_early_stopping():
    plain = _fit({"patience": 1, "lr": 0.5}, None)
    assert plain.stop_reason == "early_stopping"
    k = plain.epochs
    assert 1 < k < 5  # stops early, and not at the first epoch
    out = _fit({"patience": 1, "lr": 0.5}, lambda epoch, val: epoch == k)
    assert (out.stop_reason, out.epochs) == ("early_stopping", k)
    early = _fit({"patience": 1, "lr": 0.5}, lambda epoch, val: epoch == k - 1)  # one epoch earlier: pruned
    assert (early.stop_reason, early.epochs) == ("pruned", k - 1)


# ---------------------------------------------------------------------------------------------
# The advisor
# ---------------------------------------------------------------------------------------------

norms_st = st.lists(st.floats(min_value=1e-6, max_value=1e6, allow_nan=False, allow_infinity=False),
                    min_size=MIN_ADVICE_STEPS, max_size=120)


def _independent(x: np.ndarray, q: float, multiple: float, fence: float) -> dict:
    logs = np.log(x)
    q1, q3 = np.percentile(logs, 25), np.percentile(logs, 75)
    onset = math.exp(q3 + fence * (q3 - q1))
    return {"percentile": float(np.percentile(x, q)), "median_multiple": multiple * float(np.median(x)),
            "spike_onset": onset}


@settings(max_examples=60, deadline=None)
@given(norms_st, st.floats(0, 100), st.floats(0.1, 10), st.floats(0.1, 4))
def test_advice_matches_its_definition(norms, q, multiple, fence):
    x = np.array(norms)
    a = advise_thresholds(x, percentile=q, multiple=multiple, fence=fence)
    ref = _independent(x, q, multiple, fence)
    assert a.percentile == pytest.approx(ref["percentile"], rel=1e-12)
    assert a.median_multiple == pytest.approx(ref["median_multiple"], rel=1e-12)
    assert a.spike_onset == pytest.approx(ref["spike_onset"], rel=1e-9)
    assert a.spikes == int(np.sum(x > a.spike_onset))
    assert (a.steps, a.median, a.max) == (len(x), float(np.median(x)), float(x.max()))
    assert min(x) <= a.percentile <= max(x)
    assert a.spike_onset >= float(np.median(x)) * (1 - 1e-12)  # the fence lies above the bulk
    low, high = a.sweep_range()
    assert low == pytest.approx(0.5 * min(a.proposals().values())) and high == pytest.approx(
        2 * max(a.proposals().values()))


@settings(max_examples=60, deadline=None)
@given(norms_st, st.floats(1e-3, 1e3), st.floats(0, 100))
def test_advice_is_scale_equivariant(norms, c, q):
    x = np.array(norms)
    a, b = advise_thresholds(x, percentile=q), advise_thresholds(c * x, percentile=q)
    for key in ("percentile", "median_multiple", "spike_onset", "median", "max"):
        assert getattr(b, key) == pytest.approx(c * getattr(a, key), rel=1e-9), key
    # no norm (nearly) on the fence: the same steps are spikes at any scale
    assume(np.all(np.abs(x / a.spike_onset - 1) > 1e-9))
    assert b.spikes == a.spikes


@settings(max_examples=60, deadline=None)
@given(norms_st, st.lists(st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -0.0, -1.5]), max_size=30),
       st.randoms(use_true_random=False))
def test_non_finite_and_non_positive_norms_are_ignored(norms, junk, rnd):
    mixed = list(norms)
    for j in junk:  # at random places, keeping the order of the usable norms
        mixed.insert(rnd.randint(0, len(mixed)), j)
    assert advise_thresholds(mixed) == advise_thresholds(norms)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(1e-3, 1e3), max_size=MIN_ADVICE_STEPS - 1),
       st.lists(st.sampled_from([math.nan, math.inf, 0.0, -2.0]), max_size=40))
def test_fewer_than_the_minimum_usable_norms_is_an_error(norms, junk):
    with pytest.raises(ValueError, match=f"at least {MIN_ADVICE_STEPS}"):
        advise_thresholds(norms + junk)


def test_advice_at_exactly_the_minimum_works():
    a = advise_thresholds(np.arange(1, MIN_ADVICE_STEPS + 1, dtype=float))
    assert a.steps == MIN_ADVICE_STEPS


def test_advise_end_to_end_matches_the_logged_gradient_norms(tmp_path, stores):
    from fincast import config as config_mod
    from fincast import tracking
    from fincast.experiments import advise

    cfg = config_mod.load(PIPELINE, [*stores.overrides, "data.tickers=[BTC-USD]", "tracking.metrics_writer=inline"])
    assert cfg.clip.method != "none"  # the probe is unclipped whatever the pipeline says
    steps = 40
    a = advise.advise(cfg, steps=steps, out_dir=tmp_path / "reports")
    import pandas as pd

    series = pd.read_parquet(tracking.download_artifact(tracking.resolve_uri(stores.tracking), a.run_id,
                                                        "series.parquet", tmp_path / "dl"))  # every step
    assert list(series["step"]) == list(range(1, steps + 1)) and a.steps == steps
    norms = series["norm_pre"].to_numpy()
    logged = tracking.metric_history(a.run_id, "grad/norm_pre", stores.tracking)  # MLflow's, at its cadence
    assert logged and all(v == norms[s - 1] for s, v in logged)
    assert np.all(np.isfinite(norms) & (norms > 0))
    q = cfg.clip.autoclip.percentile
    ref = _independent(norms, q, 2.0, 1.5)
    assert a.advice.percentile == pytest.approx(ref["percentile"], rel=1e-9)
    assert a.advice.median_multiple == pytest.approx(ref["median_multiple"], rel=1e-9)
    assert a.advice.spike_onset == pytest.approx(ref["spike_onset"], rel=1e-9)
    assert a.advice.spikes == int(np.sum(norms > ref["spike_onset"]))

    run = tracking.get_run(a.run_id, stores.tracking)
    assert run.data.params["clip.method"] == "none" and run.data.tags["fincast.kind"] == "advise-clip"
    logged = {k[len("advice/"):]: v for k, v in run.data.metrics.items() if k.startswith("advice/")}
    for key, value in a.advice.proposals().items():
        assert logged[key] == pytest.approx(value, rel=1e-12)
    assert logged["autoclip_p" + f"{q:g}"] == pytest.approx(ref["percentile"], rel=1e-9)
    assert logged["median"] == pytest.approx(float(np.median(norms)), rel=1e-9)

    folder = tmp_path / "reports" / "advise" / cfg.name
    assert a.folder == folder and a.plot == folder / "grad_norms.png"
    assert a.plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    record = json.loads((folder / "advice.json").read_text())
    assert record["run_id"] == a.run_id and record["steps"] == steps
    assert record["proposals"] == pytest.approx(a.advice.proposals(), rel=1e-12)
    csv = (folder / "grad_norms.csv").read_text().splitlines()
    assert csv[0] == "step,grad_norm" and [float(line.split(",")[1]) for line in csv[1:]] == pytest.approx(
        norms.tolist(), rel=1e-12)
    assert {"advice/grad_norms.png", "advice/advice.json", "advice/grad_norms.csv"} <= set(
        tracking.list_artifacts(a.run_id, stores.tracking, "advice"))


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def test_cli_sweep_dry_run_prints_the_grid_and_does_nothing(tmp_path, monkeypatch, capsys):
    from fincast import cli

    monkeypatch.chdir(tmp_path)
    methods = {"none": {}, "norm": {"low": 0.1, "high": 10}, "zclip": [1.5, 3]}
    lr = [0.01, 0.1]
    path = write_spec(tmp_path, {"clip": methods, "lr": lr}, {"sampler": "grid", "grid_points": 3})
    storage = f"sqlite:///{tmp_path / 'dry' / 'optuna.db'}"
    code = cli.main(["sweep", str(path), "--dry-run", "--storage", storage,
                     *[f"--set={o}" for o in TINY], f"--set=tracking.uri=sqlite:///{tmp_path / 'dry' / 'm.db'}"])
    out = capsys.readouterr()
    assert code == 0, out.err
    expected = _expected_grid(methods, lr, 3)
    lines = [line.strip() for line in out.out.splitlines() if line.startswith("    clip.method=")]
    printed = []
    for line in lines:
        p = dict(item.split("=", 1) for item in line.split(", "))
        printed.append(tuple(sorted((k, v if k == "clip.method" else float(v)) for k, v in p.items())))
    assert len(printed) == len(expected) == 12
    # printed to 4 significant digits: match each expected point to one printed point
    remaining = list(printed)
    for point in expected:
        match = [p for p in remaining if [k for k, _ in p] == [k for k, _ in point] and all(
            (a == b) if isinstance(a, str) else b == pytest.approx(a, rel=1e-3) for (_, a), (_, b) in zip(point, p))]
        assert match, point
        remaining.remove(match[0])
    assert f"{len(expected)} trials" in out.out.splitlines()[0]
    assert not (tmp_path / "dry").exists() and not (tmp_path / "optuna.db").exists()


def test_cli_advise_clip_refuses_too_few_steps(tmp_path, monkeypatch, capsys):
    from fincast import cli

    monkeypatch.chdir(tmp_path)
    code = cli.main(["advise-clip", str(PIPELINE), "--steps", "5", "--set", "data.source=synthetic"])
    err = capsys.readouterr().err
    assert code == 2
    assert "--steps 5" in err and "at least 20" in err
    assert list(tmp_path.iterdir()) == []  # no run, no store, no report


def test_cli_sweep_bad_spec_exits_2(tmp_path, monkeypatch, capsys):
    from fincast import cli

    monkeypatch.chdir(tmp_path)
    path = write_spec(tmp_path, SEARCH)
    code = cli.main(["sweep", str(path), "--set", "search.clip.norm={low: 3, high: 1}"])
    assert code == 2 and "need 0 < low < high" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


@pytest.mark.parametrize("spec", sorted((ROOT / "pipelines").glob("sweep_*.yaml")), ids=lambda p: p.name)
def test_shipped_sweep_specs_load_and_search_what_they_state(spec):
    raw = yaml.safe_load(spec.read_text())
    s = sw.load(spec)
    assert s.name == raw["name"] and set(s.methods) == set(raw["search"]["clip"])
    for method, rng in raw["search"]["clip"].items():
        axis = s.methods[method]
        if method == "none":
            assert axis is None
        else:
            assert (axis.low, axis.high) == (rng["low"], rng["high"]) and axis.key == sw.THRESHOLD_KEYS[method]
    assert (s.lr.low, s.lr.high) == (raw["search"]["lr"]["low"], raw["search"]["lr"]["high"])
    assert s.trials == raw["sweep"]["trials"]
    for k, v in raw["set"].items():  # the trials' pipeline keys
        got = s.base_cfg
        for part in k.split("."):
            got = getattr(got, part)
        assert got == (tuple(v) if isinstance(v, list) else v), k
