"""Architecture rules: yfinance, mlflow and matplotlib are each imported in exactly one module, and the
package layers import only downward (also checked by `make lint` with import-linter)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fincast"

OWNERS = {
    "yfinance": "fincast/data/yahoo.py",
    "mlflow": "fincast/tracking/store.py",
    "matplotlib": "fincast/reports/figures/canvas.py",
    "optuna": "fincast/experiments/coordination.py",
}

LAYER = {  # docs/architecture.md: config -> L1 -> L2 -> reports -> runs -> experiments -> cli (-> __main__)
    "config": 0, "data": 1, "features": 1, "models": 1, "clipping": 1, "tracking": 1,
    "training": 2, "backtest": 2, "reports": 3, "runs": 4, "experiments": 5, "cli": 6,
    "__main__": 7,
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            if node.module == "fincast":  # from fincast import training
                names.update(f"fincast.{a.name}" for a in node.names)
    return names


def _modules():
    return sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("lib", sorted(OWNERS))
def test_third_party_library_imported_in_exactly_one_module(lib):
    users = [str(p.relative_to(PACKAGE.parent)) for p in _modules()
             if any(n == lib or n.startswith(lib + ".") for n in _imports(p))]
    assert users == [OWNERS[lib]]


def test_layers_import_only_downward():
    bad = []
    for p in _modules():
        rel = p.relative_to(PACKAGE)
        if rel.name == "__init__.py" and rel.parent == Path("."):
            continue
        own = rel.parts[0].removesuffix(".py")
        for name in _imports(p):
            parts = name.split(".")
            if parts[0] != "fincast" or len(parts) < 2 or parts[1] == "__init__":
                continue
            target = parts[1]
            if target != own and LAYER.get(target, -1) >= LAYER[own]:
                bad.append(f"{rel} imports fincast.{target}")
    assert not bad, bad
