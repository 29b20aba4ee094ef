"""The grouped LSTM (layer L1): one LSTM layer for K runs at once, each with its own weights, as one hand-written
autograd function. ``fincast.models.stacked`` builds whole stacked nets from it.

Why not ``torch.func`` (``stack_module_state`` + ``vmap``): torch 2.13 has no batching rule for ``aten::lstm`` and
no fallback ("Batching rule not implemented for aten::lstm.input"), so vmap over ``nn.LSTM`` does not run at all.
A grouped LSTM written with plain autograd ops runs, but is slower per run than one ``nn.LSTM`` on the CPU
(the per-step index backward fills a tensor the size of the whole sequence; ``tanh`` costs 20x ``sigmoid`` on
this CPU). So the recurrence here is a hand-written autograd function (:class:`GroupedLSTM`): one ``bmm`` per
time step for all runs, the bias carried by a constant input row, and in the backward the weight gradient
accumulated by one product per step. On a CPU its time loops are compiled C++ (``grouped_lstm.cpp``: all of a
step's elementwise ops in one pass); elsewhere, or without a compiler, the same loops run as torch ops.
README, Performance, *Batched studies* has the measurements (bench/batched_study.py).

Layout: runs first, then features/hidden units, then the samples (``[K, H, B]``), so every per-gate slice is
contiguous. The weights keep ``nn.LSTM``'s layout and gate order (i, f, g, o) per run, so a run's weights move
between a stacked net and its ``nn.LSTM`` unchanged.
"""

from __future__ import annotations

import logging
import os
import platform
import sys
from pathlib import Path

import torch

log = logging.getLogger("fincast.models")
_NONE = torch.empty(0, dtype=torch.bool)  # no runs mask
_sigmoid_backward = torch.ops.aten.sigmoid_backward
_tanh_backward = torch.ops.aten.tanh_backward


class GroupedLSTM(torch.autograd.Function):
    """One LSTM layer for K runs. ``x``: [T, K, F, B] (time, run, feature, sample); ``w_ih`` [K, 4H, F],
    ``w_hh`` [K, 4H, H], ``bias`` [K, 4H, 1] (b_ih + b_hh), gates in nn.LSTM's order (i, f, g, o); ``ws`` a
    dict this layer's buffers are kept in between steps (or None); ``live`` [K] (bool, CPU) the runs to compute
    (the compiled kernel skips the others, whose outputs and gradients are then meaningless; None: all). Returns
    the hidden states of every time step, [T, K, H, B].

    Per time step the forward is one ``bmm`` of w = [W_hh W_ih b] with z_t = [h_t; x_t; 1] (kept for the
    backward) and the gates' elementwise ops; the backward two matrix products (the gradient of z_t, and the
    weight gradient, bias included, accumulated over time steps) and the elementwise ops. On a CPU the time loops
    run in the compiled kernel of ``grouped_lstm.cpp`` (every elementwise op of a step in one pass), else
    (CUDA, or no C++ compiler) in Python with one torch op per elementwise step."""

    @staticmethod
    def forward(ctx, x, w_ih, w_hh, bias, ws, live=None):
        steps, k, feats, b = x.shape
        hid = w_hh.shape[1] // 4
        buf = _workspace(ws, x, (steps, k, hid, feats, b))
        sig, act_g, cells, z, tanh_c, pre = (buf[n] for n in ("sig", "act_g", "cells", "z", "tanh_c", "pre"))
        w = torch.cat([w_hh, w_ih, bias], 2)  # [K, 4H, H + F + 1]
        z[:steps, :, hid:hid + feats].copy_(x)  # (c_0 = 0, h_0 = 0 and the row of ones are set once)
        kernel = cpu_kernel() if x.device.type == "cpu" else None
        if kernel is not None:
            kernel.forward_loop(w, z, pre, sig, act_g, cells, tanh_c, _NONE if live is None else live)
        else:
            _forward_steps(w, z, pre, sig, act_g, cells, tanh_c)
        ctx.save_for_backward(w, sig, act_g, cells, z, tanh_c)
        ctx.x_grad = ctx.needs_input_grad[0]
        ctx.kernel = kernel
        ctx.buf = buf
        ctx.live = live
        return z[1:, :, :hid]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_out):
        w, sig, act_g, cells, z, tanh_c = ctx.saved_tensors
        hid = sig.shape[3]
        feats = w.shape[2] - hid - 1
        if ctx.kernel is not None:
            d_w, d_x = ctx.kernel.backward_loop(d_out, w, z, sig, act_g, cells, tanh_c, ctx.x_grad,
                                                _NONE if ctx.live is None else ctx.live)
        else:
            d_w, d_x = _backward_steps(ctx.buf, d_out, w, z, sig, act_g, cells, tanh_c, ctx.x_grad)
        return (d_x if ctx.x_grad else None), d_w[:, :, hid:hid + feats], d_w[:, :, :hid], d_w[:, :, hid + feats:], \
            None, None


def _forward_steps(w, z, pre, sig, act_g, cells, tanh_c) -> None:
    """The forward time loop in torch ops (CUDA, or a CPU without the compiled kernel)."""
    steps, k, _, hid, b = sig.shape
    for t in range(steps):
        torch.bmm(w, z[t], out=pre)
        g = pre.view(k, 4, hid, b)
        g[:, 2].mul_(2.0)
        s = sig[t]
        torch.sigmoid(g, out=s)
        torch.mul(s[:, 2], 2.0, out=act_g[t]).sub_(1.0)  # tanh(x) = 2 sigmoid(2x) - 1: much faster than tanh on CPUs
        c = cells[t + 1]
        torch.mul(s[:, 1], cells[t], out=c)
        c.addcmul_(s[:, 0], act_g[t])
        torch.sigmoid(c * 2.0, out=tanh_c[t]).mul_(2.0).sub_(1.0)
        torch.mul(s[:, 3], tanh_c[t], out=z[t + 1, :, :hid])


def _backward_steps(buf, d_out, w, z, sig, act_g, cells, tanh_c, x_grad: bool):
    """The backward time loop in torch ops -> (d_w, d_x or None)."""
    steps, k, _, hid, b = sig.shape
    feats = w.shape[2] - hid - 1
    d, d_z, d_c, tmp = (buf[n] for n in ("d", "d_z", "d_c", "tmp"))
    d_c.zero_()
    d_h = d_z[:, :hid]
    d_h.zero_()
    d_w_t = w.new_zeros(k, w.shape[2], w.shape[1])  # d_w transposed: z d^T is 1.6x as fast as d z^T on a CPU
    d_x = torch.empty(steps, k, feats, b, dtype=w.dtype, device=w.device) if x_grad else None
    w_t = w[:, :, :hid + feats].transpose(1, 2) if x_grad else w[:, :, :hid].transpose(1, 2)
    d_flat = d.view(k, 4 * hid, b)
    for t in range(steps - 1, -1, -1):
        d_h.add_(d_out[t])
        s = sig[t]
        torch.mul(d_h, tanh_c[t], out=d[:, 3])  # d o
        torch.mul(d_h, s[:, 3], out=tmp)
        d_c.add_(_tanh_backward(tmp, tanh_c[t]))
        torch.mul(d_c, act_g[t], out=d[:, 0])  # d i
        torch.mul(d_c, cells[t], out=d[:, 1])  # d f
        torch.mul(d_c, s[:, 0], out=d[:, 2])  # d tanh(g): to the sigmoid of 2g, times 2 (chain) x 2 (2x)
        d[:, 2].mul_(4.0)
        d_c.mul_(s[:, 1])
        d.copy_(_sigmoid_backward(d, s))
        d_w_t.baddbmm_(z[t], d_flat.transpose(1, 2))  # the bias's gradient too (z's last row is 1)
        if x_grad:
            torch.bmm(w_t, d_flat, out=d_z)  # [K, H + F, B]: d h_{t-1} and d x_t
            d_x[t].copy_(d_z[:, hid:])
        elif t:
            torch.bmm(w_t, d_flat, out=d_h)
    return d_w_t.transpose(1, 2), d_x


def _workspace(ws: dict | None, x: torch.Tensor, shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """The layer's buffers for this shape, reused from step to step: fresh buffers of a few MB per step cost more
    in page faults than the arithmetic done in them. ``ws`` belongs to one layer of one model and keeps one set per
    shape (an epoch's last, smaller batch has its own), so buffers never move under a captured CUDA graph; a
    step's backward runs before the next step's forward overwrites them."""
    steps, k, hid, feats, b = shape
    key = (shape, x.dtype, x.device)
    if ws is not None and key in ws:
        return ws[key]
    new = lambda *s: x.new_empty(s)  # noqa: E731
    buf = {"sig": new(steps, k, 4, hid, b), "act_g": new(steps, k, hid, b),
           "cells": new(steps + 1, k, hid, b), "z": new(steps + 1, k, hid + feats + 1, b),
           "tanh_c": new(steps, k, hid, b), "pre": new(k, 4 * hid, b), "d": new(k, 4, hid, b),
           "d_z": new(k, hid + feats, b), "d_c": new(k, hid, b), "tmp": new(k, hid, b)}
    buf["cells"][0].zero_()  # c_0 and h_0, and the constant row of z that carries the bias: the loops never write them
    buf["z"][0, :, :hid].zero_()
    buf["z"][:, :, -1].fill_(1.0)
    if ws is not None:
        if len(ws) >= 4:  # (shapes come and go only in tests and between studies' batches)
            ws.clear()
        ws[key] = buf
    return buf


_KERNEL: dict[str, object] = {}  # the compiled CPU kernel, once per process: {"module": module or None}


def cpu_kernel():
    """The compiled time loops of ``grouped_lstm.cpp`` (built on first use with torch's C++ extension builder,
    cached per machine under ``$TORCH_EXTENSIONS_DIR``, ~30 s once), or None where that is off
    (``FINCAST_LSTM_KERNEL=python``) or fails (no C++ compiler): the stacked model then runs the same algorithm
    in torch ops, ~1.35x the time per step (bench/batched_study.py)."""
    if "module" in _KERNEL:
        return _KERNEL["module"]
    module = None
    if os.environ.get("FINCAST_LSTM_KERNEL", "cpp") != "python":
        module = _build_kernel()
    _KERNEL["module"] = module
    return module


def loaded_kernel():
    """The kernel if this process has loaded it already (nothing is built or loaded here), else None."""
    return _KERNEL.get("module")


def _build_kernel():
    import hashlib
    import warnings

    from torch.utils import cpp_extension

    src = Path(__file__).with_name("grouped_lstm.cpp")
    # -fopenmp: ATen's parallel_for is a header template that runs serially in a translation unit built without
    # OpenMP; the library resolves to the libgomp torch has loaded already (one OpenMP runtime in the process)
    flags = ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fopenmp"]
    # -march=native: the build is for this CPU; a home directory shared with other CPUs gets one build per kind
    cpu = platform.machine() + _cpu_flags()
    tag = hashlib.sha256((src.read_text() + " ".join(flags) + cpu + torch.__version__).encode()).hexdigest()[:12]
    name = f"fincast_grouped_lstm_{tag}"
    try:
        built = (Path(cpp_extension._get_build_directory(name, verbose=False)) / f"{name}.so").is_file()
    except Exception:  # (a private torch helper: only decides whether to say "building")
        built = False
    if not built:
        log.info("building the stacked-LSTM CPU kernel (once per machine, ~30 s)")
    path = os.environ.get("PATH", "")
    # torch runs `ninja` from PATH: the one pip installed next to this interpreter, also when .venv isn't active
    os.environ["PATH"] = os.pathsep.join(d for d in (_ninja_dir(), str(Path(sys.executable).parent), path) if d)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return cpp_extension.load(name=name, sources=[str(src)], extra_cflags=flags, extra_ldflags=["-fopenmp"],
                                      verbose=False)
    except Exception as exc:  # no compiler or ninja: the same algorithm in torch ops
        lines = str(exc).strip().splitlines()
        log.warning("stacked runs use the slower torch-ops LSTM: building %s failed (%s)", src.name,
                    lines[-1] if lines else type(exc).__name__)
        return None
    finally:
        os.environ["PATH"] = path


def _ninja_dir() -> str:
    try:
        import ninja

        return str(ninja.BIN_DIR)
    except (ImportError, AttributeError):
        return ""


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()
