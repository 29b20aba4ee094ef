"""Shared test settings."""

import os

from hypothesis import settings

# CI runs are reproducible: the same examples every time (locally they stay random, to keep finding cases).
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")
