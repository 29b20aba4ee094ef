"""fincast.clipping: property tests against independent references.

Every expectation is recomputed here from the ORIGINAL gradients, in float64 (numpy), with plain
formulas written in this file: norms, clipping coefficients, percentiles, AGC's unit bounds, ZClip's
EMAs, threshold schedules, run labels. fincast's own helpers are only ever the code under test. Gradient
lists come from hypothesis: several tensors of varied shapes, scales spanning ~16 orders of magnitude,
some all-zero tensors.

Two APIs are under test. ``clip_gradients(params, cfg, state)`` clips one run's parameters: most
properties are stated through it. ``StackClipper`` clips the stacked gradients ``g`` [K, P] of K runs
(a row per run, what the training engine uses): besides reference checks of its own, its contract is
that each row is clipped exactly as that run alone (a stack of one, or ``clip_gradients`` on the run's
own tensors), bit for bit on the CPU, whatever the other rows' methods, settings and values, and that a
run marked inactive keeps its state. Those equivalence tests compare fincast with itself on purpose;
the run alone is in turn checked against the references above.

Tolerances: fincast computes norms in float32 whatever the gradients' dtype (float64 for float64
gradients), so norms and coefficients agree with the float64 reference to ~1e-7 relative; RTOL = 1e-5
leaves room for that and nothing more.
"""

from __future__ import annotations

import dataclasses
import io
import math

import numpy as np
import pytest
import torch
from hypothesis import assume, currently_in_test_context, given, settings
from hypothesis import strategies as st

from fincast import clipping as C
from fincast.config import CLIP_METHODS, ConfigError, from_dict
from fincast.models.lstm import LSTMForecaster

PROPS = settings(max_examples=60, deadline=None)
SEQS = settings(max_examples=30, deadline=None)  # sequences of steps: fewer, larger examples
STACKS = settings(max_examples=80, deadline=None)  # stacks of runs over several steps

EPS = 1e-6  # torch.nn.utils.clip_grad_norm_'s epsilon: coef = min(1, max_norm / (norm + 1e-6))
RTOL = 1e-5
P_NORMS = [1.0, 2.0, 3.0, 4.5, math.inf]
SCOPES = ["global", "per_layer", "per_param"]
METHODS = ["none", "value", "norm", "autoclip", "agc", "zclip"]
SCHEDULED = {"value": "value", "norm": "max_norm", "agc": "clip_factor"}  # method -> its scheduled bound


# ---------------------------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------------------------

SHAPES = st.lists(st.integers(1, 6), min_size=0, max_size=3).map(tuple)  # scalars up to 3-D
# Overall gradient scale 10**k (times a per-tensor 10**[-2, 2]): elements from ~1e-9 to ~1e11, beyond where a
# naive float32 sum(|g|**4.5) overflows (~3e8); see also test_large_p_norms_do_not_overflow_in_float32.
SCALE = st.integers(-6, 8).map(lambda k: 10.0 ** k)


def log_floats(lo: float, hi: float):
    """10**u, u uniform in [lo, hi]: thresholds over many orders of magnitude."""
    return st.floats(lo, hi).map(lambda u: 10.0 ** u)


def _seeded(draw) -> torch.Generator:
    return torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))


def _tensor(draw, gen, shape, dtype, scale, p_zero=8):
    """N(0, 1) * scale * a per-tensor factor (layers differ in size); all zero one time in ``p_zero``."""
    t = torch.randn(shape, generator=gen, dtype=torch.float64) * (scale * 10.0 ** draw(st.integers(-2, 2)))
    if p_zero and draw(st.integers(0, p_zero - 1)) == 0:
        t.zero_()
    return t.to(dtype)


@st.composite
def grad_lists(draw, dtypes=(torch.float32, torch.float64), max_size=5):
    shapes = draw(st.lists(SHAPES, min_size=1, max_size=max_size))
    dtype = draw(st.sampled_from(dtypes))
    scale = draw(SCALE)
    gen = _seeded(draw)
    return [_tensor(draw, gen, s, dtype, scale) for s in shapes]


def lstm_spec(n_layers: int, hidden: int, n_in: int):
    """(names, shapes, layers) of a stacked LSTM and a linear head, in named_parameters order. ``layers`` is
    the layer each tensor belongs to, written down here (not derived by fincast)."""
    names, shapes, layers = [], [], []
    for k in range(n_layers):
        inp = n_in if k == 0 else hidden
        for leaf, shape in (("weight_ih", (4 * hidden, inp)), ("weight_hh", (4 * hidden, hidden)),
                            ("bias_ih", (4 * hidden,)), ("bias_hh", (4 * hidden,))):
            names.append(f"lstm.{leaf}_l{k}")
            shapes.append(shape)
            layers.append(f"lstm.l{k}")
    names += ["head.weight", "head.bias"]
    shapes += [(1, hidden), (1,)]
    layers += ["head", "head"]
    return names, shapes, layers


LSTM_SIZES = st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 4))


@st.composite
def lstm_grads(draw, dtypes=(torch.float32, torch.float64)):
    """(names, layers, grads) of a fake stacked LSTM and a linear head."""
    names, shapes, layers = lstm_spec(*draw(LSTM_SIZES))
    dtype = draw(st.sampled_from(dtypes))
    scale = draw(SCALE)
    gen = _seeded(draw)
    return names, layers, [_tensor(draw, gen, s, dtype, scale) for s in shapes]


@st.composite
def grad_sequences(draw, min_steps, max_steps, spread=3.0, dtypes=(torch.float32,)):
    """Gradient lists of one fixed set of parameters over several steps; each step's scale varies by up
    to ``spread`` decades around a base scale."""
    shapes = draw(st.lists(SHAPES, min_size=1, max_size=4))
    n = draw(st.integers(min_steps, max_steps))
    dtype = draw(st.sampled_from(dtypes))
    base = 10.0 ** draw(st.integers(-3, 3))
    layer = [10.0 ** draw(st.integers(-1, 1)) for _ in shapes]
    gen = _seeded(draw)
    seq = []
    for _ in range(n):
        step = base * 10.0 ** draw(st.floats(-spread, spread))
        seq.append([(torch.randn(s, generator=gen, dtype=torch.float64) * (step * f)).to(dtype)
                    for s, f in zip(shapes, layer)])
    return seq


@st.composite
def stacked_lists(draw, dtypes=(torch.float32, torch.float64)):
    """K gradient lists of the same shapes (K runs of one model), each run at its own scale."""
    shapes = draw(st.lists(SHAPES, min_size=1, max_size=5))
    dtype = draw(st.sampled_from(dtypes))
    gen = _seeded(draw)
    k = draw(st.integers(1, 4))
    return [[_tensor(draw, gen, s, dtype, draw(SCALE)) for s in shapes] for _ in range(k)]


SCHEDULES = st.fixed_dictionaries({"schedule": st.sampled_from(["constant", "linear", "cosine"]),
                                   "schedule_start": log_floats(-1, 1), "schedule_steps": st.integers(1, 5)})


@st.composite
def clip_configs(draw, methods=tuple(METHODS)):
    """A clip config of any method, settings drawn from small sets where they decide how runs group (norm's p
    and scope, AutoClip's window, ZClip's warmup, AGC's skip_output), so stacks mix groups and share them."""
    method = draw(st.sampled_from(methods))
    if method == "none":
        return clip_cfg("none")
    if method == "value":
        return clip_cfg("value", value=draw(log_floats(-2, 1)), **draw(SCHEDULES))
    if method == "norm":
        return clip_cfg("norm", max_norm=draw(log_floats(-2, 2)),
                        norm_type=draw(st.sampled_from([1.0, 2.0, 3.0, math.inf])),
                        scope=draw(st.sampled_from(SCOPES)), **draw(SCHEDULES))
    if method == "agc":
        return clip_cfg("agc", clip_factor=draw(log_floats(-3, 0)), eps=draw(log_floats(-4, -2)),
                        skip_output=draw(st.booleans()), **draw(SCHEDULES))
    if method == "autoclip":
        percentile = draw(st.one_of(st.sampled_from([0.0, 10.0, 50.0, 100.0]), st.floats(0, 100)))
        return clip_cfg("autoclip", percentile=percentile, window=draw(st.sampled_from([1, 3, 100])))
    return clip_cfg("zclip", alpha=draw(st.floats(0.5, 0.99)), z_thresh=draw(st.floats(0.5, 3.0)),
                    warmup=draw(st.sampled_from([1, 3])), rule=draw(st.sampled_from(["reciprocal", "mean"])),
                    max_norm=draw(st.one_of(st.none(), log_floats(-1, 2))))


@dataclasses.dataclass
class StackCase:
    names: list[str]
    shapes: list[tuple[int, ...]]
    layers: list[str]
    cfgs: list
    weights: torch.Tensor  # [K, P]
    steps: list[tuple[torch.Tensor, list[bool]]]  # per step: gradients [K, P], which runs are active


@st.composite
def stack_cases(draw, methods=tuple(METHODS), max_runs=5, min_steps=1, max_steps=6, all_active=False):
    """K runs of one LSTM with their own clip configs over several steps: gradients [K, P] at each run's own
    scale, with occasional spikes (x50), all-zero rows and non-finite elements; runs inactive now and then."""
    names, shapes, layers = lstm_spec(*draw(LSTM_SIZES))
    k = draw(st.integers(1, max_runs))
    cfgs = [draw(clip_configs(methods)) for _ in range(k)]
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    gen = _seeded(draw)
    sizes = torch.tensor([math.prod(s) for s in shapes])
    base = torch.tensor([10.0 ** draw(st.integers(-2, 2)) for _ in range(k)], dtype=torch.float64)
    per_tensor = torch.tensor([[10.0 ** draw(st.integers(-1, 1)) for _ in shapes] for _ in range(k)],
                              dtype=torch.float64)
    scale = (base.unsqueeze(1) * per_tensor).repeat_interleave(sizes, dim=1)  # [K, P]
    weights = (torch.randn(scale.shape, generator=gen, dtype=torch.float64) * 0.3).to(dtype)
    steps = []
    for _ in range(draw(st.integers(min_steps, max_steps))):
        g = torch.randn(scale.shape, generator=gen, dtype=torch.float64) * scale
        for row in range(k):
            kind = draw(st.integers(0, 19))
            factor = 10.0 ** draw(st.floats(-0.3, 0.3))
            g[row] *= 50.0 * factor if kind < 3 else factor
            if kind == 3:
                g[row] = 0.0
            elif kind == 4:
                bad = draw(st.sampled_from([math.inf, -math.inf, math.nan]))
                g[row, draw(st.integers(0, g.shape[1] - 1))] = bad
        active = [True] * k if all_active else [draw(st.integers(0, 3)) > 0 for _ in range(k)]
        steps.append((g.to(dtype), active))
    return StackCase(names, shapes, layers, cfgs, weights, steps)


# ---------------------------------------------------------------------------------------------
# Reference helpers (float64, nothing from fincast)
# ---------------------------------------------------------------------------------------------


def clone(ts):
    return [t.detach().clone() for t in ts]


def flat64(ts) -> np.ndarray:
    return np.concatenate([t.detach().double().reshape(-1).numpy() for t in ts])


def ref_norm(ts, p: float = 2.0) -> float:
    return float(np.linalg.norm(flat64(ts), ord=p))


def bitwise_equal(a, b) -> bool:
    """Same dtype, shape and bytes (unlike ==, tells -0.0 from 0.0 and nan from nan)."""
    return len(a) == len(b) and all(
        x.dtype == y.dtype and x.shape == y.shape
        and torch.equal(x.detach().contiguous().view(-1).view(torch.uint8),
                        y.detach().contiguous().view(-1).view(torch.uint8))
        for x, y in zip(a, b))


def states_bitwise_equal(a: dict, b: dict) -> bool:
    """Two clipper states (dicts of tensors, and a state_dict's step count) hold the same bits."""
    return a.keys() == b.keys() and all(
        bitwise_equal([a[n]], [b[n]]) if isinstance(a[n], torch.Tensor) else a[n] == b[n] for n in a)


def ulp_close(a: torch.Tensor, b: torch.Tensor, n: int = 1) -> bool:
    """Elementwise within n units in the last place of the tensors' own dtype."""
    x, y = a.detach().numpy(), b.detach().numpy()
    return x.dtype == y.dtype and bool(np.all(np.abs(x - y) <= n * np.spacing(np.maximum(np.abs(x), np.abs(y)))))


def away_from_boundary(ok: bool) -> None:
    """Where float32 rounding could decide (a norm within 1e-5 of its bound), skip a generated example;
    a hand-written one must not be that close."""
    if currently_in_test_context():
        assume(ok)
    else:
        assert ok, "hand-written example too close to a clipping boundary"


def units64(t: torch.Tensor) -> np.ndarray:
    """AGC's units as rows: one per output row (dim 0) of a >= 2-D tensor, the whole tensor otherwise."""
    a = t.detach().double().numpy()
    return a.reshape(1, -1) if a.ndim <= 1 else a.reshape(a.shape[0], -1)


def params_with(grads, weights=None):
    """Parameters (weights given, else ones) whose .grad are copies of ``grads``."""
    out = []
    for i, g in enumerate(grads):
        p = torch.nn.Parameter(weights[i].clone() if weights is not None else torch.ones_like(g))
        p.grad = g.clone()
        out.append(p)
    return out


def set_grads(params, grads):
    for p, g in zip(params, grads):
        p.grad = g.clone()


def grads_of(params):
    return [p.grad for p in params]


def named(params, names=None):
    return [(names[i] if names else f"layer{i}.weight", p) for i, p in enumerate(params)]


def clip_cfg(method: str, **section):
    raw = {"method": method}
    if section:
        raw[method] = section
    return from_dict({"clip": raw}).clip


def layer_index(lay: C.Layout) -> list[int]:
    """The layer of each tensor, from the layout's spans."""
    return [j for j, (a, b) in enumerate(lay.spans) for _ in range(a, b)]


def saved(state) -> dict:
    """The clipper state as checkpointed."""
    return C.state_dict(state)


def emas(state) -> tuple[float, float]:
    d = saved(state)
    return float(d["mean"]), float(d["var"])


def step(params, cfg, state):
    stats, out = C.clip_gradients(params, cfg, state)
    assert out is state
    return stats


def clip_once(grads, cfg, weights=None, names=None):
    """One clip_gradients step of a fresh run over copies of ``grads``: (clipped gradients, stats)."""
    params = params_with(grads, weights)
    stats = step(params, cfg, C.init_state(cfg, named(params, names)))
    return grads_of(params), stats


def stats_row(stats: C.ClipStats) -> torch.Tensor:
    """A ClipStats as the stacked clipper's record row (the columns of C.STATS)."""
    return torch.stack([getattr(stats, name) for name in ("norm_pre", "norm_post", "clipped", "clip_fraction",
                                                          "threshold")])


def ref_groups(scope: str, layers: list[str]) -> list[tuple[int, int]]:
    """Tensor spans [a, b) of each clipping group: all, one per tensor, or one per run of a layer."""
    if scope == "global":
        return [(0, len(layers))]
    if scope == "per_param":
        return [(i, i + 1) for i in range(len(layers))]
    spans: list[list[int]] = []
    for i, lay in enumerate(layers):
        if spans and layers[spans[-1][0]] == lay:
            spans[-1][1] = i + 1
        else:
            spans.append([i, i + 1])
    return [(a, b) for a, b in spans]


def ref_factor(kind: str, step: int, start: float, steps: int) -> float:
    t = min(step / steps, 1.0)
    if kind == "constant":
        return 1.0
    if kind == "linear":
        return (1 - t) * start + t
    return 1 + (start - 1) * 0.5 * (1 + math.cos(math.pi * t))


def ref_threshold(cfg, step: int) -> float:
    """The scheduled bound of value/norm/agc at ``step``; nan for the methods without one."""
    key = SCHEDULED.get(cfg.method)
    if key is None:
        return math.nan
    s = getattr(cfg, cfg.method)
    return getattr(s, key) * ref_factor(s.schedule, step, s.schedule_start, s.schedule_steps)


def split_row(row: torch.Tensor, shapes) -> list[torch.Tensor]:
    """A run's row of stacked gradients back into its tensors (parameter order)."""
    out, at = [], 0
    for s in shapes:
        n = math.prod(s)
        out.append(row[at:at + n].reshape(s).clone())
        at += n
    return out


def as_columns(thr, steps, active, device="cpu"):
    """The per-run inputs of StackClipper.step: thresholds (float64), step counts (long), active (bool)."""
    return (torch.tensor(thr, dtype=torch.float64, device=device),
            torch.tensor(steps, dtype=torch.long, device=device),
            torch.tensor(active, dtype=torch.bool, device=device))


# ---------------------------------------------------------------------------------------------
# Norms and layers
# ---------------------------------------------------------------------------------------------


@PROPS
@given(grads=grad_lists(), p=st.sampled_from(P_NORMS))
def test_global_norm_matches_the_reference(grads, p):
    got = C.global_norm(grads, p)
    expected_dtype = torch.float64 if grads[0].dtype == torch.float64 else torch.float32  # fp16/32 -> float32
    assert got.dim() == 0 and got.dtype == expected_dtype
    np.testing.assert_allclose(got.item(), ref_norm(grads, p), rtol=RTOL)


@PROPS
@given(runs=stacked_lists(), p=st.sampled_from(P_NORMS))
def test_tensor_norms_of_stacked_runs_match_the_reference(runs, p):
    """[K, T]: each run's each tensor's p-norm, each row as that run alone (bit for bit)."""
    lay = C.Layout.of([(f"p{i}", tuple(g.shape)) for i, g in enumerate(runs[0])])
    g = torch.stack([torch.cat([t.reshape(-1) for t in run]) for run in runs])
    got = C.tensor_norms(g, lay, p)
    expected_dtype = torch.float64 if g.dtype == torch.float64 else torch.float32
    assert got.shape == (len(runs), len(runs[0])) and got.dtype == expected_dtype
    for k, run in enumerate(runs):
        np.testing.assert_allclose(got[k].double().numpy(), [ref_norm([t], p) for t in run], rtol=RTOL)
        assert bitwise_equal([got[k]], [C.tensor_norms(g[k:k + 1].clone(), lay, p)[0]])


def test_global_norm_default_is_l2_and_empty_is_zero():
    assert C.global_norm([torch.tensor([3.0]), torch.tensor([[4.0]])]).item() == 5.0
    assert C.global_norm([]).item() == 0.0


@pytest.mark.parametrize("name, layer", [
    ("lstm.weight_ih_l0", "lstm.l0"), ("lstm.weight_hh_l0", "lstm.l0"), ("lstm.bias_ih_l0", "lstm.l0"),
    ("lstm.bias_hh_l0", "lstm.l0"), ("lstm.weight_ih_l1", "lstm.l1"), ("lstm.weight_hr_l2", "lstm.l2"),
    ("lstm.weight_ih_l0_reverse", "lstm.l0_reverse"), ("enc.rnn.weight_hh_l12", "enc.rnn.l12"),
    ("weight_ih_l3", "l3"), ("head.weight", "head"), ("head.bias", "head"), ("blocks.0.fc.weight", "blocks.0.fc"),
    ("w", "w"), ("lstm.weight_l0", "lstm"),
])
def test_layer_name(name, layer):
    assert C.layer_name(name) == layer


def test_layout_of_the_lstm_forecaster():
    model = LSTMForecaster(3, 4, num_layers=2)
    names = [n for n, _ in model.named_parameters()]
    lay = C.Layout.of(list(model.named_parameters()))
    assert lay.names == tuple(names)
    assert lay.layers == ("lstm.l0", "lstm.l1", "head")
    assert lay.spans == ((0, 4), (4, 8), (8, 10))
    assert lay.output == "head"
    assert layer_index(lay) == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2] == lay.layer_of_tensor()
    assert lay.shapes == ((16, 3), (16, 4), (16,), (16,), (16, 4), (16, 4), (16,), (16,), (1, 4), (1,))
    assert lay.offsets[:3] == ((0, 48), (48, 112), (112, 128)) and lay.offsets[-1] == (308, 309)
    assert lay.size == sum(p.numel() for p in model.parameters()) == 309


@PROPS
@given(case=lstm_grads())
def test_layout_groups_tensors_into_their_layers(case):
    names, layers, grads = case
    lay = C.Layout.of(list(zip(names, grads)))
    spans = ref_groups("per_layer", layers)
    assert lay.spans == tuple(spans)
    assert lay.layers == tuple(layers[a] for a, _ in spans)
    assert lay.output == "head"
    assert [lay.layers[j] for j in layer_index(lay)] == layers
    ends = np.cumsum([g.numel() for g in grads]).tolist()
    assert lay.offsets == tuple(zip([0, *ends[:-1]], ends)) and lay.size == ends[-1]
    assert lay == C.Layout.of([(n, tuple(g.shape)) for n, g in zip(names, grads)])  # from shapes alike


# ---------------------------------------------------------------------------------------------
# value: clamp every element
# ---------------------------------------------------------------------------------------------


@PROPS
@given(grads=grad_lists(), value=log_floats(-7, 7))
def test_value_clip_bounds_every_element_and_counts_the_clipped_ones(grads, value):
    after, stats = clip_once(grads, clip_cfg("value", value=value))
    n_over = 0
    for g, g0 in zip(after, grads):
        v = float(torch.tensor(value, dtype=g0.dtype))  # the bound in the gradients' own precision
        a, a0 = g.double(), g0.double()
        assert bool((a.abs() <= v).all())
        inside = a0.abs() <= v
        assert bitwise_equal([g[inside]], [g0[inside]])  # elements within the bound are untouched
        assert torch.equal(a[~inside], a0[~inside].sign() * v)  # the others sit on it, sign kept
        n_over += int((~inside).sum())
    n = sum(g.numel() for g in grads)
    assert stats.clip_fraction.item() == pytest.approx(n_over / n, abs=1e-7)
    assert stats.clipped.item() == float(n_over > 0) == float(not bitwise_equal(after, grads))
    np.testing.assert_allclose(stats.norm_pre.item(), ref_norm(grads), rtol=RTOL)
    np.testing.assert_allclose(stats.norm_post.item(), ref_norm(after), rtol=RTOL)
    np.testing.assert_allclose(stats.threshold.item(), value, rtol=1e-7)


@PROPS
@given(grads=grad_lists(), headroom=st.one_of(st.just(1.0), log_floats(0, 300)))
def test_value_clip_above_every_element_changes_nothing(grads, headroom):
    value = max(float(np.abs(flat64(grads)).max()), 1e-30) * headroom
    after, stats = clip_once(grads, clip_cfg("value", value=value))
    assert bitwise_equal(after, grads)
    assert stats.clipped.item() == 0.0 and stats.clip_fraction.item() == 0.0
    assert torch.equal(stats.norm_pre, stats.norm_post)


@PROPS
@given(grads=grad_lists(), value=log_floats(-7, 7))
def test_value_clip_twice_changes_nothing_more(grads, value):
    cfg = clip_cfg("value", value=value)
    params = params_with(grads)
    state = C.init_state(cfg)
    step(params, cfg, state)
    once = clone(grads_of(params))
    stats = step(params, cfg, state)
    assert bitwise_equal(grads_of(params), once)
    assert stats.clipped.item() == 0.0 and stats.clip_fraction.item() == 0.0


def test_value_clip_known_values():
    grads = [torch.tensor([0.5, -3.0, 2.0]), torch.tensor([[-0.25]])]
    after, stats = clip_once(grads, clip_cfg("value", value=1.0))
    assert after[0].tolist() == [0.5, -1.0, 1.0] and after[1].tolist() == [[-0.25]]
    assert stats.clipped.item() == 1.0 and stats.clip_fraction.item() == 0.5


# ---------------------------------------------------------------------------------------------
# norm: p-norm, global / per layer / per tensor
# ---------------------------------------------------------------------------------------------


def _norm_run(case, max_norm, p, scope):
    names, layers, grads = case
    params = params_with(grads)
    cfg = clip_cfg("norm", max_norm=max_norm, norm_type=p, scope=scope)
    state = C.init_state(cfg, named(params, names))
    return params, cfg, state


@PROPS
@given(case=lstm_grads(), max_norm=log_floats(-4, 4), p=st.sampled_from(P_NORMS), scope=st.sampled_from(SCOPES))
def test_norm_clip_bounds_each_group_and_keeps_its_direction(case, max_norm, p, scope):
    names, layers, grads = case
    groups = ref_groups(scope, layers)
    ratios = [max_norm / (ref_norm(grads[a:b], p) + EPS) for a, b in groups]
    assume(all(abs(r - 1) > 1e-4 for r in ratios))  # away from the boundary, where rounding decides
    coefs = [min(1.0, r) for r in ratios]
    params, cfg, state = _norm_run(case, max_norm, p, scope)
    stats = step(params, cfg, state)
    after = grads_of(params)

    for (a, b), c in zip(groups, coefs):
        # one coefficient per group: clipped = c * original, 0 < c <= 1; the group's p-norm <= max_norm
        for g, g0 in zip(after[a:b], grads[a:b]):
            assert g.dtype == g0.dtype and g.shape == g0.shape
            np.testing.assert_allclose(g.double().numpy(), c * g0.double().numpy(), rtol=RTOL, atol=0)
        assert ref_norm(after[a:b], p) <= max_norm * (1 + RTOL)
        if c == 1.0:
            assert bitwise_equal(after[a:b], grads[a:b])
    n_clipped = sum(c < 1.0 for c in coefs)
    assert stats.clip_fraction.item() == pytest.approx(n_clipped / len(groups), abs=1e-7)
    assert stats.clipped.item() == float(n_clipped > 0) == float(not bitwise_equal(after, grads))
    np.testing.assert_allclose(stats.norm_pre.item(), ref_norm(grads), rtol=RTOL)  # always global L2
    np.testing.assert_allclose(stats.norm_post.item(), ref_norm(after), rtol=RTOL)
    np.testing.assert_allclose(stats.threshold.item(), max_norm, rtol=1e-7)


@PROPS
@given(case=lstm_grads(), headroom=log_floats(0, 30), p=st.sampled_from(P_NORMS), scope=st.sampled_from(SCOPES))
def test_norm_clip_above_every_group_norm_changes_nothing(case, headroom, p, scope):
    names, layers, grads = case
    largest = max(ref_norm(grads[a:b], p) for a, b in ref_groups(scope, layers))
    max_norm = (largest * (1 + 1e-4) + EPS) * headroom
    params, cfg, state = _norm_run(case, max_norm, p, scope)
    stats = step(params, cfg, state)
    assert bitwise_equal(grads_of(params), grads)
    assert stats.clipped.item() == 0.0 and stats.clip_fraction.item() == 0.0
    assert torch.equal(stats.norm_pre, stats.norm_post)


@PROPS
@given(case=lstm_grads(), max_norm=log_floats(-4, 4), p=st.sampled_from(P_NORMS), scope=st.sampled_from(SCOPES))
def test_norm_clip_twice_changes_nothing_more(case, max_norm, p, scope):
    params, cfg, state = _norm_run(case, max_norm, p, scope)
    step(params, cfg, state)
    once = clone(grads_of(params))
    step(params, cfg, state)
    # after one pass each group's norm n1 <= max_norm, so the second coefficient is at least
    # max_norm / (max_norm + EPS): only torch's epsilon can move the gradients again
    for g, g1 in zip(grads_of(params), once):
        np.testing.assert_allclose(g.double().numpy(), g1.double().numpy(), rtol=EPS / max_norm + RTOL, atol=0)


@PROPS
@given(grads=grad_lists(dtypes=(torch.float32,)), max_norm=log_floats(-4, 4))
def test_global_l2_norm_clip_is_torch_clip_grad_norm(grads, max_norm):
    ours, theirs = params_with(grads), params_with(grads)
    cfg = clip_cfg("norm", max_norm=max_norm)  # defaults: L2, global
    stats = step(ours, cfg, C.init_state(cfg))
    total = torch.nn.utils.clip_grad_norm_(theirs, max_norm, norm_type=2.0, foreach=True)
    for p, q in zip(ours, theirs):
        assert bitwise_equal([p.grad], [q.grad])  # the same arithmetic
    assert ulp_close(stats.norm_pre, total, 1)


def test_global_l2_norm_clip_is_torch_clip_grad_norm_for_float64():
    g = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
    ours, theirs = params_with([g]), params_with([g])
    cfg = clip_cfg("norm", max_norm=0.1)
    step(ours, cfg, C.init_state(cfg))
    torch.nn.utils.clip_grad_norm_(theirs, 0.1, foreach=True)
    assert bitwise_equal([ours[0].grad], [theirs[0].grad])


@pytest.mark.parametrize("p, value", [(10.0, 1e4), (4.5, 1e9), (3.0, 1e13)])
def test_large_p_norms_do_not_overflow_in_float32(p, value):
    grads = [torch.full((10,), value)]
    after, stats = clip_once(grads, clip_cfg("norm", max_norm=1.0, norm_type=p))
    true_norm = value * 10 ** (1 / p)
    np.testing.assert_allclose(ref_norm(after, p), 1.0 * true_norm / (true_norm + EPS), rtol=RTOL)
    assert stats.clipped.item() == 1.0


@pytest.mark.parametrize("p, total", [(2.0, 5.0), (1.0, 7.0), (math.inf, 4.0), (3.0, 91.0 ** (1 / 3))])
def test_norm_clip_known_values(p, total):
    g, _ = clip_once([torch.tensor([3.0]), torch.tensor([-4.0])], clip_cfg("norm", max_norm=1.0, norm_type=p))
    c = 1.0 / (total + EPS)
    assert g[0].item() == pytest.approx(3.0 * c, rel=1e-6) and g[1].item() == pytest.approx(-4.0 * c, rel=1e-6)


def test_per_layer_scope_skips_parameters_without_gradients():
    """A frozen layer (no .grad) is left alone and the other layers' groups still line up."""
    torch.manual_seed(0)
    model = LSTMForecaster(3, 4, num_layers=2)
    named_params = list(model.named_parameters())
    layers = ["head" if n.startswith("head.") else f"lstm.l{n[-1]}" for n, _ in named_params]  # lstm.*_l0/_l1
    for n, p in named_params:
        p.grad = None if n.endswith("_l0") else torch.randn_like(p) * 10
    cfg = clip_cfg("norm", max_norm=0.1, scope="per_layer")
    used = [i for i, (_, p) in enumerate(named_params) if p.grad is not None]
    before = {i: named_params[i][1].grad.clone() for i in used}
    stats = step([p for _, p in named_params], cfg, C.init_state(cfg, named_params))
    assert all(p.grad is None for n, p in named_params if n.endswith("_l0"))
    for layer in ("lstm.l1", "head"):
        idx = [i for i in used if layers[i] == layer]
        n0 = ref_norm([before[i] for i in idx])
        for i in idx:
            np.testing.assert_allclose(named_params[i][1].grad.numpy(), before[i].numpy() * 0.1 / (n0 + EPS),
                                       rtol=RTOL)
    assert stats.clip_fraction.item() == 1.0  # two groups, both clipped (no group for the frozen layer)


# ---------------------------------------------------------------------------------------------
# autoclip: percentile of the history of global L2 norms
# ---------------------------------------------------------------------------------------------


@SEQS
@given(seq=grad_sequences(1, 12), window=st.integers(1, 8),
       percentile=st.one_of(st.sampled_from([0.0, 50.0, 100.0]), st.floats(0, 100)))
def test_autoclip_clips_at_the_percentile_of_the_recent_norms(seq, percentile, window):
    cfg = clip_cfg("autoclip", percentile=percentile, window=window)
    params = params_with(seq[0])
    state = C.init_state(cfg)
    history = []
    for t, grads in enumerate(seq):
        set_grads(params, grads)
        stats = step(params, cfg, state)
        after = grads_of(params)
        pre = ref_norm(grads)
        history.append(pre)
        recent = history[-window:]
        thr = float(np.percentile(recent, percentile))
        tol = RTOL * thr + 1e-6 * max(recent)  # float32 interpolation between far-apart norms
        assert abs(stats.threshold.item() - thr) <= tol
        post = ref_norm(after)
        assert post <= thr + tol
        if t == 0:  # the history is this step's norm alone: never clipped
            assert bitwise_equal(after, grads) and stats.clipped.item() == 0.0
        if pre > thr + tol:
            expected = pre * thr / (pre + EPS)
            assert abs(post - expected) <= tol + RTOL * expected
            assert stats.clipped.item() == 1.0
        elif pre < thr - tol:
            assert bitwise_equal(after, grads) and stats.clipped.item() == 0.0
        np.testing.assert_allclose(stats.norm_pre.item(), pre, rtol=RTOL)


@pytest.mark.parametrize("window, thresholds", [(1, [1, 8, 4, 2]), (2, [1, 1, 4, 2]), (3, [1, 1, 1, 2]),
                                                (4, [1, 1, 1, 1]), (100, [1, 1, 1, 1])])
def test_autoclip_window_keeps_only_the_last_norms(window, thresholds):
    cfg = clip_cfg("autoclip", percentile=0, window=window)  # percentile 0: the smallest recent norm
    params = params_with([torch.zeros(2)])
    state = C.init_state(cfg)
    for norm, thr in zip([1.0, 8.0, 4.0, 2.0], thresholds):
        set_grads(params, [torch.tensor([0.6 * norm, -0.8 * norm])])
        stats = step(params, cfg, state)
        assert stats.threshold.item() == pytest.approx(thr, rel=1e-6)
        expected = norm if norm <= thr else norm * thr / (norm + EPS)
        assert ref_norm(grads_of(params)) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("window", [10, 2])
def test_autoclip_history_skips_a_non_finite_norm(window):
    """A non-finite norm is no history: its slot is empty (nan), not the norm it would have replaced."""
    if window == 2:  # a full ring: steps 0, 1 fill it, step 2 (inf) replaces step 0's norm by nothing
        cfg = clip_cfg("autoclip", percentile=0, window=2)
        params = params_with([torch.zeros(2)])
        state = C.init_state(cfg)
        for n, thr in ((1.0, 1.0), (3.0, 1.0), (math.inf, 3.0), (2.0, 2.0)):
            set_grads(params, [torch.tensor([n, 0.0])])
            stats = step(params, cfg, state)
            assert stats.threshold.item() == thr, n  # percentile 0: the smallest finite norm of the last 2
        return
    cfg = clip_cfg("autoclip", percentile=50, window=window)
    params = params_with([torch.zeros(2)])
    state = C.init_state(cfg)
    for n in (1.0, 3.0, math.inf, 2.0):
        set_grads(params, [torch.tensor([n, 0.0])])
        stats = step(params, cfg, state)
    history = saved(state)["history"]
    assert history.shape == (10,)
    assert math.isnan(history[2].item()) and bool(history[4:].isnan().all())
    assert torch.equal(history[[0, 1, 3]], torch.tensor([1.0, 3.0, 2.0]))
    assert stats.threshold.item() == pytest.approx(float(np.percentile([1.0, 3.0, 2.0], 50)))


# ---------------------------------------------------------------------------------------------
# agc: unit-wise, relative to the weights
# ---------------------------------------------------------------------------------------------


@st.composite
def agc_cases(draw):
    """(names, weights, grads, skip_output, skipped): tensors in layers of one or more tensors (the last layer
    is the output); ``skipped`` says, from the names written here, which tensors skip_output leaves alone."""
    shapes = draw(st.lists(st.lists(st.integers(1, 5), max_size=3).map(tuple), min_size=1, max_size=5))
    layer_ids = sorted(draw(st.lists(st.integers(0, 3), min_size=len(shapes), max_size=len(shapes))))
    names = [f"block{j}.p{i}" for i, j in enumerate(layer_ids)]
    skip_output = draw(st.booleans())
    skipped = [skip_output and j == layer_ids[-1] for j in layer_ids]
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    gen = _seeded(draw)
    weights = [_tensor(draw, gen, s, dtype, 10.0 ** draw(st.integers(-3, 1)), p_zero=5) for s in shapes]
    grads = [_tensor(draw, gen, s, dtype, 10.0 ** draw(st.integers(-5, 1))) for s in shapes]
    return names, weights, grads, skip_output, skipped


def check_agc_units(g, g0, w, clip_factor, eps) -> tuple[int, int]:
    """Reference AGC check of one tensor; returns (units, clipped units)."""
    G, G0 = units64(g), units64(g0)
    gn = np.linalg.norm(G0, axis=1)
    bound = clip_factor * np.maximum(np.linalg.norm(units64(w), axis=1), eps)
    away_from_boundary(np.all(np.abs(gn - bound) > 1e-5 * bound))
    over = gn > bound
    assert np.all(np.linalg.norm(G, axis=1) <= bound * (1 + RTOL))
    assert np.array_equal(G[~over], G0[~over])  # units within the bound are unchanged
    # clipped units are rescaled onto the bound, direction kept; as the NFNets reference code, the
    # gradient norm in the denominator is floored at 1e-6 (only matters for tiny bounds)
    coef = bound[over] / np.maximum(gn[over], EPS)
    np.testing.assert_allclose(G[over], coef[:, None] * G0[over], rtol=RTOL, atol=0)
    return len(gn), int(over.sum())


@PROPS
@given(case=agc_cases(), clip_factor=log_floats(-3, 0), eps=log_floats(-5, -1))
def test_agc_bounds_every_unit_by_its_weight_norm(case, clip_factor, eps):
    names, weights, grads, skip_output, skipped = case
    cfg = clip_cfg("agc", clip_factor=clip_factor, eps=eps, skip_output=skip_output)
    after, stats = clip_once(grads, cfg, weights, names)
    n_units = n_clipped = 0
    for g, g0, w, s in zip(after, grads, weights, skipped):
        if s:
            assert bitwise_equal([g], [g0])
            continue
        u, c = check_agc_units(g, g0, w, clip_factor, eps)
        n_units, n_clipped = n_units + u, n_clipped + c
    assert stats.clip_fraction.item() == pytest.approx(n_clipped / max(n_units, 1), abs=1e-7)
    assert stats.clipped.item() == float(n_clipped > 0) == float(not bitwise_equal(after, grads))
    np.testing.assert_allclose(stats.norm_pre.item(), ref_norm(grads), rtol=RTOL)
    np.testing.assert_allclose(stats.norm_post.item(), ref_norm(after), rtol=RTOL)
    np.testing.assert_allclose(stats.threshold.item(), clip_factor, rtol=1e-7)


@pytest.mark.parametrize("skip_output", [True, False])
def test_agc_skip_output_leaves_the_models_head_alone(skip_output):
    torch.manual_seed(0)
    model = LSTMForecaster(3, 4, num_layers=2)
    model(torch.randn(8, 5, 3)).pow(2).mean().mul(1e3).backward()
    named_params = list(model.named_parameters())
    before = {n: p.grad.clone() for n, p in named_params}
    cfg = clip_cfg("agc", clip_factor=1e-3, eps=1e-3, skip_output=skip_output)
    stats = step([p for _, p in named_params], cfg, C.init_state(cfg, named_params))
    n_units = n_clipped = 0
    for n, p in named_params:
        if skip_output and n.startswith("head."):
            assert bitwise_equal([p.grad], [before[n]]), n
            continue
        u, c = check_agc_units(p.grad, before[n], p, 1e-3, 1e-3)
        n_units, n_clipped = n_units + u, n_clipped + c
        if n == "head.weight":
            assert c == 1  # the head does get clipped when it is not skipped
    assert n_units == (4 * 16 + 4 * 1) + (0 if skip_output else 2)  # lstm rows + biases (+ head)
    assert stats.clip_fraction.item() == pytest.approx(n_clipped / n_units, abs=1e-7)
    assert stats.clipped.item() == 1.0


# ---------------------------------------------------------------------------------------------
# zclip: z-score of the global L2 norm against EMAs
# ---------------------------------------------------------------------------------------------


class RefZClip:
    """ZClip (Kumar et al. 2025) as published, in plain Python floats."""

    def __init__(self, alpha, z_thresh, warmup, rule, max_norm, eps):
        self.a, self.zt, self.warmup, self.rule, self.eps = alpha, z_thresh, warmup, rule, eps
        self.cap = math.inf if max_norm is None else max_norm
        self.t, self.warm, self.mean, self.var = 0, [], None, None

    def step(self, g: float) -> tuple[float, float, bool]:
        """This step's norm -> (bound applied to it, boundary above which a step is clipped, ambiguous):
        ambiguous when float32 rounding could flip a decision."""
        near_cap = math.isfinite(self.cap) and abs(g - self.cap) <= 1e-5 * self.cap
        self.t += 1
        if self.t <= self.warmup:
            self.warm.append(g)
            if self.t == self.warmup:
                self.mean = sum(self.warm) / len(self.warm)
                self.var = sum((w - self.mean) ** 2 for w in self.warm) / len(self.warm)  # population
            return self.cap, (math.nan if math.isinf(self.cap) else self.cap), near_cap
        mean, std, zt = self.mean, math.sqrt(self.var), self.zt
        z = (g - mean) / (std + self.eps)
        near_z = abs((g - mean) - zt * (std + self.eps)) <= 1e-5 * (g + mean)
        spike = z > zt
        if spike:
            clip = mean + zt * std / (z / zt) if self.rule == "reciprocal" else mean
        x = clip if spike else g
        self.mean = self.a * mean + (1 - self.a) * x
        self.var = self.a * self.var + (1 - self.a) * (x - self.mean) ** 2
        return min(x, self.cap), min(mean + zt * (std + self.eps), self.cap), near_cap or near_z


@SEQS
@given(seq=grad_sequences(6, 30, spread=0.15), spikes=st.sets(st.integers(0, 29), max_size=6),
       alpha=st.floats(0.5, 0.99), z_thresh=st.floats(1.0, 3.0), warmup=st.integers(1, 5),
       rule=st.sampled_from(["reciprocal", "mean"]), cap=st.one_of(st.none(), st.floats(0.3, 5.0)))
def test_zclip_follows_the_published_update_step_by_step(seq, spikes, alpha, z_thresh, warmup, rule, cap):
    seq = [[g * 50 for g in grads] if t in spikes else grads for t, grads in enumerate(seq)]
    max_norm = None if cap is None else cap * ref_norm(seq[0])
    cfg = clip_cfg("zclip", alpha=alpha, z_thresh=z_thresh, warmup=warmup, rule=rule, max_norm=max_norm)
    ref = RefZClip(alpha, z_thresh, warmup, rule, max_norm, cfg.zclip.eps)
    params = params_with(seq[0])
    state = C.init_state(cfg)
    for t, grads in enumerate(seq):
        g = ref_norm(grads)
        bound, boundary, ambiguous = ref.step(g)
        assume(not ambiguous)
        set_grads(params, grads)
        stats = step(params, cfg, state)
        after = grads_of(params)

        expected_post = g if g <= bound else g * bound / (g + EPS)
        np.testing.assert_allclose(ref_norm(after), expected_post, rtol=1e-4)
        assert stats.clipped.item() == float(g > bound) == float(not bitwise_equal(after, grads))
        if t < warmup:
            # the EMAs are set (not nan) once the warmup norms are all in
            assert math.isnan(float(saved(state)["mean"])) == (t < warmup - 1)
            if max_norm is None:  # warmup: nothing is clipped, no threshold
                assert bitwise_equal(after, grads) and math.isnan(stats.threshold.item())
        else:
            np.testing.assert_allclose(stats.threshold.item(), boundary, rtol=1e-4)
            assert ref_norm(after) <= stats.threshold.item() * (1 + RTOL)
        if t >= warmup - 1:
            mean, var = emas(state)
            np.testing.assert_allclose(mean, ref.mean, rtol=1e-4)
            assert abs(math.sqrt(var) - math.sqrt(ref.var)) <= 1e-4 * (ref.mean + math.sqrt(ref.var))


def test_zclip_clips_an_injected_spike_to_the_reciprocal_bound():
    """Hand-checked: warmup norms 1, 2, 3 -> mean 2, var 2/3; a norm of 100 is a spike."""
    cfg = clip_cfg("zclip", warmup=3, z_thresh=2.0, alpha=0.9)
    params = params_with([torch.zeros(2)])
    state = C.init_state(cfg)
    for n in (1.0, 2.0, 3.0, 100.0):
        set_grads(params, [torch.tensor([0.6 * n, 0.8 * n])])
        stats = step(params, cfg, state)
    std = math.sqrt(2 / 3)
    z = (100 - 2) / (std + 1e-6)
    clip = 2 + 2 * std / (z / 2)
    assert ref_norm(grads_of(params)) == pytest.approx(100 * clip / (100 + EPS), rel=1e-5)
    assert stats.threshold.item() == pytest.approx(2 + 2 * (std + 1e-6), rel=1e-6)
    assert emas(state)[0] == pytest.approx(0.9 * 2 + 0.1 * clip, rel=1e-6)


@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_zclip_emas_survive_a_non_finite_norm(bad):
    params = params_with([torch.zeros(2)])
    cfg_clean, cfg_dirty = clip_cfg("zclip", warmup=3, z_thresh=2.0), clip_cfg("zclip", warmup=4, z_thresh=2.0)
    clean = C.init_state(cfg_clean)
    dirty = C.init_state(cfg_dirty)
    for n in (1.0, bad, 2.0, 3.0):  # a bad norm in warmup is left out of the initial mean and variance
        set_grads(params, [torch.tensor([n, 0.0])])
        step(params, cfg_dirty, dirty)
    assert math.isnan(saved(dirty)["warm"][1].item())
    assert emas(dirty)[0] == pytest.approx(2.0) and emas(dirty)[1] == pytest.approx(2 / 3, rel=1e-6)
    for n in (1.0, 2.0, 3.0):
        set_grads(params, [torch.tensor([n, 0.0])])
        step(params, cfg_clean, clean)
    assert emas(dirty) == emas(clean)
    for n in (2.5, bad, 1.5, bad, 9.0):  # after warmup a bad norm leaves the EMAs exactly as they were
        set_grads(params, [torch.tensor([n, 0.0])])
        before = emas(dirty)
        step(params, cfg_dirty, dirty)
        if not math.isfinite(n):
            assert emas(dirty) == before
        else:
            set_grads(params, [torch.tensor([n, 0.0])])
            step(params, cfg_clean, clean)
            assert emas(dirty) == emas(clean)
    assert all(math.isfinite(v) for v in emas(dirty))


# ---------------------------------------------------------------------------------------------
# Threshold schedules
# ---------------------------------------------------------------------------------------------


@PROPS
@given(step_=st.integers(0, 3000), start=st.floats(0.01, 1e3), steps=st.integers(1, 1000),
       kind=st.sampled_from(["constant", "linear", "cosine"]))
def test_schedule_factor_formulas(step_, start, steps, kind):
    got = C.schedule_factor(step_, kind, start, steps)
    assert got == pytest.approx(ref_factor(kind, step_, start, steps), rel=1e-12, abs=1e-12)
    if kind != "constant":
        assert C.schedule_factor(0, kind, start, steps) == pytest.approx(start, rel=1e-12)
    assert C.schedule_factor(steps + step_, kind, start, steps) == pytest.approx(1.0, rel=1e-12)


@pytest.mark.parametrize("kind", ["constant", "linear", "cosine"])
@pytest.mark.parametrize("method, key", [("value", "value"), ("norm", "max_norm"), ("agc", "clip_factor")])
def test_scheduled_thresholds_are_used_by_clip_gradients(method, key, kind):
    base, start, steps = 0.05, 8.0, 6
    cfg = clip_cfg(method, **{key: base, "schedule": kind, "schedule_start": start, "schedule_steps": steps})
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(5, 3, generator=gen), torch.randn(5, generator=gen), torch.randn(1, 5, generator=gen)]
    params = params_with([torch.zeros_like(w) for w in weights], weights)
    state = C.init_state(cfg, named(params))
    for t in range(10):
        grads = [torch.randn(w.shape, generator=gen) * 10 for w in weights]
        set_grads(params, grads)
        stats = step(params, cfg, state)
        thr = base * ref_factor(kind, t, start, steps)
        assert stats.threshold.item() == pytest.approx(thr, rel=1e-6)
        assert C.threshold_at(cfg, t) == pytest.approx(thr, rel=1e-12)
        after = grads_of(params)
        if method == "value":  # every element clamped at the scheduled bound, which is reached
            assert float(np.abs(flat64(after)).max()) == pytest.approx(thr, rel=1e-6)
        elif method == "norm":  # the global L2 norm brought down to the scheduled max_norm
            pre = ref_norm(grads)
            assert ref_norm(after) == pytest.approx(thr * pre / (pre + EPS), rel=RTOL)
        else:  # every unit (but the skipped output layer) brought down to its scheduled bound
            for g, g0, w in zip(after[:-1], grads[:-1], weights[:-1]):
                check_agc_units(g, g0, w, thr, cfg.agc.eps)


@pytest.mark.parametrize("method", ["none", "autoclip", "zclip"])
def test_threshold_at_is_none_for_unscheduled_methods(method):
    assert C.threshold_at(clip_cfg(method), 0) is None


@PROPS
@given(cfgs=st.lists(clip_configs(), min_size=1, max_size=6),
       steps=st.lists(st.integers(0, 3000) | st.integers(0, 8), min_size=1, max_size=12))
def test_stack_thresholds_are_each_runs_schedule(cfgs, steps):
    """StackClipper.thresholds [S, K] (what the engine feeds its steps): threshold_at of each run at each
    step, the reference schedule; nan for the methods without one."""
    lay = C.Layout.of(list(zip(*lstm_spec(1, 2, 2)[:2])))
    got = C.StackClipper(cfgs, lay, "cpu").thresholds(np.asarray(steps))
    assert got.shape == (len(steps), len(cfgs)) and got.dtype == np.float64
    for s, t in enumerate(steps):
        for k, cfg in enumerate(cfgs):
            if cfg.method not in SCHEDULED:
                assert math.isnan(got[s, k]) and C.threshold_at(cfg, t) is None
                continue
            # bit for bit: clip_gradients (one run) uses threshold_at
            assert got[s, k] == C.threshold_at(cfg, t), (cfg, t)
            assert got[s, k] == pytest.approx(ref_threshold(cfg, t), rel=1e-12)


# ---------------------------------------------------------------------------------------------
# Statistics: one record for every method
# ---------------------------------------------------------------------------------------------

STAT_CFGS = {
    "none": {}, "value": {"value": 0.05}, "norm": {"max_norm": 0.5}, "autoclip": {"percentile": 30, "window": 3},
    "agc": {"clip_factor": 0.05}, "zclip": {"warmup": 1, "z_thresh": 1.0, "max_norm": 5.0},
}


@pytest.mark.parametrize("method", METHODS)
@settings(max_examples=20, deadline=None)
@given(seq=grad_sequences(1, 4, spread=2.0, dtypes=(torch.float32, torch.float64)), data=st.data())
def test_statistics_are_the_same_record_for_every_method(method, seq, data):
    cfg = clip_cfg(method, **STAT_CFGS[method])
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**32 - 1)))
    weights = [torch.randn(g.shape, generator=gen, dtype=g.dtype) for g in seq[0]]
    params = params_with(seq[0], weights)
    state = C.init_state(cfg, named(params))
    for grads in seq:
        set_grads(params, grads)
        stats = step(params, cfg, state)
        after = grads_of(params)
        for f in dataclasses.fields(stats):
            v = getattr(stats, f.name)
            assert isinstance(v, torch.Tensor) and v.dim() == 0 and v.dtype == torch.float32, f.name
        np.testing.assert_allclose(stats.norm_pre.item(), ref_norm(grads), rtol=RTOL)
        np.testing.assert_allclose(stats.norm_post.item(), ref_norm(after), rtol=RTOL)
        changed = not bitwise_equal(after, grads)
        assert stats.clipped.item() == float(changed)
        assert 0.0 <= stats.clip_fraction.item() <= 1.0
        assert (stats.clip_fraction.item() > 0) == changed
        if method == "none":
            assert not changed and math.isnan(stats.threshold.item())


# ---------------------------------------------------------------------------------------------
# Checkpoints: a resumed state continues bit-identically
# ---------------------------------------------------------------------------------------------

STATEFUL = [
    ("autoclip", {"percentile": 30, "window": 3}),
    ("autoclip", {"percentile": 90, "window": 50}),
    ("zclip", {"warmup": 3, "z_thresh": 1.5, "alpha": 0.8}),
    ("zclip", {"warmup": 2, "z_thresh": 1.0, "rule": "mean", "max_norm": 1.0}),
]


def stats_bitwise_equal(a: C.ClipStats, b: C.ClipStats) -> bool:
    return all(bitwise_equal([getattr(a, f.name)], [getattr(b, f.name)]) for f in dataclasses.fields(a))


def through_bytes(obj):
    """A checkpoint's round trip: torch.save, then torch.load."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf)


@SEQS
@given(seq=grad_sequences(4, 14, spread=1.0), k=st.integers(1, 13), spec=st.sampled_from(STATEFUL))
def test_state_dict_round_trip_continues_bit_identically(seq, k, spec):
    assume(k < len(seq))
    cfg = clip_cfg(spec[0], **spec[1])
    a_params, b_params = params_with(seq[0]), params_with(seq[0])
    a = C.init_state(cfg, named(a_params))
    b = C.init_state(cfg, named(b_params))
    for grads in seq[:k]:
        set_grads(a_params, grads)
        set_grads(b_params, grads)
        step(a_params, cfg, a)
        step(b_params, cfg, b)
    b = C.load_state_dict(C.init_state(cfg, named(b_params)), through_bytes(C.state_dict(b)))
    assert b.step == k
    for grads in seq[k:]:
        set_grads(a_params, grads)
        set_grads(b_params, grads)
        sa, sb = step(a_params, cfg, a), step(b_params, cfg, b)
        assert bitwise_equal(grads_of(a_params), grads_of(b_params))
        assert stats_bitwise_equal(sa, sb)
    assert states_bitwise_equal(C.state_dict(a), C.state_dict(b))


@pytest.mark.parametrize("live", [False, True], ids=["into-a-fresh-state", "into-a-stepped-state"])
def test_state_restored_in_memory_is_independent_of_the_original(live):
    cfg = clip_cfg("autoclip", percentile=50, window=4)
    params = params_with([torch.zeros(2)])
    original = C.init_state(cfg)
    for n in (1.0, 2.0):
        set_grads(params, [torch.tensor([n, 0.0])])
        step(params, cfg, original)
    target = C.init_state(cfg)
    if live:  # a state whose clipper is already built takes the checkpoint's tensors too
        set_grads(params, [torch.tensor([7.0, 0.0])])
        step(params, cfg, target)
    checkpoint = C.state_dict(original)
    restored = C.load_state_dict(target, checkpoint)
    saved_history = saved(restored)["history"].clone()
    assert bitwise_equal([saved_history], [checkpoint["history"]])
    set_grads(params, [torch.tensor([100.0, 0.0])])
    step(params, cfg, original)  # the original run goes on: the restored one must not see it
    checkpoint["history"].fill_(-1.0)  # nor a change to the checkpoint it was loaded from
    assert bitwise_equal([saved(restored)["history"]], [saved_history])
    assert saved(restored)["step"] == 2


# ---------------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("huge", [1e30, 1e39, 1e300, math.inf])
@pytest.mark.parametrize("method, key, extra", [
    ("value", "value", {}), ("agc", "clip_factor", {"skip_output": False}),
    *[("norm", "max_norm", {"norm_type": p, "scope": s}) for p in (1.0, 2.0, math.inf) for s in SCOPES],
])
def test_huge_thresholds_change_nothing(huge, dtype, method, key, extra):
    """The config accepts any positive threshold, even beyond float32's range (3.4e38): nothing changes."""
    gen = torch.Generator().manual_seed(0)
    grads = [(torch.randn(4, 3, generator=gen) * 1e3).to(dtype), torch.randn(5, generator=gen).to(dtype)]
    params = params_with(grads)
    cfg = clip_cfg(method, **{key: huge}, **extra)
    stats = step(params, cfg, C.init_state(cfg, named(params)))
    assert bitwise_equal(grads_of(params), grads)
    assert stats.clipped.item() == 0.0 and stats.clip_fraction.item() == 0.0
    assert torch.equal(stats.norm_pre, stats.norm_post)
    assert stats.threshold.item() == pytest.approx(huge, rel=1e-6) or (huge > 3.4e38 and stats.threshold.item() == math.inf)


def test_clip_gradients_threads_the_state_and_counts_steps():
    cfg = clip_cfg("zclip", warmup=2)
    params = params_with([torch.ones(3)])
    state = C.init_state(cfg)
    assert isinstance(state, C.ClipState) and state.step == 0
    for t in range(3):
        _, out = C.clip_gradients(params, cfg, state)
        assert out is state and state.step == t + 1
    assert saved(state)["step"] == 3


def test_clip_gradients_ignores_parameters_without_gradients():
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(3))
    a.grad = torch.tensor([3.0, 4.0])
    cfg = clip_cfg("norm", max_norm=1.0)
    stats = step([a, b], cfg, C.init_state(cfg))
    assert b.grad is None and stats.norm_pre.item() == pytest.approx(5.0)
    stats = step([b], cfg, C.init_state(cfg))  # nothing at all to clip
    assert stats.norm_pre.item() == 0.0 and stats.clipped.item() == 0.0


@pytest.mark.parametrize("method, section", [("agc", {}), ("norm", {"scope": "per_layer"})])
def test_methods_needing_layers_ask_for_named_parameters(method, section):
    cfg = clip_cfg(method, **section)
    with pytest.raises(ValueError, match="named_parameters"):
        C.clip_gradients(params_with([torch.ones(2)]), cfg, C.init_state(cfg))


def test_clip_gradients_rejects_an_unknown_method():
    cfg = dataclasses.replace(clip_cfg("none"), method="bogus")
    with pytest.raises(ValueError, match="bogus"):
        C.clip_gradients(params_with([torch.ones(2)]), cfg, C.init_state(cfg))
    with pytest.raises(ValueError, match="bogus"):
        C.StackClipper([clip_cfg("norm"), cfg], C.Layout.of([("w", (2,))]), "cpu")
    with pytest.raises(ValueError, match="bogus"):
        C.label(cfg)


def _forbid_reads(monkeypatch):
    def sync(*_a, **_k):
        raise AssertionError("a clipper read a tensor back to Python (device sync)")

    for attr in ("item", "tolist", "__float__", "__int__", "__bool__", "__index__", "numpy", "cpu"):
        monkeypatch.setattr(torch.Tensor, attr, sync)


@pytest.mark.parametrize("method", METHODS)
def test_clippers_never_read_a_tensor_back_to_python(method, monkeypatch):
    """.item(), float(), bool() on a CUDA tensor wait for the GPU; none may happen inside clip_gradients."""
    cfg = clip_cfg(method, **STAT_CFGS[method])
    params = params_with([torch.randn(3, 4), torch.randn(7) * 10], [torch.randn(3, 4), torch.randn(7)])
    state = C.init_state(cfg, named(params))
    _forbid_reads(monkeypatch)
    for _ in range(3):  # past zclip's warmup
        stats, state = C.clip_gradients(params, cfg, state)
    monkeypatch.undo()
    assert isinstance(stats.norm_pre, torch.Tensor)


def _mixed_stack(device):
    """Every method (two of norm, autoclip, zclip, with different settings) in one stack of 9 runs."""
    cfgs = [clip_cfg(m, **STAT_CFGS[m]) for m in METHODS] + [
        clip_cfg("norm", max_norm=0.1, norm_type=1.0, scope="per_layer"),
        clip_cfg("autoclip", percentile=80, window=3), clip_cfg("zclip", warmup=1, z_thresh=2.0, rule="mean")]
    lay = C.Layout.of([("body.weight", (3, 4)), ("body.bias", (3,)), ("head.weight", (1, 3))])
    return cfgs, lay, C.StackClipper(cfgs, lay, device, steps_total=5)


def test_stack_clipper_never_reads_a_tensor_back_to_python(monkeypatch):
    cfgs, lay, clipper = _mixed_stack("cpu")
    k = len(cfgs)
    w = torch.randn(k, lay.size)
    thr, steps, active = as_columns(clipper.thresholds(np.arange(3))[0], [0] * k, [True] * k)
    _forbid_reads(monkeypatch)
    for _ in range(3):
        stats = clipper.step(torch.randn(k, lay.size) * 10, w, thr, steps, active)
        steps = steps + 1
    monkeypatch.undo()
    assert stats.shape == (k, len(C.STATS))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", METHODS)
def test_clippers_do_not_synchronize_cuda(method):
    cfg = clip_cfg(method, **STAT_CFGS[method])
    params = [torch.nn.Parameter(torch.randn(64, 32, device="cuda")), torch.nn.Parameter(torch.randn(32, device="cuda"))]
    state = C.init_state(cfg, named(params))
    for p in params:
        p.grad = torch.randn_like(p) * 10
    C.clip_gradients(params, cfg, state)  # builds the run's clipper (its index maps go to the device once)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            stats, state = C.clip_gradients(params, cfg, state)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for f in dataclasses.fields(stats):
        assert getattr(stats, f.name).device.type == "cuda"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_stack_clipper_does_not_synchronize_cuda():
    cfgs, lay, clipper = _mixed_stack("cuda")
    k = len(cfgs)
    w = torch.randn(k, lay.size, device="cuda")
    g = torch.randn(k, lay.size, device="cuda") * 10
    thr, steps, active = as_columns(clipper.thresholds(np.arange(1))[0], [0] * k, [True] * k, "cuda")
    clipper.step(g.clone(), w, thr, steps, active)  # first use: index maps built
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            steps = steps + 1
            stats = clipper.step(g.clone(), w, thr, steps, active)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert stats.device.type == "cuda" and stats.shape == (k, len(C.STATS))


# ---------------------------------------------------------------------------------------------
# The registry: every configurable method, its run label and its sweep key
# ---------------------------------------------------------------------------------------------


def test_registry_holds_every_configurable_method():
    assert set(C.METHODS) == set(CLIP_METHODS) == set(METHODS)
    for name, m in C.METHODS.items():
        assert m.name == name
        assert (m.section is None) == (name == "none")
        if m.section is not None:
            assert isinstance(getattr(clip_cfg(name), name), m.section)
        assert m.scheduled == (name in SCHEDULED)


@pytest.mark.parametrize("method, section, expected", [
    ("none", {}, "none"),
    ("norm", {}, "norm1.0"),
    ("norm", {"max_norm": 0.5, "norm_type": 1, "scope": "per_layer"}, "norm0.5-L1-per_layer"),
    ("norm", {"max_norm": 2, "norm_type": "inf"}, "norm2.0-Linf"),
    ("norm", {"norm_type": 4.5, "scope": "per_param", "schedule": "cosine"}, "norm1.0-L4.5-per_param-cosine"),
    ("value", {"value": 0.1, "schedule": "linear"}, "value0.1-linear"),
    ("value", {}, "value1.0"),
    ("autoclip", {}, "autoclip-p10"),
    ("autoclip", {"percentile": 2.5, "window": 7}, "autoclip-p2.5"),
    ("agc", {}, "agc0.01"),
    ("agc", {"clip_factor": 1e-3, "schedule": "linear"}, "agc1e-3-linear"),
    ("zclip", {"rule": "mean"}, "zclip-z2.5-mean"),
    ("zclip", {"max_norm": 3}, "zclip-z2.5-cap3"),
    ("zclip", {"z_thresh": 2, "rule": "mean", "max_norm": 0.5, "warmup": 4}, "zclip-z2-mean-cap0.5"),
])
def test_labels_are_the_run_names(method, section, expected):
    assert C.label(clip_cfg(method, **section)) == expected


def test_threshold_keys_name_each_methods_searched_setting():
    assert C.threshold_keys() == {"value": "clip.value.value", "norm": "clip.norm.max_norm",
                                  "agc": "clip.agc.clip_factor", "autoclip": "clip.autoclip.percentile",
                                  "zclip": "clip.zclip.z_thresh"}
    for key in C.threshold_keys().values():  # each is a real config key
        _, method, name = key.split(".")
        assert hasattr(getattr(clip_cfg(method), method), name)


@pytest.mark.parametrize("method, section, bounds", [
    ("norm", {}, True), ("norm", {"scope": "per_layer"}, False), ("norm", {"norm_type": 1}, False),
    ("norm", {"scope": "per_param"}, False), ("autoclip", {}, True), ("zclip", {}, True),
    ("value", {}, False), ("agc", {}, False), ("none", {}, False),
])
def test_which_thresholds_bound_the_global_l2_norm(method, section, bounds):
    assert C.bounds_global_l2(clip_cfg(method, **section)) is bounds
    assert C.bounds_global_l2_of(method, **{k: str(v) for k, v in section.items()}) is bounds


# ---------------------------------------------------------------------------------------------
# The stacked clipper: K runs in one [K, P] tensor, each row clipped as that run alone
# ---------------------------------------------------------------------------------------------


def _stack_inputs(case: StackCase, counts, active):
    thr = [ref_threshold(c, n) for c, n in zip(case.cfgs, counts)]
    return as_columns(thr, counts, active)


@STACKS
@given(case=stack_cases(), spare=st.sampled_from([0, 3]))
def test_stack_clips_each_row_as_that_run_alone(case, spare):
    """Runs of different methods and settings in one stack: every row's gradients, statistics and state are
    bit for bit those of the run in a stack of its own, fed the same inputs; an inactive run's state is
    unchanged."""
    lay = C.Layout.of(list(zip(case.names, case.shapes)))
    total = len(case.steps) + spare
    stack = C.StackClipper(case.cfgs, lay, "cpu", total)
    alone = [C.StackClipper([c], lay, "cpu", total) for c in case.cfgs]
    k = len(case.cfgs)
    counts = [0] * k
    for g0, active in case.steps:
        before = [stack.state_of(j) for j in range(k)]
        thr, steps, act = _stack_inputs(case, counts, active)
        g = g0.clone()
        stats = stack.step(g, case.weights, thr, steps, act)
        assert stats.shape == (k, len(C.STATS)) and stats.dtype == torch.float32
        for j in range(k):
            gj = g0[j:j + 1].clone()
            sj = alone[j].step(gj, case.weights[j:j + 1], thr[j:j + 1], steps[j:j + 1], act[j:j + 1])
            assert bitwise_equal([g[j]], [gj[0]]), (j, case.cfgs[j])
            assert bitwise_equal([stats[j]], [sj[0]]), (j, case.cfgs[j])
            assert states_bitwise_equal(stack.state_of(j), alone[j].state_of(0))
            if not active[j]:
                assert states_bitwise_equal(stack.state_of(j), before[j]), (j, case.cfgs[j])
        counts = [n + a for n, a in zip(counts, active)]


@STACKS
@given(case=stack_cases(all_active=True), sized=st.booleans())
def test_stack_clips_each_row_as_clip_gradients_on_that_runs_tensors(case, sized):
    """The engine's path (a [K, P] stack, thresholds from StackClipper.thresholds) against each run trained
    alone with clip_gradients on its own parameters: the same gradients and statistics, bit for bit."""
    lay = C.Layout.of(list(zip(case.names, case.shapes)))
    stack = C.StackClipper(case.cfgs, lay, "cpu", len(case.steps) if sized else 0)
    k = len(case.cfgs)
    runs = [params_with(split_row(torch.zeros_like(w), case.shapes), split_row(w, case.shapes))
            for w in case.weights]
    states = [C.init_state(c, named(p, case.names)) for c, p in zip(case.cfgs, runs)]
    for t, (g0, _) in enumerate(case.steps):
        thr = torch.from_numpy(stack.thresholds(np.array([t]))[0])
        g = g0.clone()
        stats = stack.step(g, case.weights, thr, torch.full((k,), t), torch.ones(k, dtype=torch.bool))
        for j in range(k):
            set_grads(runs[j], split_row(g0[j], case.shapes))
            sj = step(runs[j], case.cfgs[j], states[j])
            assert bitwise_equal(split_row(g[j], case.shapes), grads_of(runs[j])), (j, case.cfgs[j])
            assert bitwise_equal([stats[j]], [stats_row(sj)]), (j, case.cfgs[j])


@STACKS
@given(runs=stacked_lists(dtypes=(torch.float32,)),
       max_norms=st.lists(log_floats(-4, 4), min_size=4, max_size=4))
def test_stacked_global_l2_norm_clip_is_torch_clip_grad_norm_per_run(runs, max_norms):
    """Every row of a stack of global L2 norm clippers (max_norm per run) is torch's clip_grad_norm_ of that
    run's tensors, bit for bit, whatever the other rows."""
    shapes = [tuple(g.shape) for g in runs[0]]
    lay = C.Layout.of([(f"p{i}", s) for i, s in enumerate(shapes)])
    k = len(runs)
    cfgs = [clip_cfg("norm", max_norm=m) for m in max_norms[:k]]
    stack = C.StackClipper(cfgs, lay, "cpu")
    g = torch.stack([torch.cat([t.reshape(-1) for t in run]) for run in runs])
    thr, steps, act = as_columns(max_norms[:k], [0] * k, [True] * k)
    stats = stack.step(g, torch.zeros_like(g), thr, steps, act)
    for j, run in enumerate(runs):
        theirs = params_with(run)
        total = torch.nn.utils.clip_grad_norm_(theirs, max_norms[j], norm_type=2.0, foreach=True)
        assert bitwise_equal(split_row(g[j], shapes), grads_of(theirs))
        assert ulp_close(stats[j, 0], total, 1)


@STACKS
@given(case=stack_cases(methods=("autoclip",), max_runs=6, max_steps=8), window=st.integers(1, 6),
       spare=st.integers(0, 3), percentiles=st.lists(st.floats(0, 100), min_size=6, max_size=6))
def test_stacked_autoclip_clips_each_run_at_its_percentile_of_its_recent_norms(case, window, spare,
                                                                                percentiles):
    """One group of AutoClip runs with their own percentiles, a history sized by the steps to come (shorter
    than the window when fewer), runs inactive at times, non-finite norms now and then: each run's threshold
    is its percentile of the finite norms of its own last ``window`` active steps (the current one included
    when active)."""
    k = len(case.cfgs)
    cfgs = [clip_cfg("autoclip", percentile=q, window=window) for q in percentiles[:k]]
    lay = C.Layout.of(list(zip(case.names, case.shapes)))
    stack = C.StackClipper(cfgs, lay, "cpu", len(case.steps) + spare)
    history: list[list[float]] = [[] for _ in range(k)]  # per run, each active step's norm (nan: non-finite)
    for g0, active in case.steps:
        thr, steps, act = as_columns([math.nan] * k, [len(h) for h in history], active)
        g = g0.clone()
        stats = stack.step(g, case.weights, thr, steps, act)
        for j in range(k):
            pre = ref_norm([g0[j]])
            if active[j]:
                history[j].append(pre if math.isfinite(pre) else math.nan)
            recent = [v for v in history[j][-window:] if not math.isnan(v)]
            if not recent:  # no finite norm in the window: no threshold, nothing clipped
                assert math.isnan(stats[j, 4].item()) and bitwise_equal([g[j]], [g0[j]])
                assert stats[j, 2].item() == 0.0
                continue
            ref = float(np.percentile(recent, percentiles[j]))
            tol = RTOL * ref + 1e-6 * max(recent)
            assert abs(stats[j, 4].item() - ref) <= tol, (j, history[j], window)
            if not math.isfinite(pre):
                continue
            post = ref_norm([g[j]])
            assert post <= ref + tol
            if pre > ref + tol:
                assert abs(post - pre * ref / (pre + EPS)) <= tol + RTOL * ref and stats[j, 2].item() == 1.0
            elif pre < ref - tol:
                assert bitwise_equal([g[j]], [g0[j]]) and stats[j, 2].item() == 0.0


def test_inactive_runs_keep_their_state():
    """AutoClip's history and ZClip's warmup norms and EMAs stay as they were on a step a run sits out (it has
    stopped, or diverged), while the active runs of the same groups move on."""
    cfgs = [clip_cfg("autoclip", percentile=50, window=4), clip_cfg("autoclip", percentile=10, window=4),
            clip_cfg("zclip", warmup=2, z_thresh=1.0), clip_cfg("zclip", warmup=2, z_thresh=2.0, rule="mean"),
            clip_cfg("norm", max_norm=0.5)]
    lay = C.Layout.of([("w", (3,))])
    stack = C.StackClipper(cfgs, lay, "cpu")
    k = len(cfgs)
    counts = [0] * k
    for t, active in enumerate([[True] * k, [False, True, False, True, True], [True] * k, [True] * k,
                                [False, True, False, True, False], [True, False, True, False, True]]):
        before = [stack.state_of(j) for j in range(k)]
        g = torch.tensor([[1.0, 2.0, 2.0]]).repeat(k, 1) * (1 + t) ** 2
        thr, steps, act = as_columns([math.nan] * 4 + [0.5], counts, active)
        stack.step(g, torch.ones_like(g), thr, steps, act)
        for j in range(k):
            after = stack.state_of(j)
            if not active[j]:
                assert states_bitwise_equal(after, before[j]), (t, j)
            elif after:  # a stateful run that stepped: its state took this step's norm
                assert not states_bitwise_equal(after, before[j]), (t, j)
        counts = [n + a for n, a in zip(counts, active)]
    # run 0 took steps 0, 2, 3, 5 (norms 3, 27, 48, 108) and sat out 1 and 4 (12, 75): its history is its own
    assert bitwise_equal([stack.state_of(0)["history"]], [torch.tensor([3.0, 27.0, 48.0, 108.0])])


@STACKS
@given(case=stack_cases(min_steps=2, max_steps=8), cut=st.integers(1, 7))
def test_stack_checkpoint_round_trip_continues_bit_identically(case, cut):
    """Each run's state_of, saved and loaded into a new stack (load(k, saved, step)), continues bit for
    bit."""
    cut = min(cut, len(case.steps) - 1)
    lay = C.Layout.of(list(zip(case.names, case.shapes)))
    total = len(case.steps)
    a = C.StackClipper(case.cfgs, lay, "cpu", total)
    k = len(case.cfgs)
    counts = [0] * k

    def advance(clipper, g0, active, counts):
        g = g0.clone()
        return g, clipper.step(g, case.weights, *_stack_inputs(case, counts, active))

    for g0, active in case.steps[:cut]:
        advance(a, g0, active, counts)
        counts = [n + x for n, x in zip(counts, active)]
    checkpoint = through_bytes([a.state_of(j) for j in range(k)])
    b = C.StackClipper(case.cfgs, lay, "cpu", total)
    for j in range(k):
        b.load(j, checkpoint[j], counts[j])
        assert states_bitwise_equal(b.state_of(j), a.state_of(j))
    for g0, active in case.steps[cut:]:
        ga, sa = advance(a, g0, active, counts)
        gb, sb = advance(b, g0, active, counts)
        assert bitwise_equal([ga, sa], [gb, sb])
        counts = [n + x for n, x in zip(counts, active)]


@pytest.mark.parametrize("first, then", [(3, 9), (5, 7), (2, 2), (1, 10), (8, 4)])
def test_stack_load_relays_autoclip_history_of_another_length(first, then):
    """A run resumed with more steps to go sizes its history anew: the last norms carry over, and the
    percentile is as if the run had never stopped (window 6)."""
    cfg = clip_cfg("autoclip", percentile=0, window=6)  # percentile 0: the smallest recent norm
    lay = C.Layout.of([("w", (2,))])
    norms = [5.0, 3.0, 4.0, 7.0, 6.0, 8.0, 9.0, 2.5, 10.0, 11.0, 12.0, 13.0]
    a = C.StackClipper([cfg], lay, "cpu", steps_total=first)
    for s in range(first):
        a.step(torch.tensor([[0.6, 0.8]]) * norms[s], torch.zeros(1, 2), *as_columns([math.nan], [s], [True]))
    b = C.StackClipper([cfg], lay, "cpu", steps_total=first + then)
    b.load(0, through_bytes(a.state_of(0)), first)
    for s in range(first, first + then):
        g = torch.tensor([[0.6, 0.8]]) * norms[s]
        stats = b.step(g, torch.zeros(1, 2), *as_columns([math.nan], [s], [True]))
        assert stats[0, 4].item() == pytest.approx(min(norms[max(0, s - 5):s + 1]), rel=1e-6), s


def test_stack_load_refuses_a_zclip_state_of_another_warmup():
    lay = C.Layout.of([("w", (2,))])
    short = C.StackClipper([clip_cfg("zclip", warmup=2)], lay, "cpu")
    long = C.StackClipper([clip_cfg("norm"), clip_cfg("zclip", warmup=3)], lay, "cpu")
    with pytest.raises(ValueError, match="warm"):
        long.load(1, short.state_of(0), 5)


# ---------------------------------------------------------------------------------------------
# Config: every bad clip setting is rejected with the key and what is allowed
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("clip, expected", [
    ({"norm": {"max_norm": -1}}, ["clip.norm.max_norm = -1", "> 0"]),
    ({"value": {"value": 0}}, ["clip.value.value = 0", "> 0"]),
    ({"agc": {"clip_factor": -0.01}}, ["clip.agc.clip_factor = -0.01", "> 0"]),
    ({"zclip": {"max_norm": 0}}, ["clip.zclip.max_norm = 0", "> 0"]),
    ({"autoclip": {"percentile": 101}}, ["clip.autoclip.percentile = 101", "<= 100"]),
    ({"autoclip": {"percentile": -0.5}}, ["clip.autoclip.percentile = -0.5", ">= 0"]),
    ({"norm": {"scope": "per_block"}}, ["clip.norm.scope = 'per_block'", "'global'", "'per_layer'", "'per_param'"]),
    ({"norm": {"norm_type": 0.5}}, ["clip.norm.norm_type = 0.5", ">= 1"]),
    ({"zclip": {"rule": "median"}}, ["clip.zclip.rule = 'median'", "'reciprocal'", "'mean'"]),
    ({"method": "clamp"}, ["clip.method = 'clamp'", "'none'", "'norm'", "'autoclip'", "'agc'", "'zclip'"]),
    # a method's key under another method, or flat under clip: named where it belongs
    ({"norm": {"percentile": 5}}, ["clip.norm.percentile", "clip.autoclip.percentile"]),
    ({"zclip": {"window": 3}}, ["clip.zclip.window", "clip.autoclip.window"]),
    ({"max_norm": 1}, ["clip.max_norm", "clip.norm.max_norm"]),
    ({"value": 1.0}, ["clip.value", "mapping"]),
])
def test_bad_clip_configs_are_rejected_with_the_key_and_the_allowed_values(clip, expected):
    with pytest.raises(ConfigError) as info:
        from_dict({"clip": clip})
    for text in expected:
        assert text in str(info.value), (text, str(info.value))


@pytest.mark.parametrize("clip, key, value", [
    ({"norm": {"norm_type": "inf"}}, ("norm", "norm_type"), math.inf),
    ({"norm": {"norm_type": 4.5}}, ("norm", "norm_type"), 4.5),
    ({"autoclip": {"percentile": 0}}, ("autoclip", "percentile"), 0.0),
    ({"autoclip": {"percentile": 100}}, ("autoclip", "percentile"), 100.0),
    ({"zclip": {"max_norm": None}}, ("zclip", "max_norm"), None),
    ({"method": "ZClip"}, ("method",), "zclip"),
])
def test_good_clip_configs_are_accepted(clip, key, value):
    got = from_dict({"clip": clip}).clip
    for part in key:
        got = getattr(got, part)
    assert got == value
