"""K nets of one architecture as one computation (layer L1): the run axis of the training engine.

:class:`StackedNet` holds the parameters of K ``LSTMForecaster`` s (or K ``OptionLSTM`` s) in ONE tensor ``flat``
of shape [K, P], a row per run, each row laid out as ``torch.nn.utils.parameters_to_vector`` lays out that run's
model (``named_parameters`` order). The named parameters (``lstm.weight_ih_l0`` [K, 4H, F], ``head.bias`` [K, 1],
...) are views of those rows, and their gradients views of one [K, P] tensor ``grad``, so clipping and the
optimizers work on two tensors whatever the architecture (a few ops per step, none per run or per layer), and
a run's weights move to and from its own ``nn.Module`` unchanged (``load_into``).

The forward is the solo model's, written for the run axis: the recurrence is :class:`~fincast.models.
grouped_lstm.GroupedLSTM` (one matrix product per time step for all runs), linear layers are ``baddbmm``, and
activations run ``[K, features, samples]``. A single run (K = 1) without the compiled CPU kernel (on CUDA, or a
CPU without a C++ compiler) runs its recurrence through ATen's LSTM (cuDNN on CUDA) instead. Dropout draws one
mask per run and sample from torch's generator, so a stacked run with dropout equals its solo run in
distribution, not bitwise (without dropout: to float precision, tests/training/test_engine.py). Under CUDA autocast
(bf16/fp16) the grouped recurrence runs in fp32 and the linear layers in the autocast dtype; a single run's
cuDNN LSTM runs in fp16 under fp16 autocast (as ``nn.LSTM`` does) and in fp32 under bf16 (cuDNN's autocast
would make it fp16).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fincast.models.grouped_lstm import GroupedLSTM, cpu_kernel
from fincast.models.lstm import LSTMForecaster
from fincast.models.options import OptionLSTM


@dataclass(frozen=True)
class Arch:
    """What the stacked forward needs to know of the solo model (equal for every run of a stack)."""

    kind: str  # "forecast" (LSTMForecaster) | "option" (OptionLSTM)
    num_layers: int
    hidden: int
    layer_norm: bool
    norm_eps: float
    dropout: float
    n_contract: int = 0  # option net: contract features, then the floor, then the return window
    lookback: int = 0
    channels: int = 0
    mlp_layers: int = 0
    bounded: bool = False


def arch_of(model: nn.Module) -> Arch:
    if isinstance(model, OptionLSTM):
        kind = "option"
    elif isinstance(model, LSTMForecaster):
        kind = "forecast"
    else:
        raise TypeError(f"no stacked form of {type(model).__name__} (LSTMForecaster and OptionLSTM have one)")
    lstm = model.lstm
    norm = model.norm
    drop = model.drop.p
    if lstm.num_layers > 1 and lstm.dropout != drop:
        raise ValueError("stacked nets need one dropout rate for the LSTM's layers and the head")
    extra = {}
    if kind == "option":
        extra = {"n_contract": model.n_contract, "lookback": model.lookback, "channels": model.channels,
                 "mlp_layers": sum(isinstance(m, nn.Linear) for m in model.mlp), "bounded": model.bounded}
    return Arch(kind, lstm.num_layers, lstm.hidden_size, isinstance(norm, nn.LayerNorm),
                norm.eps if isinstance(norm, nn.LayerNorm) else 0.0, float(drop), **extra)


class StackedNet:
    """K models of one architecture, parameters in rows of ``flat`` [K, P] (see the module doc).

    ``params``: name -> leaf view [K, *shape] (requires grad; its ``.grad`` is a view of ``grad``), in the solo
    model's ``named_parameters`` order. ``spans``: name -> [a, b) in a row. ``forward(x, train)``: ``x`` [K, B, ...]
    (one batch per run) -> predictions [K, B]."""

    def __init__(self, models: list[nn.Module], device: torch.device | str | None = None):
        if not models:
            raise ValueError("StackedNet needs at least one model")
        self.arch = arch_of(models[0])
        named = list(models[0].named_parameters())
        self.names = [n for n, _ in named]
        self.shapes = {n: tuple(p.shape) for n, p in named}
        for k, m in enumerate(models[1:], 1):
            other = [(n, tuple(p.shape)) for n, p in m.named_parameters()]
            if arch_of(m) != self.arch or other != [(n, self.shapes[n]) for n in self.names]:
                raise ValueError(f"model {k} differs in architecture from model 0: runs stack only with one "
                                 "architecture")
        self.spans: dict[str, tuple[int, int]] = {}
        at = 0
        for n in self.names:
            size = math.prod(self.shapes[n])
            self.spans[n] = (at, at + size)
            at += size
        self.size = at
        with torch.no_grad():
            rows = [torch.cat([p.detach().reshape(-1) for p in m.parameters()]) for m in models]
            self.flat = torch.stack(rows).to(device if device is not None else rows[0].device)
        self.grad = torch.zeros_like(self.flat)
        self.runs = len(models)
        self.params = self._views()
        self._ws: list[dict] = [{} for _ in range(self.arch.num_layers)]  # per-layer training buffers
        self._eval_ws: list[dict] = [{} for _ in range(self.arch.num_layers)]  # and inference buffers
        self._quiet = True  # the first backward: torch's once-per-process warning about the strided gradients

    def _views(self) -> dict[str, torch.Tensor]:
        out = {}
        for n in self.names:
            a, b = self.spans[n]
            shape = (self.runs, *self.shapes[n])
            v = self.flat[:, a:b].view(shape).requires_grad_(True)  # a leaf: flat itself needs no grad
            v.grad = self.grad[:, a:b].view(shape)  # backward accumulates into it, in place
            out[n] = v
        return out

    @property
    def device(self) -> torch.device:
        return self.flat.device

    def row(self, k: int, source: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Run ``k``'s weights (of ``flat``, or of ``source`` [K, P] / [P]) as its model's state dict (copies)."""
        src = self.flat if source is None else source
        vec = src[k] if src.dim() == 2 else src
        return {n: vec[a:b].detach().reshape(self.shapes[n]).clone() for n, (a, b) in self.spans.items()}

    def load_into(self, k: int, model: nn.Module, source: torch.Tensor | None = None) -> None:
        model.load_state_dict({n: v.to(next(model.parameters()).device) for n, v in self.row(k, source).items()})

    def vector(self, state: dict[str, torch.Tensor]) -> torch.Tensor:
        """A state dict of the solo model as one row [P] (the inverse of ``row``)."""
        return torch.cat([state[n].detach().reshape(-1).to(self.flat) for n in self.names])

    # -----------------------------------------------------------------------------------------
    # forward
    # -----------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, train: bool = True, live: torch.Tensor | None = None) -> torch.Tensor:
        """``live`` [K] (bool): the runs whose outputs matter; on the CPU kernel the others' recurrence is
        skipped (their outputs and gradients are then meaningless)."""
        a = self.arch
        if a.kind == "option":
            contract, floor = x[..., :a.n_contract], x[..., a.n_contract]
            seq = x[..., a.n_contract + 1:].reshape(*x.shape[:2], a.lookback, a.channels)
        else:
            seq = x
        state = self._dropout(self._last_state(seq, train, live), train)  # [K, H, B]
        p = self.params
        if a.kind == "forecast":
            return _linear(p["head.weight"], p["head.bias"], state).squeeze(1)
        z = torch.cat([state, contract.transpose(1, 2).to(state.dtype)], 1)
        for i in range(a.mlp_layers):
            z = F.silu(_linear(p[f"mlp.{2 * i}.weight"], p[f"mlp.{2 * i}.bias"], z))
        out = _linear(p["head.weight"], p["head.bias"], z).squeeze(1)
        return floor + F.softplus(out) if a.bounded else out

    __call__ = forward

    def _last_state(self, seq: torch.Tensor, train: bool, live: torch.Tensor | None = None) -> torch.Tensor:
        """The LSTM over ``seq`` [K, B, T, F] -> the last hidden state [K, H, B], LayerNorm applied."""
        a, p = self.arch, self.params
        if self.runs == 1 and (seq.device.type != "cpu" or cpu_kernel() is None) and \
                (a.dropout == 0 or a.num_layers == 1):  # (cuDNN's dropout state is outside torch's RNG state)
            last = self._solo_lstm(seq[0], train)
        else:
            last = self._grouped_lstm(seq.permute(2, 0, 3, 1), train, live)
        if last.dtype in (torch.float16, torch.bfloat16):
            last = last.float()
        if a.layer_norm:
            with torch.autocast(seq.device.type, enabled=False):
                last = F.layer_norm(last.transpose(1, 2), (a.hidden,), eps=a.norm_eps)
                last = (last * p["norm.weight"][:, None] + p["norm.bias"][:, None]).transpose(1, 2)
        return last

    def _solo_lstm(self, seq: torch.Tensor, train: bool) -> torch.Tensor:
        """One run: ATen's LSTM (cuDNN on CUDA) over the run's weight views, ``seq`` [B, T, F] -> [1, H, B]. Where
        the compiled CPU kernel is missing this is much faster than the grouped loop in torch ops, and on CUDA it
        is a handful of kernels per step instead of ~25 per time step."""
        a, p = self.arch, self.params
        weights = [p[f"lstm.{w}_l{layer}"][0] for layer in range(a.num_layers)
                   for w in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
        h0 = seq.new_zeros(a.num_layers, seq.shape[0], a.hidden)
        device_type = seq.device.type
        # autocast runs cuDNN's RNN in fp16 whatever the autocast dtype: under bf16 the recurrence stays fp32
        bf16 = torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) == torch.bfloat16
        with torch.autocast(device_type, enabled=not bf16 and torch.is_autocast_enabled(device_type)):
            out, _, _ = torch.lstm(seq.float() if bf16 else seq, (h0, h0), weights, True, a.num_layers,
                                   a.dropout if train else 0.0, train, False, True)
        return out[:, -1].transpose(0, 1).unsqueeze(0)

    def _grouped_lstm(self, seq: torch.Tensor, train: bool, live: torch.Tensor | None = None) -> torch.Tensor:
        """The grouped recurrence over ``seq`` [T, K, F, B] -> [K, H, B]. Under autocast it stays in fp32: its cell
        state, gate activations and weight-gradient sums would lose ~3x the accuracy in bf16 over a sequence."""
        a, p = self.arch, self.params
        with torch.autocast(seq.device.type, enabled=False):
            seq = seq.float() if seq.dtype in (torch.float16, torch.bfloat16) else seq
            for layer in range(a.num_layers):
                if layer and a.dropout > 0 and train:  # nn.LSTM: dropout on the outputs of all but the last layer
                    seq = F.dropout(seq, a.dropout, training=True)
                w_ih, w_hh = p[f"lstm.weight_ih_l{layer}"], p[f"lstm.weight_hh_l{layer}"]
                bias = (p[f"lstm.bias_ih_l{layer}"] + p[f"lstm.bias_hh_l{layer}"]).unsqueeze(-1)
                ws = (self._ws if torch.is_grad_enabled() else self._eval_ws)[layer]
                seq = GroupedLSTM.apply(seq, w_ih, w_hh, bias, ws, live if seq.device.type == "cpu" else None)
            return seq[-1]

    def _dropout(self, state: torch.Tensor, train: bool) -> torch.Tensor:
        return F.dropout(state, self.arch.dropout, training=True) if train and self.arch.dropout > 0 else state

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()``; the gradients are strided views of one [K, P] tensor on purpose, which torch
        flags once per process ("grad and param do not obey the gradient layout contract"): not shown."""
        if not self._quiet:
            loss.backward()
            return
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="grad and param do not obey the gradient layout contract")
            loss.backward()
        self._quiet = False

    @torch.no_grad()
    def predict(self, x: torch.Tensor, chunk: int = 4096, live: torch.Tensor | None = None) -> torch.Tensor:
        """Every run's predictions [K, N] (float32, on the device) for the same samples ``x`` [N, ...], in chunks
        of about ``chunk`` run-samples, whose buffers are reused (``live``: as in ``forward``)."""
        size = max(1, chunk // self.runs)
        out = []
        for i in range(0, len(x), size):
            part = x[i:i + size]
            out.append(self.forward(part.unsqueeze(0).expand(self.runs, *part.shape), False, live).float())
        return torch.cat(out, 1) if out else x.new_zeros((self.runs, 0))


def _linear(weight: torch.Tensor, bias: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Per run ``weight @ z + bias``: ``weight`` [K, out, in], ``bias`` [K, out], ``z`` [K, in, B] -> [K, out, B]."""
    return torch.baddbmm(bias.unsqueeze(-1), weight, z)
