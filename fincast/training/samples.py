"""The samples a stack of K runs trains and validates on (layer L2): one training and validation split shared by
every run (a study's runs), or each run its own (a backtest's folds: each fold its own window and scaler).

Shared, the engine indexes one tensor with each run's batch of sample indices, exactly as a run alone does.

Per run, the runs' splits are laid end to end in one tensor with one padding sample after them. Each run's epoch
order is a permutation of its own samples, offset to where they lie, and then padding up to the longest run's
epoch; a batch's padding has weight 0, and a run's loss is the mean over its real samples (its last batch may be
shorter than the others', as alone). A batch holding only padding is a step the run does not take: a run with
fewer samples ends its epoch after fewer steps and waits, frozen, for the others. Validation predicts each run's
own validation samples (padded to the longest) in one stacked forward.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from fincast.features import Split


class Samples:
    """Training and validation samples of K runs: one ``Split`` each shared by all, or a list of one per run."""

    def __init__(self, train: Split | list[Split], val: Split | list[Split], runs: int, batch: int,
                 device: torch.device):
        if not isinstance(train, Split) and len(train) == runs and all(t is train[0] for t in train):
            train = train[0]  # one split, given once per run
        if not isinstance(val, Split) and len(val) == runs and all(v is val[0] for v in val):
            val = val[0]
        self.shared = isinstance(train, Split) and isinstance(val, Split)
        trains = [train] * runs if isinstance(train, Split) else list(train)
        vals = [val] * runs if isinstance(val, Split) else list(val)
        if len(trains) != runs or len(vals) != runs:
            raise ValueError(f"train_runs: {len(trains)} training and {len(vals)} validation splits for {runs} runs "
                             "(one shared split, or one per run)")
        if any(len(t) == 0 for t in trains) or any(len(v) == 0 for v in vals):
            raise ValueError("train_runs: every run needs at least one training and one validation sample")
        self.trains, self.vals, self.batch, self.device = trains, vals, batch, device
        self.counts = np.array([len(t) for t in trains])
        self.spes = np.array([math.ceil(n / batch) for n in self.counts])  # each run's steps per epoch
        self.spe = int(self.spes.max())  # the loop's batches per epoch
        if self.shared:
            self.x = torch.as_tensor(train.x, device=device)
            self.y = torch.as_tensor(train.y, device=device)
            self.xv = torch.as_tensor(val.x, device=device)
            self.weight = None
            return
        self.x, self.y, self.offsets, self.pad = _laid_end_to_end(trains, device)
        self.weight = torch.ones(self.pad + 1, device=device)
        self.weight[self.pad] = 0.0
        self.xv, _, voffsets, vpad = _laid_end_to_end(vals, device)
        width = max(len(v) for v in vals)
        index = np.full((runs, width), vpad)
        for k, v in enumerate(vals):
            index[k, :len(v)] = voffsets[k] + np.arange(len(v))
        self.val_index = torch.as_tensor(index, device=device)

    def __len__(self) -> int:
        """Samples of the longest run (an epoch's order is this long, padding included)."""
        return self.spe * self.batch if not self.shared else int(self.counts[0])

    def order(self, perms: dict[int, np.ndarray]) -> np.ndarray:
        """[K, len(self)] the epoch's sample indices of every run: ``perms[k]`` (a permutation of range(count k))
        for the runs that train, 0.. for the others (their steps are masked)."""
        runs = len(self.trains)
        if self.shared:
            out = np.tile(np.arange(len(self)), (runs, 1))
            for k, p in perms.items():
                out[k] = p
            return out
        out = np.full((runs, len(self)), self.pad)
        for k in range(runs):
            p = perms.get(k, np.arange(self.counts[k]))
            out[k, :len(p)] = self.offsets[k] + p
        return out

    def batch_of(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(x [K, B, ...], y [K, B], weight [K, B] or None when shared) of the sample indices ``idx`` [K, B]."""
        return self.x[idx], self.y[idx], None if self.weight is None else self.weight[idx]

    def predict(self, net, live: torch.Tensor) -> list[np.ndarray]:
        """Every run's predictions (float64) on its validation samples, from one stacked forward (chunked)."""
        if self.shared:
            preds = net.predict(self.xv, live=live).cpu().numpy().astype(np.float64)
            return list(preds)
        index, out = self.val_index, []
        size = max(1, 4096 // len(self.vals))
        with torch.no_grad():
            for i in range(0, index.shape[1], size):
                out.append(net(self.xv[index[:, i:i + size]], False, live).float())
        preds = torch.cat(out, 1).cpu().numpy().astype(np.float64)
        return [preds[k, :len(v)] for k, v in enumerate(self.vals)]


def _laid_end_to_end(splits: list[Split], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, list[int], int]:
    """(x, y, offset of each split, index of the padding sample): the distinct splits (by identity) one after the
    other, then one sample of zeros."""
    where: dict[int, int] = {}
    parts: list[Split] = []
    offsets, at = [], 0
    for s in splits:
        if id(s) not in where:
            where[id(s)] = at
            parts.append(s)
            at += len(s)
        offsets.append(where[id(s)])
    x = np.concatenate([s.x for s in parts] + [np.zeros((1, *parts[0].x.shape[1:]), parts[0].x.dtype)])
    y = np.concatenate([s.y for s in parts] + [np.zeros(1, parts[0].y.dtype)])
    return torch.as_tensor(x, device=device), torch.as_tensor(y, device=device), offsets, at
