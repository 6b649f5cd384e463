"""The project's figures: headless matplotlib, rows of titled image panels with colour bars, and one atomic PNG writer.

Every PNG the project writes (reconstruction slices, report grids, validation grids, the metadata report, benchmark
plots) goes through :func:`save_figure`, so a killed run never leaves a half-written image and every figure closes
its matplotlib state.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from utils.files import atomic_write_bytes

#: Colour maps: magnitudes in grey, error / spread maps in a heat map.
IMAGE_CMAP = "gray"
HEAT_CMAP = "inferno"


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the non-interactive Agg backend (no display needed), imported on first use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | Path, dpi: int = 100, bbox_inches: str | None = None) -> Path:
    """Write ``fig`` as PNG to ``path`` atomically (parent folders created) and close it.

    Args:
        fig: a matplotlib figure.
        path: the PNG file.
        dpi: resolution.
        bbox_inches: matplotlib's ``bbox_inches`` (``"tight"`` trims the margins).

    Returns:
        ``path`` as a :class:`Path`.
    """
    path = Path(path)
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=dpi, bbox_inches=bbox_inches)
    finally:
        pyplot().close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


@dataclass
class Panel:
    """One image panel.

    Attributes:
        image: ``[H, W]`` real or complex (its magnitude is shown).
        title: shown above the panel ('' for none).
        heat: a heat colour map (error, std) instead of grey.
        vmin, vmax: the colour range (None: the image's own).
        colorbar: draw a colour bar beside the panel.
    """

    image: np.ndarray
    title: str = ""
    heat: bool = False
    vmin: float | None = 0.0
    vmax: float | None = None
    colorbar: bool = False


def panel_figure(rows: Sequence[Sequence[Panel | None]], title: str = "", panel_inches: float = 2.2,
                 title_size: float = 8) -> Any:
    """A figure of image panels, ``rows[i][j]`` at row i, column j (None: an empty cell).

    Args:
        rows: the panels, row by row (rows may be shorter than the longest; the rest stays empty).
        title: the figure's title.
        panel_inches: the side of one panel in inches (with a colour bar the cell is 25 % wider).
        title_size: font size of the panel titles.

    Returns:
        The matplotlib figure (pass it to :func:`save_figure`).
    """
    plt = pyplot()
    n_rows = max(len(rows), 1)
    n_cols = max((len(r) for r in rows), default=1)
    has_bar = any(p is not None and p.colorbar for r in rows for p in r)
    width = panel_inches * n_cols * (1.25 if has_bar else 1.0)
    height = panel_inches * n_rows + (0.35 if title else 0.0) + 0.25
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(width, height), squeeze=False)
    for i in range(n_rows):
        for j in range(n_cols):
            ax = axes[i, j]
            panel = rows[i][j] if i < len(rows) and j < len(rows[i]) else None
            ax.set_xticks([])
            ax.set_yticks([])
            if panel is None:
                ax.axis("off")
                continue
            shown = ax.imshow(np.abs(np.nan_to_num(panel.image)), cmap=HEAT_CMAP if panel.heat else IMAGE_CMAP,
                              vmin=panel.vmin, vmax=panel.vmax)
            if panel.title:
                ax.set_title(panel.title, fontsize=title_size)
            if panel.colorbar:
                bar = fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.03)
                bar.ax.tick_params(labelsize=max(title_size - 2, 5))
    if title:
        fig.suptitle(title, fontsize=title_size + 1)
    fig.tight_layout()
    return fig
