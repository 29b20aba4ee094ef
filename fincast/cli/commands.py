"""The ``fincast`` commands (layer L4, cli): each reads its spec, calls the run driver or an experiment, and
prints a summary. Heavy imports (torch, mlflow) happen inside the commands, so ``--help`` answers at once."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from tqdm.contrib.logging import logging_redirect_tqdm

from fincast import config as config_mod
from fincast.cli.parser import build_parser
from fincast.config import FincastError
from fincast.runs import stopping


class _Format(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {record.getMessage()}"


def _setup_logging(quiet: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Format())
    root = logging.getLogger("fincast")
    root.handlers[:] = [handler]
    root.setLevel(logging.ERROR if quiet else logging.INFO)
    root.propagate = False
    for noisy in ("mlflow", "alembic", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def _progress(quiet: bool) -> bool:
    return not quiet and sys.stderr.isatty() and not os.environ.get("CI")


def cmd_train(args: argparse.Namespace) -> int:
    cfg = config_mod.load(args.pipeline, args.overrides)  # all config errors before any work
    from fincast.runs import driver, registry  # torch + mlflow

    if args.skip_missing_data:
        missing = registry.task(cfg.task).missing_local_data(cfg)
        if missing:
            print(f"skipped {args.pipeline}: its local data are not here ({', '.join(missing)})")
            return 0
    t0 = time.perf_counter()
    if args.resume:
        out = driver.resume_spec(cfg, args.resume, checkpoint_dir=args.checkpoint_dir or cfg.train.checkpoint_dir,
                                 progress=_progress(args.quiet))
    else:
        out = driver.train(cfg, progress=_progress(args.quiet))
    if out is not None:  # under torchrun, rank 0 reports
        print(registry.task(out.task).summary(out, time.perf_counter() - t0))
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    from fincast.runs import driver, registry

    t0 = time.perf_counter()
    out = driver.resume(args.run_id, args.overrides, checkpoint_dir=args.checkpoint_dir,
                        progress=_progress(args.quiet))
    if out is not None:
        print(registry.task(out.task).summary(out, time.perf_counter() - t0))
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    cfg = config_mod.load(args.pipeline, args.overrides)
    from fincast.runs import registry

    for line in registry.task(cfg.task).fetch(cfg, progress=_progress(args.quiet), refresh=not args.no_refresh):
        print(line)
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    from fincast.experiments import study as study_mod

    spec = study_mod.load(args.spec, args.overrides)  # every spec error before any work
    cells = spec.cells
    print(f"study {spec.name}: {len(spec.jobs)} runs = {len(cells)} cells x "
          f"{len(spec.jobs) // max(1, len(cells))} seeds")
    if args.dry_run:
        for job in spec.jobs:
            print(f"  {job.cfg.tracking.run_name:<40} {job.hash}")
        return 0
    if args.storage:
        from fincast.experiments import team

        out = team.run(spec, args.storage, progress=_progress(args.quiet),
                       reports=[("the stability report folder", Path("reports") / "stability" / spec.name)])
    else:
        out = study_mod.run(spec, progress=_progress(args.quiet))
    print(f"parent run {out.parent_run_id}  (experiment {out.experiment!r} in {out.tracking_uri})")
    if not out.ended:
        print(f"  this driver trained {out.here} runs ({out.diverged} went non-finite, {len(out.failed)} failed); "
              f"{out.note}; {out.seconds:.0f} s")
        return 1 if out.failed else 0
    here = f" ({out.here} here, {out.note})" if out.here >= 0 else ""
    print(f"  {out.finished} runs trained now{here} ({out.diverged} went non-finite), {out.skipped} finished "
          f"before, {len(out.failed)} failed; {out.seconds:.0f} s")
    for name, error in out.failed[:10]:
        print(f"  FAILED {name}: {error}")
    if args.storage:  # the team's last driver builds the report (the others cannot tell when the study ends)
        from fincast.reports import stability

        rep = stability.build(out.name, tracking_uri=out.tracking_uri, out_dir=Path("reports") / "stability")
        print(f"  report {rep.index}  (logged to the parent run)")
    if out.failed:
        print("  rerun the same command to retry the failed runs (finished ones are kept)")
        return 1
    if not args.storage:
        print(f"  next: fincast report stability --study {out.name}   (or: make report STUDY_NAME={out.name})")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from fincast.experiments import sweep as sweep_mod

    overrides = list(args.overrides) + ([f"name={args.join}"] if args.join else [])
    spec = sweep_mod.load(args.spec, overrides)  # every spec error before any work
    if args.dry_run:
        print(sweep_mod.describe(spec, args.storage))
        return 0
    if args.join:
        out = sweep_mod.join(spec, storage=args.storage, progress=_progress(args.quiet))
        print(f"joined sweep {out.name} (parent run {out.parent_run_id}, storage {out.storage})")
        print(f"  trained {out.trained_now} trials here; the sweep has {out.complete + out.pruned} of {out.target} "
              f"finished; {out.seconds:.0f} s")
        for number, error in out.failed[:10]:
            print(f"  FAILED trial {number}: {error}")
        print("  the process that started the sweep writes its summary (or rerun `fincast sweep SPEC --storage URL`)")
        return 1 if out.failed and out.complete + out.pruned < out.target else 0
    out = sweep_mod.run(spec, storage=args.storage, progress=_progress(args.quiet), out_dir=args.out)
    print(format_sweep(out))
    return 0 if out.complete + out.pruned >= out.target else 1


def format_sweep(out) -> str:
    lines = [f"sweep {out.name}: parent run {out.parent_run_id}  (experiment {out.experiment!r} in {out.tracking_uri})",
             f"  {out.complete + out.pruned} of {out.target} trials finished ({out.sampler}; {out.trained_now} now, "
             f"{out.finished_before} before): {out.complete} complete, {out.pruned} pruned, {out.diverged} diverged "
             f"(penalised); {len(out.failed)} failed; {out.seconds:.0f} s; storage {out.storage}"]
    b = out.best
    if b is None:
        lines.append("  no trial completed: no threshold found")
    else:
        thr = "unclipped (clip.method=none)" if b["method"] == "none" else \
            f"clip.method={b['method']} {b['threshold_key']}={b['threshold']:.4g}"
        lines += [f"  best threshold: {thr}, train.lr={b['lr']:.4g}",
                  f"    trial {b['number']}, best validation loss {b['value']:.5g}, run {b['run_id']}"]
    summary = out.summary.splitlines()
    start = next((i for i, line in enumerate(summary) if line.startswith("| method")), len(summary))
    lines += ["", *("  " + line if line else "" for line in summary[start:])]
    if out.advice:
        lines.append(f"  advised range of clip.norm.max_norm: [{out.advice['low']:.3g}, {out.advice['high']:.3g}] "
                     f"(probe run {out.advice['run_id']})")
    for number, error in out.failed[:10]:
        lines.append(f"  FAILED trial {number}: {error}")
    if out.folder is not None:
        lines.append(f"  report {out.folder}/ (summary.md, trials.csv, importance.csv, objective_vs_threshold.png)")
    lines.append("  look: make ui  (the sweep's parent run holds every trial as a child run)")
    return "\n".join(lines)


def cmd_advise(args: argparse.Namespace) -> int:
    cfg = config_mod.load(args.pipeline, args.overrides)
    if args.steps < 20:
        raise config_mod.ConfigError(f"--steps {args.steps}: at least 20 steps are needed for a distribution")
    from fincast.experiments import advise

    out = advise.advise(cfg, steps=args.steps, percentile=args.percentile, multiple=args.multiple, out_dir=args.out,
                        progress=_progress(args.quiet))
    print(advise.format_advice(out))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from fincast.reports import stability

    t0 = time.perf_counter()
    rep = stability.build(args.study, tracking_uri=args.tracking_uri, out_dir=Path(args.out) / "stability")
    if not args.quiet:
        print(rep.verdict_text)
        print()
        print(f"report {rep.index}  ({rep.runs} runs, {time.perf_counter() - t0:.1f} s)")
        print(f"  logged to the study's parent run {rep.parent_run_id}")
    else:
        print(rep.index)
    return 0


def cmd_backtest(args: argparse.Namespace) -> int:
    cfg = config_mod.load(args.pipeline, args.overrides)
    from fincast.runs import backtest

    out = backtest.backtest(cfg, progress=_progress(args.quiet), out_dir=args.out)
    print(backtest.summary(out))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from fincast.runs import export

    out = export.export(args.run_id, tracking_uri=args.tracking_uri)
    print(f"run {out.run_id}  {out.run_name}: model logged ({out.parameters} parameters) in {out.tracking_uri}")
    print("  look: make ui  (the run's Models tab)")
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    if args.markdown:
        print(config_mod.reference_markdown(), end="")
        return 0
    rows = config_mod.describe_keys()
    width = max(len(k) for k, _, _ in rows)
    for key, default, text in rows:
        print(f"{key:<{width}}  {default:<14}  {text}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    _setup_logging(getattr(args, "quiet", False))
    # SIGTERM and SIGHUP interrupt as Ctrl-C does (runs end KILLED); the handlers before come back at the end
    with stopping.stop_on_signals():
        try:
            # log lines go above the progress bars (tqdm.write) instead of through them
            with logging_redirect_tqdm(loggers=[logging.getLogger("fincast")]):
                return COMMANDS[args.command](args)
        except FincastError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except stopping.Stopped as exc:  # exit status 128 + the signal, as the shell reports a signal's death
            print(f"stopped by {exc}", file=sys.stderr)
            return exc.exit_code
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        except BrokenPipeError:  # `fincast keys | head`: the reader left; nothing more to say
            sys.stdout = None
            return 0


COMMANDS = {"train": cmd_train, "resume": cmd_resume, "data": cmd_data, "study": cmd_study, "sweep": cmd_sweep,
            "advise-clip": cmd_advise, "report": cmd_report, "backtest": cmd_backtest, "export": cmd_export,
            "keys": cmd_keys}
