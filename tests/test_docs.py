"""The docs keep up with the product: the README stays a short entry point, every make target and CLI command
is documented somewhere in README.md or docs/, the configuration reference is the one the schema generates, and
no relative link points nowhere (docs drift is a bug)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from fincast import config as config_mod

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
ALL = "\n".join(p.read_text() for p in [README, *DOCS])


def test_the_readme_is_a_short_entry_point_with_the_quick_start_first():
    text = README.read_text()
    assert len(text.splitlines()) <= 250
    first_code = text.split("```")[1]
    assert "make train" in first_code and "make test" in first_code


def test_every_make_target_is_documented():
    targets = re.findall(r"^([a-z][a-z-]*):.*## ", (ROOT / "Makefile").read_text(), flags=re.M)
    assert {"install", "train", "test", "lint", "docs", "stability", "backtest"} <= set(targets)
    missing = [t for t in targets if f"make {t}" not in ALL]
    assert not missing, missing


def test_every_cli_command_is_documented():
    out = subprocess.run([sys.executable, "-m", "fincast", "--help"], capture_output=True, text=True, cwd=ROOT,
                         check=True).stdout
    commands = re.findall(r"^    ([a-z][a-z-]+)\s", out, flags=re.M)
    assert {"train", "resume", "data", "study", "sweep", "advise-clip", "report", "backtest", "keys"} <= set(commands)
    missing = [c for c in commands if f"fincast {c}" not in ALL]
    assert not missing, missing


def test_the_configuration_reference_is_current():
    """docs/config.md is what `make docs` generates from the schema today."""
    assert (ROOT / "docs" / "config.md").read_text() == config_mod.reference_markdown()


def test_every_relative_link_points_to_a_file():
    broken = []
    for page in [README, *DOCS]:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"^(https?:|mailto:|#)", target):
                continue
            path = (page.parent / target.split("#", 1)[0]).resolve()
            if not path.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, broken


def test_every_docs_page_is_reachable_from_the_readme():
    text = README.read_text()
    orphans = [p.name for p in DOCS if f"docs/{p.name}" not in text]
    assert not orphans, orphans
