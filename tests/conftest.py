"""Shared test settings."""

import os
import sys
from pathlib import Path

from hypothesis import settings

# Test helpers shared by several rooms' tests (a headless browser check, reference loops, a DDP script).
sys.path.insert(0, str(Path(__file__).resolve().parent / "support"))

# CI runs are reproducible: the same examples every time (locally they stay random, to keep finding cases).
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")
