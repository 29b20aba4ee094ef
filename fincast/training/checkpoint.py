"""A run's checkpoint, sliced out of (and loaded back into) a stack: everything needed to continue it exactly,
alone or in another stack: weights, optimizer state, loss scale, clipper state, early stopping, RNG and where
the loop stood, as plain tensors and Python values (``torch.save`` with ``weights_only`` loading).

Checkpoints written by fincast before the run axis (``torch.optim`` state dicts) load too: their per-parameter
optimizer tensors are laid end to end as the engine keeps them."""

from __future__ import annotations

import copy

import torch


def run_state(engine, k: int, rng: list[dict], loop: dict) -> dict:
    rec = engine.recs[k]
    net = engine.net
    return {
        "model": {n: t.cpu() for n, t in net.row(k).items()},
        "optimizer": engine.opt.state_of(k),
        "scaler": engine.scaler.state_of(k) if engine.scaler is not None else None,
        "clip_state": {"step": rec.step, **engine.clipper.state_of(k)},
        "run": {"step": rec.step, "best_val": rec.best_val, "best_epoch": rec.best_epoch,
                "bad_epochs": rec.bad_epochs,
                "best_weights": {n: t.cpu() for n, t in net.row(k, engine.best).items()} if rec.best_epoch > 0
                else None},
        "rng": rng,  # one per rank
        "loop": copy.deepcopy(loop),
    }


def load_run(engine, k: int, saved: dict) -> tuple[int, int, int]:
    """Restore run ``k`` from ``run_state``'s dict (the caller's copy is left as saved); -> (epoch, batch, step)
    where it stood."""
    saved = copy.deepcopy(saved)
    net, run, loop = engine.net, saved["run"], saved["loop"]
    opt_state = saved["optimizer"]
    if "param_groups" in opt_state:  # a torch.optim state dict (checkpoints of earlier versions)
        opt_state = from_torch_optimizer(opt_state, net, engine.cfgs[k].optimizer)
    with torch.no_grad():
        net.flat[k] = net.vector(saved["model"])
        if run.get("best_weights") is not None:
            engine.best[k] = net.vector(run["best_weights"])
    engine.opt.load(k, opt_state)
    if engine.scaler is not None and saved.get("scaler"):
        engine.scaler.load(k, saved["scaler"])
    clip = {n: v for n, v in (saved.get("clip_state") or {}).items() if n != "step" and v is not None}
    engine.clipper.load(k, clip, int(run["step"]))
    engine.recs[k].load(loop, run)
    engine.dev.step[k] = int(run["step"])
    engine.rewinds[k] = loop.get("rewind")
    engine.resumed_pruned[k] = bool(loop.get("pruned", False))
    engine.gen_states[k] = loop["gen_state"].cpu()
    engine.gens[k].set_state(engine.gen_states[k])
    return int(loop["epoch"]), int(loop["batch"]), int(run["step"])


def from_torch_optimizer(state: dict, net, kind: str) -> dict:
    """A ``torch.optim`` state dict of one run's model -> the engine's flat form {type, step, name: [P]}."""
    per = state.get("state", {})
    keys = sorted({key for entry in per.values() for key, v in entry.items()
                   if key != "step" and isinstance(v, torch.Tensor)})
    out: dict = {"type": kind, "step": 0.0}
    for key in keys:
        parts = []
        for i, name in enumerate(net.names):
            value = per.get(i, {}).get(key)
            parts.append((value if value is not None else torch.zeros(net.shapes[name])).reshape(-1).float())
        out[key] = torch.cat(parts)
    steps = [float(entry["step"]) for entry in per.values() if "step" in entry]
    out["step"] = steps[0] if steps else 0.0
    return out
