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


def rewind_point(engine, k: int) -> dict | None:
    """Run ``k`` stopped by max_steps mid-epoch and is validated there, where a run with a higher limit is
    not: what its checkpoint needs to undo that validation when a resume raises the limit (validation changes
    no weight and draws no random number, so the continued run equals one that never stopped)."""
    if engine.checkpoints[k] is None:
        return None
    rec = engine.recs[k]
    return {"best_val": rec.best_val, "best_epoch": rec.best_epoch, "bad_epochs": rec.bad_epochs,
            "validations": len(rec.val_history),
            "best_weights": {n: t.cpu() for n, t in engine.net.row(k, engine.best).items()} if rec.best_epoch > 0
            else None}


def stop_resumed(engine) -> None:
    """A resumed run that had already stopped stops again (unless --set raised the limit); one that goes on
    past its mid-epoch max_steps stop forgets the validation made there."""
    for k, (rec, cfg) in enumerate(zip(engine.recs, engine.cfgs)):
        if engine.resumed_pruned[k]:  # its pruner decided: no limit brings it back
            rec.stop = "pruned"
            continue
        if cfg.max_steps is not None and rec.step >= cfg.max_steps:
            rec.stop = "max_steps"
            continue
        rewind = engine.rewinds[k]
        if rewind is not None:
            rec.best_val, rec.best_epoch, rec.bad_epochs = (rewind["best_val"], rewind["best_epoch"],
                                                            rewind["bad_epochs"])
            del rec.val_history[rewind["validations"]:]
            if rewind["best_weights"] is not None:
                with torch.no_grad():
                    engine.best[k] = engine.net.vector(rewind["best_weights"])
        if cfg.patience is not None and rec.bad_epochs >= cfg.patience:
            rec.stop = "early_stopping"
