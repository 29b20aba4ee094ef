"""How a process stops (layer L4, runs): SIGTERM and SIGHUP interrupt it as Ctrl-C does, so that every run,
study and sweep ends in a true state (KILLED) on them too.

SIGTERM is what ``timeout``, a scheduler or ``docker stop`` send; SIGHUP comes when the terminal closes. Each
raises :class:`Stopped`, a KeyboardInterrupt, so the cleanup paths written for Ctrl-C run for them
(``runs.record.ended``: the run KILLED, the exception re-raised); the CLI then exits with 128 + the signal's
number (143 for SIGTERM). Only the first signal raises: later ones are ignored, so that the cleanup it started
(ending the runs, waiting for the workers) is not cut short. A signal ignored when the handlers are installed
(SIGHUP under ``nohup``) stays ignored.

A study's, sweep's or backtest's worker processes take the same handlers for SIGINT, SIGTERM and SIGHUP
(``in_worker``); their driver, when interrupted, passes the stop on to them (``stop_workers``: the signal may
have reached the driver alone, e.g. ``kill PID`` or ``docker stop``), and a worker that was stopped refuses work
handed to it afterwards (``refuse_if_stopped``). No module state: the handler that is installed holds it."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from typing import Any

SIGNALS = (signal.SIGTERM, signal.SIGHUP)  # raised as Stopped in the CLI (SIGINT keeps Python's own handler)


class Stopped(KeyboardInterrupt):
    """The process was told to stop by ``signum`` (SIGTERM, SIGHUP; SIGINT in a worker process)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)

    def __reduce__(self) -> tuple:  # (a worker's stop comes back to its driver pickled)
        return type(self), (self.signum,)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class _Handler:
    """The first signal raises (KeyboardInterrupt for SIGINT, else Stopped); later ones are ignored."""

    def __init__(self) -> None:
        self.fired: int | None = None  # the signal that stopped the process

    def __call__(self, signum: int, frame: Any) -> None:
        if self.fired is not None:
            return
        self.fired = signum
        raise KeyboardInterrupt if signum == signal.SIGINT else Stopped(signum)


def _install(handler: _Handler, signums: tuple[int, ...]) -> dict[int, Any]:
    """``handler`` for each of ``signums`` not ignored now; -> the handlers it replaced."""
    previous = {}
    for signum in signums:
        if signal.getsignal(signum) is not signal.SIG_IGN:
            previous[signum] = signal.signal(signum, handler)
    return previous


@contextlib.contextmanager
def stop_on_signals(signums: tuple[int, ...] = SIGNALS) -> Iterator[None]:
    """For the block: ``signums`` raise :class:`Stopped` (the first of them; later ones are ignored). The
    previous handlers come back when the block ends. Outside the main thread (where Python delivers signals)
    nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = _install(_Handler(), signums)
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def in_worker() -> None:
    """A worker process: SIGINT, SIGTERM and SIGHUP interrupt its work (the first of them; later ones are
    ignored while it ends its runs), for the rest of its life."""
    _install(_Handler(), (signal.SIGINT, *SIGNALS))


def stopped() -> int | None:
    """The signal this process was stopped by, if any (as its installed handler saw it)."""
    for signum in (*SIGNALS, signal.SIGINT):
        handler = signal.getsignal(signum)
        if isinstance(handler, _Handler):
            return handler.fired
    return None


def refuse_if_stopped() -> None:
    """In a worker: raise :class:`Stopped` instead of starting work handed over after it was stopped (a pool
    queues more work than it runs)."""
    signum = stopped()
    if signum is not None:
        raise Stopped(signum)


def stop_workers(pool: Any) -> None:
    """Pass a stop on to a process pool's live workers (SIGTERM): each ends its runs KILLED, refuses the work
    still queued for it and exits when the pool shuts down."""
    processes = getattr(pool, "_processes", None) or {}  # (concurrent.futures keeps no public list of them)
    for proc in list(processes.values()):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            if proc.is_alive():
                os.kill(proc.pid, signal.SIGTERM)
