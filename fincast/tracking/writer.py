"""The metric writer process: the trainer enqueues metric rows, a separate process stores them (see the
package's docstring for why)."""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import time
from typing import Any

from fincast.config import TrackingConfig
from fincast.tracking.common import WriterError, resolve_uri
from fincast.tracking.store import _writer_main

_CONTEXT: Any = None


def _context() -> Any:
    """forkserver with this module preloaded: a writer starts without re-importing mlflow in each process,
    and nothing is forked from a trainer whose torch threads are running."""
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = mp.get_context("forkserver")
        _CONTEXT.set_forkserver_preload(["fincast.tracking"])
    return _CONTEXT


class MetricWriter:
    """A child process that owns an MlflowClient and stores the metric batches it is sent, in order.

    Start it early (``MetricWriter(uri)`` returns at once, its imports happen in the background), hand it
    to ``start_run`` (which has it open the store), and ``close()`` it when done. One writer can serve
    several runs in turn."""

    def __init__(self, uri: str):
        self.uri = uri
        ctx = _context()
        self._inbox = ctx.Queue()
        self._outbox = ctx.Queue()
        self._proc = ctx.Process(target=_writer_main, args=(uri, self._inbox, self._outbox, os.getpid()),
                                 name="fincast-metric-writer", daemon=True)
        self._proc.start()
        self._closed = False
        self._ready = False

    @classmethod
    def maybe(cls, cfg: TrackingConfig) -> MetricWriter | None:
        """A writer when ``tracking.metrics_writer == 'process'`` and processes can be started, else None."""
        if cfg.metrics_writer != "process" or "forkserver" not in mp.get_all_start_methods():
            return None
        return cls(resolve_uri(cfg))

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    def ready(self) -> None:
        """Wait until the child has opened the store. Until then nobody else may touch a new SQLite store:
        two processes creating its tables at once collide in MLflow's migrations."""
        if not self._ready:
            self._inbox.put(("open", None, None, 0))
            self._wait("ready")
            self._ready = True

    def put(self, run_id: str, rows: list[tuple[str, float, int]], now: int) -> None:
        if self._closed:
            raise WriterError("the metric writer is closed")
        if not self._proc.is_alive():  # never queue into a dead process: its pipe fills and exit would hang
            raise WriterError(f"the metric writer process died (exit code {self._proc.exitcode}); "
                              "metrics since its last flush are lost")
        self._inbox.put(("rows", run_id, rows, now))

    def _wait(self, what: str, timeout: float = 600.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                kind, detail = self._outbox.get(timeout=1.0)
            except queue.Empty:
                if not self._proc.is_alive():
                    raise WriterError(
                        f"the metric writer process died (exit code {self._proc.exitcode}). If fincast runs from "
                        "your own script, guard it with `if __name__ == '__main__':` (the writer process imports "
                        "the main module), or set tracking.metrics_writer=inline") from None
                if time.monotonic() > deadline:
                    raise WriterError(f"the metric writer did not {what} within {timeout:.0f} s") from None
                continue
            if kind == "error":
                raise WriterError(f"storing metrics in MLflow failed: {detail}")
            if kind == what:
                return

    def flush(self) -> None:
        """Wait until everything put so far is stored; raise WriterError if anything failed."""
        if self._closed:
            return
        self._inbox.put(("flush", None, None, 0))
        self._wait("flush")

    def close(self) -> None:
        if self._closed:
            return
        try:
            if not self._proc.is_alive():
                return  # (the finally below still releases the queue)
            self._inbox.put(("close", None, None, 0))
            self._wait("close", timeout=60.0)
        finally:
            self._closed = True
            self._inbox.cancel_join_thread()  # nothing left to deliver; a dead reader must not block exit
            self._proc.join(timeout=10)
            if self._proc.is_alive():
                self._proc.kill()  # (it ignores SIGTERM: a stop of the trainer's process group is the trainer's)
