"""A worker process stopped by its driver (``stopping.stop_workers``): the work it is doing is interrupted (a
KeyboardInterrupt, so its runs end KILLED), the work still queued for it is refused, and the stop reaches the
driver intact."""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import pickle
import signal
import time
from pathlib import Path

import pytest

from fincast.runs import stopping


def _work(started: Path) -> str:
    stopping.refuse_if_stopped()
    started.touch()
    time.sleep(30)
    return "finished"


def test_a_stopped_worker_is_interrupted_and_refuses_the_work_queued_for_it(tmp_path):
    assert pickle.loads(pickle.dumps(stopping.Stopped(signal.SIGTERM))).signum == signal.SIGTERM
    pool = cf.ProcessPoolExecutor(1, mp_context=mp.get_context("fork"), initializer=stopping.in_worker)
    try:
        first, second = pool.submit(_work, tmp_path / "first"), pool.submit(_work, tmp_path / "second")
        deadline = time.monotonic() + 30
        while not (tmp_path / "first").exists():
            assert time.monotonic() < deadline
            time.sleep(0.02)
        t0 = time.monotonic()
        stopping.stop_workers(pool)
        with pytest.raises(stopping.Stopped) as stopped:
            first.result(timeout=10)
        assert stopped.value.signum == signal.SIGTERM and isinstance(stopped.value, KeyboardInterrupt)
        with pytest.raises(stopping.Stopped):
            second.result(timeout=10)
        assert time.monotonic() - t0 < 5 and not (tmp_path / "second").exists()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
