"""A sweep driven from two processes: the driver, then, once it is ready, a second process joining it."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Pair:
    driver: subprocess.Popen
    joiner: subprocess.Popen
    driver_out: str
    joiner_out: str


def drive_and_join(args: list[str], join_args: list[str], ready: Callable[[], bool], cwd: Path,
                   wait_s: float = 120, timeout: float = 300) -> Pair:
    """Start ``args``; once ``ready()`` (polled), start ``join_args``; wait for both (killed on any failure).
    Asserts both exit 0."""
    driver = subprocess.Popen(args, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True)
    joiner = None
    try:
        deadline = time.monotonic() + wait_s
        while not ready():
            assert driver.poll() is None, driver.communicate()
            assert time.monotonic() < deadline, "the driver never became ready for a joiner"
            time.sleep(0.2)
        joiner = subprocess.Popen(join_args, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  start_new_session=True)
        j_out, j_err = joiner.communicate(timeout=timeout)
        d_out, d_err = driver.communicate(timeout=timeout)
    finally:
        for p in (driver, joiner):
            if p is not None and p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    assert joiner.returncode == 0, j_err
    assert driver.returncode == 0, d_err
    return Pair(driver, joiner, d_out, j_out)
