"""fincast.clipping: property tests in the spirit of Optax's clipping tests.

Gradient lists are random (several tensors, shapes and scales spanning 12 orders of magnitude);
every expectation is recomputed here in float64 from the original gradients.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from fincast import clipping as C
from fincast.config import from_dict

PROPS = settings(max_examples=60, deadline=None)
EPS = 1e-6  # the documented epsilon of clip_grad_norm_ (max_norm / (norm + eps))


@st.composite
def grad_lists(draw, dtypes=(torch.float32, torch.float64)):
    n = draw(st.integers(1, 5))
    shapes = draw(st.lists(st.lists(st.integers(1, 6), max_size=3).map(tuple), min_size=n, max_size=n))
    dtype = draw(st.sampled_from(dtypes))
    scale = 10.0 ** draw(st.integers(-6, 6))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    grads = []
    for shape in shapes:
        layer = 10.0 ** draw(st.integers(-2, 2))  # layers differ in size too
        g = torch.randn(shape, generator=gen, dtype=torch.float64) * (scale * layer)
        if draw(st.integers(0, 9)) == 0:
            g.zero_()
        grads.append(g.to(dtype))
    return grads


def clone(grads):
    return [g.clone() for g in grads]


def flat64(grads) -> np.ndarray:
    return np.concatenate([g.detach().double().flatten().numpy() for g in grads])


def ref_norm(grads, p: float = 2.0) -> float:
    return float(np.linalg.norm(flat64(grads), ord=p))


def bitwise_equal(a, b) -> bool:
    """Same dtype, shape and bytes (unlike ==, tells -0.0 from 0.0)."""
    return len(a) == len(b) and all(
        x.dtype == y.dtype and x.shape == y.shape
        and torch.equal(x.contiguous().view(-1).view(torch.uint8), y.contiguous().view(-1).view(torch.uint8))
        for x, y in zip(a, b))


def rtol_for(grads) -> float:
    return 1e-5 if grads[0].dtype == torch.float32 else 1e-6  # the norms are float32 in both cases


# ---------------------------------------------------------------------------------------------
# global_norm
# ---------------------------------------------------------------------------------------------


@PROPS
@given(grads=grad_lists(), p=st.sampled_from([1.0, 2.0, math.inf]))
def test_global_norm_is_the_norm_of_the_concatenation(grads, p):
    got = C.global_norm(grads, p)
    assert got.dim() == 0 and got.dtype == torch.float32
    flat = torch.cat([g.flatten() for g in grads])
    np.testing.assert_allclose(got.item(), torch.linalg.vector_norm(flat, ord=p).item(), rtol=1e-5)
    np.testing.assert_allclose(got.item(), ref_norm(grads, p), rtol=1e-5)


def test_global_norm_default_is_l2_and_empty_is_zero():
    grads = [torch.tensor([3.0]), torch.tensor([[4.0]])]
    assert C.global_norm(grads).item() == 5.0
    assert C.global_norm([]).item() == 0.0


# ---------------------------------------------------------------------------------------------
# clip_norm
# ---------------------------------------------------------------------------------------------


@PROPS
@given(grads=grad_lists(), max_norm=st.floats(1e-3, 1e3), p=st.sampled_from([2.0, 1.0, math.inf]))
def test_clip_norm_bounds_the_norm_and_keeps_the_direction(grads, max_norm, p):
    before = clone(grads)
    total = ref_norm(before, p)
    ratio = max_norm / (total + EPS)
    assume(abs(ratio - 1) > 1e-4)  # away from the boundary, where rounding decides
    stats = C.clip_norm(grads, max_norm, p)

    # the chosen norm is at most max_norm
    assert ref_norm(grads, p) <= max_norm * (1 + rtol_for(grads))
    # direction kept: clipped = coef * original, one coefficient for every tensor
    coef = min(1.0, ratio)
    for g, g0 in zip(grads, before):
        np.testing.assert_allclose(g.double().numpy(), coef * g0.double().numpy(), rtol=rtol_for(grads), atol=0)
        assert g.dtype == g0.dtype and g.shape == g0.shape
    # statistics: L2 norms before and after, whether anything changed, the threshold
    should_clip = ratio < 1
    assert stats.clipped.item() == float(should_clip)
    assert stats.clipped.item() == float(not bitwise_equal(grads, before))
    np.testing.assert_allclose(stats.norm_pre.item(), ref_norm(before), rtol=1e-5)
    np.testing.assert_allclose(stats.norm_post.item(), ref_norm(grads), rtol=1e-5)
    np.testing.assert_allclose(stats.threshold.item(), max_norm, rtol=1e-6)
    if should_clip and p == 2.0:  # lands on max_norm, less torch's eps: max_norm * total / (total + eps)
        np.testing.assert_allclose(stats.norm_post.item(), max_norm * total / (total + EPS), rtol=1e-4)


@PROPS
@given(grads=grad_lists(), headroom=st.floats(1.0, 1e30), p=st.sampled_from([2.0, 1.0, math.inf]))
def test_clip_norm_with_a_threshold_above_the_norm_changes_nothing(grads, headroom, p):
    before = clone(grads)
    max_norm = (ref_norm(before, p) * (1 + 1e-4) + 2 * EPS) * headroom
    stats = C.clip_norm(grads, max_norm, p)
    assert bitwise_equal(grads, before)
    assert stats.clipped.item() == 0.0
    assert torch.equal(stats.norm_pre, stats.norm_post)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("huge", [1e30, 1e39, 1e300, math.inf])
def test_huge_thresholds_are_no_ops(huge, dtype):
    """The config accepts any positive threshold, even beyond float32's range (3.4e38): nothing changes."""
    grads = [(torch.randn(4, 3) * 1e3).to(dtype), torch.randn(5).to(dtype)]
    before = clone(grads)
    for method in ("norm", "value"):
        cfg = from_dict({"clip": {"method": method, "max_norm": huge, "value": huge}}).clip
        stats, _ = C.clip_gradients(grads, cfg)
        assert bitwise_equal(grads, before), method
        assert stats.clipped.item() == 0.0
        assert torch.equal(stats.norm_pre, stats.norm_post)
        threshold = stats.threshold.item()
        assert threshold == pytest.approx(huge, rel=1e-6) or (huge > 3.4e38 and threshold == math.inf)


def test_clip_norm_known_values():
    # ||(3, 4)||_2 = 5 -> scaled to 1 (up to eps); ||.||_1 = 7; ||.||_inf = 4
    for p, total in ((2.0, 5.0), (1.0, 7.0), (math.inf, 4.0)):
        g = [torch.tensor([3.0]), torch.tensor([-4.0])]
        C.clip_norm(g, 1.0, p)
        c = 1.0 / (total + EPS)
        assert g[0].item() == pytest.approx(3.0 * c, rel=1e-6) and g[1].item() == pytest.approx(-4.0 * c, rel=1e-6)


def test_clip_norm_of_zero_gradients_stays_zero():
    grads = [torch.zeros(3), torch.zeros(2, 2)]
    stats = C.clip_norm(grads, 1e-3)
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)
    assert stats.clipped.item() == 0.0 and stats.norm_pre.item() == 0.0


# ---------------------------------------------------------------------------------------------
# clip_value
# ---------------------------------------------------------------------------------------------


@PROPS
@given(grads=grad_lists(), value=st.floats(1e-4, 1e4))
def test_clip_value_bounds_every_element(grads, value):
    before = clone(grads)
    stats = C.clip_value(grads, value)
    for g, g0 in zip(grads, before):
        v = torch.tensor(value, dtype=g0.dtype)  # the bound in the gradients' own precision
        assert bool((g.abs() <= v).all())
        inside = g0.abs() <= v
        assert torch.equal(g[inside], g0[inside])  # elements within the bound are untouched
        assert torch.equal(g[~inside], torch.sign(g0[~inside]) * v)  # the others sit on it, sign kept
    changed = not bitwise_equal(grads, before)
    assert stats.clipped.item() == float(changed)
    assert changed == any(bool((g0.abs() > torch.tensor(value, dtype=g0.dtype)).any()) for g0 in before)
    np.testing.assert_allclose(stats.norm_pre.item(), ref_norm(before), rtol=1e-5)
    np.testing.assert_allclose(stats.norm_post.item(), ref_norm(grads), rtol=1e-5)
    np.testing.assert_allclose(stats.threshold.item(), value, rtol=1e-6)


def test_clip_value_known_values():
    g = [torch.tensor([0.5, -3.0, 2.0]), torch.tensor([[-0.1]])]
    stats = C.clip_value(g, 1.0)
    assert g[0].tolist() == [0.5, -1.0, 1.0] and g[1].tolist() == [[pytest.approx(-0.1)]]
    assert stats.clipped.item() == 1.0
    g = [torch.tensor([0.5, -0.25])]
    assert C.clip_value(g, 1.0).clipped.item() == 0.0 and g[0].tolist() == [0.5, -0.25]


# ---------------------------------------------------------------------------------------------
# clip_none
# ---------------------------------------------------------------------------------------------


@PROPS
@given(grads=grad_lists())
def test_clip_none_leaves_gradients_untouched(grads):
    before = clone(grads)
    stats = C.clip_none(grads)
    assert bitwise_equal(grads, before)
    assert torch.equal(stats.norm_post, stats.norm_pre)
    np.testing.assert_allclose(stats.norm_pre.item(), ref_norm(before), rtol=1e-5)
    assert stats.clipped.item() == 0.0
    assert math.isnan(stats.threshold.item())


# ---------------------------------------------------------------------------------------------
# ClipStats: 0-d tensors, nothing read back to Python
# ---------------------------------------------------------------------------------------------

CLIPPERS = {
    "none": lambda g: C.clip_none(g),
    "value": lambda g: C.clip_value(g, 0.1),
    "norm2": lambda g: C.clip_norm(g, 0.1),
    "norm1": lambda g: C.clip_norm(g, 0.1, 1.0),
    "norminf": lambda g: C.clip_norm(g, 0.1, math.inf),
}


@pytest.mark.parametrize("name", list(CLIPPERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_clip_stats_are_0d_tensors_on_the_gradients_device(name, dtype):
    grads = [torch.randn(3, 4, dtype=dtype), torch.randn(7, dtype=dtype)]
    stats = CLIPPERS[name](grads)
    assert isinstance(stats, C.ClipStats)
    for f in dataclasses.fields(stats):
        v = getattr(stats, f.name)
        assert isinstance(v, torch.Tensor), (f.name, type(v))
        assert v.dim() == 0 and v.dtype == torch.float32, f.name  # as global_norm: one dtype to stack and log
        assert v.device == grads[0].device, f.name


@pytest.mark.parametrize("name", list(CLIPPERS))
def test_clippers_never_read_a_tensor_back_to_python(name, monkeypatch):
    """.item(), float(), bool() on a CUDA tensor wait for the GPU; none may happen inside a clipper."""
    grads = [torch.randn(3, 4), torch.randn(7) * 10]

    def sync(*_a, **_k):
        raise AssertionError("a clipper read a tensor back to Python (device sync)")

    for attr in ("item", "tolist", "__float__", "__int__", "__bool__", "__index__", "numpy", "cpu"):
        monkeypatch.setattr(torch.Tensor, attr, sync)
    stats = CLIPPERS[name](grads)
    monkeypatch.undo()
    assert isinstance(stats.norm_pre, torch.Tensor)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", list(CLIPPERS))
def test_clippers_do_not_synchronize_cuda(name):
    grads = [torch.randn(64, 32, device="cuda"), torch.randn(32, device="cuda") * 10]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        stats = CLIPPERS[name](grads)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for f in dataclasses.fields(stats):
        assert getattr(stats, f.name).device.type == "cuda"


# ---------------------------------------------------------------------------------------------
# clip_gradients: dispatch on ClipConfig.method
# ---------------------------------------------------------------------------------------------


def clip_cfg(**kw):
    return from_dict({"clip": kw}).clip


@PROPS
@given(grads=grad_lists(dtypes=(torch.float32,)),
       spec=st.sampled_from([
           {"method": "none"},
           {"method": "value", "value": 0.01},
           {"method": "value", "value": 3.0},
           {"method": "norm", "max_norm": 0.5},
           {"method": "norm", "max_norm": 0.5, "norm_type": 1},
           {"method": "norm", "max_norm": 0.05, "norm_type": "inf"},
           {},  # the default: norm, max_norm 1, L2
       ]))
def test_clip_gradients_dispatches_on_the_method(grads, spec):
    cfg = clip_cfg(**spec)
    before = clone(grads)
    state = C.init_state(cfg)
    stats, state2 = C.clip_gradients(grads, cfg, state)
    assert state2 is state
    # the clipper the method names, applied to a copy, gives the same gradients and statistics
    expected = clone(before)
    if cfg.method == "none":
        ref = C.clip_none(expected)
        assert bitwise_equal(grads, before)
    elif cfg.method == "value":
        ref = C.clip_value(expected, cfg.value)
        assert all(bool((g.abs() <= cfg.value).all()) for g in grads)
    else:
        ref = C.clip_norm(expected, cfg.max_norm, cfg.norm_type)
        assert ref_norm(grads, cfg.norm_type) <= cfg.max_norm * (1 + 1e-5)
    assert bitwise_equal(grads, expected)
    for f in dataclasses.fields(stats):
        assert torch.equal(getattr(stats, f.name), getattr(ref, f.name)) or (
            f.name == "threshold" and math.isnan(getattr(stats, f.name).item()) and
            math.isnan(getattr(ref, f.name).item()))


def test_clip_gradients_uses_the_configured_parameters():
    g = [torch.tensor([3.0, -4.0])]
    stats, _ = C.clip_gradients(g, clip_cfg(method="value", value=0.5, max_norm=100.0))
    assert g[0].tolist() == [0.5, -0.5] and stats.threshold.item() == 0.5
    g = [torch.tensor([3.0, -4.0])]
    stats, _ = C.clip_gradients(g, clip_cfg(method="norm", max_norm=2.5, value=100.0))
    assert g[0].tolist() == pytest.approx([1.5, -2.0], rel=1e-6) and stats.threshold.item() == 2.5
    g = [torch.tensor([3.0, -4.0])]
    C.clip_gradients(g, clip_cfg(method="norm", max_norm=2.0, norm_type="inf"))
    assert g[0].tolist() == pytest.approx([1.5, -2.0], rel=1e-6)
    g = [torch.tensor([3.0, -4.0])]
    stats, _ = C.clip_gradients(g, clip_cfg(method="none", max_norm=1e-3, value=1e-3))
    assert g[0].tolist() == [3.0, -4.0] and stats.clipped.item() == 0.0


@pytest.mark.parametrize("method", ["none", "value", "norm"])
def test_clip_gradients_passes_any_state_through(method):
    sentinel = object()
    _, out = C.clip_gradients([torch.ones(2)], clip_cfg(method=method), sentinel)
    assert out is sentinel
    assert C.init_state(clip_cfg(method=method)) is None


def test_clip_gradients_rejects_an_unknown_method():
    cfg = dataclasses.replace(clip_cfg(), method="autoclip")
    with pytest.raises(ValueError, match="autoclip"):
        C.clip_gradients([torch.ones(2)], cfg)
