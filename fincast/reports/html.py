"""Pieces shared by the HTML reports: style, inlined images, number formatting, MLflow UI links."""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import Any

import numpy as np

CSS = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:13px;margin:0.5em 0 1.5em}th,td{border:1px solid #ccc;padding:3px 7px;
text-align:right}th{background:#f3f3f3}td.l,th.l{text-align:left}img{max-width:100%;border:1px solid #eee}
.verdict{background:#f6f8fa;border-left:4px solid #2a6;padding:0.6em 1em;margin:0.5em 0}code{font-size:12px}
.helped{color:#186a2e}.hurt{color:#a11}.note{color:#555;font-size:13px}
.o-helped{background:#d8f0dc;color:#135c26}.o-hurt{background:#f8d7d7;color:#8a1010}
.o-equivalent{background:#dde7f5;color:#1d3f73}.o-inconclusive{background:#eee;color:#555}
table.grid td{text-align:center;min-width:7em}"""


def img(out: Path, name: str, alt: str) -> str:
    data = base64.b64encode((out / name).read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def num(v: float, fmt: str = "{:.4g}") -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else fmt.format(v)


def ui_link(uri: str, experiment_id: str, run_id: str) -> str:
    """A link to the run in the MLflow UI: the tracking server itself, or `make ui` for a local store."""
    base = uri if uri.startswith("http") else "http://127.0.0.1:5000"
    url = f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    return f'<a href="{html.escape(url)}"><code>{run_id}</code></a>'


def plain(v: Any) -> Any:
    """JSON-safe: numpy scalars as Python values, nan/inf as null."""
    if isinstance(v, dict):
        return {k: plain(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [plain(x) for x in v]
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v
