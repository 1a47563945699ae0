"""Figure helpers: matplotlib (Agg) to PNG + SVG files, deterministic output."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..results import write_atomic

plt.rcParams.update({
    "svg.hashsalt": "sinkhole",
    "svg.fonttype": "path",
    "figure.dpi": 100,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "font.size": 10,
})


class Figure:
    """A rendered figure: name, caption, SVG text (inline) and PNG bytes."""

    def __init__(self, name: str, caption: str, fig):
        self.name = name
        self.caption = caption
        # what the figure shows, for checks (every plot needs axis labels): one entry per visible axes
        self.axes = [{"xlabel": ax.get_xlabel(), "ylabel": ax.get_ylabel(), "title": ax.get_title(),
                      "colorbar": hasattr(ax, "_colorbar") or ax.get_label() == "<colorbar>",
                      "has_data": bool(ax.lines or ax.collections or ax.patches or ax.images or ax.texts)}
                     for ax in fig.axes if ax.get_visible() and ax.axison]
        buf = io.StringIO()
        fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
        self.svg = buf.getvalue()
        pbuf = io.BytesIO()
        fig.savefig(pbuf, format="png", bbox_inches="tight", dpi=110, metadata={"Software": None})
        self.png = pbuf.getvalue()
        plt.close(fig)

    def save(self, folder: Path) -> list[Path]:
        folder.mkdir(parents=True, exist_ok=True)
        p1, p2 = folder / f"{self.name}.png", folder / f"{self.name}.svg"
        write_atomic(p1, self.png)
        write_atomic(p2, self.svg)
        return [p1, p2]


def new(w: float = 6.4, h: float = 3.6, ncols: int = 1, nrows: int = 1):
    return plt.subplots(nrows, ncols, figsize=(w, h), squeeze=False)
