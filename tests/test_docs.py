"""The README documents every make target, CLI command and config key (docs drift is a bug)."""

from __future__ import annotations

import re
from pathlib import Path

from fincast.config import describe_keys

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_every_make_target_is_documented():
    targets = set(re.findall(r"^([a-z][a-z0-9-]*):", (ROOT / "Makefile").read_text(), flags=re.M))
    assert {"install", "train", "train-price", "train-crypto", "data", "ui", "test", "lint", "clean"} <= targets
    missing = [t for t in sorted(targets) if f"make {t}" not in README]
    assert not missing, missing


def test_every_config_key_is_documented():
    missing = [k for k, _, _ in describe_keys() if f"`{k}`" not in README]
    assert not missing, missing


def test_cli_commands_are_documented():
    for cmd in ("fincast train", "fincast data", "fincast keys", "fincast resume", "fincast study",
                "fincast report stability", "--resume RUN_ID", "fincast backtest", "fincast sweep",
                "--join NAME", "fincast advise-clip"):
        assert cmd in README


def test_every_study_key_is_documented():
    import dataclasses

    from fincast.config import StudySettings

    missing = [f.name for f in dataclasses.fields(StudySettings) if f"`study.{f.name}`" not in README]
    assert not missing, missing


def test_every_sweep_key_is_documented():
    import dataclasses

    from fincast.config import SweepSettings

    missing = [f.name for f in dataclasses.fields(SweepSettings) if f"`sweep.{f.name}`" not in README]
    assert not missing, missing


def test_quick_start_comes_first():
    first_code = README.split("```")[1]
    assert "make train" in first_code and "make test" in first_code
