"""The figures' canvas (layer L3, reports): the only module that imports matplotlib (headless Agg backend);
the topic modules draw with its ``plt`` and save through ``save_figure`` (atomic writes), with shared helpers."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib
import numpy as np

from fincast.config import atomic_file

matplotlib.use("Agg")  # headless: files only
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker as mticker  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402

if TYPE_CHECKING:
    import pandas as pd

# boxplot orientation keyword: "orientation" from matplotlib 3.10, "vert" before
BOXPLOT_HORIZONTAL = ({"orientation": "horizontal"} if tuple(int(p) for p in matplotlib.__version__.split(".")[:2])
                       >= (3, 10) else {"vert": False})

__all__ = ["BOXPLOT_HORIZONTAL", "LogNorm", "mticker", "plt", "save_figure"]


def save_figure(fig, path: str | Path) -> Path:
    """Write the figure as a PNG atomically, and close it."""
    try:
        with atomic_file(path) as fh:
            # zlib level 1: a fifth of the figure's time at the default level, for files ~25% larger
            fig.savefig(fh, dpi=110, format="png", pil_kwargs={"compress_level": 1})
    finally:
        plt.close(fig)
    return Path(path)


def log_y(ax) -> None:
    """A log y axis with plain labels at 1, 2 and 5 x 10^k: matplotlib's default minor ticks (a Line2D and a Text
    each) and math-text labels cost as much as the rest of a training-curves figure."""
    ax.set_yscale("log")
    _plain_log_ticks(ax.yaxis)


def log_x(ax) -> None:
    """:func:`log_y` for the x axis."""
    ax.set_xscale("log")
    _plain_log_ticks(ax.xaxis)


def _plain_log_ticks(axis) -> None:
    axis.set_major_locator(mticker.LogLocator(subs=(1.0, 2.0, 5.0), numticks=9))
    axis.set_minor_locator(mticker.NullLocator())
    axis.set_major_formatter(mticker.FuncFormatter(lambda v, _: f"{v:g}"))


def finite(values, positive: bool) -> np.ndarray:
    """Float copy with inf (and, for log axes, values <= 0) replaced by nan."""
    a = np.array(values, dtype=float, copy=True)
    a[~np.isfinite(a) | ((a <= 0) if positive else False)] = np.nan
    return a


def draw_heatmap(fig, ax, table: pd.DataFrame, *, title: str, fmt: str = "{:.2f}", cmap: str = "viridis",
                  vmin: float | None = None, vmax: float | None = None, cbar_label: str = "") -> None:
    data = table.to_numpy(dtype=float, na_value=np.nan)
    ax.set_title(title, fontsize=10)
    if data.size == 0:
        ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center")
        return
    if not np.isfinite(data).any() and (vmin is None or vmax is None):
        vmin, vmax = (0.0 if vmin is None else vmin), (1.0 if vmax is None else vmax)
    cm = plt.get_cmap(cmap).with_extremes(bad="0.8")
    im = ax.imshow(np.ma.masked_invalid(data), cmap=cm, vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xticks(range(data.shape[1]), [str(c) for c in table.columns], rotation=30, ha="right")
    ax.set_yticks(range(data.shape[0]), [str(i) for i in table.index])
    for (i, j), v in np.ndenumerate(data):
        r, g, b, _ = cm(im.norm(v)) if np.isfinite(v) else (0.8, 0.8, 0.8, 1)
        ax.text(j, i, "n/a" if np.isnan(v) else fmt.format(v), ha="center", va="center", fontsize=8,
                color="k" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "w")
    fig.colorbar(im, ax=ax, label=cbar_label, shrink=0.9)


def legend_right(fig, ax) -> None:
    if ax.get_legend_handles_labels()[0]:
        fig.legend(*ax.get_legend_handles_labels(), loc="outside right upper", fontsize=8)


def robust_lim(values: np.ndarray) -> tuple[float, float]:
    lo, hi = (float(v) for v in np.percentile(values, [1, 99]))
    pad = 0.1 * (hi - lo) if hi > lo else max(0.1 * abs(lo), 1e-3)
    return lo - pad, hi + pad
