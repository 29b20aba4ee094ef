"""A tiny synthetic stability study for tests: overrides that make every run train in well under a second."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]

TINY = ["data.source=synthetic", "data.start=2019-01-01", "data.end=2021-06-30", "features.lookback=8",
        "features.vol_windows=[5]", "model.hidden_size=4", "train.epochs=2", "train.batch_size=128",
        "train.warmup_steps=2", "tracking.log_every=20", "monitor.every=null"]


def _spec(tmp_path: Path, **matrix) -> Path:
    spec = {
        "name": "tiny_study", "base": str(ROOT / "pipelines" / "price_crypto.yaml"),
        "set": {"data.tickers": ["BTC-USD"], "train.checkpoint": False, "tracking.log_model": False},
        "matrix": {"clip": ["none", {"method": "norm", "norm": {"max_norm": 0.5}}], "lr": [1e-2, 3.0], "seeds": 3,
                   **matrix},
        "study": {"workers": 1},
    }
    path = tmp_path / "tiny_study.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path
